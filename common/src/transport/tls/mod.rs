//! Mutual TLS with pinned self-signed certificates, the only way the two
//! sites trust each other (the QUIC endpoints of `transport::quic` use it
//! both ways):
//!
//! - [`fingerprint`]: a certificate's SHA-256 fingerprint, as pinned in the
//!   configs and printed by `keygen`.
//! - [`identity`]: this node's key and self-signed certificate: `keygen`
//!   writes them, `load_identity` reads and checks them.
//! - [`verify`]: the rustls verifiers that accept exactly the pinned peer
//!   certificates (no CA, no names; validity dates are still checked).

use std::net::SocketAddr;
use std::path::PathBuf;

pub mod fingerprint;
pub mod identity;
pub mod verify;

pub use fingerprint::{fingerprint, Fingerprint};
#[cfg(test)]
pub(crate) use identity::generate_identity;
pub use identity::{keygen, load_identity, Identity, CERT_SAN};
pub use verify::{NotPinned, PinnedClientVerifier, PinnedServerVerifier};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path} (check the path and its permissions, or generate a certificate and key with keygen)")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} already exists; refusing to overwrite it (move it away or choose another path)"
    )]
    Exists { path: PathBuf },
    #[error(
        "{what} file {path} holds no usable PEM {what} (expected a PEM file as written by keygen)"
    )]
    BadPem { what: &'static str, path: PathBuf },
    #[error("private key file {key} does not belong to certificate file {cert} (use the key written together with that certificate by keygen)")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("invalid fingerprint {0:?}: expected 64 hex digits (as printed by keygen)")]
    BadFingerprint(String),
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("TLS configuration failed: {0}")]
    Config(String),
    #[error(
        "cannot bind the QUIC endpoint to {addr} (is the address local and the UDP port free?)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on TCP {addr} (the TCP port of the same number as the QUIC one must be free too)")]
    BindTcp {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::{Arc, Mutex};

    /// Captured log output of a thread-local tracing subscriber.
    #[derive(Clone, Default)]
    pub(crate) struct Logs(Arc<Mutex<Vec<u8>>>);

    impl Logs {
        pub(crate) fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Capture this thread's WARN-and-above log lines until the guard drops.
    pub(crate) fn capture_warnings() -> (tracing::subscriber::DefaultGuard, Logs) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (tracing::subscriber::set_default(subscriber), logs)
    }
}
