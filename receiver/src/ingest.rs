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

use pgcourier_common::backoff::{error_chain, Backoff};
use pgcourier_common::quic::{peer_fingerprint, SERVER_NAME};
use pgcourier_common::tls::Fingerprint;
use pgcourier_common::wire::{self, Frame, WireError, PROTOCOL_VERSION};
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
    Inbox(#[from] pgcourier_common::durable::StoreError),
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
#[derive(Clone, Debug, Default, serde::Serialize)]
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
}

impl Ingest {
    pub fn new(cfg: Arc<ReceiverConfig>, inbox: Arc<Inbox>) -> Ingest {
        Ingest {
            cfg,
            inbox,
            link: Arc::default(),
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
        // One session at a time: a new connection from the sender replaces
        // the old one (which may be half-dead after a link outage).
        let mut current: Option<(quinn::Connection, tokio::task::JoinHandle<()>)> = None;
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Result<(), IngestError>>(4);
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(result) = done_rx.recv() => {
                    if let Err(e) = result {
                        if e.is_definite() {
                            tracing::error!(error = %error_chain(&e), "ingest stopped: the operator must act");
                            shutdown.cancelled().await;
                            break;
                        }
                        if e.is_clean_close() {
                            tracing::info!("the sender closed the connection; waiting for it to reconnect");
                        } else {
                            tracing::warn!(error = %error_chain(&e), "sender session ended; waiting for the sender to reconnect");
                        }
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
            if let Some((old, task)) = current.take() {
                old.close(2u32.into(), b"superseded");
                task.abort();
                let _ = task.await;
            }
            let me = Ingest {
                cfg: self.cfg.clone(),
                inbox: self.inbox.clone(),
                link: self.link.clone(),
            };
            let tx = done_tx.clone();
            let c = conn.clone();
            let task = tokio::spawn(async move {
                let r = me.session(&c).await;
                let _ = tx.send(r).await;
            });
            current = Some((conn, task));
        }
        if let Some((conn, task)) = current {
            conn.close(0u32.into(), b"receiver stopping");
            task.abort();
            let _ = task.await;
        }
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
        let result = self.serve(conn).await;
        let mut link = self.link.lock().expect("link lock");
        link.connected = false;
        link.rtt_ms = None;
        result
    }

    async fn serve(&self, conn: &quinn::Connection) -> Result<(), IngestError> {
        let (mut control_tx, mut control_rx) = conn.open_bi().await?;
        let source = self.inbox.source()?;
        let mut durable = self.inbox.durable_seq();
        wire::write_frame(
            &mut control_tx,
            &Frame::Hello {
                protocol: PROTOCOL_VERSION,
                source: source.clone(),
                durable_seq: durable,
            },
        )
        .await?;
        match wire::read_frame(&mut control_rx).await? {
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
        tracing::info!(peer = %conn.remote_address(), durable_seq = durable, "connected to sender; receiving");
        {
            let mut link = self.link.lock().expect("link lock");
            link.connected = true;
            link.peer = Some(conn.remote_address().to_string());
            link.connected_since =
                Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
            link.connections += 1;
        }
        let mut data = wire::Counting::new(conn.accept_uni().await?);
        let mut whole = 0u64;
        let result = self
            .receive(&mut data, &mut whole, &mut control_tx, conn)
            .await;
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

    async fn receive(
        &self,
        data: &mut wire::Counting<quinn::RecvStream>,
        whole: &mut u64,
        control_tx: &mut quinn::SendStream,
        conn: &quinn::Connection,
    ) -> Result<(), IngestError> {
        loop {
            let frame = match wire::read_frame(data).await? {
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
            if last_seq <= durable {
                // A batch we already hold (a replay): acknowledge again.
                wire::write_frame(
                    control_tx,
                    &Frame::Ack {
                        durable_seq: durable,
                    },
                )
                .await?;
                continue;
            }
            let records = wire::decode_batch(first_seq, last_seq, raw_len, &payload)?;
            {
                let mut link = self.link.lock().expect("link lock");
                link.batches += 1;
                link.compressed_bytes += payload.len() as u64;
                link.raw_bytes += u64::from(raw_len);
                link.rtt_ms = Some(conn.rtt().as_secs_f64() * 1000.0);
            }
            if first_seq > durable + 1 {
                return Err(IngestError::Gap {
                    durable,
                    first: first_seq,
                });
            }
            let skip = (durable + 1 - first_seq) as usize;
            let stored = self.inbox.store_batch(durable + 1, &records[skip..])?;
            wire::write_frame(
                control_tx,
                &Frame::Ack {
                    durable_seq: stored,
                },
            )
            .await?;
        }
    }
}
