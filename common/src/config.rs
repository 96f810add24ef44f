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

fn parse_error(path: &Path, message: impl std::fmt::Display) -> ConfigError {
    ConfigError::Parse {
        path: path.into(),
        message: message.to_string(),
    }
}

/// Which daemon of a site reads a config file. A site is configured in
/// one file (README, *Branches that write*): its sender's settings at the
/// top, and an `[apply.<peer>]` section for each peer whose changes this
/// site applies (a branch: `[apply.hq]`; headquarters: one per branch
/// that writes). The sender ignores the sections; a receiver reads its
/// section over what the site already says: `target` is the site's
/// `source`, `cert`, `key`, the password and link settings are the
/// site's (one identity per site, both directions), and
/// `sender-fingerprints` is the fingerprint of the site's `[[receiver]]`
/// of the same name. A file without `apply` is one daemon's, as before.
#[derive(Clone, Copy, Debug)]
pub enum Part<'a> {
    Sender,
    /// The receiver of this peer's changes (`None`: the file's only
    /// `[apply.*]` section).
    Receiver(Option<&'a str>),
}

/// The settings of `part` from the site file at `path` (text `text`), as
/// TOML text; `None`: not a site file (no `[apply.*]` section).
fn site_part(path: &Path, text: &str, part: Part) -> Result<Option<String>, ConfigError> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| parse_error(path, e))?;
    let Some(apply) = table.remove("apply") else {
        return Ok(None);
    };
    let toml::Value::Table(sections) = apply else {
        return Err(parse_error(
            path,
            "`apply` is a section per peer: [apply.<peer name>]",
        ));
    };
    let names = || {
        sections
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let peer = match part {
        Part::Sender => return Ok(Some(table.to_string())),
        Part::Receiver(Some(peer)) => peer.to_owned(),
        Part::Receiver(None) if sections.len() == 1 => {
            sections.keys().next().expect("one section").clone()
        }
        Part::Receiver(None) => {
            return Err(parse_error(
                path,
                format!(
                    "it has a section for each of the peers {}: say which one this receiver applies with --peer",
                    names()
                ),
            ));
        }
    };
    let Some(toml::Value::Table(section)) = sections.get(&peer) else {
        return Err(parse_error(
            path,
            format!(
                "no section [apply.{peer}]; its sections are for {}",
                names()
            ),
        ));
    };
    let mut part = toml::Table::new();
    let shared = settings::<crate::transport::settings::TransportSettings>()
        .iter()
        .chain(settings::<PasswordSource>())
        .chain(&["cert", "key"]);
    for key in shared {
        if let Some(v) = table.get(*key) {
            part.insert((*key).to_owned(), v.clone());
        }
    }
    if let Some(source) = table.get("source") {
        part.insert("target".into(), source.clone());
    }
    let fingerprint = table
        .get("receiver")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
        .find(|r| r.get("name").and_then(toml::Value::as_str) == Some(peer.as_str()))
        .and_then(|r| r.get("fingerprint").cloned());
    if let Some(fp) = fingerprint {
        part.insert("sender-fingerprints".into(), toml::Value::Array(vec![fp]));
    }
    part.extend(section.clone());
    Ok(Some(part.to_string()))
}

/// Read a TOML config file whose top-level settings are split over three
/// structs: the daemon's own `A` and the shared `B` and `C` (the link's
/// `TransportSettings`, the `PasswordSource`). Every top-level key must be
/// a setting of one of them: that is checked first, so a misspelt setting
/// is named as unknown rather than reported as a missing one; then each
/// part is parsed from the text (so its errors point at the line).
///
/// A site file ([`Part`]) gives `part`'s settings; its errors name the
/// section.
pub fn load_toml<A, B, C>(path: &Path, part: Part) -> Result<(A, B, C), ConfigError>
where
    A: serde::de::DeserializeOwned,
    B: serde::de::DeserializeOwned,
    C: serde::de::DeserializeOwned,
{
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    let (text, path) = match site_part(path, &text, part)? {
        Some(part_text) => {
            let what = match part {
                Part::Sender => "the sender's settings".to_owned(),
                Part::Receiver(_) => {
                    "the [apply.*] section with what it takes from the site".into()
                }
            };
            (
                part_text,
                PathBuf::from(format!("{} ({what})", path.display())),
            )
        }
        None => (text, path.to_path_buf()),
    };
    let path = path.as_path();
    let table: toml::Table = toml::from_str(&text).map_err(|e| parse_error(path, e))?;
    let known = [settings::<A>(), settings::<B>(), settings::<C>()];
    if let Some(key) = table
        .keys()
        .find(|k| !known.iter().any(|names| names.contains(&k.as_str())))
    {
        let mut all: Vec<&str> = known.concat();
        all.sort_unstable();
        return Err(parse_error(
            path,
            format!(
                "unknown setting `{key}`; the settings are `{}`",
                all.join("`, `")
            ),
        ));
    }
    Ok((
        toml::from_str(&text).map_err(|e| parse_error(path, e))?,
        toml::from_str(&text).map_err(|e| parse_error(path, e))?,
        toml::from_str(&text).map_err(|e| parse_error(path, e))?,
    ))
}

/// The setting names (serde field names, after renaming) of a struct
/// deserialized with `#[derive(Deserialize)]` (no `flatten`): serde hands
/// them to `deserialize_struct`, which is all this deserializer answers.
fn settings<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Deserializer, Visitor};

    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field names read")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    struct Names<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Names<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut names: &'static [&'static str] = &[];
    let _ = T::deserialize(Names(&mut names));
    names
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

/// Parse a rate in bits per second, as tc and netem write it: `256kbit`,
/// `2Mbit`, `1.5Mbit/s`, `1Gbit` (decimal prefixes: k = 1000). Returns bits
/// per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a rate such as \"256kbit\" or \"2Mbit\""))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => {
            return Err(format!(
                "unknown rate unit in {text:?} (use bit, kbit, Mbit or Gbit, as in \"256kbit\")"
            ))
        }
    };
    let bps = (value * mult).round();
    if !(8_000.0..=1e12).contains(&bps) {
        return Err(format!("rate {text:?} is out of range (8kbit to 1000Gbit)"));
    }
    Ok(bps as u64)
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
/// (settings `password-env`, `password-file`, at the top level of both
/// daemons' configs: see [`load_toml`]).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PasswordSource {
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// Path of a file whose first line is the password.
    pub password_file: Option<PathBuf>,
}

/// Resolve a PostgreSQL connection string (setting `setting`: `source`,
/// `target`) with libpq's conventions and this process's environment: see
/// [`crate::pg::connect`] for the order (connection string, service file,
/// environment, defaults) and the password's (connection string, then
/// `password-env` / `password-file`, then the service file, `PGPASSWORD`,
/// `.pgpass`).
pub fn pg_config(
    setting: &'static str,
    conninfo: &str,
    password: &PasswordSource,
) -> Result<crate::pg::connect::PgConnect, ConfigError> {
    crate::pg::connect::PgConnect::resolve(
        setting,
        conninfo,
        password,
        &crate::pg::connect::Environment::from_process(),
    )
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

    #[test]
    fn rates_parse_in_bits_per_second() {
        assert_eq!(parse_rate("256kbit").unwrap(), 256_000);
        assert_eq!(parse_rate("2Mbit").unwrap(), 2_000_000);
        assert_eq!(parse_rate("1.5 Mbit/s").unwrap(), 1_500_000);
        assert_eq!(parse_rate("1Gbit").unwrap(), 1_000_000_000);
        for bad in ["256", "256kb", "fast", "1bit", "kbit", "2Tbit"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct Own {
        spool_dir: String,
        #[serde(rename = "receiver", default)]
        receivers: Vec<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct Shared {
        #[serde(default)]
        keep_alive: Option<String>,
    }

    fn load(text: &str) -> Result<(Own, Shared, PasswordSource), ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        load_toml(&path, Part::Sender)
    }

    #[test]
    fn settings_split_over_structs_are_all_read_and_a_misspelt_one_is_named_first() {
        assert_eq!(
            settings::<PasswordSource>(),
            ["password-env", "password-file"]
        );
        let (own, shared, pw) = load(
            "spool-dir = \"s\"\nkeep-alive = \"1s\"\npassword-env = \"X\"\nreceiver = [\"b\"]",
        )
        .unwrap();
        assert_eq!(own.spool_dir, "s");
        assert_eq!(own.receivers, ["b"]);
        assert_eq!(shared.keep_alive.as_deref(), Some("1s"));
        assert_eq!(pw.password_env.as_deref(), Some("X"));
        // The typo is named, not the setting it was meant to be.
        let err = load("spol-dir = \"s\"").unwrap_err().to_string();
        assert!(err.contains("unknown setting `spol-dir`"), "{err}");
        assert!(err.contains("`spool-dir`"), "{err}");
        // Errors of each part still point at their line.
        let err = load("spool-dir = 3").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
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
