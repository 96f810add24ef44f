//! `sender.toml`: parsed once into a [`SenderConfig`] that cannot hold a
//! contradiction. Every setting and its default is documented in
//! `docs/configuration.md` and in `examples/sender.toml`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgcourier_common::config::{
    self, de_duration, de_size, defaults, parse_rate, ConfigError, PasswordSource,
};
use pgcourier_common::pg::conflict::{LAST_WRITER_WINS, POLICIES};
use pgcourier_common::pg::quote_table;
use pgcourier_common::transport::link::Transport;
use pgcourier_common::transport::peer::{parse_proxy, PeerAddr};
use pgcourier_common::transport::settings::TransportSettings;
use pgcourier_common::transport::tls::Fingerprint;
use pgcourier_proto::session::pace::{Rate, Schedule, Window};
use serde::Deserialize;

/// The daemon's own settings. The shared ones (link: [`TransportSettings`];
/// database password: [`PasswordSource`]) sit beside them at the top level;
/// `config::load_toml` refuses any key that is none of these.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawSenderConfig {
    source: String,
    #[serde(default = "default_slot")]
    slot: String,
    #[serde(default = "default_slot")]
    publication: String,
    #[serde(default)]
    tables: Vec<String>,
    spool_dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    admin_socket: Option<PathBuf>,
    #[serde(default = "default_poll", deserialize_with = "de_duration")]
    poll_interval: Duration,
    #[serde(default = "default_capture_changes")]
    capture_batch_changes: u32,
    #[serde(default = "default_true")]
    initial_copy: bool,
    #[serde(default = "default_true")]
    ddl_capture: bool,
    #[serde(default = "default_copy_lock_wait", deserialize_with = "de_duration")]
    copy_lock_wait: Duration,
    #[serde(default = "default_copy_workers")]
    copy_workers: usize,
    #[serde(default = "default_batch_bytes", deserialize_with = "de_size")]
    batch_bytes: u64,
    #[serde(default = "default_in_flight", deserialize_with = "de_size")]
    max_in_flight: u64,
    zstd_level: Option<i32>,
    #[serde(default = "defaults::cache_capacity", deserialize_with = "de_size")]
    cache_capacity: u64,
    #[serde(default, deserialize_with = "de_opt_size")]
    spool_max_bytes: Option<u64>,
    #[serde(default = "defaults::max_backoff", deserialize_with = "de_duration")]
    max_backoff: Duration,
    #[serde(default, rename = "receiver")]
    receivers: Vec<RawReceiver>,
    site: Option<String>,
    #[serde(default)]
    site_priority: i32,
    #[serde(default = "default_ship_tables")]
    ship_tables: String,
    #[serde(default, rename = "table")]
    table_settings: Vec<RawTable>,
}

/// One `[[table]]`: a table's direction and conflict policy.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawTable {
    name: String,
    #[serde(default = "default_direction")]
    direction: String,
    conflict: Option<String>,
    #[serde(default)]
    delta: Vec<String>,
}

fn default_ship_tables() -> String {
    "all".into()
}

fn default_direction() -> String {
    "down".into()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawReceiver {
    name: String,
    fingerprint: String,
    address: Option<String>,
    max_rate: Option<String>,
    #[serde(default)]
    schedule: Vec<RawWindow>,
    #[serde(default)]
    transport: Transport,
    proxy: Option<String>,
}

/// One `[[receiver.schedule]]` window.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawWindow {
    from: String,
    to: String,
    rate: String,
}

/// A time of day, `HH:MM` or `HH:MM:SS`, in seconds since midnight.
fn parse_time_of_day(text: &str) -> Result<u32, String> {
    let bad = || format!("{text:?} is not a time of day such as \"22:00\" or \"06:30:00\"");
    let parts: Vec<&str> = text.trim().split(':').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.len() != 2) {
        return Err(bad());
    }
    let n: Vec<u32> = parts
        .iter()
        .map(|p| p.parse::<u32>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let (h, m, sec) = (n[0], n[1], n.get(2).copied().unwrap_or(0));
    if h > 23 || m > 59 || sec > 59 {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60 + sec)
}

/// A window's rate: `unlimited`, `closed`, or a rate such as `64kbit`.
fn parse_window_rate(text: &str) -> Result<Rate, String> {
    match text.trim() {
        "unlimited" => Ok(Rate::Unlimited),
        "closed" => Ok(Rate::Closed),
        other => parse_rate(other)
            .map(|bits| Rate::Bytes(bits / 8))
            .map_err(|e| format!("{e}; or \"unlimited\", or \"closed\" for nothing")),
    }
}

fn de_opt_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

fn default_slot() -> String {
    "pgcourier".into()
}
fn default_poll() -> Duration {
    Duration::from_millis(200)
}
fn default_true() -> bool {
    true
}

fn default_copy_workers() -> usize {
    2
}

fn default_copy_lock_wait() -> Duration {
    Duration::from_secs(5)
}

fn default_capture_changes() -> u32 {
    100_000
}
fn default_batch_bytes() -> u64 {
    256 << 10
}
fn default_in_flight() -> u64 {
    8 << 20
}

/// A receiver (branch) this sender feeds.
#[derive(Clone, Debug)]
pub struct ReceiverSpec {
    pub name: String,
    pub fingerprint: Fingerprint,
    /// Dial this address (a host name is resolved again at every dial);
    /// `None`: the receiver dials us (reverse mode).
    pub address: Option<PeerAddr>,
    /// `max-rate`: the most this receiver's link may carry from us, bits
    /// per second (QUIC's headers and acknowledgements included); `None`:
    /// as fast as the link goes.
    pub max_rate: Option<u64>,
    /// The rate in force by time of day: `schedule`'s windows, and
    /// `max-rate` outside them; `None`: neither is set.
    pub budget: Option<Schedule>,
    /// How we dial it: `auto` (QUIC, falling back to TCP), `quic`, `tcp`.
    pub transport: Transport,
    /// Dial through this HTTP proxy (CONNECT; TCP only).
    pub proxy: Option<PeerAddr>,
}

#[derive(Clone, Debug)]
pub struct SenderConfig {
    pub source: pgcourier_common::pg::connect::PgConnect,
    pub slot: String,
    pub publication: String,
    /// Schema-qualified tables to publish; empty: all tables.
    pub tables: Vec<String>,
    /// This site's name in row clocks (`site`), needed with two-way tables.
    pub site: Option<String>,
    /// Breaks ties between versions with the same clock: the higher wins
    /// (`site-priority`, default 0).
    pub site_priority: i32,
    /// Tables written at several sites (`[[table]] direction = "both"`).
    pub two_way: Vec<TwoWayTable>,
    /// Tables written at the branches only (`direction = "up"`),
    /// `schema.name`: a branch ships them, headquarters never does.
    pub up: Vec<String>,
    /// `ship-tables = "two-way"`: ship the two-way and `up` tables only (a
    /// branch); a local write to any other published table is left out
    /// and reported. `false` (`"all"`, the default): every published
    /// table but the `up` ones.
    pub ship_two_way_only: bool,
    pub spool_dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub listen: Option<SocketAddr>,
    /// Read-only admin listener (HTTP: /metrics, /health, /status), any
    /// address (a Prometheus server elsewhere may scrape it); off by
    /// default. Records and control requests are refused there.
    pub admin: Option<SocketAddr>,
    /// The admin socket (Unix, mode 0600 in a directory of mode 0700):
    /// every admin route, records and control requests included, for this
    /// daemon's user (pgcourier-queue, seed export). Always on; default
    /// `<spool-dir>/admin/sock`.
    pub admin_socket: PathBuf,
    pub poll_interval: Duration,
    pub capture_batch_changes: u32,
    /// Install the DDL event trigger at the source (`ddl-capture`, on by
    /// default: README, "Schema changes").
    pub ddl_capture: bool,
    /// Copy the published tables' existing rows when the spool is new.
    pub initial_copy: bool,
    /// How long a copy's cut waits for the tables' writers before retrying.
    pub copy_lock_wait: Duration,
    /// Source connections reading a copy's tables side by side.
    pub copy_workers: usize,
    pub batch_bytes: usize,
    pub max_in_flight: usize,
    /// zstd level when pinned by `zstd-level`; otherwise the starting level,
    /// adapted to the link.
    pub zstd_level: i32,
    pub zstd_level_pinned: bool,
    pub cache_capacity: u64,
    /// Capture pauses while the spool holds this many bytes or more (the
    /// slot keeps WAL on the source meanwhile); `None`: no limit.
    pub spool_max_bytes: Option<u64>,
    pub transport: TransportSettings,
    pub max_backoff: Duration,
    pub receivers: Vec<ReceiverSpec>,
}

/// A table written at several sites (`pgcourier_common::pg::conflict`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TwoWayTable {
    /// Quoted and qualified.
    pub table: String,
    /// `schema.name`, unquoted (as pgoutput names it).
    pub name: String,
    /// `conflict`: one of `conflict::POLICIES`.
    pub policy: String,
    /// `delta`: numeric columns whose concurrent changes add up.
    pub delta: Vec<String>,
}

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        message: message.into(),
    }
}

impl SenderConfig {
    /// The only tables this sender ships (`schema.name`), when not all:
    /// a branch's (`ship-tables = "two-way"`) two-way and `up` tables.
    pub fn only_tables(&self) -> Option<BTreeSet<String>> {
        self.ship_two_way_only.then(|| {
            self.two_way
                .iter()
                .map(|t| t.name.clone())
                .chain(self.up.iter().cloned())
                .collect()
        })
    }

    /// Tables this sender never ships: at headquarters, the `up` ones.
    pub fn except_tables(&self) -> BTreeSet<String> {
        if self.ship_two_way_only {
            BTreeSet::new()
        } else {
            self.up.iter().cloned().collect()
        }
    }

    /// Whether this sender ships table `name` (`schema.name`), by
    /// [`SenderConfig::only_tables`] and [`SenderConfig::except_tables`].
    pub fn ships(&self, name: &str) -> bool {
        self.only_tables().map_or(true, |only| only.contains(name))
            && !self.except_tables().contains(name)
    }

    pub fn load(path: &Path) -> Result<SenderConfig, ConfigError> {
        let (raw, transport, password): (RawSenderConfig, TransportSettings, PasswordSource) =
            config::load_toml(path, config::Part::Sender)?;
        let base = path.parent().unwrap_or(Path::new("."));
        SenderConfig::from_raw(raw, transport, password, base)
    }

    fn from_raw(
        raw: RawSenderConfig,
        transport: TransportSettings,
        password: PasswordSource,
        base: &Path,
    ) -> Result<SenderConfig, ConfigError> {
        let password = PasswordSource {
            password_env: password.password_env,
            password_file: password.password_file.map(|p| base.join(p)),
        };
        let source = config::pg_config("source", &raw.source, &password)?;
        if raw.slot.is_empty()
            || raw.slot.len() > 63
            || !raw
                .slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(invalid(
                "slot",
                format!(
                    "{:?}: a replication slot name is 1-63 characters of a-z, 0-9 and _",
                    raw.slot
                ),
            ));
        }
        if raw.publication.is_empty() {
            return Err(invalid("publication", "must not be empty"));
        }
        if raw.receivers.is_empty() {
            return Err(invalid("receiver", "no [[receiver]] configured: add one per branch, with its name and certificate fingerprint"));
        }
        let mut receivers = Vec::new();
        for r in raw.receivers {
            let fingerprint: Fingerprint = r.fingerprint.parse().map_err(|e| {
                invalid(
                    "receiver.fingerprint",
                    format!("receiver {:?}: {e}", r.name),
                )
            })?;
            if r.name.is_empty()
                || r.name.len() > 100
                || r.name.contains('/')
                || r.name.starts_with(pgcourier_proto::record::NOT_FOR)
            {
                return Err(invalid(
                    "receiver.name",
                    format!(
                        "{:?}: 1-100 characters, no '/', not starting with '!'",
                        r.name
                    ),
                ));
            }
            if receivers
                .iter()
                .any(|x: &ReceiverSpec| x.name == r.name || x.fingerprint == fingerprint)
            {
                return Err(invalid(
                    "receiver",
                    format!("receiver {:?} repeats a name or fingerprint", r.name),
                ));
            }
            let max_rate = r
                .max_rate
                .as_deref()
                .map(parse_rate)
                .transpose()
                .map_err(|e| invalid("receiver.max-rate", format!("receiver {:?}: {e}", r.name)))?;
            let address = r
                .address
                .as_deref()
                .map(str::parse::<PeerAddr>)
                .transpose()
                .map_err(|e| invalid("receiver.address", format!("receiver {:?}: {e}", r.name)))?;
            let mut windows = Vec::new();
            for w in &r.schedule {
                let window = (|| -> Result<Window, String> {
                    let (from, to) = (parse_time_of_day(&w.from)?, parse_time_of_day(&w.to)?);
                    if from == to {
                        return Err(format!("window {}-{} is empty", w.from, w.to));
                    }
                    Ok(Window {
                        from,
                        to,
                        rate: parse_window_rate(&w.rate)?,
                    })
                })()
                .map_err(|e| invalid("receiver.schedule", format!("receiver {:?}: {e}", r.name)))?;
                windows.push(window);
            }
            let otherwise = max_rate.map_or(Rate::Unlimited, |bits| Rate::Bytes(bits / 8));
            let budget = (!windows.is_empty() || max_rate.is_some())
                .then_some(Schedule { windows, otherwise });
            let proxy = r
                .proxy
                .as_deref()
                .map(parse_proxy)
                .transpose()
                .map_err(|e| invalid("receiver.proxy", format!("receiver {:?}: {e}", r.name)))?;
            if proxy.is_some() && address.is_none() {
                return Err(invalid("receiver.proxy", format!("receiver {:?} has a proxy but no address: a proxy is for dialling it; give its address, or remove the proxy", r.name)));
            }
            if proxy.is_some() && r.transport == Transport::Quic {
                return Err(invalid("receiver.proxy", format!("receiver {:?}: an HTTP proxy carries TCP only: set transport = \"tcp\" or \"auto\", or remove the proxy", r.name)));
            }
            receivers.push(ReceiverSpec {
                name: r.name,
                fingerprint,
                address,
                max_rate,
                budget,
                transport: r.transport,
                proxy,
            });
        }
        if receivers.iter().any(|r| r.address.is_none()) && raw.listen.is_none() {
            return Err(invalid(
                "listen",
                "a receiver has no address (it dials us), so the sender needs a `listen` address",
            ));
        }
        if raw.zstd_level.is_some_and(|l| !(1..=22).contains(&l)) {
            return Err(invalid("zstd-level", "must be between 1 and 22"));
        }
        if raw.batch_bytes < 4096 || raw.batch_bytes > (4 << 20) {
            return Err(invalid("batch-bytes", "must be between 4KiB and 4MiB"));
        }
        if raw.max_in_flight < raw.batch_bytes {
            return Err(invalid("max-in-flight", "must be at least batch-bytes"));
        }
        if raw.copy_workers == 0 || raw.copy_workers > 16 {
            return Err(invalid("copy-workers", "must be between 1 and 16"));
        }
        if raw.capture_batch_changes == 0 {
            return Err(invalid("capture-batch-changes", "must be at least 1"));
        }
        if raw.spool_max_bytes.is_some_and(|b| b < (64 << 10)) {
            return Err(invalid("spool-max-bytes", "must be at least 64KiB"));
        }
        let mut two_way = Vec::new();
        let mut up = Vec::new();
        let qualified = |name: &str| match name.split_once('.') {
            Some(_) => name.to_owned(),
            None => format!("public.{name}"),
        };
        for t in &raw.table_settings {
            if t.direction != "both" && (t.conflict.is_some() || !t.delta.is_empty()) {
                return Err(invalid(
                    "table.conflict",
                    format!("table {}: conflict and delta are for tables written at every site (direction = \"both\"); a {:?} table has one writer", t.name, t.direction),
                ));
            }
            match t.direction.as_str() {
                "down" => {}
                "up" => up.push(qualified(&t.name)),
                "both" => {
                    let policy = t.conflict.clone().unwrap_or_else(|| LAST_WRITER_WINS.into());
                    if !POLICIES.contains(&policy.as_str()) {
                        return Err(invalid(
                            "table.conflict",
                            format!(
                                "table {}: conflict = {policy:?} is not a policy: one of {}",
                                t.name,
                                POLICIES.join(", ")
                            ),
                        ));
                    }
                    two_way.push(TwoWayTable {
                        table: quote_table(&t.name),
                        name: qualified(&t.name),
                        policy,
                        delta: t.delta.clone(),
                    });
                }
                other => {
                    return Err(invalid(
                        "table.direction",
                        format!("table {}: direction = {other:?}: \"down\" (headquarters to branches, the default), \"up\" (branches to headquarters) or \"both\" (written at every site)", t.name),
                    ))
                }
            }
        }
        let ship_two_way_only = match raw.ship_tables.as_str() {
            "all" => false,
            "two-way" if two_way.is_empty() && up.is_empty() => {
                return Err(invalid(
                    "ship-tables",
                    "\"two-way\" ships the tables with direction = \"both\" or \"up\", and there is none: add [[table]] entries, or ship all",
                ))
            }
            "two-way" => true,
            other => {
                return Err(invalid(
                    "ship-tables",
                    format!("{other:?}: \"all\" (headquarters, the default) or \"two-way\" (a branch: only the tables written here, direction = \"both\" or \"up\", go up)"),
                ))
            }
        };
        if !two_way.is_empty() {
            if raw.site.as_deref().is_none_or(|s| s.trim().is_empty()) {
                return Err(invalid(
                    "site",
                    "tables with direction = \"both\" need this site's name (`site = \"hq\"`), unique among the sites",
                ));
            }
            if !raw.ddl_capture {
                return Err(invalid(
                    "ddl-capture",
                    "tables with direction = \"both\" sign their row clocks with the DDL capture's key: leave ddl-capture on",
                ));
            }
        }
        Ok(SenderConfig {
            ship_two_way_only,
            up,
            site: raw.site,
            site_priority: raw.site_priority,
            two_way,
            source,
            slot: raw.slot,
            publication: raw.publication,
            tables: raw.tables,
            spool_dir: base.join(&raw.spool_dir),
            cert: base.join(raw.cert),
            key: base.join(raw.key),
            listen: raw.listen,
            admin: raw.admin,
            admin_socket: base.join(
                raw.admin_socket
                    .unwrap_or_else(|| raw.spool_dir.join("admin").join("sock")),
            ),
            poll_interval: raw.poll_interval,
            capture_batch_changes: raw.capture_batch_changes,
            initial_copy: raw.initial_copy,
            ddl_capture: raw.ddl_capture,
            copy_lock_wait: raw.copy_lock_wait,
            copy_workers: raw.copy_workers,
            batch_bytes: raw.batch_bytes as usize,
            max_in_flight: raw.max_in_flight as usize,
            zstd_level: raw.zstd_level.unwrap_or(3),
            zstd_level_pinned: raw.zstd_level.is_some(),
            cache_capacity: raw.cache_capacity,
            spool_max_bytes: raw.spool_max_bytes,
            transport,
            max_backoff: raw.max_backoff,
            receivers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(extra: &str) -> Result<SenderConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sender.toml");
        std::fs::write(
            &path,
            format!(
                "source = \"host=/tmp dbname=app\"\nspool-dir = \"spool\"\ncert = \"s.crt\"\nkey = \"s.key\"\n\
                 listen = \"127.0.0.1:4433\"\n{extra}\n[[receiver]]\nname = \"b\"\nfingerprint = \"{}\"\n",
                "ab".repeat(32)
            ),
        )
        .unwrap();
        SenderConfig::load(&path)
    }

    #[test]
    fn a_two_way_table_needs_a_site_and_a_built_policy() {
        let both = "[[table]]\nname = \"shop.orders\"\ndirection = \"both\"\n";
        let cfg = load_with(&format!("site = \"hq\"\nsite-priority = 5\n{both}")).unwrap();
        assert_eq!(
            cfg.two_way,
            vec![TwoWayTable {
                table: "\"shop\".\"orders\"".into(),
                name: "shop.orders".into(),
                policy: LAST_WRITER_WINS.into(),
                delta: Vec::new()
            }]
        );
        let manual = load_with(&format!(
            "site = \"hq\"\n{both}conflict = \"manual\"\ndelta = [\"stock\"]\n"
        ))
        .unwrap();
        assert_eq!(manual.two_way[0].policy, "manual");
        assert_eq!(manual.two_way[0].delta, vec!["stock".to_owned()]);
        assert_eq!((cfg.site.as_deref(), cfg.site_priority), (Some("hq"), 5));
        // One-way tables need nothing.
        let down = load_with("[[table]]\nname = \"t\"\ndirection = \"down\"\n").unwrap();
        assert!(down.two_way.is_empty());
        let refused = |extra: &str, setting: &str| {
            let e = load_with(extra).expect_err(extra).to_string();
            assert!(e.contains(setting), "{extra}: {e}");
        };
        refused(both, "site");
        refused(
            &format!("site = \"hq\"\nddl-capture = false\n{both}"),
            "ddl-capture",
        );
        refused(
            &format!("site = \"hq\"\n{both}conflict = \"first-wins\"\n"),
            "table.conflict",
        );
        refused(
            "[[table]]\nname = \"t\"\ndirection = \"sideways\"\n",
            "table.direction",
        );
        refused(
            "[[table]]\nname = \"t\"\ndirection = \"up\"\nconflict = \"manual\"\n",
            "table.conflict",
        );
        // Up tables: a branch ships them, headquarters does not.
        let up = "[[table]]\nname = \"orders\"\ndirection = \"up\"\n";
        let hq = load_with(up).unwrap();
        assert_eq!(hq.up, vec!["public.orders".to_owned()]);
        assert!(!hq.ships("public.orders") && hq.ships("public.prices"));
        let shop = load_with(&format!("ship-tables = \"two-way\"\n{up}")).unwrap();
        assert!(shop.ships("public.orders") && !shop.ships("public.prices"));
        refused("ship-tables = \"two-way\"\n", "ship-tables");
        let branch =
            load_with(&format!("site = \"b\"\nship-tables = \"two-way\"\n{both}")).unwrap();
        assert!(branch.ship_two_way_only && !cfg.ship_two_way_only);
    }

    /// A site file's `[apply.*]` sections are its receivers': the sender
    /// reads the rest, and still refuses a misspelt setting there.
    #[test]
    fn a_site_files_sender_reads_all_but_the_apply_sections() {
        let apply = "[apply.hq]\ninbox-dir = \"inbox\"\nlisten = \"127.0.0.1:7000\"\n";
        let cfg = load_with(apply).unwrap();
        assert_eq!(cfg.receivers.len(), 1);
        let e = load_with(&format!("spool-dri = \"x\"\n{apply}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("spool-dri") && e.contains("sender's settings"),
            "{e}"
        );
    }

    #[test]
    fn times_of_day_and_window_rates_parse() {
        assert_eq!(parse_time_of_day("22:00").unwrap(), 22 * 3600);
        assert_eq!(
            parse_time_of_day("06:30:15").unwrap(),
            6 * 3600 + 30 * 60 + 15
        );
        for bad in ["24:00", "6:00", "22", "22:60", "22:00:00:00", "noon"] {
            assert!(parse_time_of_day(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(parse_window_rate("closed").unwrap(), Rate::Closed);
        assert_eq!(parse_window_rate("unlimited").unwrap(), Rate::Unlimited);
        assert_eq!(parse_window_rate("64kbit").unwrap(), Rate::Bytes(8000));
        assert!(parse_window_rate("cheap").is_err());
    }
}
