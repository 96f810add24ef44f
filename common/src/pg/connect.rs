//! Every PostgreSQL connection pgcourier makes (source, target, and the
//! queue CLI's look at a stopped daemon's database) is resolved and opened
//! here, with libpq's conventions, so that a DBA's connection string,
//! environment, service file and `.pgpass` mean what they mean to `psql`.
//!
//! Resolution happens once, when the config is loaded ([`PgConnect::resolve`]),
//! in libpq's order: the connection string (`source` / `target`: keyword=value
//! pairs or a `postgres://` URI, [`conninfo`]), then the service file entry
//! named by `service=` or `PGSERVICE` (file `PGSERVICEFILE`, else
//! `~/.pg_service.conf`, else `PGSYSCONFDIR/pg_service.conf`), then the
//! environment (`PGHOST`, `PGPORT`, ... see [`ENV_VARS`]), then defaults.
//! The password: the connection string's, else our `password-env` /
//! `password-file` settings, else the service file's, else `PGPASSWORD`,
//! else the password file (`passfile`, `PGPASSFILE` or `~/.pgpass`,
//! matched per host as libpq does). The environment is a parameter
//! ([`Environment`]) so tests never touch the process's.
//!
//! Connecting ([`PgConnect::connect`]) opens the socket itself, asks the
//! server for TLS (SSLRequest) as `sslmode` says, and hands the socket (or
//! the TLS session, [`tls`]) to tokio-postgres for the login. A TLS failure
//! that retrying cannot fix (the certificate refused, or a server without
//! TLS under `require` and stronger) is a definite [`ConnectError`] naming
//! the setting, the host and what to check.
//!
//! The resolved hosts, user, database, password and the rustls client
//! config are public, for clients other than tokio-postgres (a replication
//! protocol client).

mod conninfo;
mod files;
mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::{ChannelBinding, SslNegotiation};
use tokio_postgres::Client;

pub use tls::{HandshakeError, PgSocket, PgStream, PgTlsStream};

use crate::config::{ConfigError, PasswordSource};
use crate::pg::errors::{classify, PgError};

/// A connection's socket driver, as tokio-postgres returns it: spawn it.
pub type PgConnection = tokio_postgres::Connection<PgSocket, PgTlsStream>;

/// libpq's environment variables and the keyword each one fills when
/// neither the connection string nor the service entry set it.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("PGHOST", "host"),
    ("PGHOSTADDR", "hostaddr"),
    ("PGPORT", "port"),
    ("PGDATABASE", "dbname"),
    ("PGUSER", "user"),
    ("PGPASSWORD", "password"),
    ("PGPASSFILE", "passfile"),
    ("PGOPTIONS", "options"),
    ("PGAPPNAME", "application_name"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
    ("PGSSLSNI", "sslsni"),
    ("PGCHANNELBINDING", "channel_binding"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGCLIENTENCODING", "client_encoding"),
    ("PGGSSENCMODE", "gssencmode"),
    ("PGTARGETSESSIONATTRS", "target_session_attrs"),
    ("PGLOADBALANCEHOSTS", "load_balance_hosts"),
];

/// libpq's `SYSCONFDIR` as Debian and Ubuntu build it: where
/// `pg_service.conf` is looked for when `PGSYSCONFDIR` is not set.
const DEFAULT_SYSCONFDIR: &str = "/etc/postgresql-common";

/// CA bundles tried for `sslrootcert=system` (after `SSL_CERT_FILE`).
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// What the process environment contributes: variables, the home
/// directory (`HOME`, else the password database's) and the user name
/// (the password database's, as libpq).
#[derive(Clone, Debug, Default)]
pub struct Environment {
    vars: HashMap<String, String>,
    home: Option<PathBuf>,
    os_user: Option<String>,
    /// The default Unix socket directory.
    socket_dir: PathBuf,
}

impl Environment {
    /// This process's environment.
    pub fn from_process() -> Environment {
        let (os_user, pw_home) = passwd_entry();
        let vars: HashMap<String, String> = std::env::vars().collect();
        let home = vars
            .get("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .or(pw_home);
        let socket_dir = if Path::new("/var/run/postgresql").is_dir() {
            "/var/run/postgresql"
        } else {
            "/tmp"
        };
        Environment {
            vars,
            home,
            os_user,
            socket_dir: socket_dir.into(),
        }
    }

    /// A made-up environment (tests): these variables, `HOME` as the home
    /// directory, `USER` as the user name, `/tmp` as the socket directory.
    pub fn from_vars<'a>(vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> Environment {
        let vars: HashMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Environment {
            home: vars.get("HOME").map(PathBuf::from),
            os_user: vars.get("USER").cloned(),
            vars,
            socket_dir: "/tmp".into(),
        }
    }

    /// A variable, unset when empty (as libpq reads most of them).
    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn in_home(&self, rel: &str) -> Option<PathBuf> {
        self.home.as_ref().map(|h| h.join(rel))
    }
}

/// The user name and home directory of the effective uid.
fn passwd_entry() -> (Option<String>, Option<PathBuf>) {
    use std::ffi::CStr;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value to be overwritten.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives the reads below.
    let rc = unsafe {
        libc::getpwuid_r(
            libc::geteuid(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return (None, None);
    }
    // SAFETY: getpwuid_r succeeded, so both point at NUL-terminated strings in buf.
    let name = unsafe { CStr::from_ptr(pwd.pw_name) }
        .to_str()
        .ok()
        .map(str::to_owned);
    // SAFETY: as above.
    let dir = unsafe { CStr::from_ptr(pwd.pw_dir) }
        .to_str()
        .ok()
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    (name, dir)
}

/// `sslmode`, as libpq.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address (TCP).
    Tcp(String),
    /// The directory of a Unix socket (never TLS).
    Unix(PathBuf),
}

/// A password, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One server to try, in order (libpq's host lists).
#[derive(Clone, Debug)]
pub struct Target {
    pub host: Host,
    /// Connect to this address instead of resolving `host` (which still
    /// names the server for TLS).
    pub hostaddr: Option<IpAddr>,
    pub port: u16,
    /// The name the server's certificate must carry under verify-full
    /// (and the SNI), for TCP hosts.
    server_name: Option<ServerName<'static>>,
    password: Option<Secret>,
}

impl Target {
    pub fn password(&self) -> Option<&str> {
        self.password.as_ref().map(|s| s.0.as_str())
    }

    pub fn server_name(&self) -> Option<&ServerName<'static>> {
        self.server_name.as_ref()
    }

    /// `host:port` or the socket path, for messages.
    pub fn describe(&self) -> String {
        match &self.host {
            Host::Tcp(h) if h.contains(':') => format!("[{h}]:{}", self.port),
            Host::Tcp(h) => format!("{h}:{}", self.port),
            Host::Unix(dir) => dir
                .join(format!(".s.PGSQL.{}", self.port))
                .display()
                .to_string(),
        }
    }
}

/// TCP socket options (`keepalives*`, `tcp_user_timeout`).
#[derive(Clone, Debug)]
struct TcpOptions {
    keepalive: Option<socket2::TcpKeepalive>,
    user_timeout: Option<Duration>,
}

/// A resolved PostgreSQL connection: what every pgcourier connection is
/// opened from. Resolved once, when the config is loaded.
#[derive(Clone, Debug)]
pub struct PgConnect {
    setting: &'static str,
    targets: Vec<Target>,
    user: String,
    dbname: String,
    ssl_mode: SslMode,
    /// `None` when no target can use TLS (`sslmode=disable`, or only Unix
    /// sockets).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Whether a root certificate checks the chain, for messages.
    verifies_chain: bool,
    connect_timeout: Option<Duration>,
    tcp: TcpOptions,
    load_balance: bool,
    /// user, dbname, options, application_name, channel_binding; the
    /// password and the TLS settings are set per attempt.
    base: tokio_postgres::Config,
}

/// Where a resolved keyword's value came from, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Origin {
    Conninfo,
    Service(PathBuf),
    Env(&'static str),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Conninfo => f.write_str("the connection string"),
            Origin::Service(p) => write!(f, "the service file {}", p.display()),
            Origin::Env(v) => write!(f, "the environment variable {v}"),
        }
    }
}

#[derive(Default)]
struct Params(HashMap<&'static str, (String, Origin)>);

impl Params {
    fn keyword(k: &str) -> &'static str {
        conninfo::SUPPORTED
            .iter()
            .find(|s| **s == k)
            .copied()
            .expect("checked by check_keyword")
    }

    fn set(&mut self, k: &str, v: String, origin: Origin) {
        self.0.insert(Self::keyword(k), (v, origin));
    }

    fn set_if_unset(&mut self, k: &str, v: String, origin: Origin) {
        self.0.entry(Self::keyword(k)).or_insert((v, origin));
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(|(v, _)| v.as_str())
    }

    fn origin(&self, k: &str) -> Option<&Origin> {
        self.0.get(k).map(|(_, o)| o)
    }

    /// Parse a keyword's value; the error names the keyword, the value
    /// (never for `password`) and where it came from.
    fn parsed<T>(
        &self,
        k: &str,
        expected: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, String> {
        let Some((v, origin)) = self.0.get(k) else {
            return Ok(None);
        };
        parse(v)
            .map(Some)
            .ok_or_else(|| format!("{k}={v:?} (from {origin}) is not {expected}"))
    }
}

fn int<T: std::str::FromStr>(s: &str) -> Option<T> {
    s.trim().parse().ok()
}

fn flag(s: &str) -> Option<bool> {
    match s.trim() {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

impl PgConnect {
    /// Resolve a connection string for `setting` (`source`, `target`) with
    /// libpq's conventions (see the module doc) and build its TLS config.
    /// Reads the service file, the password file and the certificate files
    /// named; every error names `setting`.
    pub fn resolve(
        setting: &'static str,
        conninfo: &str,
        password: &PasswordSource,
        env: &Environment,
    ) -> Result<PgConnect, ConfigError> {
        resolve(setting, conninfo, password, env)
            .map_err(|message| ConfigError::Invalid { setting, message })
    }

    /// Resolve with no environment at all (tests, tools): everything must
    /// be in `conninfo`.
    pub fn from_conninfo(setting: &'static str, conninfo: &str) -> Result<PgConnect, ConfigError> {
        PgConnect::resolve(
            setting,
            conninfo,
            &PasswordSource::default(),
            &Environment::default(),
        )
    }

    /// The config setting this connection comes from (`source`, `target`).
    pub fn setting(&self) -> &'static str {
        self.setting
    }

    /// The servers, tried in order (or shuffled with
    /// `load_balance_hosts=random`).
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn dbname(&self) -> &str {
        &self.dbname
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// The rustls client config (ring), `None` when no target uses TLS.
    pub fn tls_config(&self) -> Option<&Arc<rustls::ClientConfig>> {
        self.tls.as_ref()
    }

    /// Startup parameters beside user and database: `options` and
    /// `application_name`.
    pub fn options(&self) -> Option<&str> {
        self.base.get_options()
    }

    pub fn application_name(&self) -> Option<&str> {
        self.base.get_application_name()
    }

    /// Connect to the first target that accepts (see the module doc); the
    /// returned connection must be driven (spawned).
    pub async fn connect(&self) -> Result<(Client, PgConnection), ConnectError> {
        let mut order: Vec<usize> = (0..self.targets.len()).collect();
        if self.load_balance {
            use rand::seq::SliceRandom;
            order.shuffle(&mut rand::thread_rng());
        }
        let mut definite = None;
        let mut last = None;
        for i in order {
            let target = &self.targets[i];
            let attempt = self.connect_target(target);
            let result = match self.connect_timeout {
                Some(limit) => tokio::time::timeout(limit, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(ConnectError::Timeout {
                            setting: self.setting,
                            host: target.describe(),
                            after: limit,
                        })
                    }),
                None => attempt.await,
            };
            match result {
                Ok(c) => return Ok(c),
                Err(e) if !e.is_transient() && definite.is_none() => definite = Some(e),
                Err(e) => last = Some(e),
            }
        }
        // A definite error anywhere is what the operator must see.
        Err(definite
            .or(last)
            .expect("resolve refuses an empty host list"))
    }

    async fn connect_target(&self, t: &Target) -> Result<(Client, PgConnection), ConnectError> {
        if matches!(t.host, Host::Unix(_)) || self.ssl_mode == SslMode::Disable {
            return self.plaintext(t).await;
        }
        match self.ssl_mode {
            // libpq's order: plaintext first; TLS when the server refuses it.
            SslMode::Allow => match self.plaintext(t).await {
                Err(ConnectError::Server { source, .. }) if source.0.as_db_error().is_some() => {
                    self.with_tls(t, true).await
                }
                r => r,
            },
            // TLS when the server offers it; a failed handshake falls back
            // to plaintext, as libpq does.
            SslMode::Prefer => match self.with_tls(t, false).await {
                Err(e @ ConnectError::Tls { .. }) => {
                    tracing::warn!(setting = self.setting, host = %t.describe(), error = %crate::ops::backoff::error_chain(&e), "TLS failed; sslmode=prefer goes on without TLS");
                    self.plaintext(t).await
                }
                r => r,
            },
            _ => self.with_tls(t, true).await,
        }
    }

    fn attempt_config(&self, t: &Target) -> tokio_postgres::Config {
        let mut cfg = self.base.clone();
        if let Some(p) = &t.password {
            cfg.password(p.0.as_str());
        }
        cfg
    }

    async fn plaintext(&self, t: &Target) -> Result<(Client, PgConnection), ConnectError> {
        let socket = self.socket(t).await?;
        let mut cfg = self.attempt_config(t);
        cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
        cfg.connect_raw(socket, tls::Connector { tls: None })
            .await
            .map_err(|e| self.login_error(t, e))
    }

    /// SSLRequest, then the handshake and the login over TLS. The server
    /// declining TLS is an error when `required`, else the login goes on
    /// in plaintext on the same socket.
    async fn with_tls(
        &self,
        t: &Target,
        required: bool,
    ) -> Result<(Client, PgConnection), ConnectError> {
        let (config, name, socket, accepted) = self.ssl_request(t, required).await?;
        let mut cfg = self.attempt_config(t);
        if accepted {
            // Our SSLRequest is answered: tokio-postgres goes straight to
            // the handshake (which calls our Connector).
            cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
            cfg.ssl_negotiation(SslNegotiation::Direct);
            let connector = tls::Connector {
                tls: Some((config, name)),
            };
            cfg.connect_raw(socket, connector)
                .await
                .map_err(|e| self.login_error(t, e))
        } else {
            cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            cfg.connect_raw(socket, tls::Connector { tls: None })
                .await
                .map_err(|e| self.login_error(t, e))
        }
    }

    /// Open a socket to `t` and send the SSLRequest. `true`: the server
    /// accepted (the TLS handshake comes next); `false`: it declined and
    /// TLS is not `required`, so the login goes on in plaintext on the same
    /// socket. Declined under `required` is [`ConnectError::TlsRefused`].
    async fn ssl_request(
        &self,
        t: &Target,
        required: bool,
    ) -> Result<
        (
            Arc<rustls::ClientConfig>,
            ServerName<'static>,
            PgSocket,
            bool,
        ),
        ConnectError,
    > {
        let (Some(config), Some(name)) = (&self.tls, &t.server_name) else {
            unreachable!("resolve builds the TLS config and a name for every TCP target unless sslmode=disable")
        };
        let mut socket = self.socket(t).await?;
        let unreachable = |source: std::io::Error| ConnectError::Unreachable {
            setting: self.setting,
            host: t.describe(),
            source,
        };
        // SSLRequest: length 8, code 80877103.
        socket
            .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .map_err(unreachable)?;
        let mut answer = [0u8; 1];
        socket.read_exact(&mut answer).await.map_err(unreachable)?;
        let accepted = match answer[0] {
            b'S' => true,
            b'N' if !required => false,
            b'N' => {
                return Err(ConnectError::TlsRefused {
                    setting: self.setting,
                    host: t.describe(),
                    mode: self.ssl_mode,
                })
            }
            other => {
                return Err(unreachable(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                    "the server answered the TLS request with byte {other:#04x}: is it PostgreSQL?"
                ),
                )))
            }
        };
        Ok((config.clone(), name.clone(), socket, accepted))
    }

    /// A stream to `t` for a protocol client of our own (the sender's
    /// replication connection), TLS negotiated as `sslmode` says; the login
    /// is the caller's. `allow` opens plaintext (the caller may come back
    /// with [`PgConnect::open_tls_stream`] if the server refuses the login);
    /// `prefer` takes TLS when the server offers it, and plaintext on a new
    /// socket when the handshake fails.
    pub async fn open_stream(&self, t: &Target) -> Result<PgStream, ConnectError> {
        if matches!(t.host, Host::Unix(_))
            || matches!(self.ssl_mode, SslMode::Disable | SslMode::Allow)
        {
            return Ok(PgStream::Plain(self.socket(t).await?));
        }
        match self.ssl_mode {
            SslMode::Prefer => match self.tls_stream(t, false).await {
                Err(e @ ConnectError::Tls { .. }) => {
                    tracing::warn!(setting = self.setting, host = %t.describe(), error = %crate::ops::backoff::error_chain(&e), "TLS failed; sslmode=prefer goes on without TLS");
                    Ok(PgStream::Plain(self.socket(t).await?))
                }
                r => r,
            },
            _ => self.tls_stream(t, true).await,
        }
    }

    /// A TLS stream to `t` whatever `sslmode` says (but `disable`): for
    /// `allow` after the server refused a plaintext login.
    pub async fn open_tls_stream(&self, t: &Target) -> Result<PgStream, ConnectError> {
        self.tls_stream(t, true).await
    }

    async fn tls_stream(&self, t: &Target, required: bool) -> Result<PgStream, ConnectError> {
        let (config, name, socket, accepted) = self.ssl_request(t, required).await?;
        if !accepted {
            return Ok(PgStream::Plain(socket));
        }
        match tls::handshake(config, name, socket).await {
            Ok(s) => Ok(PgStream::Tls(s)),
            Err(HandshakeError::Refused(r)) => Err(ConnectError::Tls {
                setting: self.setting,
                host: t.describe(),
                mode: self.ssl_mode,
                check: tls_hint(&r, self.verifies_chain),
                source: Box::new(r),
            }),
            Err(HandshakeError::Io(source)) => Err(ConnectError::Unreachable {
                setting: self.setting,
                host: t.describe(),
                source,
            }),
            Err(HandshakeError::NotConfigured) => unreachable!("the config was given"),
        }
    }

    /// How long a connection attempt may take (`connect_timeout`).
    pub fn connect_timeout(&self) -> Option<Duration> {
        self.connect_timeout
    }

    /// Classify an error from tokio-postgres' login: a refused handshake
    /// is ours to name; the rest is the server's (or the connection's).
    fn login_error(&self, t: &Target, e: tokio_postgres::Error) -> ConnectError {
        if let Some(HandshakeError::Refused(r)) =
            std::error::Error::source(&e).and_then(|s| s.downcast_ref::<HandshakeError>())
        {
            return ConnectError::Tls {
                setting: self.setting,
                host: t.describe(),
                mode: self.ssl_mode,
                check: tls_hint(r, self.verifies_chain),
                source: Box::new(r.clone()),
            };
        }
        ConnectError::Server {
            setting: self.setting,
            host: t.describe(),
            source: PgError(e),
        }
    }

    async fn socket(&self, t: &Target) -> Result<PgSocket, ConnectError> {
        let unreachable = |source: std::io::Error| ConnectError::Unreachable {
            setting: self.setting,
            host: t.describe(),
            source,
        };
        match &t.host {
            Host::Unix(dir) => {
                tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{}", t.port)))
                    .await
                    .map(PgSocket::Unix)
                    .map_err(unreachable)
            }
            Host::Tcp(name) => {
                let addrs: Vec<SocketAddr> = match t.hostaddr {
                    Some(ip) => vec![SocketAddr::new(ip, t.port)],
                    None => tokio::net::lookup_host((name.as_str(), t.port))
                        .await
                        .map_err(unreachable)?
                        .collect(),
                };
                let mut last = std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the host name resolves to no address",
                );
                for addr in addrs {
                    match tokio::net::TcpStream::connect(addr).await {
                        Ok(s) => {
                            s.set_nodelay(true).map_err(unreachable)?;
                            let sock = socket2::SockRef::from(&s);
                            if let Some(k) = &self.tcp.keepalive {
                                sock.set_tcp_keepalive(k).map_err(unreachable)?;
                            }
                            if let Some(u) = self.tcp.user_timeout {
                                sock.set_tcp_user_timeout(Some(u)).map_err(unreachable)?;
                            }
                            return Ok(PgSocket::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(unreachable(last))
            }
        }
    }
}

/// What to check when a handshake was refused.
fn tls_hint(e: &rustls::Error, verifies_chain: bool) -> &'static str {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the server's certificate does not name this host (its subjectAltName): connect by a name or address it holds, or use sslmode=verify-ca to check the CA only"
        }
        rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => "the server certificate's validity dates (and this machine's clock)",
        rustls::Error::InvalidCertificate(_) if verifies_chain => {
            "sslrootcert: it must hold the CA certificate that signed the server's certificate"
        }
        rustls::Error::AlertReceived(_) => {
            "the server refused our side of the handshake: sslcert/sslkey (a client certificate it trusts) and the server's ssl settings"
        }
        _ => "sslmode, sslrootcert and the server's ssl settings",
    }
}

/// Why a connection could not be opened. [`ConnectError::is_transient`]:
/// retry with backoff; otherwise an operator must act.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach the database of setting `{setting}` at {host}")]
    Unreachable {
        setting: &'static str,
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the database of setting `{setting}` at {host} did not answer within {after:?} (connect_timeout)")]
    Timeout {
        setting: &'static str,
        host: String,
        after: Duration,
    },
    #[error("logging in to the database of setting `{setting}` at {host} failed")]
    Server {
        setting: &'static str,
        host: String,
        #[source]
        source: PgError,
    },
    #[error("the database server of setting `{setting}` at {host} does not accept TLS, and sslmode={mode} requires it: turn ssl on in the server's postgresql.conf, or check sslmode")]
    TlsRefused {
        setting: &'static str,
        host: String,
        mode: SslMode,
    },
    #[error("the TLS handshake with the database of setting `{setting}` at {host} failed (sslmode={mode}); check {check}")]
    Tls {
        setting: &'static str,
        host: String,
        mode: SslMode,
        check: &'static str,
        #[source]
        source: Box<rustls::Error>,
    },
}

impl ConnectError {
    /// Retry with backoff: the server is unreachable, starting or
    /// overloaded. A refused login or TLS failure is definite.
    pub fn is_transient(&self) -> bool {
        match self {
            ConnectError::Unreachable { .. } | ConnectError::Timeout { .. } => true,
            ConnectError::Server { source, .. } => classify(&source.0).transient,
            ConnectError::TlsRefused { .. } | ConnectError::Tls { .. } => false,
        }
    }

    /// A stable name for status and metrics: `connection`, `tls`, or the
    /// server error's class ([`classify`]).
    pub fn class(&self) -> &'static str {
        match self {
            ConnectError::Unreachable { .. } | ConnectError::Timeout { .. } => "connection",
            ConnectError::Server { source, .. } => classify(&source.0).class,
            ConnectError::TlsRefused { .. } | ConnectError::Tls { .. } => "tls",
        }
    }

    /// The server's error, when the server answered.
    pub fn server_error(&self) -> Option<&tokio_postgres::Error> {
        match self {
            ConnectError::Server { source, .. } => Some(&source.0),
            _ => None,
        }
    }

    /// The server's error, taken out; `Err(self)` when the server did not
    /// answer.
    pub fn into_server_error(self) -> Result<tokio_postgres::Error, ConnectError> {
        match self {
            ConnectError::Server { source, .. } => Ok(source.0),
            other => Err(other),
        }
    }

    /// Why the server refused the login when retrying cannot help
    /// ([`crate::config::login_refused`]).
    pub fn login_refused(&self) -> Option<&'static str> {
        self.server_error().and_then(crate::config::login_refused)
    }
}

fn resolve(
    setting: &'static str,
    text: &str,
    password_source: &PasswordSource,
    env: &Environment,
) -> Result<PgConnect, String> {
    let mut p = Params::default();
    for (k, v) in conninfo::parse(text)? {
        conninfo::check_keyword(&k)?;
        p.set(&k, v, Origin::Conninfo);
    }
    // The service entry fills what the string left unset.
    let service = match p.get("service") {
        Some(s) => Some((s.to_owned(), Origin::Conninfo)),
        None => env
            .var("PGSERVICE")
            .map(|s| (s.to_owned(), Origin::Env("PGSERVICE"))),
    };
    if let Some((name, origin)) = service {
        let user_file = env
            .var("PGSERVICEFILE")
            .map(PathBuf::from)
            .or_else(|| env.in_home(".pg_service.conf"));
        let sys_file = PathBuf::from(env.var("PGSYSCONFDIR").unwrap_or(DEFAULT_SYSCONFDIR))
            .join("pg_service.conf");
        let mut found = None;
        for file in user_file.iter().chain(std::iter::once(&sys_file)) {
            if let Some(entry) = files::service_entry(file, &name)? {
                found = Some((entry, file.clone()));
                break;
            }
        }
        let (entry, file) = found.ok_or_else(|| {
            format!(
                "service {name:?} (from {origin}) is not defined in {}{}",
                user_file
                    .as_ref()
                    .map(|f| format!("{} nor ", f.display()))
                    .unwrap_or_default(),
                sys_file.display()
            )
        })?;
        for (k, v) in entry {
            p.set_if_unset(&k, v, Origin::Service(file.clone()));
        }
    }
    for (var, k) in ENV_VARS {
        if p.get(k).is_some() {
            continue;
        }
        if let Some(v) = env.var(var) {
            p.set(k, v.to_owned(), Origin::Env(var));
        }
    }

    let ssl_mode = p
        .parsed(
            "sslmode",
            "disable, allow, prefer, require, verify-ca or verify-full",
            SslMode::parse,
        )?
        .unwrap_or(SslMode::Prefer);
    match p.get("gssencmode") {
        None | Some("disable" | "prefer") => {}
        Some(_) => return Err("gssencmode: pgcourier has no GSSAPI encryption; use disable or prefer (TLS is set with sslmode)".into()),
    }
    match p.get("target_session_attrs") {
        None | Some("any") => {}
        Some(_) => return Err("target_session_attrs: pgcourier supports only `any`".into()),
    }
    match p.get("client_encoding") {
        None => {}
        Some(e)
            if e.eq_ignore_ascii_case("utf8") || e.eq_ignore_ascii_case("utf-8") || e == "auto" => {
        }
        Some(_) => return Err("client_encoding: pgcourier always talks UTF8 to PostgreSQL".into()),
    }
    let load_balance = p
        .parsed("load_balance_hosts", "disable or random", |s| match s {
            "disable" => Some(false),
            "random" => Some(true),
            _ => None,
        })?
        .unwrap_or(false);

    // Hosts, addresses and ports, as lists.
    let hosts: Vec<String> = match p.get("host") {
        Some(h) => h.split(',').map(|s| s.trim().to_owned()).collect(),
        None => Vec::new(),
    };
    let mut hostaddrs: Vec<Option<IpAddr>> = match p.get("hostaddr") {
        Some(a) => a
            .split(',')
            .map(|s| {
                let s = s.trim();
                if s.is_empty() {
                    Ok(None)
                } else {
                    s.parse().map(Some).map_err(|_| {
                        format!(
                            "hostaddr {s:?} (from {}) is not an IP address",
                            p.origin("hostaddr").expect("set")
                        )
                    })
                }
            })
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    // PGHOSTADDR is one address for one host; beside a host list it is
    // ignored.
    if p.origin("hostaddr") == Some(&Origin::Env("PGHOSTADDR"))
        && (hosts.len() > 1 || hostaddrs.len() > 1)
    {
        tracing::warn!(setting, "PGHOSTADDR is ignored beside a list of hosts");
        hostaddrs.clear();
    }
    let n = hosts.len().max(hostaddrs.len()).max(1);
    if !hosts.is_empty() && !hostaddrs.is_empty() && hosts.len() != hostaddrs.len() {
        return Err(format!(
            "{} hosts but {} hostaddrs: give one address per host",
            hosts.len(),
            hostaddrs.len()
        ));
    }
    let ports: Vec<u16> = match p.get("port") {
        Some(list) => list
            .split(',')
            .map(|s| {
                let s = s.trim();
                if s.is_empty() {
                    Ok(5432)
                } else {
                    s.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                        format!(
                            "port {s:?} (from {}) is not a port number",
                            p.origin("port").expect("set")
                        )
                    })
                }
            })
            .collect::<Result<_, _>>()?,
        None => vec![5432],
    };
    if ports.len() != 1 && ports.len() != n {
        return Err(format!(
            "{} ports for {n} hosts: give one port, or one per host",
            ports.len()
        ));
    }

    let user = match p.get("user") {
        Some(u) => u.to_owned(),
        None => env
            .os_user
            .clone()
            .ok_or("no user given (user=, PGUSER) and this process's user name is unknown")?,
    };
    let dbname = p.get("dbname").unwrap_or(&user).to_owned();

    // TLS: only when some target may use it.
    let mut targets = Vec::with_capacity(n);
    for i in 0..n {
        let host = hosts.get(i).filter(|h| !h.is_empty());
        let hostaddr = hostaddrs.get(i).copied().flatten();
        let host = match (host, hostaddr) {
            (Some(h), _) if h.starts_with('/') => Host::Unix(PathBuf::from(h)),
            (Some(h), _) => Host::Tcp(h.clone()),
            (None, Some(a)) => Host::Tcp(a.to_string()),
            (None, None) => Host::Unix(env.socket_dir.clone()),
        };
        targets.push(Target {
            host,
            hostaddr,
            port: ports
                .get(i)
                .or(ports.first())
                .copied()
                .expect("at least one port"),
            server_name: None,
            password: None,
        });
    }
    let any_tcp = targets.iter().any(|t| matches!(t.host, Host::Tcp(_)));
    let (tls, verifies_chain) = if ssl_mode != SslMode::Disable && any_tcp {
        let (config, verifies_chain) = tls_config(&p, ssl_mode, env)?;
        (Some(config), verifies_chain)
    } else {
        if p.get("channel_binding") == Some("require") {
            return Err("channel_binding=require needs TLS, which sslmode=disable (or a Unix socket) turns off".into());
        }
        (None, false)
    };
    if tls.is_some() {
        for t in &mut targets {
            if let Host::Tcp(name) = &t.host {
                let server_name = match name.parse::<IpAddr>() {
                    Ok(ip) => ServerName::IpAddress(ip.into()),
                    Err(_) => ServerName::try_from(name.clone()).map_err(|_| {
                        format!("host {name:?} is not a valid DNS name, which TLS needs")
                    })?,
                };
                t.server_name = Some(server_name);
            }
        }
    }

    // The password, in our order of precedence (module doc).
    let from_setting = setting_password(password_source, env)?;
    let fixed = match (p.origin("password"), from_setting) {
        (Some(Origin::Conninfo), _) => p.get("password").map(str::to_owned),
        (_, Some(pw)) => Some(pw),
        _ => p.get("password").map(str::to_owned),
    };
    let passfile = p
        .get("passfile")
        .map(PathBuf::from)
        .or_else(|| env.in_home(".pgpass"));
    for t in &mut targets {
        let pw = match &fixed {
            Some(pw) => Some(pw.clone()),
            None => passfile.as_ref().and_then(|file| {
                let (host, unix) = match &t.host {
                    Host::Tcp(h) => (h.clone(), false),
                    Host::Unix(d) => (d.display().to_string(), true),
                };
                files::pgpass_password(
                    file,
                    &files::PassKey {
                        host: &host,
                        unix_socket: unix,
                        port: &t.port.to_string(),
                        dbname: &dbname,
                        user: &user,
                    },
                )
            }),
        };
        t.password = pw.map(Secret);
    }

    let connect_timeout = p
        .parsed("connect_timeout", "a number of seconds", int::<i64>)?
        .filter(|s| *s > 0)
        // libpq's minimum.
        .map(|s| Duration::from_secs(s.max(2) as u64));
    let keepalives = p.parsed("keepalives", "0 or 1", flag)?.unwrap_or(true);
    let keepalive = if keepalives {
        // tokio-postgres' default idle time (libpq leaves the system's).
        let mut k = socket2::TcpKeepalive::new().with_time(Duration::from_secs(
            p.parsed("keepalives_idle", "a number of seconds", int::<u64>)?
                .unwrap_or(2 * 60 * 60),
        ));
        if let Some(i) = p.parsed("keepalives_interval", "a number of seconds", int::<u64>)? {
            k = k.with_interval(Duration::from_secs(i));
        }
        if let Some(c) = p.parsed("keepalives_count", "a number", int::<u32>)? {
            k = k.with_retries(c);
        }
        Some(k)
    } else {
        None
    };
    let user_timeout = p
        .parsed("tcp_user_timeout", "a number of milliseconds", int::<u64>)?
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);

    let mut base = tokio_postgres::Config::new();
    base.user(&user).dbname(&dbname);
    if let Some(o) = p.get("options") {
        base.options(o);
    }
    base.application_name(
        p.get("application_name")
            .or(p.get("fallback_application_name"))
            .unwrap_or("pgcourier"),
    );
    base.channel_binding(
        p.parsed(
            "channel_binding",
            "disable, prefer or require",
            |s| match s {
                "disable" => Some(ChannelBinding::Disable),
                "prefer" => Some(ChannelBinding::Prefer),
                "require" => Some(ChannelBinding::Require),
                _ => None,
            },
        )?
        .unwrap_or(ChannelBinding::Prefer),
    );
    Ok(PgConnect {
        setting,
        targets,
        user,
        dbname,
        ssl_mode,
        tls,
        verifies_chain,
        connect_timeout,
        tcp: TcpOptions {
            keepalive,
            user_timeout,
        },
        load_balance,
        base,
    })
}

/// The password from our own settings (`password-env`, `password-file`).
fn setting_password(source: &PasswordSource, env: &Environment) -> Result<Option<String>, String> {
    if let Some(var) = &source.password_env {
        return env
            .var(var)
            .map(|v| Some(v.to_owned()))
            .ok_or_else(|| format!("password-env: environment variable {var} is not set"));
    }
    if let Some(path) = &source.password_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("password-file: cannot read {}: {e}", path.display()))?;
        return Ok(Some(text.lines().next().unwrap_or("").to_owned()));
    }
    Ok(None)
}

/// The rustls client config for `sslmode` and the ssl* keywords; whether
/// it checks the certificate chain.
fn tls_config(
    p: &Params,
    mode: SslMode,
    env: &Environment,
) -> Result<(Arc<rustls::ClientConfig>, bool), String> {
    let verify = mode >= SslMode::VerifyCa;
    // Root certificates: sslrootcert, else ~/.postgresql/root.crt if it
    // exists (libpq checks the chain in every mode when it does).
    let roots = match p.get("sslrootcert") {
        Some("system") => {
            if mode != SslMode::VerifyFull {
                return Err(format!("sslrootcert=system needs sslmode=verify-full (it is {mode}), as in libpq: any server with a publicly trusted certificate would do otherwise"));
            }
            let file = env
                .var("SSL_CERT_FILE")
                .map(PathBuf::from)
                .or_else(|| {
                    SYSTEM_CA_FILES
                        .iter()
                        .map(PathBuf::from)
                        .find(|p| p.is_file())
                })
                .ok_or_else(|| {
                    format!(
                        "sslrootcert=system: no system CA bundle found (looked at SSL_CERT_FILE, {})",
                        SYSTEM_CA_FILES.join(", ")
                    )
                })?;
            Some(tls::load_roots(&[file])?)
        }
        Some(path) => {
            let origin = p.origin("sslrootcert").expect("set");
            let path = PathBuf::from(path);
            if !path.is_file() {
                return Err(format!(
                    "sslrootcert {} (from {origin}) does not exist: give the CA certificate that signed the server's certificate",
                    path.display()
                ));
            }
            Some(tls::load_roots(&[path]).map_err(|e| format!("sslrootcert: {e}"))?)
        }
        None => match env.in_home(".postgresql/root.crt").filter(|f| f.is_file()) {
            Some(default) => {
                Some(tls::load_roots(&[default]).map_err(|e| format!("sslrootcert: {e}"))?)
            }
            None if verify => {
                return Err(format!(
                    "sslmode={mode} checks the server's certificate against a CA certificate: set sslrootcert (the default {} does not exist), or sslrootcert=system",
                    env.in_home(".postgresql/root.crt")
                        .map(|f| f.display().to_string())
                        .unwrap_or_else(|| "~/.postgresql/root.crt".into())
                ));
            }
            None => None,
        },
    };
    let verifies_chain = roots.is_some();
    let provider = tls::provider();
    let verifier = tls::ServerVerifier {
        roots: roots.map(Arc::new),
        check_name: mode == SslMode::VerifyFull,
        provider: provider.clone(),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    // A client certificate: sslcert, else ~/.postgresql/postgresql.crt if
    // it exists; its key: sslkey, else ~/.postgresql/postgresql.key.
    let cert = match p.get("sslcert") {
        Some(c) => {
            let c = PathBuf::from(c);
            if !c.is_file() {
                return Err(format!(
                    "sslcert {} (from {}) does not exist",
                    c.display(),
                    p.origin("sslcert").expect("set")
                ));
            }
            Some(c)
        }
        None => env
            .in_home(".postgresql/postgresql.crt")
            .filter(|f| f.is_file()),
    };
    let mut config = match cert {
        Some(cert) => {
            let key = p
                .get("sslkey")
                .map(PathBuf::from)
                .or_else(|| env.in_home(".postgresql/postgresql.key"))
                .ok_or("sslkey: no key file given for sslcert")?;
            let (chain, key) = tls::load_client_identity(&cert, &key)
                .map_err(|e| format!("sslcert/sslkey: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("sslcert/sslkey: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    config.enable_sni = p.parsed("sslsni", "0 or 1", flag)?.unwrap_or(true);
    Ok((Arc::new(config), verifies_chain))
}

#[cfg(test)]
mod tests;
