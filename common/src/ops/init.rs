//! What `pgcourier-sender init` and `pgcourier-receiver init` share: the
//! daemon's key and certificate (kept when both exist, made when neither
//! does), and the config file, written new (never over an existing file)
//! with mode 0640 and kept only if the daemon's own loader accepts it.
//!
//! The fingerprints are exchanged as with `keygen`: the side that starts
//! second needs the first one's fingerprint, so one side runs `keygen` (or
//! `init` with the other's fingerprint) and gives its fingerprint to the
//! other.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::transport::tls::{self, Fingerprint};

/// What `init` did, for a daemon whose config is `C`.
pub struct Initialized<C> {
    pub config: C,
    pub fingerprint: Fingerprint,
    /// The certificate and key were made now (not found).
    pub made_keys: bool,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The daemon's certificate and key: loaded when both files exist, made
/// (key 0600, certificate 0644) when neither does. Returns its fingerprint
/// and whether it was made now.
pub fn ensure_identity(cert: &Path, key: &Path, name: &str) -> anyhow::Result<(Fingerprint, bool)> {
    match (cert.exists(), key.exists()) {
        (true, true) => {
            let identity = tls::load_identity(cert, key).with_context(|| {
                format!(
                    "load the existing certificate {} and key {}",
                    cert.display(),
                    key.display()
                )
            })?;
            Ok((identity.fingerprint(), false))
        }
        (false, false) => {
            let fp = tls::keygen(cert, key, name).with_context(|| {
                format!(
                    "write the certificate {} and key {}",
                    cert.display(),
                    key.display()
                )
            })?;
            Ok((fp, true))
        }
        (true, false) | (false, true) => bail!(
            "only one of {} and {} exists: give both (made by keygen) or neither",
            cert.display(),
            key.display()
        ),
    }
}

/// Write `text` to `path` (which must not exist) with mode 0640 and fsync
/// it, then `load` it; when the loader refuses it, the file is removed and
/// its error returned.
pub fn write_config<C, E>(
    path: &Path,
    text: &str,
    load: impl FnOnce(&Path) -> Result<C, E>,
) -> anyhow::Result<C>
where
    E: std::error::Error + Send + Sync + 'static,
{
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(path)
        .with_context(|| {
            format!(
                "create the config {} (init never writes over an existing file)",
                path.display()
            )
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write the config {}", path.display()))?;
    match load(path) {
        Ok(c) => Ok(c),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(anyhow::Error::new(e).context(format!(
                "the config init would write to {} is refused (not written)",
                path.display()
            )))
        }
    }
}

/// A TOML string literal.
pub fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `<config's directory>/<stem>.crt` and `.key`.
pub fn identity_paths(config: &Path, stem: &str) -> (PathBuf, PathBuf) {
    let dir = config.parent().unwrap_or(Path::new("."));
    (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_made_once_then_kept_and_half_a_pair_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = identity_paths(&dir.path().join("x.toml"), "hq");
        let (fp, made) = ensure_identity(&cert, &key, "hq").expect("make");
        assert!(made);
        let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            ensure_identity(&cert, &key, "hq").expect("keep"),
            (fp, false)
        );
        std::fs::remove_file(&key).expect("remove key");
        let e = ensure_identity(&cert, &key, "hq").expect_err("half a pair");
        assert!(format!("{e:#}").contains("only one of"), "{e:#}");
    }

    #[test]
    fn a_config_is_written_new_with_mode_0640_and_removed_when_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.toml");
        let n: u32 = write_config(&path, "7", |p| {
            std::fs::read_to_string(p).map(|s| s.parse::<u32>().expect("number"))
        })
        .expect("write");
        assert_eq!(n, 7);
        let mode = std::fs::metadata(&path)
            .expect("config")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o640);
        let again = write_config(&path, "8", |_| Ok::<_, std::io::Error>(()));
        assert!(format!("{:#}", again.expect_err("exists")).contains("never writes over"));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "7");
        let bad = dir.path().join("b.toml");
        let refused = write_config(&bad, "x", |_| {
            Err::<(), _>(std::io::Error::other("bad setting `x`"))
        });
        assert!(format!("{:#}", refused.expect_err("refused")).contains("bad setting `x`"));
        assert!(!bad.exists(), "a refused config is removed");
        for s in ["plain", "a \"b\" 'c'\n", "host=/run/postgresql dbname=x"] {
            let table: toml::Table = format!("v = {}", toml_string(s)).parse().expect("toml");
            assert_eq!(table["v"].as_str(), Some(s));
        }
    }
}
