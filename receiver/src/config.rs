//! `receiver.toml`: parsed once into a [`ReceiverConfig`]. Every setting
//! and its default is documented in `docs/configuration.md` and
//! `examples/receiver.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgcourier_common::config::{self, de_duration, de_size, defaults, ConfigError, PasswordSource};
use pgcourier_common::transport::link::Transport;
use pgcourier_common::transport::peer::{parse_proxy, PeerAddr};
use pgcourier_common::transport::settings::TransportSettings;
use pgcourier_common::transport::tls::Fingerprint;
use serde::Deserialize;

/// The daemon's own settings. The shared ones (link: [`TransportSettings`];
/// database password: [`PasswordSource`]) sit beside them at the top level;
/// `config::load_toml` refuses any key that is none of these.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawReceiverConfig {
    target: String,
    inbox_dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    listen: Option<SocketAddr>,
    sender_address: Option<String>,
    transport: Option<Transport>,
    proxy: Option<String>,
    sender_fingerprints: Vec<String>,
    admin: Option<SocketAddr>,
    admin_socket: Option<PathBuf>,
    #[serde(default = "default_group_txns")]
    apply_group_transactions: u32,
    #[serde(default = "default_group_changes")]
    apply_group_changes: u32,
    #[serde(default = "default_true")]
    replica_role: bool,
    /// Unset: as `replica-role` (both need superuser; a branch applying
    /// as an ordinary role keeps working after an upgrade).
    #[serde(default)]
    origin: Option<bool>,
    #[serde(default)]
    create_tables: bool,
    #[serde(default = "defaults::cache_capacity", deserialize_with = "de_size")]
    cache_capacity: u64,
    #[serde(default, deserialize_with = "de_opt_size")]
    inbox_max_bytes: Option<u64>,
    #[serde(default = "defaults::max_backoff", deserialize_with = "de_duration")]
    max_backoff: Duration,
    ddl: Option<String>,
    #[serde(default)]
    ddl_deny: Vec<String>,
}

/// Which schema changes captured at the source (`pgcourier.ddl` messages)
/// a branch applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ddl {
    /// Every captured statement (default).
    #[default]
    All,
    /// None: the branch's schema is managed by hand, and apply pauses at the
    /// first change that no longer fits it (the behaviour before DDL was
    /// replicated).
    None,
    /// Tables and what they need ([`TABLE_TAGS`]; comments on tables and
    /// columns); the rest (views, functions, triggers, policies,
    /// extensions, ...) is left out, each statement logged. A query string
    /// that does both pauses apply.
    Tables,
}

/// The command tags `ddl = "tables"` applies, with `COMMENT` when it is on a
/// table or a column.
pub const TABLE_TAGS: &[&str] = &[
    "CREATE TABLE",
    "ALTER TABLE",
    "DROP TABLE",
    "CREATE INDEX",
    "ALTER INDEX",
    "DROP INDEX",
    "CREATE TYPE",
    "ALTER TYPE",
    "DROP TYPE",
    "CREATE SEQUENCE",
    "ALTER SEQUENCE",
    "DROP SEQUENCE",
    "CREATE SCHEMA",
    "ALTER SCHEMA",
];

impl std::str::FromStr for Ddl {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Ddl, ConfigError> {
        match s {
            "all" => Ok(Ddl::All),
            "none" => Ok(Ddl::None),
            "tables" => Ok(Ddl::Tables),
            _ => Err(invalid(
                "ddl",
                format!("{s:?} is not one of \"all\" (the default), \"none\" or \"tables\""),
            )),
        }
    }
}

fn default_group_txns() -> u32 {
    1000
}
fn default_group_changes() -> u32 {
    20_000
}
fn default_true() -> bool {
    true
}

/// Who dials whom.
#[derive(Clone, Debug)]
pub enum Link {
    /// Default: the sender dials this address.
    Listen(SocketAddr),
    /// Reverse mode (receiver behind NAT): dial the sender (a host name is
    /// resolved again at every dial).
    Dial(PeerAddr),
}

#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    pub target: pgcourier_common::pg::connect::PgConnect,
    pub inbox_dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub link: Link,
    /// With `sender-address`: `auto` (QUIC, falling back to TCP), `quic`
    /// or `tcp`.
    pub dial_transport: Transport,
    /// With `sender-address`: dial through this HTTP proxy (CONNECT; TCP).
    pub proxy: Option<PeerAddr>,
    pub sender_fingerprints: Vec<Fingerprint>,
    /// Read-only admin listener (HTTP: /metrics, /health, /status), any
    /// address (a Prometheus server elsewhere may scrape it); off by
    /// default. Records and control requests are refused there.
    pub admin: Option<SocketAddr>,
    /// The admin socket (Unix, mode 0600 in a directory of mode 0700):
    /// every admin route, records and control requests included, for this
    /// daemon's user (pgcourier-queue, seed export). Always on; default
    /// `<inbox-dir>/admin/sock`.
    pub admin_socket: PathBuf,
    pub apply_group_transactions: u32,
    pub apply_group_changes: u32,
    pub replica_role: bool,
    /// Apply under the replication origin `pgcourier/<source>`, so that a
    /// sender capturing this database leaves apply's writes out.
    pub origin: bool,
    /// Create a copied table missing on the target from the source's
    /// definition (columns, types, NOT NULL, primary key).
    pub create_tables: bool,
    pub cache_capacity: u64,
    /// Batches are not accepted (nor acknowledged: the sender keeps them)
    /// while they would take the inbox past this many bytes; `None`: no
    /// limit. A batch is always accepted into an empty inbox.
    pub inbox_max_bytes: Option<u64>,
    pub transport: TransportSettings,
    pub max_backoff: Duration,
    /// Which captured schema changes are applied (`ddl`, default `all`).
    pub ddl: Ddl,
    /// Command tags (`DROP TABLE`, upper case, single spaces) whose
    /// statements are not applied but logged as skipped by rule
    /// (`ddl-deny`, default none).
    pub ddl_deny: Vec<String>,
}

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        message: message.into(),
    }
}

impl ReceiverConfig {
    pub fn load(path: &Path) -> Result<ReceiverConfig, ConfigError> {
        ReceiverConfig::load_peer(path, None)
    }

    /// From a site file (`config::Part`), the receiver of `peer`'s
    /// changes (`None`: its only `[apply.*]` section); any other file is
    /// one receiver's.
    pub fn load_peer(path: &Path, peer: Option<&str>) -> Result<ReceiverConfig, ConfigError> {
        let (raw, transport, password): (RawReceiverConfig, TransportSettings, PasswordSource) =
            config::load_toml(path, config::Part::Receiver(peer))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let password = PasswordSource {
            password_env: password.password_env,
            password_file: password.password_file.map(|p| base.join(p)),
        };
        let target = config::pg_config("target", &raw.target, &password)?;
        let link = match (raw.listen, raw.sender_address) {
            (Some(l), None) => Link::Listen(l),
            (None, Some(s)) => Link::Dial(
                s.parse()
                    .map_err(|e: String| invalid("sender-address", e))?,
            ),
            (Some(_), Some(_)) => return Err(invalid("listen", "set either `listen` (the sender dials us) or `sender-address` (we dial the sender), not both")),
            (None, None) => return Err(invalid("listen", "set `listen` (the sender dials us) or `sender-address` (we dial the sender)")),
        };
        let proxy = raw
            .proxy
            .as_deref()
            .map(parse_proxy)
            .transpose()
            .map_err(|e| invalid("proxy", e))?;
        if matches!(link, Link::Listen(_)) && (proxy.is_some() || raw.transport.is_some()) {
            return Err(invalid(
                if proxy.is_some() { "proxy" } else { "transport" },
                "applies only when the receiver dials the sender (`sender-address`); with `listen` the receiver accepts QUIC and TCP on that port, and the sender's settings choose",
            ));
        }
        let dial_transport = raw.transport.unwrap_or_default();
        if proxy.is_some() && dial_transport == Transport::Quic {
            return Err(invalid(
                "proxy",
                "an HTTP proxy carries TCP only: set transport = \"tcp\" or \"auto\", or remove the proxy",
            ));
        }
        if raw.sender_fingerprints.is_empty() {
            return Err(invalid("sender-fingerprints", "pin at least one sender certificate fingerprint (printed by pgcourier-sender keygen)"));
        }
        let mut fps = Vec::new();
        for f in &raw.sender_fingerprints {
            fps.push(
                f.parse()
                    .map_err(|e| invalid("sender-fingerprints", format!("{e}")))?,
            );
        }
        if raw.apply_group_transactions == 0 || raw.apply_group_changes == 0 {
            return Err(invalid(
                "apply-group-transactions",
                "apply group limits must be at least 1",
            ));
        }
        let mut ddl_deny = Vec::new();
        for tag in &raw.ddl_deny {
            let tag = tag
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .to_uppercase();
            if tag.is_empty() {
                return Err(invalid(
                    "ddl-deny",
                    "an empty command tag: name commands such as \"DROP TABLE\"",
                ));
            }
            ddl_deny.push(tag);
        }
        let ddl = raw.ddl.as_deref().map_or(Ok(Ddl::All), str::parse)?;
        if raw.inbox_max_bytes.is_some_and(|b| b < (64 << 10)) {
            return Err(invalid("inbox-max-bytes", "must be at least 64KiB"));
        }
        Ok(ReceiverConfig {
            target,
            inbox_dir: base.join(&raw.inbox_dir),
            cert: base.join(raw.cert),
            key: base.join(raw.key),
            link,
            dial_transport,
            proxy,
            sender_fingerprints: fps,
            admin: raw.admin,
            admin_socket: base.join(
                raw.admin_socket
                    .unwrap_or_else(|| raw.inbox_dir.join("admin").join("sock")),
            ),
            apply_group_transactions: raw.apply_group_transactions,
            apply_group_changes: raw.apply_group_changes,
            replica_role: raw.replica_role,
            origin: raw.origin.unwrap_or(raw.replica_role),
            create_tables: raw.create_tables,
            cache_capacity: raw.cache_capacity,
            inbox_max_bytes: raw.inbox_max_bytes,
            transport,
            max_backoff: raw.max_backoff,
            ddl,
            ddl_deny,
        })
    }
}

fn de_opt_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "target = \"host=/tmp dbname=b\"\ninbox-dir = \"inbox\"\ncert = \"r.crt\"\nkey = \"r.key\"\nlisten = \"127.0.0.1:7000\"\nsender-fingerprints = [\"0000000000000000000000000000000000000000000000000000000000000000\"]\n";

    fn load_text(text: &str) -> Result<ReceiverConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("receiver.toml");
        std::fs::write(&path, text).unwrap();
        ReceiverConfig::load(&path)
    }

    fn load(extra: &str) -> Result<ReceiverConfig, ConfigError> {
        load_text(&format!("{BASE}{extra}"))
    }

    #[test]
    fn ddl_settings_default_to_all_and_normalise_deny_tags() {
        let c = load("").unwrap();
        assert_eq!(c.ddl, Ddl::All);
        assert!(c.ddl_deny.is_empty());
        let c = load("ddl = \"none\"\nddl-deny = [\"drop  table\"]\n").unwrap();
        assert_eq!(c.ddl, Ddl::None);
        assert_eq!(c.ddl_deny, vec!["DROP TABLE"]);
        assert!(load("ddl = \"some\"\n").is_err());
        assert!(load("ddl-deny = [\" \"]\n").is_err());
    }

    #[test]
    fn the_origin_follows_replica_role_unless_set() {
        assert!(load("").unwrap().origin);
        assert!(!load("replica-role = false\n").unwrap().origin);
        assert!(
            load("replica-role = false\norigin = true\n")
                .unwrap()
                .origin
        );
        assert!(!load("origin = false\n").unwrap().origin);
    }

    #[test]
    fn ddl_tables_is_read_and_a_bad_value_names_the_setting_and_the_choices() {
        assert_eq!(load("ddl = \"tables\"\n").unwrap().ddl, Ddl::Tables);
        let err = load("ddl = \"table\"\n").unwrap_err().to_string();
        assert!(
            err.contains("setting `ddl`")
                && err.contains("\"all\" (the default), \"none\" or \"tables\""),
            "{err}"
        );
    }

    #[test]
    fn shared_settings_are_read_at_the_top_level_and_unknown_ones_refused() {
        let c =
            load("window = \"32MiB\"\ncongestion = \"cubic\"\npassword-env = \"HOME\"\n").unwrap();
        assert_eq!(c.transport.window_bytes, 32 << 20);
        assert_eq!(
            c.transport.congestion,
            pgcourier_common::transport::settings::Congestion::Cubic
        );
        let err = load("windwo = \"32MiB\"\n").unwrap_err().to_string();
        assert!(err.contains("unknown setting `windwo`"), "{err}");
        // A misspelt required setting is named as unknown, not as missing.
        let text = BASE.replace("inbox-dir", "inbox-dri");
        let err = load_text(&text).unwrap_err().to_string();
        assert!(err.contains("unknown setting `inbox-dri`"), "{err}");
        let err = load("window = \"12 parsecs\"\n").unwrap_err().to_string();
        assert!(
            err.contains("window = \"12 parsecs\"") && err.contains("unknown size unit"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod site_file {
    use super::*;

    /// A branch's site file: its sender's settings, and the receiver of
    /// headquarters' changes in `[apply.hq]`.
    fn site(sections: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.toml");
        std::fs::write(
            &path,
            format!(
                "source = \"host=/tmp dbname=shop\"\nspool-dir = \"spool\"\ncert = \"site.crt\"\n\
                 key = \"site.key\"\nsite = \"shop-1\"\nship-tables = \"two-way\"\nhandshake-timeout = \"7s\"\n\
                 [[table]]\nname = \"orders\"\ndirection = \"up\"\n\
                 [[receiver]]\nname = \"hq\"\nfingerprint = \"{}\"\naddress = \"127.0.0.1:7001\"\n{sections}",
                "ab".repeat(32)
            ),
        )
        .unwrap();
        (dir, path)
    }

    #[test]
    fn a_receiver_takes_its_section_and_the_sites_identity_database_and_peer() {
        let (dir, path) = site("[apply.hq]\ninbox-dir = \"inbox\"\nlisten = \"127.0.0.1:7000\"\n");
        let cfg = ReceiverConfig::load(&path).unwrap();
        assert_eq!(cfg.cert, dir.path().join("site.crt"));
        assert_eq!(cfg.inbox_dir, dir.path().join("inbox"));
        assert_eq!(cfg.sender_fingerprints.len(), 1);
        assert_eq!(cfg.sender_fingerprints[0].to_string(), "ab".repeat(32));
        assert_eq!(cfg.transport.handshake_timeout, Duration::from_secs(7));
        assert!(
            format!("{:?}", cfg.target).contains("shop"),
            "target is the site's source"
        );
        let same = ReceiverConfig::load_peer(&path, Some("hq")).unwrap();
        assert_eq!(same.inbox_dir, cfg.inbox_dir);
    }

    #[test]
    fn several_sections_need_a_peer_and_a_wrong_peer_is_named() {
        let (_dir, path) = site(
            "[apply.hq]\ninbox-dir = \"a\"\nlisten = \"127.0.0.1:7000\"\n\
             [apply.shop-2]\ninbox-dir = \"b\"\nlisten = \"127.0.0.1:7002\"\n\
             sender-fingerprints = [\"0000000000000000000000000000000000000000000000000000000000000000\"]\n",
        );
        let e = ReceiverConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("--peer") && e.contains("shop-2"), "{e}");
        let e = ReceiverConfig::load_peer(&path, Some("shop-3"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[apply.shop-3]"), "{e}");
        let b = ReceiverConfig::load_peer(&path, Some("shop-2")).unwrap();
        assert!(b.inbox_dir.ends_with("b"));
        // A section's own setting wins over the site's.
        assert_eq!(b.sender_fingerprints[0].to_string(), "0".repeat(64));
    }
}
