//! Fault injection: seeded random SIGKILL schedules across every process of
//! a replication (sender, receiver, the netem relay between them, the target
//! PostgreSQL and the source PostgreSQL) during a mixed workload. Every
//! schedule ends with the target equal to the source, row for row, and each
//! source row change applied exactly once (an audit trigger on both sides).
//!
//! Schedules are seeded and replayable:
//! - `PGCOURIER_SOAK_SCHEDULES=N`: run N schedules (default 20, the CI run);
//! - `PGCOURIER_FAULT_SEED=S`: the base seed (default: from the clock); it is
//!   printed, and schedule k runs with seed S + k, also printed. To replay
//!   one failing schedule, set `PGCOURIER_FAULT_SEED` to its seed and
//!   `PGCOURIER_SOAK_SCHEDULES=1`.

use std::time::{Duration, Instant};

use anyhow::Context;
use pgcourier_tests::{bin_path, wait_until, Daemon};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

use crate::fixture::{wait_count, Options, Setup};
use crate::replication::{acct_transactions, audit_differences, ACCT_SCHEMA};

const WAIT: Duration = Duration::from_secs(180);
/// Short link timers so that a dead peer is noticed quickly.
const TIMERS: &str = "idle-timeout = \"4s\"\nkeep-alive = \"1s\"";

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

/// The processes a schedule may kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    Sender,
    Receiver,
    Relay,
    TargetPg,
    SourcePg,
}

const VICTIMS: [Victim; 5] = [
    Victim::Sender,
    Victim::Receiver,
    Victim::Relay,
    Victim::TargetPg,
    Victim::SourcePg,
];

/// One SIGKILL (or immediate stop, for PostgreSQL) and the restart after it.
#[derive(Clone, Copy, Debug)]
struct Kill {
    victim: Victim,
    /// Since the start of the workload.
    at: Duration,
    /// How long the victim stays down.
    down: Duration,
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
            kills.push(Kill {
                victim: v,
                at: Duration::from_millis(rng.gen_range(0..1500)),
                down: Duration::from_millis(rng.gen_range(0..1500)),
            });
        }
        kills.sort_by_key(|k| k.at);
        let small = rng.gen_range(60..160);
        Schedule {
            seed,
            kills,
            small,
            bulk_rows: [50, 500, 4000][rng.gen_range(0..3)],
            bulk_after: rng.gen_range(0..small),
        }
    }
}

/// The replication under test, with the netem relay as a process of its own
/// so that it can be killed too.
struct Rig {
    setup: Setup,
    relay: Daemon,
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
        setup.sender.kill9()?;
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
        setup.sender.respawn()?;
        Ok(Rig { setup, relay })
    }

    fn logs(&self) -> String {
        format!(
            "{}\n--- netem log ---\n{}\n--- source server log ---\n{}\n--- target server log ---\n{}",
            self.setup.logs(),
            self.relay.log_tail(20),
            self.setup.hq.log_tail(20),
            self.setup.branches[0].pg.log_tail(20)
        )
    }

    fn kill(&self, v: Victim) -> anyhow::Result<()> {
        match v {
            Victim::Sender => self.setup.sender.kill9().map(drop),
            Victim::Receiver => self.setup.branches[0].receiver.kill9().map(drop),
            Victim::Relay => self.relay.kill9().map(drop),
            Victim::TargetPg => tokio::task::block_in_place(|| self.setup.branches[0].pg.kill()),
            Victim::SourcePg => tokio::task::block_in_place(|| self.setup.hq.kill()),
        }
    }

    fn restart(&self, v: Victim) -> anyhow::Result<()> {
        match v {
            Victim::Sender => self.setup.sender.respawn(),
            Victim::Receiver => self.setup.branches[0].receiver.respawn(),
            Victim::Relay => self.relay.respawn(),
            Victim::TargetPg => {
                tokio::task::block_in_place(|| self.setup.branches[0].pg.start_again())
            }
            Victim::SourcePg => tokio::task::block_in_place(|| self.setup.hq.start_again()),
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

/// Run `sql` as one transaction; if the source goes away, reconnect and go
/// on with the next one (whether the cut one committed is for the source's
/// audit log to say, and the comparison uses that log).
async fn exec(setup: &Setup, client: &mut Client, sql: &str) -> anyhow::Result<()> {
    if let Err(e) = client.batch_execute(sql).await {
        if e.code().is_some() && !client.is_closed() {
            // An SQL error (not a lost connection) is a bug in the workload.
            return Err(anyhow::Error::new(e).context(format!("workload statement {sql}")));
        }
        *client = reconnect(setup).await?;
    }
    Ok(())
}

/// The mixed workload of schedule `k`: single-row inserts, updates and
/// deletes, and one multi-row transaction, on ids of its own.
async fn workload(setup: &Setup, k: u64, sch: &Schedule) -> anyhow::Result<()> {
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

async fn run_schedule(rig: &Rig, k: u64, sch: &Schedule) -> anyhow::Result<()> {
    let start = Instant::now();
    let faults = async {
        let events = sch.kills.iter().map(|kill| async move {
            tokio::time::sleep(kill.at).await;
            rig.kill(kill.victim)
                .with_context(|| format!("kill {:?}", kill.victim))?;
            tokio::time::sleep(kill.down).await;
            rig.restart(kill.victim)
                .with_context(|| format!("restart {:?}", kill.victim))
        });
        futures_util::future::try_join_all(events).await.map(drop)
    };
    let (w, f) = tokio::join!(workload(&rig.setup, k, sch), faults);
    f?;
    w?;
    rig.check_alive()?;
    // Work committed after every restart must arrive.
    let sentinel = 10_000_000 + k as i64;
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
    pgcourier_tests::assert_tables_equal(&src, &dst, &["public.acct"]).await?;
    let diff = audit_differences(&src, &dst).await?;
    anyhow::ensure!(
        diff.is_empty(),
        "row changes not applied exactly once:\n{}",
        diff.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    eprintln!(
        "faults: schedule {k} (seed {}) passed in {:.1?}",
        sch.seed,
        start.elapsed()
    );
    Ok(())
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
        "faults: {schedules} kill schedules, base seed {base} \
         (replay schedule k with PGCOURIER_FAULT_SEED=<its seed> PGCOURIER_SOAK_SCHEDULES=1)"
    );
    let rig = Rig::start().await?;
    let mut tally = std::collections::BTreeMap::<String, u32>::new();
    for k in 0..schedules {
        let sch = Schedule::draw(base.wrapping_add(k));
        eprintln!(
            "faults: schedule {k} seed {}: {} small txns, a {}-row txn after {}, kills {:?}",
            sch.seed,
            sch.small,
            sch.bulk_rows,
            sch.bulk_after,
            sch.kills
                .iter()
                .map(|k| format!(
                    "{:?}@{}ms down {}ms",
                    k.victim,
                    k.at.as_millis(),
                    k.down.as_millis()
                ))
                .collect::<Vec<_>>()
        );
        run_schedule(&rig, k, &sch).await.with_context(|| {
            format!(
                "schedule {k} failed: replay with PGCOURIER_FAULT_SEED={} PGCOURIER_SOAK_SCHEDULES=1\n{}",
                sch.seed,
                rig.logs()
            )
        })?;
        for kill in &sch.kills {
            *tally.entry(format!("{:?}", kill.victim)).or_default() += 1;
        }
    }
    eprintln!("faults: all {schedules} schedules passed; kills per process: {tally:?}");
    Ok(())
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a TCP port")
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
/// the inbox's own store API while the receiver is stopped: flipping a byte
/// of sled's log file would trip sled's own checksums first, not ours).
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
        let records = store.tree("records")?;
        let (key, value) = records
            .iter()
            .nth(4)
            .context("a 5th record in the inbox")??;
        let seq = u64::from_be_bytes(key.as_ref().try_into()?);
        let mut bad = value.to_vec();
        let at = bad.len() - 3;
        bad[at] ^= 0x20;
        records.insert(key, bad)?;
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
