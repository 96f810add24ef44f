//! Mutual TLS with pinned self-signed certificates: key generation,
//! SHA-256 fingerprints, and rustls verifiers that accept exactly the pinned
//! peer certificates (no CA, no names; validity dates are still checked).

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use sha2::{Digest, Sha256};

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
}

impl FromStr for Fingerprint {
    type Err = TlsError;

    /// Accepts `0123…ef` (64 hex digits), `01:23:…:ef` (32 colon-separated
    /// pairs), either optionally prefixed with `sha256:`; case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TlsError::BadFingerprint(s.to_string());
        let body = match s.get(..7) {
            Some(prefix) if prefix.eq_ignore_ascii_case("sha256:") => &s[7..],
            _ => s,
        };
        let pairs: Vec<&str> = if body.contains(':') {
            body.split(':').collect()
        } else if body.len() == 64 && body.is_ascii() {
            (0..32).map(|i| &body[2 * i..2 * i + 2]).collect()
        } else {
            return Err(bad());
        };
        if pairs.len() != 32 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(&pairs) {
            let b = pair.as_bytes();
            if b.len() != 2 {
                return Err(bad());
            }
            let hex = |c: u8| (c as char).to_digit(16).ok_or_else(bad);
            *byte = (hex(b[0])? << 4 | hex(b[1])?) as u8;
        }
        Ok(Fingerprint(out))
    }
}

/// Fingerprint of a DER certificate.
pub fn fingerprint(cert_der: &[u8]) -> Fingerprint {
    Fingerprint(Sha256::digest(cert_der).into())
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

// ---------------------------------------------------------------------------
// Certificate validity dates (a minimal DER walk; nothing else is parsed).

/// One DER TLV: (tag, contents, rest).
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| acc << 8 | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An X.509 UTCTime (tag 0x17) or GeneralizedTime (0x18) in its DER form
/// (`YYMMDDHHMMSSZ` / `YYYYMMDDHHMMSSZ`), as seconds since the epoch.
fn der_time(tag: u8, value: &[u8]) -> Option<i64> {
    let digits = value.strip_suffix(b"Z")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let num = |b: &[u8]| b.iter().fold(0i64, |acc, &c| acc * 10 + (c - b'0') as i64);
    let (year, rest) = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy = num(&digits[..2]);
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (0x18, 14) => (num(&digits[..4]), &digits[4..]),
        _ => return None,
    };
    let (mo, d, h, mi, s) = (
        num(&rest[0..2]),
        num(&rest[2..4]),
        num(&rest[4..6]),
        num(&rest[6..8]),
        num(&rest[8..10]),
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(year, mo, d) * 86_400 + h * 3600 + mi * 60 + s)
}

/// (notBefore, notAfter) of a DER certificate, in seconds since the epoch.
fn validity(cert_der: &[u8]) -> Option<(i64, i64)> {
    let (0x30, cert, _) = der_next(cert_der)? else {
        return None;
    };
    let (0x30, mut tbs, _) = der_next(cert)? else {
        return None;
    };
    // [0] version (optional), serialNumber, signature, issuer, validity.
    let (tag, _, rest) = der_next(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
    }
    for expected in [0x02, 0x30, 0x30] {
        let (tag, _, rest) = der_next(tbs)?;
        if tag != expected {
            return None;
        }
        tbs = rest;
    }
    let (0x30, validity, _) = der_next(tbs)? else {
        return None;
    };
    let (t1, v1, rest) = der_next(validity)?;
    let (t2, v2, _) = der_next(rest)?;
    Some((der_time(t1, v1)?, der_time(t2, v2)?))
}

fn unix_time(secs: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(secs.max(0) as u64))
}

/// Reject a certificate that is expired or not yet valid at `now`.
fn check_validity(cert: &CertificateDer<'_>, now: UnixTime) -> Result<(), CertificateError> {
    let (not_before, not_after) = validity(cert).ok_or(CertificateError::BadEncoding)?;
    let t = now.as_secs().min(i64::MAX as u64) as i64;
    if t < not_before {
        return Err(CertificateError::NotValidYetContext {
            time: now,
            not_before: unix_time(not_before),
        });
    }
    if t > not_after {
        return Err(CertificateError::ExpiredContext {
            time: now,
            not_after: unix_time(not_after),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Pinned verifiers.

/// The error a verifier returns for a certificate whose fingerprint is not
/// pinned.
#[derive(thiserror::Error)]
#[error("peer certificate fingerprint {offered} is not pinned")]
pub struct NotPinned {
    pub offered: Fingerprint,
}

// rustls renders `CertificateError::Other` with `{:?}`: keep it readable.
impl fmt::Debug for NotPinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The pinned set and the signature algorithms shared by both verifiers.
#[derive(Debug)]
struct Pins {
    pinned: BTreeSet<Fingerprint>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Pins {
    fn new(pinned: impl IntoIterator<Item = Fingerprint>) -> Self {
        Pins {
            pinned: pinned.into_iter().collect(),
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    /// Accept `end_entity` iff it is pinned and currently valid; logs one
    /// warning on refusal. `peer` is "server" or "client".
    fn check(
        &self,
        peer: &'static str,
        end_entity: &CertificateDer<'_>,
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let offered = fingerprint(end_entity);
        if !self.pinned.contains(&offered) {
            tracing::warn!(
                offered = %offered,
                peer,
                "refusing TLS peer: the {peer} certificate it offered is not pinned (pin this fingerprint to accept it)"
            );
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(NotPinned { offered })),
            )));
        }
        if let Err(e) = check_validity(end_entity, now) {
            let err = rustls::Error::InvalidCertificate(e);
            tracing::warn!(offered = %offered, peer, "refusing TLS peer: its pinned {peer} certificate is unusable: {err}");
            return Err(err);
        }
        Ok(())
    }
}

/// Server-certificate verifier for the dialing side: accepts exactly the
/// pinned certificates (by SHA-256 fingerprint), ignoring names and issuers.
#[derive(Debug)]
pub struct PinnedServerVerifier(Pins);

impl PinnedServerVerifier {
    pub fn new(pinned: impl IntoIterator<Item = Fingerprint>) -> Arc<Self> {
        Arc::new(PinnedServerVerifier(Pins::new(pinned)))
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .check("server", end_entity, now)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms.supported_schemes()
    }
}

/// Client-certificate verifier for the accepting side: client authentication
/// is mandatory and accepts exactly the pinned certificates.
#[derive(Debug)]
pub struct PinnedClientVerifier(Pins);

impl PinnedClientVerifier {
    pub fn new(pinned: impl IntoIterator<Item = Fingerprint>) -> Arc<Self> {
        Arc::new(PinnedClientVerifier(Pins::new(pinned)))
    }
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .check("client", end_entity, now)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms.supported_schemes()
    }
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

#[cfg(test)]
mod tests {
    use super::test_support::capture_warnings;
    use super::*;

    const HEX: &str = "00112233445566778899aabbccddeeff0123456789abcdefFEDCBA9876543210";

    fn expected() -> Fingerprint {
        let mut b = [0u8; 32];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&HEX[2 * i..2 * i + 2], 16).unwrap();
        }
        Fingerprint(b)
    }

    fn colon_form(hex: &str) -> String {
        (0..32)
            .map(|i| &hex[2 * i..2 * i + 2])
            .collect::<Vec<_>>()
            .join(":")
    }

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

    #[test]
    fn fingerprint_parsing_accepts_plain_colon_separated_prefixed_and_any_case_hex() {
        let want = expected();
        let lower = HEX.to_ascii_lowercase();
        for text in [
            HEX.to_string(),
            lower.clone(),
            HEX.to_ascii_uppercase(),
            colon_form(HEX),
            colon_form(&HEX.to_ascii_uppercase()),
            format!("sha256:{lower}"),
            format!("SHA256:{}", colon_form(HEX)),
            format!("Sha256:{HEX}"),
        ] {
            assert_eq!(text.parse::<Fingerprint>().unwrap(), want, "{text}");
        }
        assert_eq!(want.to_string(), lower);
        assert_eq!(format!("{want:?}"), lower);
    }

    #[test]
    fn fingerprint_parsing_rejects_wrong_lengths_non_hex_and_misplaced_separators() {
        let lower = HEX.to_ascii_lowercase();
        let colons = colon_form(&lower);
        let bad = [
            String::new(),
            "sha256:".to_string(),
            lower[..62].to_string(),
            format!("{lower}00"),
            format!("{}g", &lower[..63]),
            format!("{}é", &lower[..62]),
            format!(" {lower}"),
            format!("{lower}\n"),
            format!("sha1:{lower}"),
            format!("sha256:sha256:{lower}"),
            format!("{}:{}", &lower[..32], &lower[32..]),
            format!(":{colons}"),
            format!("{colons}:"),
            colons.replacen(':', "::", 1),
            colons.replacen(':', "", 1),
            colons[..colons.len() - 3].to_string(),
            format!("+{}", &colons[1..]),
            lower.replace('a', "-"),
        ];
        for text in bad {
            let err = text.parse::<Fingerprint>().unwrap_err();
            assert!(
                matches!(&err, TlsError::BadFingerprint(s) if *s == text),
                "{text:?}: {err:?}"
            );
            assert!(err.to_string().contains("64 hex digits"));
        }
    }

    #[test]
    fn fingerprint_is_the_sha256_of_the_der() {
        // SHA-256("abc"), FIPS 180-2 test vector.
        assert_eq!(
            fingerprint(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn certificate_validity_dates_are_read_from_utctime_and_generalizedtime() {
        let id = generate_identity("dates", |p| {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2049, 12, 31);
        })
        .unwrap();
        assert_eq!(validity(&id.cert), Some((946_684_800, 2_524_521_600)));
        let id = generate_identity("dates", |p| {
            p.not_before = rcgen::date_time_ymd(1975, 1, 1);
            p.not_after = rcgen::date_time_ymd(2060, 6, 15);
        })
        .unwrap();
        assert_eq!(validity(&id.cert), Some((157_766_400, 2_854_483_200)));
        assert_eq!(validity(b"\x30\x03\x02\x01\x00"), None);
        assert_eq!(validity(b""), None);
    }

    #[test]
    fn the_verifiers_accept_only_pinned_currently_valid_certificates_and_warn_once_per_refusal() {
        let good = generate_identity("good", |_| {}).unwrap();
        let stranger = generate_identity("stranger", |_| {}).unwrap();
        let expired = generate_identity("expired", |p| {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        })
        .unwrap();
        let future = generate_identity("future", |p| {
            p.not_before = rcgen::date_time_ymd(2100, 1, 1)
        })
        .unwrap();
        let pins = [
            good.fingerprint(),
            expired.fingerprint(),
            future.fingerprint(),
        ];
        let server_v = PinnedServerVerifier::new(pins);
        let client_v = PinnedClientVerifier::new(pins);
        let name = ServerName::try_from("pgcourier").unwrap();
        let now = UnixTime::now();
        let as_server = |id: &Identity| {
            server_v
                .verify_server_cert(&id.cert, &[], &name, &[], now)
                .map(|_| ())
        };
        let as_client = |id: &Identity| client_v.verify_client_cert(&id.cert, &[], now).map(|_| ());

        assert!(client_v.client_auth_mandatory() && client_v.offer_client_auth());
        assert!(client_v.root_hint_subjects().is_empty());
        assert!(server_v
            .supported_verify_schemes()
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256));

        let (guard, logs) = capture_warnings();
        as_server(&good).unwrap();
        as_client(&good).unwrap();
        assert_eq!(logs.text(), "", "no warnings on acceptance");

        for verify in [
            &as_server as &dyn Fn(&Identity) -> Result<(), rustls::Error>,
            &as_client,
        ] {
            let before = logs.text().lines().count();
            let err = verify(&stranger).unwrap_err();
            assert!(
                err.to_string()
                    .contains(&stranger.fingerprint().to_string()),
                "{err}"
            );
            assert!(err.to_string().contains("not pinned"), "{err}");
            let lines = logs
                .text()
                .lines()
                .skip(before)
                .map(str::to_string)
                .collect::<Vec<_>>();
            assert_eq!(lines.len(), 1, "{lines:?}");
            assert!(lines[0].contains("WARN"), "{}", lines[0]);
            assert!(
                lines[0].contains(&format!("offered={}", stranger.fingerprint())),
                "{}",
                lines[0]
            );
            assert!(lines[0].contains("not pinned"), "{}", lines[0]);

            let err = verify(&expired).unwrap_err();
            assert!(
                matches!(
                    err,
                    rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
                ),
                "{err:?}"
            );
            assert!(err.to_string().contains("expired"), "{err}");
            let err = verify(&future).unwrap_err();
            assert!(
                matches!(
                    err,
                    rustls::Error::InvalidCertificate(CertificateError::NotValidYetContext { .. })
                ),
                "{err:?}"
            );
            assert_eq!(logs.text().lines().count(), before + 3, "{}", logs.text());
        }
        drop(guard);

        // Garbage is refused as badly encoded even if (absurdly) pinned.
        let junk = CertificateDer::from(vec![0x30, 0x00]);
        let v = PinnedClientVerifier::new([fingerprint(&junk)]);
        let err = v.verify_client_cert(&junk, &[], now).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
        );
    }
}
