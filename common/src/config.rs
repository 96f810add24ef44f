//! Configuration pieces both daemons share: sizes ("64MiB"), durations
//! ("30s"), and PostgreSQL connection strings whose password may come from
//! the environment or a file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("setting `{setting}` is invalid: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
}

/// Read and parse a TOML config file; unknown settings are errors.
pub fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.into(),
        message: e.to_string(),
    })
}

/// Parse a byte size: a number with an optional unit B, KiB, MiB, GiB (or
/// KB/MB/GB as powers of 1000).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as \"64MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use B, KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// Serde adapter for sizes: a string like "64MiB" or a plain integer of bytes.
pub fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Raw::deserialize(d)? {
        Raw::N(n) => Ok(n),
        Raw::S(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// Serde adapter for durations written like "30s", "200ms", "5m".
pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

/// Defaults both daemons share (store cache, reconnect backoff); the QUIC
/// link's are in [`crate::transport::settings`]. Each setting's trade-off
/// is in docs/configuration.md.
pub mod defaults {
    use std::time::Duration;

    pub fn cache_capacity() -> u64 {
        64 << 20
    }
    /// A reconnect attempt costs a few packets; a short cap means the link is
    /// used again within seconds of coming back.
    pub fn max_backoff() -> Duration {
        Duration::from_secs(5)
    }
}

/// Where the database password comes from, when not in the connection string
/// (settings `password-env`, `password-file`; flattened into both daemons'
/// configs, whose own `deny_unknown_fields` still refuses unknown settings).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PasswordSource {
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// Path of a file whose first line is the password.
    pub password_file: Option<PathBuf>,
}

/// Build a tokio-postgres config from a libpq-style connection string
/// (`host=... dbname=...` or a `postgres://` URL) plus the password source.
pub fn pg_config(
    setting: &'static str,
    conninfo: &str,
    password: &PasswordSource,
) -> Result<tokio_postgres::Config, ConfigError> {
    let mut cfg: tokio_postgres::Config =
        conninfo
            .parse()
            .map_err(|e: tokio_postgres::Error| ConfigError::Invalid {
                setting,
                message: e.to_string(),
            })?;
    if let Some(var) = &password.password_env {
        let pw = std::env::var(var).map_err(|_| ConfigError::Invalid {
            setting: "password-env",
            message: format!("environment variable {var} is not set"),
        })?;
        cfg.password(pw);
    }
    if let Some(path) = &password.password_file {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
            setting: "password-file",
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        cfg.password(text.lines().next().unwrap_or("").to_owned());
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("pgcourier");
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("1 KiB").unwrap(), 1024);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }
}

/// Why a server refused a login when retrying cannot help (wrong password,
/// role or database: SQLSTATE 28P01, 28000, 3D000), as a hint for the
/// operator; `None` for any other error.
pub fn login_refused(e: &tokio_postgres::Error) -> Option<&'static str> {
    match e.code()?.code() {
        "28P01" => Some(
            "wrong password: fix it in the connection string, `password-env` or `password-file`",
        ),
        "28000" => Some("this role may not log in (role name, or a pg_hba.conf rule)"),
        "3D000" => Some("the database does not exist: fix dbname"),
        _ => None,
    }
}
