use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use pgcourier_common::ops::cli::{self, LogFormat, CONFIG_ENV, PEER_ENV};
use pgcourier_common::transport::tls::Fingerprint;
use pgcourier_receiver::init::LinkArg;
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
        /// In a site file, the peer whose changes this receiver applies
        /// (its `[apply.<peer>]` section; needed when there are several;
        /// the unit pgcourier-receiver@<peer> sets it). Ignored for a
        /// receiver's own config file.
        #[arg(long, env = PEER_ENV)]
        peer: Option<String>,
        /// How to log to stderr (the level: RUST_LOG, default info).
        #[arg(long, value_enum, default_value_t)]
        log_format: LogFormat,
    },
    /// Set up a receiver without an editor: keep the certificate and key
    /// next to the config (receiver.crt, receiver.key) or make them, write a
    /// new config (mode 0640) from these flags, print the fingerprint for the
    /// sender's [[receiver]] entry, then log in to the target once.
    #[command(
        after_help = "Example:\n  pgcourier-receiver init --config /etc/pgcourier/receiver-branch1.toml --target \"host=/var/run/postgresql dbname=branch\" --inbox-dir /var/lib/pgcourier/branch1/inbox --listen 0.0.0.0:7741 --sender-fingerprint <fingerprint printed by pgcourier-sender init>"
    )]
    Init {
        /// The config file to write (it must not exist).
        #[arg(long, short, env = CONFIG_ENV)]
        config: PathBuf,
        /// The branch database (setting `target`): a libpq connection string or URI.
        #[arg(long, value_name = "DSN")]
        target: String,
        /// The inbox's directory (setting `inbox-dir`).
        #[arg(long)]
        inbox_dir: PathBuf,
        /// The sender's certificate fingerprint (setting
        /// `sender-fingerprints`). Repeat for a second sender.
        #[arg(
            long = "sender-fingerprint",
            value_name = "FINGERPRINT",
            required = true
        )]
        sender_fingerprints: Vec<Fingerprint>,
        /// The sender dials us at this address (setting `listen`).
        #[arg(
            long,
            required_unless_present = "sender_address",
            conflicts_with = "sender_address"
        )]
        listen: Option<String>,
        /// We dial the sender at this address (setting `sender-address`; reverse mode).
        #[arg(long)]
        sender_address: Option<String>,
        /// The certificate's name, when one is made.
        #[arg(long, default_value = "pgcourier-receiver")]
        name: String,
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
        /// In a site file, the peer whose `[apply.<peer>]` section to use.
        #[arg(long, env = PEER_ENV)]
        peer: Option<String>,
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
        Command::Init {
            config,
            target,
            inbox_dir,
            sender_fingerprints,
            listen,
            sender_address,
            name,
        } => {
            let link = match (listen, sender_address) {
                (Some(a), _) => LinkArg::Listen(a),
                (None, Some(a)) => LinkArg::SenderAddress(a),
                (None, None) => unreachable!("clap requires --listen or --sender-address"),
            };
            let args = pgcourier_receiver::init::Init {
                config,
                target,
                inbox_dir,
                sender_fingerprints,
                link,
                name,
            };
            let done = match pgcourier_receiver::init::init(&args) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("pgcourier-receiver: {e:#}");
                    return ExitCode::from(2);
                }
            };
            println!("{}", done.fingerprint);
            let keys = if done.made_keys { "made" } else { "kept" };
            eprintln!(
                "wrote {} ({keys} {} and {}); pin this fingerprint in the sender's [[receiver]] entry",
                args.config.display(),
                done.cert.display(),
                done.key.display()
            );
            let rt = pgcourier_common::ops::logging::runtime();
            match rt.block_on(pgcourier_receiver::init::check_target(&done.config)) {
                Ok(()) => {
                    println!("ok: the target accepts the login");
                    ExitCode::SUCCESS
                }
                Err(problem) => {
                    println!("problem: {problem}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Seed {
            action: SeedAction::Import { config, peer, file },
        } => {
            pgcourier_common::ops::logging::init(LogFormat::Human);
            let cfg = match ReceiverConfig::load_peer(&config, peer.as_deref()) {
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
        Command::Run {
            config,
            peer,
            log_format,
        } => pgcourier_common::ops::logging::run_daemon(
            "pgcourier-receiver",
            log_format,
            || ReceiverConfig::load_peer(&config, peer.as_deref()),
            pgcourier_receiver::run,
        ),
    }
}
