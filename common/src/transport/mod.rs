//! The link between sites: QUIC with mutual TLS and pinned certificates,
//! and frames on its streams.

pub mod framed;
pub mod peer;
pub mod quic;
pub mod settings;
pub mod tls;
