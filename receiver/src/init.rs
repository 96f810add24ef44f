//! `pgcourier-receiver init`: a receiver set up from flags, without an
//! editor. Keeps the certificate and key next to the config if both exist
//! (made by `keygen`), makes them otherwise, and writes a new config (mode
//! 0640) holding only what the flags say; every other setting keeps its
//! default (docs/configuration.md). `main` prints the fingerprint for the
//! sender's `[[receiver]]` entry and then logs in to the target once.

use std::path::PathBuf;
use std::time::Duration;

use pgcourier_common::ops::init::{ensure_identity, identity_paths, toml_string, write_config};
use pgcourier_common::transport::tls::Fingerprint;

use crate::ReceiverConfig;

/// What `init` is told.
pub struct Init {
    /// The config file to write (must not exist).
    pub config: PathBuf,
    /// `target`: the branch database's connection string.
    pub target: String,
    /// `inbox-dir`.
    pub inbox_dir: PathBuf,
    /// `sender-fingerprints`.
    pub sender_fingerprints: Vec<Fingerprint>,
    /// `listen` (the sender dials us) or `sender-address` (we dial it).
    pub link: LinkArg,
    /// The certificate's name, when one is made.
    pub name: String,
}

pub enum LinkArg {
    Listen(String),
    SenderAddress(String),
}

/// What `init` did.
pub type Initialized = pgcourier_common::ops::init::Initialized<ReceiverConfig>;

pub fn init(args: &Init) -> anyhow::Result<Initialized> {
    let (cert, key) = identity_paths(&args.config, "receiver");
    let (fingerprint, made_keys) = ensure_identity(&cert, &key, &args.name)?;
    let link = match &args.link {
        LinkArg::Listen(a) => format!("listen = {}", toml_string(a)),
        LinkArg::SenderAddress(a) => format!("sender-address = {}", toml_string(a)),
    };
    let pins: Vec<String> = args
        .sender_fingerprints
        .iter()
        .map(|f| toml_string(&f.to_string()))
        .collect();
    let text = format!(
        "# Written by pgcourier-receiver init. Every setting: docs/configuration.md\n\
         # and /usr/share/doc/pgcourier/examples/receiver.toml.\n\
         target = {}\ninbox-dir = {}\ncert = \"receiver.crt\"\nkey = \"receiver.key\"\n{link}\n\
         sender-fingerprints = [{}]\n",
        toml_string(&args.target),
        toml_string(&args.inbox_dir.to_string_lossy()),
        pins.join(", ")
    );
    let config = write_config(&args.config, &text, ReceiverConfig::load)?;
    Ok(Initialized {
        config,
        fingerprint,
        made_keys,
        cert,
        key,
    })
}

/// Log in to the target once (at most 15 s): what `run` needs at start.
/// The error says what went wrong, naming the setting.
pub async fn check_target(cfg: &ReceiverConfig) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(15), cfg.target.connect()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(match e.login_refused() {
            Some(hint) => {
                format!("the target database refused the login (setting `target`): {hint}")
            }
            None => format!(
                "cannot connect to the target database (setting `target`): {}",
                pgcourier_common::ops::backoff::error_chain(&e)
            ),
        }),
        Err(_) => Err("the target database (setting `target`) did not answer within 15 s".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_config_the_receiver_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fp: Fingerprint = "6191c7fd4d214a30c0b0d6e1d5bd1a1f2b1f6b7c9a0e0b3a4e2d1c0b9a8f7e6d"
            .parse()
            .expect("fingerprint");
        let args = Init {
            config: dir.path().join("receiver-branch1.toml"),
            target: "host=/run/postgresql dbname=branch".into(),
            inbox_dir: "/var/lib/pgcourier/branch1/inbox".into(),
            sender_fingerprints: vec![fp],
            link: LinkArg::SenderAddress("hq.example:7740".into()),
            name: "branch1".into(),
        };
        let done = init(&args).expect("init");
        assert!(done.made_keys);
        assert_eq!(done.config.sender_fingerprints, [fp]);
        assert!(matches!(done.config.link, crate::config::Link::Dial(_)));
        assert_eq!(
            done.config.inbox_dir,
            PathBuf::from("/var/lib/pgcourier/branch1/inbox")
        );
    }
}
