//! The second transport: TLS 1.3 over one TCP connection, for networks
//! that drop UDP. The same pinned mutual authentication as QUIC (the same
//! rustls configurations, built by [`crate::transport::quic`]), the same
//! frames; the one byte stream carries what QUIC spreads over streams (see
//! [`crate::transport::link`]).
//!
//! A dial goes straight to the peer or through an HTTP proxy (`CONNECT`).
//! Sockets are tuned for long, lossy paths from the same settings as QUIC:
//! keep-alive probes every `keep-alive` once the connection is quiet, and
//! a connection whose probes or data go unanswered for `idle-timeout` is
//! dropped (`TCP_USER_TIMEOUT`), so a dead TCP path is noticed as fast as a
//! dead QUIC one. Nagle is off: frames are written whole, and an `Ack`
//! must not wait.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::transport::peer::PeerAddr;
use crate::transport::quic::SERVER_NAME;
use crate::transport::settings::TransportSettings;
use crate::transport::tls::{fingerprint, Fingerprint};

#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("TCP connection to {addr} failed")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no TCP connection to {addr} within {timeout:?}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("cannot resolve the proxy's address {proxy}")]
    ProxyResolve {
        proxy: String,
        #[source]
        source: std::io::Error,
    },
    #[error("proxy {proxy} refused CONNECT to {target}: {status:?}")]
    ProxyRefused {
        proxy: String,
        target: String,
        status: String,
    },
    #[error("proxy {proxy} failed during CONNECT")]
    Proxy {
        proxy: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no TLS handshake with {addr} within {timeout:?}")]
    HandshakeTimeout { addr: SocketAddr, timeout: Duration },
}

/// Bytes of a connection as they crossed the socket (TLS included).
#[derive(Debug, Default)]
struct Counts {
    tx: AtomicU64,
    rx: AtomicU64,
}

/// A TCP stream that counts what it carried, below TLS: the TCP
/// transport's counterpart of QUIC's UDP byte counts.
pub struct Counted {
    inner: TcpStream,
    counts: Arc<Counts>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.counts.rx.fetch_add(n, Ordering::Relaxed);
        poll
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            self.counts.tx.fetch_add(*n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type Tls = tokio_rustls::TlsStream<Counted>;
pub type TcpRead = tokio::io::ReadHalf<Tls>;
pub type TcpWrite = tokio::io::WriteHalf<Tls>;

/// An established TLS-over-TCP connection with a pinned peer. Cheap to
/// clone; the byte stream's halves are taken once, by the session.
#[derive(Clone)]
pub struct TcpConn {
    inner: Arc<Inner>,
}

struct Inner {
    /// A second descriptor of the socket, for `TCP_INFO` and for
    /// [`TcpConn::close`] from another task (shutdown reaches the halves).
    sock: std::net::TcpStream,
    remote: SocketAddr,
    peer: Option<Fingerprint>,
    counts: Arc<Counts>,
    halves: Mutex<Option<(TcpRead, TcpWrite)>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The socket lives as long as any descriptor of it: end it with the
        // last handle, whoever holds the other descriptor.
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

/// What the kernel knows of a TCP connection's path.
#[derive(Clone, Copy, Debug, Default)]
pub struct PathInfo {
    pub rtt: Duration,
    /// Congestion window in bytes.
    pub cwnd_bytes: u64,
}

impl TcpConn {
    fn new(tls: Tls, sock: std::net::TcpStream, remote: SocketAddr, counts: Arc<Counts>) -> Self {
        let certs = match &tls {
            tokio_rustls::TlsStream::Client(c) => c.get_ref().1.peer_certificates(),
            tokio_rustls::TlsStream::Server(s) => s.get_ref().1.peer_certificates(),
        };
        let peer = certs.and_then(|c| c.first()).map(|c| fingerprint(c));
        let halves = tokio::io::split(tls);
        TcpConn {
            inner: Arc::new(Inner {
                sock,
                remote,
                peer,
                counts,
                halves: Mutex::new(Some(halves)),
            }),
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote
    }

    pub fn peer_fingerprint(&self) -> Option<Fingerprint> {
        self.inner.peer
    }

    /// The byte stream, once: `None` if a session took it already.
    pub fn take_halves(&self) -> Option<(TcpRead, TcpWrite)> {
        self.inner.halves.lock().expect("halves lock").take()
    }

    /// End the connection now, from any task: both halves see its end.
    pub fn close(&self) {
        let _ = self.inner.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Bytes sent and received on the socket (TLS records included).
    pub fn bytes(&self) -> (u64, u64) {
        let c = &self.inner.counts;
        (c.tx.load(Ordering::Relaxed), c.rx.load(Ordering::Relaxed))
    }

    /// The kernel's smoothed RTT and congestion window (`TCP_INFO`).
    pub fn path(&self) -> PathInfo {
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `info`, a
        // plain-data struct of that size; the descriptor is ours.
        let rc = unsafe {
            libc::getsockopt(
                self.inner.sock.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return PathInfo::default();
        }
        PathInfo {
            rtt: Duration::from_micros(u64::from(info.tcpi_rtt)),
            cwnd_bytes: u64::from(info.tcpi_snd_cwnd) * u64::from(info.tcpi_snd_mss),
        }
    }
}

/// Keep-alive, user timeout and no-delay on a new connection, from the
/// QUIC settings they stand in for.
fn tune(stream: &TcpStream, settings: &TransportSettings) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_nodelay(true)?;
    if !settings.keep_alive.is_zero() {
        let every = settings.keep_alive;
        // Probes until the idle timeout is spent (at least three).
        let retries = if settings.idle_timeout.is_zero() {
            3
        } else {
            (settings.idle_timeout.as_secs_f64() / every.as_secs_f64()).ceil() as u32
        };
        let ka = socket2::TcpKeepalive::new()
            .with_time(every)
            .with_interval(every)
            .with_retries(retries.clamp(3, 127));
        sock.set_tcp_keepalive(&ka)?;
    }
    if !settings.idle_timeout.is_zero() {
        sock.set_tcp_user_timeout(Some(settings.idle_timeout))?;
    }
    Ok(())
}

async fn open_tcp(
    to: SocketAddr,
    name: &str,
    timeout: Duration,
    settings: &TransportSettings,
) -> Result<TcpStream, TcpError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(to))
        .await
        .map_err(|_| TcpError::ConnectTimeout {
            addr: name.to_owned(),
            timeout,
        })?
        .map_err(|source| TcpError::Connect {
            addr: name.to_owned(),
            source,
        })?;
    tune(&stream, settings).map_err(|source| TcpError::Connect {
        addr: name.to_owned(),
        source,
    })?;
    Ok(stream)
}

/// Ask an HTTP proxy on `stream` for a tunnel to `target` (host:port).
/// Reads the proxy's answer byte by byte up to its blank line (at most
/// 8 KiB), so nothing of the tunnel is read here.
async fn connect_through(
    stream: &mut TcpStream,
    proxy: &PeerAddr,
    target: &PeerAddr,
) -> Result<(), TcpError> {
    let io_err = |source| TcpError::Proxy {
        proxy: proxy.to_string(),
        source,
    };
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(io_err)?;
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= 8192 {
            return Err(io_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the proxy's answer has no end of header within 8 KiB",
            )));
        }
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await.map_err(io_err)? == 0 {
            return Err(io_err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the proxy closed the connection before answering",
            )));
        }
        head.push(byte[0]);
    }
    let status = String::from_utf8_lossy(&head);
    let status = status.lines().next().unwrap_or_default().trim().to_owned();
    let ok = status.starts_with("HTTP/1.") && status.split_whitespace().nth(1) == Some("200");
    if !ok {
        return Err(TcpError::ProxyRefused {
            proxy: proxy.to_string(),
            target: target.to_string(),
            status,
        });
    }
    Ok(())
}

/// Dial `target` (directly, or through `proxy`, which then resolves the
/// name itself) and run the TLS handshake, all within `timeout`.
pub async fn connect(
    target: &PeerAddr,
    proxy: Option<&PeerAddr>,
    tls: Arc<rustls::ClientConfig>,
    settings: &TransportSettings,
    timeout: Duration,
) -> Result<TcpConn, TcpError> {
    let stream = match proxy {
        None => {
            let to = target.resolve().await.map_err(|source| TcpError::Connect {
                addr: target.to_string(),
                source,
            })?;
            open_tcp(to, &target.to_string(), timeout, settings).await?
        }
        Some(proxy) => {
            let at = proxy
                .resolve()
                .await
                .map_err(|source| TcpError::ProxyResolve {
                    proxy: proxy.to_string(),
                    source,
                })?;
            let mut stream = open_tcp(at, &format!("proxy {proxy}"), timeout, settings).await?;
            tokio::time::timeout(timeout, connect_through(&mut stream, proxy, target))
                .await
                .map_err(|_| TcpError::ConnectTimeout {
                    addr: format!("{target} through proxy {proxy}"),
                    timeout,
                })??;
            stream
        }
    };
    let remote = stream.peer_addr().map_err(|source| TcpError::Connect {
        addr: target.to_string(),
        source,
    })?;
    let name = ServerName::try_from(SERVER_NAME).expect("a valid server name");
    let connector = tokio_rustls::TlsConnector::from(tls);
    secure(stream, remote, timeout, |counted| async move {
        let tls = connector.connect(name, counted).await?;
        Ok(tokio_rustls::TlsStream::Client(tls))
    })
    .await
}

/// Run the server side of the TLS handshake on an accepted connection.
pub async fn accept(
    stream: TcpStream,
    remote: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    settings: &TransportSettings,
    timeout: Duration,
) -> Result<TcpConn, TcpError> {
    tune(&stream, settings).map_err(|source| TcpError::Handshake {
        addr: remote,
        source,
    })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    secure(stream, remote, timeout, |counted| async move {
        let tls = acceptor.accept(counted).await?;
        Ok(tokio_rustls::TlsStream::Server(tls))
    })
    .await
}

/// Run `handshake` (TLS, either side) on a connection within `timeout`,
/// counting the bytes below TLS, and keep a second descriptor of the
/// socket for the connection's path figures and its close.
async fn secure<F, Fut>(
    stream: TcpStream,
    remote: SocketAddr,
    timeout: Duration,
    handshake: F,
) -> Result<TcpConn, TcpError>
where
    F: FnOnce(Counted) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<Tls>>,
{
    let sock = dup(&stream, remote)?;
    let counts = Arc::<Counts>::default();
    let counted = Counted {
        inner: stream,
        counts: counts.clone(),
    };
    let tls = tokio::time::timeout(timeout, handshake(counted))
        .await
        .map_err(|_| TcpError::HandshakeTimeout {
            addr: remote,
            timeout,
        })?
        .map_err(|source| TcpError::Handshake {
            addr: remote,
            source,
        })?;
    Ok(TcpConn::new(tls, sock, remote, counts))
}

/// A second descriptor of `stream`'s socket.
fn dup(stream: &TcpStream, remote: SocketAddr) -> Result<std::net::TcpStream, TcpError> {
    socket2::SockRef::from(stream)
        .try_clone()
        .map(std::net::TcpStream::from)
        .map_err(|source| TcpError::Handshake {
            addr: remote,
            source,
        })
}
