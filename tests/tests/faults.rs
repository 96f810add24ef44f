//! Fault injection: seeded random fault schedules across every process and
//! link of a replication during a mixed workload. Every schedule ends with
//! the target equal to the source, row for row, and each source row change
//! applied exactly once (an audit trigger on both sides).
//!
//! The faults ([`Victim`]):
//! - SIGKILL of the sender, the receiver or the netem UDP relay process
//!   between them; `pg_ctl -m immediate` of the target or the source
//!   PostgreSQL; each restarted after a pause;
//! - `SourceLink`: the sender reaches its source through a netem TCP relay
//!   rate-limited to 4 Mbit/s toward the sender, so that a peek's rows take
//!   seconds to arrive; the relay cuts its connections (RST) while the rows
//!   of the bulk transaction flow, refuses new ones for a pause, then
//!   accepts again (item 1 of issue 12 was found this way);
//! - `TargetLink`: the receiver reaches its target through a netem TCP
//!   relay (8 Mbit/s toward the target); it is cut while apply's statements
//!   flow;
//! - `SourceRestartFast`: a clean `pg_ctl -m fast` stop and start of the
//!   source while a large backlog (a 12,000-row bulk transaction) is not yet
//!   captured, which is checked against the slot before the stop.
//!
//! Schedules are seeded and replayable:
//! - `PGCOURIER_SOAK_SCHEDULES=N`: run N schedules (default 20, the CI run);
//! - `PGCOURIER_FAULT_SEED=S`: the base seed (default: from the clock); it is
//!   printed, and schedule k runs with seed S + k, also printed. To replay
//!   one failing schedule, set `PGCOURIER_FAULT_SEED` to its seed and
//!   `PGCOURIER_SOAK_SCHEDULES=1`.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use pgcourier_netem::{Direction, Link, LinkParams, OutageMode, RelayHandle, TcpRelay};
use pgcourier_tests::{bin_path, wait_until, Daemon};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::fixture::{free_tcp_port, wait_count, Options, Setup};
use crate::replication::{acct_transactions, audit_differences, ACCT_SCHEMA};

const WAIT: Duration = Duration::from_secs(180);
/// Short link timers so that a dead peer is noticed quickly.
const TIMERS: &str = "idle-timeout = \"4s\"\nkeep-alive = \"1s\"";
/// The source link's rate toward the sender: a peek of the 4,000-row bulk
/// transaction takes about a second to arrive, the 12,000-row one several.
const SOURCE_LINK_BPS: u64 = 4_000_000;
/// The target link's rate toward the target: apply's statements trickle,
/// so a cut lands inside target transactions.
const TARGET_LINK_BPS: u64 = 8_000_000;
/// Rows of the bulk transaction when a schedule cuts the source link (so
/// that there is a transfer to cut) or restarts the source (a large
/// backlog, a few seconds of transfer).
const LINK_BULK_ROWS: u32 = 4_000;
const BACKLOG_BULK_ROWS: u32 = 12_000;
/// A link counts as carrying a transfer while at least this many bytes
/// crossed it in the last [`FLOW_WINDOW`] (idle traffic, the sender's
/// empty peeks every 50 ms, stays well below).
const FLOWING: u64 = 4 << 10;
const FLOW_WINDOW: Duration = Duration::from_millis(100);
/// How long a link cut waits for its bytes before it cuts anyway.
const CUT_PATIENCE: Duration = Duration::from_secs(5);

fn env_u64(name: &str) -> anyhow::Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            Ok(Some(v.trim().parse().with_context(|| {
                format!("{name}={v:?} is not a whole number")
            })?))
        }
        _ => Ok(None),
    }
}

/// What a schedule may break.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Victim {
    Sender,
    Receiver,
    Relay,
    TargetPg,
    SourcePg,
    /// The sender's connections to its source, cut mid-transfer.
    SourceLink,
    /// The receiver's connections to its target, cut mid-apply.
    TargetLink,
    /// The source stopped with `-m fast` and started, during a backlog.
    SourceRestartFast,
}

const VICTIMS: [Victim; 8] = [
    Victim::Sender,
    Victim::Receiver,
    Victim::Relay,
    Victim::TargetPg,
    Victim::SourcePg,
    Victim::SourceLink,
    Victim::TargetLink,
    Victim::SourceRestartFast,
];

impl Victim {
    /// Faults timed from the commit of the bulk transaction rather than
    /// from the start of the workload.
    fn after_bulk(self) -> bool {
        matches!(
            self,
            Victim::SourceLink | Victim::TargetLink | Victim::SourceRestartFast
        )
    }

    /// Two faults that stop the same server are not drawn together (one
    /// would stop a server the other is restarting).
    fn excludes(self, other: Victim) -> bool {
        matches!(
            (self, other),
            (Victim::SourcePg, Victim::SourceRestartFast)
                | (Victim::SourceRestartFast, Victim::SourcePg)
        )
    }
}

/// One fault and the recovery after it.
#[derive(Clone, Copy, Debug)]
struct Kill {
    victim: Victim,
    /// Since the start of the workload, or for [`Victim::after_bulk`]
    /// faults since the bulk transaction committed.
    at: Duration,
    /// How long the victim stays down (a cut link refuses connections).
    down: Duration,
    /// Link cuts: the bytes that must have crossed the link (toward the
    /// sender for `SourceLink`, toward the target for `TargetLink`) after
    /// `at`, with bytes still flowing, before the cut.
    after_bytes: u64,
}

impl std::fmt::Display for Kill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let from = if self.victim.after_bulk() {
            "bulk+"
        } else {
            ""
        };
        write!(f, "{:?}@{from}{}ms", self.victim, self.at.as_millis())?;
        if matches!(self.victim, Victim::SourceLink | Victim::TargetLink) {
            write!(f, " after {} KiB", self.after_bytes >> 10)?;
        }
        write!(f, " down {}ms", self.down.as_millis())
    }
}

/// What one schedule does, drawn from its seed.
#[derive(Debug)]
struct Schedule {
    seed: u64,
    kills: Vec<Kill>,
    /// Small single-statement transactions.
    small: u32,
    /// Rows of the multi-row transaction (several records when large).
    bulk_rows: u32,
    /// The multi-row transaction runs after this many small ones.
    bulk_after: u32,
}

impl Schedule {
    fn draw(seed: u64) -> Schedule {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.gen_range(1..=3);
        let mut victims = VICTIMS.to_vec();
        let mut kills = Vec::new();
        for _ in 0..n {
            let v = victims.remove(rng.gen_range(0..victims.len()));
            victims.retain(|o| !v.excludes(*o));
            let at_max = match v {
                Victim::SourceLink | Victim::TargetLink => 200,
                Victim::SourceRestartFast => 500,
                _ => 1500,
            };
            kills.push(Kill {
                victim: v,
                at: Duration::from_millis(rng.gen_range(0..at_max)),
                down: Duration::from_millis(rng.gen_range(0..1500)),
                after_bytes: match v {
                    // Up to about 0.4 s into the bulk transaction's rows.
                    Victim::SourceLink => rng.gen_range(4 << 10..192 << 10),
                    Victim::TargetLink => rng.gen_range(1 << 10..128 << 10),
                    _ => 0,
                },
            });
        }
        kills.sort_by_key(|k| (k.victim.after_bulk(), k.at));
        let small = rng.gen_range(60..160);
        let mut bulk_rows = [50, 500, 4000][rng.gen_range(0..3)];
        if kills.iter().any(|k| k.victim == Victim::SourceRestartFast) {
            bulk_rows = BACKLOG_BULK_ROWS;
        } else if kills
            .iter()
            .any(|k| matches!(k.victim, Victim::SourceLink | Victim::TargetLink))
        {
            bulk_rows = bulk_rows.max(LINK_BULK_ROWS);
        }
        Schedule {
            seed,
            kills,
            small,
            bulk_rows,
            bulk_after: rng.gen_range(0..small),
        }
    }
}

/// How a fault landed, for the log and the tally.
#[derive(Clone, Copy, Debug)]
enum Landed {
    Kill,
    /// A link cut: the bytes that crossed since `at`, and whether a
    /// transfer was under way (at least [`FLOWING`] bytes in the last
    /// [`FLOW_WINDOW`]) or the cut came after [`CUT_PATIENCE`].
    Cut {
        bytes: u64,
        flowing: bool,
    },
    /// A fast restart, with this many bytes of WAL past the slot's
    /// confirmed position (the bulk transaction not captured yet).
    Restart {
        backlog: i64,
    },
}

impl std::fmt::Display for Landed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Landed::Kill => write!(f, "killed"),
            Landed::Cut { bytes, flowing } => write!(
                f,
                "cut after {} KiB, {}",
                bytes >> 10,
                if *flowing {
                    "mid-transfer"
                } else {
                    "idle (patience ran out)"
                }
            ),
            Landed::Restart { backlog } => {
                write!(f, "restarted with {} KiB of WAL uncaptured", backlog >> 10)
            }
        }
    }
}

/// The fault tally of a run.
#[derive(Default)]
struct Tally {
    faults: BTreeMap<Victim, u32>,
    mid_transfer: BTreeMap<Victim, u32>,
    backlogs: Vec<i64>,
}

impl Tally {
    fn add(&mut self, v: Victim, landed: Landed) {
        *self.faults.entry(v).or_default() += 1;
        match landed {
            Landed::Cut { flowing: true, .. } => *self.mid_transfer.entry(v).or_default() += 1,
            Landed::Restart { backlog } => self.backlogs.push(backlog),
            _ => {}
        }
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "faults per kind: {:?}", self.faults)?;
        for v in [Victim::SourceLink, Victim::TargetLink] {
            if let Some(n) = self.faults.get(&v) {
                let mid = self.mid_transfer.get(&v).copied().unwrap_or(0);
                write!(f, "; {v:?} cuts mid-transfer: {mid} of {n}")?;
            }
        }
        if let (Some(lo), Some(hi)) = (self.backlogs.iter().min(), self.backlogs.iter().max()) {
            write!(
                f,
                "; fast source restarts with a backlog of {} to {} KiB of WAL",
                lo >> 10,
                hi >> 10
            )?;
        }
        Ok(())
    }
}

/// The replication under test: the netem UDP relay between sender and
/// receiver is a process of its own so that it can be killed too; the TCP
/// relays in front of the source and the target run in the test.
struct Rig {
    setup: Setup,
    relay: Daemon,
    source_link: RelayHandle,
    target_link: RelayHandle,
}

/// Replace the value of the `key = ...` line of a config file.
fn set_config_line(path: &Path, key: &str, value: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let prefix = format!("{key} = ");
    let mut found = false;
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with(&prefix) {
            found = true;
            out.push_str(&format!("{key} = {value:?}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    anyhow::ensure!(found, "no {key} line in {}", path.display());
    std::fs::write(path, out)?;
    Ok(())
}

/// A netem TCP relay in front of `forward`, with a rate limit per direction
/// (`None`: unlimited), that resets its connections when set down and
/// refuses new ones until it is set up again.
async fn tcp_link(
    forward: std::net::SocketAddr,
    toward_server_bps: Option<u64>,
    toward_client_bps: Option<u64>,
    seed: u64,
) -> anyhow::Result<RelayHandle> {
    let params = |rate_bps| LinkParams {
        rate_bps,
        ..LinkParams::default()
    };
    TcpRelay::start(
        "127.0.0.1:0".parse()?,
        forward,
        Link {
            forward: params(toward_server_bps),
            back: params(toward_client_bps),
            seed,
        },
        OutageMode::Cut,
    )
    .await
    .with_context(|| format!("start a netem TCP relay to {forward}"))
}

impl Rig {
    async fn start() -> anyhow::Result<Rig> {
        let setup = Setup::start(
            "faults",
            Options {
                schema: ACCT_SCHEMA,
                tables: &["public.acct"],
                sender_extra: TIMERS,
                // Small groups: more target commits for kills to land between.
                receiver_extra:
                    "idle-timeout = \"4s\"\nkeep-alive = \"1s\"\napply-group-transactions = 20",
                ..Options::default()
            },
        )
        .await?;
        setup.sender.kill9()?;
        setup.branches[0].receiver.kill9()?;
        // Put a netem relay process between the sender and the receiver.
        let receiver_cfg = std::fs::read_to_string(&setup.branches[0].config)?;
        let listen = receiver_cfg
            .lines()
            .find_map(|l| l.strip_prefix("listen = "))
            .context("receiver listen address")?
            .trim_matches('"')
            .to_owned();
        let relay_addr = format!("127.0.0.1:{}", crate::fixture::free_udp_port());
        let relay = Daemon::spawn(
            "netem",
            &bin_path("pgcourier-netem"),
            &[
                "udp",
                "--listen",
                &relay_addr,
                "--forward",
                &listen,
                "--profile",
                "clean",
                "--seed",
                "1",
            ],
            &setup.dir.path().join("netem.log"),
        )?;
        let sender_cfg = std::fs::read_to_string(&setup.sender_config)?;
        let rewired = sender_cfg.replace(
            &format!("address = \"{listen}\""),
            &format!("address = \"{relay_addr}\""),
        );
        anyhow::ensure!(
            rewired != sender_cfg,
            "could not rewire the sender to netem"
        );
        std::fs::write(&setup.sender_config, rewired)?;
        // Both PostgreSQL servers behind a netem TCP relay.
        let (source_addr, target_addr) = tokio::task::block_in_place(|| {
            anyhow::Ok((
                setup.hq.listen_on_loopback()?,
                setup.branches[0].pg.listen_on_loopback()?,
            ))
        })?;
        let source_link = tcp_link(source_addr, None, Some(SOURCE_LINK_BPS), 21).await?;
        let target_link = tcp_link(target_addr, Some(TARGET_LINK_BPS), None, 22).await?;
        let via = |relay: &RelayHandle| {
            format!(
                "host=127.0.0.1 port={} user=postgres dbname={}",
                relay.local_addr().port(),
                crate::fixture::DB
            )
        };
        set_config_line(&setup.sender_config, "source", &via(&source_link))?;
        set_config_line(&setup.branches[0].config, "target", &via(&target_link))?;
        setup.sender.respawn()?;
        setup.branches[0].receiver.respawn()?;
        Ok(Rig {
            setup,
            relay,
            source_link,
            target_link,
        })
    }

    fn logs(&self) -> String {
        let link = |r: &RelayHandle| {
            let s = r.stats();
            format!(
                "down {}, {} connections, {} cut, {} refused, {} B toward the server, {} B back",
                s.down,
                s.relay.connections,
                s.relay.connections_cut,
                s.relay.connections_refused,
                s.forward.bytes_forwarded,
                s.back.bytes_forwarded
            )
        };
        format!(
            "{}\n--- netem log ---\n{}\n--- source link: {}\n--- target link: {}\n\
             --- source server log ---\n{}\n--- target server log ---\n{}",
            self.setup.logs(),
            self.relay.log_tail(20),
            link(&self.source_link),
            link(&self.target_link),
            self.setup.hq.log_tail(20),
            self.setup.branches[0].pg.log_tail(20)
        )
    }

    /// Carry out `kill`: wait for its moment, break the victim, wait, and
    /// bring it back. `bulk` says when the bulk transaction has committed
    /// (the source's WAL position right after its commit).
    async fn fault(
        &self,
        kill: &Kill,
        mut bulk: watch::Receiver<Option<String>>,
    ) -> anyhow::Result<Landed> {
        let bulk_end = if kill.victim.after_bulk() {
            let waited = tokio::time::timeout(WAIT, bulk.wait_for(Option::is_some))
                .await
                .context("waiting for the bulk transaction to commit")?;
            let lsn = waited
                .map_err(|_| anyhow::anyhow!("the workload ended before its bulk transaction"))?
                .clone();
            lsn
        } else {
            None
        };
        tokio::time::sleep(kill.at).await;
        let landed = match kill.victim {
            Victim::SourceLink => {
                cut_when_flowing(&self.source_link, Direction::Back, kill.after_bytes).await
            }
            Victim::TargetLink => {
                cut_when_flowing(&self.target_link, Direction::Forward, kill.after_bytes).await
            }
            Victim::SourceRestartFast => {
                let end = bulk_end.unwrap_or_default();
                let backlog = self.backlog(&end).await?;
                tokio::task::block_in_place(|| self.setup.hq.stop())?;
                Landed::Restart { backlog }
            }
            v => {
                self.kill(v)?;
                Landed::Kill
            }
        };
        tokio::time::sleep(kill.down).await;
        self.restart(kill.victim)
            .with_context(|| format!("restart {:?}", kill.victim))?;
        Ok(landed)
    }

    /// Bytes of WAL past the slot's confirmed position; fails unless the
    /// bulk transaction (committed just before `bulk_end`) is still
    /// unconfirmed: the slot is confirmed to short of `bulk_end`, i.e.
    /// unless there is a backlog for a restart to land in. (The slot may
    /// pass the transaction's start before its commit: a streaming
    /// walsender's keepalives confirm what it has decoded while no
    /// transaction has been sent in full.)
    async fn backlog(&self, bulk_end: &str) -> anyhow::Result<i64> {
        let src = reconnect(&self.setup).await?;
        let row = src
            .query_one(
                "SELECT confirmed_flush_lsn::text, confirmed_flush_lsn < $1::text::pg_lsn, \
                 pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
                 FROM pg_replication_slots WHERE slot_name = 'pgcourier'",
                &[&bulk_end],
            )
            .await
            .context("reading the slot pgcourier on the source")?;
        let (confirmed, behind, bytes): (String, bool, i64) = (row.get(0), row.get(1), row.get(2));
        anyhow::ensure!(
            behind,
            "no backlog for the fast restart: the slot pgcourier is confirmed up to {confirmed}, \
             past the commit of the bulk transaction (before {bulk_end}): the schedule must \
             restart the source sooner or make the bulk transaction larger"
        );
        Ok(bytes)
    }

    fn kill(&self, v: Victim) -> anyhow::Result<()> {
        match v {
            Victim::Sender => self.setup.sender.kill9().map(drop),
            Victim::Receiver => self.setup.branches[0].receiver.kill9().map(drop),
            Victim::Relay => self.relay.kill9().map(drop),
            Victim::TargetPg => tokio::task::block_in_place(|| self.setup.branches[0].pg.kill()),
            Victim::SourcePg => tokio::task::block_in_place(|| self.setup.hq.kill()),
            Victim::SourceLink | Victim::TargetLink | Victim::SourceRestartFast => {
                unreachable!("{v:?} is broken by Rig::fault")
            }
        }
        .with_context(|| format!("kill {v:?}"))
    }

    fn restart(&self, v: Victim) -> anyhow::Result<()> {
        match v {
            Victim::Sender => self.setup.sender.respawn(),
            Victim::Receiver => self.setup.branches[0].receiver.respawn(),
            Victim::Relay => self.relay.respawn(),
            Victim::TargetPg => {
                tokio::task::block_in_place(|| self.setup.branches[0].pg.start_again())
            }
            Victim::SourcePg | Victim::SourceRestartFast => {
                tokio::task::block_in_place(|| self.setup.hq.start_again())
            }
            Victim::SourceLink => {
                self.source_link.set_down(false);
                Ok(())
            }
            Victim::TargetLink => {
                self.target_link.set_down(false);
                Ok(())
            }
        }
    }

    /// Every process is up (a daemon that exited by itself is a failure).
    fn check_alive(&self) -> anyhow::Result<()> {
        for d in [
            &self.setup.sender,
            &self.setup.branches[0].receiver,
            &self.relay,
        ] {
            if let Some(s) = d.try_status() {
                anyhow::bail!("{} exited by itself ({s})", d.name());
            }
        }
        Ok(())
    }
}

/// Bytes `link` has carried in `dir` so far.
fn carried(link: &RelayHandle, dir: Direction) -> u64 {
    let s = link.stats();
    match dir {
        Direction::Forward => s.forward.bytes_forwarded,
        Direction::Back => s.back.bytes_forwarded,
    }
}

/// Cut `link` (it resets every connection and refuses new ones until it is
/// set up again) once `after` bytes have crossed it in `dir` and bytes are
/// still flowing, or after [`CUT_PATIENCE`] whatever flows.
async fn cut_when_flowing(link: &RelayHandle, dir: Direction, after: u64) -> Landed {
    let start = Instant::now();
    let base = carried(link, dir);
    let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
    // Bounded by CUT_PATIENCE (a sample every 5 ms: about 1,000 rounds).
    loop {
        let now = Instant::now();
        let bytes = carried(link, dir);
        samples.push_back((now, bytes));
        while samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > FLOW_WINDOW)
        {
            samples.pop_front();
        }
        let recent = bytes - samples.front().map_or(bytes, |s| s.1);
        let flowing = recent >= FLOWING;
        if (bytes - base >= after && flowing) || now.duration_since(start) >= CUT_PATIENCE {
            link.set_down(true);
            return Landed::Cut {
                bytes: bytes - base,
                flowing,
            };
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A source connection that comes back after the source restarts.
async fn reconnect(setup: &Setup) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match setup.source().await {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.context("the source did not come back within 60 s")),
        }
    }
}

/// Whether `e` says the connection is gone (rather than that the statement
/// is wrong): closed, or ended by the server (a shutdown: SQLSTATE class 57,
/// or a connection exception: class 08).
fn connection_lost(client: &Client, e: &tokio_postgres::Error) -> bool {
    client.is_closed()
        || e.code().is_none_or(|c| {
            let code = c.code();
            code.starts_with("57") || code.starts_with("08")
        })
}

/// Run `sql` as one transaction; if the source goes away, reconnect and go
/// on with the next one (whether the cut one committed is for the source's
/// audit log to say, and the comparison uses that log).
async fn exec(setup: &Setup, client: &mut Client, sql: &str) -> anyhow::Result<()> {
    if let Err(e) = client.batch_execute(sql).await {
        if !connection_lost(client, &e) {
            // An SQL error (not a lost connection) is a bug in the workload.
            return Err(anyhow::Error::new(e).context(format!("workload statement {sql}")));
        }
        *client = reconnect(setup).await?;
    }
    Ok(())
}

/// The source's WAL insert position, as text.
async fn wal_position(setup: &Setup, client: &mut Client) -> anyhow::Result<String> {
    let q = "SELECT pg_current_wal_lsn()::text";
    match client.query_one(q, &[]).await {
        Ok(row) => Ok(row.get(0)),
        Err(e) if connection_lost(client, &e) => {
            *client = reconnect(setup).await?;
            Ok(client.query_one(q, &[]).await?.get(0))
        }
        Err(e) => Err(e.into()),
    }
}

/// The mixed workload of schedule `k`: single-row inserts, updates and
/// deletes, and one multi-row transaction, on ids of its own. Once the
/// multi-row transaction is done, `bulk` gets the WAL position right after
/// its commit.
async fn workload(
    setup: &Setup,
    k: u64,
    sch: &Schedule,
    bulk: watch::Sender<Option<String>>,
) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(sch.seed ^ 0x5eed);
    let mut client = reconnect(setup).await?;
    let base = (k as i64 + 1) * 100_000;
    let mut ids: Vec<i64> = Vec::new();
    let mut next = base;
    for i in 0..sch.small {
        if i == sch.bulk_after {
            let (lo, hi) = (base + 50_000, base + 50_000 + i64::from(sch.bulk_rows) - 1);
            let sql = format!(
                "BEGIN; INSERT INTO acct SELECT g, g, 'bulk' FROM generate_series({lo}, {hi}) g; \
                 UPDATE acct SET bal = bal + 1, note = 'bulk+' WHERE id BETWEEN {lo} AND {hi} AND id % 3 = 0; \
                 DELETE FROM acct WHERE id BETWEEN {lo} AND {hi} AND id % 7 = 0; COMMIT"
            );
            exec(setup, &mut client, &sql).await?;
            let after = wal_position(setup, &mut client).await?;
            bulk.send_replace(Some(after));
        }
        let sql = match rng.gen_range(0..10) {
            0..=4 => {
                next += 1;
                ids.push(next);
                format!("INSERT INTO acct VALUES ({next}, {i}, 'i{i}')")
            }
            5..=7 if !ids.is_empty() => {
                let id = ids[rng.gen_range(0..ids.len())];
                format!("UPDATE acct SET bal = bal + {i}, note = 'u{i}' WHERE id = {id}")
            }
            _ if !ids.is_empty() => {
                let id = ids.swap_remove(rng.gen_range(0..ids.len()));
                format!("DELETE FROM acct WHERE id = {id}")
            }
            _ => continue,
        };
        exec(setup, &mut client, &sql).await?;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..12))).await;
    }
    Ok(())
}

/// Digests of what a schedule checks, computed by each server (the tables
/// grow with every schedule; reading them whole into the test each time
/// made the checks most of a long run): every row of `acct`, and the audit
/// log as a multiset (each distinct change with its count, as
/// [`audit_differences`] compares it).
const DIGESTS: &str = "SELECT \
    (SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text COLLATE \"C\"), '')) FROM acct t), \
    (SELECT md5(coalesce(string_agg(x, E'\\n' ORDER BY x COLLATE \"C\"), '')) FROM \
       (SELECT tbl || ' ' || op || ' ' || coalesce(r, 'NULL') || ' x' || count(*) AS x \
        FROM audit.log GROUP BY tbl, op, r) g)";

/// The target equals the source row for row, and every source row change
/// was applied exactly once. Compares digests; on a difference, compares
/// the rows themselves to say what differs.
async fn check_equal(src: &Client, dst: &Client) -> anyhow::Result<()> {
    async fn digests(c: &Client) -> anyhow::Result<(String, String)> {
        let row = c.query_one(DIGESTS, &[]).await?;
        Ok((row.get(0), row.get(1)))
    }
    let (s, d) = (digests(src).await?, digests(dst).await?);
    if s.0 != d.0 {
        pgcourier_tests::assert_tables_equal(src, dst, &["public.acct"]).await?;
        anyhow::bail!("the digests of acct differ, but not its rows as the test reads them");
    }
    if s.1 != d.1 {
        let diff = audit_differences(src, dst).await?;
        anyhow::ensure!(
            !diff.is_empty(),
            "the digests of the audit logs differ, but not the logs as the test reads them"
        );
        anyhow::bail!(
            "row changes not applied exactly once:\n{}",
            diff.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

/// Run schedule `k`; returns how each of its faults landed.
async fn run_schedule(rig: &Rig, k: u64, sch: &Schedule) -> anyhow::Result<Vec<Landed>> {
    let start = Instant::now();
    let carried_before = (
        carried(&rig.source_link, Direction::Back),
        carried(&rig.target_link, Direction::Forward),
    );
    // A source that crashes (SourcePg) comes back with its slot rewound,
    // at worst to where the last checkpoint saved it, and capture peeks
    // everything after that again through the 4 Mbit/s link (the spool
    // skips what it holds): a checkpoint here keeps that to this
    // schedule's work.
    reconnect(&rig.setup)
        .await?
        .batch_execute("CHECKPOINT")
        .await
        .context("CHECKPOINT on the source")?;
    let (bulk, bulk_rx) = watch::channel(None);
    let faults = async {
        let events = sch.kills.iter().map(|kill| {
            let bulk = bulk_rx.clone();
            async move {
                rig.fault(kill, bulk)
                    .await
                    .with_context(|| format!("fault {kill}"))
            }
        });
        futures_util::future::try_join_all(events).await
    };
    let (w, f) = tokio::join!(workload(&rig.setup, k, sch, bulk), faults);
    w?;
    let landed = f?;
    let faults_done = start.elapsed();
    rig.check_alive()?;
    // Work committed after every restart must arrive.
    // Negative: workload ids are (k + 1) * 100,000 and up, which reached
    // 10,000,000 + k (the sentinels before) at schedule 99.
    let sentinel = -1 - k as i64;
    let mut src = reconnect(&rig.setup).await?;
    exec(
        &rig.setup,
        &mut src,
        &format!("INSERT INTO acct VALUES ({sentinel}, 0, 'sentinel')"),
    )
    .await?;
    let dst = rig.setup.target(0).await?;
    wait_count(
        &dst,
        &format!("SELECT count(*) FROM acct WHERE id = {sentinel}"),
        1,
        WAIT,
    )
    .await?;
    let caught_up = start.elapsed();
    check_equal(&src, &dst).await?;
    eprintln!(
        "faults: schedule {k} (seed {}) passed in {:.1?} (workload {:.1?}, caught up {:.1?}; \
         the links carried {} KiB from the source, {} KiB to the target): {}",
        sch.seed,
        start.elapsed(),
        faults_done,
        caught_up,
        (carried(&rig.source_link, Direction::Back) - carried_before.0) >> 10,
        (carried(&rig.target_link, Direction::Forward) - carried_before.1) >> 10,
        sch.kills
            .iter()
            .zip(&landed)
            .map(|(kill, l)| format!("{:?} {l}", kill.victim))
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok(landed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kill_schedules_end_identical_with_every_change_applied_once() -> anyhow::Result<()>
{
    let schedules = env_u64("PGCOURIER_SOAK_SCHEDULES")?.unwrap_or(20);
    let base = match env_u64("PGCOURIER_FAULT_SEED")? {
        Some(s) => s,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
    };
    eprintln!(
        "faults: {schedules} fault schedules, base seed {base} \
         (replay schedule k with PGCOURIER_FAULT_SEED=<its seed> PGCOURIER_SOAK_SCHEDULES=1)"
    );
    let started = Instant::now();
    let rig = Rig::start().await?;
    let mut tally = Tally::default();
    for k in 0..schedules {
        let sch = Schedule::draw(base.wrapping_add(k));
        eprintln!(
            "faults: schedule {k} seed {}: {} small txns, a {}-row txn after {}, faults [{}]",
            sch.seed,
            sch.small,
            sch.bulk_rows,
            sch.bulk_after,
            sch.kills
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let landed = run_schedule(&rig, k, &sch).await.with_context(|| {
            format!(
                "schedule {k} failed: replay with PGCOURIER_FAULT_SEED={} PGCOURIER_SOAK_SCHEDULES=1\n{}",
                sch.seed,
                rig.logs()
            )
        })?;
        for (kill, l) in sch.kills.iter().zip(landed) {
            tally.add(kill.victim, l);
        }
    }
    eprintln!(
        "faults: all {schedules} schedules passed in {:.1?}; {tally}",
        started.elapsed()
    );
    Ok(())
}

async fn receiver_status(port: u16) -> anyhow::Result<serde_json::Value> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let (_, body) = tokio::task::spawn_blocking(move || {
        pgcourier_common::ops::admin::request(addr, "GET", "/status")
    })
    .await??;
    Ok(serde_json::from_str(&body)?)
}

/// A byte of a record flipped on disk in the receiver's inbox (written with
/// the inbox's own segment log while the receiver is stopped: flipping a
/// byte of sled's log file would trip sled's own checksums first, not ours).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_corrupted_in_the_inbox_is_never_applied_and_is_fetched_again(
) -> anyhow::Result<()> {
    let admin = free_tcp_port();
    let receiver_extra = format!("admin = \"127.0.0.1:{admin}\"");
    let mut setup = Setup::start(
        "corrupt",
        Options {
            schema: ACCT_SCHEMA,
            tables: &["public.acct"],
            receiver_extra: Box::leak(receiver_extra.into_boxed_str()),
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    let dst = setup.target(0).await?;
    acct_transactions(&src, 1, 20).await?;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    // Hold records in the inbox: apply pauses on a missing table.
    dst.batch_execute("ALTER TABLE acct RENAME TO acct_away")
        .await?;
    acct_transactions(&src, 21, 30).await?;
    // (Deletes of rows already gone commit nothing PostgreSQL 15 ships.)
    wait_until("15 records to wait in the inbox", WAIT, || async {
        let st = receiver_status(admin).await?;
        let durable = st["durable_seq"].as_u64().unwrap_or(0);
        let applied = st["applied_seq"].as_u64().unwrap_or(0);
        Ok(durable >= applied + 15 && st["apply_state"] == "paused")
    })
    .await
    .with_context(|| setup.logs())?;
    setup.branches[0].receiver.terminate()?;
    // Flip one byte of the 5th waiting record.
    let inbox_dir = setup.dir.path().join("branch0-inbox");
    let victim = {
        let store = pgcourier_common::store::durable::Store::open(&inbox_dir, 1 << 20)?;
        let records =
            pgcourier_common::store::segments::SegmentLog::open(&store, "segments", None, None)?;
        let seq = records.first_seq()?.context("a record in the inbox")? + 4;
        let mut bad = records.get(seq)?.context("a 5th record in the inbox")?;
        let at = bad.len() - 3;
        bad[at] ^= 0x20;
        records.put_back(seq, &bad)?;
        store.sync()?;
        seq
    };
    eprintln!("corrupted inbox record {victim}");
    dst.batch_execute("ALTER TABLE acct_away RENAME TO acct")
        .await?;
    setup.restart_receiver(0)?;
    wait_until(
        "the receiver to report the corrupt record",
        WAIT,
        || async {
            Ok(setup.branches[0]
                .receiver
                .log()
                .contains("failed its checksum"))
        },
    )
    .await
    .with_context(|| setup.logs())?;
    let line = setup.branches[0]
        .receiver
        .log()
        .lines()
        .find(|l| l.contains("failed its checksum"))
        .unwrap_or_default()
        .to_owned();
    eprintln!("{line}");
    anyhow::ensure!(
        line.contains(&format!("seq={victim}")) && line.contains(&format!("record {victim}")),
        "the report should name record {victim}: {line}"
    );
    // Work committed afterwards arrives, and everything, the corrupted
    // transaction included, is applied exactly once.
    acct_transactions(&src, 100, 5).await?;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    crate::replication::assert_applied_exactly_once(&setup, 0).await?;
    let st = receiver_status(admin).await?;
    anyhow::ensure!(
        st["apply_state"] == "applying",
        "apply should be healthy: {st}"
    );
    Ok(())
}

async fn admin_json(port: u16, path: &'static str) -> anyhow::Result<(serde_json::Value, String)> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let (_, body) = tokio::task::spawn_blocking(move || {
        pgcourier_common::ops::admin::request(addr, "GET", path)
    })
    .await??;
    Ok((serde_json::from_str(&body).unwrap_or_default(), body))
}

/// The configured size limits stand in for a full disk: capture pauses at
/// `spool-max-bytes` (the slot keeps WAL on the source), the receiver holds
/// batches back at `inbox-max-bytes` (the sender keeps them), both say so in
/// the log, status and metrics, and everything resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_and_inbox_pause_with_an_alert_lose_nothing_and_resume_by_themselves(
) -> anyhow::Result<()> {
    let (sa, ra) = (free_tcp_port(), free_tcp_port());
    let sender_extra = format!("admin = \"127.0.0.1:{sa}\"\nspool-max-bytes = \"64KiB\"");
    let receiver_extra = format!("admin = \"127.0.0.1:{ra}\"\ninbox-max-bytes = \"64KiB\"");
    let setup = Setup::start(
        "diskfull",
        Options {
            schema: ACCT_SCHEMA,
            tables: &["public.acct"],
            sender_extra: Box::leak(sender_extra.into_boxed_str()),
            receiver_extra: Box::leak(receiver_extra.into_boxed_str()),
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    let dst = setup.target(0).await?;
    acct_transactions(&src, 1, 10).await?;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    // Apply pauses (a missing table), so the inbox fills, then the spool.
    dst.batch_execute("ALTER TABLE acct RENAME TO acct_away")
        .await?;
    acct_transactions(&src, 11, 3000).await?;
    wait_until("the inbox and then the spool to be full", WAIT, || async {
        let (r, _) = admin_json(ra, "/status").await?;
        let (s, _) = admin_json(sa, "/status").await?;
        Ok(r["inbox_full"] == true && s["spool_full"] == true)
    })
    .await
    .with_context(|| setup.logs())?;
    let (r, _) = admin_json(ra, "/status").await?;
    let (s, _) = admin_json(sa, "/status").await?;
    eprintln!(
        "full: inbox {} bytes, spool {} bytes, slot retains {} bytes of WAL; capture error: {}",
        r["inbox_bytes"], s["spool_bytes"], s["slot"]["retained_wal_bytes"], s["capture_error"]
    );
    let inbox_bytes = r["inbox_bytes"].as_u64().unwrap_or(u64::MAX);
    anyhow::ensure!(
        inbox_bytes <= (64 << 10) + (256 << 10),
        "the inbox went past its limit by more than a batch: {inbox_bytes}"
    );
    anyhow::ensure!(
        s["capture_error"]
            .as_str()
            .unwrap_or("")
            .contains("spool-max-bytes"),
        "the sender's status should say why capture is paused: {s}"
    );
    let (_, metrics) = admin_json(sa, "/metrics").await?;
    anyhow::ensure!(
        metrics.contains("pgcourier_sender_spool_full 1"),
        "sender metrics: {metrics}"
    );
    let (_, metrics) = admin_json(ra, "/metrics").await?;
    anyhow::ensure!(
        metrics.contains("pgcourier_receiver_inbox_full 1"),
        "receiver metrics: {metrics}"
    );
    anyhow::ensure!(
        setup.sender.log().contains("at spool-max-bytes")
            && setup.branches[0]
                .receiver
                .log()
                .contains("at inbox-max-bytes"),
        "both daemons should log the alert:\n{}",
        setup.logs()
    );
    // What the source pays meanwhile: the slot keeps WAL.
    let retained = |s: &serde_json::Value| s["slot"]["retained_wal_bytes"].as_i64().unwrap_or(0);
    let before = retained(&s);
    acct_transactions(&src, 5000, 500).await?;
    wait_until(
        "the slot to keep more WAL while capture is paused",
        WAIT,
        || async {
            let (s, _) = admin_json(sa, "/status").await?;
            Ok(retained(&s) > before && s["spool_full"] == true)
        },
    )
    .await
    .with_context(|| setup.logs())?;
    // Space returns: everything resumes by itself, nothing lost or doubled.
    dst.batch_execute("ALTER TABLE acct_away RENAME TO acct")
        .await?;
    acct_transactions(&src, 9000, 5).await?;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    crate::replication::assert_applied_exactly_once(&setup, 0).await?;
    wait_until("both alerts to clear", WAIT, || async {
        let (r, _) = admin_json(ra, "/status").await?;
        let (s, _) = admin_json(sa, "/status").await?;
        Ok(r["inbox_full"] == false && s["spool_full"] == false && s["capture_error"].is_null())
    })
    .await
    .with_context(|| setup.logs())
}

/// The draw (no PostgreSQL): every kind of fault is drawn, faults on one
/// server never together, and the schedules that cut a link or restart the
/// source get the bulk transaction that gives them something to land in.
#[test]
fn schedules_draw_every_fault_kind_with_a_bulk_transaction_to_land_in() {
    let mut seen = BTreeMap::<Victim, u32>::new();
    for seed in 0..2_000 {
        let sch = Schedule::draw(seed);
        assert!((1..=3).contains(&sch.kills.len()), "{sch:?}");
        for (i, a) in sch.kills.iter().enumerate() {
            *seen.entry(a.victim).or_default() += 1;
            for b in &sch.kills[i + 1..] {
                assert!(
                    a.victim != b.victim && !a.victim.excludes(b.victim),
                    "seed {seed}: {a} with {b}"
                );
            }
            match a.victim {
                Victim::SourceRestartFast => assert_eq!(sch.bulk_rows, BACKLOG_BULK_ROWS),
                Victim::SourceLink | Victim::TargetLink => {
                    assert!(sch.bulk_rows >= LINK_BULK_ROWS, "seed {seed}: {sch:?}");
                    assert!(a.after_bytes > 0);
                }
                _ => {}
            }
        }
        assert!(sch.bulk_after < sch.small);
    }
    assert_eq!(seen.len(), VICTIMS.len(), "kinds drawn: {seen:?}");
    assert!(
        !Victim::SourcePg.excludes(Victim::SourceLink)
            && Victim::SourcePg.excludes(Victim::SourceRestartFast)
            && Victim::SourceRestartFast.excludes(Victim::SourcePg)
    );
}
