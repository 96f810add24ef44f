//! pgcourier-queue: see and act on the sender's spool and the receiver's
//! inbox, through the daemon's admin endpoint while it runs, or by opening
//! the store directly (without changing it) while it is stopped. Installed
//! at both sites; the config file says which daemon it is about.
//!
//! `fetch` gets the typed views (endpoint or store), `render` prints them
//! for a person; `--json` prints them as the daemon serializes them.
//!
//! Exit codes: 0 ok; 1 error (config, store, endpoint); 2 usage; 3 `status`
//! found a problem (receiver apply paused, sender capture failing);
//! 4 `skip` refused (not the blocking transaction, or apply not blocked),
//! or `conflicts resolve` refused (no such conflict, or not open).

mod conflicts;
mod fetch;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use pgcourier_common::ops::cli::{self, CONFIG_ENV};
use pgcourier_receiver::admin::ApplyState;

use crate::fetch::{Daemon, Status};

#[derive(Parser)]
#[command(
    version,
    about = "Inspect and act on pgcourier's spool (sender) and inbox (receiver)",
    after_help = "Examples:\n  sudo -u pgcourier pgcourier-queue --config /etc/pgcourier/sender.toml status\n  sudo -u pgcourier pgcourier-queue --config /etc/pgcourier/receiver-branch1.toml list --limit 5"
)]
struct Cli {
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    /// The daemon's config file (sender.toml or receiver.toml).
    #[arg(long, short, global = true, env = CONFIG_ENV)]
    config: Option<PathBuf>,
    /// With a site file (one file for the site's sender and receivers):
    /// the receiver of this peer's changes (its `[apply.<peer>]` section);
    /// without it, the site's sender.
    #[arg(long, global = true)]
    peer: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Is it flowing, how far behind, what is waiting or stuck.
    #[command(
        after_help = "Example:\n  pgcourier-queue --config /etc/pgcourier/sender.toml status --json"
    )]
    Status,
    /// One line per record: sequence, LSN, commit time, changes, bytes, tables.
    #[command(
        after_help = "Example:\n  pgcourier-queue --config /etc/pgcourier/receiver-branch1.toml list --from 1200 --limit 50"
    )]
    List {
        #[arg(long)]
        from: Option<u64>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// The decoded changes of one record.
    #[command(
        after_help = "Example:\n  pgcourier-queue --config /etc/pgcourier/receiver-branch1.toml show 1234 --format json"
    )]
    Show {
        seq: u64,
        #[arg(long, value_enum, default_value_t)]
        format: ShowFormat,
    },
    /// Refresh `status` every second (Ctrl-C to stop).
    #[command(
        after_help = "Example:\n  pgcourier-queue --config /etc/pgcourier/sender.toml watch"
    )]
    Watch {
        /// Stop after this many refreshes.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Receiver: skip the transaction blocking apply; recorded with the
    /// reason, time and content in pgcourier.skipped on the target.
    #[command(
        after_help = "Example:\n  pgcourier-queue --config /etc/pgcourier/receiver-branch1.toml skip 1234 --reason \"row deleted on the branch by hand; ticket 42\""
    )]
    Skip {
        seq: u64,
        #[arg(long)]
        reason: String,
    },
    /// Conflicts recorded at this site on tables written at several sites
    /// (pgcourier.conflicts): list, show, resolve a parked one.
    #[command(
        subcommand,
        after_help = "Examples:\n  pgcourier-queue --config /etc/pgcourier/receiver.toml conflicts list --open\n  pgcourier-queue --config /etc/pgcourier/receiver.toml conflicts show 17\n  pgcourier-queue --config /etc/pgcourier/receiver.toml conflicts resolve 17 --keep remote"
    )]
    Conflicts(ConflictsAction),
}

#[derive(Subcommand)]
enum ConflictsAction {
    /// The latest conflicts, newest first.
    List {
        /// Only those parked for an operator (policy manual).
        #[arg(long)]
        open: bool,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// One conflict with both versions and their clocks.
    Show { id: i64 },
    /// Decide a parked conflict: write the kept version here as a local
    /// change, which every other site then applies.
    Resolve {
        id: i64,
        /// Which version to keep: this site's or the one that arrived.
        #[arg(long, value_enum)]
        keep: Keep,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Keep {
    Local,
    Remote,
}

/// How `show` prints a record's changes.
#[derive(Clone, Copy, Default, ValueEnum)]
enum ShowFormat {
    /// As SQL statements.
    #[default]
    Sql,
    /// As the daemon serializes them.
    Json,
}

fn main() -> ExitCode {
    if let Some(code) = cli::generate_if_asked(Cli::command) {
        return code;
    }
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

/// 3 when the status shows a problem an operator must look at.
fn status_code(st: &Status) -> u8 {
    let problem = match st {
        Status::Receiver(r) => r.apply_state == ApplyState::Paused,
        Status::Sender(s) => s.running && s.capture_error.is_some(),
    };
    if problem {
        3
    } else {
        0
    }
}

fn run(cli: &Cli) -> anyhow::Result<u8> {
    let path = cli.config.as_deref().context(
        "--config FILE (or PGCOURIER_CONFIG) is required: the sender's or receiver's config",
    )?;
    let daemon = Daemon::load(path, cli.peer.as_deref())?;
    match &cli.command {
        Command::Status => {
            let st = fetch::status(&daemon)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", render::status(&st));
            }
            Ok(status_code(&st))
        }
        Command::Watch { count } => {
            // Bounded by --count, or by the operator's Ctrl-C.
            let mut n = 0;
            loop {
                let st = fetch::status(&daemon)?;
                if cli.json {
                    println!("{}", serde_json::to_string(&st)?);
                } else {
                    print!("\x1b[2J\x1b[H");
                    println!(
                        "pgcourier-queue watch ({}), every 1 s\n",
                        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    );
                    print!("{}", render::status(&st));
                }
                n += 1;
                if count.is_some_and(|c| n >= c) {
                    return Ok(0);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Command::List { from, limit } => {
            let lines = fetch::list(&daemon, *from, *limit)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&lines)?);
            } else {
                println!("{}", render::list(&lines));
            }
            Ok(0)
        }
        Command::Show { seq, format } => {
            match (cli.json, format) {
                (true, _) | (_, ShowFormat::Json) => {
                    println!("{}", fetch::show(&daemon, *seq, "json")?)
                }
                (false, ShowFormat::Sql) => print!("{}", fetch::show(&daemon, *seq, "sql")?),
            }
            Ok(0)
        }
        Command::Conflicts(action) => match action {
            ConflictsAction::List { open, limit } => {
                let found = conflicts::list(&daemon, *open, *limit)?;
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&found)?);
                } else {
                    println!("{}", conflicts::render_list(&found));
                }
                Ok(0)
            }
            ConflictsAction::Show { id } => {
                let c = conflicts::show(&daemon, *id)?;
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&c)?);
                } else {
                    print!("{}", conflicts::render_one(&c));
                }
                Ok(0)
            }
            ConflictsAction::Resolve { id, keep } => {
                let keep = match keep {
                    Keep::Local => "local",
                    Keep::Remote => "remote",
                };
                let (done, message) = conflicts::resolve(&daemon, *id, keep)?;
                if cli.json {
                    println!("{}", serde_json::json!({ "ok": done, "message": message }));
                } else {
                    println!("{message}");
                }
                Ok(if done { 0 } else { 4 })
            }
        },
        Command::Skip { seq, reason } => {
            let (accepted, message) = fetch::skip(&daemon, *seq, reason)?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": accepted, "message": message })
                );
            } else {
                println!("{message}");
            }
            Ok(if accepted { 0 } else { 4 })
        }
    }
}
