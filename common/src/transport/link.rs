//! The link between two daemons, whichever transport carries it: QUIC
//! (UDP) or TLS over TCP, with the same pinned certificates and the same
//! frames.
//!
//! - [`Net`]: a daemon's sockets: the QUIC endpoint, and where the daemon
//!   listens, a TCP listener on the same port number; [`Net::accept`] takes
//!   connections from both.
//! - [`Dialer`]: dials one peer by its `transport` setting. Under `auto`
//!   (the default) it decides by real handshakes, never by a probe: a QUIC
//!   dial that completes no handshake within `handshake-timeout` is
//!   followed by a TCP dial, and when that one completes the dialler has
//!   fallen back (said once, shown in status); it then dials TCP first, and
//!   [`Dialer::quic_returns`] tries a QUIC handshake every `quic-retry`
//!   until one completes, when the session moves back.
//! - [`Conn`]: an established connection and its streams. QUIC carries the
//!   control frames on a bidirectional stream the receiver opens and the
//!   batches on a unidirectional stream the sender opens; TCP carries both
//!   directions on its one byte stream, in the same order: the sender's
//!   `Welcome` (or refusal) and then its batches, the receiver's `Hello`
//!   and then its `Ack`s and `Applied`s.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::transport::peer::PeerAddr;
use crate::transport::quic::{self, SERVER_NAME};
use crate::transport::settings::TransportSettings;
use crate::transport::tcp::{self, TcpConn, TcpError};
use crate::transport::tls::{Fingerprint, Identity, TlsError};

/// Which transport a dialler uses (`transport` of a peer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QUIC, falling back to TCP when no QUIC handshake completes.
    #[default]
    Auto,
    Quic,
    Tcp,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Auto => "auto",
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connection failed")]
    Quic(#[from] quinn::ConnectionError),
    #[error("connection failed")]
    Tcp(#[source] std::io::Error),
    #[error("the connection's stream was taken by another session")]
    Taken,
}

impl LinkError {
    /// The peer closed the connection on purpose (stopping, superseded).
    pub fn is_clean_close(&self) -> bool {
        matches!(
            self,
            LinkError::Quic(quinn::ConnectionError::ApplicationClosed(_))
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot resolve the peer's address")]
    Resolve(#[source] std::io::Error),
    #[error("cannot start a QUIC connection")]
    QuicStart(#[from] quinn::ConnectError),
    #[error("QUIC connection failed")]
    Quic(#[from] quinn::ConnectionError),
    #[error("no QUIC handshake within {0:?}")]
    QuicTimeout(Duration),
    #[error(transparent)]
    Tcp(#[from] TcpError),
    #[error("no QUIC handshake within {timeout:?}, and TCP failed too")]
    Neither {
        timeout: Duration,
        #[source]
        tcp: TcpError,
    },
}

/// Write half of a stream (boxed: QUIC stream or TCP half).
pub type SendHalf = Box<dyn AsyncWrite + Send + Unpin>;
/// Read half of a stream.
pub type RecvHalf = Box<dyn AsyncRead + Send + Unpin>;

/// A stream that keeps another one open as long as it lives: QUIC's data
/// stream keeps the control stream of its direction open beside it.
struct Along<S, K> {
    stream: S,
    _keep: K,
}

impl<S: AsyncRead + Unpin, K: Unpin> AsyncRead for Along<S, K> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, K: Unpin> AsyncWrite for Along<S, K> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// An established connection with a peer whose certificate passed the
/// pinned verification (which peer it is, the caller checks).
#[derive(Clone)]
pub enum Conn {
    Quic(quinn::Connection),
    Tcp(TcpConn),
}

impl Conn {
    /// "quic" or "tcp", for logs and status.
    pub fn transport(&self) -> &'static str {
        match self {
            Conn::Quic(_) => "quic",
            Conn::Tcp(_) => "tcp",
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Conn::Quic(c) => c.remote_address(),
            Conn::Tcp(c) => c.remote_address(),
        }
    }

    pub fn peer_fingerprint(&self) -> Option<Fingerprint> {
        match self {
            Conn::Quic(c) => quic::peer_fingerprint(c),
            Conn::Tcp(c) => c.peer_fingerprint(),
        }
    }

    /// The smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        match self {
            Conn::Quic(c) => c.rtt(),
            Conn::Tcp(c) => c.path().rtt,
        }
    }

    /// What the path carries now, bytes per second: the congestion window
    /// per round trip.
    pub fn rate_estimate(&self) -> f64 {
        let (cwnd, rtt) = match self {
            Conn::Quic(c) => (c.stats().path.cwnd, c.rtt()),
            Conn::Tcp(c) => {
                let p = c.path();
                (p.cwnd_bytes, p.rtt)
            }
        };
        cwnd as f64 / rtt.as_secs_f64().max(0.001)
    }

    /// Bytes sent and received on the wire so far: UDP payloads for QUIC,
    /// the TCP stream for TCP (TLS, headers and acknowledgements included
    /// as far as each transport counts them).
    pub fn wire_bytes(&self) -> (u64, u64) {
        match self {
            Conn::Quic(c) => {
                let s = c.stats();
                (s.udp_tx.bytes, s.udp_rx.bytes)
            }
            Conn::Tcp(c) => c.bytes(),
        }
    }

    /// Close now, from any task. QUIC tells the peer `code` and `reason`;
    /// TCP ends the byte stream (a refusal the peer must read is sent as a
    /// frame before).
    pub fn close(&self, code: u32, reason: &[u8]) {
        match self {
            Conn::Quic(c) => c.close(code.into(), reason),
            Conn::Tcp(c) => c.close(),
        }
    }

    /// Wait until the peer has closed the connection (after it read a
    /// refusal): on TCP, until the end of `control_rx`.
    pub async fn closed_by_peer(&self, control_rx: &mut RecvHalf) {
        match self {
            Conn::Quic(c) => {
                c.closed().await;
            }
            Conn::Tcp(_) => {
                let mut buf = [0u8; 512];
                while matches!(control_rx.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        }
    }

    /// The sender's side: the control stream the receiver opens.
    pub async fn accept_control(&self) -> Result<(SendHalf, RecvHalf), LinkError> {
        self.control(false).await
    }

    /// The receiver's side: open the control stream.
    pub async fn open_control(&self) -> Result<(SendHalf, RecvHalf), LinkError> {
        self.control(true).await
    }

    /// The control stream, opened by this side (`open`) or by the peer.
    /// Over TCP it is the connection's one byte stream either way.
    async fn control(&self, open: bool) -> Result<(SendHalf, RecvHalf), LinkError> {
        match self {
            Conn::Quic(c) => {
                let (tx, rx) = if open {
                    c.open_bi().await?
                } else {
                    c.accept_bi().await?
                };
                Ok((Box::new(tx), Box::new(rx)))
            }
            Conn::Tcp(c) => {
                let (rx, tx) = c.take_halves().ok_or(LinkError::Taken)?;
                Ok((Box::new(tx), Box::new(rx)))
            }
        }
    }

    /// The sender's side, once welcomed: where batches go. The control
    /// stream's write half stays open along with it.
    pub async fn open_data(&self, control_tx: SendHalf) -> Result<SendHalf, LinkError> {
        match self {
            Conn::Quic(c) => Ok(Box::new(Along {
                stream: c.open_uni().await?,
                _keep: control_tx,
            })),
            Conn::Tcp(_) => Ok(control_tx),
        }
    }

    /// The receiver's side, once welcomed: where batches come from. The
    /// control stream's read half stays open along with it.
    pub async fn accept_data(&self, control_rx: RecvHalf) -> Result<RecvHalf, LinkError> {
        match self {
            Conn::Quic(c) => Ok(Box::new(Along {
                stream: c.accept_uni().await?,
                _keep: control_rx,
            })),
            Conn::Tcp(_) => Ok(control_rx),
        }
    }
}

/// A connection arriving at a listening daemon, before its handshake.
pub enum Incoming {
    Quic(quinn::Incoming),
    Tcp {
        stream: tokio::net::TcpStream,
        remote: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        settings: TransportSettings,
    },
}

impl Incoming {
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Incoming::Quic(i) => i.remote_address(),
            Incoming::Tcp { remote, .. } => *remote,
        }
    }

    /// Run the handshake (the pinned verification refuses a stranger).
    pub async fn establish(self) -> Result<Conn, Box<dyn std::error::Error + Send + Sync>> {
        match self {
            Incoming::Quic(i) => Ok(Conn::Quic(i.await?)),
            Incoming::Tcp {
                stream,
                remote,
                tls,
                settings,
            } => Ok(Conn::Tcp(
                tcp::accept(stream, remote, tls, &settings, settings.handshake_timeout).await?,
            )),
        }
    }
}

/// A daemon's sockets: its QUIC endpoint (it dials from it, and accepts on
/// it when it listens) and, when it listens, a TCP listener on the same
/// port number.
pub struct Net {
    pub quic: quinn::Endpoint,
    tcp: Option<tokio::net::TcpListener>,
    client_tls: Arc<rustls::ClientConfig>,
    server_tls: Arc<rustls::ServerConfig>,
    settings: TransportSettings,
}

impl Net {
    /// Bind `bind` (UDP, and TCP too when `listen`) with `identity`,
    /// accepting only peers whose certificate is in `pinned`.
    pub fn open(
        bind: SocketAddr,
        identity: &Identity,
        pinned: &[Fingerprint],
        settings: &TransportSettings,
        listen: bool,
    ) -> Result<Net, TlsError> {
        let client_tls = Arc::new(quic::client_crypto(identity, pinned)?);
        let server_tls = Arc::new(quic::server_crypto(identity, pinned)?);
        let quic = quic::endpoint_with(
            bind,
            identity,
            pinned,
            settings,
            listen,
            &client_tls,
            &server_tls,
        )?;
        let tcp = if listen {
            // The same port number as the UDP socket (which may have been
            // chosen by the system).
            let at = quic
                .local_addr()
                .map_err(|source| TlsError::Bind { addr: bind, source })?;
            let listener = std::net::TcpListener::bind(at)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|source| TlsError::BindTcp { addr: at, source })?;
            Some(listener)
        } else {
            None
        };
        Ok(Net {
            quic,
            tcp,
            client_tls,
            server_tls,
            settings: settings.clone(),
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.quic.local_addr().ok()
    }

    pub fn settings(&self) -> &TransportSettings {
        &self.settings
    }

    /// The next connection arriving over either transport; `None` once the
    /// QUIC endpoint is closed.
    pub async fn accept(&self) -> Option<Incoming> {
        loop {
            let tcp = async {
                match &self.tcp {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                i = self.quic.accept() => return i.map(Incoming::Quic),
                t = tcp => match t {
                    Ok((stream, remote)) => {
                        return Some(Incoming::Tcp {
                            stream,
                            remote,
                            tls: self.server_tls.clone(),
                            settings: self.settings.clone(),
                        })
                    }
                    Err(e) => {
                        // Out of descriptors, or a connection reset before
                        // it was accepted: the listener itself stays good.
                        tracing::debug!(error = %e, "TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }

    /// Close the QUIC endpoint (telling peers `reason`) and let the close
    /// reach them, at most a second.
    pub async fn close(&self, reason: &[u8]) {
        self.quic.close(0u32.into(), reason);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.quic.wait_idle()).await;
    }
}

/// What status shows of a link's transport, on either daemon.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TransportStatus {
    /// The transport of the current connection: "quic" or "tcp".
    #[serde(rename = "transport", skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// `transport = "auto"` found no QUIC handshake completing but TCP
    /// working: the peer is dialled over TCP, and QUIC is tried again
    /// every `quic-retry`.
    #[serde(default)]
    pub fell_back_to_tcp: bool,
    /// Times the dialler fell back to TCP since the start.
    #[serde(default)]
    pub tcp_fallbacks: u64,
}

impl TransportStatus {
    /// After a dial by `dialer`, which had or had not fallen back before it.
    pub fn dialled(&mut self, had_fallen_back: bool, dialer: &Dialer) {
        if dialer.fell_back() && !had_fallen_back {
            self.tcp_fallbacks += 1;
        }
        self.fell_back_to_tcp = dialer.fell_back();
    }
}

/// How often [`Dialer::until_reachable`] knocks while the dial loop backs
/// off.
pub const REACHABLE_EVERY: Duration = Duration::from_secs(1);

/// How often the knocks look a peer's name up again (a dial always does).
const RESOLVE_KNOCKS_EVERY: Duration = Duration::from_secs(30);

/// Whether a listener at `to` takes a TCP connection and holds it (waiting
/// for a TLS handshake, as ours do): something on the path that accepts
/// and closes at once (a tunnel or forwarder whose far end is down) is not
/// the peer.
async fn knock(to: SocketAddr) -> bool {
    use tokio::io::AsyncReadExt as _;
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(REACHABLE_EVERY, tokio::net::TcpStream::connect(to)).await
    else {
        return false;
    };
    let mut byte = [0u8; 1];
    // Closed or reset within the moment: not held; a byte: not ours.
    tokio::time::timeout(REACHABLE_EVERY / 4, stream.read(&mut byte))
        .await
        .is_err()
}

/// One short dial attempt while a peer is expected back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// How long the attempt may take: a few round trips of the path as it
    /// was, at least 500 ms, at most `handshake-timeout`. An attempt that
    /// fails sooner (refused at once) waits out the rest, so attempts come
    /// at most once per bound.
    pub bound: Duration,
}

/// When to dial again after a session ends: the decision of the dial
/// loops, kept apart from them to be tested in virtual time.
///
/// A link that carried a session and dropped (a receiver restarting, a
/// link going down for a while) is expected back: for `return-window`
/// after the drop the dialler tries back to back, each try bounded by
/// four round trips (a QUIC client sends its Initial at once, then at
/// most once more within the bound; under `auto` a TCP try follows a QUIC
/// one that got no answer, so a link that came back without UDP is found
/// too), so the peer is found within about a bound of becoming reachable
/// instead of at the next backoff step. After
/// the window, and for a peer never reached, the dial loop's exponential
/// backoff (up to `max-backoff`) applies.
#[derive(Debug)]
pub struct Redial {
    window: Duration,
    handshake: Duration,
    expected: Option<(std::time::Instant, Probe)>,
}

impl Redial {
    pub fn new(settings: &TransportSettings) -> Redial {
        Redial {
            window: settings.return_window,
            handshake: settings.handshake_timeout,
            expected: None,
        }
    }

    /// A welcomed session on a connection with this RTT ended at `now`:
    /// the peer is expected back for a window from now.
    pub fn dropped(&mut self, now: std::time::Instant, rtt: Duration) {
        if self.window.is_zero() {
            return;
        }
        let floor = Duration::from_millis(500).min(self.handshake);
        let bound = (rtt * 4).clamp(floor, self.handshake);
        self.expected = Some((now + self.window, Probe { bound }));
    }

    /// How long to wait before the next try while the peer is expected
    /// back: nothing after the drop, else the rest of the last probe's
    /// bound (`tried`, begun at `started`), so tries come at most once per
    /// bound. `None` after the window: the caller backs off.
    pub fn wait(
        &self,
        now: std::time::Instant,
        tried: Option<Probe>,
        started: std::time::Instant,
    ) -> Option<Duration> {
        self.next(now)?;
        Some(tried.map_or(Duration::ZERO, |p| {
            p.bound
                .saturating_sub(now.saturating_duration_since(started))
        }))
    }

    /// The next attempt: a probe while the peer is expected back, `None`
    /// after the window (an ordinary dial, then backoff).
    pub fn next(&self, now: std::time::Instant) -> Option<Probe> {
        match self.expected {
            Some((until, probe)) if now < until => Some(probe),
            _ => None,
        }
    }
}

/// Dials one peer by its `transport` setting; remembers whether it fell
/// back to TCP.
pub struct Dialer {
    net: Arc<Net>,
    peer: PeerAddr,
    transport: Transport,
    proxy: Option<PeerAddr>,
    /// Set while `auto` finds only TCP handshakes completing.
    fell_back: AtomicBool,
    /// What the log lines call the peer ("receiver branch1").
    who: String,
}

impl Dialer {
    pub fn new(
        net: Arc<Net>,
        who: String,
        peer: PeerAddr,
        transport: Transport,
        proxy: Option<PeerAddr>,
    ) -> Dialer {
        Dialer {
            net,
            peer,
            transport,
            proxy,
            fell_back: AtomicBool::new(false),
            who,
        }
    }

    /// `auto` that fell back: it dials TCP first, and tries QUIC again in
    /// the background ([`Dialer::quic_returns`]).
    pub fn fell_back(&self) -> bool {
        self.fell_back.load(Ordering::Relaxed)
    }

    fn set_fell_back(&self, now: bool) {
        let before = self.fell_back.swap(now, Ordering::Relaxed);
        let s = &self.net.settings;
        match (before, now) {
            (false, true) => tracing::warn!(
                peer = %self.who, address = %self.peer,
                "no QUIC handshake within {:?} but TCP works: falling back to TLS over TCP; QUIC is tried again every {:?}",
                s.handshake_timeout, s.quic_retry
            ),
            (true, false) => {
                tracing::info!(peer = %self.who, address = %self.peer, "QUIC handshakes complete again: moving back to QUIC")
            }
            _ => {}
        }
    }

    async fn quic(&self, bound: Option<Duration>) -> Result<Conn, DialError> {
        let to = self.peer.resolve().await.map_err(DialError::Resolve)?;
        let connecting = self.net.quic.connect(to, SERVER_NAME)?;
        let conn = match bound {
            None => connecting.await?,
            Some(t) => tokio::time::timeout(t, connecting)
                .await
                .map_err(|_| DialError::QuicTimeout(t))??,
        };
        Ok(Conn::Quic(conn))
    }

    async fn tcp(&self, bound: Duration) -> Result<Conn, TcpError> {
        Ok(Conn::Tcp(
            tcp::connect(
                &self.peer,
                self.proxy.as_ref(),
                self.net.client_tls.clone(),
                &self.net.settings,
                bound,
            )
            .await?,
        ))
    }

    /// One dial by the `transport` setting. Under `auto`, a QUIC dial that
    /// completes no handshake within `handshake-timeout` is followed by a
    /// TCP dial; a QUIC dial the peer answers with an error (a refused
    /// certificate) is that error: UDP works. Through a `proxy` only TCP
    /// is possible.
    pub async fn dial(&self) -> Result<Conn, DialError> {
        self.dial_within(self.net.settings.handshake_timeout).await
    }

    /// Returns once the peer's port accepts a TCP connection and holds it
    /// (a listener takes TCP on its UDP port number, whatever its
    /// transport), knocking every [`REACHABLE_EVERY`]: while the dial loop
    /// backs off from a peer gone longer than `return-window`, this finds
    /// it within about a second of it coming back, at the cost of a TCP
    /// SYN a second (a QUIC dial costs a padded 1,200-byte Initial and its
    /// resends). The connection is closed at once, before any TLS. A peer
    /// by name is looked up again every 30 s while
    /// knocking (not at every knock). `first_counts`: an answer to the first knock ends the wait (the
    /// peer came back during the dial that failed); otherwise only an
    /// answer after a knock that got none does, so a peer reachable but
    /// refusing sessions (the last wait ended by a knock, and the dial
    /// still failed) is left to the backoff. Never returns through a
    /// `proxy` (the proxy answers, not the peer).
    pub async fn until_reachable(&self, first_counts: bool) {
        if self.proxy.is_none() {
            let mut first = !first_counts;
            // A name is looked up again now and then, not at every knock.
            let mut resolved: Option<(SocketAddr, tokio::time::Instant)> = None;
            loop {
                let knocked = tokio::time::Instant::now();
                if resolved.map_or(true, |(_, at)| knocked - at >= RESOLVE_KNOCKS_EVERY) {
                    resolved = self.peer.resolve().await.ok().map(|to| (to, knocked));
                }
                let up = match resolved {
                    Some((to, _)) => knock(to).await,
                    None => false,
                };
                match (up, first) {
                    (true, true) => break,
                    (true, false) => {
                        tracing::info!(peer = %self.who, address = %self.peer, "the peer answers again: dialing now");
                        return;
                    }
                    (false, _) => first = false,
                }
                tokio::time::sleep_until(knocked + REACHABLE_EVERY).await;
            }
        }
        std::future::pending().await
    }

    /// A dial while the peer is expected back (see [`Redial`]): the same
    /// rule as [`Dialer::dial`], each handshake bounded by `probe.bound`.
    pub async fn probe(&self, probe: Probe) -> Result<Conn, DialError> {
        self.dial_within(probe.bound).await
    }

    async fn dial_within(&self, bound: Duration) -> Result<Conn, DialError> {
        match self.transport {
            Transport::Quic => self.quic(Some(bound)).await,
            Transport::Tcp => Ok(self.tcp(bound).await?),
            Transport::Auto if self.proxy.is_some() => Ok(self.tcp(bound).await?),
            Transport::Auto if self.fell_back() => match self.tcp(bound).await {
                Ok(c) => Ok(c),
                // TCP gone: perhaps UDP is back.
                Err(tcp) => match self.quic(Some(bound)).await {
                    Ok(c) => {
                        self.set_fell_back(false);
                        Ok(c)
                    }
                    Err(_) => Err(tcp.into()),
                },
            },
            Transport::Auto => match self.quic(Some(bound)).await {
                Err(DialError::QuicTimeout(_)) => match self.tcp(bound).await {
                    Ok(c) => {
                        self.set_fell_back(true);
                        Ok(c)
                    }
                    Err(tcp) => Err(DialError::Neither {
                        timeout: bound,
                        tcp,
                    }),
                },
                other => other,
            },
        }
    }

    /// While a fallen-back dialler's session runs over TCP: try a QUIC
    /// handshake every `quic-retry`, and return the first connection that
    /// completes one (the caller moves its session to it). Pending for
    /// ever when the dialler has not fallen back.
    pub async fn quic_returns(&self) -> Conn {
        if !self.fell_back() {
            return std::future::pending().await;
        }
        let s = &self.net.settings;
        loop {
            tokio::time::sleep(s.quic_retry).await;
            if let Ok(conn) = self.quic(Some(s.handshake_timeout)).await {
                self.set_fell_back(false);
                return conn;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use pgcourier_proto::frame::Frame;
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::transport::framed::{read_frame, write_frame};
    use crate::transport::tls::generate_identity;
    use crate::transport::tls::test_support::capture_warnings;

    const LIMIT: Duration = Duration::from_secs(30);

    fn identity(name: &str) -> Identity {
        generate_identity(name, |_| {}).unwrap()
    }

    fn quick() -> TransportSettings {
        TransportSettings {
            handshake_timeout: Duration::from_millis(500),
            quic_retry: Duration::from_millis(200),
            ..TransportSettings::default()
        }
    }

    fn localhost() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn dialer(net: Net, to: SocketAddr, transport: Transport, proxy: Option<SocketAddr>) -> Dialer {
        Dialer::new(
            Arc::new(net),
            "test peer".into(),
            PeerAddr::Ip(to),
            transport,
            proxy.map(PeerAddr::Ip),
        )
    }

    /// The sender's half of a session in miniature: control stream from the
    /// peer, a `Welcome`-like frame back, then "batches" on the data stream,
    /// and the peer's acknowledgements.
    async fn serve_one(conn: Conn) -> Vec<Frame> {
        let (mut tx, mut rx) = conn.accept_control().await.unwrap();
        let hello = read_frame(&mut rx).await.unwrap().unwrap();
        write_frame(&mut tx, &Frame::Ack { durable_seq: 1 })
            .await
            .unwrap();
        let mut data = conn.open_data(tx).await.unwrap();
        for seq in 2..5 {
            write_frame(&mut data, &Frame::Ack { durable_seq: seq })
                .await
                .unwrap();
        }
        data.flush().await.unwrap();
        let mut got = vec![hello];
        for _ in 2..5 {
            got.push(read_frame(&mut rx).await.unwrap().unwrap());
        }
        got
    }

    /// The receiver's half: `Hello`, the answer, then the data stream, each
    /// frame acknowledged on the control stream.
    async fn receive_one(conn: &Conn) -> Vec<Frame> {
        let (mut tx, mut rx) = conn.open_control().await.unwrap();
        write_frame(&mut tx, &Frame::Ack { durable_seq: 0 })
            .await
            .unwrap();
        let mut got = vec![read_frame(&mut rx).await.unwrap().unwrap()];
        let mut data = conn.accept_data(rx).await.unwrap();
        for _ in 2..5 {
            let f = read_frame(&mut data).await.unwrap().unwrap();
            write_frame(&mut tx, &f).await.unwrap();
            got.push(f);
        }
        got
    }

    fn acks(seqs: std::ops::Range<u64>) -> Vec<Frame> {
        seqs.map(|durable_seq| Frame::Ack { durable_seq }).collect()
    }

    #[test]
    fn a_dropped_link_is_probed_within_a_few_round_trips_for_the_return_window_only() {
        let settings = TransportSettings {
            handshake_timeout: Duration::from_secs(5),
            return_window: Duration::from_secs(60),
            ..TransportSettings::default()
        };
        let t0 = std::time::Instant::now();
        let mut redial = Redial::new(&settings);
        assert_eq!(
            redial.next(t0),
            None,
            "a peer never reached: ordinary dials"
        );
        // 1 Mbit/s, 200 ms RTT: probes bounded by 800 ms.
        redial.dropped(t0, Duration::from_millis(200));
        let probe = Probe {
            bound: Duration::from_millis(800),
        };
        assert_eq!(redial.next(t0), Some(probe));
        assert_eq!(redial.next(t0 + Duration::from_secs(59)), Some(probe));
        assert_eq!(
            redial.next(t0 + Duration::from_secs(60)),
            None,
            "then backoff"
        );
        // Right after the drop: at once; after a probe refused in 100 ms:
        // the rest of its bound; after the window: the caller's backoff.
        assert_eq!(redial.wait(t0, None, t0), Some(Duration::ZERO));
        let t = t0 + Duration::from_millis(100);
        assert_eq!(
            redial.wait(t, Some(probe), t0),
            Some(Duration::from_millis(700))
        );
        let t = t0 + Duration::from_secs(61);
        assert_eq!(redial.wait(t, Some(probe), t0), None);
        // Loopback: at least 500 ms; satellite with 2 s RTT: at most the
        // handshake timeout.
        redial.dropped(t0, Duration::from_micros(50));
        assert_eq!(
            redial.next(t0),
            Some(Probe {
                bound: Duration::from_millis(500)
            })
        );
        redial.dropped(t0, Duration::from_secs(2));
        assert_eq!(redial.next(t0).unwrap().bound, Duration::from_secs(5));
        let off = TransportSettings {
            return_window: Duration::ZERO,
            ..settings
        };
        let mut redial = Redial::new(&off);
        redial.dropped(t0, Duration::from_millis(200));
        assert_eq!(redial.next(t0), None, "return-window = 0s turns it off");
    }

    #[tokio::test]
    async fn both_transports_carry_the_same_session_between_pinned_peers() {
        tokio::time::timeout(LIMIT, async {
            let (hq, branch) = (identity("hq"), identity("branch"));
            let settings = quick();
            let server = Arc::new(
                Net::open(localhost(), &branch, &[hq.fingerprint()], &settings, true).unwrap(),
            );
            let at = server.local_addr().unwrap();
            for transport in [Transport::Quic, Transport::Tcp] {
                let client =
                    Net::open(localhost(), &hq, &[branch.fingerprint()], &settings, false).unwrap();
                let d = dialer(client, at, transport, None);
                let accepted = {
                    let server = server.clone();
                    let hq_fp = hq.fingerprint();
                    tokio::spawn(async move {
                        let conn = server.accept().await.unwrap().establish().await.unwrap();
                        assert_eq!(conn.peer_fingerprint(), Some(hq_fp));
                        serve_one(conn).await
                    })
                };
                let conn = d.dial().await.unwrap();
                let expected = if transport == Transport::Quic {
                    "quic"
                } else {
                    "tcp"
                };
                assert_eq!(conn.transport(), expected);
                assert_eq!(conn.peer_fingerprint(), Some(branch.fingerprint()));
                assert_eq!(receive_one(&conn).await, acks(1..5));
                assert_eq!(
                    accepted.await.unwrap(),
                    acks(0..1).into_iter().chain(acks(2..5)).collect::<Vec<_>>()
                );
                let (tx, rx) = conn.wire_bytes();
                assert!(tx > 0 && rx > 0, "{tx} {rx}");
                conn.close(0, b"done");
            }
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn a_stranger_is_refused_over_tcp_and_the_refusal_logged_once() {
        let (guard, logs) = capture_warnings();
        tokio::time::timeout(LIMIT, async {
            let (hq, branch, stranger) = (identity("hq"), identity("branch"), identity("stranger"));
            let settings = quick();
            let server =
                Net::open(localhost(), &branch, &[hq.fingerprint()], &settings, true).unwrap();
            let at = server.local_addr().unwrap();
            let client = Net::open(
                localhost(),
                &stranger,
                &[branch.fingerprint()],
                &settings,
                false,
            )
            .unwrap();
            let accepted = tokio::spawn(async move {
                server
                    .accept()
                    .await
                    .unwrap()
                    .establish()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
            let d = dialer(client, at, Transport::Tcp, None);
            // The client may finish its side of TLS 1.3 before the server's
            // verdict arrives; it gets nothing through either way.
            if let Ok(conn) = d.dial().await {
                let (_, mut rx) = conn.open_control().await.unwrap();
                assert!(!matches!(read_frame(&mut rx).await, Ok(Some(_))));
            }
            assert!(
                accepted.await.unwrap().is_err(),
                "the server accepted a stranger"
            );
            let text = logs.text();
            let lines: Vec<&str> = text.lines().filter(|l| l.contains("not pinned")).collect();
            assert_eq!(lines.len(), 1, "{text}");
            assert!(
                lines[0].contains(&format!("offered={}", stranger.fingerprint())),
                "{}",
                lines[0]
            );
        })
        .await
        .expect("test timed out");
        drop(guard);
    }

    /// A TCP server of pinned TLS on `listener`, for as many connections as
    /// come, each served once.
    fn tcp_server(listener: std::net::TcpListener, id: &Identity, pinned: &[Fingerprint]) {
        let tls = Arc::new(quic::server_crypto(id, pinned).unwrap());
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        tokio::spawn(async move {
            while let Ok((stream, remote)) = listener.accept().await {
                let tls = tls.clone();
                tokio::spawn(async move {
                    let s = TransportSettings::default();
                    if let Ok(conn) =
                        tcp::accept(stream, remote, tls, &s, s.handshake_timeout).await
                    {
                        serve_one(Conn::Tcp(conn)).await;
                    }
                });
            }
        });
    }

    #[tokio::test]
    async fn auto_falls_back_to_tcp_when_udp_is_black_holed_and_moves_back_when_quic_answers() {
        let (guard, logs) = capture_warnings();
        tokio::time::timeout(LIMIT, async {
            let (hq, branch) = (identity("hq"), identity("branch"));
            let settings = quick();
            // UDP to this port goes into a socket nobody reads: no QUIC
            // handshake completes. TCP on the same port number works.
            let hole = std::net::UdpSocket::bind(localhost()).unwrap();
            let at = hole.local_addr().unwrap();
            tcp_server(
                std::net::TcpListener::bind(at).unwrap(),
                &branch,
                &[hq.fingerprint()],
            );
            let client =
                Net::open(localhost(), &hq, &[branch.fingerprint()], &settings, false).unwrap();
            let d = dialer(client, at, Transport::Auto, None);
            // A probe (a peer expected back after a drop) follows the same
            // rule: a link that came back without UDP is found over TCP.
            let probe = Probe {
                bound: Duration::from_millis(500),
            };
            let conn = d.probe(probe).await.unwrap();
            assert_eq!(conn.transport(), "tcp");
            assert!(d.fell_back());
            assert_eq!(receive_one(&conn).await, acks(1..5));
            // Fallen back: the next dial is TCP at once, and says nothing.
            let again = d.dial().await.unwrap();
            assert_eq!(again.transport(), "tcp");
            let text = logs.text();
            assert_eq!(
                text.matches("falling back to TLS over TCP").count(),
                1,
                "{text}"
            );
            assert!(text.contains("test peer"), "{text}");

            // UDP is answered again: QUIC comes back within quic-retry.
            drop(hole);
            let quic_server =
                quic::endpoint(at, &branch, &[hq.fingerprint()], &settings, true).unwrap();
            tokio::spawn(async move {
                while let Some(i) = quic_server.accept().await {
                    if let Ok(c) = i.await {
                        tokio::spawn(serve_one(Conn::Quic(c)));
                    }
                }
            });
            let back = d.quic_returns().await;
            assert_eq!(back.transport(), "quic");
            assert!(!d.fell_back());
            assert_eq!(receive_one(&back).await, acks(1..5));
        })
        .await
        .expect("test timed out");
        drop(guard);
    }

    #[tokio::test]
    async fn auto_does_not_fall_back_when_the_quic_peer_answers_with_a_refusal() {
        tokio::time::timeout(LIMIT, async {
            let (hq, branch) = (identity("hq"), identity("branch"));
            let settings = quick();
            let server =
                Net::open(localhost(), &branch, &[hq.fingerprint()], &settings, true).unwrap();
            let at = server.local_addr().unwrap();
            tokio::spawn(async move {
                while let Some(i) = server.accept().await {
                    let _ = i.establish().await;
                }
            });
            // hq pins another certificate than the branch's: the QUIC
            // handshake ends in a refusal, an answer over UDP; TCP (which
            // the branch also listens on) is not tried.
            let other = identity("other");
            let client =
                Net::open(localhost(), &hq, &[other.fingerprint()], &settings, false).unwrap();
            let d = dialer(client, at, Transport::Auto, None);
            let err = d.dial().await.err().expect("refused");
            assert!(matches!(err, DialError::Quic(_)), "{err:?}");
            assert!(!d.fell_back());
        })
        .await
        .expect("test timed out");
    }

    /// A CONNECT proxy for one tunnel at a time (test equipment): answers
    /// `status` and, when it is 200, relays to the requested address.
    async fn proxy(status: &'static str) -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind(localhost()).await.unwrap();
        let at = listener.local_addr().unwrap();
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = asked.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    if c.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap()
                    .to_owned();
                seen.lock().unwrap().push(line.clone());
                c.write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                if !status.starts_with("200") {
                    continue;
                }
                let target = line.split_whitespace().nth(1).unwrap().to_owned();
                let mut up = tokio::net::TcpStream::connect(target).await.unwrap();
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
                });
            }
        });
        (at, asked)
    }

    #[tokio::test]
    async fn a_proxy_carries_the_tcp_transport_and_a_refusing_proxy_is_named() {
        tokio::time::timeout(LIMIT, async {
            let (hq, branch) = (identity("hq"), identity("branch"));
            let settings = quick();
            let server = Arc::new(
                Net::open(localhost(), &branch, &[hq.fingerprint()], &settings, true).unwrap(),
            );
            let at = server.local_addr().unwrap();
            {
                let server = server.clone();
                tokio::spawn(async move {
                    while let Some(i) = server.accept().await {
                        if let Ok(c) = i.establish().await {
                            tokio::spawn(serve_one(c));
                        }
                    }
                });
            }
            let (via, asked) = proxy("200 Connection established").await;
            let client =
                Net::open(localhost(), &hq, &[branch.fingerprint()], &settings, false).unwrap();
            // `auto` with a proxy: TCP through it, no QUIC attempt.
            let d = dialer(client, at, Transport::Auto, Some(via));
            let conn = d.dial().await.unwrap();
            assert_eq!(conn.transport(), "tcp");
            assert_eq!(conn.peer_fingerprint(), Some(branch.fingerprint()));
            assert_eq!(receive_one(&conn).await, acks(1..5));
            assert_eq!(
                *asked.lock().unwrap(),
                vec![format!("CONNECT {at} HTTP/1.1")]
            );

            let (via, _) = proxy("403 Forbidden").await;
            let client =
                Net::open(localhost(), &hq, &[branch.fingerprint()], &settings, false).unwrap();
            let err = dialer(client, at, Transport::Tcp, Some(via))
                .dial()
                .await
                .err()
                .expect("refused");
            let text = crate::ops::backoff::error_chain(&err);
            assert!(
                text.contains(&format!("proxy {via} refused CONNECT to {at}")),
                "{text}"
            );
            assert!(text.contains("403 Forbidden"), "{text}");
        })
        .await
        .expect("test timed out");
    }
}
