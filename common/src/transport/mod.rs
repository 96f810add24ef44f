//! The link between sites: QUIC, or TLS over TCP where UDP does not pass,
//! with mutual TLS and pinned certificates, and frames on its streams.

pub mod framed;
pub mod link;
pub mod peer;
pub mod quic;
pub mod settings;
pub mod tcp;
pub mod tls;
