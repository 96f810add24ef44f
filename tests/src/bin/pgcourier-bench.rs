//! Benchmarks pgcourier side by side with PostgreSQL's own logical
//! replication, on throwaway clusters on this machine, in the same run.
//!
//! `pgcourier-bench [--transactions N] [--workload insert|update|both]`
//!
//! Backlog catch-up: N single-row transactions are queued on the source
//! while both replications are stopped (pgcourier's sender and receiver not
//! running; the native subscription disabled), then each drains in turn,
//! alone on the machine. Figures: applied transactions per second, and
//! bytes on the wire per transaction (pgcourier: UDP payload both ways,
//! from the sender's shipping totals; PostgreSQL: TCP bytes both ways through
//! a counting relay in front of the source).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgcourier_tests::{bin_path, wait_until, workdir, Daemon, PgCluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

const DB: &str = "postgres";
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1800);

const SCHEMA: &str = "CREATE TABLE bench (id bigint PRIMARY KEY, v bigint NOT NULL, filler text);";
const LOADERS: &str = "
CREATE PROCEDURE load_inserts(a bigint, n bigint) LANGUAGE plpgsql AS $$
BEGIN FOR i IN a..a + n - 1 LOOP INSERT INTO bench VALUES (i, i, repeat('x', 84)); COMMIT; END LOOP; END $$;
CREATE PROCEDURE load_updates(n bigint, rows bigint) LANGUAGE plpgsql AS $$
BEGIN FOR i IN 1..n LOOP UPDATE bench SET v = v + 1 WHERE id = 1 + (i % rows); COMMIT; END LOOP; END $$;";

struct Args {
    transactions: i64,
    workloads: Vec<&'static str>,
    /// netem profile for both systems' links (None: loopback, no emulation).
    profile: Option<String>,
    /// A link outage of this many seconds a third into each drain.
    outage: Option<u64>,
    /// QUIC congestion controller for pgcourier (cubic, bbr, newreno).
    congestion: String,
    /// Measure pgcourier only (PostgreSQL's own takes minutes on slow links).
    skip_native: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        transactions: 100_000,
        workloads: vec!["insert"],
        profile: None,
        outage: None,
        congestion: "cubic".into(),
        skip_native: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--transactions" => {
                args.transactions = it
                    .next()
                    .context("--transactions needs a number")?
                    .parse()?
            }
            "--workload" => {
                args.workloads = match it.next().as_deref() {
                    Some("insert") => vec!["insert"],
                    Some("update") => vec!["update"],
                    Some("both") => vec!["insert", "update"],
                    other => bail!("--workload insert|update|both, not {other:?}"),
                }
            }
            "--profile" => {
                let name = it.next().context("--profile needs a netem profile name")?;
                pgcourier_netem::Profile::by_name(&name).with_context(|| {
                    format!(
                        "no netem profile {name:?}: {:?}",
                        pgcourier_netem::Profile::names()
                    )
                })?;
                args.profile = Some(name);
            }
            "--skip-native" => args.skip_native = true,
            "--congestion" => {
                args.congestion = it.next().context("--congestion cubic|bbr|newreno")?
            }
            "--outage" => args.outage = Some(it.next().context("--outage needs seconds")?.parse()?),
            "-h" | "--help" => {
                println!("pgcourier-bench [--transactions N] [--workload insert|update|both] [--profile dsl|3g|satellite|...] [--outage SECONDS] [--congestion cubic|bbr|newreno] [--skip-native]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

/// A TCP relay in front of a Unix socket that counts bytes both ways.
async fn counting_relay(socket: PathBuf, counter: Arc<AtomicU64>) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let socket = socket.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(unix) = UnixStream::connect(&socket).await else {
                    return;
                };
                let (mut tr, mut tw) = tcp.into_split();
                let (mut ur, mut uw) = unix.into_split();
                let c1 = counter.clone();
                let up = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = tr.read(&mut buf).await {
                        if n == 0 || uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        c1.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = uw.shutdown().await;
                };
                let down = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = ur.read(&mut buf).await {
                        if n == 0 || tw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = tw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    Ok(port)
}

async fn count(pg: &PgCluster, sql: &str) -> anyhow::Result<i64> {
    Ok(pg.client(DB).await?.query_one(sql, &[]).await?.get(0))
}

struct Figure {
    seconds: f64,
    bytes: u64,
}

async fn receiver_status(admin: std::net::SocketAddr) -> anyhow::Result<serde_json::Value> {
    let (code, body) = tokio::task::spawn_blocking(move || {
        pgcourier_common::admin::request(admin, "GET", "/status")
    })
    .await??;
    anyhow::ensure!(code == 200, "receiver status answered {code}");
    Ok(serde_json::from_str(&body)?)
}

fn shipping_totals(log: &str, field: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains("shipping totals"))?;
    let start = line.find(&format!(" {field}"))? + field.len() + 1;
    let digits: String = line[start..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let n = args.transactions;
    println!(
        "pgcourier-bench: backlog of {n} single-row transactions; link: {}; outage: {}; machine: {} cores",
        args.profile.as_deref().unwrap_or("loopback"),
        args.outage.map(|s| format!("{s} s a third into each drain")).unwrap_or_else(|| "none".into()),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let mut rows = Vec::new();
    for workload in &args.workloads {
        let (ours, theirs) = backlog(workload, n, &args)
            .await
            .with_context(|| format!("{workload} backlog"))?;
        rows.push((workload.to_string(), ours, theirs));
    }
    println!();
    println!(
        "{:<16} {:>12} {:>12} {:>8}   {:>14} {:>14} {:>8}",
        "backlog", "pgcourier", "postgres", "ratio", "pgcourier", "postgres", "ratio"
    );
    println!(
        "{:<16} {:>12} {:>12} {:>8}   {:>14} {:>14} {:>8}",
        "", "txn/s", "txn/s", "", "bytes/txn", "bytes/txn", ""
    );
    for (w, ours, theirs) in &rows {
        let r1 = n as f64 / ours.seconds;
        let r2 = n as f64 / theirs.seconds;
        let b1 = ours.bytes as f64 / n as f64;
        let b2 = theirs.bytes as f64 / n as f64;
        println!(
            "{:<16} {:>12.0} {:>12.0} {:>7.2}x   {:>14.1} {:>14.1} {:>7.2}x",
            format!("{w} x{n}"),
            r1,
            r2,
            r1 / r2,
            b1,
            b2,
            b1 / b2
        );
    }
    Ok(())
}

/// Poll `count_sql` until it reaches `expected`; a third of the way, cut the
/// link for `outage` (if any) and measure from link-up until `progressed`
/// says something that crossed the link after link-up was applied.
async fn drain<F, Fut>(
    pg: &PgCluster,
    count_sql: &str,
    expected: i64,
    base: i64,
    outage: Option<(Duration, &pgcourier_netem::RelayHandle)>,
    mut progressed: F,
) -> anyhow::Result<Option<f64>>
where
    F: FnMut(Instant) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut cut_done = false;
    let mut link_up: Option<Instant> = None;
    let mut first_after: Option<f64> = None;
    loop {
        let c = count(pg, count_sql).await?;
        if c >= expected {
            return Ok(first_after);
        }
        if let Some((len, relay)) = outage {
            if !cut_done && c >= base + (expected - base) / 3 {
                cut_done = true;
                relay.set_down(true);
                tokio::time::sleep(len).await;
                relay.set_down(false);
                link_up = Some(Instant::now());
            }
        }
        if let (Some(up), None) = (link_up, first_after) {
            if progressed(up).await? {
                first_after = Some(up.elapsed().as_secs_f64());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "drain did not finish within {DRAIN_TIMEOUT:?} ({c} of {expected})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn backlog(workload: &str, n: i64, args: &Args) -> anyhow::Result<(Figure, Figure)> {
    let profile = args
        .profile
        .as_deref()
        .map(|p| pgcourier_netem::Profile::by_name(p).expect("checked in parse_args"));
    let outage = args.outage.map(Duration::from_secs);
    let dir = workdir("bench");
    let (hq, ours, native) = tokio::task::spawn_blocking(|| -> anyhow::Result<_> {
        let a = std::thread::spawn(|| PgCluster::start("hq"));
        let b = std::thread::spawn(|| PgCluster::start("ours"));
        let c = std::thread::spawn(|| PgCluster::start("native"));
        Ok((
            a.join().expect("thread")?,
            b.join().expect("thread")?,
            c.join().expect("thread")?,
        ))
    })
    .await??;
    for pg in [&hq, &ours, &native] {
        pg.execute(DB, SCHEMA).await?;
    }
    hq.execute(DB, LOADERS).await?;
    let rows = 10_000.min(n);
    if workload == "update" {
        // The rows to update exist everywhere before replication starts.
        for pg in [&hq, &ours, &native] {
            pg.execute(DB, &format!("INSERT INTO bench SELECT g, 0, repeat('x', 84) FROM generate_series(1, {rows}) g")).await?;
        }
    }

    // PostgreSQL's own: publication, subscription through the relay, then disabled.
    let relay_bytes = Arc::new(AtomicU64::new(0));
    let socket = hq.socket_dir().join(format!(".s.PGSQL.{}", hq.port()));
    let mut relay_port = counting_relay(socket, relay_bytes.clone()).await?;
    // Across an emulated link, PostgreSQL's own goes through netem's TCP
    // relay; the subscriber dials it, so the data flows in its back
    // direction: swap the profile's directions.
    let native_link = match &profile {
        Some(p) => {
            let l = p.link(7);
            let link = pgcourier_netem::Link {
                forward: l.back,
                back: l.forward,
                seed: l.seed,
            };
            let relay = pgcourier_netem::TcpRelay::start(
                "127.0.0.1:0".parse()?,
                format!("127.0.0.1:{relay_port}").parse()?,
                link,
                pgcourier_netem::OutageMode::Cut,
            )
            .await?;
            relay_port = relay.local_addr().port();
            Some(relay)
        }
        None => None,
    };
    hq.execute(DB, "CREATE PUBLICATION native FOR TABLE bench")
        .await?;
    native
        .execute(DB, &format!("CREATE SUBSCRIPTION native CONNECTION 'host=127.0.0.1 port={relay_port} user=postgres dbname={DB}' PUBLICATION native WITH (copy_data = false)"))
        .await?;
    native
        .execute(DB, "ALTER SUBSCRIPTION native DISABLE")
        .await?;
    wait_until("the native slot to be released", Duration::from_secs(60), || async {
        Ok(count(&hq, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'native' AND NOT active").await? == 1)
    })
    .await?;

    // pgcourier: the sender creates its slot, then both daemons stay down.
    let sender_fp = pgcourier_common::tls::keygen(
        &dir.path().join("s.crt"),
        &dir.path().join("s.key"),
        "sender",
    )?
    .to_string();
    let receiver_fp = pgcourier_common::tls::keygen(
        &dir.path().join("r.crt"),
        &dir.path().join("r.key"),
        "receiver",
    )?
    .to_string();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let (ours_link, address) = match &profile {
        Some(p) => {
            let relay = pgcourier_netem::UdpRelay::start(
                "127.0.0.1:0".parse()?,
                format!("127.0.0.1:{port}").parse()?,
                p.link(5),
            )
            .await?;
            let addr = relay.local_addr();
            (Some(relay), addr)
        }
        None => (None, format!("127.0.0.1:{port}").parse()?),
    };
    // Short link timers so an outage is noticed as it would be on a real link
    // after the idle timeout; the initial RTT near the profile's.
    let timers = match &profile {
        Some(p) => format!(
            "idle-timeout = \"4s\"\nkeep-alive = \"1s\"\nmax-backoff = \"2s\"\ninitial-rtt = \"{}ms\"\ncongestion = \"{}\"\n",
            (p.forward.delay + p.back.delay).as_millis().max(1),
            args.congestion
        ),
        None => String::new(),
    };
    let sender_cfg = dir.path().join("sender.toml");
    std::fs::write(
        &sender_cfg,
        format!(
            "source = \"{}\"\nspool-dir = \"spool\"\ncert = \"s.crt\"\nkey = \"s.key\"\ntables = [\"public.bench\"]\ncapture-batch-changes = 100000\n{timers}\
             [[receiver]]\nname = \"branch\"\nfingerprint = \"{receiver_fp}\"\naddress = \"{address}\"\n",
            hq.conninfo(DB)
        ),
    )?;
    let receiver_cfg = dir.path().join("receiver.toml");
    std::fs::write(
        &receiver_cfg,
        format!(
            "target = \"{}\"\ninbox-dir = \"inbox\"\ncert = \"r.crt\"\nkey = \"r.key\"\nlisten = \"127.0.0.1:{port}\"\nsender-fingerprints = [\"{sender_fp}\"]\nadmin = \"{admin}\"\n{timers}",
            ours.conninfo(DB)
        ),
    )?;
    let sender_log = dir.path().join("sender.log");
    let start_sender = || {
        Daemon::spawn(
            "sender",
            &bin_path("pgcourier-sender"),
            &["run", "--config", sender_cfg.to_str().expect("utf-8")],
            &sender_log,
        )
    };
    let sender = start_sender()?;
    wait_until("the pgcourier slot", Duration::from_secs(60), || async {
        Ok(count(
            &hq,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgcourier'",
        )
        .await?
            == 1)
    })
    .await?;
    sender.terminate()?;

    println!("[{workload}] queueing {n} single-row transactions on the source...");
    let t = Instant::now();
    match workload {
        "insert" => {
            hq.execute(DB, &format!("CALL load_inserts(1000001, {n})"))
                .await?
        }
        _ => {
            hq.execute(DB, &format!("CALL load_updates({n}, {rows})"))
                .await?
        }
    }
    println!("[{workload}] queued in {:.1}s", t.elapsed().as_secs_f64());
    let expect_sql = match workload {
        "insert" => "SELECT count(*) FROM bench WHERE id > 1000000".to_string(),
        _ => "SELECT coalesce(sum(v), 0)::bigint FROM bench".to_string(),
    };
    let expected = count(&hq, &expect_sql).await?;

    // Drain pgcourier.
    let t = Instant::now();
    let receiver = Daemon::spawn(
        "receiver",
        &bin_path("pgcourier-receiver"),
        &["run", "--config", receiver_cfg.to_str().expect("utf-8")],
        &dir.path().join("receiver.log"),
    )?;
    let sender = start_sender()?;
    let base = count(&ours, &expect_sql).await?;
    // After link-up: applied past what the branch held durably at link-up.
    let durable_at_up: Arc<std::sync::Mutex<Option<u64>>> = Arc::default();
    let first_after = drain(
        &ours,
        &expect_sql,
        expected,
        base,
        outage.zip(ours_link.as_ref()),
        |_| {
            let at_up = durable_at_up.clone();
            async move {
                let st = receiver_status(admin).await?;
                let durable = st["durable_seq"].as_u64().unwrap_or(0);
                let applied = st["applied_seq"].as_u64().unwrap_or(0);
                let d0 = *at_up.lock().expect("lock").get_or_insert(durable);
                Ok(applied > d0)
            }
        },
    )
    .await
    .with_context(|| format!("{}\n{}", sender.log_tail(20), receiver.log_tail(20)))?;
    let ours_secs = t.elapsed().as_secs_f64();
    let ours_link_stats = ours_link.as_ref().map(|r| r.stats());
    sender.terminate()?;
    receiver.terminate()?;
    let log = std::fs::read_to_string(&sender_log)?;
    let discarded: u64 = std::fs::read_to_string(dir.path().join("receiver.log"))?
        .lines()
        .filter(|l| l.contains("discarded_bytes="))
        .filter_map(|l| {
            l.split("discarded_bytes=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    let resent = shipping_totals(&log, "resent_bytes").unwrap_or(0);
    // Both directions, as for PostgreSQL's relay count.
    let udp = shipping_totals(&log, "udp_tx_bytes").context("sender log has no shipping totals")?
        + shipping_totals(&log, "udp_rx_bytes").unwrap_or(0);
    let compressed = shipping_totals(&log, "compressed_bytes").unwrap_or(0);
    let raw = shipping_totals(&log, "raw_bytes").unwrap_or(0);
    println!(
        "[{workload}] pgcourier drained in {ours_secs:.2}s: {:.0} txn/s; {:.1} UDP bytes/txn both ways ({:.1} raw record bytes/txn, zstd {:.1}x)",
        n as f64 / ours_secs,
        udp as f64 / n as f64,
        raw as f64 / n as f64,
        raw as f64 / compressed.max(1) as f64
    );
    if let (Some(p), Some(stats)) = (&profile, &ours_link_stats) {
        let rate = p.forward.rate_bps.unwrap_or(0) as f64 / 8.0;
        let link_secs = ours_secs - outage.map(|o| o.as_secs_f64()).unwrap_or(0.0);
        println!(
            "[{workload}] pgcourier over {} ({}): link busy {:.0}% (UDP bytes forwarded / time up / rate), goodput {:.0}% (compressed records shipped once / time up / rate); dropped by the link: {:?}",
            p.name,
            args.congestion,
            100.0 * stats.forward.bytes_forwarded as f64 / link_secs / rate.max(1.0),
            100.0 * compressed.saturating_sub(resent) as f64 / link_secs / rate.max(1.0),
            stats.forward.dropped
        );
    }
    if let Some(o) = outage {
        println!(
            "[{workload}] pgcourier outage of {}s: {} bytes received and discarded (cut batch), {} bytes shipped again; link-up to first newly received transaction applied: {}",
            o.as_secs(),
            discarded,
            resent,
            first_after.map(|s| format!("{s:.2}s")).unwrap_or_else(|| "not seen (drain ended)".into())
        );
    }

    if args.skip_native {
        return Ok((
            Figure {
                seconds: ours_secs,
                bytes: udp,
            },
            Figure {
                seconds: f64::NAN,
                bytes: 0,
            },
        ));
    }
    // Drain PostgreSQL's own.
    relay_bytes.store(0, Ordering::Relaxed);
    let t = Instant::now();
    native
        .execute(DB, "ALTER SUBSCRIPTION native ENABLE")
        .await?;
    let native_base = count(&native, &expect_sql).await?;
    let count_at_up: Arc<std::sync::Mutex<Option<i64>>> = Arc::default();
    let native_first = drain(
        &native,
        &expect_sql,
        expected,
        native_base,
        outage.zip(native_link.as_ref()),
        |_| {
            let at_up = count_at_up.clone();
            let native = &native;
            let sql = expect_sql.clone();
            async move {
                let c = count(native, &sql).await?;
                let c0 = *at_up.lock().expect("lock").get_or_insert(c);
                Ok(c > c0)
            }
        },
    )
    .await?;
    let native_secs = t.elapsed().as_secs_f64();
    if let Some(o) = outage {
        println!(
            "[{workload}] PostgreSQL outage of {}s: link-up to first new transaction applied: {}",
            o.as_secs(),
            native_first
                .map(|s| format!("{s:.2}s"))
                .unwrap_or_else(|| "not seen (drain ended)".into())
        );
    }
    let native_bytes = relay_bytes.load(Ordering::Relaxed);
    println!(
        "[{workload}] PostgreSQL logical replication drained in {native_secs:.2}s: {:.0} txn/s; {:.1} TCP bytes/txn both ways",
        n as f64 / native_secs,
        native_bytes as f64 / n as f64
    );
    native.execute(DB, "DROP SUBSCRIPTION native").await?;
    Ok((
        Figure {
            seconds: ours_secs,
            bytes: udp,
        },
        Figure {
            seconds: native_secs,
            bytes: native_bytes,
        },
    ))
}
