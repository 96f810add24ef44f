//! The daemons' local admin endpoint, the same for both: an HTTP/1.1 server
//! (hyper) on a loopback address serving `/status` (JSON), `/metrics`
//! (Prometheus text), `/health`, the record inspection of `pgcourier-queue`
//! (`/records`, `/records/<seq>`) and the daemon's control requests (POST:
//! the sender's `/seed`, the receiver's `/skip`); and the one-shot client
//! that the queue CLI, `seed export` and the tests use.
//!
//! Who may ask: anyone who can reach the loopback address (the bind refuses
//! any other address). There is no further check of the caller: control
//! requests are open to every local user of the machine.
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
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, HOST};
use hyper_util::rt::{TokioIo, TokioTimer};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::net::{TcpListener, TcpStream};
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

/// The routes both daemons serve.
pub fn route<E: Endpoint + ?Sized>(endpoint: &E, req: &Request) -> Response {
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
    #[error("admin address {0} is not a loopback address: the admin endpoint is local only")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on admin address {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running admin endpoint. Its accept loop, connections and requests are
/// tasks of one tracker; they end when the shutdown token is cancelled
/// (requests in progress get [`DRAIN_TIMEOUT`] to finish).
pub struct Server {
    addr: SocketAddr,
    tasks: TaskTracker,
}

impl Server {
    /// Bind `addr` (loopback only) and serve `endpoint` until `shutdown`.
    pub async fn start<E: Endpoint>(
        addr: SocketAddr,
        endpoint: Arc<E>,
        shutdown: CancellationToken,
    ) -> Result<Server, AdminError> {
        if !addr.ip().is_loopback() {
            return Err(AdminError::NotLoopback(addr));
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| AdminError::Bind { addr, source })?;
        let tasks = TaskTracker::new();
        tasks.spawn(accept(listener, endpoint, shutdown, tasks.clone()));
        tracing::info!(%addr, "admin endpoint listening");
        Ok(Server { addr, tasks })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Wait until the accept loop and every connection have ended (after
    /// the shutdown token is cancelled).
    pub async fn stopped(self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn accept<E: Endpoint>(
    listener: TcpListener,
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
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let conn = connection(stream, endpoint.clone(), shutdown.clone(), tasks.clone());
        tasks.spawn(async move {
            conn.await;
            drop(place);
        });
    }
}

/// Serve one connection (one request); on shutdown, let the request in
/// progress finish for a while, then drop it.
async fn connection<E: Endpoint>(
    stream: TcpStream,
    endpoint: Arc<E>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let service = hyper::service::service_fn(move |req| {
        let (endpoint, tasks) = (endpoint.clone(), tasks.clone());
        async move { Ok::<_, Infallible>(answer(endpoint, tasks, req).await) }
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
        .spawn_blocking(move || route(&*endpoint, &request))
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

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the admin endpoint at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin endpoint at {addr} did not answer within {seconds} s")]
    Timeout { addr: SocketAddr, seconds: u64 },
    #[error("HTTP exchange with the admin endpoint at {addr} failed")]
    Http {
        addr: SocketAddr,
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
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
) -> Result<(u16, String), ClientError> {
    let request = hyper::Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(HOST, addr.to_string())
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|source| ClientError::Request {
            method: method.to_owned(),
            path: path_and_query.to_owned(),
            source,
        })?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| ClientError::Timeout {
            addr,
            seconds: CONNECT_TIMEOUT.as_secs(),
        })?
        .map_err(|source| ClientError::Connect { addr, source })?;
    let http = |source| ClientError::Http { addr, source };
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        // The connection is driven here, beside the request, and ends when
        // the server closes it after the answer (`Connection: close`).
        let ask = async {
            let response = sender.send_request(request).await.map_err(http)?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.map_err(http)?;
            Ok((
                status,
                String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            ))
        };
        let (answer, _closed) = tokio::join!(ask, conn);
        answer
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Timeout {
            addr,
            seconds: EXCHANGE_TIMEOUT.as_secs(),
        })?
}

/// [`fetch`] for blocking callers (the CLIs; tests from `spawn_blocking`):
/// runs it on a runtime of its own. Not to be called on an async worker.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
) -> Result<(u16, String), ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?
        .block_on(fetch(addr, method, path_and_query))
}

/// The kind of a metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

/// Prometheus text format (0.0.4) writer: samples are kept by family, so
/// each family is written once, as one group, with its HELP and TYPE lines
/// (the format requires it), in the order families were first seen.
#[derive(Default)]
pub struct Metrics {
    families: Vec<Family>,
    index: HashMap<&'static str, usize>,
}

struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: String,
}

impl Metrics {
    pub fn gauge(&mut self, name: &'static str, help: &'static str, value: f64) {
        self.sample(name, help, Kind::Gauge, &[], value);
    }

    pub fn counter(&mut self, name: &'static str, help: &'static str, value: f64) {
        self.sample(name, help, Kind::Counter, &[], value);
    }

    /// One sample of family `name` with `labels` (values escaped here).
    pub fn sample(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        use std::fmt::Write;
        let index = *self.index.entry(name).or_insert_with(|| {
            self.families.push(Family {
                name,
                help,
                kind,
                samples: String::new(),
            });
            self.families.len() - 1
        });
        let family = &mut self.families[index];
        debug_assert_eq!(family.kind, kind, "metric {name} changes kind");
        let out = &mut family.samples;
        out.push_str(name);
        for (i, (k, v)) in labels.iter().enumerate() {
            out.push(if i == 0 { '{' } else { ',' });
            let _ = write!(
                out,
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            );
        }
        if !labels.is_empty() {
            out.push('}');
        }
        let _ = match value {
            v if v == f64::INFINITY => writeln!(out, " +Inf"),
            v if v == f64::NEG_INFINITY => writeln!(out, " -Inf"),
            v => writeln!(out, " {v}"),
        };
    }

    pub fn finish(self) -> String {
        let mut text = String::new();
        for f in self.families {
            let kind = match f.kind {
                Kind::Gauge => "gauge",
                Kind::Counter => "counter",
            };
            text.push_str(&format!(
                "# HELP {0} {1}\n# TYPE {0} {kind}\n",
                f.name, f.help
            ));
            text.push_str(&f.samples);
        }
        text
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
        let text = m.finish();
        assert_eq!(
            text,
            "# HELP pgcourier_x An x.\n# TYPE pgcourier_x gauge\npgcourier_x 1.5\n\
             # HELP pgcourier_y A y.\n# TYPE pgcourier_y gauge\n\
             pgcourier_y{receiver=\"b\\\"1\"} 2\npgcourier_y{receiver=\"b2\"} 3\n\
             # HELP pgcourier_z A z.\n# TYPE pgcourier_z counter\n\
             pgcourier_z{receiver=\"b\\\"1\"} 4\n\
             # HELP pgcourier_inf Infinite.\n# TYPE pgcourier_inf gauge\npgcourier_inf +Inf\n"
        );
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
    async fn admin_endpoint_refuses_non_loopback_and_serves_the_common_routes() {
        let token = CancellationToken::new();
        assert!(matches!(
            Server::start("0.0.0.0:0".parse().unwrap(), Arc::new(Echo), token.clone()).await,
            Err(AdminError::NotLoopback(_))
        ));
        let server = Server::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Echo),
            token.clone(),
        )
        .await
        .unwrap();
        let addr = server.local_addr();
        let ask = |method: &'static str, path: &'static str| fetch(addr, method, path);
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
        let (code, _) = fetch(addr, "GET", &long).await.unwrap();
        assert_eq!(code, 431);
        // The blocking client works from a thread of its own.
        let (code, body) = tokio::task::spawn_blocking(move || request(addr, "GET", "/status"))
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
        assert_eq!(route(&Echo, &req).status, 200);
        let asked = ASKED_LIMIT.load(std::sync::atomic::Ordering::SeqCst);
        assert!(asked <= 1000, "/records asked the store for {asked} records");
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
        let asked = tokio::time::timeout(Duration::from_secs(2), fetch(addr, "GET", "/status")).await;
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
}
