//! Telling systemd how a daemon is doing (sd_notify(3), for units with
//! `Type=notify` and `WatchdogSec=`): `READY=1` once the daemon serves (the
//! sender: spool open and capture started; the receiver: inbox open and
//! listening or dialling), `WATCHDOG=1` every half `WATCHDOG_USEC` while its
//! runtime is alive, `STOPPING=1` when it begins to shut down, and
//! `STATUS=` a short line for `systemctl status` (names and counts only:
//! never a secret, a connection string or a row value).
//!
//! Each message is one datagram to the Unix socket named by
//! `NOTIFY_SOCKET`: a path, or `@name` in the abstract namespace. When it is
//! unset (not started by systemd, or not `Type=notify`) nothing is sent. A
//! failed send is logged once and otherwise ignored: the daemon's work does
//! not depend on it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={}", one_line(status)));
}

/// A new status line.
pub fn status(status: &str) {
    notify(&format!("STATUS={}", one_line(status)));
}

/// `STOPPING=1`: the daemon has begun to shut down.
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=stopping");
}

/// Send `state` (newline-separated `KEY=value` lines) to `NOTIFY_SOCKET`,
/// if set.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()) else {
        return;
    };
    if let Err(e) = send(&socket, state) {
        static LOGGED: AtomicBool = AtomicBool::new(false);
        if !LOGGED.swap(true, Ordering::Relaxed) {
            tracing::warn!(socket = %socket.to_string_lossy(), error = %e, "cannot notify systemd (NOTIFY_SOCKET); carrying on without it");
        }
    }
}

/// One datagram to `socket`: a path, or `@name` for the abstract namespace.
fn send(socket: &OsStr, state: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), socket)?;
        }
    }
    Ok(())
}

/// Status lines are one line: systemd shows them as such.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when it is set
/// and `WATCHDOG_PID` is unset or this process (and `NOTIFY_SOCKET` is set).
pub fn watchdog_interval() -> Option<Duration> {
    std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty())?;
    interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn interval_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid.filter(|p| !p.is_empty()) {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec) / 2)
}

/// Send `WATCHDOG=1` every [`watchdog_interval`], for ever (a task on the
/// daemon's runtime: if the runtime stalls, the pings stop and systemd
/// restarts the daemon). Never returns, also when there is no watchdog.
pub async fn watchdog() -> std::convert::Infallible {
    let Some(every) = watchdog_interval() else {
        return std::future::pending().await;
    };
    tracing::debug!(every = ?every, "systemd watchdog enabled");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        notify("WATCHDOG=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_pings_at_half_its_timeout_and_only_for_its_own_pid() {
        assert_eq!(
            interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            interval_from(Some("2000000"), Some("7"), 7),
            Some(Duration::from_secs(1))
        );
        assert_eq!(interval_from(Some("2000000"), Some("8"), 7), None);
        assert_eq!(interval_from(Some("2000000"), Some("x"), 7), None);
        assert_eq!(interval_from(None, Some("7"), 7), None);
        assert_eq!(interval_from(Some("0"), None, 7), None);
        assert_eq!(interval_from(Some("soon"), None, 7), None);
    }

    #[test]
    fn a_message_reaches_a_socket_by_path_and_in_the_abstract_namespace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let by_path = UnixDatagram::bind(&path).expect("bind path");
        send(path.as_os_str(), "READY=1\nSTATUS=ok").expect("send by path");
        let mut buf = [0u8; 64];
        let n = by_path.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=ok");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("pgcourier-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        let abstract_sock = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        send(OsStr::new(&format!("@{name}")), "WATCHDOG=1").expect("send abstract");
        let n = abstract_sock.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn status_lines_stay_one_line() {
        assert_eq!(one_line("a\nb\rc"), "a b c");
    }
}
