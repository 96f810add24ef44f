//! Bad input: broken configurations, unreachable or refusing databases, and
//! peers that are not ours (unknown or expired certificates, garbage on the
//! QUIC port, a second sender on the same slot, a sender of another source).
//! Each is refused with a log line or error that says why, a command exits
//! non-zero, and a running replication goes on undisturbed.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use pgcourier_tests::{bin_path, wait_until, workdir, Daemon, PgCluster};

use crate::fixture::{free_tcp_port, keygen, wait_count, Options, Setup, DB};
use crate::replication::{acct_transactions, assert_applied_exactly_once, ACCT_SCHEMA};

const WAIT: Duration = Duration::from_secs(120);

/// Run a daemon command to its end (at most `limit`); returns its exit
/// status and everything it printed.
fn run_to_end(bin: &str, args: &[&str], limit: Duration) -> anyhow::Result<(ExitStatus, String)> {
    let dir = workdir("cmd");
    let out_path = dir.path().join("out");
    let out = std::fs::File::create(&out_path)?;
    let mut child = Command::new(bin_path(bin))
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("spawn {bin}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "{bin} {args:?} did not exit within {limit:?}:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok((status, std::fs::read_to_string(&out_path)?))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn bad_configurations_exit_non_zero_with_an_error_naming_the_setting() -> anyhow::Result<()> {
    let dir = workdir("badcfg");
    let d = dir.path();
    let fp = keygen(d, "sender");
    keygen(d, "receiver");
    let src = "source = \"host=/nonexistent dbname=x\"\n";
    let tail = format!(
        "cert = \"sender.crt\"\nkey = \"sender.key\"\n\n[[receiver]]\nname = \"b\"\nfingerprint = \"{fp}\"\naddress = \"127.0.0.1:9\"\n"
    );
    let recv_tail = format!(
        "cert = \"receiver.crt\"\nkey = \"receiver.key\"\nsender-fingerprints = [\"{fp}\"]\n"
    );
    let cases: Vec<(&str, String, &str)> = vec![
        ("pgcourier-sender", format!("spool-dir = \"s\"\n{tail}"), "source"),
        (
            "pgcourier-sender",
            format!("{src}spool-dir = \"s\"\npoll-interval = \"banana\"\n{tail}"),
            "poll-interval",
        ),
        (
            "pgcourier-sender",
            format!("{src}spol-dir = \"s\"\n{tail}"),
            "spol-dir",
        ),
        (
            "pgcourier-sender",
            format!("{src}spool-dir = \"s\"\n{tail}max-rate = \"2 megabits\"\n"),
            "receiver.max-rate",
        ),
        (
            "pgcourier-sender",
            format!("{src}spool-dir = \"s\"\n{}", tail.replace("127.0.0.1:9", "branch_1:9")),
            "receiver.address",
        ),
        (
            "pgcourier-receiver",
            format!("target = \"host=/nonexistent\"\ninbox-dir = \"i\"\nsender-address = \"hq.example\"\n{recv_tail}"),
            "sender-address",
        ),
        (
            "pgcourier-sender",
            format!("{src}spool-dir = \"s\"\n{tail}transport = \"udp\"\n"),
            "transport",
        ),
        (
            "pgcourier-sender",
            format!("{src}spool-dir = \"s\"\n{tail}proxy = \"proxy.example:3128\"\n"),
            "receiver.proxy",
        ),
        (
            "pgcourier-sender",
            format!("{src}spool-dir = \"s\"\n{tail}transport = \"quic\"\nproxy = \"http://proxy.example:3128\"\n"),
            "receiver.proxy",
        ),
        (
            "pgcourier-sender",
            format!("{src}spool-dir = \"s\"\nhandshake-timeout = \"fast\"\n{tail}"),
            "handshake-timeout",
        ),
        (
            "pgcourier-receiver",
            format!("target = \"host=/nonexistent\"\ninbox-dir = \"i\"\nlisten = \"127.0.0.1:0\"\nproxy = \"http://proxy.example:3128\"\n{recv_tail}"),
            "proxy",
        ),
        (
            "pgcourier-receiver",
            format!("target = \"host=/nonexistent\"\ninbox-dir = \"i\"\nlisten = \"127.0.0.1:0\"\ntransport = \"tcp\"\n{recv_tail}"),
            "transport",
        ),
        (
            "pgcourier-sender",
            format!("{src}spool-dir = \"s\"\npassword-env = \"PGC_NO_SUCH_VAR\"\n{tail}"),
            "password-env",
        ),
        (
            "pgcourier-sender",
            format!("{src}spool-dir = \"s\"\n{}", tail.replace("sender.crt", "missing.crt")),
            "cert",
        ),
        (
            "pgcourier-receiver",
            format!("target = \"host=/nonexistent\"\nlisten = \"127.0.0.1:0\"\n{recv_tail}"),
            "inbox-dir",
        ),
        (
            "pgcourier-receiver",
            format!("target = \"host=/nonexistent\"\ninbox-dir = \"i\"\nlisten = \"127.0.0.1:0\"\nsender-address = \"127.0.0.1:9\"\n{recv_tail}"),
            "sender-address",
        ),
        (
            "pgcourier-receiver",
            format!("target = \"host=/nonexistent\"\ninbox-dir = \"i\"\nlisten = \"127.0.0.1:0\"\n{}", recv_tail.replace(&fp, "not-hex")),
            "sender-fingerprints",
        ),
        (
            "pgcourier-receiver",
            format!("target = \"host=/nonexistent\"\ninbox-dir = \"i\"\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1\"\n{recv_tail}"),
            "admin",
        ),
    ];
    let mut report = Vec::new();
    for (i, (bin, text, setting)) in cases.iter().enumerate() {
        let cfg = write(d, &format!("c{i}.toml"), text);
        let (status, out) = run_to_end(
            bin,
            &["run", "--config", cfg.to_str().expect("utf-8")],
            Duration::from_secs(30),
        )?;
        let named = out.contains(&format!("`{setting}`")) || out.contains(setting);
        if status.success() || !named {
            report.push(format!(
                "case {i} ({bin}, bad `{setting}`): exit {status}, output:\n{out}"
            ));
        }
        eprintln!(
            "bad config {i} (`{setting}`): exit {status}: {}",
            out.trim()
        );
    }
    anyhow::ensure!(
        report.is_empty(),
        "bad configurations not refused clearly:\n{}",
        report.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_databases_are_named_and_refused_logins_exit_non_zero() -> anyhow::Result<()> {
    let pg = tokio::task::spawn_blocking(|| PgCluster::start("pwd")).await??;
    let client = pg.client(DB).await?;
    client
        .batch_execute(
            "CREATE ROLE courier LOGIN REPLICATION SUPERUSER PASSWORD 'right'; \
             CREATE TABLE t (id integer PRIMARY KEY)",
        )
        .await?;
    // Password authentication for that role (the cluster trusts everyone else).
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba)?;
    std::fs::write(&hba, format!("local all courier scram-sha-256\n{old}"))?;
    client.batch_execute("SELECT pg_reload_conf()").await?;
    let dir = workdir("pwd");
    let d = dir.path();
    let fp = keygen(d, "sender");
    let rfp = keygen(d, "receiver");
    let host = pg.socket_dir().display().to_string();
    let port = pg.port();
    write(d, "pw", "wrong\n");
    let sender = |source: &str, extra: &str| {
        format!(
            "source = \"{source}\"\n{extra}\nspool-dir = \"spool\"\ncert = \"sender.crt\"\nkey = \"sender.key\"\n\
             max-backoff = \"1s\"\n\n[[receiver]]\nname = \"b\"\nfingerprint = \"{rfp}\"\naddress = \"127.0.0.1:9\"\n"
        )
    };

    // check: an unreachable source is named, exit 1.
    let cfg = write(
        d,
        "unreachable.toml",
        &sender(
            &format!(
                "host={host} port={} user=postgres dbname=postgres",
                port + 1
            ),
            "",
        ),
    );
    let (status, out) = run_to_end(
        "pgcourier-sender",
        &["check", "--config", cfg.to_str().expect("utf-8")],
        Duration::from_secs(60),
    )?;
    anyhow::ensure!(
        status.code() == Some(1)
            && out.contains("cannot connect to the source")
            && out.contains("`source`"),
        "check on an unreachable source: exit {status}\n{out}"
    );
    // run: an unreachable source is transient (it may be starting): retried,
    // with a log line naming the setting.
    let run = Daemon::spawn(
        "unreachable",
        &bin_path("pgcourier-sender"),
        &["run", "--config", cfg.to_str().expect("utf-8")],
        &d.join("unreachable.log"),
    )?;
    wait_until(
        "the sender to name the unreachable setting",
        WAIT,
        || async { Ok(run.log().contains("setting `source`")) },
    )
    .await
    .with_context(|| run.log())?;
    anyhow::ensure!(
        run.is_running(),
        "an unreachable source is retried, not fatal:\n{}",
        run.log()
    );
    run.terminate()?;

    // run: a wrong password is definite: exit 3 (an operator must act)
    // naming the setting.
    let cfg = write(
        d,
        "wrongpw.toml",
        &sender(
            &format!("host={host} port={port} user=courier dbname=postgres"),
            "password-file = \"pw\"",
        ),
    );
    let (status, out) = run_to_end(
        "pgcourier-sender",
        &["run", "--config", cfg.to_str().expect("utf-8")],
        Duration::from_secs(60),
    )?;
    anyhow::ensure!(
        status.code() == Some(3)
            && out.contains("refused the login (setting `source`): wrong password"),
        "sender with a wrong password: exit {status}\n{out}"
    );
    anyhow::ensure!(
        !out.contains("wrong\n") && !out.contains("'wrong'"),
        "the password leaked into the log:\n{out}"
    );
    // check says the same.
    let (status, out) = run_to_end(
        "pgcourier-sender",
        &["check", "--config", cfg.to_str().expect("utf-8")],
        Duration::from_secs(60),
    )?;
    anyhow::ensure!(
        status.code() == Some(1) && out.contains("wrong password"),
        "check with a wrong password: exit {status}\n{out}"
    );
    // A database that does not exist.
    let cfg = write(
        d,
        "nodb.toml",
        &sender(
            &format!("host={host} port={port} user=postgres dbname=nosuchdb"),
            "",
        ),
    );
    let (status, out) = run_to_end(
        "pgcourier-sender",
        &["run", "--config", cfg.to_str().expect("utf-8")],
        Duration::from_secs(60),
    )?;
    anyhow::ensure!(
        status.code() == Some(3) && out.contains("the database does not exist"),
        "sender with a missing database: exit {status}\n{out}"
    );

    // The receiver: a wrong password on the target, exit 3 naming `target`.
    let cfg = write(
        d,
        "receiver.toml",
        &format!(
            "target = \"host={host} port={port} user=courier dbname=postgres\"\npassword-file = \"pw\"\n\
             inbox-dir = \"inbox\"\ncert = \"receiver.crt\"\nkey = \"receiver.key\"\nlisten = \"127.0.0.1:0\"\n\
             sender-fingerprints = [\"{fp}\"]\n"
        ),
    );
    let (status, out) = run_to_end(
        "pgcourier-receiver",
        &["run", "--config", cfg.to_str().expect("utf-8")],
        Duration::from_secs(60),
    )?;
    anyhow::ensure!(
        status.code() == Some(3)
            && out.contains("refused the login (setting `target`): wrong password"),
        "receiver with a wrong password: exit {status}\n{out}"
    );
    // With the right password both start.
    write(d, "pw", "right\n");
    let run = Daemon::spawn(
        "rightpw",
        &bin_path("pgcourier-sender"),
        &[
            "run",
            "--config",
            d.join("wrongpw.toml").to_str().expect("utf-8"),
        ],
        &d.join("rightpw.log"),
    )?;
    wait_until(
        "the sender to capture with the right password",
        WAIT,
        || async { Ok(run.log().contains("capturing from source")) },
    )
    .await
    .with_context(|| run.log())?;
    run.terminate()?;
    Ok(())
}

/// A copy of the setup's sender.toml with other top-level settings.
fn sender_variant(setup: &Setup, name: &str, edit: &[(&str, &str)]) -> anyhow::Result<PathBuf> {
    let mut text = std::fs::read_to_string(&setup.sender_config)?;
    for (from, to) in edit {
        anyhow::ensure!(text.contains(from), "sender.toml has no {from:?}");
        text = text.replace(from, to);
    }
    Ok(write(setup.dir.path(), name, &text))
}

fn spawn_sender(setup: &Setup, name: &str, cfg: &Path) -> anyhow::Result<Daemon> {
    Daemon::spawn(
        name,
        &bin_path("pgcourier-sender"),
        &["run", "--config", cfg.to_str().expect("utf-8")],
        &setup.dir.path().join(format!("{name}.log")),
    )
}

/// A key and certificate that expired in 2001, written as `name.crt`/`.key`.
fn expired_identity(dir: &Path, name: &str) -> anyhow::Result<String> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    Ok(pgcourier_common::transport::tls::load_identity(&c, &k)?
        .fingerprint()
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_are_not_ours_are_refused_with_a_reason_and_replication_goes_on(
) -> anyhow::Result<()> {
    let mut setup = Setup::start(
        "badpeers",
        Options {
            schema: ACCT_SCHEMA,
            tables: &["public.acct"],
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    let dst = setup.target(0).await?;
    acct_transactions(&src, 1, 50).await?;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    let d = setup.dir.path().to_path_buf();
    let mut next = 1000;
    // After each intruder, work committed afterwards still arrives.
    let mut still_replicates = |setup: &Setup| {
        next += 100;
        let from = next;
        let src = &src;
        let dst = &dst;
        let logs = setup.logs();
        async move {
            acct_transactions(src, from, 10).await?;
            wait_count(
                dst,
                &format!("SELECT count(*) FROM acct WHERE id >= {from}"),
                1,
                WAIT,
            )
            .await
            .with_context(|| logs)
        }
    };

    // 1. A sender whose certificate the receiver does not pin.
    let stranger = keygen(&d, "stranger");
    let cfg = sender_variant(
        &setup,
        "stranger.toml",
        &[
            (
                "spool-dir = \"spool\"",
                "spool-dir = \"spool-stranger\"\nslot = \"stranger\"\npublication = \"stranger\"",
            ),
            (
                "cert = \"sender.crt\"\nkey = \"sender.key\"",
                "cert = \"stranger.crt\"\nkey = \"stranger.key\"",
            ),
        ],
    )?;
    let intruder = spawn_sender(&setup, "stranger", &cfg)?;
    let receiver = &setup.branches[0].receiver;
    wait_until(
        "the receiver to refuse the unknown sender",
        WAIT,
        || async { Ok(receiver.log().contains(&stranger)) },
    )
    .await
    .with_context(|| setup.logs())?;
    let line = receiver
        .log()
        .lines()
        .find(|l| l.contains(&stranger))
        .unwrap_or_default()
        .to_owned();
    eprintln!("unknown fingerprint: {line}");
    anyhow::ensure!(line.contains("refusing"), "no reason given: {line}");
    intruder.kill9()?;
    still_replicates(&setup).await?;

    // 2. Garbage and plaintext datagrams on the receiver's QUIC port.
    let rcfg = std::fs::read_to_string(&setup.branches[0].config)?;
    let listen: std::net::SocketAddr = rcfg
        .lines()
        .find_map(|l| l.strip_prefix("listen = "))
        .context("listen")?
        .trim_matches('"')
        .parse()?;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    use rand::Rng as _;
    let mut rng = rand::thread_rng();
    for i in 0..500 {
        let len = rng.gen_range(1..1400);
        let mut buf: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        if i % 50 == 0 {
            buf = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        }
        if i % 3 == 0 {
            // Looks like a QUIC long header (Initial), then noise.
            buf[0] = 0xc0 | (buf[0] & 0x0f);
        }
        sock.send_to(&buf, listen)?;
    }
    still_replicates(&setup).await?;
    anyhow::ensure!(
        setup.branches[0].receiver.is_running(),
        "garbage datagrams stopped the receiver:\n{}",
        setup.logs()
    );

    // 3. A second sender with our certificate, on the same slot and source.
    let cfg = sender_variant(
        &setup,
        "twin.toml",
        &[("spool-dir = \"spool\"", "spool-dir = \"spool-twin\"")],
    )?;
    let twin = spawn_sender(&setup, "twin", &cfg)?;
    wait_until("the second sender to be refused the slot", WAIT, || async {
        Ok(twin.log().contains("another pgcourier sender"))
    })
    .await
    .with_context(|| twin.log())?;
    wait_until(
        "the receiver to be told why the second sender refuses it",
        WAIT,
        || async {
            Ok(setup.branches[0]
                .receiver
                .log()
                .contains("sender refused: the sender has not reached its source database"))
        },
    )
    .await
    .with_context(|| setup.logs())?;
    still_replicates(&setup).await?;
    eprintln!(
        "second sender: {}",
        twin.log()
            .lines()
            .find(|l| l.contains("another pgcourier sender"))
            .unwrap_or_default()
    );
    twin.kill9()?;

    // 4. A sender of another source, with a pinned certificate.
    let other = tokio::task::spawn_blocking(|| PgCluster::start("other")).await??;
    other.execute(DB, ACCT_SCHEMA).await?;
    other
        .execute(DB, "INSERT INTO acct VALUES (1, 1, 'other source')")
        .await?;
    let cfg = sender_variant(
        &setup,
        "other.toml",
        &[
            (&setup.hq.conninfo(DB), &other.conninfo(DB)),
            ("spool-dir = \"spool\"", "spool-dir = \"spool-other\""),
        ],
    )?;
    let foreign = spawn_sender(&setup, "other", &cfg)?;
    other
        .execute(DB, "INSERT INTO acct VALUES (2, 2, 'other source')")
        .await?;
    wait_until("both sides to refuse the other source", WAIT, || async {
        Ok(setup.branches[0]
            .receiver
            .log()
            .contains("sender refused: the receiver's inbox belongs to source")
            && foreign
                .log()
                .contains("refused the receiver: the receiver's inbox belongs to source"))
    })
    .await
    .with_context(|| {
        format!(
            "{}\n--- other sender ---\n{}",
            setup.logs(),
            foreign.log_tail(30)
        )
    })?;
    still_replicates(&setup).await?;
    foreign.kill9()?;

    // 5. A pinned sender certificate that has expired.
    let expired = expired_identity(&d, "expired")?;
    setup.branches[0].receiver.terminate()?;
    let rtext = std::fs::read_to_string(&setup.branches[0].config)?;
    std::fs::write(
        &setup.branches[0].config,
        rtext.replace(
            "sender-fingerprints = [",
            &format!("sender-fingerprints = [\"{expired}\", "),
        ),
    )?;
    setup.restart_receiver(0)?;
    let cfg = sender_variant(
        &setup,
        "expired.toml",
        &[
            (
                "spool-dir = \"spool\"",
                "spool-dir = \"spool-expired\"\nslot = \"expired\"\npublication = \"expired\"",
            ),
            (
                "cert = \"sender.crt\"\nkey = \"sender.key\"",
                "cert = \"expired.crt\"\nkey = \"expired.key\"",
            ),
        ],
    )?;
    let old = spawn_sender(&setup, "expired", &cfg)?;
    wait_until(
        "the receiver to refuse the expired certificate",
        WAIT,
        || async {
            Ok(setup.branches[0]
                .receiver
                .log()
                .lines()
                .any(|l| l.contains(&expired) && l.contains("refusing")))
        },
    )
    .await
    .with_context(|| {
        format!(
            "{}\n--- expired sender ---\n{}",
            setup.logs(),
            old.log_tail(30)
        )
    })?;
    eprintln!(
        "expired certificate: {}",
        setup.branches[0]
            .receiver
            .log()
            .lines()
            .find(|l| l.contains(&expired) && l.contains("refusing"))
            .unwrap_or_default()
    );
    old.kill9()?;
    still_replicates(&setup).await?;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    assert_applied_exactly_once(&setup, 0).await
}

/// GET `path` from an admin endpoint.
async fn admin_get(port: u16, path: &'static str) -> anyhow::Result<(u16, String)> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    tokio::task::spawn_blocking(move || pgcourier_common::ops::admin::request(addr, "GET", path))
        .await?
        .map_err(anyhow::Error::from)
}

/// Wait until the receiver reports `state` with `class`, and its metrics
/// carry the class; returns the status.
async fn wait_apply_error(
    setup: &Setup,
    port: u16,
    state: &str,
    class: &str,
) -> anyhow::Result<serde_json::Value> {
    let what = format!("apply to be {state} with class {class}");
    wait_until(&what, WAIT, || async {
        let (_, body) = admin_get(port, "/status").await?;
        let st: serde_json::Value = serde_json::from_str(&body)?;
        Ok(st["apply_state"] == state && st["error_class"] == class)
    })
    .await
    .with_context(|| setup.logs())?;
    let (_, metrics) = admin_get(port, "/metrics").await?;
    let line = format!("pgcourier_receiver_apply_error_class{{class=\"{class}\"}} 1");
    anyhow::ensure!(metrics.contains(&line), "metrics lack {line}:\n{metrics}");
    let (_, body) = admin_get(port, "/status").await?;
    let st: serde_json::Value = serde_json::from_str(&body)?;
    eprintln!(
        "target {class}: apply {state}: {}",
        st["last_error"].as_str().unwrap_or_default()
    );
    Ok(st)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_errors_pause_apply_classified_in_status_and_metrics_and_it_resumes_after_the_fix(
) -> anyhow::Result<()> {
    let admin = free_tcp_port();
    let receiver_extra = format!("admin = \"127.0.0.1:{admin}\"");
    let mut setup = Setup::start(
        "badtarget",
        Options {
            schema: "CREATE TABLE t (id integer PRIMARY KEY, v text, n text)",
            receiver_extra: Box::leak(receiver_extra.into_boxed_str()),
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    let dst = setup.target(0).await?;
    let arrived = |id: i32| {
        let dst = &dst;
        async move {
            wait_count(
                dst,
                &format!("SELECT count(*) FROM t WHERE id = {id}"),
                1,
                WAIT,
            )
            .await
        }
    };
    src.batch_execute("INSERT INTO t VALUES (1, 'one')").await?;
    arrived(1).await.with_context(|| setup.logs())?;

    // Type mismatch: the target column is an integer (it holds only NULLs).
    dst.batch_execute("ALTER TABLE t ALTER COLUMN n TYPE integer USING NULL")
        .await?;
    src.batch_execute("INSERT INTO t VALUES (2, 'two', 'two')")
        .await?;
    let st = wait_apply_error(&setup, admin, "paused", "type_mismatch").await?;
    anyhow::ensure!(
        st["last_error"].as_str().unwrap_or("").contains("\"t\""),
        "the error names the table: {st}"
    );
    let out = Command::new(bin_path("pgcourier-queue"))
        .args([
            "--config",
            setup.branches[0].config.to_str().expect("utf-8"),
            "status",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.code() == Some(3) && text.contains("(type_mismatch)"),
        "pgcourier-queue status while paused: {:?}\n{text}",
        out.status
    );
    dst.batch_execute("ALTER TABLE t ALTER COLUMN n TYPE text")
        .await?;
    arrived(2).await.with_context(|| setup.logs())?;

    // Unique violation: a row planted on the target.
    dst.batch_execute("INSERT INTO t VALUES (3, 'planted')")
        .await?;
    src.batch_execute("INSERT INTO t VALUES (3, 'three')")
        .await?;
    wait_apply_error(&setup, admin, "paused", "unique_violation").await?;
    dst.batch_execute("DELETE FROM t WHERE id = 3").await?;
    arrived(3).await.with_context(|| setup.logs())?;

    // Permission denied: apply as a role that may not write the table.
    dst.batch_execute(
        "CREATE ROLE applier LOGIN; GRANT USAGE, CREATE ON SCHEMA pgcourier TO applier; \
         ALTER TABLE pgcourier.progress OWNER TO applier; ALTER TABLE pgcourier.joining OWNER TO applier; \
         ALTER TABLE pgcourier.held OWNER TO applier; GRANT SELECT, UPDATE, DELETE ON t TO applier",
    )
    .await?;
    setup.branches[0].receiver.terminate()?;
    let cfg = std::fs::read_to_string(&setup.branches[0].config)?;
    std::fs::write(
        &setup.branches[0].config,
        format!(
            "replica-role = false\n{}",
            cfg.replace("user=postgres", "user=applier")
        ),
    )?;
    setup.restart_receiver(0)?;
    src.batch_execute("INSERT INTO t VALUES (4, 'four')")
        .await?;
    wait_apply_error(&setup, admin, "paused", "permission_denied").await?;
    dst.batch_execute("GRANT INSERT ON t TO applier").await?;
    arrived(4).await.with_context(|| setup.logs())?;

    // A read-only target (the stand-in for a target in recovery): retried
    // as transient, the class shown, until it is writable again.
    dst.batch_execute(
        "ALTER DATABASE postgres SET default_transaction_read_only = on; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'applier'",
    )
    .await?;
    src.batch_execute("INSERT INTO t VALUES (5, 'five')")
        .await?;
    wait_apply_error(&setup, admin, "retrying", "read_only").await?;
    dst.batch_execute("ALTER DATABASE postgres RESET default_transaction_read_only")
        .await?;
    arrived(5).await.with_context(|| setup.logs())?;
    let (_, body) = admin_get(admin, "/status").await?;
    let st: serde_json::Value = serde_json::from_str(&body)?;
    anyhow::ensure!(
        st["apply_state"] == "applying" && st["error_class"].is_null(),
        "apply should be healthy again: {st}"
    );
    setup.wait_equal(0, &["public.t"], WAIT).await
}

/// Wait for a daemon to exit by itself; its status.
async fn wait_exit(d: &Daemon, what: &str) -> anyhow::Result<ExitStatus> {
    wait_until(what, WAIT, || async { Ok(d.try_status().is_some()) })
        .await
        .with_context(|| d.log_tail(30))?;
    Ok(d.try_status().expect("exited"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_cannot_continue_the_stream_is_reported_loudly_never_skipped(
) -> anyhow::Result<()> {
    let mut setup = Setup::start(
        "badsource",
        Options {
            schema: ACCT_SCHEMA,
            tables: &["public.acct"],
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    acct_transactions(&src, 1, 30).await?;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;

    // The publication dropped under a running sender.
    src.batch_execute("DROP PUBLICATION pgcourier").await?;
    acct_transactions(&src, 100, 5).await?;
    let status = wait_exit(
        &setup.sender,
        "the sender to stop on the dropped publication",
    )
    .await?;
    let log = setup.sender.log();
    eprintln!(
        "publication dropped: exit {status}: {}",
        log.lines()
            .rev()
            .find(|l| l.contains("ERROR"))
            .unwrap_or_default()
    );
    anyhow::ensure!(
        status.code() == Some(3) && log.contains("publication"),
        "a dropped publication must stop capture loudly, exit 3 (exit {status}):\n{log}"
    );
    // The slot dropped: a restarted sender must not create a new one and
    // carry on past the gap.
    src.batch_execute("SELECT pg_drop_replication_slot('pgcourier')")
        .await?;
    acct_transactions(&src, 200, 5).await?;
    setup.restart_sender()?;
    let status = wait_exit(&setup.sender, "the sender to stop on the dropped slot").await?;
    let log = setup.sender.log();
    anyhow::ensure!(
        status.code() == Some(3) && log.contains("is gone (dropped?)") && log.contains("re-seed"),
        "a dropped slot must stop the sender with how to re-seed (exit {status}):\n{}",
        setup.sender.log_tail(20)
    );
    eprintln!(
        "slot dropped: exit {status}: {}",
        log.lines()
            .rev()
            .find(|l| l.contains("is gone"))
            .unwrap_or_default()
    );
    let slots: i64 = src
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await?
        .get(0);
    anyhow::ensure!(slots == 0, "the sender created a new slot past the gap");

    // wal_level below logical (a fresh cluster: no server starts with a
    // logical slot and wal_level = replica).
    let pg = tokio::task::spawn_blocking(|| PgCluster::start("walrep")).await??;
    pg.execute(DB, "ALTER SYSTEM SET wal_level = replica")
        .await?;
    tokio::task::block_in_place(|| pg.restart())?;
    let cfg = sender_variant(
        &setup,
        "walrep.toml",
        &[
            (&setup.hq.conninfo(DB), &pg.conninfo(DB)),
            ("spool-dir = \"spool\"", "spool-dir = \"spool-walrep\""),
        ],
    )?;
    let (status, out) = run_to_end(
        "pgcourier-sender",
        &["check", "--config", cfg.to_str().expect("utf-8")],
        Duration::from_secs(60),
    )?;
    anyhow::ensure!(
        status.code() == Some(1)
            && out.contains("wal_level is replica")
            && out.contains("wal_level = logical"),
        "check with wal_level = replica: exit {status}\n{out}"
    );
    let (status, out) = run_to_end(
        "pgcourier-sender",
        &["run", "--config", cfg.to_str().expect("utf-8")],
        Duration::from_secs(60),
    )?;
    anyhow::ensure!(
        status.code() == Some(3) && out.contains("wal_level is replica"),
        "run with wal_level = replica: exit {status}\n{out}"
    );
    Ok(())
}

/// `check` names what a two-way table lacks at this site: a primary key,
/// numeric delta columns, the table itself; exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_what_a_two_way_table_lacks() -> anyhow::Result<()> {
    let pg = tokio::task::spawn_blocking(|| PgCluster::start("two-way-check")).await??;
    pg.execute(
        DB,
        "CREATE TABLE nokey (a int, b text); \
         CREATE TABLE item (id int PRIMARY KEY, v text, qty int)",
    )
    .await?;
    let dir = workdir("two-way-check");
    let d = dir.path();
    keygen(d, "sender");
    let rfp = keygen(d, "receiver");
    let both = |name: &str, extra: &str| {
        format!("[[table]]\nname = \"{name}\"\ndirection = \"both\"\n{extra}\n")
    };
    let cfg = write(
        d,
        "two-way.toml",
        &format!(
            "source = \"{}\"\nspool-dir = \"spool\"\ncert = \"sender.crt\"\nkey = \"sender.key\"\nsite = \"hq\"\n\
             {}{}{}[[receiver]]\nname = \"b\"\nfingerprint = \"{rfp}\"\naddress = \"127.0.0.1:9\"\n",
            pg.conninfo(DB),
            both("public.nokey", ""),
            both("public.item", "delta = [\"qty\", \"v\", \"nosuch\"]"),
            both("public.missing", ""),
        ),
    );
    let (status, out) = run_to_end(
        "pgcourier-sender",
        &["check", "--config", cfg.to_str().expect("utf-8")],
        Duration::from_secs(60),
    )?;
    for want in [
        "two-way table \"public\".\"nokey\" has no primary key",
        "delta columns v, nosuch of two-way table \"public\".\"item\" are not numeric",
        "two-way table \"public\".\"missing\" ([[table]] direction = \"both\") does not exist here",
    ] {
        anyhow::ensure!(
            status.code() == Some(1) && out.contains(want),
            "check: exit {status}, wanted {want:?}\n{out}"
        );
    }
    Ok(())
}
