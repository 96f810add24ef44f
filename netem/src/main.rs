use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pgcourier_netem::units::{
    format_duration, format_probability, format_rate, format_size, parse_duration,
    parse_probability, parse_rate, parse_size,
};
use pgcourier_netem::{
    BurstLoss, ControlPort, Link, LinkParams, OutageMode, OutageSchedule, Overrides, Profile,
    RelayHandle, TcpRelay, UdpRelay,
};
use tokio::signal::unix::{signal, SignalKind};

/// pgcourier-netem: relay UDP or TCP on this machine through an emulated bad
/// link (delay, jitter, loss, bandwidth, outages).
///
/// The forward direction runs from the clients of --listen toward
/// --forward ("down", toward the branch); the back direction the other way.
/// Stats are printed on exit (SIGINT, SIGTERM) and on SIGUSR1.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Relay UDP datagrams (all knobs apply).
    Udp(RelayArgs),
    /// Relay TCP connections (delay, jitter, rate, queue and outages apply;
    /// loss does not: the kernel's TCP retransmits below the relay).
    Tcp {
        #[command(flatten)]
        relay: RelayArgs,
        /// What an outage does: stall (stop forwarding, keep connections) or
        /// cut (reset connections, refuse new ones while down).
        #[arg(long, default_value = "stall", value_parser = parse_outage_mode)]
        outage_mode: OutageMode,
    },
    /// List the profiles and their parameters.
    Profiles,
}

#[derive(Args)]
struct RelayArgs {
    /// Address clients send to.
    #[arg(long)]
    listen: SocketAddr,
    /// Address the relay forwards to.
    #[arg(long)]
    forward: SocketAddr,
    /// Starting point: clean, satellite, 3g, dsl, flaky, lossy (see `profiles`).
    #[arg(long, default_value = "clean")]
    profile: String,
    /// One-way delay, both directions (e.g. 300ms).
    #[arg(long, value_parser = parse_duration)]
    delay: Option<Duration>,
    /// Uniform jitter ± around the delay, both directions (e.g. 5ms).
    #[arg(long, value_parser = parse_duration)]
    jitter: Option<Duration>,
    /// Random loss, both directions (e.g. 1% or 0.01).
    #[arg(long, value_parser = parse_probability)]
    loss: Option<f64>,
    /// Rate limit of both directions unless --rate-back is given (e.g. 2Mbit, unlimited).
    #[arg(long, value_parser = parse_rate_arg)]
    rate: Option<Rate>,
    /// Rate limit of the back direction (e.g. 512kbit).
    #[arg(long, value_parser = parse_rate_arg)]
    rate_back: Option<Rate>,
    /// Bottleneck queue, both directions (e.g. 64KiB); overflow is tail-dropped.
    #[arg(long, value_parser = parse_size)]
    queue: Option<u64>,
    /// Gilbert-Elliott bursty loss: p_good_to_bad,p_bad_to_good,loss_in_bad (e.g. 1%,30%,50%), or none.
    #[arg(long, value_parser = parse_burst_loss)]
    burst_loss: Option<BurstArg>,
    /// Duplicated packets (e.g. 0.1%).
    #[arg(long, value_parser = parse_probability)]
    duplicate: Option<f64>,
    /// Reordered packets (e.g. 0.1%): each is held back by --reorder-delay.
    #[arg(long, value_parser = parse_probability)]
    reorder: Option<f64>,
    /// Extra delay of a reordered packet (default 10ms).
    #[arg(long, value_parser = parse_duration)]
    reorder_delay: Option<Duration>,
    /// Packets with one bit flipped (e.g. 0.01%).
    #[arg(long, value_parser = parse_probability)]
    corrupt: Option<f64>,
    /// Largest datagram carried, in bytes; larger ones are dropped (or none).
    #[arg(long, value_parser = parse_mtu)]
    mtu: Option<Mtu>,
    /// Scheduled outage period (e.g. 2m); 0 turns scheduled outages off.
    #[arg(long, value_parser = parse_duration)]
    outage_every: Option<Duration>,
    /// Length of each scheduled outage (e.g. 30s).
    #[arg(long, value_parser = parse_duration)]
    outage_for: Option<Duration>,
    /// Time of the first outage (default: every - for, so the link starts up).
    #[arg(long, value_parser = parse_duration)]
    outage_offset: Option<Duration>,
    /// Seed of the random decisions (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Open the line-based control port here (down, up, stats); bind it to loopback.
    #[arg(long)]
    control: Option<SocketAddr>,
    /// How stats are printed: human or json.
    #[arg(long, default_value = "human", value_parser = ["human", "json"])]
    stats_format: String,
}

#[derive(Clone)]
struct Rate(Option<u64>);
#[derive(Clone)]
struct Mtu(Option<usize>);
#[derive(Clone)]
struct BurstArg(Option<BurstLoss>);

fn parse_rate_arg(s: &str) -> Result<Rate, String> {
    parse_rate(s).map(Rate)
}

fn parse_mtu(s: &str) -> Result<Mtu, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Mtu(None));
    }
    let n = parse_size(s)?;
    usize::try_from(n)
        .map(|n| Mtu(Some(n)))
        .map_err(|_| format!("MTU {s:?} is too large"))
}

fn parse_burst_loss(s: &str) -> Result<BurstArg, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(BurstArg(None));
    }
    let parts: Vec<&str> = s.split(',').collect();
    let [gb, bg, loss] = parts[..] else {
        return Err(format!(
            "{s:?} is not p_good_to_bad,p_bad_to_good,loss_in_bad (e.g. 1%,30%,50%)"
        ));
    };
    Ok(BurstArg(Some(BurstLoss {
        p_good_to_bad: parse_probability(gb)?,
        p_bad_to_good: parse_probability(bg)?,
        loss_in_bad: parse_probability(loss)?,
    })))
}

fn parse_outage_mode(s: &str) -> Result<OutageMode, String> {
    s.parse()
}

impl RelayArgs {
    /// The profile with the command line's overrides, validated.
    fn link(&self) -> anyhow::Result<(Profile, Link)> {
        let profile = Profile::by_name(&self.profile).with_context(|| {
            format!(
                "unknown profile {:?} (profiles: {})",
                self.profile,
                Profile::names().join(", ")
            )
        })?;
        let seed = self.seed.unwrap_or_else(clock_seed);
        let mut link = profile.link(seed);
        let overrides = Overrides {
            delay: self.delay,
            jitter: self.jitter,
            loss: self.loss,
            burst_loss: self.burst_loss.clone().map(|b| b.0),
            rate: self.rate.clone().map(|r| r.0),
            rate_back: self.rate_back.clone().map(|r| r.0),
            queue_bytes: self.queue,
            duplicate: self.duplicate,
            reorder: self.reorder,
            reorder_delay: self.reorder_delay,
            corrupt: self.corrupt,
            mtu: self.mtu.clone().map(|m| m.0),
            outage: self.outage(profile.forward.outage)?,
        };
        overrides.apply(&mut link);
        link.validate().context("check link parameters")?;
        Ok((profile, link))
    }

    /// The scheduled outage the options ask for, on top of the profile's.
    fn outage(
        &self,
        base: Option<OutageSchedule>,
    ) -> anyhow::Result<Option<Option<OutageSchedule>>> {
        if self.outage_every.is_none() && self.outage_for.is_none() && self.outage_offset.is_none()
        {
            return Ok(None);
        }
        let every = self.outage_every.or(base.map(|o| o.every));
        let down_for = self.outage_for.or(base.map(|o| o.down_for));
        let (Some(every), Some(down_for)) = (every, down_for) else {
            anyhow::bail!("a scheduled outage needs both --outage-every and --outage-for");
        };
        if every.is_zero() || down_for.is_zero() {
            return Ok(Some(None));
        }
        let offset = self.outage_offset.unwrap_or(every.saturating_sub(down_for));
        Ok(Some(Some(OutageSchedule {
            every,
            down_for,
            offset,
        })))
    }
}

fn clock_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (relay, tcp_mode) = match cli.command {
        Command::Profiles => {
            print_profiles();
            return ExitCode::SUCCESS;
        }
        Command::Udp(relay) => (relay, None),
        Command::Tcp { relay, outage_mode } => (relay, Some(outage_mode)),
    };
    init_logging();
    let (profile, link) = match relay.link() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(&relay, profile, link, tcp_mode)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Run the relay until SIGINT or SIGTERM; print stats then and on SIGUSR1.
async fn serve(
    args: &RelayArgs,
    profile: Profile,
    link: Link,
    tcp_mode: Option<OutageMode>,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("listen for SIGUSR1")?;
    let seed = link.seed;
    let relay: RelayHandle = match tcp_mode {
        None => UdpRelay::start(args.listen, args.forward, link.clone()).await,
        Some(mode) => TcpRelay::start(args.listen, args.forward, link.clone(), mode).await,
    }
    .context("start relay")?;
    let kind = match tcp_mode {
        None => "udp".to_string(),
        Some(mode) => format!(
            "tcp ({} on outage)",
            if mode == OutageMode::Cut {
                "cut"
            } else {
                "stall"
            }
        ),
    };
    println!(
        "relaying {kind} {} -> {}, profile {}, seed {seed}",
        relay.local_addr(),
        args.forward,
        profile.name
    );
    println!("  forward: {}", describe(&link.forward));
    println!("  back:    {}", describe(&link.back));
    let control = match args.control {
        Some(addr) => {
            let port = ControlPort::start(addr, relay.control())
                .await
                .context("open control port")?;
            println!(
                "control port on {} (commands: down, up, stats)",
                port.local_addr()
            );
            Some(port)
        }
        None => None,
    };
    let json = args.stats_format == "json";
    let print_stats = || {
        let stats = relay.stats();
        if json {
            match serde_json::to_string(&stats) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("error: serialize stats: {e}"),
            }
        } else {
            println!("{stats}");
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = interrupt.recv() => break,
            _ = usr1.recv() => print_stats(),
        }
    }
    print_stats();
    if let Some(port) = control {
        port.shutdown().await;
    }
    relay.shutdown().await;
    Ok(())
}

/// One line of a direction's parameters.
fn describe(p: &LinkParams) -> String {
    let mut parts = vec![
        format!("delay {}", format_duration(p.delay)),
        format!("jitter {}", format_duration(p.jitter)),
        format!("rate {}", format_rate(p.rate_bps)),
    ];
    if p.rate_bps.is_some() {
        parts.push(format!("queue {}", format_size(p.queue_bytes)));
    }
    parts.push(format!("loss {}", format_probability(p.loss)));
    if let Some(b) = p.burst_loss {
        parts.push(format!(
            "burst-loss {},{},{}",
            format_probability(b.p_good_to_bad),
            format_probability(b.p_bad_to_good),
            format_probability(b.loss_in_bad)
        ));
    }
    for (name, v) in [
        ("duplicate", p.duplicate),
        ("reorder", p.reorder),
        ("corrupt", p.corrupt),
    ] {
        if v > 0.0 {
            parts.push(format!("{name} {}", format_probability(v)));
        }
    }
    if p.reorder > 0.0 {
        parts.push(format!(
            "reorder-delay {}",
            format_duration(p.reorder_delay)
        ));
    }
    if let Some(mtu) = p.mtu {
        parts.push(format!("mtu {mtu}"));
    }
    if let Some(o) = p.outage {
        parts.push(describe_outage(&o));
    }
    parts.join(", ")
}

fn describe_outage(o: &OutageSchedule) -> String {
    format!(
        "down {} every {} from {}",
        format_duration(o.down_for),
        format_duration(o.every),
        format_duration(o.offset)
    )
}

fn print_profiles() {
    println!(
        "{:<10} {:>7} {:>7} {:>25} {:>17} {:>6}  outages",
        "profile", "delay", "jitter", "rate fwd / back", "queue fwd / back", "loss"
    );
    for p in Profile::all() {
        let (f, b) = (&p.forward, &p.back);
        let queue = if f.rate_bps.is_some() || b.rate_bps.is_some() {
            format!(
                "{} / {}",
                format_size(f.queue_bytes),
                format_size(b.queue_bytes)
            )
        } else {
            "-".into()
        };
        println!(
            "{:<10} {:>7} {:>7} {:>25} {:>17} {:>6}  {}",
            p.name,
            format_duration(f.delay),
            format_duration(f.jitter),
            format!("{} / {}", format_rate(f.rate_bps), format_rate(b.rate_bps)),
            queue,
            format_probability(f.loss),
            f.outage.map_or_else(|| "-".into(), |o| describe_outage(&o)),
        );
    }
    println!();
    for p in Profile::all() {
        println!("{:<10} {}", p.name, p.summary);
    }
    println!("\ndelay is one-way (RTT = 2 x delay); every knob can be overridden, e.g. --profile satellite --loss 0.");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link_of(args: &[&str]) -> anyhow::Result<Link> {
        let base = [
            "pgcourier-netem",
            "udp",
            "--listen",
            "127.0.0.1:0",
            "--forward",
            "127.0.0.1:9",
            "--seed",
            "1",
        ];
        let cli =
            Cli::try_parse_from(base.iter().chain(args)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let Command::Udp(relay) = cli.command else {
            panic!("parsed a udp command")
        };
        relay.link().map(|(_, link)| link)
    }

    #[test]
    fn command_line_knobs_override_the_profile() {
        let link = link_of(&[
            "--profile",
            "satellite",
            "--loss",
            "0",
            "--rate",
            "4Mbit",
            "--burst-loss",
            "1%,30%,50%",
        ])
        .expect("valid options");
        assert_eq!(link.forward.loss, 0.0);
        assert_eq!(
            (link.forward.rate_bps, link.back.rate_bps),
            (Some(4_000_000), Some(4_000_000))
        );
        assert_eq!(link.back.burst_loss.map(|b| b.p_bad_to_good), Some(0.3));
        assert_eq!(link.forward.delay, Duration::from_millis(300));
        assert_eq!(link.seed, 1);
    }

    #[test]
    fn outage_options_combine_with_the_profile_and_need_both_halves() {
        let link =
            link_of(&["--outage-every", "2m", "--outage-for", "30s"]).expect("valid options");
        assert_eq!(
            link.forward.outage,
            Some(OutageSchedule::starting_up(
                Duration::from_secs(120),
                Duration::from_secs(30)
            ))
        );
        let link =
            link_of(&["--profile", "flaky", "--outage-for", "10s"]).expect("flaky has a period");
        assert_eq!(
            link.back.outage.map(|o| (o.every, o.down_for)),
            Some((Duration::from_secs(120), Duration::from_secs(10)))
        );
        assert_eq!(
            link_of(&["--profile", "flaky", "--outage-every", "0"])
                .expect("valid")
                .forward
                .outage,
            None
        );
        assert!(link_of(&["--outage-for", "10s"]).is_err());
        assert!(link_of(&["--outage-every", "10s", "--outage-for", "10s"]).is_err());
        assert!(link_of(&["--loss", "200%"]).is_err());
    }
}
