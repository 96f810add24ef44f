//! SHA-256 certificate fingerprints: what each config pins (the sender's
//! `[[receiver]] fingerprint`, the receiver's `sender-fingerprints`) and
//! what `keygen` prints.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use super::TlsError;

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

#[cfg(test)]
mod tests {
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
}
