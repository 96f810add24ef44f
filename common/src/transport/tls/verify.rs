//! The rustls verifiers that make pinning the only trust: a peer is
//! accepted iff the SHA-256 fingerprint of the certificate it presents is
//! pinned and the certificate's validity dates hold now. Names, issuers and
//! CAs are never consulted. A refusal is logged once, with the fingerprint
//! offered, so an operator can pin it if it is theirs.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use super::{fingerprint, Fingerprint};

// ---------------------------------------------------------------------------
// Certificate validity dates, read with yasna (the DER reader rcgen already
// brings in); nothing else of the certificate is interpreted here.

/// (notBefore, notAfter) of a DER certificate, in seconds since the epoch;
/// `None` when it is not a well-formed X.509 certificate in DER.
fn validity(cert_der: &[u8]) -> Option<(i64, i64)> {
    use yasna::tags::{TAG_GENERALIZEDTIME, TAG_UTCTIME};
    use yasna::{ASN1Error, ASN1ErrorKind, BERReader, Tag};

    fn time(r: BERReader<'_, '_>) -> yasna::ASN1Result<i64> {
        match r.lookahead_tag()? {
            TAG_UTCTIME => Ok(r.read_utctime()?.datetime().unix_timestamp()),
            TAG_GENERALIZEDTIME => Ok(r.read_generalized_time()?.datetime().unix_timestamp()),
            _ => Err(ASN1Error::new(ASN1ErrorKind::Invalid)),
        }
    }
    yasna::parse_der(cert_der, |r| {
        r.read_sequence(|cert| {
            let dates = cert.next().read_sequence(|tbs| {
                // [0] version (optional), serialNumber, signature, issuer.
                tbs.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_der()))?;
                for _ in 0..3 {
                    tbs.next().read_der()?;
                }
                let dates = tbs
                    .next()
                    .read_sequence(|v| Ok((time(v.next())?, time(v.next())?)))?;
                // subject, subjectPublicKeyInfo, then the optional unique
                // ids and extensions ([1], [2], [3]).
                tbs.next().read_der()?;
                tbs.next().read_der()?;
                for _ in 0..3 {
                    tbs.read_optional(|r| r.read_der())?;
                }
                Ok(dates)
            })?;
            // signatureAlgorithm, signatureValue.
            cert.next().read_der()?;
            cert.next().read_der()?;
            Ok(dates)
        })
    })
    .ok()
}

fn unix_time(secs: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(secs.max(0) as u64))
}

/// Reject a certificate that is expired or not yet valid at `now`.
pub(crate) fn check_validity(
    cert: &CertificateDer<'_>,
    now: UnixTime,
) -> Result<(), CertificateError> {
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
mod tests {
    use super::super::generate_identity;
    use super::super::test_support::capture_warnings;
    use super::super::Identity;
    use super::*;

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
        // A real certificate cut short, or with bytes after it, is refused.
        let der: &[u8] = &id.cert;
        assert_eq!(validity(&der[..der.len() - 1]), None);
        assert_eq!(validity(&[der, &[0u8][..]].concat()), None);
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
