//! Shipping: spool → zstd batches → QUIC (or TLS over TCP) → receivers;
//! acknowledgements back.
//!
//! One session per receiver at a time, on a connection either side dialed
//! (the sender dials receivers that have an `address`; receivers without one
//! dial the sender's `listen` address). The receiver opens the control
//! stream and says what it holds durably (`Hello`); the sender answers
//! `Welcome` and streams batches on a unidirectional stream from the next
//! record on, keeping up to `max-in-flight` bytes unacknowledged so a long
//! link stays full. `Ack` (stored) frees the in-flight window; `Applied`
//! moves that receiver's mark in the spool, which deletes what every
//! receiver has applied (so a record a receiver finds corrupt in its inbox
//! can be shipped again).
//!
//! This file is the driver: every decision (admission and refusals, the
//! resume point, the window, Ack/Applied validation, batch shaping, re-sent
//! bytes, which session is live) is made by
//! [`pgcourier_proto::session::sender`] and [`Takeover`]. Here: the link's
//! streams ([`Conn`]: QUIC or TCP), the spool, the transport's congestion
//! figures, status and counters. A dialler that fell back to TCP moves its
//! session back to QUIC when a QUIC handshake completes again
//! ([`Dialer::quic_returns`]).
//! A definite error (a refusal that retrying cannot fix, a wrong peer
//! certificate, a peer that breaks the protocol) stops dialing that
//! receiver with one ERROR line and shows in its link status; the other
//! receivers are served on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgcourier_common::ops::backoff::{error_chain, Backoff};
use pgcourier_common::ops::local_time;
use pgcourier_common::transport::framed::{self, WireError};
use pgcourier_common::transport::link::{
    Conn, DialError, Dialer, Incoming, LinkError, Net, RecvHalf, Redial, SendHalf, TransportStatus,
    REACHABLE_EVERY,
};
use pgcourier_common::transport::tls::Fingerprint;
use pgcourier_proto::session::pace::{Pacer, Rate};
use pgcourier_proto::session::sender::{
    Admission, Control, SenderError, SenderSession, ShipSettings, SpoolFacts, SpoolSource,
};
use pgcourier_proto::session::{Class, SessionId, Takeover};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ReceiverSpec, SenderConfig};
use crate::spool::Spool;

const HELLO_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("cannot connect")]
    Dial(#[from] DialError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("spool read failed")]
    Spool(#[from] pgcourier_common::store::durable::StoreError),
    #[error(transparent)]
    Session(#[from] SenderError),
    #[error("the receiver closed its control stream before Hello")]
    ClosedBeforeHello,
    #[error("refused the receiver: {reason}")]
    Refused { reason: String, class: Class },
    #[error("peer presented certificate {0}, which is not this receiver's pinned fingerprint")]
    WrongPeer(Fingerprint),
    #[error("receiver did not say hello within {0:?}")]
    HelloTimeout(Duration),
    #[error("superseded by a newer connection from the same receiver")]
    Superseded,
}

/// A rate as status shows it.
pub(crate) fn describe_rate(rate: Rate) -> String {
    match rate {
        Rate::Unlimited => "unlimited".into(),
        Rate::Closed => "closed".into(),
        Rate::Bytes(b) => format!("{} kbit/s", b * 8 / 1000),
    }
}

impl ShipError {
    /// Transient: dial again with backoff. Definite: the same connection
    /// would meet the same error; stop dialing this receiver and say why.
    pub fn class(&self) -> Class {
        match self {
            // The link, DNS down, or a name not yet (re)registered.
            ShipError::Link(_)
            | ShipError::Dial(_)
            | ShipError::Wire(WireError::Io(_))
            | ShipError::ClosedBeforeHello
            | ShipError::HelloTimeout(_)
            | ShipError::Superseded => Class::Transient,
            // A frame that does not decode comes again the same way.
            ShipError::Wire(WireError::Frame(_)) => Class::Definite,
            // The spool's disk: the other receivers meet it too.
            ShipError::Spool(_) => Class::Definite,
            ShipError::Session(e) => e.class(),
            ShipError::Refused { class, .. } => *class,
            ShipError::WrongPeer(_) => Class::Definite,
        }
    }
}

/// Shipping counters since the sender started.
#[derive(Default, Debug)]
pub struct ShipStats {
    pub batches: AtomicU64,
    pub records: AtomicU64,
    /// Encoded record bytes before compression.
    pub raw_bytes: AtomicU64,
    /// Batch payload bytes after zstd.
    pub compressed_bytes: AtomicU64,
    /// UDP payload bytes sent and received by finished QUIC connections
    /// (QUIC, TLS and acknowledgements included).
    pub udp_tx_bytes: AtomicU64,
    pub udp_rx_bytes: AtomicU64,
    /// Bytes sent and received by finished TCP connections (TLS included).
    pub tcp_tx_bytes: AtomicU64,
    pub tcp_rx_bytes: AtomicU64,
    pub connections: AtomicU64,
    /// Compressed bytes of records shipped again after a reconnect (the
    /// receiver had not made them durable before the link dropped).
    pub resent_bytes: AtomicU64,
}

impl ShipStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn log_totals(&self) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        tracing::info!(
            connections = get(&self.connections),
            batches = get(&self.batches),
            records = get(&self.records),
            raw_bytes = get(&self.raw_bytes),
            compressed_bytes = get(&self.compressed_bytes),
            udp_tx_bytes = get(&self.udp_tx_bytes),
            udp_rx_bytes = get(&self.udp_rx_bytes),
            tcp_tx_bytes = get(&self.tcp_tx_bytes),
            tcp_rx_bytes = get(&self.tcp_rx_bytes),
            resent_bytes = get(&self.resent_bytes),
            "shipping totals"
        );
    }
}

/// Adds a connection's wire byte counts to the totals when the session
/// ends, however it ends (including cancellation at shutdown).
struct ConnStats<'a> {
    conn: &'a Conn,
    stats: &'a ShipStats,
}

impl Drop for ConnStats<'_> {
    fn drop(&mut self) {
        let (tx, rx) = self.conn.wire_bytes();
        let (t, r) = match self.conn {
            Conn::Quic(_) => (&self.stats.udp_tx_bytes, &self.stats.udp_rx_bytes),
            Conn::Tcp(_) => (&self.stats.tcp_tx_bytes, &self.stats.tcp_rx_bytes),
        };
        ShipStats::add(t, tx);
        ShipStats::add(r, rx);
    }
}

/// One receiver's link as the sender sees it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    pub connected: bool,
    pub peer: Option<String>,
    #[serde(flatten)]
    pub transport: TransportStatus,
    pub connected_since: Option<String>,
    pub rtt_ms: Option<f64>,
    pub in_flight_bytes: u64,
    pub connections: u64,
    /// Raw record bytes the receiver acknowledged on this connection.
    pub acked_bytes: u64,
    /// Average acknowledged raw bytes per second on this connection.
    pub throughput_bytes_per_sec: f64,
    /// `max-rate`, when set: the cap the link is paced to outside the
    /// `schedule`'s windows. This and the two below are filled in from the
    /// configuration and the clock when status is asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rate_bits_per_sec: Option<u64>,
    /// With `max-rate` or `schedule`: the rate in force now ("unlimited",
    /// "closed", "64 kbit/s").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_in_force: Option<String>,
    /// With `schedule`: seconds until the next window starts or ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_changes_in_seconds: Option<u32>,
    /// Set when the sender stopped dialing this receiver after a definite
    /// error (the error): an operator must act, then restart the sender.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    #[serde(skip)]
    pub since: Option<std::time::Instant>,
}

pub struct Shipper {
    pub stats: ShipStats,
    pub links: Mutex<HashMap<String, LinkStatus>>,
    /// Highest record ever shipped to each receiver (to count re-sends).
    sent_high: Mutex<HashMap<String, u64>>,
    cfg: Arc<SenderConfig>,
    spool: Arc<Spool>,
    /// The live session of each receiver, so a newer welcomed one can
    /// supersede it.
    sessions: Mutex<Takeover<String, CancellationToken>>,
}

impl Shipper {
    pub fn new(cfg: Arc<SenderConfig>, spool: Arc<Spool>) -> Arc<Shipper> {
        Arc::new(Shipper {
            stats: ShipStats::default(),
            links: Mutex::default(),
            sent_high: Mutex::default(),
            cfg,
            spool,
            sessions: Mutex::new(Takeover::default()),
        })
    }

    /// Whether a joining table's next chunk may be spooled (capture's
    /// `join.rs`): some receiver is connected, and every connected one has
    /// less than `bytes`, plus what its link carries in a round trip, sent
    /// and not yet acknowledged or not yet sent. So a live change spooled
    /// next waits behind about that much, and the link stays busy. A
    /// receiver far behind (catching up a backlog) has no room: live
    /// changes go first.
    pub fn link_has_room(&self, bytes: u64) -> bool {
        let connected: Vec<(String, u64, u64)> = self
            .links
            .lock()
            .expect("links lock")
            .iter()
            .filter(|(_, l)| l.connected)
            .map(|(name, l)| {
                let round_trip = l.throughput_bytes_per_sec * l.rtt_ms.unwrap_or(0.0) / 1000.0;
                (name.clone(), l.in_flight_bytes, bytes + round_trip as u64)
            })
            .collect();
        if connected.is_empty() {
            return false;
        }
        let next = self.spool.next_seq();
        let high = self.sent_high.lock().expect("sent_high lock");
        connected.iter().all(|(name, in_flight, limit)| {
            let sent = high
                .get(name)
                .copied()
                .unwrap_or(0)
                .max(self.spool.applied(name).unwrap_or(0));
            // At most this many records to walk.
            next.saturating_sub(sent) <= 64
                && self
                    .spool
                    .bytes_after(sent)
                    .is_ok_and(|unsent| in_flight + unsent < *limit)
        })
    }

    /// Dial receivers that have an address and accept those that dial in,
    /// until `shutdown`. Every session is a task of one tracker, cancelled
    /// through `shutdown` and awaited before this returns.
    pub async fn run(self: Arc<Self>, net: Arc<Net>, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        for spec in self
            .cfg
            .receivers
            .iter()
            .filter(|r| r.address.is_some())
            .cloned()
        {
            let me = self.clone();
            let net = net.clone();
            let sd = shutdown.clone();
            tasks.spawn(async move { me.dial_loop(net, spec, sd).await });
        }
        if self.cfg.listen.is_some() {
            loop {
                let incoming = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    i = net.accept() => match i { Some(i) => i, None => break },
                };
                let me = self.clone();
                let sd = shutdown.clone();
                tasks.spawn(async move { me.accepted(incoming, sd).await });
            }
        }
        tasks.close();
        tasks.wait().await;
        // Let the close reach the peers before the process exits.
        net.close(b"sender stopping").await;
        self.stats.log_totals();
    }

    async fn dial_loop(
        self: Arc<Self>,
        net: Arc<Net>,
        spec: ReceiverSpec,
        shutdown: CancellationToken,
    ) {
        let addr = spec
            .address
            .clone()
            .expect("dial_loop only for receivers with an address");
        let mut redial = Redial::new(net.settings());
        let dialer = Dialer::new(
            net,
            format!("receiver {}", spec.name),
            addr.clone(),
            spec.transport,
            spec.proxy.clone(),
        );
        let mut backoff = Backoff::new(self.cfg.max_backoff);
        // A QUIC connection that completed its handshake while the session
        // ran over TCP: the next session's.
        let mut next: Option<Conn> = None;
        // The last wait ended by a knock (`Dialer::until_reachable`).
        let mut knocked = false;
        loop {
            let started = Instant::now();
            let probe = redial.next(started);
            let result = async {
                let was_tcp_first = dialer.fell_back();
                let conn = match (next.take(), probe) {
                    (Some(c), _) => c,
                    // The receiver was connected a moment ago: expected back.
                    (None, Some(p)) => dialer.probe(p).await?,
                    (None, None) => dialer.dial().await?,
                };
                self.set_link(&spec.name, |l| l.transport.dialled(was_tcp_first, &dialer));
                let fp = conn.peer_fingerprint();
                if fp != Some(spec.fingerprint) {
                    conn.close(1, b"wrong receiver certificate");
                    return Err(ShipError::WrongPeer(fp.unwrap_or(Fingerprint([0; 32]))));
                }
                // Over TCP after a fallback, the session runs until QUIC
                // handshakes complete again; it then ends (as at a stop)
                // and the next one runs over QUIC.
                let switch = shutdown.child_token();
                let watched = conn.clone();
                let welcomed_before = self.connections(&spec.name);
                let session = self.clone().session(conn, &spec, &switch);
                tokio::pin!(session);
                let result = tokio::select! {
                    r = &mut session => r,
                    quic = dialer.quic_returns() => {
                        switch.cancel();
                        let _ = session.await;
                        self.set_link(&spec.name, |l| l.transport.fell_back_to_tcp = false);
                        next = Some(quic);
                        Ok(())
                    }
                };
                if self.connections(&spec.name) > welcomed_before {
                    redial.dropped(Instant::now(), watched.rtt());
                }
                result
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = result => r,
            };
            if next.is_some() {
                continue;
            }
            if started.elapsed() > Duration::from_secs(10) {
                // A session that lasted: start the backoff afresh, and report
                // the next failure even if it looks like the last one.
                backoff.reset();
                knocked = false;
            }
            let expected = redial.wait(Instant::now(), probe, started);
            let backing_off = expected.is_none();
            let delay = expected.unwrap_or_else(|| backoff.next());
            match result {
                Ok(()) => {}
                Err(e) if e.class() == Class::Definite => {
                    let error = error_chain(&e);
                    tracing::error!(receiver = %spec.name, address = %addr, error = %error, "stopped dialing this receiver: retrying cannot help; an operator must act, then restart the sender");
                    self.set_link(&spec.name, |l| l.stopped = Some(error));
                    return;
                }
                Err(e) => backoff.log_once(
                    &format!("ship to receiver {} at {addr}", spec.name),
                    &e,
                    delay,
                ),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => knocked = false,
                // Backing off from a peer gone a while: dial as soon as
                // it answers again.
                _ = dialer.until_reachable(!knocked), if backing_off && delay > REACHABLE_EVERY => {
                    knocked = true;
                }
            }
        }
    }

    async fn accepted(self: Arc<Self>, incoming: Incoming, shutdown: CancellationToken) {
        let remote = incoming.remote_address();
        let conn = match incoming.establish().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(peer = %remote, error = %e, "incoming connection failed");
                return;
            }
        };
        let fp = conn.peer_fingerprint();
        let Some(spec) = self
            .cfg
            .receivers
            .iter()
            .find(|r| Some(r.fingerprint) == fp)
            .cloned()
        else {
            tracing::warn!(peer = %remote, offered = ?fp, "refusing connection: certificate matches no configured receiver");
            conn.close(1, b"unknown receiver");
            return;
        };
        match self.clone().session(conn, &spec, &shutdown).await {
            Ok(()) => {}
            Err(e) if e.class() == Class::Definite => {
                tracing::error!(receiver = %spec.name, peer = %remote, error = %error_chain(&e), "receiver session ended: retrying cannot help; an operator must act");
            }
            Err(e) => {
                tracing::warn!(receiver = %spec.name, peer = %remote, error = %error_chain(&e), "receiver session ended");
            }
        }
    }

    /// One session with one receiver on an established connection.
    async fn session(
        self: Arc<Self>,
        conn: Conn,
        spec: &ReceiverSpec,
        shutdown: &CancellationToken,
    ) -> Result<(), ShipError> {
        let id = self.sessions.lock().expect("sessions lock").begin();
        let token = shutdown.child_token();
        ShipStats::add(&self.stats.connections, 1);
        let _count_bytes = ConnStats {
            conn: &conn,
            stats: &self.stats,
        };
        let result = tokio::select! {
            _ = token.cancelled() => Err(ShipError::Superseded),
            r = self.serve(&conn, spec, id, &token) => r,
        };
        self.sessions
            .lock()
            .expect("sessions lock")
            .ended(&spec.name, id);
        match &result {
            Err(ShipError::Superseded) if !shutdown.is_cancelled() => conn.close(2, b"superseded"),
            _ if shutdown.is_cancelled() => conn.close(0, b"sender stopping"),
            // The TCP socket ends with the session (QUIC's when dropped).
            _ => conn.close(0, b""),
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        result
    }

    /// The spool's facts about `receiver`, for its admission.
    fn spool_facts(&self, receiver: &str) -> Result<SpoolFacts, ShipError> {
        let marks = self.spool.marks();
        Ok(SpoolFacts {
            source: match self.spool.source() {
                Ok(Some(s)) => SpoolSource::Known(s),
                Ok(None) => SpoolSource::NotYet,
                Err(e) => SpoolSource::Unreadable(error_chain(&e)),
            },
            spool: self.spool.spool_id()?,
            first_seq: marks.first_seq,
            complete_seq: marks.complete_seq,
            start_for: self.spool.start_for(receiver)?,
            needs_copy: self.spool.needs_copy().iter().any(|n| n == receiver),
        })
    }

    async fn serve(
        &self,
        conn: &Conn,
        spec: &ReceiverSpec,
        id: SessionId,
        token: &CancellationToken,
    ) -> Result<(), ShipError> {
        let (mut control_tx, mut control_rx) =
            tokio::time::timeout(HELLO_TIMEOUT, conn.accept_control())
                .await
                .map_err(|_| ShipError::HelloTimeout(HELLO_TIMEOUT))??;
        let hello = tokio::time::timeout(HELLO_TIMEOUT, framed::read_frame(&mut control_rx))
            .await
            .map_err(|_| ShipError::HelloTimeout(HELLO_TIMEOUT))??
            .ok_or(ShipError::ClosedBeforeHello)?;
        let sent_high = self
            .sent_high
            .lock()
            .expect("sent_high lock")
            .get(&spec.name)
            .copied()
            .unwrap_or(0);
        let settings = ShipSettings {
            max_in_flight: self.cfg.max_in_flight,
            batch_bytes: self.cfg.batch_bytes,
            pinned_level: self.cfg.zstd_level_pinned.then_some(self.cfg.zstd_level),
        };
        let mut core = SenderSession::new(spec.name.clone(), settings, sent_high);
        let admission = match core.on_hello(hello)? {
            // Another protocol version: refused in the form it reads.
            Some(refused) => refused,
            None => {
                let spool =
                    tokio::time::timeout(HELLO_TIMEOUT, framed::read_frame(&mut control_rx))
                        .await
                        .map_err(|_| ShipError::HelloTimeout(HELLO_TIMEOUT))??
                        .ok_or(ShipError::ClosedBeforeHello)?;
                let facts = self.spool_facts(&spec.name)?;
                core.on_hello_spool(spool, &facts, Instant::now())?
            }
        };
        let resume_after = match admission {
            Admission::Refuse { frame, refusal } => {
                let _ = framed::write_frame(&mut control_tx, &frame).await;
                let _ = control_tx.shutdown().await;
                // Let the refusal reach the receiver (it closes the connection
                // once it has read it) before this side drops the connection.
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    conn.closed_by_peer(&mut control_rx),
                )
                .await;
                return Err(ShipError::Refused {
                    reason: refusal.reason,
                    class: refusal.class,
                });
            }
            Admission::Welcome {
                frame,
                resume_after,
            } => {
                framed::write_frame(&mut control_tx, &frame).await?;
                resume_after
            }
        };
        // Welcomed: this session is the receiver's live one now.
        if let Some(older) =
            self.sessions
                .lock()
                .expect("sessions lock")
                .welcomed(&spec.name, id, token.clone())
        {
            older.cancel();
        }
        // The spool is trimmed by the receiver's `Applied` frames, not by
        // what it stores: a record it finds corrupt can be shipped again.
        tracing::info!(receiver = %spec.name, peer = %conn.remote_address(), transport = conn.transport(), durable_seq = resume_after, "receiver connected; shipping");
        self.set_link(&spec.name, |l| {
            l.connected = true;
            l.peer = Some(conn.remote_address().to_string());
            l.transport.current = Some(conn.transport().to_owned());
            l.connected_since =
                Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
            l.connections += 1;
            l.since = Some(std::time::Instant::now());
            l.acked_bytes = 0;
            l.throughput_bytes_per_sec = 0.0;
        });
        let result = self.stream(conn, spec, core, control_tx, control_rx).await;
        self.set_link(&spec.name, |l| {
            l.connected = false;
            l.transport.current = None;
            l.rtt_ms = None;
            l.in_flight_bytes = 0;
        });
        result
    }

    /// Sessions welcomed with this receiver so far.
    fn connections(&self, name: &str) -> u64 {
        self.links
            .lock()
            .expect("links lock")
            .get(name)
            .map_or(0, |l| l.connections)
    }

    fn set_link(&self, name: &str, f: impl FnOnce(&mut LinkStatus)) {
        f(self
            .links
            .lock()
            .expect("links lock")
            .entry(name.to_owned())
            .or_default());
    }

    /// Stream batches and take acknowledgements until the session ends.
    /// Both halves run in this one task (`select!`), so the core's lock is
    /// never contended.
    async fn stream(
        &self,
        conn: &Conn,
        spec: &ReceiverSpec,
        core: SenderSession,
        control_tx: SendHalf,
        mut control_rx: RecvHalf,
    ) -> Result<(), ShipError> {
        let mut data = conn.open_data(control_tx).await?;
        let core = Mutex::new(core);
        let lock = || core.lock().expect("session core lock");
        // Woken on each Ack (a stored permit: no wake-up is lost).
        let acked = Notify::new();

        let acks = async {
            loop {
                let Some(frame) = framed::read_frame(&mut control_rx).await? else {
                    return Ok::<(), ShipError>(());
                };
                let control = lock().on_control(frame)?;
                match control {
                    Control::Acked { freed_bytes } => {
                        if freed_bytes > 0 {
                            let (bytes, rate, in_flight) = {
                                let c = lock();
                                (
                                    c.acked_bytes(),
                                    c.throughput(Instant::now()),
                                    c.in_flight_bytes(),
                                )
                            };
                            self.set_link(&spec.name, |l| {
                                l.acked_bytes = bytes;
                                l.throughput_bytes_per_sec = rate;
                                l.in_flight_bytes = in_flight;
                            });
                        }
                        acked.notify_one();
                    }
                    Control::Applied { seq } => {
                        self.spool.record_applied(&spec.name, seq)?;
                    }
                }
            }
        };

        let send = async {
            let mut marks_rx = self.spool.subscribe();
            // `max-rate` and `schedule`: the rate in force now, paced over
            // what this connection sent: the frames written, and what the
            // transport put on the wire beyond them (its overhead and
            // retransmissions, once sent).
            // (The pacer's rate is set from the budget before each use.)
            let mut pacer = Pacer::new(1, Instant::now());
            let mut frame_bytes = 0u64;
            loop {
                if let Some(budget) = spec.budget.as_ref() {
                    let p = &mut pacer;
                    let (now, wire) = (Instant::now(), conn.wire_bytes().0);
                    let (rate, _, next) = budget.at(local_time::seconds_of_day());
                    let wait = match rate {
                        Rate::Closed => {
                            p.reset(now, frame_bytes, wire);
                            // Look again at the window's end (or in a
                            // minute, should the clock move).
                            Duration::from_secs(u64::from(next.clamp(1, 60)))
                        }
                        Rate::Unlimited => {
                            p.reset(now, frame_bytes, wire);
                            Duration::ZERO
                        }
                        Rate::Bytes(b) => {
                            p.set_rate(b, now);
                            p.wait(now, frame_bytes, wire)
                        }
                    };
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
                let complete = marks_rx.borrow_and_update().complete_seq;
                let Some(want) = lock().wants(complete) else {
                    tokio::select! {
                        r = marks_rx.changed() => if r.is_err() { return Ok(()) },
                        _ = acked.notified() => {}
                    }
                    continue;
                };
                let records = self.spool.read(want.from, want.max_raw_bytes)?;
                // What the link carries now: congestion window per RTT.
                let (rtt, rate) = (conn.rtt(), conn.rate_estimate());
                let shipped = lock().next_batch(records, rate, complete)?;
                ShipStats::add(&self.stats.compressed_bytes, shipped.wire_bytes);
                ShipStats::add(&self.stats.resent_bytes, shipped.resent_bytes);
                ShipStats::add(&self.stats.batches, 1);
                ShipStats::add(&self.stats.records, shipped.records);
                ShipStats::add(&self.stats.raw_bytes, shipped.raw_bytes);
                {
                    let mut high = self.sent_high.lock().expect("sent_high lock");
                    let h = high.entry(spec.name.clone()).or_insert(0);
                    *h = (*h).max(shipped.sent_high);
                }
                framed::write_frame(&mut data, &shipped.frame).await?;
                frame_bytes += shipped.wire_bytes;
                let in_flight = lock().in_flight_bytes();
                self.set_link(&spec.name, |l| {
                    l.in_flight_bytes = in_flight;
                    l.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
                });
            }
        };
        // The session ends when either half does: the receiver closed its
        // control stream, or the link failed.
        tokio::select! {
            r = acks => r,
            r = send => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_that_retrying_cannot_fix_and_wrong_peers_stop_dialing_link_faults_do_not() {
        let refused = |class| ShipError::Refused {
            reason: "r".into(),
            class,
        };
        assert_eq!(refused(Class::Definite).class(), Class::Definite);
        assert_eq!(refused(Class::Transient).class(), Class::Transient);
        assert_eq!(
            ShipError::WrongPeer(Fingerprint([7; 32])).class(),
            Class::Definite
        );
        assert_eq!(
            ShipError::Session(SenderError::Protocol("x".into())).class(),
            Class::Definite
        );
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(ShipError::Wire(WireError::Io(io)).class(), Class::Transient);
        assert_eq!(
            ShipError::HelloTimeout(HELLO_TIMEOUT).class(),
            Class::Transient
        );
        assert_eq!(ShipError::ClosedBeforeHello.class(), Class::Transient);
        assert_eq!(ShipError::Superseded.class(), Class::Transient);
        assert_eq!(
            ShipError::Link(LinkError::Quic(quinn::ConnectionError::TimedOut)).class(),
            Class::Transient
        );
        assert_eq!(
            ShipError::Dial(DialError::QuicTimeout(Duration::from_secs(5))).class(),
            Class::Transient
        );
        // The log line names the refusal as before.
        assert_eq!(
            refused(Class::Definite).to_string(),
            "refused the receiver: r"
        );
    }
}
