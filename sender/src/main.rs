use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use pgcourier_common::ops::cli::{self, LogFormat, CONFIG_ENV};
use pgcourier_sender::SenderConfig;

/// pgcourier-sender: capture changes from the headquarters database, spool
/// them durably and ship them to branch receivers over QUIC.
#[derive(Parser)]
#[command(
    version,
    after_help = "Examples:\n  pgcourier-sender keygen --cert /etc/pgcourier/sender.crt --key /etc/pgcourier/sender.key\n  pgcourier-sender check --config /etc/pgcourier/sender.toml\n  pgcourier-sender run --config /etc/pgcourier/sender.toml"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sender daemon.
    #[command(
        after_help = "Example:\n  pgcourier-sender run --config /etc/pgcourier/sender.toml --log-format json"
    )]
    Run {
        /// Path of the TOML configuration file (see examples/ and docs/configuration.md).
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
        /// How to log to stderr (the level: RUST_LOG, default info).
        #[arg(long, value_enum, default_value_t)]
        log_format: LogFormat,
    },
    /// Verify the source's prerequisites and print each problem with its fix.
    #[command(
        after_help = "Example:\n  pgcourier-sender check --config /etc/pgcourier/sender.toml"
    )]
    Check {
        /// Path of the TOML configuration file (see examples/ and docs/configuration.md).
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
    },
    /// Set up a sender without an editor: keep the certificate and key next
    /// to the config (sender.crt, sender.key) or make them, write a new config
    /// (mode 0640) from these flags, print the fingerprint for the branches,
    /// then run `check`.
    #[command(
        after_help = "Example:\n  pgcourier-sender init --config /etc/pgcourier/sender.toml --source \"host=/var/run/postgresql dbname=hq user=pgcourier\" --spool-dir /var/lib/pgcourier/spool --receiver branch1=<fingerprint printed by pgcourier-receiver keygen>@branch1.example:7741"
    )]
    Init {
        /// The config file to write (it must not exist).
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
        /// The source database (setting `source`): a libpq connection string or URI.
        #[arg(long, value_name = "DSN")]
        source: String,
        /// The spool's directory (setting `spool-dir`).
        #[arg(long)]
        spool_dir: PathBuf,
        /// A branch: its name, its certificate's fingerprint and, when the
        /// sender dials it, its address. Repeat for each branch.
        #[arg(
            long = "receiver",
            value_name = "NAME=FINGERPRINT[@ADDRESS]",
            required = true
        )]
        receivers: Vec<pgcourier_sender::init::ReceiverArg>,
        /// Accept receivers that dial in at this address (setting `listen`).
        #[arg(long)]
        listen: Option<String>,
        /// The certificate's name, when one is made.
        #[arg(long, default_value = "pgcourier-sender")]
        name: String,
    },
    /// Seed files: a snapshot of the published tables that travels on a disk.
    #[command(
        after_help = "Example:\n  pgcourier-sender seed export --config /etc/pgcourier/sender.toml --out /media/disk/branch7.seed"
    )]
    Seed {
        #[command(subcommand)]
        action: SeedAction,
    },
    /// Write a key and self-signed certificate; print its SHA-256 fingerprint.
    #[command(
        after_help = "Example:\n  pgcourier-sender keygen --cert /etc/pgcourier/sender.crt --key /etc/pgcourier/sender.key --name hq"
    )]
    Keygen {
        #[arg(long, default_value = "sender.crt")]
        cert: PathBuf,
        #[arg(long, default_value = "sender.key")]
        key: PathBuf,
        #[arg(long, default_value = "pgcourier-sender")]
        name: String,
    },
}

#[derive(Subcommand)]
enum SeedAction {
    /// Write the published tables, as of now, to one compressed, checksummed
    /// file for `pgcourier-receiver seed import`; live shipping continues
    /// from the same point. Asks the running sender through its admin socket (`admin-socket`), or
    /// works on the spool itself when the sender is stopped.
    #[command(
        after_help = "Example:\n  pgcourier-sender seed export --config /etc/pgcourier/sender.toml --out /media/disk/branch7.seed"
    )]
    Export {
        /// Path of the TOML configuration file.
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
        /// The seed file to write (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    if let Some(code) = cli::generate_if_asked(Cli::command) {
        return code;
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Keygen { cert, key, name } => {
            match pgcourier_common::transport::tls::keygen(&cert, &key, &name) {
                Ok(fp) => {
                    println!("{fp}");
                    eprintln!("wrote {} and {} (pin this fingerprint in each receiver's sender-fingerprints)", cert.display(), key.display());
                    ExitCode::SUCCESS
                }
                Err(e) => pgcourier_common::ops::logging::fail("pgcourier-sender", &e),
            }
        }
        Command::Seed {
            action: SeedAction::Export { config, out },
        } => {
            pgcourier_common::ops::logging::init(LogFormat::Human);
            let cfg = match SenderConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return pgcourier_common::ops::logging::fail("pgcourier-sender", &e),
            };
            match pgcourier_sender::seed::export(cfg, &out) {
                Ok(s) => {
                    println!(
                        "wrote {}: {} tables, {} rows, {} records, {} bytes in {:.1}s; cut {} ; live shipping continues after record {}",
                        s.path, s.tables, s.rows, s.records, s.file_bytes, s.seconds, s.cut_lsn, s.marker_seq
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pgcourier-sender: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Check { config } => match SenderConfig::load(&config) {
            Ok(cfg) => check(&cfg),
            Err(e) => pgcourier_common::ops::logging::fail("pgcourier-sender", &e),
        },
        Command::Init {
            config,
            source,
            spool_dir,
            receivers,
            listen,
            name,
        } => {
            let args = pgcourier_sender::init::Init {
                config,
                source,
                spool_dir,
                listen,
                receivers,
                name,
            };
            match pgcourier_sender::init::init(&args) {
                Ok(done) => {
                    println!("{}", done.fingerprint);
                    let keys = if done.made_keys { "made" } else { "kept" };
                    eprintln!(
                        "wrote {} ({keys} {} and {}); pin this fingerprint in each receiver's sender-fingerprints",
                        args.config.display(),
                        done.cert.display(),
                        done.key.display()
                    );
                    check(&done.config)
                }
                Err(e) => {
                    eprintln!("pgcourier-sender: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run { config, log_format } => pgcourier_common::ops::logging::run_daemon(
            "pgcourier-sender",
            log_format,
            || SenderConfig::load(&config),
            pgcourier_sender::run,
        ),
    }
}

/// Check the source's prerequisites, print each problem with its fix; exit
/// 1 if there is one.
fn check(cfg: &SenderConfig) -> ExitCode {
    let rt = pgcourier_common::ops::logging::runtime();
    let (problems, notes) = rt.block_on(pgcourier_sender::source::check(cfg));
    for n in &notes {
        println!("note: {n}");
    }
    for p in &problems {
        println!("problem: {}\n    fix: {}", p.what, p.fix);
    }
    if problems.is_empty() {
        println!("ok: the source is ready for pgcourier");
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
