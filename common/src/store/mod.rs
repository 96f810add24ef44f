//! Bytes on disk: the fsynced sled store helpers shared by the spool and
//! the inbox, and the seed file format.

pub mod durable;
pub mod seed_file;
pub mod segments;
