//! TLS to PostgreSQL on rustls with the ring provider (the one the QUIC link
//! uses; aws-lc-rs is never built). Our own `TlsConnect` for tokio-postgres,
//! so that what is verified is decided here, per `sslmode`:
//!
//! | sslmode | chain checked against `sslrootcert` | host name checked |
//! |---|---|---|
//! | `prefer`, `require` (and `allow` when it falls back to TLS) | only when a root certificate is given or `~/.postgresql/root.crt` exists (as libpq) | no |
//! | `verify-ca` | yes | no |
//! | `verify-full` | yes | yes (DNS name or IP address in the certificate's subjectAltName) |
//!
//! The handshake's signatures are always verified, whatever the mode: the
//! server proves it holds the key of the certificate it sent. The
//! `tls-server-end-point` channel binding (SCRAM-SHA-256-PLUS) is offered
//! from the server's certificate.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, TlsConnect};

/// A socket to PostgreSQL: TCP, or a Unix socket (never TLS there, as in
/// libpq).
#[derive(Debug)]
pub enum PgSocket {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl AsyncRead for PgSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgSocket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            PgSocket::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgSocket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            PgSocket::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgSocket::Tcp(s) => Pin::new(s).poll_flush(cx),
            PgSocket::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgSocket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            PgSocket::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The rustls provider: ring, as everywhere in pgcourier.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies the server's certificate as the `sslmode` asks (see the table
/// in this module's doc). `roots: None`: no chain check (`require` without
/// a root certificate); the handshake signature is still checked.
#[derive(Debug)]
pub(crate) struct ServerVerifier {
    pub(crate) roots: Option<Arc<RootCertStore>>,
    pub(crate) check_name: bool,
    pub(crate) provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if self.check_name {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Read every certificate of a PEM file into a root store.
pub(crate) fn load_roots(paths: &[std::path::PathBuf]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for path in paths {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
        let (_added, ignored) = roots.add_parsable_certificates(certs);
        if ignored > 0 && roots.is_empty() {
            return Err(format!("{} holds no usable CA certificate", path.display()));
        }
    }
    if roots.is_empty() {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(format!("no certificate in {}", names.join(", ")));
    }
    Ok(roots)
}

/// The client certificate chain and key (`sslcert`, `sslkey`, PEM).
pub(crate) fn load_client_identity(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read the client certificate {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("no certificate in {}", cert.display()));
    }
    if let Some(problem) = super::files::key_file_problem(key) {
        return Err(problem);
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "cannot read the private key {} (an unencrypted PEM key: PKCS#8, PKCS#1 or SEC1): {e}",
            key.display()
        )
    })?;
    Ok((chain, key))
}

/// Why a TLS handshake with the server failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The server's certificate (or our own, per the server's alert) was
    /// refused, or the handshake broke the protocol: retrying the same
    /// connection will not help.
    #[error("{0}")]
    Refused(#[source] rustls::Error),
    /// The connection failed during the handshake.
    #[error("connection lost during the TLS handshake")]
    Io(#[source] io::Error),
    /// Only the plaintext path holds no TLS settings (it never asks).
    #[error("TLS was not configured for this connection")]
    NotConfigured,
}

/// tokio-postgres' hook into our TLS: a handshake on `PgSocket` with our
/// client config and the name the certificate must carry.
pub(crate) struct Connector {
    pub(crate) tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

/// A TLS session to PostgreSQL, with its channel binding.
pub struct PgTlsStream(tokio_rustls::client::TlsStream<PgSocket>);

impl AsyncRead for PgTlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PgTlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl tokio_postgres::tls::TlsStream for PgTlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, conn) = self.0.get_ref();
        match conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| tls_server_end_point(c))
        {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

impl TlsConnect<PgSocket> for Connector {
    type Stream = PgTlsStream;
    type Error = HandshakeError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<PgTlsStream, HandshakeError>> + Send>>;

    fn connect(self, stream: PgSocket) -> Self::Future {
        Box::pin(async move {
            let (config, name) = self.tls.ok_or(HandshakeError::NotConfigured)?;
            handshake(config, name, stream).await
        })
    }
}

/// The TLS handshake on `stream` (the server has accepted our SSLRequest).
pub(crate) async fn handshake(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    stream: PgSocket,
) -> Result<PgTlsStream, HandshakeError> {
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map(PgTlsStream)
        .map_err(|e| {
            // tokio-rustls wraps rustls' own errors in an io::Error.
            if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                let inner = e
                    .into_inner()
                    .expect("checked above")
                    .downcast::<rustls::Error>()
                    .expect("checked above");
                HandshakeError::Refused(*inner)
            } else {
                HandshakeError::Io(e)
            }
        })
}

/// A stream to PostgreSQL for a protocol client of our own (the sender's
/// replication connection): plaintext or TLS, as `sslmode` negotiated it.
pub enum PgStream {
    Plain(PgSocket),
    Tls(PgTlsStream),
}

impl PgStream {
    /// RFC 5929 `tls-server-end-point` of the server's certificate, for
    /// SCRAM-SHA-256-PLUS; `None` without TLS or for an algorithm without
    /// one.
    pub fn server_end_point(&self) -> Option<Vec<u8>> {
        match self {
            PgStream::Plain(_) => None,
            PgStream::Tls(t) => {
                let (_, conn) = t.0.get_ref();
                conn.peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| tls_server_end_point(c))
            }
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, PgStream::Tls(_))
    }
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PgStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// RFC 5929 `tls-server-end-point`: the hash of the server's certificate,
/// with the hash of its signature algorithm (SHA-256 for MD5 and SHA-1).
/// `None` for an algorithm without one (Ed25519): no channel binding.
pub(crate) fn tls_server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    let oid = signature_algorithm(cert)?;
    let oid: Vec<u64> = oid.components().to_vec();
    let hash = match oid.as_slice() {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        [1, 2, 840, 113549, 1, 1, 12] | [1, 2, 840, 10045, 4, 3, 3] => 384,
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        [1, 2, 840, 113549, 1, 1, 13] | [1, 2, 840, 10045, 4, 3, 4] => 512,
        // Ed25519, Ed448: no hash function of their own.
        [1, 3, 101, 112] | [1, 3, 101, 113] => return None,
        // SHA-256, SHA-1, MD5 (and RSASSA-PSS, whose hash lives in its
        // parameters: SHA-256 is what PostgreSQL's own client assumes too).
        _ => 256,
    };
    Some(match hash {
        384 => sha2::Sha384::digest(cert).to_vec(),
        512 => sha2::Sha512::digest(cert).to_vec(),
        _ => sha2::Sha256::digest(cert).to_vec(),
    })
}

/// The certificate's signatureAlgorithm OID (X.509: Certificate ::=
/// SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }).
fn signature_algorithm(cert: &[u8]) -> Option<yasna::models::ObjectIdentifier> {
    yasna::parse_der(cert, |r| {
        r.read_sequence(|c| {
            c.next().read_der()?;
            let oid = c.next().read_sequence(|alg| {
                let oid = alg.next().read_oid()?;
                alg.read_optional(|p| p.read_der())?;
                Ok(oid)
            })?;
            c.next().read_der()?;
            Ok(oid)
        })
    })
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_channel_binding_hash_follows_the_certificate_signature() {
        // rcgen signs with ECDSA P-256 / SHA-256 by default.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        assert_eq!(
            tls_server_end_point(&der).unwrap(),
            sha2::Sha256::digest(&der).to_vec()
        );
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        assert_eq!(
            tls_server_end_point(&der).unwrap(),
            sha2::Sha384::digest(&der).to_vec()
        );
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(tls_server_end_point(cert.der()), None);
        assert_eq!(tls_server_end_point(b"not a certificate"), None);
    }
}
