//! The two systems under test, set up on throwaway clusters, each behind a
//! netem relay that counts the bytes on its wire:
//!
//! ```text
//!  pgcourier:        hq ── sender ── UDP ── netem UdpRelay (profile) ── receiver ── target "ours"
//!  pgcourier (TCP):  hq ── sender ── TCP ── netem TcpRelay (profile) ── receiver ── target "ours-tcp"
//!  PostgreSQL:       hq ── walsender ── Unix-socket bridge ── TCP ── netem TcpRelay (profile) ── apply worker on "native"
//! ```
//!
//! pgcourier over TCP (`transport = "tcp"`) is measured only by the
//! slow-link workload, to compare its two transports on the same links.
//!
//! On loopback the relays use netem's `clean` profile (no delay, no loss,
//! unlimited rate): they only count. Bytes are payload both ways: UDP
//! datagrams (QUIC, TLS included) for pgcourier, the TCP stream for
//! pgcourier over TCP (TLS records) and for PostgreSQL (replication
//! protocol), no TCP/IP headers for any.
//!
//! netem's TCP relay applies a profile's delay, rate and outages but not
//! its loss (the kernel's TCP below the relay would hide it by
//! retransmitting): over `3g` and `satellite` the QUIC rows pay 2% and 1%
//! loss that the TCP rows, pgcourier's and PostgreSQL's, do not.
//!
//! Neither system copies existing rows unless a workload asks for it:
//! pgcourier's sender runs with `initial-copy = false`, PostgreSQL's
//! subscription is created with `copy_data = false`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgcourier_netem::{Link, OutageMode, Profile, RelayHandle, TcpRelay, UdpRelay};
use pgcourier_tests::{bin_path, pg_bindir, wait_until, workdir, Daemon, PgCluster};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixStream};

pub const DB: &str = "postgres";

/// Start clusters in parallel (initdb dominates).
pub async fn clusters(names: &[&'static str]) -> anyhow::Result<Vec<PgCluster>> {
    let names = names.to_vec();
    tokio::task::spawn_blocking(move || {
        let threads: Vec<_> = names
            .into_iter()
            .map(|n| std::thread::spawn(move || PgCluster::start(n)))
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("cluster thread"))
            .collect()
    })
    .await?
}

pub async fn query_i64(pg: &PgCluster, sql: &str) -> anyhow::Result<i64> {
    Ok(pg.client(DB).await?.query_one(sql, &[]).await?.get(0))
}

pub async fn query_text(pg: &PgCluster, sql: &str) -> anyhow::Result<Option<String>> {
    Ok(pg.client(DB).await?.query_one(sql, &[]).await?.get(0))
}

/// Peak resident set (`VmHWM`) of a process, in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes both ways through a relay.
pub fn relay_bytes(relay: &RelayHandle) -> u64 {
    let s = relay.stats();
    s.forward.bytes_forwarded + s.back.bytes_forwarded
}

/// Run a PostgreSQL client program (pgbench, pg_recvlogical) against `pg`.
pub fn pg_client_command(pg: &PgCluster, program: &str) -> anyhow::Result<std::process::Command> {
    let mut cmd = std::process::Command::new(pg_bindir()?.join(program));
    cmd.arg("-h")
        .arg(pg.socket_dir())
        .arg("-p")
        .arg(pg.port().to_string())
        .arg("-U")
        .arg("postgres")
        .stdin(std::process::Stdio::null());
    for var in ["PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGOPTIONS"] {
        cmd.env_remove(var);
    }
    Ok(cmd)
}

/// Run a client program to completion; its output on failure.
pub async fn run_client(mut cmd: std::process::Command) -> anyhow::Result<String> {
    let what = format!("{cmd:?}");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await?
        .with_context(|| format!("running {what}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{what} failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

/// `pgbench -i` on several clusters at once; `steps` as for `-I`.
pub async fn pgbench_init(pgs: &[&PgCluster], scale: u32, steps: &str) -> anyhow::Result<()> {
    let mut jobs = Vec::new();
    for pg in pgs {
        let mut cmd = pg_client_command(pg, "pgbench")?;
        cmd.args(["-i", "-q", "-I", steps, "-s", &scale.to_string(), DB]);
        jobs.push(run_client(cmd));
    }
    for r in futures_util::future::join_all(jobs).await {
        r.context("pgbench -i")?;
    }
    Ok(())
}

pub const PGBENCH_TABLES: &str =
    "public.pgbench_accounts, public.pgbench_branches, public.pgbench_tellers, public.pgbench_history";

/// Wait for `sql` (a count on `pg`) to reach `expected`, polling every
/// `poll`; fails after `timeout`. Returns the time it took.
pub async fn wait_count(
    pg: &PgCluster,
    sql: &str,
    expected: i64,
    poll: Duration,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let client = pg.client(DB).await?;
    loop {
        let c: i64 = client.query_one(sql, &[]).await?.get(0);
        if c >= expected {
            return Ok(t.elapsed().as_secs_f64());
        }
        if t.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {sql} to reach {expected} (at {c})");
        }
        tokio::time::sleep(poll).await;
    }
}

/// How pgcourier's sender reaches its receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The daemons' default (`transport = "auto"`: QUIC, falling back to
    /// TCP), through a netem UDP relay; nothing answers TCP at the relay's
    /// address, so the link stays on QUIC.
    Quic,
    /// `transport = "tcp"` (TLS 1.3 over TCP), through a netem TCP relay.
    Tcp,
}

/// What a pgcourier pair needs to know.
pub struct CourierOpts {
    /// netem profile of the link (`clean` on loopback).
    pub profile: Profile,
    pub transport: Transport,
    pub slot: String,
    pub publication: String,
    /// For a publication the sender creates (the initial-copy workload).
    pub tables: Vec<String>,
    /// QUIC congestion controller; `None`: the daemons' default.
    pub congestion: Option<String>,
    /// The sender's `initial-copy`: copy the published tables' rows when
    /// the spool is new (only the initial-copy workload wants it).
    pub initial_copy: bool,
    /// Extra top-level lines for sender.toml and receiver.toml
    /// (`--sender-conf`, `--receiver-conf`).
    pub sender_conf: Vec<String>,
    pub receiver_conf: Vec<String>,
}

/// A pgcourier sender and receiver (processes started and stopped at will)
/// between `hq` and a target, through a netem relay (UDP or TCP, after the
/// transport).
pub struct Courier {
    dir: tempfile::TempDir,
    sender_cfg: PathBuf,
    receiver_cfg: PathBuf,
    pub sender_admin: SocketAddr,
    pub receiver_admin: SocketAddr,
    pub transport: Transport,
    /// The link: its counters are the wire bytes.
    pub relay: RelayHandle,
    pub sender: Option<Daemon>,
    pub receiver: Option<Daemon>,
}

impl Courier {
    pub async fn new(
        hq: &PgCluster,
        target: &PgCluster,
        opts: &CourierOpts,
    ) -> anyhow::Result<Courier> {
        let dir = workdir("bench");
        let d = dir.path();
        let sender_fp =
            pgcourier_common::transport::tls::keygen(&d.join("s.crt"), &d.join("s.key"), "sender")?;
        let receiver_fp = pgcourier_common::transport::tls::keygen(
            &d.join("r.crt"),
            &d.join("r.key"),
            "receiver",
        )?;
        let port = listen_port()?;
        let sender_admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let receiver_admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let receiver: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        // The sender dials the relay, so the data flows in its forward
        // direction over either transport.
        let (relay, transport_line) = match opts.transport {
            Transport::Quic => (
                UdpRelay::start("127.0.0.1:0".parse()?, receiver, opts.profile.link(5)).await?,
                "",
            ),
            Transport::Tcp => (
                // Cut, as for PostgreSQL's own: an outage resets the
                // connections, and each system must dial again.
                TcpRelay::start(
                    "127.0.0.1:0".parse()?,
                    receiver,
                    opts.profile.link(5),
                    OutageMode::Cut,
                )
                .await?,
                "transport = \"tcp\"\n",
            ),
        };
        let p = &opts.profile;
        let mut link = String::new();
        let mut copy = format!("initial-copy = {}\n", opts.initial_copy);
        for l in &opts.sender_conf {
            copy += &format!("{l}\n");
        }
        let mut extra = String::new();
        for l in &opts.receiver_conf {
            extra += &format!("{l}\n");
        }
        if p.name != "clean" {
            // Short timers so a cut is noticed as on a real link, and the
            // initial RTT near the profile's.
            link += &format!(
                "idle-timeout = \"4s\"\nkeep-alive = \"1s\"\nmax-backoff = \"2s\"\ninitial-rtt = \"{}ms\"\n",
                (p.forward.delay + p.back.delay).as_millis().max(1)
            );
        }
        if let Some(c) = &opts.congestion {
            link += &format!("congestion = \"{c}\"\n");
        }
        let tables = opts
            .tables
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let sender_cfg = d.join("sender.toml");
        std::fs::write(
            &sender_cfg,
            format!(
                "source = \"{src}\"\nslot = \"{slot}\"\npublication = \"{publ}\"\ntables = [{tables}]\n\
                 spool-dir = \"spool\"\ncert = \"s.crt\"\nkey = \"s.key\"\nadmin = \"{sender_admin}\"\n{copy}{link}\
                 [[receiver]]\nname = \"branch\"\nfingerprint = \"{receiver_fp}\"\naddress = \"{addr}\"\n{transport_line}",
                src = hq.conninfo(DB),
                slot = opts.slot,
                publ = opts.publication,
                addr = relay.local_addr(),
            ),
        )?;
        let receiver_cfg = d.join("receiver.toml");
        std::fs::write(
            &receiver_cfg,
            format!(
                "target = \"{}\"\ninbox-dir = \"inbox\"\ncert = \"r.crt\"\nkey = \"r.key\"\nlisten = \"127.0.0.1:{port}\"\n\
                 sender-fingerprints = [\"{sender_fp}\"]\nadmin = \"{receiver_admin}\"\n{extra}{link}",
                target.conninfo(DB)
            ),
        )?;
        Ok(Courier {
            dir,
            sender_cfg,
            receiver_cfg,
            sender_admin,
            receiver_admin,
            transport: opts.transport,
            relay,
            sender: None,
            receiver: None,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn start_sender(&mut self) -> anyhow::Result<()> {
        if self.sender.is_none() {
            self.sender = Some(Daemon::spawn(
                "sender",
                &bin_path("pgcourier-sender"),
                &["run", "--config", self.sender_cfg.to_str().expect("utf-8")],
                &self.dir.path().join("sender.log"),
            )?);
        }
        Ok(())
    }

    pub fn start_receiver(&mut self) -> anyhow::Result<()> {
        if self.receiver.is_none() {
            self.receiver = Some(Daemon::spawn(
                "receiver",
                &bin_path("pgcourier-receiver"),
                &[
                    "run",
                    "--config",
                    self.receiver_cfg.to_str().expect("utf-8"),
                ],
                &self.dir.path().join("receiver.log"),
            )?);
        }
        Ok(())
    }

    /// SIGTERM the sender (clean stop) and wait for it.
    pub fn stop_sender(&mut self) -> anyhow::Result<()> {
        if let Some(d) = self.sender.take() {
            d.terminate()?;
        }
        Ok(())
    }

    /// SIGTERM both daemons (clean stop) and wait for them.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        for d in [self.sender.take(), self.receiver.take()]
            .into_iter()
            .flatten()
        {
            d.terminate()?;
        }
        Ok(())
    }

    /// Another branch of the same sender, `branch2` on `target`: its keys,
    /// its receiver config, its `[[receiver]]` block appended to
    /// sender.toml (read when the sender next starts), behind a UDP relay
    /// that shares this pair's bottleneck (one uplink for both branches).
    pub async fn add_branch(&mut self, target: &PgCluster) -> anyhow::Result<Branch> {
        let d = self.dir.path();
        let fp = pgcourier_common::transport::tls::keygen(
            &d.join("r2.crt"),
            &d.join("r2.key"),
            "receiver2",
        )?;
        let sender_fp = std::fs::read_to_string(&self.receiver_cfg)?
            .lines()
            .find(|l| l.starts_with("sender-fingerprints"))
            .context("receiver.toml has sender-fingerprints")?
            .to_string();
        let port = listen_port()?;
        let relay = UdpRelay::start_sharing(
            "127.0.0.1:0".parse()?,
            format!("127.0.0.1:{port}").parse()?,
            self.relay.control(),
        )
        .await?;
        // The first receiver's link settings (timers), with its own names.
        let link: String = std::fs::read_to_string(&self.receiver_cfg)?
            .lines()
            .skip_while(|l| !l.starts_with("admin"))
            .skip(1)
            .map(|l| format!("{l}\n"))
            .collect();
        let cfg = d.join("receiver2.toml");
        std::fs::write(
            &cfg,
            format!(
                "target = \"{}\"\ninbox-dir = \"inbox2\"\ncert = \"r2.crt\"\nkey = \"r2.key\"\nlisten = \"127.0.0.1:{port}\"\n\
                 {sender_fp}\n{link}",
                target.conninfo(DB)
            ),
        )?;
        let mut sender = std::fs::read_to_string(&self.sender_cfg)?;
        sender += &format!(
            "\n[[receiver]]\nname = \"branch2\"\nfingerprint = \"{fp}\"\naddress = \"{}\"\n",
            relay.local_addr()
        );
        std::fs::write(&self.sender_cfg, sender)?;
        Ok(Branch {
            cfg,
            log: d.join("receiver2.log"),
            _relay: relay,
            receiver: None,
        })
    }

    /// Start the sender alone until it has created its slot on `hq`, then
    /// stop it.
    pub async fn create_slot(&mut self, hq: &PgCluster, slot: &str) -> anyhow::Result<()> {
        self.start_sender()?;
        let sql = format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'");
        wait_until("the pgcourier slot", Duration::from_secs(60), || async {
            Ok(query_i64(hq, &sql).await? == 1)
        })
        .await
        .with_context(|| self.log_tails())?;
        self.stop()
    }

    pub async fn status(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
        let (code, body) = tokio::task::spawn_blocking(move || {
            pgcourier_common::ops::admin::request(admin, "GET", "/status")
        })
        .await??;
        anyhow::ensure!(code == 200, "status answered {code}");
        Ok(serde_json::from_str(&body)?)
    }

    /// Wait until the sender's link to the receiver is up.
    pub async fn wait_connected(&self) -> anyhow::Result<()> {
        let admin = self.sender_admin;
        wait_until(
            "the sender's link to the receiver",
            Duration::from_secs(60),
            || async move {
                let st = Courier::status(admin).await?;
                Ok(!st["receivers"][0]["link"].is_null())
            },
        )
        .await
        .with_context(|| self.log_tails())
    }

    /// The transport the sender's link to the receiver runs over now
    /// (`None` while it is down).
    pub async fn link_transport(&self) -> anyhow::Result<Option<String>> {
        let st = Courier::status(self.sender_admin).await?;
        Ok(st["receivers"][0]["link"]["transport"]
            .as_str()
            .map(String::from))
    }

    /// Follow the marks of both daemons (every 50 ms) from `t0` on, to see
    /// where a drain spends its time.
    pub fn track_phases(&self, t0: Instant) -> Phases {
        let stop = Arc::new(AtomicBool::new(false));
        let (sa, ra) = (self.sender_admin, self.receiver_admin);
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let s = Courier::status(sa).await.ok();
                let r = Courier::status(ra).await.ok();
                let get = |v: &Option<serde_json::Value>, k: &str| {
                    v.as_ref().and_then(|v| v[k].as_u64()).unwrap_or(0)
                };
                samples.push((
                    t0.elapsed().as_secs_f64(),
                    [
                        get(&s, "complete_seq"),
                        get(&r, "durable_seq"),
                        get(&r, "applied_seq"),
                    ],
                ));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            samples
        });
        Phases { stop, task }
    }

    /// Peak RSS of the running sender and receiver.
    pub fn peak_rss(&self) -> (Option<u64>, Option<u64>) {
        let of = |d: &Option<Daemon>| {
            d.as_ref()
                .filter(|d| d.is_running())
                .and_then(|d| peak_rss(d.pid()))
        };
        (of(&self.sender), of(&self.receiver))
    }

    pub fn log_tails(&self) -> String {
        let tail = |name: &str| {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        format!(
            "sender log:\n{}\nreceiver log:\n{}",
            tail("sender.log"),
            tail("receiver.log")
        )
    }
}

/// A second branch of a [`Courier`] (see [`Courier::add_branch`]).
pub struct Branch {
    cfg: PathBuf,
    log: PathBuf,
    /// Held: dropping it stops the relay.
    _relay: RelayHandle,
    pub receiver: Option<Daemon>,
}

impl Branch {
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.receiver.is_none() {
            self.receiver = Some(Daemon::spawn(
                "receiver2",
                &bin_path("pgcourier-receiver"),
                &["run", "--config", self.cfg.to_str().expect("utf-8")],
                &self.log,
            )?);
        }
        Ok(())
    }

    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(d) = self.receiver.take() {
            d.terminate()?;
        }
        Ok(())
    }
}

/// A port free on 127.0.0.1 for both UDP and TCP: the receiver listens on
/// both at its `listen` address.
fn listen_port() -> anyhow::Result<u16> {
    for _ in 0..20 {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port on 127.0.0.1 free for both UDP and TCP in 20 tries")
}

/// A running [`Courier::track_phases`].
pub struct Phases {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(f64, [u64; 3])>>,
}

impl Phases {
    /// When everything was spooled (sender `complete_seq`), durable in the
    /// inbox (`durable_seq`) and applied (`applied_seq`): the first sample
    /// at each mark's last value, in seconds from `t0`.
    pub async fn finish(self) -> [Option<f64>; 3] {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self.task.await.unwrap_or_default();
        let mut out = [None; 3];
        for (i, o) in out.iter_mut().enumerate() {
            let last = samples.last().map(|s| s.1[i]).unwrap_or(0);
            if last > 0 {
                *o = samples.iter().find(|s| s.1[i] >= last).map(|s| s.0);
            }
        }
        out
    }
}

/// PostgreSQL's own logical replication from `hq` to a target, through a
/// bridge from TCP to hq's Unix socket and a netem TCP relay in front of it.
pub struct Native {
    pub relay: RelayHandle,
    pub name: String,
}

impl Native {
    /// Start the relays. The subscriber dials the relay, so the data flows
    /// in its back direction: the profile's directions are swapped.
    pub async fn new(hq: &PgCluster, profile: &Profile, name: &str) -> anyhow::Result<Native> {
        let socket = hq.socket_dir().join(format!(".s.PGSQL.{}", hq.port()));
        let bridge = unix_bridge(socket).await?;
        let l = profile.link(7);
        let link = Link {
            forward: l.back,
            back: l.forward,
            seed: l.seed,
        };
        let relay = TcpRelay::start(
            "127.0.0.1:0".parse()?,
            format!("127.0.0.1:{bridge}").parse()?,
            link,
            OutageMode::Cut,
        )
        .await?;
        Ok(Native {
            relay,
            name: name.to_string(),
        })
    }

    /// `CREATE SUBSCRIPTION <name>` on `target` for hq's publication `<name>`.
    pub async fn subscribe(
        &self,
        target: &PgCluster,
        copy_data: bool,
        enabled: bool,
    ) -> anyhow::Result<()> {
        // Lets a re-enabled subscription start its worker at once (the
        // launcher otherwise waits up to 5 s between worker starts).
        target
            .execute(DB, "ALTER SYSTEM SET wal_retrieve_retry_interval = '100ms'")
            .await?;
        target.execute(DB, "SELECT pg_reload_conf()").await?;
        target
            .execute(
                DB,
                &format!(
                    "CREATE SUBSCRIPTION {n} CONNECTION 'host=127.0.0.1 port={port} user=postgres dbname={DB}' \
                     PUBLICATION {n} WITH (copy_data = {copy_data}, enabled = {enabled})",
                    n = self.name,
                    port = self.relay.local_addr().port()
                ),
            )
            .await
    }

    pub async fn enable(&self, target: &PgCluster, on: bool) -> anyhow::Result<()> {
        let verb = if on { "ENABLE" } else { "DISABLE" };
        target
            .execute(DB, &format!("ALTER SUBSCRIPTION {} {verb}", self.name))
            .await
    }

    /// Wait until hq's slot for the subscription is (in)active.
    pub async fn wait_slot_active(&self, hq: &PgCluster, active: bool) -> anyhow::Result<()> {
        let sql = format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}' AND active = {active}",
            self.name
        );
        wait_until(
            "the native slot's state",
            Duration::from_secs(60),
            || async { Ok(query_i64(hq, &sql).await? == 1) },
        )
        .await
    }

    /// Peak RSS of the walsender (on hq) and the apply worker (on target).
    pub async fn peak_rss(&self, hq: &PgCluster, target: &PgCluster) -> (Option<u64>, Option<u64>) {
        let ws = backend_pid(
            hq,
            format!(
                "SELECT pid FROM pg_stat_replication WHERE application_name = '{}' LIMIT 1",
                self.name
            ),
        )
        .await;
        let aw = backend_pid(
            target,
            format!(
                "SELECT pid FROM pg_stat_subscription WHERE subname = '{}' AND relid IS NULL",
                self.name
            ),
        )
        .await;
        (ws.and_then(peak_rss), aw.and_then(peak_rss))
    }
}

async fn backend_pid(pg: &PgCluster, sql: String) -> Option<u32> {
    let c = pg.client(DB).await.ok()?;
    let row = c.query_opt(&sql, &[]).await.ok()??;
    let pid: Option<i32> = row.get(0);
    pid.map(|p| p as u32)
}

/// A TCP listener on loopback that passes each connection on to a Unix
/// socket (the clusters listen only on Unix sockets).
async fn unix_bridge(socket: PathBuf) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let socket = socket.clone();
            tokio::spawn(async move {
                let Ok(mut unix) = UnixStream::connect(&socket).await else {
                    let _ = tcp.shutdown().await;
                    return;
                };
                let _ = tcp.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
            });
        }
    });
    Ok(port)
}
