//! Mutual TLS with pinned self-signed certificates: key generation,
//! SHA-256 fingerprints, and rustls verifiers that accept exactly the pinned
//! peer certificates (no CA, no names).
//! HELPER B: implement.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// SHA-256 of a certificate's DER encoding. Displayed as 64 lowercase hex
/// digits; parsed from hex with or without `:` separators and an optional
/// `sha256:` prefix.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}")]
    Read { what: &'static str, path: PathBuf, #[source] source: std::io::Error },
    #[error("cannot write {path}")]
    Write { path: PathBuf, #[source] source: std::io::Error },
    #[error("{what} file {path} holds no usable PEM {what}")]
    BadPem { what: &'static str, path: PathBuf },
    #[error("invalid fingerprint {0:?}: expected 64 hex digits (as printed by keygen)")]
    BadFingerprint(String),
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("TLS configuration failed: {0}")]
    Config(String),
}

impl FromStr for Fingerprint {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let _ = s;
        todo!("helper B")
    }
}

/// Fingerprint of a DER certificate.
pub fn fingerprint(cert_der: &[u8]) -> Fingerprint {
    let _ = cert_der;
    todo!("helper B")
}

/// A certificate and its private key, loaded from PEM files.
pub struct Identity {
    pub cert: rustls::pki_types::CertificateDer<'static>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
}

impl Identity {
    pub fn fingerprint(&self) -> Fingerprint {
        fingerprint(&self.cert)
    }
}

/// Write a new key (mode 0600) and self-signed certificate for `name`;
/// refuses to overwrite existing files. Returns the certificate fingerprint.
pub fn keygen(cert_path: &Path, key_path: &Path, name: &str) -> Result<Fingerprint, TlsError> {
    let _ = (cert_path, key_path, name);
    todo!("helper B")
}

/// Load an identity; errors name the file.
pub fn load_identity(cert_path: &Path, key_path: &Path) -> Result<Identity, TlsError> {
    let _ = (cert_path, key_path);
    todo!("helper B")
}
