//! Bytes on disk: the fsynced sled store helpers shared by the spool and
//! the inbox, the seed file format, and the messages of a table joining
//! in chunks.

pub mod durable;
pub mod join;
pub mod seed_file;
pub mod segments;
