//! A replication set-up for end-to-end tests: one source cluster with the
//! sender, N branch clusters each with a receiver, certificates, configs, and
//! the schema used by the workloads.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use pgcourier_tests::{bin_path, wait_until, workdir, Daemon, PgCluster};
use tokio_postgres::Client;

pub const DB: &str = "postgres";

/// How the link is set up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dial {
    /// The sender dials each receiver (default mode).
    SenderDials,
    /// Each receiver dials the sender (reverse mode).
    ReceiverDials,
}

pub struct Branch {
    pub pg: PgCluster,
    pub receiver: Daemon,
    pub config: PathBuf,
    pub fingerprint: String,
}

pub struct Setup {
    /// The emulated links, one per branch (when asked for).
    pub relays: Vec<pgcourier_netem::RelayHandle>,
    pub hq: PgCluster,
    pub sender: Daemon,
    pub sender_config: PathBuf,
    pub branches: Vec<Branch>,
    pub dir: tempfile::TempDir,
}

/// A port number below the kernel's ephemeral range (32768-60999 by
/// default) and above the test clusters' (20000-29999), free on loopback
/// now for TCP (and for UDP too with `udp`).
/// Ports the kernel picked for a moment (bind to port 0) were handed out
/// again as the source port of some connection (the test's own status
/// requests, a dial) before the daemon given them could bind: it exited
/// on "Address already in use". A port below the range is never handed
/// out that way; the walk starts from a point of the process's own, so
/// tests running at once start apart.
fn free_port(udp: bool) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 30_000;
    const SPAN: u32 = 2_760;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id().wrapping_mul(7919)) % SPAN;
    for _ in 0..SPAN {
        let port = (LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if tcp && (!udp || UdpSocket::bind(("127.0.0.1", port)).is_ok()) {
            return port;
        }
    }
    panic!("no port free on loopback between {LOW} and {}", LOW + SPAN)
}

/// A port free on loopback for UDP and for TCP: a receiver listens on
/// both with one number (a port free for UDP alone was once taken on TCP
/// by another test's connection, and the receiver could not start).
pub fn free_udp_port() -> u16 {
    free_port(true)
}

/// A TCP port free on 127.0.0.1 now (an admin listener's).
pub fn free_tcp_port() -> u16 {
    free_port(false)
}

/// GET the /status of a daemon's admin listener on 127.0.0.1:`port`.
pub async fn admin_status(port: u16) -> anyhow::Result<serde_json::Value> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let (_, body) = tokio::task::spawn_blocking(move || {
        pgcourier_common::ops::admin::request(addr, "GET", "/status")
    })
    .await??;
    Ok(serde_json::from_str(&body)?)
}

pub fn keygen(dir: &Path, name: &str) -> String {
    pgcourier_common::transport::tls::keygen(
        &dir.join(format!("{name}.crt")),
        &dir.join(format!("{name}.key")),
        name,
    )
    .expect("keygen")
    .to_string()
}

/// Options for [`Setup::start`].
pub struct Options<'a> {
    pub branches: usize,
    pub dial: Dial,
    /// DDL run on the source and on every branch before the daemons start.
    pub schema: &'a str,
    /// SQL run on the source only, after `schema` (rows for the initial
    /// copy, tables the branches lack).
    pub source_sql: &'a str,
    /// `tables = [...]` for the publication; empty: all tables.
    pub tables: &'a [&'a str],
    /// Extra lines for sender.toml (top-level settings).
    pub sender_extra: &'a str,
    /// Extra lines for every receiver.toml.
    pub receiver_extra: &'a str,
    /// Extra lines for every `[[receiver]]` entry of sender.toml.
    pub receiver_entry_extra: &'a str,
    /// An emulated link (netem UDP relay) between the sender and each
    /// receiver; only with [`Dial::SenderDials`].
    pub link: Option<pgcourier_netem::Link>,
    /// With `link`: a netem TCP relay too, on the UDP relay's port number
    /// (through `tcp_link`), so the TCP transport has a path; its handle
    /// follows the UDP relays in `relays`.
    pub tcp_link: Option<pgcourier_netem::Link>,
    /// Return only once every receiver has applied the initial copy (so
    /// that what the test writes or plants next is not part of it).
    pub wait_for_copy: bool,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            branches: 1,
            dial: Dial::SenderDials,
            schema: "",
            source_sql: "",
            tables: &[],
            sender_extra: "",
            receiver_extra: "",
            receiver_entry_extra: "",
            link: None,
            tcp_link: None,
            wait_for_copy: true,
        }
    }
}

impl Setup {
    pub async fn start(name: &str, opts: Options<'_>) -> anyhow::Result<Setup> {
        let dir = workdir(name);
        let n = opts.branches;
        let clusters = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<PgCluster>> {
            let handles: Vec<_> = (0..=n)
                .map(|i| {
                    std::thread::spawn(move || {
                        PgCluster::start(if i == 0 { "hq" } else { "branch" })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("cluster start thread"))
                .collect()
        })
        .await??;
        let mut clusters = clusters.into_iter();
        let hq = clusters.next().expect("hq cluster");
        hq.execute(DB, opts.schema)
            .await
            .context("schema on the source")?;
        hq.execute(DB, opts.source_sql)
            .await
            .context("source-only SQL")?;
        let sender_fp = keygen(dir.path(), "sender");
        let sender_port = free_udp_port();
        let mut receivers_toml = String::new();
        let mut branches = Vec::new();
        let mut relays = Vec::new();
        let mut tcp_relays = Vec::new();
        for (i, pg) in clusters.enumerate() {
            pg.execute(DB, opts.schema)
                .await
                .context("schema on a branch")?;
            let rname = format!("branch{i}");
            let fp = keygen(dir.path(), &rname);
            let port = free_udp_port();
            let link = match opts.dial {
                Dial::SenderDials => format!("listen = \"127.0.0.1:{port}\""),
                Dial::ReceiverDials => format!("sender-address = \"127.0.0.1:{sender_port}\""),
            };
            let config = dir.path().join(format!("{rname}.toml"));
            std::fs::write(
                &config,
                format!(
                    "target = \"{}\"\ninbox-dir = \"{rname}-inbox\"\ncert = \"{rname}.crt\"\nkey = \"{rname}.key\"\n{link}\n\
                     sender-fingerprints = [\"{sender_fp}\"]\nmax-backoff = \"2s\"\n{}\n",
                    pg.conninfo(DB),
                    opts.receiver_extra
                ),
            )?;
            let address = match (opts.dial, &opts.link) {
                (Dial::SenderDials, None) => format!("address = \"127.0.0.1:{port}\"\n"),
                (Dial::SenderDials, Some(link)) => {
                    let relay = pgcourier_netem::UdpRelay::start(
                        "127.0.0.1:0".parse()?,
                        format!("127.0.0.1:{port}").parse()?,
                        link.clone(),
                    )
                    .await
                    .context("start the netem relay")?;
                    let addr = relay.local_addr();
                    relays.push(relay);
                    if let Some(tcp_link) = &opts.tcp_link {
                        tcp_relays.push(
                            pgcourier_netem::TcpRelay::start(
                                addr,
                                format!("127.0.0.1:{port}").parse()?,
                                tcp_link.clone(),
                                pgcourier_netem::OutageMode::Cut,
                            )
                            .await
                            .context("start the netem TCP relay")?,
                        );
                    }
                    format!("address = \"{addr}\"\n")
                }
                (Dial::ReceiverDials, _) => String::new(),
            };
            receivers_toml.push_str(&format!(
                "\n[[receiver]]\nname = \"{rname}\"\nfingerprint = \"{fp}\"\n{address}{}\n",
                opts.receiver_entry_extra
            ));
            let receiver = spawn_receiver(&dir, &config, &rname)?;
            branches.push(Branch {
                pg,
                receiver,
                config,
                fingerprint: fp,
            });
        }
        let listen = match opts.dial {
            Dial::SenderDials => String::new(),
            Dial::ReceiverDials => format!("listen = \"127.0.0.1:{sender_port}\"\n"),
        };
        let tables = if opts.tables.is_empty() {
            String::new()
        } else {
            format!(
                "tables = [{}]\n",
                opts.tables
                    .iter()
                    .map(|t| format!("{t:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let sender_config = dir.path().join("sender.toml");
        std::fs::write(
            &sender_config,
            format!(
                "source = \"{}\"\nspool-dir = \"spool\"\ncert = \"sender.crt\"\nkey = \"sender.key\"\n{listen}{tables}\
                 poll-interval = \"50ms\"\nmax-backoff = \"2s\"\n{}\n{receivers_toml}",
                hq.conninfo(DB),
                opts.sender_extra
            ),
        )?;
        let sender = spawn_sender(&dir, &sender_config)?;
        relays.extend(tcp_relays);
        let setup = Setup {
            relays,
            hq,
            sender,
            sender_config,
            branches,
            dir,
        };
        // Rows written before the initial copy's cut arrive through the copy
        // (as their final state); tests that count every change wait for the
        // copy to be spooled before they write.
        wait_until(
            "the sender to spool its initial copy",
            Duration::from_secs(120),
            || async {
                let log = setup.sender.log();
                Ok(log.contains("copy spooled") || log.contains("initial-copy = false"))
            },
        )
        .await
        .with_context(|| setup.logs())?;
        if opts.wait_for_copy && setup.sender.log().contains("copy spooled") {
            for b in &setup.branches {
                wait_until(
                    "each receiver to apply the initial copy",
                    Duration::from_secs(120),
                    || async { Ok(b.receiver.log().contains("table copy loaded")) },
                )
                .await
                .with_context(|| setup.logs())?;
            }
        }
        Ok(setup)
    }

    pub fn restart_sender(&mut self) -> anyhow::Result<()> {
        self.sender = spawn_sender(&self.dir, &self.sender_config)?;
        Ok(())
    }

    pub fn restart_receiver(&mut self, i: usize) -> anyhow::Result<()> {
        let b = &mut self.branches[i];
        b.receiver = spawn_receiver(&self.dir, &b.config, &format!("branch{i}"))?;
        Ok(())
    }

    pub async fn source(&self) -> anyhow::Result<Client> {
        self.hq.client(DB).await
    }

    pub async fn target(&self, i: usize) -> anyhow::Result<Client> {
        self.branches[i].pg.client(DB).await
    }

    /// All daemon logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = format!("--- sender log ---\n{}", self.sender.log_tail(60));
        for (i, b) in self.branches.iter().enumerate() {
            s.push_str(&format!(
                "\n--- receiver {i} log ---\n{}",
                b.receiver.log_tail(60)
            ));
        }
        s
    }

    /// Wait until the source's tables equal branch `i`'s, row for row.
    pub async fn wait_equal(
        &self,
        i: usize,
        tables: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let src = self.source().await?;
        let dst = self.target(i).await?;
        pgcourier_tests::wait_tables_equal(&src, &dst, tables, timeout)
            .await
            .with_context(|| self.logs())
    }
}

pub fn spawn_sender(dir: &tempfile::TempDir, config: &Path) -> anyhow::Result<Daemon> {
    let cfg = config.to_str().expect("utf-8 path");
    Daemon::spawn(
        "sender",
        &bin_path("pgcourier-sender"),
        &["run", "--config", cfg],
        &dir.path().join("sender.log"),
    )
}

pub fn spawn_receiver(
    dir: &tempfile::TempDir,
    config: &Path,
    name: &str,
) -> anyhow::Result<Daemon> {
    let cfg = config.to_str().expect("utf-8 path");
    Daemon::spawn(
        name,
        &bin_path("pgcourier-receiver"),
        &["run", "--config", cfg],
        &dir.path().join(format!("{name}.log")),
    )
}

/// Wait until `sql` (returning one bigint) gives at least `n` on `client`.
pub async fn wait_count(
    client: &Client,
    sql: &str,
    n: i64,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_until(&format!("{sql} to reach {n}"), timeout, || async {
        let v: i64 = client.query_one(sql, &[]).await?.get(0);
        Ok(v >= n)
    })
    .await
}

/// What [`Setup::remove_branch`] took out of sender.toml.
pub struct Removed {
    /// sender.toml without the branch.
    pub without: String,
    /// Its `[[receiver]]` block.
    pub block: String,
}

impl Setup {
    /// Branch `i` leaves the configuration: its receiver and the sender
    /// stop, and the sender starts again without its `[[receiver]]` block,
    /// so the spool moves on (and trims) without it.
    pub fn remove_branch(&mut self, i: usize) -> anyhow::Result<Removed> {
        self.branches[i].receiver.terminate()?;
        self.sender.terminate()?;
        let original = std::fs::read_to_string(&self.sender_config)?;
        let name = format!("branch{i}");
        let (without, block) = without_receiver(&original, &name);
        anyhow::ensure!(!block.is_empty(), "no block for {name} in {original}");
        std::fs::write(&self.sender_config, &without)?;
        self.restart_sender()?;
        Ok(Removed { without, block })
    }

    /// Branch `i`, removed, comes back as a receiver new to the spool: its
    /// block under the name `new_name`, a fresh inbox. The sender must be
    /// stopped; the caller starts the daemons.
    pub fn add_back_as(&self, removed: &Removed, i: usize, new_name: &str) -> anyhow::Result<()> {
        let block = removed.block.replace(
            &format!("name = \"branch{i}\""),
            &format!("name = \"{new_name}\""),
        );
        std::fs::write(&self.sender_config, format!("{}{block}", removed.without))?;
        std::fs::remove_dir_all(self.dir.path().join(format!("branch{i}-inbox")))?;
        Ok(())
    }
}

/// sender.toml with the `[[receiver]]` block of `name` removed; returns the
/// file and the removed block.
pub fn without_receiver(config: &str, name: &str) -> (String, String) {
    let mut parts = config.split("\n[[receiver]]");
    let mut kept = parts.next().unwrap_or_default().to_owned();
    let mut removed = String::new();
    for block in parts {
        if block.contains(&format!("name = \"{name}\"")) {
            removed = format!("\n[[receiver]]{block}");
        } else {
            kept.push_str("\n[[receiver]]");
            kept.push_str(block);
        }
    }
    (kept, removed)
}
