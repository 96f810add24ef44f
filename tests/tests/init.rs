//! `pgcourier-sender init` and `pgcourier-receiver init`: from flags to a
//! running pair. The branch makes its keys (`keygen`), headquarters runs
//! `init` with the branch's fingerprint, the branch runs `init` with the
//! sender's; the configs they write (0640, keys 0600) carry a real
//! replication, and `init` refuses to write over a config.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use pgcourier_tests::{bin_path, wait_tables_equal, workdir, Daemon, PgCluster};

use crate::fixture::{free_udp_port, DB};

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin_path(bin))
        .args(args)
        .env_remove("PGCOURIER_CONFIG")
        .output()
        .unwrap_or_else(|e| panic!("run {bin}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn first_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_on_both_sides_gives_a_pair_that_replicates() -> anyhow::Result<()> {
    let (hq, branch) = tokio::task::spawn_blocking(|| -> anyhow::Result<_> {
        let hq = std::thread::spawn(|| PgCluster::start("hq"));
        let branch = PgCluster::start("branch")?;
        Ok((hq.join().expect("cluster thread")?, branch))
    })
    .await??;
    let schema = "CREATE TABLE t (id integer PRIMARY KEY, v text)";
    hq.execute(DB, schema).await?;
    branch.execute(DB, schema).await?;
    let dir = workdir("init");
    let (hq_dir, branch_dir) = (dir.path().join("hq"), dir.path().join("branch"));
    std::fs::create_dir_all(&hq_dir)?;
    std::fs::create_dir_all(&branch_dir)?;
    let port = free_udp_port();
    let path = |p: &Path| p.to_str().expect("utf-8").to_string();

    // The branch makes its keys first and gives its fingerprint to headquarters.
    let out = run(
        "pgcourier-receiver",
        &[
            "keygen",
            "--cert",
            &path(&branch_dir.join("receiver.crt")),
            "--key",
            &path(&branch_dir.join("receiver.key")),
        ],
    );
    anyhow::ensure!(out.status.success(), "keygen: {}", text(&out));
    let receiver_fp = first_line(&out);

    let sender_config = hq_dir.join("sender.toml");
    let receiver_arg = format!("branch1={receiver_fp}@127.0.0.1:{port}");
    let sender_init = [
        "init",
        "--config",
        sender_config.to_str().expect("utf-8"),
        "--source",
        &hq.conninfo(DB),
        "--spool-dir",
        "spool",
        "--receiver",
        &receiver_arg,
    ];
    let out = run("pgcourier-sender", &sender_init);
    anyhow::ensure!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("ok: the source is ready"),
        "sender init: {}",
        text(&out)
    );
    let sender_fp = first_line(&out);
    anyhow::ensure!(
        sender_fp.len() == 64 && sender_fp.bytes().all(|b| b.is_ascii_hexdigit()),
        "sender init should print the fingerprint first: {}",
        text(&out)
    );
    anyhow::ensure!(
        mode(&sender_config) == 0o640,
        "sender.toml mode {:o}",
        mode(&sender_config)
    );
    anyhow::ensure!(mode(&hq_dir.join("sender.key")) == 0o600, "sender.key mode");

    // Never over an existing config; a bad fingerprint is refused by clap.
    let before = std::fs::read_to_string(&sender_config)?;
    let out = run("pgcourier-sender", &sender_init);
    anyhow::ensure!(
        out.status.code() == Some(2) && text(&out).contains("never writes over"),
        "a second init: {}",
        text(&out)
    );
    anyhow::ensure!(
        std::fs::read_to_string(&sender_config)? == before,
        "init wrote over the config"
    );
    let out = run(
        "pgcourier-sender",
        &[
            "init",
            "--config",
            &path(&hq_dir.join("other.toml")),
            "--source",
            "dbname=x",
            "--spool-dir",
            "s",
            "--receiver",
            "b=not-a-fingerprint",
        ],
    );
    anyhow::ensure!(
        out.status.code() == Some(2),
        "bad --receiver: {}",
        text(&out)
    );
    anyhow::ensure!(
        !hq_dir.join("other.toml").exists(),
        "a refused init wrote a config"
    );

    // The branch: its keys are kept, the target is tried.
    let receiver_config = branch_dir.join("receiver.toml");
    let listen = format!("127.0.0.1:{port}");
    let mut receiver_init = vec![
        "init".to_string(),
        "--config".into(),
        path(&receiver_config),
        "--target".into(),
        format!(
            "host={} port={} user=postgres dbname={DB}",
            branch.socket_dir().display(),
            branch.port() + 1
        ),
        "--inbox-dir".into(),
        "inbox".into(),
        "--listen".into(),
        listen.clone(),
        "--sender-fingerprint".into(),
        sender_fp.clone(),
    ];
    let args: Vec<&str> = receiver_init.iter().map(String::as_str).collect();
    let out = run("pgcourier-receiver", &args);
    anyhow::ensure!(
        out.status.code() == Some(1)
            && text(&out).contains("cannot connect to the target database (setting `target`)"),
        "receiver init with an unreachable target: {}",
        text(&out)
    );
    std::fs::remove_file(&receiver_config)?;
    receiver_init[4] = branch.conninfo(DB);
    let args: Vec<&str> = receiver_init.iter().map(String::as_str).collect();
    let out = run("pgcourier-receiver", &args);
    anyhow::ensure!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("ok: the target accepts the login")
            && String::from_utf8_lossy(&out.stderr).contains("kept"),
        "receiver init: {}",
        text(&out)
    );
    anyhow::ensure!(
        first_line(&out) == receiver_fp,
        "receiver init should keep keygen's key: {}",
        text(&out)
    );
    anyhow::ensure!(mode(&receiver_config) == 0o640, "receiver.toml mode");

    // The pair replicates with nothing else configured.
    let receiver = Daemon::spawn(
        "receiver",
        &bin_path("pgcourier-receiver"),
        &["run", "--config", receiver_config.to_str().expect("utf-8")],
        &dir.path().join("receiver.log"),
    )?;
    let sender = Daemon::spawn(
        "sender",
        &bin_path("pgcourier-sender"),
        &["run", "--config", sender_config.to_str().expect("utf-8")],
        &dir.path().join("sender.log"),
    )?;
    let src = hq.client(DB).await?;
    src.batch_execute("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 50) g")
        .await?;
    let dst = branch.client(DB).await?;
    let equal = wait_tables_equal(&src, &dst, &["public.t"], Duration::from_secs(120)).await;
    if let Err(e) = equal {
        anyhow::bail!(
            "{e:#}\n--- sender ---\n{}\n--- receiver ---\n{}",
            sender.log_tail(30),
            receiver.log_tail(30)
        );
    }
    sender.terminate()?;
    receiver.terminate()?;
    Ok(())
}
