//! pgcourier's deterministic core. Everything here is a pure function of
//! its inputs (bytes, frames, events and the time passed in as `now`): no
//! sockets, files, clocks or async runtime. The crate's dependencies make
//! that a compiler rule: it cannot reach tokio, quinn, sled or a database.
//!
//! - [`record`]: the unit of the spool, the wire and the inbox (CRC-32).
//! - [`frame`]: the session's frames and the zstd batch codec.
//! - [`pgoutput`]: decoding of PostgreSQL's logical replication messages.
//! - [`cutter`]: capture's transaction cutting, pgoutput messages to records.
//! - [`walstream`]: the replication stream's messages (XLogData, keepalive,
//!   standby status update).

pub mod cutter;
pub mod frame;
pub mod lsn;
pub mod pgoutput;
pub mod record;
pub mod session;
pub mod walstream;

pub use lsn::Lsn;
