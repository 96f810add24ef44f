//! What the sender, the receiver and the queue CLI share beyond the pure
//! core (`pgcourier-proto`), grouped by job:
//!
//! - [`transport`]: QUIC, mutual TLS with pinned certificates, frames on a
//!   stream.
//! - [`store`]: the fsynced store helpers and the seed file format.
//! - [`pg`]: talking to PostgreSQL: identifiers, error classes, the progress
//!   row, connection settings.
//! - [`ops`]: what an operator sees: the admin endpoint, logging, backoff,
//!   progress bars, record rendering.
//!
//! See `ARCHITECTURE.md` for where each piece sits on the path of a change.

pub mod config;
pub mod ops;
pub mod pg;
pub mod store;
pub mod transport;

pub use pgcourier_proto::Lsn;
