//! pgcourier-demo: headquarters to branch replication on two throwaway local
//! PostgreSQL 15 clusters, with a branch outage in the middle.
//!
//! It starts the clusters "hq" and "branch", creates a small shop schema on
//! both, generates certificates, writes sender.toml and receiver.toml, starts
//! both daemons, runs a bounded write workload on hq while printing once a
//! second how far the branch is behind, kills the receiver with SIGKILL for a
//! few seconds, restarts it, and finally checks that both databases are
//! identical row for row. Everything is removed on exit unless
//! `PGCOURIER_KEEP_TEST_DIRS` is set.
//!
//! Usage: `pgcourier-demo [--seconds N]` (default 20). Run it with
//! `./scripts/demo`.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use pgcourier_tests::{assert_tables_equal, bin_path, wait_until, workdir, Daemon, PgCluster};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio_postgres::Client;

const DB: &str = "postgres";
const DEFAULT_SECONDS: u64 = 20;
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
const TICK: Duration = Duration::from_millis(100);
const PRODUCTS: i32 = 20;
const TABLES: &[&str] = &["public.products", "public.orders"];

const SCHEMA: &str = "\
CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL);
CREATE TABLE orders (id bigint PRIMARY KEY, product_id int NOT NULL, qty int NOT NULL,
                     created_at timestamptz NOT NULL DEFAULT now(), note text);";

/// Link settings for both configs. The defaults (idle-timeout 30s,
/// keep-alive 5s, max-backoff 30s) suit a slow WAN link; on loopback a lost
/// connection is noticed and redialled sooner, which keeps the demo short
/// (a killed receiver leaves the sender's QUIC connection open until the
/// idle timeout unless the restarted receiver can reset it).
const LOOPBACK_LINK: &str = "\
# loopback link: notice a dead peer after 5 s, redial at least every 2 s
idle-timeout = \"5s\"
keep-alive = \"1s\"
max-backoff = \"2s\"
";

const NOTES: &[Option<&str>] = &[
    None,
    None,
    None,
    Some("gift wrap"),
    Some("deliver after 5 pm"),
    Some("rush \u{1f69a}"),
    Some("customer's \"usual\""),
    Some("café order, table 4"),
];

const USAGE: &str = "usage: pgcourier-demo [--seconds N] [--profile NAME]

Replicates a small shop workload from a throwaway \"hq\" PostgreSQL 15 cluster
to a throwaway \"branch\" cluster with pgcourier-sender and pgcourier-receiver,
kills the receiver in the middle, restarts it, and checks that both databases
end up identical.

  --seconds N   how long the write workload runs (default 20, at least 4)
  --profile P   the emulated link between the daemons (netem): dsl (default),
                3g, satellite, lossy, flaky, clean

Environment: PGCOURIER_KEEP_TEST_DIRS=1 keeps the clusters, configs and logs;
RUST_LOG sets the daemons' log level (default info); PGCOURIER_BIN_DIR and
PG_BINDIR select the binaries (see tests/src/lib.rs).";

struct Options {
    seconds: u64,
    profile: String,
}

fn parse_args() -> Result<Option<Options>, String> {
    let mut opts = Options {
        seconds: DEFAULT_SECONDS,
        profile: "dsl".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--profile" => {
                let p = args.next().ok_or("--profile needs a value")?;
                if pgcourier_netem::Profile::by_name(&p).is_none() {
                    return Err(format!(
                        "--profile: no netem profile {p:?} (one of {:?})",
                        pgcourier_netem::Profile::names()
                    ));
                }
                opts.profile = p;
                continue;
            }
            "--seconds" => args.next().ok_or("--seconds needs a value")?,
            other => match other.strip_prefix("--seconds=") {
                Some(v) => v.to_string(),
                None => return Err(format!("unknown argument {other:?}")),
            },
        };
        opts.seconds = value
            .parse()
            .map_err(|_| format!("--seconds: {value:?} is not a whole number of seconds"))?;
        if opts.seconds < 4 {
            return Err("--seconds must be at least 4 (the outage needs room)".into());
        }
    }
    Ok(Some(opts))
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("pgcourier-demo: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgcourier-demo: FAILED: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async {
        tokio::select! {
            code = run(&opts) => code,
            _ = tokio::signal::ctrl_c() => {
                // Dropping run's future drops the daemons and clusters.
                eprintln!("\npgcourier-demo: interrupted; stopping the daemons and clusters");
                ExitCode::from(130)
            }
        }
    });
    // Do not wait for the connection tasks of the (now gone) clusters.
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn run(opts: &Options) -> ExitCode {
    let mut demo = match Demo::start(&opts.profile).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("\npgcourier-demo: FAILED: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = demo.play(opts).await;
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\npgcourier-demo: FAILED: {e:#}\n{}", demo.log_tails());
            ExitCode::FAILURE
        }
    };
    print!("stopping the daemons and clusters... ");
    flush();
    drop(demo);
    println!("done");
    code
}

fn flush() {
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn free_udp_port() -> anyhow::Result<u16> {
    let sock =
        std::net::UdpSocket::bind("127.0.0.1:0").context("binding a UDP port on 127.0.0.1")?;
    Ok(sock.local_addr()?.port())
}

fn keep_dirs() -> bool {
    std::env::var_os("PGCOURIER_KEEP_TEST_DIRS").is_some_and(|v| !v.is_empty())
}

/// Everything the demo started. Field order is drop order: connections,
/// daemons, clusters, then the work directory.
struct Demo {
    /// The emulated link the sender ships through.
    link: pgcourier_netem::RelayHandle,
    hq_client: Client,
    branch_client: Client,
    sender: Daemon,
    receiver: Daemon,
    hq: PgCluster,
    branch: PgCluster,
    dir: tempfile::TempDir,
    started: Instant,
}

impl Demo {
    async fn start(profile: &str) -> anyhow::Result<Demo> {
        println!("pgcourier demo: headquarters -> branch replication on two throwaway PostgreSQL 15 clusters");

        // Resolve the daemon binaries first (under cargo this builds them if needed).
        let (sender_bin, receiver_bin) = tokio::task::spawn_blocking(|| {
            // bin_path panics with a clear message; report it as our own error.
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let found = std::panic::catch_unwind(|| {
                (bin_path("pgcourier-sender"), bin_path("pgcourier-receiver"))
            });
            std::panic::set_hook(hook);
            found
        })
        .await?
        .map_err(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            anyhow::anyhow!("locating the daemon binaries: {msg}")
        })?;
        println!(
            "daemons: {} and {}",
            sender_bin.display(),
            receiver_bin.display()
        );
        let started = Instant::now();

        print!("starting clusters hq and branch... ");
        flush();
        let (hq, branch) =
            tokio::task::spawn_blocking(|| -> anyhow::Result<(PgCluster, PgCluster)> {
                let hq = std::thread::spawn(|| PgCluster::start("hq"));
                let branch = std::thread::spawn(|| PgCluster::start("branch"));
                let hq = hq
                    .join()
                    .expect("cluster start thread")
                    .context("starting cluster hq")?;
                let branch = branch
                    .join()
                    .expect("cluster start thread")
                    .context("starting cluster branch")?;
                Ok((hq, branch))
            })
            .await??;
        println!(
            "ok (Unix sockets: hq port {}, branch port {})",
            hq.port(),
            branch.port()
        );

        let dir = workdir("demo");
        hq.execute(DB, SCHEMA)
            .await
            .context("creating the schema on hq")?;
        branch
            .execute(DB, SCHEMA)
            .await
            .context("creating the schema on branch")?;
        println!("schema on both: products(id, name, price), orders(id, product_id, qty, created_at, note)");
        hq.execute(
            DB,
            &format!(
                "INSERT INTO products SELECT g, 'product ' || g, round((2 + g * 1.37)::numeric, 2) \
                 FROM generate_series(1, {PRODUCTS}) g"
            ),
        )
        .await
        .context("seeding products on hq")?;
        println!("{PRODUCTS} products already on hq: the sender's initial copy brings them to the branch");

        let d = dir.path();
        let sender_fp = pgcourier_common::transport::tls::keygen(
            &d.join("sender.crt"),
            &d.join("sender.key"),
            "pgcourier-sender",
        )
        .context("generating the sender certificate")?;
        let receiver_fp = pgcourier_common::transport::tls::keygen(
            &d.join("receiver.crt"),
            &d.join("receiver.key"),
            "pgcourier-receiver",
        )
        .context("generating the receiver certificate")?;
        let short = |fp: String| format!("{}...", &fp[..16.min(fp.len())]);
        println!(
            "certificates: sender {}, receiver {} (SHA-256, pinned on the other side)",
            short(sender_fp.to_string()),
            short(receiver_fp.to_string())
        );

        let port = free_udp_port()?;
        let p = pgcourier_netem::Profile::by_name(profile).context("netem profile")?;
        let link = pgcourier_netem::UdpRelay::start(
            "127.0.0.1:0".parse()?,
            format!("127.0.0.1:{port}").parse()?,
            p.link(1),
        )
        .await
        .context("starting the netem link")?;
        let link_addr = link.local_addr();
        println!(
            "link: netem profile {} ({}); the sender ships through {link_addr}",
            p.name, p.summary
        );
        let admin_port = || -> anyhow::Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (sender_admin, receiver_admin) = (admin_port()?, admin_port()?);
        let receiver_toml = d.join("receiver.toml");
        std::fs::write(
            &receiver_toml,
            format!(
                "# pgcourier-receiver (branch), written by pgcourier-demo\n\
                 target = {}\n\
                 inbox-dir = \"inbox\"\n\
                 cert = \"receiver.crt\"\n\
                 key = \"receiver.key\"\n\
                 listen = \"127.0.0.1:{port}\"\n\
                 sender-fingerprints = [\"{sender_fp}\"]\n\
                 admin = \"127.0.0.1:{receiver_admin}\"\n\
                 {LOOPBACK_LINK}",
                toml_str(&branch.conninfo(DB))
            ),
        )
        .context("writing receiver.toml")?;
        let sender_toml = d.join("sender.toml");
        std::fs::write(
            &sender_toml,
            format!(
                "# pgcourier-sender (headquarters), written by pgcourier-demo\n\
                 source = {}\n\
                 spool-dir = \"spool\"\n\
                 cert = \"sender.crt\"\n\
                 key = \"sender.key\"\n\
                 admin = \"127.0.0.1:{sender_admin}\"\n\
                 {LOOPBACK_LINK}\
                 \n\
                 [[receiver]]\n\
                 name = \"branch\"\n\
                 fingerprint = \"{receiver_fp}\"\n\
                 address = \"{link_addr}\"\n",
                toml_str(&hq.conninfo(DB))
            ),
        )
        .context("writing sender.toml")?;
        println!(
            "configs: {} and {} (link timeouts shortened for loopback: idle-timeout 5s)",
            sender_toml.display(),
            receiver_toml.display()
        );

        let receiver = spawn(
            &receiver_bin,
            &receiver_toml,
            &d.join("receiver.log"),
            "receiver",
        )?;
        let sender = spawn(&sender_bin, &sender_toml, &d.join("sender.log"), "sender")?;
        let hq_client = hq.client(DB).await?;
        let branch_client = branch.client(DB).await?;
        let demo = Demo {
            link,
            hq_client,
            branch_client,
            sender,
            receiver,
            hq,
            branch,
            dir,
            started,
        };
        println!("started pgcourier-receiver (listening on udp 127.0.0.1:{port}) and pgcourier-sender (dials it)");
        Ok(demo)
    }

    fn log_tails(&self) -> String {
        let mut s = format!(
            "--- sender log ({}) ---\n{}\n--- receiver log ({}) ---\n{}",
            self.sender.log_path().display(),
            self.sender.log_tail(25),
            self.receiver.log_path().display(),
            self.receiver.log_tail(25)
        );
        for pg in [&self.hq, &self.branch] {
            s.push_str(&format!(
                "\n--- PostgreSQL {} log ({}) ---\n{}",
                pg.name(),
                pg.log_path().display(),
                pg.log_tail(5)
            ));
        }
        s
    }

    fn check_daemons(&self, receiver_down: bool) -> anyhow::Result<()> {
        if let Some(s) = self.sender.try_status() {
            bail!("pgcourier-sender exited unexpectedly ({s})");
        }
        if !receiver_down {
            if let Some(s) = self.receiver.try_status() {
                bail!("pgcourier-receiver exited unexpectedly ({s})");
            }
        }
        Ok(())
    }

    async fn play(&mut self, opts: &Options) -> anyhow::Result<()> {
        // The sender copies the existing products first, at an exact cut of
        // the change stream; changes from then on follow it.
        let t = Instant::now();
        let hq = &self.hq_client;
        wait_until("the sender to create replication slot pgcourier on hq", Duration::from_secs(60), || async {
            self.check_daemons(false)?;
            Ok(hq
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'pgcourier' AND confirmed_flush_lsn IS NOT NULL",
                    &[],
                )
                .await?
                .is_some())
        })
        .await?;
        println!(
            "replication slot pgcourier is ready on hq ({:.1} s); the initial copy and the changes from now on flow to the branch",
            t.elapsed().as_secs_f64()
        );

        let secs = opts.seconds;
        let kill_at = Duration::from_secs_f64(secs as f64 * 0.35);
        let restart_at = Duration::from_secs_f64(secs as f64 * 0.65);
        println!(
            "\nworkload on hq for {secs} s: small transactions (order inserts, price updates, deletes) every {} ms;\n\
             the branch receiver is killed at {:.0} s and restarted at {:.0} s\n",
            TICK.as_millis(),
            kill_at.as_secs_f64(),
            restart_at.as_secs_f64()
        );
        println!("{}", header());

        let mut work = Workload::new();
        let t0 = tokio::time::Instant::now();
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_report = Duration::from_secs(1);
        let mut killed = false;
        let mut restarted = false;
        loop {
            ticker.tick().await;
            let elapsed = t0.elapsed();
            if elapsed >= Duration::from_secs(secs) {
                break;
            }
            self.check_daemons(killed && !restarted)?;
            if !killed && elapsed >= kill_at {
                println!(
                    "{:>5.1}s  stopping the branch receiver (simulating a link/branch outage)...",
                    elapsed.as_secs_f64()
                );
                let status = self.receiver.kill9().context("killing the receiver")?;
                println!("        receiver killed ({status}); hq keeps writing, the sender keeps spooling");
                killed = true;
            }
            if killed && !restarted && elapsed >= restart_at {
                println!(
                    "{:>5.1}s  restarting it: it resumes from what its inbox holds",
                    elapsed.as_secs_f64()
                );
                self.receiver.respawn().context("restarting the receiver")?;
                restarted = true;
            }
            work.tick(&mut self.hq_client)
                .await
                .context("workload on hq")?;
            if elapsed >= next_report {
                self.report(elapsed).await?;
                next_report += Duration::from_secs(1);
            }
        }
        let ran = t0.elapsed();
        let total = work.inserts + work.updates + work.deletes;
        println!(
            "\nworkload stopped after {:.1} s: {total} transactions on hq ({:.0}/s): {} order inserts, {} price updates, {} deletes",
            ran.as_secs_f64(),
            total as f64 / ran.as_secs_f64(),
            work.inserts,
            work.updates,
            work.deletes
        );
        println!(
            "waiting for the branch to catch up (at most {} s)...",
            CATCH_UP_TIMEOUT.as_secs()
        );

        let t = Instant::now();
        let mut next_report = Duration::from_secs(1);
        loop {
            self.check_daemons(false)?;
            let diff = assert_tables_equal(&self.hq_client, &self.branch_client, TABLES).await;
            match diff {
                Ok(()) => break,
                Err(e) if t.elapsed() >= CATCH_UP_TIMEOUT => {
                    return Err(e.context(format!(
                        "the branch did not catch up within {} s",
                        CATCH_UP_TIMEOUT.as_secs()
                    )));
                }
                Err(_) => {}
            }
            if t.elapsed() >= next_report {
                self.report(t0.elapsed()).await?;
                next_report += Duration::from_secs(1);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let orders = count_orders(&self.branch_client).await?;
        println!(
            "branch caught up: {orders} orders, identical row for row (products and orders compared as text, {:.1} s after the workload stopped)",
            t.elapsed().as_secs_f64()
        );
        let progress = self
            .branch_client
            .query_opt("SELECT commit_lsn::text, seq FROM pgcourier.progress", &[])
            .await
            .context("reading pgcourier.progress on branch")?;
        if let Some(row) = progress {
            let (lsn, seq): (String, i64) = (row.get(0), row.get(1));
            println!(
                "pgcourier.progress on branch: last applied commit LSN {lsn}, record seq {seq}"
            );
        }
        let st = self.link.stats();
        println!(
            "\nlink toward the branch: {} packets, {} forwarded, {} dropped by the link ({:?}), mean queue delay {:?}",
            st.forward.packets_in,
            human(st.forward.bytes_forwarded),
            st.forward.dropped.total(),
            st.forward.dropped,
            st.forward.queue_delay_mean()
        );
        // What an operator sees: pgcourier-queue status on both sides.
        for side in ["sender", "receiver"] {
            let cfg = self.dir.path().join(format!("{side}.toml"));
            println!("\n$ pgcourier-queue --config {side}.toml status");
            let out = std::process::Command::new(bin_path("pgcourier-queue"))
                .args(["--config", cfg.to_str().unwrap_or_default(), "status"])
                .output()
                .context("running pgcourier-queue status")?;
            print!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        println!();

        // A clean stop: SIGTERM, as a service manager would send.
        for d in [&self.sender, &self.receiver] {
            let status = tokio::task::block_in_place(|| d.terminate())
                .with_context(|| format!("stopping {}", d.name()))?;
            if !status.success() {
                bail!(
                    "pgcourier-{} did not stop cleanly on SIGTERM ({status})",
                    d.name()
                );
            }
        }
        println!("stopped both daemons with SIGTERM (clean exit)");

        println!(
            "\ndaemon logs:\n  {}\n  {}",
            self.sender.log_path().display(),
            self.receiver.log_path().display()
        );
        if keep_dirs() {
            println!(
                "PGCOURIER_KEEP_TEST_DIRS is set: the work directory {} and both clusters are kept",
                self.dir.path().display()
            );
        } else {
            println!("(removed on exit; set PGCOURIER_KEEP_TEST_DIRS=1 to keep them, the configs and the clusters)");
        }
        println!("total time {:.1} s", self.started.elapsed().as_secs_f64());
        Ok(())
    }

    /// One status line: elapsed, order counts, difference, apply lag.
    async fn report(&self, elapsed: Duration) -> anyhow::Result<()> {
        let src = count_orders(&self.hq_client)
            .await
            .context("counting orders on hq")?;
        let dst = count_orders(&self.branch_client)
            .await
            .context("counting orders on branch")?;
        // The progress table appears when the receiver first connects to the branch.
        let lag = self
            .branch_client
            .query_opt(
                "SELECT extract(epoch FROM now() - max(commit_time))::float8 FROM pgcourier.progress",
                &[],
            )
            .await
            .ok()
            .flatten()
            .and_then(|r| r.get::<_, Option<f64>>(0));
        let lag = lag
            .map(|l| format!("{l:.2} s"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:>5.1}s  {:>9}  {:>13}  {:>6}  {:>9}",
            elapsed.as_secs_f64(),
            src,
            dst,
            src - dst,
            lag
        );
        Ok(())
    }
}

fn header() -> String {
    format!(
        "{:>6}  {:>9}  {:>13}  {:>6}  {:>9}",
        "time", "hq orders", "branch orders", "behind", "apply lag"
    )
}

fn spawn(bin: &Path, config: &Path, log: &Path, name: &str) -> anyhow::Result<Daemon> {
    let cfg = config.to_str().context("config path is not UTF-8")?;
    Daemon::spawn(name, bin, &["run", "--config", cfg], log)
}

async fn count_orders(client: &Client) -> anyhow::Result<i64> {
    Ok(client
        .query_one("SELECT count(*) FROM orders", &[])
        .await?
        .get(0))
}

/// The shop workload: a few single-statement transactions per tick.
struct Workload {
    rng: StdRng,
    next_order: i64,
    inserts: u64,
    updates: u64,
    deletes: u64,
}

impl Workload {
    fn new() -> Workload {
        Workload {
            rng: StdRng::from_entropy(),
            next_order: 1,
            inserts: 0,
            updates: 0,
            deletes: 0,
        }
    }

    async fn tick(&mut self, client: &mut Client) -> anyhow::Result<()> {
        // 1 to 3 orders, each its own transaction.
        for _ in 0..self.rng.gen_range(1..=3) {
            let product: i32 = self.rng.gen_range(1..=PRODUCTS);
            let qty: i32 = self.rng.gen_range(1..=5);
            let note = NOTES[self.rng.gen_range(0..NOTES.len())];
            let tx = client.transaction().await?;
            tx.execute(
                "INSERT INTO orders (id, product_id, qty, note) VALUES ($1, $2, $3, $4)",
                &[&self.next_order, &product, &qty, &note],
            )
            .await?;
            tx.commit().await?;
            self.next_order += 1;
            self.inserts += 1;
        }
        // Now and then a price change.
        if self.rng.gen_bool(0.5) {
            let product: i32 = self.rng.gen_range(1..=PRODUCTS);
            let factor: f64 = self.rng.gen_range(0.9..1.1);
            let tx = client.transaction().await?;
            tx.execute(
                "UPDATE products SET price = greatest(round(price * ($1::float8)::numeric, 2), 0.50) WHERE id = $2",
                &[&factor, &product],
            )
            .await?;
            tx.commit().await?;
            self.updates += 1;
        }
        // Sometimes an order is cancelled.
        if self.rng.gen_bool(0.2) {
            let tx = client.transaction().await?;
            let n = tx
                .execute(
                    "DELETE FROM orders WHERE id = (SELECT id FROM orders ORDER BY random() LIMIT 1)",
                    &[],
                )
                .await?;
            tx.commit().await?;
            self.deletes += n;
        }
        Ok(())
    }
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else if bytes >= 1 << 10 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} B")
    }
}
