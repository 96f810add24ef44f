use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgcourier_receiver::ReceiverConfig;

/// pgcourier-receiver: receive changes from the headquarters sender over QUIC,
/// store them durably and apply them to the branch database exactly once.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the receiver daemon.
    Run {
        /// Path of the TOML configuration file (see examples/ and docs/configuration.md).
        #[arg(long, short)]
        config: PathBuf,
        /// Log format: human or json.
        #[arg(long, default_value = "human")]
        log_format: String,
    },
    /// Seed files exported by `pgcourier-sender seed export`.
    Seed {
        #[command(subcommand)]
        action: SeedAction,
    },
    /// Write a key and self-signed certificate; print its SHA-256 fingerprint.
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
    Import {
        /// Path of the TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The seed file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
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
            pgcourier_common::ops::logging::init("human");
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
            &log_format,
            || ReceiverConfig::load(&config),
            pgcourier_receiver::run,
        ),
    }
}
