//! systemd's notification protocol (sd_notify), as a `Type=notify` unit with
//! `WatchdogSec=` would see it, without systemd: the test binds the
//! notification sockets itself (the receiver's in the abstract namespace,
//! the sender's as a path), starts a real receiver and sender with
//! `NOTIFY_SOCKET` and `WATCHDOG_USEC` set, and checks that `READY=1`
//! comes only once the inbox is open and listening, and once the slot is in
//! place and captured from; that `WATCHDOG=1` comes again and again; and
//! that SIGTERM brings `STOPPING=1` and exit 0.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgcourier_tests::{bin_path, workdir, Daemon, PgCluster};
use tokio::net::UnixDatagram;

use crate::fixture::{free_udp_port, keygen, DB};

const WAIT: Duration = Duration::from_secs(90);

/// One notification socket and what has arrived on it.
struct Notifications {
    sock: UnixDatagram,
    seen: Vec<(Instant, String)>,
}

impl Notifications {
    fn bind_path(path: &std::path::Path) -> anyhow::Result<Notifications> {
        let sock = UnixDatagram::bind(path).with_context(|| format!("bind {}", path.display()))?;
        Ok(Notifications { sock, seen: vec![] })
    }

    fn bind_abstract(name: &str) -> anyhow::Result<Notifications> {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let std_sock = std::os::unix::net::UnixDatagram::bind_addr(&addr)
            .with_context(|| format!("bind @{name}"))?;
        std_sock.set_nonblocking(true)?;
        Ok(Notifications {
            sock: UnixDatagram::from_std(std_sock)?,
            seen: vec![],
        })
    }

    /// Wait for a message with the line `line`; returns the whole message.
    async fn wait_for(&mut self, line: &str, daemon: &Daemon) -> anyhow::Result<String> {
        let deadline = Instant::now() + WAIT;
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = match tokio::time::timeout(left, self.sock.recv(&mut buf)).await {
                Ok(r) => r?,
                Err(_) => bail!(
                    "no {line} from {} within {WAIT:?}; received {:?}\n{}",
                    daemon.name(),
                    self.seen.iter().map(|(_, m)| m).collect::<Vec<_>>(),
                    daemon.log_tail(40)
                ),
            };
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.seen.push((Instant::now(), msg.clone()));
            if msg.lines().any(|l| l == line) {
                return Ok(msg);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_tell_systemd_when_they_are_ready_alive_and_stopping() -> anyhow::Result<()> {
    let (hq, branch) = tokio::task::spawn_blocking(|| -> anyhow::Result<_> {
        let hq = std::thread::spawn(|| PgCluster::start("hq"));
        let branch = PgCluster::start("branch")?;
        Ok((hq.join().expect("cluster thread")?, branch))
    })
    .await??;
    let schema = "CREATE TABLE t (id integer PRIMARY KEY, v text)";
    hq.execute(DB, schema).await?;
    branch.execute(DB, schema).await?;
    let dir = workdir("sdnotify");
    let d = dir.path();
    let sender_fp = keygen(d, "sender");
    let receiver_fp = keygen(d, "branch");
    let port = free_udp_port();
    let receiver_config = d.join("receiver.toml");
    std::fs::write(
        &receiver_config,
        format!(
            "target = \"{}\"\ninbox-dir = \"inbox\"\ncert = \"branch.crt\"\nkey = \"branch.key\"\n\
             listen = \"127.0.0.1:{port}\"\nsender-fingerprints = [\"{sender_fp}\"]\nmax-backoff = \"2s\"\n",
            branch.conninfo(DB)
        ),
    )?;
    let sender_config = d.join("sender.toml");
    std::fs::write(
        &sender_config,
        format!(
            "source = \"{}\"\nspool-dir = \"spool\"\ncert = \"sender.crt\"\nkey = \"sender.key\"\n\
             poll-interval = \"50ms\"\nmax-backoff = \"2s\"\n\n[[receiver]]\nname = \"branch\"\n\
             fingerprint = \"{receiver_fp}\"\naddress = \"127.0.0.1:{port}\"\n",
            hq.conninfo(DB)
        ),
    )?;
    // 400 ms: a ping every 200 ms.
    let watchdog_usec = "400000";

    // The receiver, notifying an abstract socket.
    let abstract_name = format!("pgcourier-e2e-notify-{}-{port}", std::process::id());
    let mut from_receiver = Notifications::bind_abstract(&abstract_name)?;
    let receiver_socket = format!("@{abstract_name}");
    let receiver = Daemon::spawn_with_env(
        "receiver",
        &bin_path("pgcourier-receiver"),
        &["run", "--config", receiver_config.to_str().expect("utf-8")],
        &[
            ("NOTIFY_SOCKET", &receiver_socket),
            ("WATCHDOG_USEC", watchdog_usec),
        ],
        &d.join("receiver.log"),
    )?;
    let ready = from_receiver.wait_for("READY=1", &receiver).await?;
    anyhow::ensure!(
        d.join("inbox").is_dir(),
        "READY=1 before the inbox exists: {ready}"
    );
    anyhow::ensure!(
        std::net::UdpSocket::bind(("127.0.0.1", port)).is_err(),
        "READY=1 before the receiver listens on udp {port}: {ready}"
    );
    anyhow::ensure!(
        ready.contains(&format!("STATUS=inbox open, listening on 127.0.0.1:{port}")),
        "the receiver's status line: {ready}"
    );

    // The sender, notifying a socket by path.
    let mut from_sender = Notifications::bind_path(&d.join("sender.notify"))?;
    let sender_socket = d.join("sender.notify").display().to_string();
    let sender = Daemon::spawn_with_env(
        "sender",
        &bin_path("pgcourier-sender"),
        &["run", "--config", sender_config.to_str().expect("utf-8")],
        &[
            ("NOTIFY_SOCKET", &sender_socket),
            ("WATCHDOG_USEC", watchdog_usec),
        ],
        &d.join("sender.log"),
    )?;
    let ready = from_sender.wait_for("READY=1", &sender).await?;
    let source = hq.client(DB).await?;
    let slots: i64 = source
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgcourier'",
            &[],
        )
        .await?
        .get(0);
    anyhow::ensure!(
        slots == 1,
        "READY=1 before the slot exists: {ready}\n{}",
        sender.log_tail(20)
    );
    anyhow::ensure!(
        sender.log().contains("capturing from source") && d.join("spool").is_dir(),
        "READY=1 before capture started: {ready}\n{}",
        sender.log_tail(20)
    );
    anyhow::ensure!(
        ready.contains("STATUS=capturing from slot pgcourier, shipping to 1 receiver(s)"),
        "the sender's status line: {ready}"
    );
    // No connection string or secret in any status line.
    for (_, m) in from_sender.seen.iter().chain(&from_receiver.seen) {
        anyhow::ensure!(
            !m.contains("host=") && !m.contains("password") && !m.contains("dbname"),
            "a connection string in a notification: {m}"
        );
    }

    // The watchdog, again and again from both: at least 5 pings, spread
    // over at least three of its 200 ms intervals (pings sent before the
    // test read them arrive at once).
    for (n, daemon) in [(&mut from_receiver, &receiver), (&mut from_sender, &sender)] {
        loop {
            let times: Vec<Instant> = n
                .seen
                .iter()
                .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
                .map(|(t, _)| *t)
                .collect();
            if let (Some(first), Some(last)) = (times.first(), times.last()) {
                if times.len() >= 5 && *last - *first >= Duration::from_millis(600) {
                    eprintln!(
                        "{}: {} WATCHDOG=1 over {:?}",
                        daemon.name(),
                        times.len(),
                        *last - *first
                    );
                    break;
                }
            }
            n.wait_for("WATCHDOG=1", daemon).await?;
        }
    }

    // SIGTERM: STOPPING=1, then a clean exit.
    for (n, daemon) in [(&mut from_sender, &sender), (&mut from_receiver, &receiver)] {
        let status = daemon.terminate()?;
        n.wait_for("STOPPING=1", daemon).await?;
        anyhow::ensure!(
            status.success(),
            "{} exit {status}\n{}",
            daemon.name(),
            daemon.log_tail(20)
        );
    }
    Ok(())
}
