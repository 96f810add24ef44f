use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use pgcourier_common::ops::cli::{self, LogFormat, CONFIG_ENV};
use pgcourier_receiver::ReceiverConfig;

/// pgcourier-receiver: receive changes from the headquarters sender over QUIC,
/// store them durably and apply them to the branch database exactly once.
#[derive(Parser)]
#[command(
    version,
    after_help = "Examples:\n  pgcourier-receiver keygen --cert /etc/pgcourier/branch1.crt --key /etc/pgcourier/branch1.key --name branch1\n  pgcourier-receiver run --config /etc/pgcourier/receiver-branch1.toml"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the receiver daemon.
    #[command(
        after_help = "Example:\n  pgcourier-receiver run --config /etc/pgcourier/receiver-branch1.toml --log-format json"
    )]
    Run {
        /// Path of the TOML configuration file (see examples/ and docs/configuration.md).
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t)]
        log_format: LogFormat,
    },
    /// Seed files exported by `pgcourier-sender seed export`.
    #[command(
        after_help = "Example:\n  pgcourier-receiver seed import --config /etc/pgcourier/receiver-branch1.toml /media/disk/branch1.seed"
    )]
    Seed {
        #[command(subcommand)]
        action: SeedAction,
    },
    /// Write a key and self-signed certificate; print its SHA-256 fingerprint.
    #[command(
        after_help = "Example:\n  pgcourier-receiver keygen --cert /etc/pgcourier/branch1.crt --key /etc/pgcourier/branch1.key --name branch1"
    )]
    Keygen {
        #[arg(long, default_value = "receiver.crt")]
        cert: PathBuf,
        #[arg(long, default_value = "receiver.key")]
        key: PathBuf,
        #[arg(long, default_value = "pgcourier-receiver")]
        name: String,
    },
}

#[derive(Subcommand)]
enum SeedAction {
    /// Verify a seed file, then load it into the branch (the receiver must be
    /// stopped); live shipping continues right after the seed's position.
    #[command(
        after_help = "Example:\n  pgcourier-receiver seed import --config /etc/pgcourier/receiver-branch1.toml /media/disk/branch1.seed"
    )]
    Import {
        /// Path of the TOML configuration file.
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
        /// The seed file.
        file: PathBuf,
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
                    eprintln!(
                        "wrote {} and {} (pin this fingerprint in the sender's [[receiver]] entry)",
                        cert.display(),
                        key.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => pgcourier_common::ops::logging::fail("pgcourier-receiver", &e),
            }
        }
        Command::Seed {
            action: SeedAction::Import { config, file },
        } => {
            pgcourier_common::ops::logging::init(LogFormat::Human);
            let cfg = match ReceiverConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return pgcourier_common::ops::logging::fail("pgcourier-receiver", &e),
            };
            match pgcourier_receiver::seed::import(cfg, &file) {
                Ok(i) => {
                    if i.completed_earlier {
                        println!("seed {} was applied by an interrupted import; the inbox now continues after record {}", file.display(), i.marker_seq);
                    } else {
                        println!(
                            "imported {}: {} rows from {} records; cut {}; live shipping continues after record {}",
                            file.display(), i.rows, i.records, i.cut_lsn, i.marker_seq
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pgcourier-receiver: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run { config, log_format } => pgcourier_common::ops::logging::run_daemon(
            "pgcourier-receiver",
            log_format,
            || ReceiverConfig::load(&config),
            pgcourier_receiver::run,
        ),
    }
}
