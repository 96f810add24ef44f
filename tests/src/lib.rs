//! End-to-end test harness for pgcourier.
//!
//! Everything here is per-instance: every [`PgCluster`] gets its own data
//! directory, socket directory and port, every [`Daemon`] its own child
//! process and log file, so tests may run in parallel threads and in parallel
//! test processes.
//!
//! Overview:
//! * [`PgCluster`]: a throwaway PostgreSQL 15 cluster (`wal_level=logical`,
//!   Unix socket only), stopped and removed on drop. [`PgCluster::start_tls`]
//!   also listens on 127.0.0.1 with TLS only (a certificate signed by a
//!   [`TestCa`]) and a role that logs in with a password.
//! * [`bin_path`]: path of a built daemon binary (`pgcourier-sender`,
//!   `pgcourier-receiver`).
//! * [`Daemon`]: a child process whose stdout/stderr go to a log file, killed
//!   on drop.
//! * [`wait_until`]: poll a condition with a timeout (use it instead of sleeps).
//! * [`table_rows`], [`try_table_rows`], [`assert_tables_equal`],
//!   [`wait_tables_equal`]: compare table contents row for row.
//! * [`workdir`]: a short temporary directory under /tmp for spools and configs.
//!
//! Environment variables:
//! * `PG_BINDIR`: PostgreSQL binaries to use (else `pg_config --bindir` if it is
//!   version 15, else `/usr/lib/postgresql/15/bin`).
//! * `PGCOURIER_BIN_DIR`: where the daemon binaries are (else next to the test
//!   executable, built on demand when run under cargo).
//! * `PGCOURIER_KEEP_TEST_DIRS`: keep cluster and work directories after the
//!   test (their paths are printed).
//! * `RUST_LOG`: passed to daemons; defaults to `info`.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
pub use pgcourier_common::pg::quote_ident;
use rand::Rng as _;
use tokio_postgres::{Client, NoTls};

/// PostgreSQL major version the harness runs.
pub const PG_MAJOR: &str = "15";

/// Directory under which port reservation lock files live (shared by all test
/// processes on the machine; the locks are `flock`s, released when the
/// process dies, so stale files are harmless).
const PORT_LOCK_DIR: &str = "/tmp/pgcourier-test-ports";
const PORT_RANGE: std::ops::Range<u16> = 20000..30000;

fn keep_test_dirs() -> bool {
    std::env::var_os("PGCOURIER_KEEP_TEST_DIRS").is_some_and(|v| !v.is_empty())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Keep only characters that are safe and short in a path component.
fn short_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(16)
        .collect();
    if s.is_empty() {
        "x".to_string()
    } else {
        s
    }
}

fn short_tempdir(name: &str) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("pgc-{}-", short_name(name)))
        .tempdir_in("/tmp")
        .with_context(|| format!("creating a temporary directory for {name} under /tmp"))
}

fn output_text(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        if !s.is_empty() && !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&err);
    }
    s
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Find the PostgreSQL 15 binary directory: `PG_BINDIR`, else
/// `pg_config --bindir` if that `pg_config` is version 15, else
/// `/usr/lib/postgresql/15/bin`.
pub fn pg_bindir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BINDIR").filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        if !dir.join("initdb").is_file() {
            bail!("PG_BINDIR={} has no initdb", dir.display());
        }
        return Ok(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--version").output() {
        let version = String::from_utf8_lossy(&out.stdout);
        // e.g. "PostgreSQL 15.18 (Debian 15.18-0+deb12u1)"
        let major = version
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.split('.').next())
            .unwrap_or("");
        if out.status.success() && major == PG_MAJOR {
            if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if out.status.success() && dir.join("initdb").is_file() {
                    return Ok(dir);
                }
            }
        }
    }
    let dir = PathBuf::from(format!("/usr/lib/postgresql/{PG_MAJOR}/bin"));
    if dir.join("initdb").is_file() {
        return Ok(dir);
    }
    bail!(
        "PostgreSQL {PG_MAJOR} binaries not found: set PG_BINDIR, or install postgresql-{PG_MAJOR} \
         (looked at pg_config --bindir and {})",
        dir.display()
    )
}

/// Reserve a port for a cluster: a random number in 20000..30000 whose lock
/// file we can `flock` exclusively (so no other cluster of this or another
/// test process has it) and for which no PostgreSQL socket exists in the
/// usual shared socket directories. The returned file holds the lock.
fn reserve_port(socket_dir: &Path) -> anyhow::Result<(u16, File)> {
    use std::os::fd::AsRawFd as _;
    if fs::create_dir(PORT_LOCK_DIR).is_ok() {
        let _ = fs::set_permissions(PORT_LOCK_DIR, fs::Permissions::from_mode(0o1777));
    }
    let mut rng = rand::thread_rng();
    let mut last_err = None;
    for _ in 0..500 {
        let port: u16 = rng.gen_range(PORT_RANGE);
        let socket_name = format!(".s.PGSQL.{port}");
        let taken = [
            socket_dir,
            Path::new("/tmp"),
            Path::new("/var/run/postgresql"),
        ]
        .iter()
        .any(|d| d.join(&socket_name).exists() || d.join(format!("{socket_name}.lock")).exists());
        if taken {
            continue;
        }
        let path = Path::new(PORT_LOCK_DIR).join(format!("{port}.lock"));
        let file = match OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) => {
                last_err = Some(anyhow!(e).context(format!("opening {}", path.display())));
                continue;
            }
        };
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o666));
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok((port, file));
        }
    }
    Err(last_err
        .unwrap_or_else(|| anyhow!("no free port"))
        .context(format!(
            "could not reserve a PostgreSQL port in {PORT_RANGE:?}"
        )))
}

/// Quote a value for a libpq key=value connection string if needed.
fn conninfo_value(v: &str) -> String {
    if !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
    {
        return v.to_string();
    }
    let mut s = String::from("'");
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('\'');
    s
}

/// A throwaway PostgreSQL 15 cluster listening only on a Unix socket in its
/// own short directory under /tmp.
///
/// Dropping it stops the server with `-m immediate` and removes its
/// directories (kept, with their path printed, if `PGCOURIER_KEEP_TEST_DIRS`
/// is set).
pub struct PgCluster {
    name: String,
    bindir: PathBuf,
    /// Holds the socket directory (the tempdir itself) and `data/`.
    dir: Option<tempfile::TempDir>,
    root_dir: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    as_postgres: bool,
    /// The TCP listener's TLS set-up, when started with [`PgCluster::start_tls`].
    tls: Option<ServerTls>,
    /// Lock on the port reservation; released when the cluster is dropped.
    _port_lock: File,
}

/// A test certificate authority (rcgen), its certificate in a PEM file.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    cert_path: PathBuf,
}

impl TestCa {
    /// A new CA whose certificate is written to `dir/<name>.crt`.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<TestCa> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("pgcourier test CA {name}"),
        );
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key)?;
        let cert_path = dir.join(format!("{name}.crt"));
        fs::write(&cert_path, cert.pem())
            .with_context(|| format!("writing {}", cert_path.display()))?;
        Ok(TestCa {
            cert,
            key,
            cert_path,
        })
    }

    /// The CA certificate (PEM), for `sslrootcert`.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// A server certificate for these DNS names, signed by this CA:
    /// (certificate PEM, key PEM).
    pub fn server_cert(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// What [`PgCluster::start_tls`] set up.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The role that logs in over TCP (superuser) and its password.
    pub role: String,
    pub password: String,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("name", &self.name)
            .field("dir", &self.root_dir)
            .field("port", &self.port)
            .finish()
    }
}

impl PgCluster {
    /// Create (initdb), configure and start a new cluster. Blocking; fine to
    /// call from a tokio test.
    pub fn start(name: &str) -> anyhow::Result<PgCluster> {
        Self::start_with(name, None)
    }

    /// As [`PgCluster::start`], and also listen on 127.0.0.1 (TCP) with
    /// `ssl = on`: a server certificate for `names` signed by `ca`, pg_hba
    /// `hostssl all all 127.0.0.1/32 scram-sha-256` and `hostnossl ...
    /// reject`, and a superuser `role` whose password is `password`. The
    /// Unix socket stays as in [`PgCluster::start`] (trust).
    pub fn start_tls(
        name: &str,
        ca: &TestCa,
        names: &[&str],
        role: &str,
        password: &str,
    ) -> anyhow::Result<PgCluster> {
        let (cert, key) = ca.server_cert(names)?;
        let tls = ServerTls {
            role: role.to_string(),
            password: password.to_string(),
        };
        Self::start_with(name, Some((tls, cert, key)))
    }

    fn start_with(
        name: &str,
        tls: Option<(ServerTls, String, String)>,
    ) -> anyhow::Result<PgCluster> {
        let bindir = pg_bindir()?;
        let dir = short_tempdir(name)?;
        let root_dir = dir.path().to_path_buf();
        let data_dir = root_dir.join("data");
        let log_file = data_dir.join("postgresql.log");
        let as_postgres = is_root();
        let sock_len = root_dir.join(".s.PGSQL.20000.lock").as_os_str().len();
        if sock_len > 100 {
            bail!(
                "socket directory path {} is too long for a Unix socket",
                root_dir.display()
            );
        }
        fs::create_dir(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o700))?;
        if as_postgres {
            let status = Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(&root_dir)
                .status()
                .context("running chown")?;
            if !status.success() {
                bail!(
                    "chown -R postgres:postgres {} failed: {status}",
                    root_dir.display()
                );
            }
        }
        let (port, port_lock) = reserve_port(&root_dir)?;
        let cluster = PgCluster {
            name: name.to_string(),
            bindir,
            dir: Some(dir),
            root_dir,
            data_dir,
            log_file,
            port,
            as_postgres,
            tls: tls.as_ref().map(|(t, _, _)| t.clone()),
            _port_lock: port_lock,
        };
        cluster.initdb()?;
        cluster.write_config()?;
        if let Some((_, cert, key)) = &tls {
            cluster.write_tls_config(cert, key)?;
        }
        cluster
            .start_again()
            .with_context(|| format!("starting cluster {name}"))?;
        if let Some(t) = &cluster.tls {
            // Over the Unix socket (trust): the password is a literal, quoted.
            let sql = format!(
                "CREATE ROLE {} LOGIN SUPERUSER PASSWORD '{}'",
                quote_ident(&t.role),
                t.password.replace('\'', "''")
            );
            let out = cluster.run_pg(
                "psql",
                [
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    &cluster.root_dir.display().to_string(),
                    "-p",
                    &cluster.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-c",
                    &sql,
                ],
            );
            out.with_context(|| format!("creating role {} on cluster {name}", t.role))?;
        }
        Ok(cluster)
    }

    /// Server certificate and key in the data directory (owned by the
    /// server's user, key 0600), `ssl = on` and TCP on 127.0.0.1, and a
    /// pg_hba.conf that takes TCP logins over TLS only, with a password.
    fn write_tls_config(&self, cert: &str, key: &str) -> anyhow::Result<()> {
        for (file, text, mode) in [("server.crt", cert, 0o644), ("server.key", key, 0o600)] {
            let path = self.data_dir.join(file);
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
            if self.as_postgres {
                let status = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&path)
                    .status()
                    .context("running chown")?;
                if !status.success() {
                    bail!(
                        "chown postgres:postgres {} failed: {status}",
                        path.display()
                    );
                }
            }
        }
        let conf = self.data_dir.join("postgresql.conf");
        let mut f = OpenOptions::new()
            .append(true)
            .open(&conf)
            .with_context(|| format!("opening {}", conf.display()))?;
        write!(
            f,
            "listen_addresses = '127.0.0.1'\n\
             ssl = on\n\
             ssl_cert_file = 'server.crt'\n\
             ssl_key_file = 'server.key'\n\
             password_encryption = 'scram-sha-256'\n"
        )?;
        let hba = self.data_dir.join("pg_hba.conf");
        fs::write(
            &hba,
            "# pgcourier test harness: TCP only over TLS, with a password\n\
             local all all trust\n\
             local replication all trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )
        .with_context(|| format!("writing {}", hba.display()))?;
        Ok(())
    }

    /// The TCP listener's TLS set-up (`None` unless started with
    /// [`PgCluster::start_tls`]).
    pub fn tls(&self) -> Option<&ServerTls> {
        self.tls.as_ref()
    }

    /// Run a PostgreSQL binary (as user postgres when we are root), from the
    /// cluster directory (our own cwd may be unreadable for postgres).
    fn pg_command(&self, program: &str) -> Command {
        let exe = self.bindir.join(program);
        let mut cmd = if self.as_postgres {
            let runuser = ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
                .into_iter()
                .find(|p| Path::new(p).is_file())
                .unwrap_or("runuser");
            let mut c = Command::new(runuser);
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.current_dir(&self.root_dir).stdin(Stdio::null());
        // Make sure nothing from the caller's environment redirects the tools.
        for var in [
            "PGDATA",
            "PGPORT",
            "PGHOST",
            "PGUSER",
            "PGDATABASE",
            "PGOPTIONS",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    fn run_pg<I, S>(&self, program: &str, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.pg_command(program);
        cmd.args(args);
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        if !out.status.success() {
            bail!("{cmd:?} failed ({}):\n{}", out.status, output_text(&out));
        }
        Ok(out)
    }

    fn initdb(&self) -> anyhow::Result<()> {
        let base = |locale: &str| {
            vec![
                "-D".to_string(),
                self.data_dir.display().to_string(),
                "--no-sync".into(),
                "-U".into(),
                "postgres".into(),
                "-A".into(),
                "trust".into(),
                "-E".into(),
                "UTF8".into(),
                format!("--locale={locale}"),
            ]
        };
        match self.run_pg("initdb", base("C.UTF-8")) {
            Ok(_) => Ok(()),
            Err(first) => {
                // Probably no C.UTF-8 locale: empty the data directory and retry with C.
                for entry in fs::read_dir(&self.data_dir)? {
                    let p = entry?.path();
                    if p.is_dir() {
                        fs::remove_dir_all(&p)?;
                    } else {
                        fs::remove_file(&p)?;
                    }
                }
                self.run_pg("initdb", base("C"))
                    .map(|_| ())
                    .map_err(|e| e.context(format!("initdb with C.UTF-8 failed too: {first:#}")))
            }
        }
    }

    fn write_config(&self) -> anyhow::Result<()> {
        let conf = self.data_dir.join("postgresql.conf");
        let mut f = OpenOptions::new()
            .append(true)
            .open(&conf)
            .with_context(|| format!("opening {}", conf.display()))?;
        let socket_dir = self.root_dir.display().to_string().replace('\'', "''");
        write!(
            f,
            "\n# pgcourier test harness\n\
             wal_level = logical\n\
             max_replication_slots = 16\n\
             max_wal_senders = 16\n\
             listen_addresses = ''\n\
             unix_socket_directories = '{socket_dir}'\n\
             port = {port}\n\
             fsync = off\n\
             shared_buffers = 64MB\n\
             max_connections = 50\n\
             logging_collector = off\n\
             log_line_prefix = '%m [%p] %q%u@%d %a: '\n",
            port = self.port
        )?;
        Ok(())
    }

    /// Name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Port of the cluster (unique among live clusters on this machine).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory of the Unix socket (the libpq `host`).
    pub fn socket_dir(&self) -> &Path {
        &self.root_dir
    }

    /// Data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Server log file.
    pub fn log_path(&self) -> &Path {
        &self.log_file
    }

    /// libpq connection string: `host=<socketdir> port=<port> user=postgres dbname=<db>`.
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={}",
            conninfo_value(&self.root_dir.display().to_string()),
            self.port,
            conninfo_value(db)
        )
    }

    /// Connect to `db` (the connection task is spawned on the current runtime).
    pub async fn client(&self, db: &str) -> anyhow::Result<Client> {
        let conninfo = self.conninfo(db);
        let (client, connection) = tokio::time::timeout(
            Duration::from_secs(15),
            tokio_postgres::connect(&conninfo, NoTls),
        )
        .await
        .map_err(|_| anyhow!("connecting to {conninfo} timed out"))?
        .with_context(|| format!("connecting to {conninfo} (cluster {})", self.name))?;
        tokio::spawn(async move {
            // Errors here are expected when the server stops or restarts.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// `CREATE DATABASE <name>`.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<()> {
        let client = self.client("postgres").await?;
        client
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(name)))
            .await
            .with_context(|| format!("creating database {name} on cluster {}", self.name))?;
        Ok(())
    }

    /// Run SQL (possibly several statements) on `db` in a fresh connection.
    pub async fn execute(&self, db: &str, sql: &str) -> anyhow::Result<()> {
        let client = self.client(db).await?;
        client
            .batch_execute(sql)
            .await
            .with_context(|| format!("executing on {}/{db}: {sql}", self.name))
    }

    /// Stop the server (`pg_ctl -m fast stop -w`).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.pg_ctl_stop("fast")
    }

    /// Crash-like stop (`pg_ctl -m immediate stop -w`): no shutdown
    /// checkpoint, crash recovery on the next start.
    pub fn kill(&self) -> anyhow::Result<()> {
        self.pg_ctl_stop("immediate")
    }

    fn pg_ctl_stop(&self, mode: &str) -> anyhow::Result<()> {
        let data = self.data_dir.display().to_string();
        self.run_pg(
            "pg_ctl",
            ["-D", data.as_str(), "-m", mode, "-w", "-t", "60", "stop"],
        )
        .with_context(|| {
            format!(
                "stopping cluster {} ({mode})\n{}",
                self.name,
                self.log_tail(20)
            )
        })?;
        Ok(())
    }

    /// Start the (stopped) server again on the same port and socket directory.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let data = self.data_dir.display().to_string();
        let log = self.log_file.display().to_string();
        self.run_pg(
            "pg_ctl",
            [
                "-D",
                data.as_str(),
                "-l",
                log.as_str(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .with_context(|| {
            format!(
                "starting cluster {}\nserver log:\n{}",
                self.name,
                self.log_tail(30)
            )
        })?;
        Ok(())
    }

    /// `stop()` then `start_again()`.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Whether the postmaster is running (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        let data = self.data_dir.display().to_string();
        self.run_pg("pg_ctl", ["-D", data.as_str(), "status"])
            .is_ok()
    }

    /// The last `n` lines of the server log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        match fs::read(&self.log_file) {
            Ok(bytes) => tail_lines(&String::from_utf8_lossy(&bytes), n),
            Err(e) => format!("(no server log at {}: {e})", self.log_file.display()),
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let pid_file = self.data_dir.join("postmaster.pid");
        if pid_file.exists() {
            if let Err(e) = self.pg_ctl_stop("immediate") {
                // Last resort: kill the postmaster so the directory can go.
                let pid = fs::read_to_string(&pid_file)
                    .ok()
                    .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
                if let Some(pid) = pid.filter(|p| *p > 0) {
                    // SAFETY: plain kill(2) on a pid we read from our own cluster.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                eprintln!(
                    "pgcourier-tests: stopping cluster {} failed: {e:#}",
                    self.name
                );
            }
        }
        if let Some(dir) = self.dir.take() {
            if keep_test_dirs() {
                let path = dir.keep();
                eprintln!(
                    "pgcourier-tests: keeping PostgreSQL cluster {} at {} (data {}, port {})",
                    self.name,
                    path.display(),
                    self.data_dir.display(),
                    self.port
                );
            } else {
                drop(dir);
            }
        }
    }
}

impl PgCluster {
    /// Make the server listen on TCP at `127.0.0.1` too (on its own port,
    /// which is reserved machine-wide), for tests that put a TCP relay in
    /// front of it; restarts the server (`-m fast`). Returns the address.
    pub fn listen_on_loopback(&self) -> anyhow::Result<std::net::SocketAddr> {
        let conf = self.data_dir.join("postgresql.conf");
        let mut f = OpenOptions::new()
            .append(true)
            .open(&conf)
            .with_context(|| format!("opening {}", conf.display()))?;
        // The last setting in the file wins over the harness's ''.
        writeln!(f, "listen_addresses = '127.0.0.1'")
            .with_context(|| format!("writing {}", conf.display()))?;
        drop(f);
        self.restart().with_context(|| {
            format!(
                "restarting cluster {} to listen on 127.0.0.1:{}",
                self.name, self.port
            )
        })?;
        Ok(std::net::SocketAddr::from(([127, 0, 0, 1], self.port)))
    }
}

/// Path of a built daemon binary (`pgcourier-sender`, `pgcourier-receiver`).
///
/// `PGCOURIER_BIN_DIR` if set; else next to the test executable
/// (`target/<profile>/deps/e2e-xxxx` -> `target/<profile>/<name>`). When the
/// test runs under cargo, the workspace binaries are first brought up to date
/// (once per test process) with `cargo build --workspace --bins`, because
/// `cargo test` does not build binaries of packages that have no integration
/// tests of their own, nor rebuild stale ones.
///
/// Panics if the binary does not exist.
pub fn bin_path(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("PGCOURIER_BIN_DIR").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(dir).join(name);
        assert!(
            path.is_file(),
            "daemon binary {} not found (PGCOURIER_BIN_DIR is set)",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let deps_dir = exe
        .parent()
        .expect("test executable has a parent directory");
    let profile_dir = if deps_dir.file_name() == Some(OsStr::new("deps")) {
        deps_dir.parent().expect("deps has a parent")
    } else {
        deps_dir
    };
    if let Err(e) = ensure_bins_built(profile_dir) {
        panic!(
            "could not build the daemon binaries: {e:#}\n\
             run cargo test --workspace, which builds the daemons, or set PGCOURIER_BIN_DIR"
        );
    }
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "daemon binary {} not found: run cargo test --workspace, which builds the daemons \
         (or set PGCOURIER_BIN_DIR)",
        path.display()
    );
    path
}

/// Once per process, when running under cargo: `cargo build --workspace --bins`
/// into the same target directory and profile as this test executable.
fn ensure_bins_built(profile_dir: &Path) -> anyhow::Result<()> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_bins(profile_dir).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_bins(profile_dir: &Path) -> anyhow::Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(()); // not run by cargo: use whatever is there
    };
    let workspace_root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests package lives in the workspace root");
    // CARGO_TARGET_TMPDIR is <target-dir>/tmp for integration tests.
    let target_dir = option_env!("CARGO_TARGET_TMPDIR")
        .map(|t| Path::new(t).parent().unwrap_or(Path::new(t)).to_path_buf())
        .unwrap_or_else(|| {
            profile_dir
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| workspace_root.join("target"))
        });
    let profile = profile_dir
        .file_name()
        .and_then(OsStr::to_str)
        .context("profile directory name")?
        .to_string();
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root)
        .args(["build", "--workspace", "--bins", "--quiet"])
        .arg("--target-dir")
        .arg(&target_dir)
        .stdin(Stdio::null());
    // Cross builds: <target-dir>/<triple>/<profile>.
    if let Some(parent) = profile_dir.parent() {
        if parent != target_dir {
            if let Some(triple) = parent.file_name() {
                cmd.arg("--target").arg(triple);
            }
        }
    }
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}):\n{}", out.status, output_text(&out));
    }
    Ok(())
}

/// A daemon child process whose stdout and stderr are appended to a log
/// file. Killed (SIGKILL) on drop.
pub struct Daemon {
    name: String,
    bin: PathBuf,
    args: Vec<String>,
    /// Extra environment variables for the child.
    env: Vec<(String, String)>,
    log_path: PathBuf,
    child: Mutex<Child>,
    status: Mutex<Option<ExitStatus>>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("name", &self.name)
            .field("bin", &self.bin)
            .field("args", &self.args)
            .field("log", &self.log_path)
            .finish()
    }
}

impl Daemon {
    /// Start `bin args...`; stdout and stderr are appended to `log_path`.
    /// `RUST_LOG` defaults to `info` unless set in the environment.
    pub fn spawn(name: &str, bin: &Path, args: &[&str], log_path: &Path) -> anyhow::Result<Daemon> {
        Self::spawn_with_env(name, bin, args, &[], log_path)
    }

    /// As [`Daemon::spawn`], with these environment variables set for the
    /// child (and again on [`Daemon::respawn`]).
    pub fn spawn_with_env(
        name: &str,
        bin: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log_path: &Path,
    ) -> anyhow::Result<Daemon> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = Self::start_child(name, bin, &args, &env, log_path)?;
        Ok(Daemon {
            name: name.to_string(),
            bin: bin.to_path_buf(),
            args,
            env,
            log_path: log_path.to_path_buf(),
            child: Mutex::new(child),
            status: Mutex::new(None),
        })
    }

    fn start_child(
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
        log_path: &Path,
    ) -> anyhow::Result<Child> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening daemon log {}", log_path.display()))?;
        writeln!(
            log,
            "=== pgcourier-tests: starting {name}: {} {}",
            bin.display(),
            args.join(" ")
        )?;
        let err_log = log.try_clone()?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd.spawn()
            .with_context(|| format!("spawning {name}: {} {}", bin.display(), args.join(" ")))
    }

    /// Start the same command again (after it exited or was killed), with
    /// output appended to the same log file.
    pub fn respawn(&self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("{} is still running", self.name);
        }
        let child =
            Self::start_child(&self.name, &self.bin, &self.args, &self.env, &self.log_path)?;
        *self.child.lock().unwrap() = child;
        *self.status.lock().unwrap() = None;
        Ok(())
    }

    /// Name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Process id of the current child.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    /// Log file path.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&self) -> bool {
        self.try_status().is_none()
    }

    /// Exit status if the process has exited.
    pub fn try_status(&self) -> Option<ExitStatus> {
        let mut status = self.status.lock().unwrap();
        if status.is_none() {
            if let Ok(Some(s)) = self.child.lock().unwrap().try_wait() {
                *status = Some(s);
            }
        }
        *status
    }

    /// SIGKILL and reap.
    pub fn kill9(&self) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.lock().unwrap();
        let mut status = self.status.lock().unwrap();
        if let Some(s) = *status {
            return Ok(s);
        }
        if child.try_wait()?.is_none() {
            child
                .kill()
                .with_context(|| format!("killing {}", self.name))?;
        }
        let s = child
            .wait()
            .with_context(|| format!("waiting for {}", self.name))?;
        *status = Some(s);
        Ok(s)
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Returns the exit status
    /// (a SIGKILL-ed process has `status.signal() == Some(9)`).
    pub fn terminate(&self) -> anyhow::Result<ExitStatus> {
        self.terminate_with_grace(Duration::from_secs(10))
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub fn terminate_with_grace(&self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(s) = self.try_status() {
            return Ok(s);
        }
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) on our own un-reaped child (it cannot be recycled
        // before we wait for it).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(s) = self.try_status() {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut log = OpenOptions::new().append(true).open(&self.log_path).ok();
        if let Some(f) = log.as_mut() {
            let _ = writeln!(
                f,
                "=== pgcourier-tests: {} ignored SIGTERM for {grace:?}, sending SIGKILL",
                self.name
            );
        }
        self.kill9()
    }

    /// The whole log file (lossy UTF-8).
    pub fn log(&self) -> String {
        match fs::read(&self.log_path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) => format!("(no log at {}: {e})", self.log_path.display()),
        }
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_lines(&self.log(), n)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// Poll `f` every 150 ms until it returns `Ok(true)`, for at most `timeout`.
///
/// `Ok(false)` and `Err(_)` both mean "not yet"; on timeout the error names
/// `what` and includes the last error returned by `f`, if any. Each call of
/// `f` is itself bounded by the remaining time.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let poll = Duration::from_millis(150);
    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    let mut last_err: Option<anyhow::Error> = None;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(remaining.max(Duration::from_millis(10)), f()).await {
            Ok(Ok(true)) => return Ok(()),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => last_err = Some(e),
            // A check cut off by the deadline says less than the last one
            // that finished: keep that one's error if there is one.
            Err(_) => {
                last_err = Some(match last_err.take() {
                    Some(e) => e.context(
                        "the last check did not finish before the deadline; the one before",
                    ),
                    None => anyhow!("the check itself did not finish before the deadline"),
                })
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            let msg = format!(
                "timed out after {:.1?} waiting for {what} ({attempts} checks)",
                now - start
            );
            return Err(match last_err {
                Some(e) => e.context(format!("{msg}; last error")),
                None => anyhow!("{msg}; the condition stayed false"),
            });
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
    }
}

/// Every row of `table` as text (`SELECT t::text FROM <table> t ORDER BY 1`);
/// `table` is an SQL name, e.g. `public."Mixed"`. Panics on error; see
/// [`try_table_rows`].
pub async fn table_rows(client: &Client, table_sql_name: &str) -> Vec<String> {
    match try_table_rows(client, table_sql_name).await {
        Ok(rows) => rows,
        Err(e) => panic!("{e:#}"),
    }
}

/// Like [`table_rows`] but returns errors (e.g. the table does not exist yet).
pub async fn try_table_rows(client: &Client, table_sql_name: &str) -> anyhow::Result<Vec<String>> {
    let sql = format!("SELECT t::text FROM {table_sql_name} t ORDER BY 1");
    let rows = client
        .query(&sql, &[])
        .await
        .with_context(|| format!("reading rows of {table_sql_name}"))?;
    Ok(rows
        .iter()
        .map(|r| {
            r.get::<_, Option<String>>(0)
                .unwrap_or_else(|| "NULL".to_string())
        })
        .collect())
}

const SHOW_DIFF_ROWS: usize = 5;

/// Compare two row lists; `None` if equal, else a description.
fn describe_difference(table: &str, src: &[String], dst: &[String]) -> Option<String> {
    if src == dst {
        return None;
    }
    let mut msg = format!(
        "table {table} differs: source has {} rows, destination has {} rows",
        src.len(),
        dst.len()
    );
    if let Some(i) = (0..src.len().max(dst.len())).find(|&i| src.get(i) != dst.get(i)) {
        let show = |r: Option<&String>| r.map(String::as_str).unwrap_or("(no row)").to_string();
        let _ = write!(
            msg,
            "\n  first difference at row #{i}: source {} / destination {}",
            show(src.get(i)),
            show(dst.get(i))
        );
    }
    // Multiset difference on byte-sorted copies (independent of collation).
    let mut a: Vec<&String> = src.iter().collect();
    let mut b: Vec<&String> = dst.iter().collect();
    a.sort();
    b.sort();
    let (mut only_src, mut only_dst) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                only_src.push(*x);
                i += 1;
            }
            (Some(_), Some(y)) => {
                only_dst.push(*y);
                j += 1;
            }
            (Some(x), None) => {
                only_src.push(*x);
                i += 1;
            }
            (None, Some(y)) => {
                only_dst.push(*y);
                j += 1;
            }
            (None, None) => break,
        }
    }
    for (label, rows) in [
        ("only in source", &only_src),
        ("only in destination", &only_dst),
    ] {
        let _ = write!(msg, "\n  {label}: {} rows", rows.len());
        for r in rows.iter().take(SHOW_DIFF_ROWS) {
            let _ = write!(msg, "\n    {r}");
        }
        if rows.len() > SHOW_DIFF_ROWS {
            let _ = write!(msg, "\n    ... and {} more", rows.len() - SHOW_DIFF_ROWS);
        }
    }
    Some(msg)
}

/// Compare `tables` (SQL names) between `src` and `dst` row for row, every
/// column. On mismatch the error names each differing table, the row counts
/// and the first few differing rows.
pub async fn assert_tables_equal(
    src: &Client,
    dst: &Client,
    tables: &[&str],
) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for table in tables {
        let s = try_table_rows(src, table).await.context("on the source")?;
        let d = try_table_rows(dst, table)
            .await
            .context("on the destination")?;
        if let Some(p) = describe_difference(table, &s, &d) {
            problems.push(p);
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

/// Wait until [`assert_tables_equal`] passes; on timeout the error shows the
/// last difference.
pub async fn wait_tables_equal(
    src: &Client,
    dst: &Client,
    tables: &[&str],
    timeout: Duration,
) -> anyhow::Result<()> {
    let what = format!(
        "tables {} to be equal on source and destination",
        tables.join(", ")
    );
    wait_until(&what, timeout, || async {
        assert_tables_equal(src, dst, tables).await.map(|()| true)
    })
    .await
}

/// A temporary directory with a short path under /tmp (for spools, configs,
/// logs). Removed on drop unless `PGCOURIER_KEEP_TEST_DIRS` is set, in which
/// case its path is printed.
pub fn workdir(name: &str) -> tempfile::TempDir {
    let mut dir = short_tempdir(name).expect("creating a work directory under /tmp");
    if keep_test_dirs() {
        dir.disable_cleanup(true);
        eprintln!(
            "pgcourier-tests: keeping work directory {name} at {}",
            dir.path().display()
        );
    }
    dir
}

/// Read a file from `offset` on (handy for following a daemon log between
/// steps). Returns the text and the new offset.
pub fn read_from(path: &Path, offset: u64) -> anyhow::Result<(String, u64)> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let new = offset + buf.len() as u64;
    Ok((String::from_utf8_lossy(&buf).into_owned(), new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_values_with_spaces_are_quoted() {
        assert_eq!(conninfo_value("/tmp/pgc-a"), "/tmp/pgc-a");
        assert_eq!(conninfo_value("a b"), "'a b'");
        assert_eq!(conninfo_value("it's"), "'it\\'s'");
        assert_eq!(conninfo_value(""), "''");
    }

    #[test]
    fn difference_lists_missing_and_extra_rows() {
        let s: Vec<String> = ["(1,a)", "(2,b)", "(3,c)"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let d: Vec<String> = ["(1,a)", "(3,c)", "(4,d)"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let msg = describe_difference("t", &s, &d).unwrap();
        assert!(
            msg.contains("source has 3 rows, destination has 3 rows"),
            "{msg}"
        );
        assert!(msg.contains("only in source: 1 rows\n    (2,b)"), "{msg}");
        assert!(
            msg.contains("only in destination: 1 rows\n    (4,d)"),
            "{msg}"
        );
        assert!(describe_difference("t", &s, &s).is_none());
    }
}

/// An HTTP proxy that answers `CONNECT host:port` with a tunnel (test
/// equipment, not the product): counts the tunnels it opened and keeps the
/// request lines it was sent. Stops with the test's runtime.
pub struct ConnectProxy {
    pub addr: std::net::SocketAddr,
    requests: std::sync::Arc<Mutex<Vec<String>>>,
}

impl ConnectProxy {
    pub async fn start() -> anyhow::Result<ConnectProxy> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests = std::sync::Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                        let mut b = [0u8; 1];
                        if client.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let line = text.lines().next().unwrap_or_default().to_owned();
                    seen.lock().expect("requests lock").push(line.clone());
                    let target = match line.split_whitespace().collect::<Vec<_>>()[..] {
                        ["CONNECT", target, _] => target.to_owned(),
                        _ => {
                            let _ = client
                                .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                                .await;
                            return;
                        }
                    };
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(target.as_str()).await
                    else {
                        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                        return;
                    };
                    if client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_ok()
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        Ok(ConnectProxy { addr, requests })
    }

    /// The request lines received so far ("CONNECT 127.0.0.1:7000 HTTP/1.1").
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests lock").clone()
    }
}
