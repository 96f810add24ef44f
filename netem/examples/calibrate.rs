//! Calibration benchmark: push UDP through the relay on loopback, per profile
//! and direction, and print the measured rate and one-way delay next to the
//! configured values. A benchmark, not a test: it prints figures and judges
//! them against the targets (rate within 5%, mean delay within 1 ms + jitter
//! of delay + serialization time) but never fails.
//!
//! ```text
//! cargo run --release -p pgcourier-netem --example calibrate -- [--seconds 3] [PROFILE...]
//! ```
//!
//! Loss, duplication, reordering, corruption and outages are turned off: this
//! measures the rate and delay machinery; the loss models are checked
//! statistically by the unit tests.
//!
//! Each direction runs two phases: 80 probes (200 B every 25 ms, an idle link)
//! for the delay, then a saturating sender (1.25 x the rate, 1200 B
//! datagrams) for the rate, measured at the receiver after a 0.5 s warm-up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use pgcourier_netem::units::{format_duration, format_rate};
use pgcourier_netem::{LinkParams, Overrides, Profile, UdpRelay};
use tokio::net::UdpSocket;

#[derive(Parser)]
struct Args {
    /// Seconds of saturating traffic per direction.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Profiles to calibrate (default: all).
    profiles: Vec<String>,
}

const PROBE_LEN: usize = 200;
const PROBE_EVERY: Duration = Duration::from_millis(25);
const PROBES: usize = 80;
const DATA_LEN: usize = 1200;
/// What a sender offers on an unlimited link.
const UNLIMITED_OFFER_BPS: u64 = 40_000_000;
const WARM_UP: Duration = Duration::from_millis(500);

/// Sends on one side of the relay, receives on the other.
#[derive(Clone)]
struct Path {
    send: Arc<UdpSocket>,
    /// `None`: `send` is connected.
    to: Option<SocketAddr>,
    recv: Arc<UdpSocket>,
}

struct Sample {
    received: Duration,
    len: usize,
    one_way: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let names: Vec<String> = if args.profiles.is_empty() {
        Profile::names().iter().map(|s| s.to_string()).collect()
    } else {
        args.profiles.clone()
    };
    let seconds = Duration::from_secs_f64(args.seconds);
    let base = Instant::now();
    println!(
        "{:<9} {:<7} | {:>13} {:>14} {:>7} {:<4} | {:>12} {:>9} {:>9} {:>17} {:>8} {:<4} | {:>10} {:>9}",
        "profile",
        "dir",
        "rate",
        "measured",
        "error",
        "",
        "delay",
        "expected",
        "mean",
        "[min, max]",
        "error",
        "",
        "loaded",
        "tail-drop"
    );
    for name in names {
        let profile =
            Profile::by_name(&name).with_context(|| format!("unknown profile {name:?}"))?;
        let mut link = profile.link(1);
        Overrides {
            loss: Some(0.0),
            burst_loss: Some(None),
            duplicate: Some(0.0),
            reorder: Some(0.0),
            corrupt: Some(0.0),
            outage: Some(None),
            ..Overrides::default()
        }
        .apply(&mut link);

        let sink = Arc::new(UdpSocket::bind("127.0.0.1:0").await.context("bind sink")?);
        let relay = UdpRelay::start("127.0.0.1:0".parse()?, sink.local_addr()?, link.clone())
            .await
            .context("start relay")?;
        let client = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .context("bind client")?,
        );
        client.connect(relay.local_addr()).await?;
        // Open the flow so that the sink learns where to send back.
        client.send(b"hello").await?;
        let mut buf = [0u8; 64];
        let (_, flow) = tokio::time::timeout(Duration::from_secs(5), sink.recv_from(&mut buf))
            .await
            .context("the first datagram through the relay")??;

        let forward = Path {
            send: client.clone(),
            to: None,
            recv: sink.clone(),
        };
        let back = Path {
            send: sink.clone(),
            to: Some(flow),
            recv: client.clone(),
        };
        for (dir, path, params) in [
            ("forward", forward, &link.forward),
            ("back", back, &link.back),
        ] {
            let before = relay.stats();
            let probes = run(&path, base, params, Phase::Probe).await?;
            let load = run(&path, base, params, Phase::Saturate(seconds)).await?;
            let after = relay.stats();
            let tail_drops = match dir {
                "forward" => after.forward.dropped.queue_full - before.forward.dropped.queue_full,
                _ => after.back.dropped.queue_full - before.back.dropped.queue_full,
            };
            report(profile.name, dir, params, &probes, &load, tail_drops);
        }
        relay.shutdown().await;
    }
    Ok(())
}

enum Phase {
    Probe,
    Saturate(Duration),
}

/// Send one phase's traffic on `path` and collect what arrives.
async fn run(
    path: &Path,
    base: Instant,
    params: &LinkParams,
    phase: Phase,
) -> anyhow::Result<Vec<Sample>> {
    let (len, count_or_time, offered) = match phase {
        Phase::Probe => (PROBE_LEN, PROBE_EVERY * PROBES as u32, 0),
        Phase::Saturate(d) => (
            DATA_LEN,
            d,
            params.rate_bps.map_or(UNLIMITED_OFFER_BPS, |r| r * 5 / 4),
        ),
    };
    // Long enough for the last datagram to cross a full queue and the delay.
    let drain = params.delay
        + params.jitter
        + params.rate_bps.map_or(Duration::ZERO, |r| {
            pgcourier_netem::model::transmit_time(params.queue_bytes, r)
        })
        + Duration::from_millis(300);
    let send_path = path.clone();
    let sender = async move {
        let started = Instant::now();
        let mut sent_bytes = 0u64;
        let mut payload = vec![0u8; len];
        while started.elapsed() < count_or_time {
            let due = if offered == 0 {
                // Probes: one every PROBE_EVERY.
                (started.elapsed().as_nanos() / PROBE_EVERY.as_nanos() + 1) as u64 * len as u64
            } else {
                (started.elapsed().as_secs_f64() * offered as f64 / 8.0) as u64
            };
            while sent_bytes < due {
                let stamp = base.elapsed().as_nanos() as u64;
                payload[..8].copy_from_slice(&stamp.to_be_bytes());
                let r = match send_path.to {
                    Some(to) => send_path.send.send_to(&payload, to).await,
                    None => send_path.send.send(&payload).await,
                };
                r.context("send")?;
                sent_bytes += len as u64;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok::<(), anyhow::Error>(())
    };
    let recv = path.recv.clone();
    let receiver = async move {
        let mut samples = Vec::new();
        let mut buf = vec![0u8; 65_535];
        let end = Instant::now() + count_or_time + drain;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let Ok(r) = tokio::time::timeout(left, recv.recv_from(&mut buf)).await else {
                break;
            };
            let (n, _) = r.context("receive")?;
            if n < 8 {
                continue;
            }
            let received = base.elapsed();
            let sent = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
            let one_way = received.saturating_sub(Duration::from_nanos(sent));
            samples.push(Sample {
                received,
                len: n,
                one_way,
            });
        }
        Ok::<Vec<Sample>, anyhow::Error>(samples)
    };
    let (sent, samples) = tokio::join!(sender, receiver);
    sent?;
    samples
}

fn report(
    profile: &str,
    dir: &str,
    params: &LinkParams,
    probes: &[Sample],
    load: &[Sample],
    tail_drops: u64,
) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    // Rate after the warm-up, up to the last arrival.
    let (rate_text, error_text, rate_ok) = match (load.first(), load.last()) {
        (Some(first), Some(last)) if last.received > first.received + WARM_UP => {
            let start = first.received + WARM_UP;
            let bytes: usize = load
                .iter()
                .filter(|s| s.received > start)
                .map(|s| s.len)
                .sum();
            let measured = bytes as f64 * 8.0 / (last.received - start).as_secs_f64();
            let text = format!("{:.3} Mbit/s", measured / 1e6);
            match params.rate_bps {
                Some(r) => {
                    let error = (measured - r as f64) / r as f64 * 100.0;
                    (text, format!("{error:+.2}%"), Some(error.abs() <= 5.0))
                }
                None => (text, "-".into(), None),
            }
        }
        _ => ("no data".into(), "-".into(), Some(false)),
    };
    let tx = params.rate_bps.map_or(Duration::ZERO, |r| {
        pgcourier_netem::model::transmit_time(PROBE_LEN as u64, r)
    });
    let expected = params.delay + tx;
    let delays: Vec<f64> = probes.iter().map(|s| ms(s.one_way)).collect();
    let (delay_text, delay_ok) = if delays.is_empty() {
        ("no probes".to_string(), false)
    } else {
        let mean = delays.iter().sum::<f64>() / delays.len() as f64;
        let min = delays.iter().copied().fold(f64::INFINITY, f64::min);
        let max = delays.iter().copied().fold(0.0, f64::max);
        let error = mean - ms(expected);
        let ok = error.abs() <= 1.0 + ms(params.jitter);
        (
            format!(
                "{:>9.2} {:>17} {:>+6.2}ms",
                mean,
                format!("[{min:.1}, {max:.1}]"),
                error
            ),
            ok && delays.len() >= PROBES * 9 / 10,
        )
    };
    let loaded = if load.is_empty() {
        "-".to_string()
    } else {
        format!(
            "{:.1}ms",
            load.iter().map(|s| ms(s.one_way)).sum::<f64>() / load.len() as f64
        )
    };
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "ok",
        Some(false) => "MISS",
        None => "",
    };
    println!(
        "{:<9} {:<7} | {:>13} {:>14} {:>7} {:<4} | {:>12} {:>8.2}ms {} {:<4} | {:>10} {:>9}",
        profile,
        dir,
        format_rate(params.rate_bps),
        rate_text,
        error_text,
        verdict(rate_ok),
        format!(
            "{}±{}",
            format_duration(params.delay),
            format_duration(params.jitter)
        ),
        ms(expected),
        delay_text,
        verdict(Some(delay_ok)),
        loaded,
        tail_drops,
    );
}
