//! This node's identity: an ECDSA P-256 key and a self-signed (non-CA)
//! certificate, written by `keygen` (key mode 0600, never overwritten) and
//! loaded, checked and warned about (dates) at daemon start.

use std::fmt;
use std::io::Write;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use super::verify::check_validity;
use super::{fingerprint, Fingerprint, TlsError};

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

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// The subject alternative name every pgcourier certificate carries (names
/// are not checked: certificates are pinned by fingerprint).
pub const CERT_SAN: &str = "pgcourier";

/// A fresh self-signed (non-CA) certificate for `name` with an ECDSA P-256
/// key: SAN `pgcourier`, CN `name`, rcgen's default validity. `tweak` may
/// adjust the parameters (tests use it for validity dates).
fn generate(
    name: &str,
    tweak: impl FnOnce(&mut rcgen::CertificateParams),
) -> Result<(rcgen::Certificate, rcgen::KeyPair), TlsError> {
    let gen_err = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
    let mut params = rcgen::CertificateParams::new(vec![CERT_SAN.to_string()]).map_err(gen_err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::NoCa;
    tweak(&mut params);
    let cert = params.self_signed(&key).map_err(gen_err)?;
    Ok((cert, key))
}

/// An in-memory identity (certificate and key) for `name`; `tweak` may adjust
/// the certificate parameters before signing.
#[cfg(test)]
pub(crate) fn generate_identity(
    name: &str,
    tweak: impl FnOnce(&mut rcgen::CertificateParams),
) -> Result<Identity, TlsError> {
    let (cert, key) = generate(name, tweak)?;
    Ok(Identity {
        cert: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )),
    })
}

/// Create `path` (which must not exist) with `mode` and write `contents`.
fn write_new(path: &Path, mode: u32, contents: &[u8]) -> Result<(), TlsError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let mut file = opts.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            TlsError::Exists { path: path.into() }
        } else {
            TlsError::Write {
                path: path.into(),
                source,
            }
        }
    })?;
    let result = (|| {
        // The creation mode is masked by the umask; make it exact.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        file.write_all(contents)?;
        file.sync_all()
    })();
    result.map_err(|source| {
        let _ = std::fs::remove_file(path);
        TlsError::Write {
            path: path.into(),
            source,
        }
    })
}

/// Write a new key (mode 0600) and self-signed certificate for `name`;
/// refuses to overwrite existing files. Returns the certificate fingerprint.
pub fn keygen(cert_path: &Path, key_path: &Path, name: &str) -> Result<Fingerprint, TlsError> {
    // Check both up front so that a refusal leaves nothing behind.
    for path in [key_path, cert_path] {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(TlsError::Exists { path: path.into() });
        }
    }
    if cert_path == key_path {
        return Err(TlsError::Config(format!(
            "certificate and key paths are both {}; use two different files",
            cert_path.display()
        )));
    }
    let (cert, key) = generate(name, |_| {})?;
    write_new(key_path, 0o600, key.serialize_pem().as_bytes())?;
    if let Err(e) = write_new(cert_path, 0o644, cert.pem().as_bytes()) {
        // Do not leave a key without its certificate behind.
        let _ = std::fs::remove_file(key_path);
        return Err(e);
    }
    Ok(fingerprint(cert.der()))
}

/// Load an identity; errors name the file.
pub fn load_identity(cert_path: &Path, key_path: &Path) -> Result<Identity, TlsError> {
    use rustls::pki_types::pem::Error as PemError;
    let pem_err = |what: &'static str, path: &Path, e: PemError| match e {
        PemError::Io(source) => TlsError::Read {
            what,
            path: path.into(),
            source,
        },
        _ => TlsError::BadPem {
            what,
            path: path.into(),
        },
    };
    let cert = CertificateDer::from_pem_file(cert_path)
        .map_err(|e| pem_err("certificate", cert_path, e))?;
    let key =
        PrivateKeyDer::from_pem_file(key_path).map_err(|e| pem_err("private key", key_path, e))?;

    // Catch unusable keys, unparsable certificates and mismatched pairs now
    // rather than as an obscure handshake failure later.
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(vec![cert.clone()], key.clone_key(), &provider).map_err(
        |source| match source {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert: cert_path.into(),
                key: key_path.into(),
                source,
            },
            rustls::Error::InvalidCertificate(_) => TlsError::BadPem {
                what: "certificate",
                path: cert_path.into(),
            },
            _ => TlsError::BadPem {
                what: "private key",
                path: key_path.into(),
            },
        },
    )?;

    let identity = Identity { cert, key };
    if let Err(e) = check_validity(&identity.cert, UnixTime::now()) {
        tracing::warn!(
            cert = %cert_path.display(),
            fingerprint = %identity.fingerprint(),
            "own certificate is not currently valid, peers will refuse it: {e}"
        );
    }
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn keygen_writes_a_private_key_and_a_readable_certificate_and_load_identity_round_trips_the_fingerprint(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("node.crt"), dir.path().join("node.key"));
        let fp = keygen(&cert, &key, "branch-7").unwrap();
        #[cfg(unix)]
        {
            assert_eq!(mode(&key), 0o600, "key mode");
            assert_eq!(mode(&cert), 0o644, "certificate mode");
        }
        let key_text = std::fs::read_to_string(&key).unwrap();
        let cert_text = std::fs::read_to_string(&cert).unwrap();
        assert!(
            key_text.contains("-----BEGIN PRIVATE KEY-----"),
            "{key_text}"
        );
        assert!(
            cert_text.contains("-----BEGIN CERTIFICATE-----"),
            "{cert_text}"
        );

        let id = load_identity(&cert, &key).unwrap();
        assert_eq!(id.fingerprint(), fp);
        assert_eq!(fingerprint(&id.cert), fp);
        assert_eq!(fp.to_string().parse::<Fingerprint>().unwrap(), fp);
        // CN and SAN are in the DER as plain strings.
        let der: &[u8] = &id.cert;
        assert!(der.windows(8).any(|w| w == b"branch-7"), "CN missing");
        assert!(der.windows(9).any(|w| w == b"pgcourier"), "SAN missing");
        // A fresh certificate is valid now.
        check_validity(&id.cert, UnixTime::now()).unwrap();
        // Two keygens give two different identities.
        let other = keygen(
            &dir.path().join("b.crt"),
            &dir.path().join("b.key"),
            "branch-7",
        )
        .unwrap();
        assert_ne!(other, fp);
    }

    #[test]
    fn keygen_refuses_to_overwrite_either_file_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("node.crt"), dir.path().join("node.key"));
        keygen(&cert, &key, "hq").unwrap();
        let before = (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());

        let err = keygen(&cert, &key, "hq").unwrap_err();
        assert!(matches!(err, TlsError::Exists { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&key.display().to_string())
                || err.to_string().contains(&cert.display().to_string())
        );
        assert_eq!(
            before,
            (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap()),
            "files changed"
        );

        // Only the certificate exists: refused, and no key is left behind.
        let fresh_key = dir.path().join("fresh.key");
        let err = keygen(&cert, &fresh_key, "hq").unwrap_err();
        assert!(
            err.to_string().contains(&cert.display().to_string()),
            "{err}"
        );
        assert!(!fresh_key.exists());

        // Only the key exists: refused, and no certificate is written.
        let fresh_cert = dir.path().join("fresh.crt");
        let err = keygen(&fresh_cert, &key, "hq").unwrap_err();
        assert!(
            err.to_string().contains(&key.display().to_string()),
            "{err}"
        );
        assert!(!fresh_cert.exists());
        assert_eq!(
            before,
            (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap()),
            "files changed"
        );
    }

    #[test]
    fn load_identity_errors_name_the_offending_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("a.crt"), dir.path().join("a.key"));
        keygen(&cert, &key, "a").unwrap();
        let (cert_b, key_b) = (dir.path().join("b.crt"), dir.path().join("b.key"));
        keygen(&cert_b, &key_b, "b").unwrap();

        let missing = dir.path().join("missing.crt");
        let err = load_identity(&missing, &key).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a pem file\n").unwrap();
        let err = load_identity(&garbage, &key).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::BadPem {
                    what: "certificate",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&garbage.display().to_string()),
            "{err}"
        );

        // Certificate and key swapped: each file lacks the expected PEM kind.
        let err = load_identity(&key, &cert).unwrap_err();
        assert!(
            err.to_string().contains(&key.display().to_string()),
            "{err}"
        );
        let err = load_identity(&cert, &cert).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::BadPem {
                    what: "private key",
                    ..
                }
            ),
            "{err:?}"
        );

        // A key from another identity.
        let err = load_identity(&cert, &key_b).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains(&cert.display().to_string())
                && text.contains(&key_b.display().to_string()),
            "{text}"
        );
    }
}
