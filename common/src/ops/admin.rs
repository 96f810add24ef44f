//! The daemons' local admin endpoint: a minimal HTTP/1.1 server on a
//! loopback address serving `/metrics` (Prometheus text format), `/health`,
//! `/status` (JSON) and the queue inspection requests of `pgcourier-queue`.
//!
//! Requests are small and rare (an operator, a scraper), so each connection
//! handles one request and closes; request heads are capped at 8 KiB.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const MAX_HEAD: usize = 8 * 1024;

/// One parsed request.
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

/// Bind the admin endpoint; refuse anything but loopback.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    if !addr.ip().is_loopback() {
        return Err(AdminError::NotLoopback(addr));
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Serve requests with `handler` until `shutdown`.
pub async fn serve<H, F>(listener: TcpListener, handler: Arc<H>, shutdown: CancellationToken)
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    loop {
        let (mut stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let response = match read_request(&mut stream).await {
                Ok(req) => handler(req).await,
                Err(msg) => Response::text(400, msg),
            };
            let reason = match response.status {
                200 => "OK",
                400 => "Bad Request",
                404 => "Not Found",
                409 => "Conflict",
                503 => "Service Unavailable",
                _ => "Status",
            };
            let head = format!(
                "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                response.status,
                response.content_type,
                response.body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(response.body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Result<Request, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .map_err(|_| "request head not received in time".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if buf.len() > MAX_HEAD {
            return Err("request head too large".into());
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().next().ok_or("empty request")?;
    let mut parts = line.split_whitespace();
    let method = parts.next().ok_or("no method")?.to_owned();
    let target = parts.next().ok_or("no path")?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Ok(Request {
        method,
        path: path.to_owned(),
        query,
    })
}

/// Decode `%XX` escapes and `+` in a query component.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'%' => bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok()),
            _ => None,
        };
        match (bytes[i], decoded) {
            (_, Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (b, None) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encode a query component.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A blocking one-shot HTTP GET or POST against an admin endpoint (for the
/// CLI). Returns the status and body.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// Prometheus text-format writer.
#[derive(Default)]
pub struct Metrics {
    out: String,
}

impl Metrics {
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.metric(name, help, "gauge", &[], value);
    }

    pub fn counter(&mut self, name: &str, help: &str, value: f64) {
        self.metric(name, help, "counter", &[], value);
    }

    pub fn metric(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        if !self.out.contains(&format!("# TYPE {name} ")) {
            self.out
                .push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        }
        let labels = if labels.is_empty() {
            String::new()
        } else {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k}=\"{}\"",
                        v.replace('\\', "\\\\")
                            .replace('"', "\\\"")
                            .replace('\n', "\\n")
                    )
                })
                .collect();
            format!("{{{}}}", l.join(","))
        };
        self.out.push_str(&format!("{name}{labels} {value}\n"));
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_components_round_trip() {
        for s in ["plain", "a b&c=d", "100% ünïcode", ""] {
            assert_eq!(percent_decode(&percent_encode(s)), s);
        }
        assert_eq!(percent_decode("a+b%2"), "a b%2");
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let mut m = Metrics::default();
        m.gauge("pgcourier_x", "An x.", 1.5);
        m.metric("pgcourier_y", "A y.", "gauge", &[("receiver", "b\"1")], 2.0);
        m.metric("pgcourier_y", "A y.", "gauge", &[("receiver", "b2")], 3.0);
        let text = m.finish();
        assert_eq!(text.matches("# TYPE pgcourier_y gauge").count(), 1);
        assert!(text.contains("pgcourier_y{receiver=\"b\\\"1\"} 2\n"));
        assert!(text.contains("pgcourier_x 1.5\n"));
    }

    #[tokio::test]
    async fn admin_endpoint_refuses_non_loopback_and_answers_requests() {
        assert!(matches!(
            bind("0.0.0.0:0".parse().unwrap()).await,
            Err(AdminError::NotLoopback(_))
        ));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let handler = Arc::new(|req: Request| async move {
            Response::text(
                200,
                format!("{} {} {:?}", req.method, req.path, req.query.get("reason")),
            )
        });
        tokio::spawn(serve(listener, handler, token.clone()));
        let (status, body) =
            tokio::task::spawn_blocking(move || request(addr, "POST", "/skip?reason=a%20b"))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, "POST /skip Some(\"a b\")");
        token.cancel();
    }
}
