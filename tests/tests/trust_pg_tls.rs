//! Issue 12, item 12: TLS and libpq's conventions on the database
//! connections. The clusters here also listen on 127.0.0.1 with TLS only
//! (`hostssl ... scram-sha-256`, `hostnossl ... reject`) and a server
//! certificate for `localhost` signed by a test CA; pgcourier reaches them
//! over TCP with `sslmode=verify-full` (or verify-ca), its password from a
//! `.pgpass`, `PGPASSWORD`, a service file or the `PG*` environment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use pgcourier_tests::{
    bin_path, wait_tables_equal, wait_until, workdir, Daemon, PgCluster, TestCa,
};

use crate::fixture::{free_udp_port, keygen, DB};

const WAIT: Duration = Duration::from_secs(120);
const ROLE: &str = "courier";
const HQ_PASSWORD: &str = "hq-zebra-5521";
const BRANCH_PASSWORD: &str = "branch-zebra-7734";
const SCHEMA: &str = "CREATE TABLE t (id integer PRIMARY KEY, v text);";

/// A source and a branch cluster, both with TLS on 127.0.0.1, signed by one CA.
struct Rig {
    dir: tempfile::TempDir,
    ca: TestCa,
    hq: PgCluster,
    branch: PgCluster,
}

impl Rig {
    async fn start(name: &str) -> anyhow::Result<Rig> {
        let dir = workdir(name);
        let ca = TestCa::new(dir.path(), "ca")?;
        // Both clusters start in parallel (each initdb takes seconds).
        let (hq, branch) = std::thread::scope(|s| {
            let hq = s.spawn(|| PgCluster::start_tls("hq", &ca, &["localhost"], ROLE, HQ_PASSWORD));
            let branch = s.spawn(|| {
                PgCluster::start_tls("branch", &ca, &["localhost"], ROLE, BRANCH_PASSWORD)
            });
            (
                hq.join().expect("hq cluster thread"),
                branch.join().expect("branch cluster thread"),
            )
        });
        let (hq, branch) = (hq?, branch?);
        hq.execute(DB, SCHEMA).await?;
        branch.execute(DB, SCHEMA).await?;
        hq.execute(
            DB,
            "INSERT INTO t SELECT g, 'before' FROM generate_series(1, 3) g",
        )
        .await?;
        Ok(Rig {
            dir,
            ca,
            hq,
            branch,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A `.pgpass` (mode 0600) with both clusters' passwords.
    fn pgpass(&self) -> anyhow::Result<PathBuf> {
        let path = self.path("pgpass");
        std::fs::write(
            &path,
            format!(
                "# host:port:database:user:password\nlocalhost:{}:{DB}:{ROLE}:{HQ_PASSWORD}\nlocalhost:{}:*:{ROLE}:{BRANCH_PASSWORD}\n",
                self.hq.port(),
                self.branch.port()
            ),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }
}

/// `host=localhost hostaddr=127.0.0.1 port=... sslmode=verify-full
/// sslrootcert=<ca>`: TCP, the certificate checked against the CA and the
/// name `localhost`.
fn verify_full(pg: &PgCluster, ca: &Path) -> String {
    format!(
        "host=localhost hostaddr=127.0.0.1 port={} user={ROLE} dbname={DB} sslmode=verify-full sslrootcert={}",
        pg.port(),
        ca.display()
    )
}

/// Sender and receiver configs for one branch: (sender.toml, receiver.toml).
fn write_configs(dir: &Path, source: &str, target: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let sender_fp = keygen(dir, "sender");
    let branch_fp = keygen(dir, "branch0");
    let port = free_udp_port();
    let receiver = dir.join("branch0.toml");
    std::fs::write(
        &receiver,
        format!(
            "target = {target:?}\ninbox-dir = \"inbox\"\ncert = \"branch0.crt\"\nkey = \"branch0.key\"\n\
             listen = \"127.0.0.1:{port}\"\nsender-fingerprints = [\"{sender_fp}\"]\nmax-backoff = \"2s\"\n"
        ),
    )?;
    let sender = dir.join("sender.toml");
    std::fs::write(
        &sender,
        format!(
            "source = {source:?}\nspool-dir = \"spool\"\ncert = \"sender.crt\"\nkey = \"sender.key\"\n\
             poll-interval = \"50ms\"\nmax-backoff = \"2s\"\n\n[[receiver]]\nname = \"branch0\"\n\
             fingerprint = \"{branch_fp}\"\naddress = \"127.0.0.1:{port}\"\n"
        ),
    )?;
    Ok((sender, receiver))
}

fn spawn(dir: &Path, which: &str, config: &Path, env: &[(&str, &str)]) -> anyhow::Result<Daemon> {
    let (name, bin) = match which {
        "sender" => ("sender", "pgcourier-sender"),
        _ => ("branch0", "pgcourier-receiver"),
    };
    let config = config.to_str().expect("utf-8 path");
    Daemon::spawn_with_env(
        name,
        &bin_path(bin),
        &["run", "--config", config],
        env,
        &dir.join(format!("{name}.log")),
    )
}

/// pgcourier's sessions on `pg`: (over TLS, in plaintext), from
/// `pg_stat_ssl` joined to `pg_stat_activity`.
async fn pgcourier_sessions(pg: &PgCluster) -> anyhow::Result<(i64, i64)> {
    let client = pg.client(DB).await?;
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'pgcourier'",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Wait until pgcourier holds a session on `pg`, and check that every one
/// of them is encrypted.
async fn wait_encrypted_sessions(pg: &PgCluster, what: &str) -> anyhow::Result<()> {
    wait_until(
        &format!("a pgcourier session on the {what} (pg_stat_ssl)"),
        WAIT,
        || async { Ok(pgcourier_sessions(pg).await?.0 >= 1) },
    )
    .await?;
    let (tls, plain) = pgcourier_sessions(pg).await?;
    anyhow::ensure!(
        tls >= 1 && plain == 0,
        "pgcourier's sessions on the {what}: {tls} over TLS, {plain} in plaintext"
    );
    Ok(())
}

async fn wait_exit(daemon: &Daemon) -> anyhow::Result<std::process::ExitStatus> {
    wait_until(&format!("{} to exit", daemon.name()), WAIT, || async {
        Ok(daemon.try_status().is_some())
    })
    .await
    .with_context(|| daemon.log_tail(30))?;
    Ok(daemon.try_status().expect("exited"))
}

/// Rows written at HQ arrive at the branch (the copy, then the stream).
async fn replicate(rig: &Rig, sender: &Daemon, receiver: &Daemon) -> anyhow::Result<()> {
    let logs = || {
        format!(
            "--- sender ---\n{}\n--- receiver ---\n{}",
            sender.log_tail(40),
            receiver.log_tail(40)
        )
    };
    let src = rig.hq.client(DB).await?;
    let dst = rig.branch.client(DB).await?;
    wait_tables_equal(&src, &dst, &["t"], WAIT)
        .await
        .with_context(logs)?;
    src.batch_execute("INSERT INTO t SELECT g, 'after' FROM generate_series(4, 20) g")
        .await?;
    wait_tables_equal(&src, &dst, &["t"], WAIT)
        .await
        .with_context(logs)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_runs_over_verify_full_tls_with_passwords_from_pgpass() -> anyhow::Result<()> {
    let rig = Rig::start("pgtls-full").await?;
    let pgpass = rig.pgpass()?;
    let (sender_cfg, receiver_cfg) = write_configs(
        rig.dir.path(),
        &verify_full(&rig.hq, rig.ca.cert_path()),
        &verify_full(&rig.branch, rig.ca.cert_path()),
    )?;
    let home = rig.dir.path().to_str().expect("utf-8");
    let env = [
        ("PGPASSFILE", pgpass.to_str().expect("utf-8")),
        ("HOME", home),
    ];
    let receiver = spawn(rig.dir.path(), "receiver", &receiver_cfg, &env)?;
    let sender = spawn(rig.dir.path(), "sender", &sender_cfg, &env)?;
    replicate(&rig, &sender, &receiver).await?;
    wait_encrypted_sessions(&rig.hq, "source").await?;
    wait_encrypted_sessions(&rig.branch, "target").await?;
    for d in [&sender, &receiver] {
        let log = d.log();
        assert!(
            !log.contains(HQ_PASSWORD) && !log.contains(BRANCH_PASSWORD),
            "a password reached the {} log",
            d.name()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_stops_both_daemons_with_a_named_error(
) -> anyhow::Result<()> {
    let rig = Rig::start("pgtls-wrongca").await?;
    let pgpass = rig.pgpass()?;
    let other = TestCa::new(rig.dir.path(), "other-ca")?;
    let (sender_cfg, receiver_cfg) = write_configs(
        rig.dir.path(),
        &verify_full(&rig.hq, other.cert_path()),
        &verify_full(&rig.branch, other.cert_path()),
    )?;
    let home = rig.dir.path().to_str().expect("utf-8");
    let env = [
        ("PGPASSFILE", pgpass.to_str().expect("utf-8")),
        ("HOME", home),
    ];
    let receiver = spawn(rig.dir.path(), "receiver", &receiver_cfg, &env)?;
    let sender = spawn(rig.dir.path(), "sender", &sender_cfg, &env)?;
    for (daemon, setting, pg) in [
        (&receiver, "target", &rig.branch),
        (&sender, "source", &rig.hq),
    ] {
        let status = wait_exit(daemon).await?;
        let log = daemon.log();
        assert!(
            !status.success(),
            "{} exited with {status}:\n{log}",
            daemon.name()
        );
        assert!(
            log.contains(&format!("setting `{setting}`"))
                && log.contains(&format!("localhost:{}", pg.port()))
                && log.contains("sslrootcert"),
            "{}'s error names the setting, the host and sslrootcert:\n{log}",
            daemon.name()
        );
        assert!(!log.contains(HQ_PASSWORD) && !log.contains(BRANCH_PASSWORD));
    }
    assert_eq!(pgcourier_sessions(&rig.hq).await?, (0, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_missing_from_the_certificate_is_refused_by_verify_full_and_accepted_by_verify_ca(
) -> anyhow::Result<()> {
    let rig = Rig::start("pgtls-name").await?;
    let pgpass = rig.pgpass()?;
    // The certificate names `localhost` only; connect by address.
    let by_address = |mode: &str| {
        format!(
            "host=127.0.0.1 port={} user={ROLE} dbname={DB} sslmode={mode} sslrootcert={} password={BRANCH_PASSWORD}",
            rig.branch.port(),
            rig.ca.cert_path().display()
        )
    };
    let home = rig.dir.path().to_str().expect("utf-8");
    let env = [
        ("PGPASSFILE", pgpass.to_str().expect("utf-8")),
        ("HOME", home),
    ];
    let (_, receiver_cfg) =
        write_configs(rig.dir.path(), "host=/nowhere", &by_address("verify-full"))?;
    let receiver = spawn(rig.dir.path(), "receiver", &receiver_cfg, &env)?;
    let status = wait_exit(&receiver).await?;
    let log = receiver.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("setting `target`")
            && log.contains(&format!("127.0.0.1:{}", rig.branch.port()))
            && log.contains("does not name this host"),
        "{log}"
    );
    assert!(
        !log.contains(BRANCH_PASSWORD),
        "the password reached the log"
    );
    // verify-ca checks the chain only: the receiver logs in, creates its
    // progress table and waits for the sender, over TLS.
    let text = std::fs::read_to_string(&receiver_cfg)?;
    std::fs::write(
        &receiver_cfg,
        text.replace("sslmode=verify-full", "sslmode=verify-ca"),
    )?;
    let receiver = spawn(rig.dir.path(), "receiver", &receiver_cfg, &env)?;
    let branch = rig.branch.client(DB).await?;
    wait_until(
        "the receiver to create pgcourier.progress",
        WAIT,
        || async {
            anyhow::ensure!(
                receiver.is_running(),
                "the receiver exited:\n{}",
                receiver.log_tail(30)
            );
            Ok(branch
                .query_one("SELECT to_regclass('pgcourier.progress') IS NOT NULL", &[])
                .await?
                .get(0))
        },
    )
    .await?;
    wait_encrypted_sessions(&rig.branch, "target").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_take_a_service_file_and_the_pg_environment_like_psql() -> anyhow::Result<()> {
    let rig = Rig::start("pgtls-env").await?;
    let pgpass = rig.pgpass()?;
    let ca = rig.ca.cert_path().display().to_string();
    // The sender: `source = "dbname=postgres"`, everything else from the
    // service named by PGSERVICE in PGSERVICEFILE, the password from .pgpass.
    let services = rig.path("services.conf");
    std::fs::write(
        &services,
        format!(
            "# pgcourier test\n[hq]\nhost=localhost\nhostaddr=127.0.0.1\nport={}\nuser={ROLE}\nsslmode=verify-full\nsslrootcert={ca}\n",
            rig.hq.port()
        ),
    )?;
    let (sender_cfg, receiver_cfg) = write_configs(
        rig.dir.path(),
        &format!("dbname={DB}"),
        &format!("dbname={DB}"),
    )?;
    let home = rig.dir.path().to_str().expect("utf-8");
    let pgpass = pgpass.to_str().expect("utf-8");
    let services = services.to_str().expect("utf-8");
    let sender = spawn(
        rig.dir.path(),
        "sender",
        &sender_cfg,
        &[
            ("PGSERVICE", "hq"),
            ("PGSERVICEFILE", services),
            ("PGPASSFILE", pgpass),
            ("HOME", home),
        ],
    )?;
    // The receiver: `target = "dbname=postgres"`, PGHOST, PGPORT, PGUSER,
    // PGSSLMODE, PGSSLROOTCERT and PGPASSWORD.
    let branch_port = rig.branch.port().to_string();
    let receiver = spawn(
        rig.dir.path(),
        "receiver",
        &receiver_cfg,
        &[
            ("PGHOST", "localhost"),
            ("PGHOSTADDR", "127.0.0.1"),
            ("PGPORT", &branch_port),
            ("PGUSER", ROLE),
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", &ca),
            ("PGPASSWORD", BRANCH_PASSWORD),
            ("HOME", home),
        ],
    )?;
    replicate(&rig, &sender, &receiver).await?;
    wait_encrypted_sessions(&rig.hq, "source").await?;
    wait_encrypted_sessions(&rig.branch, "target").await?;
    Ok(())
}
