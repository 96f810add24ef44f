//! `pgcourier-sender init`: a sender set up from flags, without an editor.
//! Keeps the certificate and key next to the config if both exist (made by
//! `keygen`), makes them otherwise, and writes a new config (mode 0640)
//! holding only what the flags say; every other setting keeps its default
//! (docs/configuration.md). `main` prints the fingerprint for the branches
//! and runs `check`.

use std::path::PathBuf;
use std::str::FromStr;

use pgcourier_common::ops::init::{ensure_identity, identity_paths, toml_string, write_config};
use pgcourier_common::transport::tls::Fingerprint;

use crate::SenderConfig;

/// What `init` is told.
pub struct Init {
    /// The config file to write (must not exist).
    pub config: PathBuf,
    /// `source`: the source database's connection string.
    pub source: String,
    /// `spool-dir`.
    pub spool_dir: PathBuf,
    /// `listen`, for receivers that dial in.
    pub listen: Option<String>,
    /// One `[[receiver]]` each.
    pub receivers: Vec<ReceiverArg>,
    /// The certificate's name, when one is made.
    pub name: String,
}

/// `NAME=FINGERPRINT` or `NAME=FINGERPRINT@ADDRESS` (the sender dials
/// ADDRESS; without it the receiver dials our `listen`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiverArg {
    pub name: String,
    pub fingerprint: String,
    pub address: Option<String>,
}

impl FromStr for ReceiverArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, rest) = s
            .split_once('=')
            .ok_or("expected NAME=FINGERPRINT[@ADDRESS]")?;
        let (fingerprint, address) = match rest.split_once('@') {
            Some((fp, addr)) => (fp, Some(addr.to_string())),
            None => (rest, None),
        };
        fingerprint
            .parse::<Fingerprint>()
            .map_err(|e| format!("the fingerprint of {name:?}: {e}"))?;
        Ok(ReceiverArg {
            name: name.to_string(),
            fingerprint: fingerprint.to_string(),
            address,
        })
    }
}

/// What `init` did.
pub type Initialized = pgcourier_common::ops::init::Initialized<SenderConfig>;

pub fn init(args: &Init) -> anyhow::Result<Initialized> {
    let (cert, key) = identity_paths(&args.config, "sender");
    let (fingerprint, made_keys) = ensure_identity(&cert, &key, &args.name)?;
    let mut text = format!(
        "# Written by pgcourier-sender init. Every setting: docs/configuration.md\n\
         # and /usr/share/doc/pgcourier/examples/sender.toml.\n\
         source = {}\nspool-dir = {}\ncert = \"sender.crt\"\nkey = \"sender.key\"\n",
        toml_string(&args.source),
        toml_string(&args.spool_dir.to_string_lossy()),
    );
    if let Some(listen) = &args.listen {
        text.push_str(&format!("listen = {}\n", toml_string(listen)));
    }
    for r in &args.receivers {
        text.push_str(&format!(
            "\n[[receiver]]\nname = {}\nfingerprint = {}\n",
            toml_string(&r.name),
            toml_string(&r.fingerprint)
        ));
        if let Some(address) = &r.address {
            text.push_str(&format!("address = {}\n", toml_string(address)));
        }
    }
    let config = write_config(&args.config, &text, SenderConfig::load)?;
    Ok(Initialized {
        config,
        fingerprint,
        made_keys,
        cert,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "6191c7fd4d214a30c0b0d6e1d5bd1a1f2b1f6b7c9a0e0b3a4e2d1c0b9a8f7e6d";

    #[test]
    fn a_receiver_flag_is_name_fingerprint_and_an_optional_address() {
        assert_eq!(
            format!("b1={FP}@branch1.example:7741").parse(),
            Ok(ReceiverArg {
                name: "b1".into(),
                fingerprint: FP.into(),
                address: Some("branch1.example:7741".into())
            })
        );
        assert_eq!(
            format!("b2={FP}").parse::<ReceiverArg>().map(|r| r.address),
            Ok(None)
        );
        assert!("b3".parse::<ReceiverArg>().is_err());
        assert!("b4=abc@x:1".parse::<ReceiverArg>().is_err());
    }

    #[test]
    fn init_writes_a_config_the_sender_loads_and_keeps_existing_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = Init {
            config: dir.path().join("sender.toml"),
            source: "host=/run/postgresql dbname=hq user=\"o'brien\"".into(),
            spool_dir: "/var/lib/pgcourier/spool".into(),
            listen: Some("0.0.0.0:7740".into()),
            receivers: vec![format!("b1={FP}@203.0.113.10:7741").parse().expect("arg")],
            name: "hq".into(),
        };
        let first = init(&args).expect("init");
        assert!(first.made_keys);
        assert_eq!(first.config.receivers.len(), 1);
        assert_eq!(first.config.receivers[0].name, "b1");
        assert_eq!(
            first.config.spool_dir,
            PathBuf::from("/var/lib/pgcourier/spool")
        );
        assert_eq!(first.cert, dir.path().join("sender.crt"));
        // A second init keeps the keys (and refuses to write over the config).
        std::fs::remove_file(&args.config).expect("remove config");
        let second = init(&args).expect("init again");
        assert!(!second.made_keys);
        assert_eq!(second.fingerprint, first.fingerprint);
        assert!(init(&args).is_err(), "the config exists");
    }
}
