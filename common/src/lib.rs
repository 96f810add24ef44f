//! Pieces shared by the sender, the receiver and the queue CLI: the change
//! model (pgoutput messages), the spool record format, the wire protocol,
//! mutual-TLS pinning, the QUIC transport settings and the durable store
//! helpers. See `ARCHITECTURE.md` for where each piece sits on the path of a
//! change.

pub mod admin;
pub mod backoff;
pub mod config;
pub mod copy;
pub mod durable;
pub mod inspect;
pub mod logging;
pub mod lsn;
pub mod pgoutput;
pub mod progress;
pub mod quic;
pub mod record;
pub mod tls;
pub mod wire;

pub use lsn::Lsn;
