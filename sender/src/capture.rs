//! Capture: source WAL → pgoutput messages → spool records.
//!
//! The slot is read with `pg_logical_slot_peek_binary_changes` (proto_version
//! 1: only committed transactions, each whole and in commit order) and its
//! rows are streamed, never collected, into records of at most ~48 KiB. After
//! a call's transactions are appended, [`Spool::commit`] fsyncs them, and
//! only then is the slot advanced (`pg_replication_slot_advance`) to the last
//! commit's end LSN: the slot never confirms what the spool could lose.
//!
//! After a crash between the spool fsync and the slot advance, the next peek
//! returns transactions already spooled; they are recognised by their commit
//! LSN (at or below the spool's `captured_commit_lsn`) and skipped.
//!
//! A quiet publication would pin WAL on the source forever (PostgreSQL 15
//! emits nothing for transactions that touch no published table), so when a
//! peek returns nothing the slot is advanced to the WAL insert position read
//! before the peek, provided WAL was flushed that far: every commit record
//! that starts below that position was then visible to the peek.

use std::sync::Arc;

use futures_util::{pin_mut, TryStreamExt};
use pgcourier_common::pgoutput::{self, Message};
use pgcourier_common::record::{Piece, Record, TARGET_RECORD_BYTES};
use pgcourier_common::Lsn;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::SenderConfig;
use crate::source::{self, SourceError};
use crate::spool::Spool;

/// Largest piece of one pgoutput message stored in a record; bigger messages
/// are split into fragments.
const MAX_PIECE_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("spool write failed")]
    Spool(#[from] pgcourier_common::durable::StoreError),
    #[error("record encoding failed")]
    Record(#[from] pgcourier_common::record::RecordError),
    #[error("pgoutput message from the slot does not decode")]
    Decode(#[from] pgoutput::DecodeError),
    #[error("pgoutput stream out of order: {0}")]
    Protocol(&'static str),
}

impl CaptureError {
    /// Worth retrying after a pause (connection lost, server restarting).
    pub fn is_transient(&self) -> bool {
        matches!(self, CaptureError::Source(e) if e.is_transient())
    }
}

/// Counters for status and logs.
#[derive(Default, Debug, Clone, Copy)]
pub struct PollOutcome {
    pub transactions: u64,
    pub records: u64,
    pub skipped: u64,
}

/// The transaction being cut into records.
struct Cutter {
    seq: u64,
    commit_lsn: Lsn,
    commit_time: i64,
    xid: u32,
    part: u32,
    pieces: Vec<Piece>,
    bytes: usize,
}

impl Cutter {
    fn take(&mut self, last: bool, end_lsn: Lsn) -> Record {
        let record = Record {
            seq: self.seq,
            commit_lsn: self.commit_lsn,
            commit_time: self.commit_time,
            xid: self.xid,
            part: self.part,
            last,
            end_lsn: if last { end_lsn } else { Lsn::ZERO },
            pieces: std::mem::take(&mut self.pieces),
        };
        self.seq += 1;
        self.part += 1;
        self.bytes = 0;
        record
    }
}

/// Capture's state for status and metrics.
#[derive(Clone, Debug, Default)]
pub struct CaptureStatus {
    pub slot: Option<source::SlotStats>,
    pub last_error: Option<String>,
    /// Capture is paused: the spool holds `spool-max-bytes` or more.
    pub spool_full: bool,
    pub transactions: u64,
}

pub struct Capture {
    cfg: Arc<SenderConfig>,
    spool: Arc<Spool>,
    pub status: Arc<std::sync::Mutex<CaptureStatus>>,
    /// The slot's confirmed_flush_lsn as last seen or set by us.
    confirmed: Lsn,
}

impl Capture {
    pub fn new(cfg: Arc<SenderConfig>, spool: Arc<Spool>) -> Capture {
        Capture {
            cfg,
            spool,
            status: Arc::default(),
            confirmed: Lsn::ZERO,
        }
    }

    /// Capture until `shutdown`, reconnecting with backoff on transient
    /// errors. Returns a definite error (the operator must act).
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), CaptureError> {
        let mut backoff = crate::Backoff::new(self.cfg.max_backoff);
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.session(&shutdown) => r,
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    self.status.lock().expect("status lock").last_error =
                        Some(pgcourier_common::backoff::error_chain(&e));
                    let delay = backoff.next();
                    backoff.log_once("capture", &e, delay);
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    self.status.lock().expect("status lock").last_error =
                        Some(pgcourier_common::backoff::error_chain(&e));
                    return Err(e);
                }
            }
        }
    }

    async fn session(&mut self, shutdown: &CancellationToken) -> Result<(), CaptureError> {
        let client = source::connect(&self.cfg.source).await?;
        let resuming = self.spool.source()?.is_some();
        let identity = source::prepare(&client, &self.cfg, resuming).await?;
        match self.spool.source()? {
            Some(s) if s != identity.source_id => {
                return Err(SourceError::WrongSource {
                    spool: s,
                    configured: identity.source_id,
                }
                .into());
            }
            Some(_) => {}
            None => self.spool.set_source(&identity.source_id)?,
        }
        self.confirmed = identity.confirmed_flush;
        tracing::info!(slot = %self.cfg.slot, confirmed = %self.confirmed, "capturing from source");
        {
            let mut st = self.status.lock().expect("status lock");
            st.last_error = None;
            // Re-checked (and re-reported) before the first peek.
            st.spool_full = false;
        }
        let mut stats_at = std::time::Instant::now() - std::time::Duration::from_secs(60);
        loop {
            if self.spool_full() {
                // Paused: the slot keeps WAL on the source until receivers
                // catch up and the spool is trimmed.
                if stats_at.elapsed() >= std::time::Duration::from_secs(2) {
                    stats_at = std::time::Instant::now();
                    let stats = source::slot_stats(&client, &self.cfg.slot).await?;
                    self.status.lock().expect("status lock").slot = stats;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                }
                continue;
            }
            let outcome = self.poll(&client).await?;
            self.status.lock().expect("status lock").transactions += outcome.transactions;
            if stats_at.elapsed() >= std::time::Duration::from_secs(2) {
                stats_at = std::time::Instant::now();
                let stats = source::slot_stats(&client, &self.cfg.slot).await?;
                self.status.lock().expect("status lock").slot = stats;
            }
            if outcome.transactions == 0 && outcome.skipped == 0 {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                }
            } else if shutdown.is_cancelled() {
                return Ok(());
            }
        }
    }

    /// Whether the spool is at `spool-max-bytes`; logs and reports the
    /// change either way.
    fn spool_full(&self) -> bool {
        let Some(max) = self.cfg.spool_max_bytes else {
            return false;
        };
        let bytes = self.spool.bytes();
        let full = bytes >= max;
        let mut st = self.status.lock().expect("status lock");
        if full != st.spool_full {
            st.spool_full = full;
            if full {
                let retained = st
                    .slot
                    .as_ref()
                    .and_then(|s| s.retained_wal_bytes)
                    .unwrap_or(0);
                let message = format!("the spool holds {bytes} bytes, at spool-max-bytes ({max}): capture is paused and the slot keeps WAL on the source until the receivers catch up");
                tracing::error!(
                    spool_bytes = bytes,
                    spool_max_bytes = max,
                    retained_wal_bytes = retained,
                    "{message}"
                );
                st.last_error = Some(message);
            } else {
                tracing::info!(
                    spool_bytes = bytes,
                    "the spool has room again; capture resumes"
                );
                st.last_error = None;
            }
        }
        full
    }

    /// One peek of the slot: spool what it returns, fsync, advance the slot.
    pub async fn poll(&mut self, client: &Client) -> Result<PollOutcome, CaptureError> {
        let row = client
            .query_one(
                "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text",
                &[],
            )
            .await
            .map_err(|e| SourceError::query("read WAL position", e))?;
        let insert_lsn: Lsn = parse_lsn(row.get(0))?;
        let flush_lsn: Lsn = parse_lsn(row.get(1))?;

        let skip_through = self.spool.captured_commit_lsn();
        let mut outcome = PollOutcome::default();
        let mut last_end = Lsn::ZERO;
        let mut last_commit = Lsn::ZERO;
        let mut current: Option<Cutter> = None;
        let mut skipping = false;
        let mut in_txn = false;
        let publication = source::quote_ident(&self.cfg.publication);
        let changes = self.cfg.capture_batch_changes as i32;
        let stream = client
            .query_raw(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, \
                 'proto_version', '1', 'publication_names', $3)",
                [
                    &self.cfg.slot as &(dyn tokio_postgres::types::ToSql + Sync),
                    &changes,
                    &publication,
                ],
            )
            .await
            .map_err(|e| SourceError::query("peek replication slot", e))?;
        pin_mut!(stream);
        while let Some(row) = stream
            .try_next()
            .await
            .map_err(|e| SourceError::query("peek replication slot", e))?
        {
            let data: &[u8] = row.get(0);
            match data.first() {
                Some(b'B') => {
                    let Message::Begin {
                        final_lsn,
                        commit_time,
                        xid,
                    } = pgoutput::decode(data)?
                    else {
                        return Err(CaptureError::Protocol(
                            "Begin message does not decode as Begin",
                        ));
                    };
                    if in_txn {
                        return Err(CaptureError::Protocol("Begin inside a transaction"));
                    }
                    in_txn = true;
                    skipping = final_lsn <= skip_through;
                    if !skipping {
                        current = Some(Cutter {
                            seq: self.spool.next_seq(),
                            commit_lsn: final_lsn,
                            commit_time,
                            xid,
                            part: 0,
                            pieces: Vec::new(),
                            bytes: 0,
                        });
                    }
                }
                Some(b'C') => {
                    let Message::Commit {
                        end_lsn,
                        commit_lsn,
                        ..
                    } = pgoutput::decode(data)?
                    else {
                        return Err(CaptureError::Protocol(
                            "Commit message does not decode as Commit",
                        ));
                    };
                    if !in_txn {
                        return Err(CaptureError::Protocol("Commit outside a transaction"));
                    }
                    in_txn = false;
                    last_end = last_end.max(end_lsn);
                    if skipping {
                        outcome.skipped += 1;
                        continue;
                    }
                    let mut cut = current
                        .take()
                        .ok_or(CaptureError::Protocol("Commit without Begin"))?;
                    if cut.commit_lsn != commit_lsn {
                        return Err(CaptureError::Protocol(
                            "Commit LSN differs from Begin final LSN",
                        ));
                    }
                    let record = cut.take(true, end_lsn);
                    self.spool.append(record.seq, &record.encode()?)?;
                    outcome.records += 1;
                    outcome.transactions += 1;
                    last_commit = commit_lsn;
                }
                Some(_) => {
                    if !in_txn {
                        return Err(CaptureError::Protocol("change outside a transaction"));
                    }
                    if skipping {
                        continue;
                    }
                    let cut = current
                        .as_mut()
                        .ok_or(CaptureError::Protocol("change without Begin"))?;
                    if data.len() <= MAX_PIECE_BYTES {
                        if cut.bytes + data.len() > TARGET_RECORD_BYTES && !cut.pieces.is_empty() {
                            let record = cut.take(false, Lsn::ZERO);
                            self.spool.append(record.seq, &record.encode()?)?;
                            outcome.records += 1;
                        }
                        cut.bytes += data.len();
                        cut.pieces.push(Piece::Message(data.to_vec()));
                    } else {
                        // A message too large for one record travels in
                        // fragments, each in a record of its own.
                        if !cut.pieces.is_empty() {
                            let record = cut.take(false, Lsn::ZERO);
                            self.spool.append(record.seq, &record.encode()?)?;
                            outcome.records += 1;
                        }
                        let mut chunks = data.chunks(MAX_PIECE_BYTES).peekable();
                        while let Some(chunk) = chunks.next() {
                            cut.pieces.push(Piece::Fragment {
                                bytes: chunk.to_vec(),
                                more: chunks.peek().is_some(),
                            });
                            if chunks.peek().is_some() {
                                let record = cut.take(false, Lsn::ZERO);
                                self.spool.append(record.seq, &record.encode()?)?;
                                outcome.records += 1;
                            } else {
                                cut.bytes = chunk.len();
                            }
                        }
                    }
                }
                None => return Err(CaptureError::Protocol("empty pgoutput message")),
            }
        }
        if in_txn {
            return Err(CaptureError::Protocol("peek ended inside a transaction"));
        }
        if outcome.transactions > 0 {
            self.spool.commit(last_commit, last_end)?;
            tracing::debug!(transactions = outcome.transactions, records = outcome.records, end_lsn = %last_end, "spooled");
        }
        // Invariant 1: everything up to last_end is fsynced in the spool (or
        // was before this call: skipped transactions).
        let target = if last_end > Lsn::ZERO {
            Some(last_end)
        } else if outcome.skipped == 0 && flush_lsn >= insert_lsn {
            Some(insert_lsn)
        } else {
            None
        };
        if let Some(to) = target {
            if to > self.confirmed {
                source::advance_slot(client, &self.cfg.slot, to).await?;
                self.confirmed = to;
            }
        }
        Ok(outcome)
    }
}

fn parse_lsn(text: &str) -> Result<Lsn, CaptureError> {
    text.parse()
        .map_err(|_| CaptureError::Protocol("server returned an invalid LSN"))
}
