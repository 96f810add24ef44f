//! The daemons' admin endpoint, the same for both: an HTTP/1.1 server
//! (hyper) serving `/status` (JSON), `/metrics` (Prometheus text),
//! `/health`, the record inspection of `pgcourier-queue` (`/records`,
//! `/records/<seq>`) and the daemon's control requests (POST: the sender's
//! `/seed`, the receiver's `/skip`); and the one-shot client that the queue
//! CLI, `seed export` and the tests use.
//!
//! Who may ask what ([`Access`]):
//! - The admin socket (setting `admin-socket`, always on): a Unix socket,
//!   mode 0600, in a directory of mode 0700 owned by the daemon's user.
//!   Only that user (and root) can connect; it serves every route: row data
//!   and control requests live only here.
//! - The TCP listener (setting `admin`, optional, any address, e.g. for a
//!   Prometheus server elsewhere): read-only, `/status`, `/metrics`,
//!   `/health`; every other route answers 403. A web page that reaches it
//!   (cross-site request, DNS rebinding) can read those and nothing else.
//!
//! Requests are small and rare (an operator, a scraper): each connection
//! serves one request and closes; request heads are capped at 8 KiB and
//! must arrive within 5 s; at most 32 connections are served at once (the
//! others wait in the listen backlog); `/records` returns at most 1000
//! records. A daemon supplies its views through
//! [`Endpoint`]; they run on the blocking pool (they walk the store).
//! Every connection and every request is a task of the [`Server`]'s
//! tracker, ended through the daemon's shutdown token.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, HOST};
use hyper_util::rt::{TokioIo, TokioTimer};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use pgcourier_proto::pgoutput::Relation;
use pgcourier_proto::record::Record;

use crate::ops::inspect::{self, RecordLine};

/// The largest request head accepted (hyper's smallest buffer).
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long requests in progress may take to finish after shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The most records one `/records` request returns.
pub const MAX_RECORDS_LIMIT: usize = 1000;
/// Connections served at once; further ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;
/// Client side: connecting, and the whole exchange.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Which daemon a status is from (`"role"` in `/status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Sender,
    Receiver,
}

/// One parsed request: the path, and the query decoded (`%XX` and `+`).
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
}

/// One response.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, value: &impl serde::Serialize) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: serde_json::to_string_pretty(value)
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// What a daemon serves behind the common routes. Every method runs on the
/// blocking pool.
pub trait Endpoint: Send + Sync + 'static {
    type Status: serde::Serialize;
    /// The `/status` view (also what `/metrics` and `/health` read).
    fn status(&self) -> Self::Status;
    /// Prometheus text of `status`.
    fn metrics(&self, status: &Self::Status) -> String;
    /// `Err(why)` when the daemon needs an operator (`/health` answers 503).
    fn health(&self, status: &Self::Status) -> Result<(), String>;
    /// `/records`: up to `limit` records from `from` (default: the oldest).
    fn list(&self, from: Option<u64>, limit: usize) -> Vec<RecordLine>;
    /// `/records/<seq>`: one record as `json` or `sql`.
    fn show(&self, seq: u64, format: &str) -> Response;
    /// A POST: the daemon's control requests; `None` for an unknown one.
    fn control(&self, path: &str, query: &HashMap<String, String>) -> Option<Response>;
}

/// What a listener may serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The TCP listener: `/status`, `/metrics`, `/health` only.
    ReadOnly,
    /// The admin socket: every route.
    Control,
}

/// The routes both daemons serve, as far as `access` allows.
pub fn route<E: Endpoint + ?Sized>(endpoint: &E, req: &Request, access: Access) -> Response {
    let read_only = matches!(
        (req.method.as_str(), req.path.as_str()),
        ("GET", "/status" | "/metrics" | "/health")
    );
    if access == Access::ReadOnly && !read_only {
        return Response::text(
            403,
            "the TCP admin listener (setting `admin`) serves /status, /metrics and /health only: \
             records and control requests are on the admin socket (setting `admin-socket`), \
             for the daemon's user, e.g. through pgcourier-queue",
        );
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/status") => Response::json(200, &endpoint.status()),
        ("GET", "/metrics") => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: endpoint.metrics(&endpoint.status()),
        },
        ("GET", "/health") => match endpoint.health(&endpoint.status()) {
            Ok(()) => Response::text(200, "ok"),
            Err(why) => Response::text(503, why),
        },
        ("GET", "/records") => {
            let from = req.query.get("from").and_then(|v| v.parse().ok());
            let limit = req
                .query
                .get("limit")
                .and_then(|v| v.parse().ok())
                .unwrap_or(20)
                .min(MAX_RECORDS_LIMIT);
            Response::json(200, &endpoint.list(from, limit))
        }
        ("GET", path) if path.starts_with("/records/") => match path["/records/".len()..].parse() {
            Ok(seq) => endpoint.show(seq, req.query.get("format").map_or("json", String::as_str)),
            Err(_) => Response::text(400, "record sequence must be a number"),
        },
        ("POST", path) => endpoint
            .control(path, &req.query)
            .unwrap_or_else(unknown_request),
        _ => unknown_request(),
    }
}

/// `/records/<seq>` of a store: the record `found` (what the store's `get`
/// returned) decoded with the Relations from `relations`, as `sql` text or
/// JSON; 404 naming the `store` and why records `leave` it when absent.
pub fn show_record(
    seq: u64,
    format: &str,
    store: &str,
    leave: &str,
    found: Result<Option<Vec<u8>>, impl std::fmt::Display>,
    relations: impl FnOnce() -> HashMap<u32, Relation>,
) -> Response {
    let bytes = match found {
        Ok(Some(b)) => b,
        Ok(None) => {
            return Response::text(404, format!("record {seq} is not in the {store} ({leave})"))
        }
        Err(e) => return Response::text(500, format!("{store} read failed: {e}")),
    };
    let record = match Record::decode(&bytes) {
        Ok(r) => r,
        Err(e) => return Response::text(500, format!("record {seq} is corrupt: {e}")),
    };
    let mut rels = relations();
    let view = inspect::view(&record, &mut rels);
    if format == "sql" {
        Response::text(200, inspect::sql(&view, &rels))
    } else {
        Response::json(200, &view)
    }
}

fn unknown_request() -> Response {
    Response::text(
        404,
        "unknown admin request; try /status, /metrics, /health, /records",
    )
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on admin address {addr} (setting `admin`)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the admin socket {path} (setting `admin-socket`; its directory must be owned by this user, the path at most 107 bytes)")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A daemon's whole admin endpoint: the socket with every route and, when
/// the `admin` setting asks for it, the read-only TCP listener. Both daemons
/// start theirs with [`Listeners::start`] and wait for it with
/// [`Listeners::stopped`] after the shutdown token is cancelled.
pub struct Listeners {
    socket: Server,
    tcp: Option<Server>,
}

impl Listeners {
    pub async fn start<E: Endpoint>(
        socket: &Path,
        tcp: Option<SocketAddr>,
        endpoint: Arc<E>,
        shutdown: CancellationToken,
    ) -> Result<Listeners, AdminError> {
        let socket = Server::start_socket(socket, endpoint.clone(), shutdown.clone()).await?;
        let tcp = match tcp {
            Some(addr) => Some(Server::start(addr, endpoint, shutdown).await?),
            None => None,
        };
        Ok(Listeners { socket, tcp })
    }

    /// Wait until both listeners have drained (after shutdown).
    pub async fn stopped(self) {
        if let Some(tcp) = self.tcp {
            tcp.stopped().await;
        }
        self.socket.stopped().await;
    }
}

/// A running admin endpoint. Its accept loop, connections and requests are
/// tasks of one tracker; they end when the shutdown token is cancelled
/// (requests in progress get [`DRAIN_TIMEOUT`] to finish).
pub struct Server {
    addr: Option<SocketAddr>,
    socket: Option<PathBuf>,
    tasks: TaskTracker,
}

impl Server {
    /// Bind the read-only TCP listener on `addr` (any address) and serve
    /// `endpoint` until `shutdown`.
    pub async fn start<E: Endpoint>(
        addr: SocketAddr,
        endpoint: Arc<E>,
        shutdown: CancellationToken,
    ) -> Result<Server, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| AdminError::Bind { addr, source })?;
        let tasks = TaskTracker::new();
        tasks.spawn(accept(
            Listener::Tcp(listener),
            Access::ReadOnly,
            endpoint,
            shutdown,
            tasks.clone(),
        ));
        tracing::info!(%addr, "admin listener (read-only: /status, /metrics, /health) listening");
        Ok(Server {
            addr: Some(addr),
            socket: None,
            tasks,
        })
    }

    /// Make the admin socket at `path` (its directory created or set to
    /// mode 0700, and owned by this user; the socket mode 0600; a stale
    /// socket from an earlier run replaced, anything else there refused)
    /// and serve every route of `endpoint` on it until `shutdown`.
    pub async fn start_socket<E: Endpoint>(
        path: &Path,
        endpoint: Arc<E>,
        shutdown: CancellationToken,
    ) -> Result<Server, AdminError> {
        let listener = bind_private_socket(path).map_err(|source| AdminError::Socket {
            path: path.into(),
            source,
        })?;
        let tasks = TaskTracker::new();
        tasks.spawn(accept(
            Listener::Unix(listener),
            Access::Control,
            endpoint,
            shutdown,
            tasks.clone(),
        ));
        tracing::info!(socket = %path.display(), "admin socket listening");
        Ok(Server {
            addr: None,
            socket: Some(path.into()),
            tasks,
        })
    }

    /// The TCP address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
            .expect("local_addr is asked of a TCP admin server")
    }

    /// Wait until the accept loop and every connection have ended (after
    /// the shutdown token is cancelled); the socket file is then removed.
    pub async fn stopped(self) {
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(path) = self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The admin socket's directory (0700, ours) and the socket (0600).
fn bind_private_socket(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me {
        return Err(std::io::Error::other(format!(
            "{} is not a directory owned by this user (uid {me})",
            dir.display()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)?;
    // Nobody else can reach the socket between bind and chmod: the
    // directory is 0700.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn accept<E: Endpoint>(
    listener: Listener,
    access: Access,
    endpoint: Arc<E>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A place first: at most MAX_CONNECTIONS are served at once, the
        // others wait in the kernel's backlog.
        let place = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = places.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = async {
                match &listener {
                    Listener::Tcp(l) => l.accept().await.map(|(s, _)| Ok(s)),
                    Listener::Unix(l) => l.accept().await.map(|(s, _)| Err(s)),
                }
            } => r,
        };
        let (endpoint, shutdown, t) = (endpoint.clone(), shutdown.clone(), tasks.clone());
        match accepted {
            Ok(Ok(tcp)) => tasks.spawn(async move {
                connection(tcp, access, endpoint, shutdown, t).await;
                drop(place);
            }),
            Ok(Err(unix)) => tasks.spawn(async move {
                connection(unix, access, endpoint, shutdown, t).await;
                drop(place);
            }),
            Err(e) => {
                tracing::debug!(error = %e, "admin accept failed");
                continue;
            }
        };
    }
}

/// Serve one connection (one request); on shutdown, let the request in
/// progress finish for a while, then drop it.
async fn connection<E: Endpoint, S>(
    stream: S,
    access: Access,
    endpoint: Arc<E>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let (endpoint, tasks) = (endpoint.clone(), tasks.clone());
        async move { Ok::<_, Infallible>(answer(endpoint, access, tasks, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(DRAIN_TIMEOUT, conn.as_mut())
                .await
                .unwrap_or(Ok(()))
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "admin connection failed");
    }
}

/// Route one request on the blocking pool (the views read the store).
async fn answer<E: Endpoint>(
    endpoint: Arc<E>,
    access: Access,
    tasks: TaskTracker,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let request = Request {
        method: req.method().as_str().to_owned(),
        path: req.uri().path().to_owned(),
        query: form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect(),
    };
    let response = tasks
        .spawn_blocking(move || route(&*endpoint, &request, access))
        .await
        .unwrap_or_else(|e| Response::text(500, format!("admin request failed: {e}")));
    let mut out = hyper::Response::new(Full::new(Bytes::from(response.body)));
    *out.status_mut() = hyper::StatusCode::from_u16(response.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    out.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(response.content_type),
    );
    out
}

/// What a query component keeps as it is: letters, digits and `-_.~/`.
const QUERY_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// Encode a query component (`%XX` for every other byte of its UTF-8).
pub fn percent_encode(s: &str) -> String {
    utf8_percent_encode(s, QUERY_COMPONENT).to_string()
}

/// Where a client asks: the admin socket (every route) or the TCP
/// listener (read-only routes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminTarget {
    Tcp(SocketAddr),
    Socket(PathBuf),
}

impl std::fmt::Display for AdminTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminTarget::Tcp(a) => write!(f, "{a}"),
            AdminTarget::Socket(p) => write!(f, "socket {}", p.display()),
        }
    }
}

impl From<SocketAddr> for AdminTarget {
    fn from(a: SocketAddr) -> Self {
        AdminTarget::Tcp(a)
    }
}

impl From<PathBuf> for AdminTarget {
    fn from(p: PathBuf) -> Self {
        AdminTarget::Socket(p)
    }
}

impl From<&Path> for AdminTarget {
    fn from(p: &Path) -> Self {
        AdminTarget::Socket(p.into())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the admin endpoint at {target}")]
    Connect {
        target: AdminTarget,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin endpoint at {target} did not answer within {seconds} s")]
    Timeout { target: AdminTarget, seconds: u64 },
    #[error("HTTP exchange with the admin endpoint at {target} failed")]
    Http {
        target: AdminTarget,
        #[source]
        source: hyper::Error,
    },
    #[error("admin request {method} {path:?} is malformed")]
    Request {
        method: String,
        path: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("cannot start a runtime for the admin request")]
    Runtime(#[source] std::io::Error),
}

/// One request to an admin endpoint: the status and the body (lossy UTF-8).
pub async fn fetch(
    target: impl Into<AdminTarget>,
    method: &str,
    path_and_query: &str,
) -> Result<(u16, String), ClientError> {
    let target = target.into();
    let host = match &target {
        AdminTarget::Tcp(a) => a.to_string(),
        AdminTarget::Socket(_) => "localhost".to_owned(),
    };
    let request = hyper::Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(HOST, host)
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|source| ClientError::Request {
            method: method.to_owned(),
            path: path_and_query.to_owned(),
            source,
        })?;
    let timeout = |target: &AdminTarget, d: Duration| ClientError::Timeout {
        target: target.clone(),
        seconds: d.as_secs(),
    };
    let connect_err = |target: &AdminTarget, source| ClientError::Connect {
        target: target.clone(),
        source,
    };
    let answer = match &target {
        AdminTarget::Tcp(addr) => {
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                .await
                .map_err(|_| timeout(&target, CONNECT_TIMEOUT))?
                .map_err(|e| connect_err(&target, e))?;
            tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(stream, request)).await
        }
        AdminTarget::Socket(path) => {
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path))
                .await
                .map_err(|_| timeout(&target, CONNECT_TIMEOUT))?
                .map_err(|e| connect_err(&target, e))?;
            tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(stream, request)).await
        }
    };
    answer
        .map_err(|_| timeout(&target, EXCHANGE_TIMEOUT))?
        .map_err(|source| ClientError::Http { target, source })
}

/// Send `request` on `stream` and read the answer.
async fn exchange<S>(
    stream: S,
    request: hyper::Request<Empty<Bytes>>,
) -> Result<(u16, String), hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection is driven here, beside the request, and ends when
    // the server closes it after the answer (`Connection: close`).
    let ask = async {
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?;
        Ok((
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        ))
    };
    let (answer, _closed) = tokio::join!(ask, conn);
    answer
}

/// [`fetch`] for blocking callers (the CLIs; tests from `spawn_blocking`):
/// runs it on a runtime of its own. Not to be called on an async worker.
pub fn request(
    target: impl Into<AdminTarget>,
    method: &str,
    path_and_query: &str,
) -> Result<(u16, String), ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?
        .block_on(fetch(target, method, path_and_query))
}

/// The kind of a metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

/// The `/metrics` body of one scrape, written by the `prometheus` crate
/// (text format 0.0.4): the daemon's families, each with its HELP and TYPE
/// once, then the process's own (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_open_fds`,
/// `process_start_time_seconds`, ..., read from /proc at the scrape).
/// Values come from the status view, which reads counters and marks the
/// daemon keeps as it runs.
#[derive(Default)]
pub struct Metrics {
    registry: prometheus::Registry,
    families: HashMap<&'static str, Family>,
}

enum Family {
    Gauge(prometheus::GaugeVec),
    Counter(prometheus::CounterVec),
}

impl Metrics {
    pub fn gauge(&mut self, name: &'static str, help: &'static str, value: f64) {
        self.sample(name, help, Kind::Gauge, &[], value);
    }

    pub fn counter(&mut self, name: &'static str, help: &'static str, value: f64) {
        self.sample(name, help, Kind::Counter, &[], value);
    }

    /// `<name>{version="..."} 1`: which build answers (`name` ends in
    /// `_build_info`).
    pub fn build_info(&mut self, name: &'static str, help: &'static str) {
        self.sample(
            name,
            help,
            Kind::Gauge,
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
    }

    /// One sample of family `name` with `labels`; the first sample of a
    /// family fixes its kind and label names.
    pub fn sample(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        let names: Vec<&str> = labels.iter().map(|l| l.0).collect();
        let values: Vec<&str> = labels.iter().map(|l| l.1).collect();
        let registry = &self.registry;
        let family = self.families.entry(name).or_insert_with(|| {
            let opts = prometheus::Opts::new(name, help);
            let family = match kind {
                Kind::Gauge => Family::Gauge(
                    prometheus::GaugeVec::new(opts, &names).expect("a valid metric family"),
                ),
                Kind::Counter => Family::Counter(
                    prometheus::CounterVec::new(opts, &names).expect("a valid metric family"),
                ),
            };
            let collector: Box<dyn prometheus::core::Collector> = match &family {
                Family::Gauge(g) => Box::new(g.clone()),
                Family::Counter(c) => Box::new(c.clone()),
            };
            registry
                .register(collector)
                .expect("each family registered once");
            family
        });
        match family {
            Family::Gauge(g) => {
                debug_assert_eq!(kind, Kind::Gauge, "metric {name} changes kind");
                g.with_label_values(&values).set(value);
            }
            // A counter's value is the daemon's running total: a fresh
            // counter raised to it (never by a negative or NaN amount).
            Family::Counter(c) => {
                debug_assert_eq!(kind, Kind::Counter, "metric {name} changes kind");
                if value > 0.0 {
                    c.with_label_values(&values).inc_by(value);
                } else {
                    c.with_label_values(&values);
                }
            }
        }
    }

    pub fn finish(self) -> String {
        let mut families = self.registry.gather();
        let process = prometheus::process_collector::ProcessCollector::for_self();
        families.extend(prometheus::core::Collector::collect(&process));
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_components_round_trip_through_the_server_decoder() {
        for s in [
            "plain",
            "a b&c=d",
            "100% ünïcode",
            "",
            "/tmp/a b&c=d%e/ü.seed",
            "x+y",
        ] {
            let encoded = percent_encode(s);
            assert!(!encoded.contains([' ', '&', '=', '+']), "{encoded}");
            let decoded: Vec<(String, String)> =
                form_urlencoded::parse(format!("k={encoded}").as_bytes())
                    .into_owned()
                    .collect();
            assert_eq!(decoded, vec![("k".to_owned(), s.to_owned())]);
        }
        assert_eq!(percent_encode("/tmp/x.seed"), "/tmp/x.seed");
    }

    #[test]
    fn metrics_are_prometheus_text_with_each_family_in_one_group() {
        let mut m = Metrics::default();
        m.gauge("pgcourier_x", "An x.", 1.5);
        m.sample(
            "pgcourier_y",
            "A y.",
            Kind::Gauge,
            &[("receiver", "b\"1")],
            2.0,
        );
        m.sample(
            "pgcourier_z",
            "A z.",
            Kind::Counter,
            &[("receiver", "b\"1")],
            4.0,
        );
        m.sample(
            "pgcourier_y",
            "A y.",
            Kind::Gauge,
            &[("receiver", "b2")],
            3.0,
        );
        m.gauge("pgcourier_inf", "Infinite.", f64::INFINITY);
        m.build_info("pgcourier_x_build_info", "The build.");
        let text = m.finish();
        for part in [
            "# HELP pgcourier_x An x.\n# TYPE pgcourier_x gauge\npgcourier_x 1.5\n",
            "# HELP pgcourier_y A y.\n# TYPE pgcourier_y gauge\n\
             pgcourier_y{receiver=\"b\\\"1\"} 2\npgcourier_y{receiver=\"b2\"} 3\n",
            "# HELP pgcourier_z A z.\n# TYPE pgcourier_z counter\n\
             pgcourier_z{receiver=\"b\\\"1\"} 4\n",
            "# TYPE pgcourier_inf gauge\npgcourier_inf ",
            &format!(
                "pgcourier_x_build_info{{version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            ),
            // The process's own, from /proc.
            "# TYPE process_cpu_seconds_total counter\n",
            "# TYPE process_resident_memory_bytes gauge\n",
            "# TYPE process_start_time_seconds gauge\n",
        ] {
            assert!(text.contains(part), "{part:?} not in:\n{text}");
        }
        // The crate writes infinity as `inf`, which Prometheus's parser (Go's
        // ParseFloat) reads as +Inf, as Rust's does.
        let inf = text
            .lines()
            .find_map(|l| l.strip_prefix("pgcourier_inf "))
            .expect("the pgcourier_inf sample");
        assert_eq!(inf.parse::<f64>(), Ok(f64::INFINITY));
        for family in ["pgcourier_y", "pgcourier_z", "process_open_fds"] {
            assert_eq!(
                text.matches(&format!("# TYPE {family} ")).count(),
                1,
                "{family} is not one group:\n{text}"
            );
        }
    }

    /// The last `limit` the Echo endpoint's `list` was asked for.
    static ASKED_LIMIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// An endpoint that echoes what it was asked.
    struct Echo;

    impl Endpoint for Echo {
        type Status = &'static str;
        fn status(&self) -> &'static str {
            "fine"
        }
        fn metrics(&self, status: &&'static str) -> String {
            format!("echo_status{{s=\"{status}\"}} 1\n")
        }
        fn health(&self, _: &&'static str) -> Result<(), String> {
            Err("echo is never healthy".into())
        }
        fn list(&self, _: Option<u64>, limit: usize) -> Vec<RecordLine> {
            ASKED_LIMIT.store(limit, std::sync::atomic::Ordering::SeqCst);
            Vec::new()
        }
        fn show(&self, seq: u64, format: &str) -> Response {
            Response::text(200, format!("record {seq} as {format}"))
        }
        fn control(&self, path: &str, query: &HashMap<String, String>) -> Option<Response> {
            (path == "/skip")
                .then(|| Response::text(200, format!("skip {:?}", query.get("reason"))))
        }
    }

    #[tokio::test]
    async fn the_admin_socket_is_private_and_serves_every_route() {
        use std::os::unix::fs::PermissionsExt;
        let token = CancellationToken::new();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("admin").join("sock");
        // A stale socket of an earlier run is replaced.
        std::fs::create_dir(dir.path().join("admin")).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let server = Server::start_socket(&sock, Arc::new(Echo), token.clone())
            .await
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sock), 0o600, "the socket's mode");
        assert_eq!(mode(sock.parent().unwrap()), 0o700, "its directory's mode");
        let addr = sock.clone();
        let ask = |method: &'static str, path: &'static str| fetch(addr.clone(), method, path);
        assert_eq!(
            ask("POST", "/skip?seq=3&reason=a%20b+c").await.unwrap(),
            (200, "skip Some(\"a b c\")".to_owned())
        );
        assert_eq!(
            ask("GET", "/status").await.unwrap(),
            (200, "\"fine\"".to_owned())
        );
        assert_eq!(
            ask("GET", "/metrics").await.unwrap(),
            (200, "echo_status{s=\"fine\"} 1\n".to_owned())
        );
        assert_eq!(ask("GET", "/health").await.unwrap().0, 503);
        assert_eq!(
            ask("GET", "/records/7?format=sql").await.unwrap(),
            (200, "record 7 as sql".to_owned())
        );
        assert_eq!(ask("GET", "/records/x").await.unwrap().0, 400);
        assert_eq!(ask("POST", "/seed").await.unwrap().0, 404);
        assert_eq!(ask("GET", "/nothing").await.unwrap().0, 404);
        // A request head larger than the cap is refused, not buffered.
        let long = format!("/status?pad={}", "x".repeat(MAX_HEAD));
        let (code, _) = fetch(addr.clone(), "GET", &long).await.unwrap();
        assert_eq!(code, 431);
        // The blocking client works from a thread of its own.
        let blocking = addr.clone();
        let (code, body) = tokio::task::spawn_blocking(move || request(blocking, "GET", "/status"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((code, body.as_str()), (200, "\"fine\""));
        // Shutdown ends the accept loop and every connection.
        token.cancel();
        tokio::time::timeout(Duration::from_secs(10), server.stopped())
            .await
            .expect("admin server stops on shutdown");
        assert!(matches!(
            fetch(addr, "GET", "/status").await,
            Err(ClientError::Connect { .. })
        ));
        // Something other than a socket in the way is refused.
        std::fs::write(&sock, "not a socket").unwrap();
        assert!(matches!(
            Server::start_socket(&sock, Arc::new(Echo), CancellationToken::new()).await,
            Err(AdminError::Socket { .. })
        ));
    }

    #[tokio::test]
    async fn a_client_that_sends_no_request_head_is_dropped_after_the_head_timeout() {
        use tokio::io::AsyncReadExt;
        let token = CancellationToken::new();
        let server = Server::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Echo),
            token.clone(),
        )
        .await
        .unwrap();
        let mut idle = TcpStream::connect(server.local_addr()).await.unwrap();
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(HEAD_TIMEOUT * 3, idle.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "the server kept an idle connection open");
        token.cancel();
        server.stopped().await;
    }

    #[test]
    fn records_limit_is_capped() {
        let req = Request {
            method: "GET".into(),
            path: "/records".into(),
            query: [("limit".to_owned(), "1000000000".to_owned())].into(),
        };
        assert_eq!(route(&Echo, &req, Access::Control).status, 200);
        let asked = ASKED_LIMIT.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            asked <= 1000,
            "/records asked the store for {asked} records"
        );
    }

    #[tokio::test]
    async fn connections_are_bounded() {
        let token = CancellationToken::new();
        let server = Server::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Echo),
            token.clone(),
        )
        .await
        .unwrap();
        let addr = server.local_addr();
        // Idle connections that send nothing hold their places until the
        // head timeout.
        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let asked =
            tokio::time::timeout(Duration::from_secs(2), fetch(addr, "GET", "/status")).await;
        assert!(
            asked.is_err(),
            "a request was served beside 200 idle connections: connections are not counted"
        );
        drop(idle);
        let (code, _) = tokio::time::timeout(HEAD_TIMEOUT * 3, fetch(addr, "GET", "/status"))
            .await
            .expect("served once the idle connections are gone")
            .unwrap();
        assert_eq!(code, 200);
        token.cancel();
        server.stopped().await;
    }

    #[tokio::test]
    async fn the_tcp_listener_refuses_control_requests_and_row_data() {
        let token = CancellationToken::new();
        let server = Server::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Echo),
            token.clone(),
        )
        .await
        .unwrap();
        let addr = server.local_addr();
        for (method, path) in [
            ("POST", "/skip?seq=3&reason=x"),
            ("POST", "/seed?out=/tmp/x.seed"),
            ("GET", "/records"),
            ("GET", "/records/7?format=sql"),
        ] {
            let (code, body) = fetch(addr, method, path).await.unwrap();
            assert_eq!(code, 403, "{method} {path} on the TCP listener: {body}");
        }
        for path in ["/status", "/metrics"] {
            assert_eq!(fetch(addr, "GET", path).await.unwrap().0, 200, "{path}");
        }
        token.cancel();
        server.stopped().await;
        // It may bind any address (a Prometheus server elsewhere).
        let token = CancellationToken::new();
        let any = Server::start("0.0.0.0:0".parse().unwrap(), Arc::new(Echo), token.clone())
            .await
            .unwrap();
        token.cancel();
        any.stopped().await;
    }
}
