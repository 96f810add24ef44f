//! Benchmarks pgcourier side by side with PostgreSQL's own logical
//! replication, on throwaway clusters on this machine, in the same run.
//!
//! `pgcourier-bench [--quick] [--runs N] [--json FILE] [--workload LIST]`
//! (`--help` lists every option). Workloads:
//!
//! - `backlog`: 200k single-row INSERT and 200k single-row UPDATE
//!   transactions queued while both systems are stopped, then drained on
//!   loopback (through netem's `clean` relays, which count the wire bytes);
//! - `backlog-open`: the same backlogs, each also drained with a
//!   transaction left open on the source since before it, and the slowdown
//!   that causes to each system (runs the plain backlog too when `backlog`
//!   is not selected);
//! - `steady`: pgbench TPC-B-like at full speed without replication, with
//!   pgcourier, with PostgreSQL's own; the lag when pgbench stops;
//! - `slow`: the UPDATE backlog drained across netem's `dsl`, `3g` and
//!   `satellite` profiles, by pgcourier over QUIC (netem's UDP relay) and
//!   over TCP (netem's TCP relay, which applies no loss), and by
//!   PostgreSQL's own (netem's TCP relay);
//! - `join`: a 300k-row table joins the publication of a branch that
//!   follows live writes (a row every 100 ms) across `dsl`: how stale the
//!   branch's live rows get while the table is copied, and how long the
//!   copy takes;
//! - `neighbour`: a new branch takes its first copy (the same 300k rows)
//!   while another follows live writes, both behind one `dsl` uplink: how
//!   stale the live branch gets meanwhile;
//! - `copy`: initial copy of pgbench scale 10 on a clean link and on `3g`;
//! - `big`: one transaction of 1M rows: time and peak memory (VmHWM);
//! - `bytea`: one transaction inserting one 64 MiB bytea value of random
//!   bytes: time and peak memory (VmHWM);
//! - `spool`: capture into the spool with no receiver, against
//!   `pg_recvlogical` writing the same changes to a file.
//!
//! Each workload's runs are interleaved with the others' (run 1 of every
//! workload, then run 2, ...) so a disturbance of the shared machine spreads
//! over the lines instead of spoiling one. The table shows medians with
//! [min-max]; the JSON holds every sample.
//!
//! Modules: [`systems`] sets up both systems behind netem relays,
//! [`workloads`] runs them, [`report`] makes the table and the JSON.

mod report;
mod systems;
mod workloads;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use pgcourier_netem::Profile;

use report::Report;
use workloads::Change;

const WORKLOADS: [&str; 10] = [
    "backlog",
    "backlog-open",
    "steady",
    "slow",
    "join",
    "neighbour",
    "copy",
    "big",
    "bytea",
    "spool",
];

/// Sizes and switches; `--quick` starts from smaller sizes.
pub struct Opts {
    pub runs: usize,
    pub workloads: Vec<String>,
    pub json: Option<PathBuf>,
    pub backlog_txns: i64,
    pub backlog_changes: Vec<Change>,
    /// Slow-link profiles and the transactions drained across each.
    pub slow: Vec<(String, i64)>,
    pub steady_scale: u32,
    pub steady_secs: u64,
    pub clients: u32,
    pub threads: u32,
    pub copy_scale: u32,
    pub copy_3g_scale: u32,
    /// Runs of the copy across 3g (PostgreSQL's takes about 13 min at scale 10).
    pub copy_3g_runs: usize,
    /// Seconds without progress after which pgcourier's copy counts as absent.
    pub copy_stall: u64,
    pub big_rows: i64,
    /// Rows of the table that joins the publication (`join`), and its link.
    pub join_rows: i64,
    pub join_profile: String,
    /// Size of the one bytea value, MiB.
    pub bytea_mib: i64,
    pub spool_txns: i64,
    pub outage: Option<u64>,
    pub congestion: Option<String>,
    pub skip_native: bool,
    /// Leave pgcourier over TCP out of the slow-link workload.
    pub skip_tcp: bool,
    /// Follow pgcourier's marks during backlog drains (perturbs them: a
    /// status request walks the whole spool and inbox).
    pub phases: bool,
    /// Extra top-level lines for the daemons' configs, for experiments.
    pub sender_conf: Vec<String>,
    pub receiver_conf: Vec<String>,
}

impl Opts {
    fn full() -> Opts {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(2);
        Opts {
            runs: 3,
            workloads: WORKLOADS.iter().map(|s| s.to_string()).collect(),
            json: None,
            backlog_txns: 200_000,
            backlog_changes: vec![Change::Insert, Change::Update],
            slow: vec![
                ("dsl".into(), 50_000),
                ("3g".into(), 20_000),
                ("satellite".into(), 20_000),
            ],
            steady_scale: 10,
            steady_secs: 30,
            clients: 2 * cores,
            threads: cores,
            copy_scale: 10,
            copy_3g_scale: 10,
            copy_3g_runs: 1,
            copy_stall: 60,
            big_rows: 1_000_000,
            join_rows: 300_000,
            join_profile: "dsl".into(),
            bytea_mib: 64,
            spool_txns: 200_000,
            outage: None,
            congestion: None,
            skip_native: false,
            skip_tcp: false,
            phases: false,
            sender_conf: Vec::new(),
            receiver_conf: Vec::new(),
        }
    }

    fn quick(&mut self) {
        self.runs = 1;
        self.backlog_txns = 20_000;
        self.slow = vec![
            ("dsl".into(), 10_000),
            ("3g".into(), 5_000),
            ("satellite".into(), 5_000),
        ];
        self.steady_scale = 1;
        self.steady_secs = 10;
        self.copy_scale = 1;
        self.copy_3g_scale = 1;
        self.copy_stall = 20;
        self.big_rows = 100_000;
        self.join_rows = 50_000;
        self.bytea_mib = 16;
        self.spool_txns = 20_000;
    }
}

const HELP: &str = "\
pgcourier-bench: pgcourier beside PostgreSQL's own logical replication

  --quick                 small sizes, one run (a smoke run of a few minutes)
  --runs N                runs of each workload (default 3; the table shows medians)
  --json FILE             write every figure and sample as JSON
  --workload LIST         comma-separated, from backlog,backlog-open,steady,slow,join,neighbour,copy,big,bytea,spool
                          (default: all); backlog-open drains each backlog again with a transaction
                          left open on the source since before it (and runs backlog if not listed)
  --transactions N        backlog size (default 200000)
  --change insert|update|both   backlog changes (default both)
  --slow PROFILE=N,...    slow-link profiles and their backlog sizes
                          (default dsl=50000,3g=20000,satellite=20000)
  --steady-scale S        pgbench scale for the steady load (default 10)
  --seconds S             pgbench duration per phase (default 30)
  --clients C             pgbench clients (default 2 x cores); --threads J (default cores)
  --copy-scale S          initial copy on the clean link (default 10)
  --copy-3g-scale S       initial copy across 3g (default 10)
  --copy-3g-runs N        runs of the 3g copy (default 1: about 15 min for PostgreSQL's own)
  --copy-stall S          seconds without progress before pgcourier's copy counts as absent (60)
  --join-rows N           rows of the table that joins the publication, and of the
                          neighbour's copy (default 300000)
  --join-profile P        the link of join and neighbour (default dsl)
  --big-rows N            rows of the one large transaction (default 1000000)
  --bytea-mib N           size of the one bytea value, MiB (default 64; --quick 16)
  --spool-txns N          transactions captured with the link down (default 200000)
  --outage S              cut the link for S seconds a third into each slow-link drain
  --congestion C          pgcourier's QUIC congestion controller (cubic, bbr, newreno)
  --skip-native           measure pgcourier only
  --skip-tcp              slow: leave out pgcourier over TCP (transport = \"tcp\", through netem's
                          TCP relay, which applies the profile's delay, rate and outages but not
                          its loss), measured by default beside pgcourier over QUIC
  --sender-conf LINE      add a top-level line to sender.toml (repeatable), e.g.
                          --sender-conf 'cache-capacity = \"16MiB\"'; --receiver-conf LINE likewise
  --phases                print when a pgcourier backlog was all spooled and all durable in
                          the inbox (polls the daemons' status, which walks spool and inbox:
                          it slows the drain it measures)

A full run (--runs 3) takes about 50 minutes on 2 cores; --quick about 6.";

fn parse_args() -> anyhow::Result<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Opts::full();
    if args.iter().any(|a| a == "--quick") {
        o.quick();
    }
    let mut it = args.into_iter();
    let num = |it: &mut std::vec::IntoIter<String>, what: &str| -> anyhow::Result<i64> {
        let v = it
            .next()
            .with_context(|| format!("{what} needs a number"))?;
        v.parse()
            .with_context(|| format!("{what} needs a number, not {v:?}"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => {}
            "--runs" => o.runs = num(&mut it, &a)?.max(1) as usize,
            "--json" => o.json = Some(it.next().context("--json needs a file")?.into()),
            "--workload" => {
                let list = it.next().context("--workload needs a list")?;
                o.workloads = Vec::new();
                for w in list.split(',') {
                    if !WORKLOADS.contains(&w) {
                        bail!("no workload {w:?}: {WORKLOADS:?}");
                    }
                    o.workloads.push(w.to_string());
                }
            }
            "--transactions" => o.backlog_txns = num(&mut it, &a)?,
            "--change" => {
                o.backlog_changes = match it.next().as_deref() {
                    Some("insert") => vec![Change::Insert],
                    Some("update") => vec![Change::Update],
                    Some("both") => vec![Change::Insert, Change::Update],
                    other => bail!("--change insert|update|both, not {other:?}"),
                }
            }
            "--slow" => {
                let list = it.next().context("--slow needs PROFILE=N,...")?;
                o.slow = Vec::new();
                for item in list.split(',') {
                    let (p, n) = item
                        .split_once('=')
                        .with_context(|| format!("--slow PROFILE=N, not {item:?}"))?;
                    Profile::by_name(p).with_context(|| {
                        format!("no netem profile {p:?}: {:?}", Profile::names())
                    })?;
                    o.slow.push((p.to_string(), n.parse()?));
                }
            }
            "--steady-scale" => o.steady_scale = num(&mut it, &a)? as u32,
            "--seconds" => o.steady_secs = num(&mut it, &a)? as u64,
            "--clients" => o.clients = num(&mut it, &a)? as u32,
            "--threads" => o.threads = num(&mut it, &a)? as u32,
            "--copy-scale" => o.copy_scale = num(&mut it, &a)? as u32,
            "--copy-3g-scale" => o.copy_3g_scale = num(&mut it, &a)? as u32,
            "--copy-3g-runs" => o.copy_3g_runs = num(&mut it, &a)? as usize,
            "--copy-stall" => o.copy_stall = num(&mut it, &a)? as u64,
            "--big-rows" => o.big_rows = num(&mut it, &a)?,
            "--join-rows" => o.join_rows = num(&mut it, &a)?,
            "--join-profile" => {
                let p = it.next().context("--join-profile needs a netem profile")?;
                Profile::by_name(&p)
                    .with_context(|| format!("no netem profile {p:?}: {:?}", Profile::names()))?;
                o.join_profile = p;
            }
            "--bytea-mib" => o.bytea_mib = num(&mut it, &a)?.max(1),
            "--spool-txns" => o.spool_txns = num(&mut it, &a)?,
            "--outage" => o.outage = Some(num(&mut it, &a)? as u64),
            "--congestion" => {
                o.congestion = Some(it.next().context("--congestion cubic|bbr|newreno")?)
            }
            "--skip-native" => o.skip_native = true,
            "--skip-tcp" => o.skip_tcp = true,
            "--phases" => o.phases = true,
            "--sender-conf" => o
                .sender_conf
                .push(it.next().context("--sender-conf needs a TOML line")?),
            "--receiver-conf" => o
                .receiver_conf
                .push(it.next().context("--receiver-conf needs a TOML line")?),
            "-h" | "--help" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(o)
}

/// The machine, for the README and the JSON.
fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let meminfo = read("/proc/meminfo");
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let pg = pgcourier_tests::pg_bindir()
        .ok()
        .and_then(|d| {
            std::process::Command::new(d.join("postgres"))
                .arg("--version")
                .output()
                .ok()
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    serde_json::json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "postgresql": pg,
        "date": date,
        "load_average_at_start": read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let o = parse_args()?;
    let m = machine();
    println!(
        "pgcourier-bench: {} run(s) of {}; machine: {} cores ({}), {} GiB, Linux {}, {}; load average {}",
        o.runs,
        o.workloads.join(", "),
        m["cores"],
        m["cpu"].as_str().unwrap_or(""),
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or(""),
        m["postgresql"].as_str().unwrap_or(""),
        m["load_average_at_start"].as_str().unwrap_or("")
    );
    let started = Instant::now();
    let mut report = Report::default();
    let has = |w: &str| o.workloads.iter().any(|x| x == w);
    let profile = |name: &str| Profile::by_name(name).expect("profile checked or built in");
    for run in 1..=o.runs {
        println!(
            "--- run {run} of {} ({:.0} s so far)",
            o.runs,
            started.elapsed().as_secs_f64()
        );
        if has("backlog") || has("backlog-open") {
            for &c in &o.backlog_changes {
                let n = o.backlog_txns;
                let without =
                    workloads::backlog(&o, &mut report, c, n, profile("clean"), false, false)
                        .await
                        .with_context(|| format!("backlog {}", c.name()))?;
                if has("backlog-open") {
                    let with =
                        workloads::backlog(&o, &mut report, c, n, profile("clean"), true, false)
                            .await
                            .with_context(|| {
                                format!("backlog {} with a transaction left open", c.name())
                            })?;
                    workloads::open_txn_slowdown(&mut report, c, n, without, with);
                }
            }
        }
        if has("steady") {
            workloads::steady(&o, &mut report)
                .await
                .context("steady load")?;
        }
        if has("slow") {
            for (p, n) in &o.slow {
                let over_tcp = !o.skip_tcp;
                workloads::backlog(
                    &o,
                    &mut report,
                    Change::Update,
                    *n,
                    profile(p),
                    false,
                    over_tcp,
                )
                .await
                .with_context(|| format!("slow link {p}"))?;
            }
        }
        if has("join") {
            workloads::join(&o, &mut report, profile(&o.join_profile), o.join_rows)
                .await
                .context("a table joins the publication")?;
        }
        if has("neighbour") {
            workloads::neighbour(&o, &mut report, profile(&o.join_profile), o.join_rows)
                .await
                .context("a new branch copies beside a live one")?;
        }
        if has("copy") {
            workloads::copy(&o, &mut report, profile("clean"), o.copy_scale)
                .await
                .context("initial copy, clean link")?;
            if run <= o.copy_3g_runs {
                workloads::copy(&o, &mut report, profile("3g"), o.copy_3g_scale)
                    .await
                    .context("initial copy, 3g")?;
            }
        }
        if has("big") {
            workloads::big_transaction(&o, &mut report, o.big_rows)
                .await
                .context("one large transaction")?;
        }
        if has("bytea") {
            workloads::bytea(&o, &mut report, o.bytea_mib)
                .await
                .context("one large bytea value")?;
        }
        if has("spool") {
            workloads::spool(&o, &mut report, o.spool_txns)
                .await
                .context("spool")?;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!();
    println!(
        "pgcourier-bench: medians of {} run(s) [min-max], {:.1} min; ratio = pgcourier / PostgreSQL",
        o.runs,
        elapsed / 60.0
    );
    print!("{}", report.table());
    if let Some(path) = &o.json {
        let header = serde_json::json!({
            "machine": m,
            "runs": o.runs,
            "workloads": o.workloads,
            "minutes": elapsed / 60.0,
            "args": std::env::args().skip(1).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&report.json(header))?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}
