//! Shipping: spool → zstd batches → QUIC → receivers; acknowledgements back.
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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgcourier_common::ops::backoff::{error_chain, Backoff};
use pgcourier_common::transport::quic::{peer_fingerprint, SERVER_NAME};
use pgcourier_proto::record::{self, Record};
use pgcourier_common::transport::tls::Fingerprint;
use pgcourier_common::transport::framed::{self, WireError};
use pgcourier_proto::frame::{self, Frame, PROTOCOL_VERSION};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ReceiverSpec, SenderConfig};
use crate::spool::Spool;

const HELLO_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("connection failed")]
    Connection(#[from] quinn::ConnectionError),
    #[error("cannot start connection")]
    Connect(#[from] quinn::ConnectError),
    #[error("stream failed")]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("spool read failed")]
    Spool(#[from] pgcourier_common::store::durable::StoreError),
    #[error("peer broke the protocol: {0}")]
    Protocol(String),
    #[error("refused the receiver: {0}")]
    Refused(String),
    #[error("peer presented certificate {0}, which is not this receiver's pinned fingerprint")]
    WrongPeer(Fingerprint),
    #[error("receiver did not say hello within {0:?}")]
    HelloTimeout(Duration),
    #[error("superseded by a newer connection from the same receiver")]
    Superseded,
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
    /// UDP payload bytes sent and received by finished connections
    /// (QUIC, TLS and acknowledgements included).
    pub udp_tx_bytes: AtomicU64,
    pub udp_rx_bytes: AtomicU64,
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
            resent_bytes = get(&self.resent_bytes),
            "shipping totals"
        );
    }
}

/// Adds a connection's UDP byte counts to the totals when the session ends,
/// however it ends (including cancellation at shutdown).
struct ConnStats<'a> {
    conn: &'a quinn::Connection,
    stats: &'a ShipStats,
}

impl Drop for ConnStats<'_> {
    fn drop(&mut self) {
        let s = self.conn.stats();
        ShipStats::add(&self.stats.udp_tx_bytes, s.udp_tx.bytes);
        ShipStats::add(&self.stats.udp_rx_bytes, s.udp_rx.bytes);
    }
}

/// One receiver's link as the sender sees it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    pub connected: bool,
    pub peer: Option<String>,
    pub connected_since: Option<String>,
    pub rtt_ms: Option<f64>,
    pub in_flight_bytes: u64,
    pub connections: u64,
    /// Raw record bytes the receiver acknowledged on this connection.
    pub acked_bytes: u64,
    /// Average acknowledged raw bytes per second on this connection.
    pub throughput_bytes_per_sec: f64,
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
    /// The live session of each receiver, so a new one can supersede it.
    active: Mutex<HashMap<String, (u64, CancellationToken)>>,
    next_session: AtomicU64,
}

impl Shipper {
    pub fn new(cfg: Arc<SenderConfig>, spool: Arc<Spool>) -> Arc<Shipper> {
        Arc::new(Shipper {
            stats: ShipStats::default(),
            links: Mutex::default(),
            sent_high: Mutex::default(),
            cfg,
            spool,
            active: Mutex::new(HashMap::new()),
            next_session: 0.into(),
        })
    }

    /// Dial receivers that have an address and accept those that dial in,
    /// until `shutdown`.
    pub async fn run(self: Arc<Self>, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        for spec in self
            .cfg
            .receivers
            .iter()
            .filter(|r| r.address.is_some())
            .cloned()
        {
            let me = self.clone();
            let ep = endpoint.clone();
            let sd = shutdown.clone();
            tasks.spawn(async move { me.dial_loop(ep, spec, sd).await });
        }
        if self.cfg.listen.is_some() {
            loop {
                let incoming = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    i = endpoint.accept() => match i { Some(i) => i, None => break },
                };
                let me = self.clone();
                let sd = shutdown.clone();
                tasks.spawn(async move { me.accepted(incoming, sd).await });
            }
        }
        tasks.close();
        tasks.wait().await;
        endpoint.close(0u32.into(), b"sender stopping");
        // Let the close reach the peers before the process exits.
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        self.stats.log_totals();
    }

    async fn dial_loop(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        spec: ReceiverSpec,
        shutdown: CancellationToken,
    ) {
        let addr = spec
            .address
            .expect("dial_loop only for receivers with an address");
        let mut backoff = Backoff::new(self.cfg.max_backoff);
        loop {
            let started = Instant::now();
            let result = async {
                let conn = endpoint.connect(addr, SERVER_NAME)?.await?;
                let fp = peer_fingerprint(&conn);
                if fp != Some(spec.fingerprint) {
                    conn.close(1u32.into(), b"wrong receiver certificate");
                    return Err(ShipError::WrongPeer(fp.unwrap_or(Fingerprint([0; 32]))));
                }
                self.clone().session(conn, &spec, &shutdown).await
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = result => r,
            };
            if started.elapsed() > Duration::from_secs(10) {
                // A session that lasted: start the backoff afresh, and report
                // the next failure even if it looks like the last one.
                backoff.reset();
            }
            let delay = backoff.next();
            match result {
                Ok(()) => {}
                Err(e) => backoff.log_once(
                    &format!("ship to receiver {} at {addr}", spec.name),
                    &e,
                    delay,
                ),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn accepted(self: Arc<Self>, incoming: quinn::Incoming, shutdown: CancellationToken) {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(peer = %remote, error = %e, "incoming connection failed");
                return;
            }
        };
        let fp = peer_fingerprint(&conn);
        let Some(spec) = self
            .cfg
            .receivers
            .iter()
            .find(|r| Some(r.fingerprint) == fp)
            .cloned()
        else {
            tracing::warn!(peer = %remote, offered = ?fp, "refusing connection: certificate matches no configured receiver");
            conn.close(1u32.into(), b"unknown receiver");
            return;
        };
        if let Err(e) = self.clone().session(conn, &spec, &shutdown).await {
            tracing::warn!(receiver = %spec.name, peer = %remote, error = %error_chain(&e), "receiver session ended");
        }
    }

    /// One session with one receiver on an established connection.
    async fn session(
        self: Arc<Self>,
        conn: quinn::Connection,
        spec: &ReceiverSpec,
        shutdown: &CancellationToken,
    ) -> Result<(), ShipError> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let token = shutdown.child_token();
        if let Some((_, old)) = self
            .active
            .lock()
            .expect("active lock")
            .insert(spec.name.clone(), (id, token.clone()))
        {
            old.cancel();
        }
        ShipStats::add(&self.stats.connections, 1);
        let _count_bytes = ConnStats {
            conn: &conn,
            stats: &self.stats,
        };
        let result = tokio::select! {
            _ = token.cancelled() => Err(ShipError::Superseded),
            r = self.serve(&conn, spec) => r,
        };
        {
            let mut active = self.active.lock().expect("active lock");
            if active.get(&spec.name).map(|(i, _)| *i) == Some(id) {
                active.remove(&spec.name);
            }
        }
        match &result {
            Err(ShipError::Superseded) => conn.close(2u32.into(), b"superseded"),
            _ if shutdown.is_cancelled() => conn.close(0u32.into(), b"sender stopping"),
            _ => {}
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        result
    }

    async fn serve(&self, conn: &quinn::Connection, spec: &ReceiverSpec) -> Result<(), ShipError> {
        let (mut control_tx, mut control_rx) =
            tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
                .await
                .map_err(|_| ShipError::HelloTimeout(HELLO_TIMEOUT))??;
        let hello = tokio::time::timeout(HELLO_TIMEOUT, framed::read_frame(&mut control_rx))
            .await
            .map_err(|_| ShipError::HelloTimeout(HELLO_TIMEOUT))??;
        let Some(Frame::Hello {
            protocol,
            source,
            durable_seq,
        }) = hello
        else {
            return Err(ShipError::Protocol("first frame is not Hello".into()));
        };
        // A new branch whose copy was made for it starts at that copy.
        let start = match self.spool.start_for(&spec.name)? {
            Some(start) if durable_seq == 0 => Some(start),
            _ => None,
        };
        let durable_seq = start.map_or(durable_seq, |s| s - 1);
        let admitted = if self.spool.needs_copy().contains(&spec.name) && durable_seq == 0 {
            Err(
                "this branch is new: its copy of the tables is being prepared; retry shortly"
                    .into(),
            )
        } else {
            self.admit(protocol, source.as_deref(), durable_seq)
        };
        if let Err(reason) = admitted {
            let _ = framed::write_frame(
                &mut control_tx,
                &Frame::Refuse {
                    reason: reason.clone(),
                },
            )
            .await;
            let _ = control_tx.finish();
            // Let the refusal reach the receiver (it closes the connection
            // once it has read it) before this side drops the connection.
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            return Err(ShipError::Refused(reason));
        }
        let our_source = self
            .spool
            .source()?
            .expect("admit checked the source is known");
        let marks = self.spool.marks();
        framed::write_frame(
            &mut control_tx,
            &Frame::Welcome {
                source: our_source,
                first_seq: start.unwrap_or(marks.first_seq),
            },
        )
        .await?;
        // The spool is trimmed by the receiver's `Applied` frames, not by
        // what it stores: a record it finds corrupt can be shipped again.
        tracing::info!(receiver = %spec.name, peer = %conn.remote_address(), durable_seq, "receiver connected; shipping");
        self.set_link(&spec.name, |l| {
            l.connected = true;
            l.peer = Some(conn.remote_address().to_string());
            l.connected_since =
                Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
            l.connections += 1;
            l.since = Some(std::time::Instant::now());
            l.acked_bytes = 0;
            l.throughput_bytes_per_sec = 0.0;
        });
        let result = self.stream(conn, spec, durable_seq, control_rx).await;
        self.set_link(&spec.name, |l| {
            l.connected = false;
            l.rtt_ms = None;
            l.in_flight_bytes = 0;
        });
        result
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
    async fn stream(
        &self,
        conn: &quinn::Connection,
        spec: &ReceiverSpec,
        durable_seq: u64,
        mut control_rx: quinn::RecvStream,
    ) -> Result<(), ShipError> {
        let mut data = conn.open_uni().await?;
        let (ack_tx, mut ack_rx) = watch::channel(durable_seq);
        let sent_through = AtomicU64::new(durable_seq);

        let acks = async {
            loop {
                match framed::read_frame(&mut control_rx).await? {
                    Some(Frame::Ack { durable_seq: seq }) => {
                        if seq > sent_through.load(Ordering::Acquire) {
                            return Err(ShipError::Protocol(format!(
                                "acknowledged record {seq}, which was never sent"
                            )));
                        }
                        ack_tx.send_replace(seq);
                    }
                    Some(Frame::Applied { seq }) => {
                        if seq > sent_through.load(Ordering::Acquire) {
                            return Err(ShipError::Protocol(format!(
                                "reported record {seq} applied, which was never sent"
                            )));
                        }
                        self.spool.acknowledge(&spec.name, seq)?;
                    }
                    Some(other) => {
                        return Err(ShipError::Protocol(format!(
                            "unexpected frame {}",
                            frame_name(&other)
                        )))
                    }
                    None => return Ok::<(), ShipError>(()),
                }
            }
        };

        let send = async {
            let mut marks_rx = self.spool.subscribe();
            let mut next = durable_seq + 1;
            let mut shape = BatchShape::new(&self.cfg);
            let mut in_flight: VecDeque<(u64, usize)> = VecDeque::new();
            let mut in_flight_bytes = 0usize;
            loop {
                let acked = *ack_rx.borrow_and_update();
                let mut newly_acked = 0u64;
                while let Some(&(last, bytes)) = in_flight.front() {
                    if last > acked {
                        break;
                    }
                    in_flight.pop_front();
                    in_flight_bytes -= bytes;
                    newly_acked += bytes as u64;
                }
                if newly_acked > 0 {
                    self.set_link(&spec.name, |l| {
                        l.acked_bytes += newly_acked;
                        let secs = l.since.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
                        l.throughput_bytes_per_sec = if secs > 0.0 {
                            l.acked_bytes as f64 / secs
                        } else {
                            0.0
                        };
                    });
                }
                let complete = marks_rx.borrow_and_update().complete_seq;
                if next > complete || in_flight_bytes >= self.cfg.max_in_flight {
                    tokio::select! {
                        r = marks_rx.changed() => if r.is_err() { return Ok(()) },
                        r = ack_rx.changed() => if r.is_err() { return Ok(()) },
                    }
                    continue;
                }
                let records = self.spool.read(next, shape.raw_bytes)?;
                let records = addressed(records, &spec.name)?;
                if records.is_empty() {
                    return Err(ShipError::Protocol(format!(
                        "spool has no record {next} although it is complete up to {complete}"
                    )));
                }
                let count = records.len() as u64;
                let level = shape.level(conn);
                let frame = frame::encode_batch(&records, next, level).map_err(WireError::from)?;
                let raw: usize = records.iter().map(Vec::len).sum();
                if let Frame::Batch { payload, .. } = &frame {
                    shape.observe(raw, payload.len());
                }
                if let Frame::Batch { payload, .. } = &frame {
                    ShipStats::add(&self.stats.compressed_bytes, payload.len() as u64);
                    let mut high = self.sent_high.lock().expect("sent_high lock");
                    let h = high.entry(spec.name.clone()).or_insert(0);
                    if next <= *h {
                        let again = (*h - next + 1).min(count);
                        ShipStats::add(
                            &self.stats.resent_bytes,
                            payload.len() as u64 * again / count,
                        );
                    }
                    *h = (*h).max(next + count - 1);
                }
                ShipStats::add(&self.stats.batches, 1);
                ShipStats::add(&self.stats.records, count);
                ShipStats::add(&self.stats.raw_bytes, raw as u64);
                sent_through.store(next + count - 1, Ordering::Release);
                framed::write_frame(&mut data, &frame).await?;
                in_flight.push_back((next + count - 1, raw));
                in_flight_bytes += raw;
                let rtt = conn.rtt().as_secs_f64() * 1000.0;
                self.set_link(&spec.name, |l| {
                    l.in_flight_bytes = in_flight_bytes as u64;
                    l.rtt_ms = Some(rtt);
                });
                next += count;
            }
        };
        // The session ends when either half does: the receiver closed its
        // control stream, or the link failed.
        tokio::select! {
            r = acks => r,
            r = send => r,
        }
    }

    /// Whether a receiver that says hello with these facts may be served;
    /// the refusal reason otherwise.
    fn admit(&self, protocol: u32, source: Option<&str>, durable_seq: u64) -> Result<(), String> {
        if protocol != PROTOCOL_VERSION {
            return Err(format!("protocol {protocol} is not supported (this sender speaks {PROTOCOL_VERSION}): upgrade the older side"));
        }
        let our_source = match self.spool.source() {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(
                    "the sender has not reached its source database yet; retry later".into(),
                )
            }
            Err(e) => return Err(format!("the sender cannot read its spool: {e}")),
        };
        if let Some(theirs) = source {
            if theirs != our_source {
                return Err(format!("the receiver's inbox belongs to source {theirs}, this sender ships {our_source}"));
            }
        }
        let marks = self.spool.marks();
        if durable_seq + 1 < marks.first_seq {
            return Err(format!(
                "the receiver holds up to record {durable_seq} but the spool starts at {}: records in between are gone; re-seed this branch (pgcourier-sender seed export, then pgcourier-receiver seed import)",
                marks.first_seq
            ));
        }
        if durable_seq > marks.complete_seq {
            return Err(format!(
                "the receiver claims record {durable_seq} but the spool ends at {}: is this the right sender and spool?",
                marks.complete_seq
            ));
        }
        Ok(())
    }
}

/// Records made for one other receiver (its copy) become empty
/// placeholders: same positions and transaction boundaries, no changes.
fn addressed(records: Vec<Vec<u8>>, receiver: &str) -> Result<Vec<Vec<u8>>, ShipError> {
    records
        .into_iter()
        .map(|bytes| {
            let bad = |e| ShipError::Protocol(format!("spool record does not decode: {e}"));
            match record::peek_only_for(&bytes).map_err(bad)? {
                Some(to) if to != receiver => Ok(Record::decode(&bytes)
                    .map_err(bad)?
                    .placeholder()
                    .encode()
                    .map_err(bad)?),
                _ => Ok(bytes),
            }
        })
        .collect()
}

/// Compressed bytes a batch should not exceed: what a link drop in the
/// middle of a batch can waste (the receiver discards a partial batch).
pub const MAX_BATCH_WIRE_BYTES: usize = 48 * 1024;

/// Batch size and compression level suited to the link. Batches grow up to
/// `batch-bytes` raw but are cut so that a compressed batch stays under
/// [`MAX_BATCH_WIRE_BYTES`]; the zstd level rises on slow links (where even
/// level 9 outruns the link and every byte saved is time saved) and falls
/// on fast ones (where compression must not hold the link back), unless
/// `zstd-level` pins it.
struct BatchShape {
    raw_bytes: usize,
    max_raw: usize,
    pinned_level: Option<i32>,
}

impl BatchShape {
    fn new(cfg: &SenderConfig) -> BatchShape {
        BatchShape {
            raw_bytes: cfg.batch_bytes.min(44 * 1024),
            max_raw: cfg.batch_bytes,
            pinned_level: cfg.zstd_level_pinned.then_some(cfg.zstd_level),
        }
    }

    /// The zstd level for the link's current estimated rate.
    fn level(&self, conn: &quinn::Connection) -> i32 {
        if let Some(l) = self.pinned_level {
            return l;
        }
        let stats = conn.stats();
        let rtt = conn.rtt().as_secs_f64().max(0.001);
        // Congestion window per RTT: what the link currently carries.
        let bytes_per_sec = stats.path.cwnd as f64 / rtt;
        if bytes_per_sec < 1_000_000.0 {
            9
        } else if bytes_per_sec < 20_000_000.0 {
            3
        } else {
            1
        }
    }

    /// Adjust the raw size after a batch of `raw` bytes compressed to `wire`.
    fn observe(&mut self, raw: usize, wire: usize) {
        let ratio = raw as f64 / wire.max(1) as f64;
        let fits = (MAX_BATCH_WIRE_BYTES as f64 * ratio * 0.9) as usize;
        self.raw_bytes = fits.clamp(4096, self.max_raw);
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "Hello",
        Frame::Welcome { .. } => "Welcome",
        Frame::Refuse { .. } => "Refuse",
        Frame::Batch { .. } => "Batch",
        Frame::Ack { .. } => "Ack",
        Frame::Applied { .. } => "Applied",
    }
}
