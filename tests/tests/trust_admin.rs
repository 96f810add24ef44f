//! Issue 12, item 9, against running daemons: control requests and row data
//! are served only on the admin socket (mode 0600 in a 0700 directory of
//! the service's user); the TCP listener, which a local user or a web page
//! (cross-site POST, DNS rebinding) can reach, serves `/status`, `/metrics`
//! and `/health` without row values and refuses everything else, with no
//! effect; seed files are created new, never over an existing path and
//! never through a symbolic link.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use pgcourier_common::ops::admin::{self, AdminTarget};
use pgcourier_tests::{bin_path, wait_until};
use serde_json::Value;

use crate::fixture::{free_tcp_port, wait_count, Options, Setup};

const WAIT: Duration = Duration::from_secs(120);
/// A value that must never leave the admin socket (nor reach a log).
const SECRET: &str = "okapi-7c3e-never-on-tcp";

/// One request to an admin endpoint (TCP or socket).
async fn ask(
    target: impl Into<AdminTarget>,
    method: &'static str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let (target, path) = (target.into(), path.to_owned());
    let what = format!("{method} {path} at {target}");
    tokio::task::spawn_blocking(move || admin::request(target, method, &path))
        .await?
        .with_context(|| what)
}

/// A browser-like cross-site form POST with a foreign Host and Origin
/// (what a page doing DNS rebinding sends), raw over TCP; the status code.
fn cross_site_post(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: rebound.attacker.example:{port}\r\n\
         Origin: http://rebound.attacker.example\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 3\r\n\
         Connection: close\r\n\r\na=1"
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line in {answer:?}"))?;
    Ok((code, answer))
}

/// Run pgcourier-queue; (exit code, stdout + stderr).
fn queue(config: &Path, args: &[&str]) -> anyhow::Result<(i32, String)> {
    let out = Command::new(bin_path("pgcourier-queue"))
        .args(["--config", config.to_str().expect("utf-8")])
        .args(args)
        .output()
        .context("run pgcourier-queue")?;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// The socket is ours, mode 0600, in a directory of ours with mode 0700.
fn assert_private_socket(path: &Path) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let m = std::fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    anyhow::ensure!(
        m.file_type().is_socket(),
        "{} is not a socket",
        path.display()
    );
    assert_eq!(m.mode() & 0o777, 0o600, "mode of {}", path.display());
    assert_eq!(m.uid(), me, "owner of {}", path.display());
    let dir = path.parent().expect("the socket has a directory");
    let d = std::fs::symlink_metadata(dir)?;
    anyhow::ensure!(d.is_dir(), "{} is not a directory", dir.display());
    assert_eq!(d.mode() & 0o777, 0o700, "mode of {}", dir.display());
    assert_eq!(d.uid(), me, "owner of {}", dir.display());
    Ok(())
}

fn chmod(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// `curl --unix-socket <socket> http://localhost/status` as user nobody:
/// (exit code, output).
fn curl_as_nobody(curl: &Path, socket: &Path) -> anyhow::Result<(i32, String)> {
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(curl)
        .args(["-sS", "--max-time", "10", "--unix-socket"])
        .arg(socket)
        .arg("http://localhost/status")
        .output()
        .context("run curl as nobody")?;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

fn find_curl() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|d| d.join("curl"))
        .find(|p| p.is_file())
}

/// The sender's last seed outcome once it is about `path`.
async fn seed_outcome(setup: &Setup, socket: &Path, path: &Path) -> anyhow::Result<Value> {
    let last = std::sync::Mutex::new(Value::Null);
    let want = path.display().to_string();
    wait_until(
        &format!("the sender to finish the seed export to {want}"),
        WAIT,
        || async {
            let (_, body) = ask(socket, "GET", "/status").await?;
            let st: Value = serde_json::from_str(&body)?;
            let seed = st["last_seed"].clone();
            let done = seed["path"] == want.as_str();
            *last.lock().expect("not poisoned") = seed;
            Ok(done)
        },
    )
    .await
    .with_context(|| setup.logs())?;
    Ok(last.into_inner().expect("not poisoned"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_and_row_data_are_only_on_the_private_socket_and_tcp_is_read_only(
) -> anyhow::Result<()> {
    let (sender_port, receiver_port) = (free_tcp_port(), free_tcp_port());
    let sender_extra =
        format!("admin = \"127.0.0.1:{sender_port}\"\nadmin-socket = \"sender-admin/sock\"");
    let receiver_extra =
        format!("admin = \"127.0.0.1:{receiver_port}\"\nadmin-socket = \"branch-admin/sock\"");
    let setup = Setup::start(
        "trust-admin",
        Options {
            schema: "CREATE TABLE t (id integer PRIMARY KEY, v text)",
            sender_extra: &sender_extra,
            receiver_extra: &receiver_extra,
            ..Options::default()
        },
    )
    .await?;
    let dir = setup.dir.path().to_path_buf();
    let (sender_sock, receiver_sock) =
        (dir.join("sender-admin/sock"), dir.join("branch-admin/sock"));
    let sender_tcp: std::net::SocketAddr = format!("127.0.0.1:{sender_port}").parse()?;
    let receiver_tcp: std::net::SocketAddr = format!("127.0.0.1:{receiver_port}").parse()?;
    assert_private_socket(&sender_sock)?;
    assert_private_socket(&receiver_sock)?;

    // A transaction carrying the secret blocks apply (the branch's column
    // is an integer): it stays in the sender's spool and the receiver's
    // inbox.
    let src = setup.source().await?;
    let dst = setup.target(0).await?;
    dst.batch_execute("ALTER TABLE t ALTER COLUMN v TYPE integer USING NULL")
        .await?;
    src.batch_execute(&format!("INSERT INTO t VALUES (1, '{SECRET}')"))
        .await?;
    let blocked = std::sync::Mutex::new(0);
    wait_until("the receiver's apply to block", WAIT, || async {
        let (_, body) = ask(receiver_tcp, "GET", "/status").await?;
        let st: Value = serde_json::from_str(&body)?;
        let seq = st["blocking_seq"].as_u64().unwrap_or(0);
        *blocked.lock().expect("not poisoned") = seq;
        Ok(st["apply_state"] == "paused" && seq > 0)
    })
    .await
    .with_context(|| setup.logs())?;
    let blocking = blocked.into_inner().expect("not poisoned");

    // Over TCP: status, metrics and health, without row values.
    for (who, addr, health) in [("sender", sender_tcp, 200), ("receiver", receiver_tcp, 503)] {
        for (path, code) in [("/status", 200), ("/metrics", 200), ("/health", health)] {
            let (got, body) = ask(addr, "GET", path).await?;
            assert_eq!(got, code, "{who} TCP GET {path}: {body}");
            assert!(!body.is_empty(), "{who} TCP GET {path} is empty");
            assert!(
                !body.contains(SECRET),
                "{who} TCP GET {path} shows a row value:\n{body}"
            );
        }
    }
    // Over TCP: records and control are refused.
    let tcp_seed = dir.join("tcp.seed");
    let refused = [
        (sender_tcp, "GET", "/records".to_owned()),
        (sender_tcp, "GET", "/records?limit=100000".to_owned()),
        (sender_tcp, "GET", format!("/records/{blocking}")),
        (
            sender_tcp,
            "POST",
            format!(
                "/seed?out={}",
                admin::percent_encode(&tcp_seed.display().to_string())
            ),
        ),
        (receiver_tcp, "GET", "/records".to_owned()),
        (
            receiver_tcp,
            "GET",
            format!("/records/{blocking}?format=sql"),
        ),
        (
            receiver_tcp,
            "POST",
            format!("/skip?seq={blocking}&reason=over%20tcp"),
        ),
    ];
    for (addr, method, path) in &refused {
        let (code, body) = ask(*addr, method, path).await?;
        assert_eq!(code, 403, "TCP {method} {path} at {addr}: {body}");
        assert!(!body.contains(SECRET), "TCP {method} {path}: {body}");
    }
    for (port, path) in [
        (
            sender_port,
            format!(
                "/seed?out={}",
                admin::percent_encode(&tcp_seed.display().to_string())
            ),
        ),
        (
            receiver_port,
            format!("/skip?seq={blocking}&reason=rebound"),
        ),
    ] {
        let (code, answer) = cross_site_post(port, &path)?;
        assert_eq!(code, 403, "cross-site POST {path}: {answer}");
    }

    // Over the socket: the records, with their values on request.
    let (code, body) = ask(sender_sock.as_path(), "GET", "/records").await?;
    assert_eq!(code, 200, "sender socket GET /records: {body}");
    let lines: Vec<Value> = serde_json::from_str(&body)?;
    anyhow::ensure!(
        lines.iter().any(|l| l["seq"] == blocking),
        "the sender's spool lists record {blocking}: {body}"
    );
    let (code, body) = ask(
        sender_sock.as_path(),
        "GET",
        &format!("/records/{blocking}"),
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(SECRET),
        "the record's values over the socket: {body}"
    );
    let (code, out) = queue(&setup.sender_config, &["--json", "list"])?;
    assert_eq!(code, 0, "pgcourier-queue list on the sender: {out}");
    assert!(out.contains(&format!("\"seq\": {blocking}")), "{out}");
    let rcfg = &setup.branches[0].config;
    let (code, out) = queue(rcfg, &["show", &blocking.to_string()])?;
    assert_eq!(code, 0, "pgcourier-queue show on the receiver: {out}");
    assert!(out.contains(SECRET), "{out}");

    // The control requests work over the socket; the refused ones did nothing.
    let (code, out) = queue(
        rcfg,
        &["skip", &blocking.to_string(), "--reason", "over the socket"],
    )?;
    assert_eq!(code, 0, "pgcourier-queue skip: {out}\n{}", setup.logs());
    src.batch_execute("INSERT INTO t VALUES (2, '2')").await?;
    wait_count(&dst, "SELECT count(*) FROM t WHERE id = 2", 1, WAIT)
        .await
        .with_context(|| setup.logs())?;
    let skipped: Vec<(i64, String)> = dst
        .query(
            "SELECT seq, reason FROM pgcourier.skipped ORDER BY seq",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        skipped,
        vec![(blocking as i64, "over the socket".to_owned())],
        "only the socket's skip was carried out"
    );
    let sock_seed = dir.join("sock.seed");
    let (code, body) = ask(
        sender_sock.as_path(),
        "POST",
        &format!(
            "/seed?out={}",
            admin::percent_encode(&sock_seed.display().to_string())
        ),
    )
    .await?;
    assert_eq!(code, 202, "socket POST /seed: {body}");
    let outcome = seed_outcome(&setup, &sender_sock, &sock_seed).await?;
    anyhow::ensure!(outcome["summary"].is_object(), "seed export: {outcome}");
    let m = std::fs::symlink_metadata(&sock_seed)?;
    assert!(m.is_file(), "the seed file");
    assert_eq!(m.mode() & 0o777, 0o600, "the seed file's mode");
    for leftover in [
        tcp_seed.clone(),
        tcp_seed.with_extension("partial"),
        sock_seed.with_extension("partial"),
    ] {
        assert!(
            std::fs::symlink_metadata(&leftover).is_err(),
            "{} exists: a refused request or a finished export left a file",
            leftover.display()
        );
    }

    // Seeds never over an existing path, never through a symbolic link
    // (the final name or the .partial).
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, "keep me")?;
    let link = dir.join("link.seed");
    std::os::unix::fs::symlink(&victim, &link)?;
    let trap = dir.join("trap.seed");
    std::os::unix::fs::symlink(&victim, trap.with_extension("partial"))?;
    for out in [victim.clone(), link.clone(), trap.clone()] {
        let (code, body) = ask(
            sender_sock.as_path(),
            "POST",
            &format!(
                "/seed?out={}",
                admin::percent_encode(&out.display().to_string())
            ),
        )
        .await?;
        assert_eq!(code, 202, "socket POST /seed: {body}");
        let outcome = seed_outcome(&setup, &sender_sock, &out).await?;
        anyhow::ensure!(
            outcome["error"].is_string() && outcome["summary"].is_null(),
            "a seed to {} was written: {outcome}",
            out.display()
        );
        assert_eq!(
            std::fs::read_to_string(&victim)?,
            "keep me",
            "the seed to {} wrote over another file",
            out.display()
        );
    }
    assert!(std::fs::symlink_metadata(&trap).is_err(), "trap.seed");

    // No row value in the daemons' logs either.
    for (who, log) in [
        ("sender", setup.sender.log()),
        ("receiver", setup.branches[0].receiver.log()),
    ] {
        assert!(
            !log.contains(SECRET),
            "the {who} log holds a row value:\n{log}"
        );
    }

    // Another user cannot use the socket: refused by the socket's own mode
    // even once the directories on its path let that user through.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: the check as another user (runuser -u nobody) is left out");
        return Ok(());
    }
    let curl = find_curl().context(
        "curl is needed for the check as another user: install it (scripts/install-postgres)",
    )?;
    let (code, out) = curl_as_nobody(&curl, &receiver_sock)?;
    assert_ne!(code, 0, "nobody reached the receiver's socket: {out}");
    let admin_dir = receiver_sock.parent().expect("socket directory");
    chmod(&dir, 0o711)?;
    chmod(admin_dir, 0o711)?;
    let (code, out) = curl_as_nobody(&curl, &receiver_sock)?;
    eprintln!("nobody, through open directories, to a 0600 socket: exit {code}: {out}");
    assert_ne!(code, 0, "nobody reached a 0600 socket: {out}");
    assert!(!out.contains("\"role\""), "{out}");
    // The same client, as the same user, gets through once the mode allows
    // it: the refusal above was the socket's mode.
    chmod(&receiver_sock, 0o666)?;
    let (code, out) = curl_as_nobody(&curl, &receiver_sock)?;
    chmod(&receiver_sock, 0o600)?;
    chmod(admin_dir, 0o700)?;
    chmod(&dir, 0o700)?;
    assert_eq!(code, 0, "curl as nobody to a 0666 socket: {out}");
    assert!(out.contains("\"role\": \"receiver\""), "{out}");
    Ok(())
}
