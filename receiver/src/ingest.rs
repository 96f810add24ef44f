//! Ingest: QUIC (or TLS over TCP) → verified batches → inbox (fsynced) → Ack.
//!
//! The receiver opens the control stream on whichever connection exists
//! (it dialed the sender in reverse mode, or accepted the sender's dial),
//! says `Hello` with the highest record it holds durably, and then stores
//! every batch that arrives on the sender's data stream. A batch is checked
//! (size bounds, zstd, every record's checksum, dense sequence) before it is
//! written; the `Ack` goes out only after the inbox fsync.
//!
//! This file is the driver: every decision (Welcome handling, gaps, the
//! start at a copy made for a new branch, what to do with each batch, what
//! to acknowledge and report, which session is live) is made by
//! [`pgcourier_proto::session::receiver`] and [`Takeover`]. Here: the link's
//! streams ([`Conn`]: QUIC or TCP), the inbox (its fsyncs run on the
//! blocking pool), status. In reverse mode a dialler that fell back to TCP
//! moves its session back to QUIC when a QUIC handshake completes again.
//!
//! Errors: a definite one about the inbox or this branch (a gap, another
//! source, a store error, a definite refusal or a wrong certificate where
//! the receiver dials) stops ingest with one ERROR line: an operator must
//! act. Where the receiver listens, a definite refusal or error from one
//! sender's session is logged once as ERROR and ingest waits for the next
//! (the sender stops dialing on its side). Everything else is retried.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgcourier_common::ops::backoff::{error_chain, Backoff};
use pgcourier_common::store::durable::{StoreError, Synced};
use pgcourier_common::transport::framed::{self, WireError};
use pgcourier_common::transport::link::{
    Conn, DialError, Dialer, LinkError, Net, RecvHalf, Redial, SendHalf, TransportStatus,
    REACHABLE_EVERY,
};
use pgcourier_common::transport::peer::PeerAddr;
use pgcourier_common::transport::tls::Fingerprint;
use pgcourier_proto::frame::{self, Frame};
use pgcourier_proto::session::receiver::{
    inbox_has_room, BatchVerdict, InboxFacts, ReceiverError, ReceiverSession,
};
use pgcourier_proto::session::{Class, SessionId, Takeover};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Link, ReceiverConfig};
use crate::inbox::Inbox;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("cannot connect")]
    Dial(#[from] DialError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("inbox write failed")]
    Inbox(#[from] StoreError),
    #[error("inbox write task failed")]
    InboxTask(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Session(#[from] ReceiverError),
    #[error("peer presented certificate {0}, which is not a pinned sender fingerprint")]
    WrongPeer(String),
}

impl IngestError {
    /// The peer closed the connection on purpose (stopping, superseded).
    pub fn is_clean_close(&self) -> bool {
        let conn = match self {
            IngestError::Link(l) => return l.is_clean_close(),
            IngestError::Wire(WireError::Io(io)) => io
                .get_ref()
                .and_then(|e| e.downcast_ref::<quinn::ReadError>())
                .and_then(|r| match r {
                    quinn::ReadError::ConnectionLost(c) => Some(c),
                    _ => None,
                }),
            _ => None,
        };
        matches!(conn, Some(quinn::ConnectionError::ApplicationClosed(_)))
    }

    /// Transient: connect again with backoff. Definite: the same
    /// connection would meet the same error.
    pub fn class(&self) -> Class {
        match self {
            IngestError::Link(_) | IngestError::Dial(_) | IngestError::Wire(WireError::Io(_)) => {
                Class::Transient
            }
            // A frame or batch that does not decode comes again the same way.
            IngestError::Wire(WireError::Frame(_)) => Class::Definite,
            IngestError::Inbox(_) | IngestError::InboxTask(_) => Class::Definite,
            IngestError::Session(e) => e.class(),
            IngestError::WrongPeer(_) => Class::Definite,
        }
    }

    /// A definite error of this branch (its inbox, or a gap in what it
    /// holds), not of one sender: ingest stops whoever dialed.
    fn stops_ingest(&self) -> bool {
        matches!(
            self,
            IngestError::Inbox(_)
                | IngestError::InboxTask(_)
                | IngestError::Session(ReceiverError::Gap { .. })
        )
    }
}

/// The link as the receiver sees it, for status and metrics.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    pub connected: bool,
    pub peer: Option<String>,
    #[serde(flatten)]
    pub transport: TransportStatus,
    /// RFC 3339 time the current connection was established.
    pub connected_since: Option<String>,
    pub rtt_ms: Option<f64>,
    pub batches: u64,
    pub compressed_bytes: u64,
    pub raw_bytes: u64,
    pub connections: u64,
    /// Bytes of batches cut by a dropped link, received and thrown away
    /// (the sender ships them again): the waste of outages.
    pub discarded_bytes: u64,
    /// Set when ingest stopped after a definite error (the error): an
    /// operator must act, then restart the receiver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

/// Run a blocking inbox call (it fsyncs) off the async worker threads.
async fn blocking<T: Send + 'static>(
    inbox: &Arc<Inbox>,
    f: impl FnOnce(&Inbox) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, IngestError> {
    let inbox = inbox.clone();
    Ok(tokio::task::spawn_blocking(move || f(&inbox))
        .await
        .map_err(IngestError::InboxTask)??)
}

pub struct Ingest {
    cfg: Arc<ReceiverConfig>,
    inbox: Arc<Inbox>,
    pub link: Arc<Mutex<LinkStatus>>,
    /// The connection of the session that writes the inbox; a newer session
    /// closes it once the sender on it is welcomed (so an impostor or a
    /// wrong sender cannot interrupt a good session).
    sessions: Arc<Mutex<Takeover<(), Conn>>>,
    /// Held by the session that writes the inbox, from its welcome on.
    writer: Arc<tokio::sync::Mutex<()>>,
}

impl Ingest {
    pub fn new(cfg: Arc<ReceiverConfig>, inbox: Arc<Inbox>) -> Ingest {
        Ingest {
            cfg,
            inbox,
            link: Arc::default(),
            sessions: Arc::default(),
            writer: Arc::default(),
        }
    }

    pub async fn run(self, net: Arc<Net>, shutdown: CancellationToken) {
        match self.cfg.link.clone() {
            Link::Dial(addr) => self.dial_loop(&net, &addr, &shutdown).await,
            Link::Listen(_) => self.accept_loop(&net, &shutdown).await,
        }
        net.close(b"receiver stopping").await;
    }

    /// Ingest stopped after a definite error: say it once, show it in
    /// status, and wait for shutdown.
    async fn stop(&self, e: &IngestError, shutdown: &CancellationToken) {
        let error = error_chain(e);
        tracing::error!(error = %error, "ingest stopped: the operator must act");
        self.link.lock().expect("link lock").stopped = Some(error);
        shutdown.cancelled().await;
    }

    async fn dial_loop(&self, net: &Arc<Net>, addr: &PeerAddr, shutdown: &CancellationToken) {
        let dialer = Dialer::new(
            net.clone(),
            "sender".into(),
            addr.clone(),
            self.cfg.dial_transport,
            self.cfg.proxy.clone(),
        );
        let mut backoff = Backoff::new(self.cfg.max_backoff);
        let mut redial = Redial::new(net.settings());
        // A QUIC connection that completed its handshake while the session
        // ran over TCP: the next session's.
        let mut next: Option<Conn> = None;
        // The last wait ended by a knock (`Dialer::until_reachable`).
        let mut knocked = false;
        loop {
            let started = Instant::now();
            let probe = redial.next(started);
            let attempt = async {
                let was_tcp_first = dialer.fell_back();
                let conn = match (next.take(), probe) {
                    (Some(c), _) => c,
                    // Connected a moment ago: the sender is expected back.
                    (None, Some(p)) => dialer.probe(p).await?,
                    (None, None) => dialer.dial().await?,
                };
                self.link
                    .lock()
                    .expect("link lock")
                    .transport
                    .dialled(was_tcp_first, &dialer);
                self.check_peer(&conn)?;
                let id = self.sessions.lock().expect("sessions lock").begin();
                let welcomed_before = self.link.lock().expect("link lock").connections;
                let session = self.session(&conn, id);
                tokio::pin!(session);
                let result = tokio::select! {
                    r = &mut session => r,
                    quic = dialer.quic_returns() => {
                        // Over TCP after a fallback: move to QUIC, as the
                        // sender would see a stop.
                        conn.close(0, b"");
                        let _ = session.await;
                        self.link.lock().expect("link lock").transport.fell_back_to_tcp = false;
                        next = Some(quic);
                        Ok(())
                    }
                };
                if self.link.lock().expect("link lock").connections > welcomed_before {
                    redial.dropped(Instant::now(), conn.rtt());
                }
                result
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = attempt => r,
            };
            if next.is_some() {
                continue;
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff.reset();
                knocked = false;
            }
            let expected = redial.wait(Instant::now(), probe, started);
            let backing_off = expected.is_none();
            let delay = expected.unwrap_or_else(|| backoff.next());
            if let Err(e) = result {
                if e.class() == Class::Definite {
                    self.stop(&e, shutdown).await;
                    return;
                }
                backoff.log_once(&format!("receive from sender at {addr}"), &e, delay);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => knocked = false,
                // Backing off from a sender gone a while: dial as soon as
                // it answers again.
                _ = dialer.until_reachable(!knocked), if backing_off && delay > REACHABLE_EVERY => {
                    knocked = true;
                }
            }
        }
    }

    async fn accept_loop(&self, net: &Net, shutdown: &CancellationToken) {
        // Sessions run side by side until one is welcomed by a sender
        // shipping our source; it then closes the one before it (which may be
        // half-dead after a link outage).
        let mut sessions: JoinSet<(std::net::SocketAddr, Result<(), IngestError>)> = JoinSet::new();
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(joined) = sessions.join_next() => {
                    let (peer, result) = match joined {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "a sender session panicked");
                            continue;
                        }
                    };
                    match result {
                        Err(e) if e.stops_ingest() => {
                            self.stop(&e, shutdown).await;
                            break;
                        }
                        Err(e) if e.class() == Class::Definite => {
                            tracing::error!(peer = %peer, error = %error_chain(&e), "refused a sender session that retrying cannot fix; the current session goes on");
                        }
                        Err(e) if e.is_clean_close() => {
                            tracing::info!(peer = %peer, "the sender closed the connection; waiting for it to reconnect");
                        }
                        Err(e) => {
                            tracing::warn!(peer = %peer, error = %error_chain(&e), "sender session ended; waiting for the sender to reconnect");
                        }
                        Ok(()) => {}
                    }
                    continue;
                }
                i = net.accept() => match i { Some(i) => i, None => break },
            };
            let remote = incoming.remote_address();
            let me = Ingest {
                cfg: self.cfg.clone(),
                inbox: self.inbox.clone(),
                link: self.link.clone(),
                sessions: self.sessions.clone(),
                writer: self.writer.clone(),
            };
            // The handshake runs in the session's own task: a peer that
            // connects and says nothing holds that task (until the
            // handshake timeout), not the accept loop.
            sessions.spawn(async move {
                let conn = match incoming.establish().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(peer = %remote, error = %e, "incoming connection failed");
                        return (remote, Ok(()));
                    }
                };
                if let Err(e) = me.check_peer(&conn) {
                    tracing::warn!(peer = %remote, error = %e, "refusing connection");
                    conn.close(1, b"not a pinned sender");
                    return (remote, Ok(()));
                }
                let id = me.sessions.lock().expect("sessions lock").begin();
                (remote, me.session(&conn, id).await)
            });
        }
        for conn in self.sessions.lock().expect("sessions lock").drain() {
            conn.close(0, b"receiver stopping");
        }
        sessions.shutdown().await;
    }

    fn check_peer(&self, conn: &Conn) -> Result<(), IngestError> {
        match conn.peer_fingerprint() {
            Some(fp) if self.cfg.sender_fingerprints.contains(&fp) => Ok(()),
            other => {
                conn.close(1, b"not a pinned sender");
                Err(IngestError::WrongPeer(
                    other
                        .map(|f: Fingerprint| f.to_string())
                        .unwrap_or_else(|| "none".into()),
                ))
            }
        }
    }

    /// One session: hello, then store and acknowledge batches until the
    /// connection ends.
    async fn session(&self, conn: &Conn, id: SessionId) -> Result<(), IngestError> {
        let mut writing = None;
        let result = self.serve(conn, id, &mut writing).await;
        self.sessions.lock().expect("sessions lock").ended(&(), id);
        if matches!(result, Err(IngestError::Session(ReceiverError::Refetch))) {
            // The sender resumes from our lower durable mark on the next
            // connection.
            conn.close(3, b"re-fetching records");
        } else {
            // The TCP socket ends with the session (QUIC's when dropped).
            conn.close(0, b"");
        }
        if writing.is_some() {
            let mut link = self.link.lock().expect("link lock");
            link.connected = false;
            link.rtt_ms = None;
            link.transport.current = None;
        }
        result
    }

    async fn serve<'a>(
        &'a self,
        conn: &Conn,
        id: SessionId,
        writing: &mut Option<tokio::sync::MutexGuard<'a, ()>>,
    ) -> Result<(), IngestError> {
        let (mut control_tx, mut control_rx) = conn.open_control().await?;
        let mut truncations = self.inbox.subscribe_truncations();
        truncations.borrow_and_update();
        let mut core = ReceiverSession::new(InboxFacts {
            source: self.inbox.source()?,
            spool: self.inbox.spool_id()?,
            durable_seq: self.inbox.durable_seq(),
        });
        for frame in core.hello() {
            framed::write_frame(&mut control_tx, &frame).await?;
        }
        let answer = framed::read_frame(&mut control_rx).await?;
        let inbox_empty = self.inbox.first_seq()?.is_none();
        let welcomed = core.on_welcome(answer, inbox_empty)?;
        if welcomed.adopt_spool {
            let spool = welcomed.spool.clone();
            blocking(&self.inbox, move |inbox| inbox.set_spool_id(&spool)).await?;
        }
        // Before the source: apply, waiting for a new inbox's source,
        // then finds the fingerprint its origin is named after.
        if let Some(fp) = conn.peer_fingerprint() {
            let fp = fp.to_string();
            blocking(&self.inbox, move |inbox| inbox.set_sender_fingerprint(&fp)).await?;
        }
        if welcomed.adopt_source {
            let source = welcomed.source.clone();
            blocking(&self.inbox, move |inbox| inbox.set_source(&source)).await?;
        }
        if let Some(seq) = welcomed.start_at_copy {
            let source = welcomed.source.clone();
            blocking(&self.inbox, move |inbox| inbox.reset_to_seed(&source, seq)).await?;
            tracing::info!(
                start = seq + 1,
                "new branch: starting at the copy of the tables the sender made for it"
            );
        }
        // Welcomed by a sender of our source: this session takes over.
        if let Some(old) =
            self.sessions
                .lock()
                .expect("sessions lock")
                .welcomed(&(), id, conn.clone())
        {
            old.close(2, b"superseded");
        }
        *writing = Some(self.writer.lock().await);
        // The inbox may have moved while the session before ended.
        let durable = self.inbox.durable_seq();
        tracing::info!(peer = %conn.remote_address(), transport = conn.transport(), durable_seq = durable, "connected to sender; receiving");
        {
            let mut link = self.link.lock().expect("link lock");
            link.connected = true;
            link.peer = Some(conn.remote_address().to_string());
            link.transport.current = Some(conn.transport().to_owned());
            link.connected_since =
                Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
            link.connections += 1;
        }
        let mut data = framed::Counting::new(conn.accept_data(control_rx).await?);
        let mut whole = 0u64;
        let core = Mutex::new(core);
        let (ack_tx, ack_rx) = tokio::sync::mpsc::channel::<Synced<u64>>(64);
        // Both halves run in this one task (`select!`): the core's lock is
        // never contended.
        let result = tokio::select! {
            r = self.receive(&core, &mut data, &mut whole, ack_tx, &truncations, conn) => r,
            r = self.report(&core, &mut control_tx, ack_rx, truncations.clone()) => r,
        };
        let discarded = data.bytes.saturating_sub(whole);
        if discarded > 0 {
            self.link.lock().expect("link lock").discarded_bytes += discarded;
            tracing::info!(
                discarded_bytes = discarded,
                "discarded the part of a batch the link cut; the sender ships it again"
            );
        }
        result
    }

    /// The control stream back to the sender: `Ack` for what is stored
    /// (only marks from after the fsync), `Applied` for what is applied
    /// (the sender trims its spool behind that). Ends the session when the
    /// inbox is truncated.
    async fn report(
        &self,
        core: &Mutex<ReceiverSession>,
        control_tx: &mut SendHalf,
        mut acks: tokio::sync::mpsc::Receiver<Synced<u64>>,
        mut truncations: tokio::sync::watch::Receiver<u64>,
    ) -> Result<(), IngestError> {
        let lock = || core.lock().expect("session core lock");
        let mut applied_rx = self.inbox.subscribe_applied();
        loop {
            let applied = *applied_rx.borrow_and_update();
            let report = lock().applied(applied);
            if let Some(frame) = report {
                framed::write_frame(control_tx, &frame).await?;
            }
            tokio::select! {
                a = acks.recv() => match a {
                    Some(synced) => {
                        let frame = lock().stored(synced.get());
                        framed::write_frame(control_tx, &frame).await?;
                    }
                    None => return Ok(()),
                },
                r = applied_rx.changed() => if r.is_err() { return Ok(()) },
                r = truncations.changed() => {
                    if r.is_err() { return Ok(()) }
                    return Err(ReceiverError::Refetch.into());
                }
            }
        }
    }

    /// Hold a batch of `need` bytes back (unacknowledged: the sender keeps
    /// it and stops at its in-flight limit) while it would take the inbox
    /// past `inbox-max-bytes`, until apply frees space. An inbox that holds
    /// no complete transaction apply could commit (empty, or the start of one
    /// transaction larger than the limit) always takes a batch.
    async fn wait_for_room(
        &self,
        need: u64,
        truncations: &tokio::sync::watch::Receiver<u64>,
    ) -> Result<(), IngestError> {
        let max = self.cfg.inbox_max_bytes;
        let mut applied = self.inbox.subscribe_applied();
        loop {
            let bytes = self.inbox.bytes();
            if inbox_has_room(bytes, need, max, self.inbox.holds_complete_transaction()) {
                break;
            }
            if !self.inbox.is_full() {
                self.inbox.set_full(true);
                tracing::error!(inbox_bytes = bytes, inbox_max_bytes = max, "the inbox is at inbox-max-bytes: batches wait at the sender until apply frees space");
            }
            if truncations.has_changed().unwrap_or(false) {
                return Err(ReceiverError::Refetch.into());
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), applied.changed()).await;
        }
        if self.inbox.is_full() {
            self.inbox.set_full(false);
            tracing::info!("the inbox has room again; receiving");
        }
        Ok(())
    }

    async fn receive(
        &self,
        core: &Mutex<ReceiverSession>,
        data: &mut framed::Counting<RecvHalf>,
        whole: &mut u64,
        acks: tokio::sync::mpsc::Sender<Synced<u64>>,
        truncations: &tokio::sync::watch::Receiver<u64>,
        conn: &Conn,
    ) -> Result<(), IngestError> {
        loop {
            let frame = match framed::read_frame(data).await? {
                Some(f) => f,
                None => return Ok(()),
            };
            *whole = data.bytes;
            let Frame::Batch {
                first_seq,
                last_seq,
                raw_len,
                payload,
            } = frame
            else {
                return Err(core
                    .lock()
                    .expect("session core lock")
                    .on_data_frame(&frame)
                    .into());
            };
            let durable = self.inbox.synced_seq();
            let truncated = truncations.has_changed().unwrap_or(false);
            let verdict = core.lock().expect("session core lock").on_batch(
                first_seq,
                last_seq,
                durable.get(),
                truncated,
            )?;
            let skip = match verdict {
                BatchVerdict::Replay { ack } => {
                    // `ack` is at or below the synced durable mark.
                    debug_assert!(ack <= durable.get());
                    if acks.send(Synced::after_sync(ack)).await.is_err() {
                        return Ok(());
                    }
                    continue;
                }
                BatchVerdict::Store { skip } => skip,
            };
            let mut records = frame::decode_batch(first_seq, last_seq, raw_len, &payload)
                .map_err(WireError::from)?;
            {
                let mut link = self.link.lock().expect("link lock");
                link.batches += 1;
                link.compressed_bytes += payload.len() as u64;
                link.raw_bytes += u64::from(raw_len);
                link.rtt_ms = Some(conn.rtt().as_secs_f64() * 1000.0);
            }
            records.drain(..skip);
            let need: u64 = records.iter().map(|r| r.len() as u64).sum();
            self.wait_for_room(need, truncations).await?;
            let from = durable.get() + 1;
            let stored =
                blocking(&self.inbox, move |inbox| inbox.store_batch(from, &records)).await?;
            let Some(stored) = stored else {
                // Truncated between the check and the store.
                return Err(ReceiverError::Refetch.into());
            };
            if acks.send(stored).await.is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use pgcourier_proto::session::Refusal;

    use super::*;

    fn refused(class: Class) -> IngestError {
        IngestError::Session(ReceiverError::Refused {
            refusal: Refusal {
                reason: "the sender has not reached its source database yet; retry later".into(),
                class,
            },
        })
    }

    #[test]
    fn definite_refusals_and_wrong_peers_are_not_retried_and_only_inbox_faults_stop_a_listener() {
        assert_eq!(refused(Class::Transient).class(), Class::Transient);
        assert_eq!(refused(Class::Definite).class(), Class::Definite);
        assert!(
            !refused(Class::Definite).stops_ingest(),
            "one sender's refusal"
        );
        assert_eq!(
            refused(Class::Transient).to_string(),
            "sender refused: the sender has not reached its source database yet; retry later"
        );
        let gap = IngestError::Session(ReceiverError::Gap {
            durable: 3,
            first: 9,
        });
        assert_eq!(gap.class(), Class::Definite);
        assert!(gap.stops_ingest());
        let other = IngestError::Session(ReceiverError::WrongSource {
            ours: "a".into(),
            offered: "b".into(),
        });
        assert_eq!(other.class(), Class::Definite);
        assert!(
            !other.stops_ingest(),
            "an impostor does not stop the good session"
        );
        assert_eq!(
            IngestError::WrongPeer("none".into()).class(),
            Class::Definite
        );
        assert_eq!(
            IngestError::Session(ReceiverError::Refetch).class(),
            Class::Transient
        );
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(
            IngestError::Wire(WireError::Io(io)).class(),
            Class::Transient
        );
        assert_eq!(
            IngestError::Link(LinkError::Quic(quinn::ConnectionError::TimedOut)).class(),
            Class::Transient
        );
        assert!(
            IngestError::Link(LinkError::Quic(quinn::ConnectionError::ApplicationClosed(
                quinn::ApplicationClose {
                    error_code: 0u32.into(),
                    reason: Default::default()
                }
            )))
            .is_clean_close()
        );
    }
}
