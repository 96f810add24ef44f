//! pgcourier-queue: see and act on the sender's spool and the receiver's
//! inbox, through the daemon's admin endpoint while it runs, or by opening
//! the store directly (without changing it) while it is stopped.
//!
//! Exit codes: 0 ok; 1 error (config, store, endpoint); 2 usage; 3 `status`
//! found a problem (receiver apply paused, sender capture failing);
//! 4 `skip` refused (not the blocking transaction, or apply not blocked).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use pgcourier_common::ops::admin::{percent_encode, request};
use serde_json::Value;

#[derive(Parser)]
#[command(
    version,
    about = "Inspect and act on pgcourier's spool (sender) and inbox (receiver)"
)]
struct Cli {
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    /// The daemon's config file (sender.toml or receiver.toml).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Is it flowing, how far behind, what is waiting or stuck.
    Status,
    /// One line per record: sequence, LSN, commit time, changes, bytes, tables.
    List {
        #[arg(long)]
        from: Option<u64>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// The decoded changes of one record.
    Show {
        seq: u64,
        #[arg(long, default_value = "sql")]
        format: String,
    },
    /// Refresh `status` every second (Ctrl-C to stop).
    Watch {
        /// Stop after this many refreshes.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Receiver: skip the transaction blocking apply; recorded with the
    /// reason, time and content in pgcourier.skipped on the target.
    Skip {
        seq: u64,
        #[arg(long)]
        reason: String,
    },
}

enum Daemon {
    Sender(pgcourier_sender::SenderConfig),
    Receiver(pgcourier_receiver::ReceiverConfig),
}

impl Daemon {
    fn load(path: &Path) -> anyhow::Result<Daemon> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config file {}", path.display()))?;
        let value: toml::Value = toml::from_str(&text)
            .with_context(|| format!("config file {} is not TOML", path.display()))?;
        if value.get("source").is_some() {
            Ok(Daemon::Sender(pgcourier_sender::SenderConfig::load(path)?))
        } else if value.get("target").is_some() {
            Ok(Daemon::Receiver(pgcourier_receiver::ReceiverConfig::load(
                path,
            )?))
        } else {
            bail!(
                "config file {} is neither a sender's (no `source`) nor a receiver's (no `target`)",
                path.display()
            )
        }
    }

    fn admin(&self) -> Option<SocketAddr> {
        match self {
            Daemon::Sender(c) => c.admin,
            Daemon::Receiver(c) => c.admin,
        }
    }
}

/// What the command got: JSON (status, list, show json) or text (show sql).
enum Answer {
    Json(Value),
    Text(String),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("pgcourier-queue: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<u8> {
    let path = cli
        .config
        .as_deref()
        .context("--config FILE is required: the sender's or receiver's config")?;
    let daemon = Daemon::load(path)?;
    match &cli.command {
        Command::Status => {
            let st = fetch_status(&daemon)?;
            print_status(&st, cli.json);
            Ok(status_code(&st))
        }
        Command::Watch { count } => {
            let mut n = 0;
            loop {
                let st = fetch_status(&daemon)?;
                if cli.json {
                    println!("{}", serde_json::to_string(&st)?);
                } else {
                    print!("\x1b[2J\x1b[H");
                    println!(
                        "pgcourier-queue watch ({}), every 1 s\n",
                        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    );
                    print_status(&st, false);
                }
                n += 1;
                if count.is_some_and(|c| n >= c) {
                    return Ok(0);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Command::List { from, limit } => {
            let mut q = format!("/records?limit={limit}");
            if let Some(f) = from {
                q.push_str(&format!("&from={f}"));
            }
            let answer = match via_admin(&daemon, "GET", &q)? {
                Some(a) => a,
                None => Answer::Json(offline_list(&daemon, *from, *limit)?),
            };
            let Answer::Json(v) = answer else {
                bail!("unexpected text answer")
            };
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:>10}  {:>14}  {:<24}  {:>7}  {:>9}  tables",
                    "seq", "commit lsn", "commit time", "changes", "bytes"
                );
                for r in v.as_array().into_iter().flatten() {
                    println!(
                        "{:>10}  {:>14}  {:<24}  {:>7}  {:>9}  {}{}",
                        r["seq"],
                        r["commit_lsn"].as_str().unwrap_or(""),
                        r["commit_time"].as_str().unwrap_or(""),
                        r["changes"],
                        human_bytes(r["bytes"].as_u64().unwrap_or(0)),
                        r["tables"]
                            .as_array()
                            .map(|t| t
                                .iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join(", "))
                            .unwrap_or_default(),
                        if r["last"].as_bool() == Some(false) {
                            "  (continues)"
                        } else {
                            ""
                        }
                    );
                }
            }
            Ok(0)
        }
        Command::Show { seq, format } => {
            let format = if cli.json { "json" } else { format.as_str() };
            if format != "sql" && format != "json" {
                bail!("--format is sql or json, not {format:?}");
            }
            let answer =
                match via_admin(&daemon, "GET", &format!("/records/{seq}?format={format}"))? {
                    Some(a) => a,
                    None => offline_show(&daemon, *seq, format)?,
                };
            match answer {
                Answer::Json(v) => println!("{}", serde_json::to_string_pretty(&v)?),
                Answer::Text(t) => print!("{t}"),
            }
            Ok(0)
        }
        Command::Skip { seq, reason } => {
            let Daemon::Receiver(_) = daemon else {
                bail!("skip is a receiver command: pass the receiver's config")
            };
            let addr = daemon.admin().context(
                "skip needs the running receiver's admin endpoint: set `admin` in its config",
            )?;
            let (code, body) = request(
                addr,
                "POST",
                &format!("/skip?seq={seq}&reason={}", percent_encode(reason)),
            )
            .with_context(|| {
                format!("reach the receiver's admin endpoint at {addr} (is the receiver running?)")
            })?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": code == 200, "message": body })
                );
            } else {
                println!("{body}");
            }
            Ok(if code == 200 { 0 } else { 4 })
        }
    }
}

/// Ask the running daemon; `None` when it has no admin endpoint or does not
/// answer (then the store is opened directly).
fn via_admin(daemon: &Daemon, method: &str, path: &str) -> anyhow::Result<Option<Answer>> {
    let Some(addr) = daemon.admin() else {
        return Ok(None);
    };
    match request(addr, method, path) {
        Ok((200, body)) => Ok(Some(match serde_json::from_str(&body) {
            Ok(v) => Answer::Json(v),
            Err(_) => Answer::Text(body),
        })),
        Ok((code, body)) => bail!("admin endpoint {addr} answered {code}: {body}"),
        Err(_) => Ok(None),
    }
}

fn fetch_status(daemon: &Daemon) -> anyhow::Result<Value> {
    if let Some(Answer::Json(v)) = via_admin(daemon, "GET", "/status")? {
        return Ok(v);
    }
    offline_status(daemon)
}

fn busy(e: impl std::fmt::Display, what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{e}\n(if the {what} is running, set `admin` in its config so pgcourier-queue can ask it)"
    )
}

fn receiver_names(c: &pgcourier_sender::SenderConfig) -> Vec<String> {
    c.receivers.iter().map(|r| r.name.clone()).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build tokio runtime")
}

fn open_inbox(
    c: &pgcourier_receiver::ReceiverConfig,
) -> anyhow::Result<pgcourier_receiver::inbox::Inbox> {
    if !c.inbox_dir.join("db").exists() {
        bail!(
            "no inbox at {} (setting `inbox-dir`)",
            c.inbox_dir.display()
        );
    }
    pgcourier_receiver::inbox::Inbox::open(&c.inbox_dir, 16 << 20).map_err(|e| busy(e, "receiver"))
}

fn offline_status(daemon: &Daemon) -> anyhow::Result<Value> {
    match daemon {
        Daemon::Sender(c) => {
            let spool = pgcourier_sender::spool::Spool::open_for_inspection(
                &c.spool_dir,
                &receiver_names(c),
            )
            .map_err(|e| busy(e, "sender"))?;
            // The slot is read from the source, if it answers.
            let mut capture = pgcourier_sender::capture::CaptureStatus::default();
            runtime().block_on(async {
                match pgcourier_sender::source::connect(&c.source).await {
                    Ok(client) => {
                        match pgcourier_sender::source::slot_stats(&client, &c.slot).await {
                            Ok(s) => capture.slot = s,
                            Err(e) => {
                                capture.last_error =
                                    Some(pgcourier_common::ops::backoff::error_chain(&e))
                            }
                        }
                    }
                    Err(e) => {
                        capture.last_error = Some(format!(
                            "sender stopped; {}",
                            pgcourier_common::ops::backoff::error_chain(&e)
                        ))
                    }
                }
            });
            Ok(serde_json::to_value(pgcourier_sender::admin::status(
                c, &spool, &capture, None, false,
            ))?)
        }
        Daemon::Receiver(c) => {
            let inbox = open_inbox(c)?;
            let mut apply = pgcourier_receiver::apply::ApplyStatus::default();
            // The applied position is the target's progress row.
            if let Some(source) = inbox.source()? {
                runtime().block_on(async {
                    let Ok((client, conn)) = c.target.connect(tokio_postgres::NoTls).await else {
                        apply.last_error = Some("receiver stopped and the target does not answer".into());
                        return;
                    };
                    tokio::spawn(conn);
                    let row = client
                        .query_opt(
                            "SELECT seq, commit_lsn::text, (extract(epoch FROM commit_time - '2000-01-01 00:00:00+00') * 1000000)::bigint \
                             FROM pgcourier.progress WHERE source = $1",
                            &[&source],
                        )
                        .await;
                    if let Ok(Some(r)) = row {
                        apply.applied_seq = r.get::<_, i64>(0) as u64;
                        apply.applied_commit_lsn = r.get::<_, String>(1).parse().unwrap_or_default();
                        apply.applied_commit_time = r.get::<_, Option<i64>>(2).unwrap_or(0);
                    }
                });
            }
            Ok(serde_json::to_value(pgcourier_receiver::admin::status(
                &inbox, &apply, None, false,
            ))?)
        }
    }
}

fn offline_list(daemon: &Daemon, from: Option<u64>, limit: usize) -> anyhow::Result<Value> {
    Ok(match daemon {
        Daemon::Sender(c) => {
            let spool = pgcourier_sender::spool::Spool::open_for_inspection(
                &c.spool_dir,
                &receiver_names(c),
            )
            .map_err(|e| busy(e, "sender"))?;
            serde_json::to_value(pgcourier_sender::admin::list(&spool, from, limit))?
        }
        Daemon::Receiver(c) => serde_json::to_value(pgcourier_receiver::admin::list(
            &open_inbox(c)?,
            from,
            limit,
        ))?,
    })
}

fn offline_show(daemon: &Daemon, seq: u64, format: &str) -> anyhow::Result<Answer> {
    let resp = match daemon {
        Daemon::Sender(c) => {
            let spool = pgcourier_sender::spool::Spool::open_for_inspection(
                &c.spool_dir,
                &receiver_names(c),
            )
            .map_err(|e| busy(e, "sender"))?;
            pgcourier_sender::admin::show(&spool, seq, format)
        }
        Daemon::Receiver(c) => pgcourier_receiver::admin::show(&open_inbox(c)?, seq, format),
    };
    if resp.status != 200 {
        bail!("{}", resp.body);
    }
    Ok(if format == "json" {
        Answer::Json(serde_json::from_str(&resp.body)?)
    } else {
        Answer::Text(resp.body)
    })
}

fn status_code(st: &Value) -> u8 {
    let paused = st["apply_state"].as_str() == Some("paused");
    let capture_failing =
        st["role"] == "sender" && st["running"] == true && !st["capture_error"].is_null();
    if paused || capture_failing {
        3
    } else {
        0
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn human_secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// A table copy in progress: totals with a bar, then each table.
fn print_copy(copy: &Value, what: &str, verb: &str) {
    if !copy.is_object() {
        return;
    }
    let tables: Vec<(String, u64, u64)> = copy["tables"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            if t.is_array() {
                // Receiver: [table, rows, estimate].
                (
                    t[0].as_str().unwrap_or("-").to_owned(),
                    t[1].as_u64().unwrap_or(0),
                    t[2].as_u64().unwrap_or(0),
                )
            } else {
                (
                    t["table"].as_str().unwrap_or("-").to_owned(),
                    t["rows"].as_u64().unwrap_or(0),
                    t["rows_estimate"].as_u64().unwrap_or(0),
                )
            }
        })
        .collect();
    let total: u64 = tables.iter().map(|t| t.2).sum();
    println!(
        "{:<18}{} ({}, cut {})",
        what,
        pgcourier_common::ops::progress::line(
            verb,
            copy["rows"].as_u64().unwrap_or(0),
            total,
            copy["rows_per_second"].as_f64().unwrap_or(0.0),
            copy["eta_seconds"].as_f64(),
        ),
        copy["reason"].as_str().unwrap_or("-"),
        copy["cut_lsn"].as_str().unwrap_or("-"),
    );
    for (name, rows, est) in tables {
        println!("  {name:<30} {rows} of ~{est} rows");
    }
}

fn print_status(st: &Value, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(st).unwrap_or_default());
        return;
    }
    let s = |k: &str| st[k].as_str().unwrap_or("-").to_string();
    let u = |k: &str| st[k].as_u64().unwrap_or(0);
    let f = |k: &str| st[k].as_f64().unwrap_or(0.0);
    let state = if st["running"] == true {
        "running"
    } else {
        "stopped (read from its store)"
    };
    if st["role"] == "sender" {
        println!("sender            {state}");
        println!("source            {}", s("source"));
        if let Some(slot) = st["slot"].as_object() {
            println!(
                "slot              {} ({}), confirmed {}, WAL retained on the source {}",
                slot.get("slot").and_then(|v| v.as_str()).unwrap_or("-"),
                if slot.get("active") == Some(&Value::Bool(true)) {
                    "active"
                } else {
                    "inactive"
                },
                slot.get("confirmed_flush_lsn")
                    .and_then(|v| v.as_str())
                    .unwrap_or("-"),
                human_bytes(
                    slot.get("retained_wal_bytes")
                        .and_then(|v| v.as_u64())
                        .unwrap_or(0)
                )
            );
        }
        println!("captured up to    {}", s("captured_end_lsn"));
        println!(
            "spool             {} records, {}, oldest {} ({} old)",
            u("spool_records"),
            human_bytes(u("spool_bytes")),
            s("oldest_commit_time"),
            human_secs(f("oldest_age_seconds"))
        );
        if !st["capture_error"].is_null() {
            println!("capture error     {}", s("capture_error"));
        }
        print_copy(&st["copy"], "copying", "read");
        if u("copy_waiting") > 0 {
            println!(
                "copy waiting      {} tables (their changes wait with them)",
                u("copy_waiting")
            );
        }
        if let Some(seed) = st["last_seed"].as_object() {
            match seed.get("error").and_then(|e| e.as_str()) {
                Some(e) => println!(
                    "last seed         {} failed: {e}",
                    seed["path"].as_str().unwrap_or("-")
                ),
                None => println!(
                    "last seed         {} (live shipping continues after record {})",
                    seed["path"].as_str().unwrap_or("-"),
                    seed["summary"]["marker_seq"]
                ),
            }
        }
        for r in st["receivers"].as_array().into_iter().flatten() {
            let link = &r["link"];
            let conn = if link["connected"] == true {
                format!(
                    "connected since {} from {}, rtt {:.1} ms, in flight {}, {}/s",
                    link["connected_since"].as_str().unwrap_or("-"),
                    link["peer"].as_str().unwrap_or("-"),
                    link["rtt_ms"].as_f64().unwrap_or(0.0),
                    human_bytes(link["in_flight_bytes"].as_u64().unwrap_or(0)),
                    human_bytes(link["throughput_bytes_per_sec"].as_f64().unwrap_or(0.0) as u64)
                )
            } else {
                "not connected".into()
            };
            println!(
                "receiver {:<8} acked {} ({} records, {} behind, lag {}); {conn}",
                r["name"].as_str().unwrap_or("-"),
                r["acked_seq"],
                r["records_behind"],
                human_bytes(r["bytes_behind"].as_u64().unwrap_or(0)),
                human_secs(r["lag_seconds"].as_f64().unwrap_or(0.0))
            );
        }
        if let Some(sh) = st["shipping"].as_object() {
            println!(
                "shipped           {} batches, {} records, {} raw → {} compressed (ratio {:.1})",
                sh["batches"],
                sh["records"],
                human_bytes(sh["raw_bytes"].as_u64().unwrap_or(0)),
                human_bytes(sh["compressed_bytes"].as_u64().unwrap_or(0)),
                sh["compression_ratio"].as_f64().unwrap_or(0.0)
            );
        }
    } else {
        println!("receiver          {state}");
        println!("source            {}", s("source"));
        println!(
            "inbox             {} records, {}, durable up to {}",
            u("inbox_records"),
            human_bytes(u("inbox_bytes")),
            u("durable_seq")
        );
        println!(
            "applied           record {} (commit {} at {})",
            u("applied_seq"),
            s("applied_commit_lsn"),
            s("applied_commit_time")
        );
        println!(
            "apply             {}, lag {} behind the source commit",
            s("apply_state"),
            human_secs(f("apply_lag_seconds"))
        );
        if !st["last_error"].is_null() {
            println!(
                "last error        {} ({})",
                s("last_error"),
                s("error_class")
            );
        }
        print_copy(&st["copy"], "loading copy", "loaded");
        if let Some(b) = st["blocking_seq"].as_u64() {
            println!("blocked at        record {b}: fix the target, or `pgcourier-queue skip {b} --reason ...`");
        }
        let link = &st["link"];
        if link.is_object() {
            if link["connected"] == true {
                println!(
                    "link              connected since {} to {}, rtt {:.1} ms, {} batches, ratio {:.1}",
                    link["connected_since"].as_str().unwrap_or("-"),
                    link["peer"].as_str().unwrap_or("-"),
                    link["rtt_ms"].as_f64().unwrap_or(0.0),
                    link["batches"],
                    link["raw_bytes"].as_f64().unwrap_or(0.0) / link["compressed_bytes"].as_f64().unwrap_or(1.0).max(1.0)
                );
            } else {
                println!("link              not connected");
            }
        }
    }
}
