//! Peers by host name: the name is resolved again at every dial, so a
//! branch that comes back at another address (dynamic DNS, DHCP) is found
//! again without a restart of the sender.
//!
//! The sender runs in a mount namespace of its own where `/etc/hosts` is a
//! file of the test's (bind-mounted), so the test moves the name without
//! touching the machine's resolver. Needs root (as the rest of the suite).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use pgcourier_tests::{bin_path, Daemon};

use crate::fixture::{Options, Setup};

const SCHEMA: &str = "CREATE TABLE t (id int PRIMARY KEY, v text);";
const NAME: &str = "branch0.pgcourier.test";

/// The sender, in a mount namespace whose `/etc/hosts` is `hosts`.
fn spawn_sender_with_hosts(setup: &Setup, hosts: &Path) -> anyhow::Result<Daemon> {
    let script = format!(
        "mount --bind '{}' /etc/hosts && exec '{}' run --config '{}'",
        hosts.display(),
        bin_path("pgcourier-sender").display(),
        setup.sender_config.display()
    );
    Daemon::spawn(
        "sender",
        Path::new("unshare"),
        &["--mount", "--propagation", "private", "sh", "-c", &script],
        &setup.dir.path().join("sender.log"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_whose_name_moves_to_another_address_is_found_again() -> anyhow::Result<()> {
    let mut setup = Setup::start(
        "peer_name",
        Options {
            schema: SCHEMA,
            ..Options::default()
        },
    )
    .await?;
    // The sender dials the receiver by name from now on.
    setup.sender.terminate()?;
    let config = std::fs::read_to_string(&setup.sender_config)?;
    let port = config
        .lines()
        .find_map(|l| l.strip_prefix("address = \"127.0.0.1:"))
        .and_then(|rest| rest.strip_suffix('"'))
        .context("the receiver's address in sender.toml")?
        .to_owned();
    std::fs::write(
        &setup.sender_config,
        config.replace(
            &format!("address = \"127.0.0.1:{port}\""),
            &format!("address = \"{NAME}:{port}\""),
        ),
    )?;
    let hosts = setup.dir.path().join("hosts");
    std::fs::write(&hosts, format!("127.0.0.1 {NAME}\n"))?;
    setup.sender = spawn_sender_with_hosts(&setup, &hosts)?;
    let src = setup.source().await?;
    src.execute(
        "INSERT INTO t SELECT g, 'first' FROM generate_series(1, 100) g",
        &[],
    )
    .await?;
    setup
        .wait_equal(0, &["public.t"], Duration::from_secs(60))
        .await?;

    // The branch comes back at another address, under the same name
    // (rewritten in place: the bind mount follows the file).
    setup.branches[0].receiver.terminate()?;
    let rconf = std::fs::read_to_string(&setup.branches[0].config)?;
    std::fs::write(
        &setup.branches[0].config,
        rconf.replace(
            &format!("listen = \"127.0.0.1:{port}\""),
            &format!("listen = \"127.0.0.2:{port}\""),
        ),
    )?;
    std::fs::write(&hosts, format!("127.0.0.2 {NAME}\n"))?;
    setup.restart_receiver(0)?;
    src.execute(
        "INSERT INTO t SELECT g, 'second' FROM generate_series(101, 200) g",
        &[],
    )
    .await?;
    setup
        .wait_equal(0, &["public.t"], Duration::from_secs(60))
        .await?;
    let log = setup.sender.log();
    anyhow::ensure!(
        log.contains(NAME),
        "the sender's log never names the receiver's host name:\n{log}"
    );
    Ok(())
}
