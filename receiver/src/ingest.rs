//! Ingest: QUIC → verified batches → inbox (fsynced) → Ack.
//!
//! The receiver opens the control stream on whichever connection exists
//! (it dialed the sender in reverse mode, or accepted the sender's dial),
//! says `Hello` with the highest record it holds durably, and then stores
//! every batch that arrives on the sender's data stream. A batch is checked
//! (size bounds, zstd, every record's checksum, dense sequence) before it is
//! written; the `Ack` goes out only after the inbox fsync.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgcourier_common::ops::backoff::{error_chain, Backoff};
use pgcourier_common::transport::quic::{peer_fingerprint, SERVER_NAME};
use pgcourier_common::transport::tls::Fingerprint;
use pgcourier_common::transport::framed::{self, WireError};
use pgcourier_proto::frame::{self, Frame, PROTOCOL_VERSION};
use tokio_util::sync::CancellationToken;

use crate::config::{Link, ReceiverConfig};
use crate::inbox::Inbox;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("connection failed")]
    Connection(#[from] quinn::ConnectionError),
    #[error("cannot start connection")]
    Connect(#[from] quinn::ConnectError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("inbox write failed")]
    Inbox(#[from] pgcourier_common::store::durable::StoreError),
    #[error("sender refused: {0}")]
    Refused(String),
    #[error("sender broke the protocol: {0}")]
    Protocol(String),
    #[error("sender ships source {offered} but this inbox belongs to {ours}: use a new inbox-dir for a new source")]
    WrongSource { ours: String, offered: String },
    #[error("gap: the inbox holds up to record {durable} but the sender resumes at {first}: records in between are lost; re-seed this branch")]
    Gap { durable: u64, first: u64 },
    #[error("peer presented certificate {0}, which is not a pinned sender fingerprint")]
    WrongPeer(String),
    #[error("the inbox dropped a corrupt record and everything after it; reconnecting to fetch them again")]
    Refetch,
}

impl IngestError {
    /// The peer closed the connection on purpose (stopping, superseded).
    pub fn is_clean_close(&self) -> bool {
        let conn = match self {
            IngestError::Connection(c) => Some(c),
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

    /// A definite error: retrying the same connection will not help.
    pub fn is_definite(&self) -> bool {
        matches!(
            self,
            IngestError::WrongSource { .. } | IngestError::Gap { .. } | IngestError::Inbox(_)
        )
    }
}

/// The link as the receiver sees it, for status and metrics.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    pub connected: bool,
    pub peer: Option<String>,
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
}

pub struct Ingest {
    cfg: Arc<ReceiverConfig>,
    inbox: Arc<Inbox>,
    pub link: Arc<std::sync::Mutex<LinkStatus>>,
    /// The connection of the session that writes the inbox; a newer session
    /// closes it once the sender on it is welcomed (so an impostor or a
    /// wrong sender cannot interrupt a good session).
    current: Arc<std::sync::Mutex<Option<quinn::Connection>>>,
    /// Held by the session that writes the inbox, from its welcome on.
    writer: Arc<tokio::sync::Mutex<()>>,
}

impl Ingest {
    pub fn new(cfg: Arc<ReceiverConfig>, inbox: Arc<Inbox>) -> Ingest {
        Ingest {
            cfg,
            inbox,
            link: Arc::default(),
            current: Arc::default(),
            writer: Arc::default(),
        }
    }

    pub async fn run(self, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
        match self.cfg.link.clone() {
            Link::Dial(addr) => self.dial_loop(&endpoint, addr, &shutdown).await,
            Link::Listen(_) => self.accept_loop(&endpoint, &shutdown).await,
        }
        endpoint.close(0u32.into(), b"receiver stopping");
    }

    async fn dial_loop(
        &self,
        endpoint: &quinn::Endpoint,
        addr: std::net::SocketAddr,
        shutdown: &CancellationToken,
    ) {
        let mut backoff = Backoff::new(self.cfg.max_backoff);
        loop {
            let started = Instant::now();
            let attempt = async {
                let conn = endpoint.connect(addr, SERVER_NAME)?.await?;
                self.check_peer(&conn)?;
                self.session(&conn).await
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = attempt => r,
            };
            if started.elapsed() > Duration::from_secs(10) {
                backoff.reset();
            }
            let delay = backoff.next();
            if let Err(e) = result {
                if e.is_definite() {
                    tracing::error!(error = %error_chain(&e), "ingest stopped: the operator must act");
                    shutdown.cancelled().await;
                    return;
                }
                backoff.log_once(&format!("receive from sender at {addr}"), &e, delay);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn accept_loop(&self, endpoint: &quinn::Endpoint, shutdown: &CancellationToken) {
        // Sessions run side by side until one is welcomed by a sender
        // shipping our source; it then closes the one before it (which may be
        // half-dead after a link outage).
        let mut sessions = tokio::task::JoinSet::new();
        let (done_tx, mut done_rx) =
            tokio::sync::mpsc::channel::<(std::net::SocketAddr, Result<(), IngestError>)>(4);
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some((peer, result)) = done_rx.recv() => {
                    while sessions.try_join_next().is_some() {}
                    match result {
                        Err(e @ IngestError::WrongSource { .. }) => {
                            tracing::error!(peer = %peer, error = %error_chain(&e), "refused a sender that ships another source; the current session goes on");
                        }
                        Err(e) if e.is_definite() => {
                            tracing::error!(error = %error_chain(&e), "ingest stopped: the operator must act");
                            shutdown.cancelled().await;
                            break;
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
                i = endpoint.accept() => match i { Some(i) => i, None => break },
            };
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(peer = %remote, error = %e, "incoming connection failed");
                    continue;
                }
            };
            if let Err(e) = self.check_peer(&conn) {
                tracing::warn!(peer = %remote, error = %e, "refusing connection");
                conn.close(1u32.into(), b"not a pinned sender");
                continue;
            }
            let me = Ingest {
                cfg: self.cfg.clone(),
                inbox: self.inbox.clone(),
                link: self.link.clone(),
                current: self.current.clone(),
                writer: self.writer.clone(),
            };
            let tx = done_tx.clone();
            sessions.spawn(async move {
                let r = me.session(&conn).await;
                let _ = tx.send((remote, r)).await;
            });
        }
        if let Some(conn) = self.current.lock().expect("current lock").take() {
            conn.close(0u32.into(), b"receiver stopping");
        }
        sessions.shutdown().await;
    }

    fn check_peer(&self, conn: &quinn::Connection) -> Result<(), IngestError> {
        match peer_fingerprint(conn) {
            Some(fp) if self.cfg.sender_fingerprints.contains(&fp) => Ok(()),
            other => {
                conn.close(1u32.into(), b"not a pinned sender");
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
    async fn session(&self, conn: &quinn::Connection) -> Result<(), IngestError> {
        let mut writing = None;
        let result = self.serve(conn, &mut writing).await;
        if matches!(result, Err(IngestError::Refetch)) {
            // The sender resumes from our lower durable mark on the next
            // connection.
            conn.close(3u32.into(), b"re-fetching records");
        }
        if writing.is_some() {
            let mut link = self.link.lock().expect("link lock");
            link.connected = false;
            link.rtt_ms = None;
        }
        result
    }

    async fn serve<'a>(
        &'a self,
        conn: &quinn::Connection,
        writing: &mut Option<tokio::sync::MutexGuard<'a, ()>>,
    ) -> Result<(), IngestError> {
        let (mut control_tx, mut control_rx) = conn.open_bi().await?;
        let mut truncations = self.inbox.subscribe_truncations();
        truncations.borrow_and_update();
        let source = self.inbox.source()?;
        let mut durable = self.inbox.durable_seq();
        let mut hello_durable = durable;
        framed::write_frame(
            &mut control_tx,
            &Frame::Hello {
                protocol: PROTOCOL_VERSION,
                source: source.clone(),
                durable_seq: durable,
            },
        )
        .await?;
        match framed::read_frame(&mut control_rx).await? {
            Some(Frame::Welcome {
                source: offered,
                first_seq,
            }) => {
                match &source {
                    Some(ours) if *ours != offered => {
                        return Err(IngestError::WrongSource {
                            ours: ours.clone(),
                            offered,
                        })
                    }
                    Some(_) => {}
                    None => self.inbox.set_source(&offered)?,
                }
                if first_seq > durable + 1 {
                    if durable == 0 && self.inbox.first_seq()?.is_none() {
                        // A new branch: the sender made a copy of the tables
                        // for it and starts it there.
                        self.inbox.reset_to_seed(&offered, first_seq - 1)?;
                        tracing::info!(
                            start = first_seq,
                            "new branch: starting at the copy of the tables the sender made for it"
                        );
                        durable = first_seq - 1;
                        // The sender counts us at the copy's start already.
                        hello_durable = durable;
                    } else {
                        return Err(IngestError::Gap {
                            durable,
                            first: first_seq,
                        });
                    }
                }
            }
            Some(Frame::Refuse { reason }) => return Err(IngestError::Refused(reason)),
            Some(_) => return Err(IngestError::Protocol("expected Welcome".into())),
            None => {
                return Err(IngestError::Protocol(
                    "control stream closed before Welcome".into(),
                ))
            }
        }
        // Welcomed by a sender of our source: this session takes over.
        if let Some(old) = self
            .current
            .lock()
            .expect("current lock")
            .replace(conn.clone())
        {
            old.close(2u32.into(), b"superseded");
        }
        *writing = Some(self.writer.lock().await);
        // The inbox may have moved while the session before ended.
        let durable = self.inbox.durable_seq();
        tracing::info!(peer = %conn.remote_address(), durable_seq = durable, "connected to sender; receiving");
        {
            let mut link = self.link.lock().expect("link lock");
            link.connected = true;
            link.peer = Some(conn.remote_address().to_string());
            link.connected_since =
                Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
            link.connections += 1;
        }
        let mut data = framed::Counting::new(conn.accept_uni().await?);
        let mut whole = 0u64;
        let (ack_tx, ack_rx) = tokio::sync::mpsc::channel::<u64>(64);
        let result = tokio::select! {
            r = self.receive(&mut data, &mut whole, ack_tx, &truncations, conn) => r,
            r = self.report(&mut control_tx, hello_durable, ack_rx, truncations.clone()) => r,
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

    /// The control stream back to the sender: `Ack` for what is stored,
    /// `Applied` for what is applied (the sender trims its spool behind
    /// that). Ends the session when the inbox is truncated.
    async fn report(
        &self,
        control_tx: &mut quinn::SendStream,
        hello_durable: u64,
        mut acks: tokio::sync::mpsc::Receiver<u64>,
        mut truncations: tokio::sync::watch::Receiver<u64>,
    ) -> Result<(), IngestError> {
        let mut applied_rx = self.inbox.subscribe_applied();
        let mut reported = None;
        // Never report past what this session told the sender we hold (an
        // earlier session may have stored and applied more since `Hello`).
        let mut told = hello_durable;
        loop {
            let applied = (*applied_rx.borrow_and_update()).min(told);
            if reported != Some(applied) {
                framed::write_frame(control_tx, &Frame::Applied { seq: applied }).await?;
                reported = Some(applied);
            }
            tokio::select! {
                a = acks.recv() => match a {
                    Some(seq) => {
                        framed::write_frame(control_tx, &Frame::Ack { durable_seq: seq }).await?;
                        told = told.max(seq);
                    }
                    None => return Ok(()),
                },
                r = applied_rx.changed() => if r.is_err() { return Ok(()) },
                r = truncations.changed() => {
                    if r.is_err() { return Ok(()) }
                    return Err(IngestError::Refetch);
                }
            }
        }
    }

    /// Hold a batch of `need` bytes back (unacknowledged: the sender keeps
    /// it and stops at its in-flight limit) while it would take the inbox
    /// past `inbox-max-bytes`, until apply frees space. An empty inbox
    /// always takes a batch.
    async fn wait_for_room(
        &self,
        need: u64,
        truncations: &tokio::sync::watch::Receiver<u64>,
    ) -> Result<(), IngestError> {
        let Some(max) = self.cfg.inbox_max_bytes else {
            return Ok(());
        };
        let mut applied = self.inbox.subscribe_applied();
        loop {
            let bytes = self.inbox.bytes();
            if bytes == 0 || bytes + need <= max {
                break;
            }
            if !self.inbox.is_full() {
                self.inbox.set_full(true);
                tracing::error!(inbox_bytes = bytes, inbox_max_bytes = max, "the inbox is at inbox-max-bytes: batches wait at the sender until apply frees space");
            }
            if truncations.has_changed().unwrap_or(false) {
                return Err(IngestError::Refetch);
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
        data: &mut framed::Counting<quinn::RecvStream>,
        whole: &mut u64,
        acks: tokio::sync::mpsc::Sender<u64>,
        truncations: &tokio::sync::watch::Receiver<u64>,
        conn: &quinn::Connection,
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
                return Err(IngestError::Protocol(
                    "expected Batch on the data stream".into(),
                ));
            };
            let durable = self.inbox.durable_seq();
            if batch_action(durable, first_seq, last_seq) == BatchAction::Replay {
                // A batch we already hold (a replay): acknowledge it again
                // (not more: the sender may not have sent more on this
                // connection).
                if acks.send(last_seq).await.is_err() {
                    return Ok(());
                }
                continue;
            }
            let records = frame::decode_batch(first_seq, last_seq, raw_len, &payload).map_err(WireError::from)?;
            {
                let mut link = self.link.lock().expect("link lock");
                link.batches += 1;
                link.compressed_bytes += payload.len() as u64;
                link.raw_bytes += u64::from(raw_len);
                link.rtt_ms = Some(conn.rtt().as_secs_f64() * 1000.0);
            }
            let truncated = truncations.has_changed().unwrap_or(false);
            if let BatchAction::Store { skip } = batch_action(durable, first_seq, last_seq) {
                let need: u64 = records[skip..].iter().map(|r| r.len() as u64).sum();
                self.wait_for_room(need, truncations).await?;
            }
            let BatchAction::Store { skip } = batch_action(durable, first_seq, last_seq) else {
                if truncated {
                    return Err(IngestError::Refetch);
                }
                return Err(IngestError::Gap {
                    durable,
                    first: first_seq,
                });
            };
            let Some(stored) = self.inbox.store_batch(durable + 1, &records[skip..])? else {
                // Truncated between the check and the store.
                return Err(IngestError::Refetch);
            };
            if acks.send(stored).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// What to do with a batch of records `first..=last` when the inbox holds
/// everything up to `durable`.
#[derive(Debug, PartialEq, Eq)]
enum BatchAction {
    /// Already held (an old batch replayed, or re-sent after a reconnect):
    /// store nothing, acknowledge `durable` again.
    Replay,
    /// Store the records after the first `skip` (which are already held).
    Store { skip: usize },
    /// Records between `durable` and `first` are missing: never store past a
    /// gap.
    Gap,
}

fn batch_action(durable: u64, first: u64, last: u64) -> BatchAction {
    if last <= durable {
        BatchAction::Replay
    } else if first > durable + 1 {
        BatchAction::Gap
    } else {
        BatchAction::Store {
            skip: (durable + 1 - first) as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_batches_are_ignored_overlaps_trimmed_and_gaps_refused() {
        assert_eq!(batch_action(10, 1, 5), BatchAction::Replay);
        assert_eq!(batch_action(10, 10, 10), BatchAction::Replay);
        assert_eq!(batch_action(10, 11, 20), BatchAction::Store { skip: 0 });
        assert_eq!(batch_action(10, 8, 12), BatchAction::Store { skip: 3 });
        assert_eq!(batch_action(10, 12, 20), BatchAction::Gap);
        assert_eq!(batch_action(0, 1, 1), BatchAction::Store { skip: 0 });
    }
}
