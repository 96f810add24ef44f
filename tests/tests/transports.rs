//! The TCP transport and `transport = "auto"`: replication over TLS on
//! TCP in both directions of dialling, the fallback when UDP is dropped
//! entirely (netem's UDP relay down) or only QUIC's handshakes are (the
//! relay's MTU below QUIC's 1200-byte Initial, while small datagrams
//! pass), the move back to QUIC, and a CONNECT proxy. Every test ends with
//! each source row change applied exactly once.

use std::time::Duration;

use anyhow::Context;
use pgcourier_netem::Profile;
use pgcourier_tests::{wait_until, ConnectProxy};
use serde_json::Value;

use crate::copy::status;
use crate::fixture::{Dial, Options, Setup};
use crate::replication::{acct_transactions, assert_applied_exactly_once, ACCT_SCHEMA};

/// Short timers: an outage outlasts the idle timeout, a dial falls back
/// after 1 s, and QUIC is tried again every 3 s.
const TIMERS: &str =
    "idle-timeout = \"4s\"\nkeep-alive = \"1s\"\nhandshake-timeout = \"1s\"\nquic-retry = \"3s\"";
const WAIT: Duration = Duration::from_secs(120);

/// The sender's view of receiver 0's link, from `pgcourier-queue status`.
fn sender_link(setup: &Setup) -> anyhow::Result<Value> {
    let st = status(&setup.sender_config)?;
    Ok(st["receivers"][0]["link"].clone())
}

async fn wait_transport(setup: &Setup, transport: &str, fell_back: bool) -> anyhow::Result<()> {
    wait_until(
        &format!("the sender's link to run over {transport} (fell back: {fell_back})"),
        WAIT,
        || async {
            let link = sender_link(setup)?;
            Ok(link["connected"] == true
                && link["transport"] == transport
                && link["fell_back_to_tcp"] == fell_back)
        },
    )
    .await
    .with_context(|| setup.logs())
}

/// Wait until the branch has applied every change the source made so far
/// (the audit trigger fires on both sides).
async fn caught_up(setup: &Setup) -> anyhow::Result<()> {
    let (src, dst) = (setup.source().await?, setup.target(0).await?);
    let count = "SELECT count(*) FROM audit.log";
    let n: i64 = src.query_one(count, &[]).await?.get(0);
    wait_until(&format!("{n} changes applied"), WAIT, || async {
        let got: i64 = dst.query_one(count, &[]).await?.get(0);
        Ok(got >= n)
    })
    .await
    .with_context(|| setup.logs())
}

fn clean(seed: u64) -> anyhow::Result<pgcourier_netem::Link> {
    Ok(Profile::by_name("clean")
        .context("profile clean")?
        .link(seed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_dropped_falls_back_to_tcp_and_moves_back_to_quic_losing_nothing() -> anyhow::Result<()>
{
    let admin_port = crate::fixture::free_tcp_port();
    let sender_extra = format!("{TIMERS}\nadmin = \"127.0.0.1:{admin_port}\"");
    let setup = Setup::start(
        "udp_dropped",
        Options {
            schema: ACCT_SCHEMA,
            tables: &["public.acct"],
            sender_extra: &sender_extra,
            receiver_extra: TIMERS,
            link: Some(clean(11)?),
            tcp_link: Some(clean(12)?),
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    acct_transactions(&src, 1, 200).await?;
    caught_up(&setup).await?;
    wait_transport(&setup, "quic", false).await?;

    // UDP is dropped entirely, in the middle of a workload.
    let (udp, tcp) = (&setup.relays[0], &setup.relays[1]);
    udp.set_down(true);
    let down_at = std::time::Instant::now();
    acct_transactions(&src, 201, 200).await?;
    wait_transport(&setup, "tcp", true).await?;
    eprintln!(
        "on TCP {:.1} s after UDP was dropped (idle timeout 4 s, handshake timeout 1 s)",
        down_at.elapsed().as_secs_f64()
    );
    caught_up(&setup).await?;
    assert!(
        tcp.stats().forward.bytes_forwarded > 0,
        "nothing went through the TCP relay"
    );
    let link = sender_link(&setup)?;
    assert_eq!(link["tcp_fallbacks"], 1, "{link}");

    // UDP comes back: QUIC within quic-retry (3 s) and a handshake.
    udp.set_down(false);
    let up_at = std::time::Instant::now();
    wait_transport(&setup, "quic", false).await?;
    eprintln!(
        "back on QUIC {:.1} s after UDP returned",
        up_at.elapsed().as_secs_f64()
    );
    acct_transactions(&src, 401, 200).await?;
    caught_up(&setup).await?;
    assert_applied_exactly_once(&setup, 0).await?;

    let log = setup.sender.log();
    assert_eq!(
        log.matches("falling back to TLS over TCP").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("moving back to QUIC").count(), 1, "{log}");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse()?;
    let (_, metrics) = tokio::task::spawn_blocking(move || {
        pgcourier_common::ops::admin::request(addr, "GET", "/metrics")
    })
    .await??;
    assert!(
        metrics.contains("pgcourier_sender_receiver_tcp_fallbacks_total{receiver=\"branch0\"} 1"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_handshakes_dropped_while_small_datagrams_pass_still_fall_back() -> anyhow::Result<()>
{
    // A path that drops UDP datagrams over 1000 bytes: every QUIC client
    // Initial (padded to at least 1200) is lost; a small probe passes.
    let mut link = clean(21)?;
    link.forward.mtu = Some(1000);
    link.back.mtu = Some(1000);
    let setup = Setup::start(
        "quic_blocked",
        Options {
            schema: ACCT_SCHEMA,
            tables: &["public.acct"],
            sender_extra: TIMERS,
            receiver_extra: TIMERS,
            link: Some(link),
            tcp_link: Some(clean(22)?),
            ..Options::default()
        },
    )
    .await?;
    let udp = &setup.relays[0];
    let before = udp.stats().forward;
    let probe = std::net::UdpSocket::bind("127.0.0.1:0")?;
    probe.send_to(b"are you there", udp.local_addr())?;
    wait_until("the probe to pass the UDP relay", WAIT, || async {
        Ok(udp.stats().forward.bytes_forwarded >= before.bytes_forwarded + 13)
    })
    .await?;
    assert!(
        udp.stats().forward.dropped.too_big > 0,
        "no QUIC handshake was dropped"
    );

    let src = setup.source().await?;
    acct_transactions(&src, 1, 300).await?;
    caught_up(&setup).await?;
    wait_transport(&setup, "tcp", true).await?;
    assert_applied_exactly_once(&setup, 0).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_dials_over_tcp_in_reverse_mode() -> anyhow::Result<()> {
    let admin_port = crate::fixture::free_tcp_port();
    let receiver_extra = format!("transport = \"tcp\"\nadmin = \"127.0.0.1:{admin_port}\"");
    let setup = Setup::start(
        "reverse_tcp",
        Options {
            schema: ACCT_SCHEMA,
            tables: &["public.acct"],
            dial: Dial::ReceiverDials,
            receiver_extra: &receiver_extra,
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    acct_transactions(&src, 1, 300).await?;
    caught_up(&setup).await?;
    let rlink = status(&setup.branches[0].config)?["link"].clone();
    assert_eq!(rlink["transport"], "tcp", "{rlink}");
    let slink = sender_link(&setup)?;
    assert_eq!(slink["transport"], "tcp", "{slink}");
    // Chosen, not fallen back to.
    assert_eq!(rlink["fell_back_to_tcp"], false, "{rlink}");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse()?;
    let (_, metrics) = tokio::task::spawn_blocking(move || {
        pgcourier_common::ops::admin::request(addr, "GET", "/metrics")
    })
    .await??;
    for line in [
        "pgcourier_receiver_link_tcp 1",
        "pgcourier_receiver_link_tcp_fallback 0",
        "pgcourier_receiver_link_tcp_fallbacks_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in {metrics}"
        );
    }
    assert_applied_exactly_once(&setup, 0).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_proxy_carries_the_link() -> anyhow::Result<()> {
    let proxy = ConnectProxy::start().await?;
    let entry = format!("proxy = \"http://{}\"", proxy.addr);
    let setup = Setup::start(
        "proxy",
        Options {
            schema: ACCT_SCHEMA,
            tables: &["public.acct"],
            receiver_entry_extra: &entry,
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    acct_transactions(&src, 1, 300).await?;
    caught_up(&setup).await?;
    wait_transport(&setup, "tcp", false).await?;
    let config = std::fs::read_to_string(&setup.sender_config)?;
    let receiver = config
        .lines()
        .find_map(|l| l.strip_prefix("address = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .context("the receiver's address in sender.toml")?;
    let requests = proxy.requests();
    assert!(!requests.is_empty());
    assert!(
        requests
            .iter()
            .all(|r| r == &format!("CONNECT {receiver} HTTP/1.1")),
        "{requests:?}"
    );
    assert_applied_exactly_once(&setup, 0).await?;
    Ok(())
}

/// 1 Mbit/s each way, 200 ms round trip, no loss: the path on which the
/// slow return of a peer was measured.
fn thin_long() -> pgcourier_netem::Link {
    let params = pgcourier_netem::LinkParams {
        delay: Duration::from_millis(100),
        rate_bps: Some(1_000_000),
        ..pgcourier_netem::LinkParams::default()
    };
    pgcourier_netem::Link::symmetric(params, 31)
}

/// Seconds from now (a link's return) until the first of the transactions
/// from `first` on (`acct_transactions`' ids) is applied on the branch.
async fn seconds_to_apply(setup: &Setup, first: i32) -> anyhow::Result<f64> {
    let up = std::time::Instant::now();
    let dst = setup.target(0).await?;
    wait_until("the first change of the outage applied", WAIT, || async {
        let n: i64 = dst
            .query_one(
                "SELECT count(*) FROM acct WHERE id BETWEEN $1 AND $1 + 3",
                &[&first],
            )
            .await?
            .get(0);
        Ok(n > 0)
    })
    .await
    .with_context(|| setup.logs())?;
    Ok(up.elapsed().as_secs_f64())
}

/// Seconds from the link's return to the first transaction committed
/// during the outage applied on the branch, after an outage longer than
/// the idle timeout, with `extra` in both configs.
async fn return_after_outage(name: &str, extra: &str) -> anyhow::Result<f64> {
    let timers = format!("idle-timeout = \"4s\"\nkeep-alive = \"1s\"\n{extra}");
    let setup = Setup::start(
        name,
        Options {
            schema: ACCT_SCHEMA,
            tables: &["public.acct"],
            sender_extra: &timers,
            receiver_extra: &timers,
            link: Some(thin_long()),
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    acct_transactions(&src, 1, 100).await?;
    caught_up(&setup).await?;
    let udp = &setup.relays[0];
    udp.set_down(true);
    // Longer than the idle timeout: both sessions end, the dialler retries.
    acct_transactions(&src, 101, 100).await?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    udp.set_down(false);
    let secs = seconds_to_apply(&setup, 101).await?;
    caught_up(&setup).await?;
    assert_applied_exactly_once(&setup, 0).await?;
    Ok(secs)
}

/// Printed, not asserted (timing): the return with the default
/// `return-window` and without it (backoff only, as before it existed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_back_after_an_outage_is_found_again_losing_nothing() -> anyhow::Result<()> {
    let with = return_after_outage("return", "").await?;
    let without = return_after_outage("return_off", "return-window = \"0s\"").await?;
    eprintln!(
        "link back after a 12 s outage (1 Mbit/s, 200 ms RTT): first outage transaction applied after {with:.2} s with return-window 60s, {without:.2} s with return-window 0s (max-backoff 2 s)"
    );
    Ok(())
}

/// A stranger that opens a TCP connection to the receiver's port and says
/// nothing holds only its own handshake, not the receiver's accept loop:
/// the sender, restarted meanwhile, connects and replicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tcp_client_does_not_hold_the_listener() -> anyhow::Result<()> {
    let mut setup = Setup::start(
        "silent_client",
        Options {
            schema: ACCT_SCHEMA,
            tables: &["public.acct"],
            // The silent client would hold an accept loop that waited
            // for its handshake for longer than the test waits.
            receiver_extra: "handshake-timeout = \"600s\"",
            ..Options::default()
        },
    )
    .await?;
    let config = std::fs::read_to_string(&setup.branches[0].config)?;
    let listen = config
        .lines()
        .find_map(|l| l.strip_prefix("listen = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .context("the receiver's listen address")?
        .to_owned();
    setup.sender.terminate()?;
    let silent = tokio::net::TcpStream::connect(listen.as_str()).await?;
    // Let the receiver accept it before the sender dials.
    tokio::time::sleep(Duration::from_millis(500)).await;
    setup.restart_sender()?;
    let src = setup.source().await?;
    acct_transactions(&src, 1, 100).await?;
    caught_up(&setup).await?;
    assert_applied_exactly_once(&setup, 0).await?;
    drop(silent);
    Ok(())
}

/// Short dial attempts, so the backoff's steps grow within an outage.
const KNOCK_TIMERS: &str = "idle-timeout = \"4s\"\nkeep-alive = \"1s\"\nreturn-window = \"0s\"\n\
                            handshake-timeout = \"1s\"";

/// A caught-up pair whose daemons back off up to 60 s (the fixture's 2 s
/// would hide a backoff step), for the knock tests.
async fn knock_setup(
    name: &str,
    dial: Dial,
    link: Option<pgcourier_netem::Link>,
) -> anyhow::Result<Setup> {
    let mut setup = Setup::start(
        name,
        Options {
            schema: ACCT_SCHEMA,
            tables: &["public.acct"],
            dial,
            sender_extra: KNOCK_TIMERS,
            receiver_extra: KNOCK_TIMERS,
            tcp_link: link.clone(),
            link,
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    acct_transactions(&src, 1, 50).await?;
    caught_up(&setup).await?;
    setup.sender.terminate()?;
    for config in [&setup.sender_config, &setup.branches[0].config] {
        let text = std::fs::read_to_string(config)?;
        anyhow::ensure!(text.contains("max-backoff = \"2s\""), "{config:?}");
        std::fs::write(
            config,
            text.replace("max-backoff = \"2s\"", "max-backoff = \"60s\""),
        )?;
    }
    setup.restart_receiver(0)?;
    setup.sender.respawn()?;
    acct_transactions(&src, 1001, 10).await?;
    caught_up(&setup).await?;
    Ok(setup)
}

/// After a 50 s outage (`acct_transactions` from 51 written during it):
/// the first of them is applied within 8 s of `what` returning, found by
/// a knock and not at a backoff step; nothing lost or doubled.
async fn found_by_knocking(setup: &Setup, what: &str) -> anyhow::Result<()> {
    let secs = seconds_to_apply(setup, 51).await?;
    eprintln!("{what} back after a 50 s outage (return-window 0 s, max-backoff 60 s): first outage transaction applied after {secs:.2} s");
    assert!(
        secs < 8.0,
        "found {secs:.1} s after the {what} returned: at a backoff step, not by knocking\n{}",
        setup.logs()
    );
    caught_up(setup).await?;
    assert_applied_exactly_once(setup, 0).await
}

/// A peer gone longer than `return-window` (here 0 s: backoff only) is
/// found within about a second of its link's return, not at the next
/// backoff step (`max-backoff` 60 s here): the dialler knocks on its TCP
/// port every second while it backs off, and a knock the peer's listener
/// holds open ends the wait. Nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_back_after_a_long_outage_is_dialled_when_it_answers_not_at_max_backoff(
) -> anyhow::Result<()> {
    let setup = knock_setup("knock", Dial::SenderDials, Some(thin_long())).await?;
    let src = setup.source().await?;
    for relay in &setup.relays {
        relay.set_down(true);
    }
    // Long enough for the backoff to reach steps of tens of seconds
    // (0.1 s doubling: the ninth, 25.6 s, spans the return).
    acct_transactions(&src, 51, 50).await?;
    tokio::time::sleep(Duration::from_secs(50)).await;
    for relay in &setup.relays {
        relay.set_down(false);
    }
    found_by_knocking(&setup, "link").await
}

/// The same in reverse mode (the receiver dials the sender, which is
/// behind the firewall of headquarters' side here): the sender is down
/// 50 s (its host restarting), the receiver's dials back off towards
/// `max-backoff` = 60 s, and it knocks on the sender's port meanwhile; the
/// sender's return is noticed by a knock, not at the next backoff step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_back_after_a_long_outage_is_dialled_by_a_reverse_mode_receiver_when_it_answers(
) -> anyhow::Result<()> {
    let setup = knock_setup("knock-reverse", Dial::ReceiverDials, None).await?;
    let src = setup.source().await?;
    setup.sender.terminate()?;
    acct_transactions(&src, 51, 50).await?;
    tokio::time::sleep(Duration::from_secs(50)).await;
    setup.sender.respawn()?;
    found_by_knocking(&setup, "sender").await
}
