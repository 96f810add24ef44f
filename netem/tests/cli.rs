use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pgcourier-netem");

/// The relay process, killed if the test fails before it exits.
struct Netem(Child);

impl Drop for Netem {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(netem: &Netem, signal: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    let rc = unsafe { libc::kill(netem.0.id() as libc::pid_t, signal) };
    assert_eq!(rc, 0, "send signal {signal}");
}

#[test]
fn binary_serves_the_control_port_and_prints_stats_on_sigusr1_and_sigterm() {
    let child = Command::new(BIN)
        .args([
            "udp",
            "--listen",
            "127.0.0.1:0",
            "--forward",
            "127.0.0.1:9",
            "--profile",
            "satellite",
        ])
        .args([
            "--loss",
            "0",
            "--seed",
            "7",
            "--control",
            "127.0.0.1:0",
            "--stats-format",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgcourier-netem");
    let mut netem = Netem(child);
    let mut stdout = BufReader::new(netem.0.stdout.take().expect("piped stdout"));
    let mut banner = String::new();
    let control = loop {
        let mut line = String::new();
        let n = stdout.read_line(&mut line).expect("read stdout");
        assert!(
            n > 0,
            "exited before opening the control port; printed:\n{banner}"
        );
        banner.push_str(&line);
        if let Some(rest) = line.strip_prefix("control port on ") {
            break rest
                .split_whitespace()
                .next()
                .expect("an address")
                .to_string();
        }
    };
    assert!(
        banner.contains("profile satellite, seed 7"),
        "banner:\n{banner}"
    );
    assert!(
        banner.contains("rate 512 kbit/s"),
        "the back direction keeps the profile's rate:\n{banner}"
    );

    let mut conn = TcpStream::connect(&control).expect("connect to the control port");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set timeout");
    let mut replies = BufReader::new(conn.try_clone().expect("clone stream"));
    conn.write_all(b"down\n").expect("send down");
    let mut reply = String::new();
    replies.read_line(&mut reply).expect("read reply");
    assert_eq!(reply.trim(), "ok down");

    signal(&netem, libc::SIGUSR1);
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("read stats printed on SIGUSR1");
    let stats: serde_json::Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("SIGUSR1 stats {line:?}: {e}"));
    assert_eq!(stats["down"], true);

    signal(&netem, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = netem.0.try_wait().expect("wait for pgcourier-netem") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "pgcourier-netem did not exit within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "exit status {status}");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("read final stats");
    let stats: serde_json::Value =
        serde_json::from_str(rest.trim()).unwrap_or_else(|e| panic!("final stats {rest:?}: {e}"));
    assert_eq!(stats["down"], true);
}

#[test]
fn profiles_are_listed_and_an_unknown_profile_is_an_error() {
    let out = Command::new(BIN)
        .arg("profiles")
        .output()
        .expect("run profiles");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["clean", "satellite", "3g", "dsl", "flaky", "lossy"] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing from:\n{text}"
        );
    }
    let out = Command::new(BIN)
        .args([
            "udp",
            "--listen",
            "127.0.0.1:0",
            "--forward",
            "127.0.0.1:9",
            "--profile",
            "carrier-pigeon",
        ])
        .output()
        .expect("run udp");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown profile"));
}
