//! Capture: source WAL → pgoutput messages → spool records.
//!
//! The slot is read with `pg_logical_slot_peek_binary_changes` (proto_version
//! 1: only committed transactions, each whole and in commit order) and its
//! rows are streamed, never collected, into records of at most ~24 KiB. After
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

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::{pin_mut, TryStreamExt};
use pgcourier_common::store::seed_file::{CopyMeta, SeedHeader, SeedWriter, COPY_PREFIX, SEED_PREFIX};
use pgcourier_proto::pgoutput::{self, Message};
use pgcourier_proto::record::{Piece, Record, TARGET_RECORD_BYTES};
use pgcourier_proto::Lsn;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::SenderConfig;
use crate::copy::{self, CopyProgress, Cut};
use crate::source::{self, SourceError};
use crate::spool::{CopyState, Spool};

/// Largest piece of one pgoutput message stored in a record; bigger messages
/// are split into fragments.
const MAX_PIECE_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("spool write failed")]
    Spool(#[from] pgcourier_common::store::durable::StoreError),
    #[error("record encoding failed")]
    Record(#[from] pgcourier_proto::record::RecordError),
    #[error("pgoutput message from the slot does not decode")]
    Decode(#[from] pgoutput::DecodeError),
    #[error("pgoutput stream out of order: {0}")]
    Protocol(&'static str),
    #[error("seed export failed: {0}")]
    Seed(String),
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
    /// Transactions whose every change was left to a pending copy.
    pub dropped: u64,
    /// Messages the peek returned (Begin and Commit included).
    pub messages: u64,
}

/// The transaction being cut into records.
struct Cutter {
    seq: u64,
    only_for: Option<String>,
    commit_lsn: Lsn,
    commit_time: i64,
    xid: u32,
    part: u32,
    pieces: Vec<Piece>,
    bytes: usize,
}

impl Cutter {
    fn new(seq: u64, commit_lsn: Lsn, commit_time: i64) -> Cutter {
        Cutter {
            seq,
            only_for: None,
            commit_lsn,
            commit_time,
            xid: 0,
            part: 0,
            pieces: Vec::new(),
            bytes: 0,
        }
    }

    fn take(&mut self, last: bool, end_lsn: Lsn) -> Record {
        let record = Record {
            seq: self.seq,
            only_for: self.only_for.clone(),
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

    /// Add one pgoutput message, handing full records to `emit`. A message
    /// too large for one record travels in fragments, each in a record of
    /// its own.
    fn push(
        &mut self,
        data: &[u8],
        emit: &mut impl FnMut(Record) -> Result<(), CaptureError>,
    ) -> Result<(), CaptureError> {
        if data.len() <= MAX_PIECE_BYTES {
            if self.bytes + data.len() > TARGET_RECORD_BYTES && !self.pieces.is_empty() {
                emit(self.take(false, Lsn::ZERO))?;
            }
            self.bytes += data.len();
            self.pieces.push(Piece::Message(data.to_vec()));
            return Ok(());
        }
        if !self.pieces.is_empty() {
            emit(self.take(false, Lsn::ZERO))?;
        }
        let mut chunks = data.chunks(MAX_PIECE_BYTES).peekable();
        while let Some(chunk) = chunks.next() {
            self.pieces.push(Piece::Fragment {
                bytes: chunk.to_vec(),
                more: chunks.peek().is_some(),
            });
            if chunks.peek().is_some() {
                emit(self.take(false, Lsn::ZERO))?;
            } else {
                self.bytes = chunk.len();
            }
        }
        Ok(())
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
    /// The copy being read, if any.
    pub copy: Option<CopyProgress>,
    /// Tables waiting for a copy.
    pub copy_waiting: usize,
    /// How the last seed export ended.
    pub last_seed: Option<SeedOutcome>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SeedOutcome {
    pub path: String,
    pub summary: Option<SeedSummary>,
    pub error: Option<String>,
}

impl SeedRequest {
    /// Answer the requester and record the outcome for status.
    fn answer(self, status: &std::sync::Mutex<CaptureStatus>, result: Result<SeedSummary, String>) {
        status.lock().expect("status lock").last_seed = Some(SeedOutcome {
            path: self.path.display().to_string(),
            summary: result.as_ref().ok().cloned(),
            error: result.as_ref().err().cloned(),
        });
        if let Err(e) = &result {
            tracing::error!(file = %self.path.display(), error = %e, "seed export failed");
        }
        let _ = self.reply.send(result);
    }
}

/// An operator's request for a seed file (`pgcourier-sender seed export`).
pub struct SeedRequest {
    pub path: PathBuf,
    pub reply: oneshot::Sender<Result<SeedSummary, String>>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SeedSummary {
    pub path: String,
    pub marker_seq: u64,
    pub cut_lsn: String,
    pub tables: usize,
    pub rows: u64,
    pub records: u64,
    pub file_bytes: u64,
    pub seconds: f64,
}

/// What a cut is for.
enum Job {
    /// Copy these tables into the spool: for every receiver, or for one
    /// new receiver only (`only_for`; the others get placeholders, and their
    /// stream keeps every change).
    Copy {
        tables: Vec<u32>,
        reason: String,
        only_for: Option<String>,
    },
    /// Copy every published table into a seed file.
    Seed(SeedRequest),
}

enum Filter {
    Keep,
    Drop,
    Replace(Vec<u8>),
}

pub struct Capture {
    cfg: Arc<SenderConfig>,
    spool: Arc<Spool>,
    pub status: Arc<std::sync::Mutex<CaptureStatus>>,
    /// The slot's confirmed_flush_lsn as last seen or set by us.
    confirmed: Lsn,
    tables: CopyState,
    /// A cut taken and not yet spliced into the spool.
    cut: Option<(Cut, Job)>,
    seeds: Option<mpsc::Receiver<SeedRequest>>,
}

impl Capture {
    pub fn new(cfg: Arc<SenderConfig>, spool: Arc<Spool>) -> Capture {
        Capture {
            cfg,
            spool,
            status: Arc::default(),
            confirmed: Lsn::ZERO,
            tables: CopyState::default(),
            cut: None,
            seeds: None,
        }
    }

    /// Accept seed export requests from this channel.
    pub fn with_seeds(mut self, seeds: mpsc::Receiver<SeedRequest>) -> Capture {
        self.seeds = Some(seeds);
        self
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
            // A cut does not survive its connection.
            if let Some((_, Job::Seed(req))) = self.cut.take() {
                req.answer(
                    &self.status,
                    Err(match &result {
                        Err(e) => pgcourier_common::ops::backoff::error_chain(e),
                        Ok(()) => "the sender is stopping".into(),
                    }),
                );
            }
            self.status.lock().expect("status lock").copy = None;
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    self.status.lock().expect("status lock").last_error =
                        Some(pgcourier_common::ops::backoff::error_chain(&e));
                    let delay = backoff.next();
                    backoff.log_once("capture", &e, delay);
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    self.status.lock().expect("status lock").last_error =
                        Some(pgcourier_common::ops::backoff::error_chain(&e));
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
        self.tables = self.spool.copy_state()?.unwrap_or_default();
        if !self.tables.initial_done {
            let published = copy::published_tables(&client, &self.cfg.publication).await?;
            if self.cfg.initial_copy {
                tracing::info!(
                    tables = published.len(),
                    "new spool: the published tables' rows will be copied first"
                );
                self.tables.waiting.extend(published);
            } else {
                tracing::info!(
                    "new spool, initial-copy = false: only changes from now on are shipped"
                );
                self.tables.synced.extend(published);
            }
            self.tables.initial_done = true;
            self.spool.set_copy_state(&self.tables)?;
            self.spool.sync()?;
        }
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
            if self.cut.is_none() {
                self.next_cut(&client, shutdown).await?;
            }
            let outcome = self.poll(&client).await?;
            {
                let mut st = self.status.lock().expect("status lock");
                st.transactions += outcome.transactions;
                st.copy_waiting = self.tables.waiting.len();
            }
            if stats_at.elapsed() >= std::time::Duration::from_secs(2) {
                stats_at = std::time::Instant::now();
                let stats = source::slot_stats(&client, &self.cfg.slot).await?;
                self.status.lock().expect("status lock").slot = stats;
                self.find_new_tables(&client).await?;
            }
            // Each peek decodes the WAL from the slot's restart LSN, which
            // PostgreSQL moves only every few seconds: peeking again at once
            // is worth it only while a backlog fills whole peeks.
            let caught_up = outcome.messages < u64::from(self.cfg.capture_batch_changes);
            if caught_up {
                let idle = self.cut.is_none();
                let seeds = self.seeds.as_mut();
                let request = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(self.cfg.poll_interval) => None,
                    Some(req) = async move {
                        match seeds {
                            Some(rx) if idle => rx.recv().await,
                            _ => std::future::pending().await,
                        }
                    } => Some(req),
                };
                if let Some(req) = request {
                    self.start_cut(&client, Job::Seed(req), shutdown).await?;
                }
            } else if shutdown.is_cancelled() {
                return Ok(());
            }
        }
    }

    /// Tables in the publication that are neither copied nor waiting: a
    /// table added to the publication with rows of its own.
    async fn find_new_tables(&mut self, client: &Client) -> Result<(), CaptureError> {
        let published = copy::published_tables(client, &self.cfg.publication).await?;
        let mut added = false;
        for oid in published {
            if !self.tables.synced.contains(&oid) && !self.tables.waiting.contains(&oid) {
                tracing::info!(
                    oid,
                    "a table joined the publication: its rows will be copied"
                );
                self.tables.waiting.insert(oid);
                added = true;
            }
        }
        if added {
            self.spool.set_copy_state(&self.tables)?;
            self.spool.sync()?;
        }
        Ok(())
    }

    /// Start the next cut: a seed asked for, or tables waiting for a copy.
    async fn next_cut(
        &mut self,
        client: &Client,
        shutdown: &CancellationToken,
    ) -> Result<(), CaptureError> {
        if let Some(req) = self.seeds.as_mut().and_then(|rx| rx.try_recv().ok()) {
            return self.start_cut(client, Job::Seed(req), shutdown).await;
        }
        if let Some(name) = self.spool.needs_copy().into_iter().next() {
            let tables = copy::published_tables(client, &self.cfg.publication).await?;
            return self
                .start_cut(
                    client,
                    Job::Copy {
                        tables,
                        reason: format!("new receiver {name}"),
                        only_for: Some(name),
                    },
                    shutdown,
                )
                .await;
        }
        if !self.tables.waiting.is_empty() {
            let tables: Vec<u32> = self.tables.waiting.iter().copied().collect();
            let reason = if self.tables.synced.is_empty() {
                "initial"
            } else {
                "new table"
            };
            return self
                .start_cut(
                    client,
                    Job::Copy {
                        tables,
                        reason: reason.into(),
                        only_for: None,
                    },
                    shutdown,
                )
                .await;
        }
        Ok(())
    }

    async fn start_cut(
        &mut self,
        client: &Client,
        job: Job,
        shutdown: &CancellationToken,
    ) -> Result<(), CaptureError> {
        let tables = match &job {
            Job::Copy { tables, .. } => tables.clone(),
            Job::Seed(_) => copy::published_tables(client, &self.cfg.publication).await?,
        };
        let mut backoff = crate::Backoff::new(self.cfg.max_backoff);
        let cut = loop {
            match copy::take_cut(&self.cfg.source, &tables, self.cfg.copy_lock_wait).await {
                Ok(cut) => break cut,
                Err(e) if copy::is_lock_timeout(&e) => {
                    let delay = backoff.next();
                    backoff.log_once(
                        "copy cut (waiting for the tables' writers to finish)",
                        &e,
                        delay,
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            if let Job::Seed(req) = job {
                                req.answer(&self.status, Err("the sender is stopping".into()));
                            }
                            return Ok(());
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    if let Job::Seed(req) = job {
                        let _ = req
                            .reply
                            .send(Err(pgcourier_common::ops::backoff::error_chain(&e)));
                    }
                    return Err(e.into());
                }
            }
        };
        tracing::info!(cut = %cut.lsn, tables = tables.len(), kind = match &job { Job::Copy { reason, .. } => reason.as_str(), Job::Seed(_) => "seed" }, "copy cut taken: transactions committed before it are spooled first");
        self.cut = Some((cut, job));
        Ok(())
    }

    /// Leave out what the pending copy's snapshot already holds: changes to
    /// tables waiting for a copy (or being copied). A Relation for a table
    /// never seen makes it wait for a copy.
    fn filter(&mut self, kind: u8, data: &[u8]) -> Result<Filter, CaptureError> {
        let copying = |tables: &CopyState, cut: &Option<(Cut, Job)>, oid: u32| {
            tables.waiting.contains(&oid)
                || matches!(cut, Some((_, Job::Copy { tables, only_for: None, .. })) if tables.contains(&oid))
        };
        match kind {
            b'R' | b'I' | b'U' | b'D' => {
                // Every one of these starts with the relation id.
                let oid = match data.get(1..5) {
                    Some(b) => u32::from_be_bytes(b.try_into().expect("4 bytes")),
                    None => return Err(CaptureError::Protocol("change message too short")),
                };
                if kind == b'R'
                    && !self.tables.synced.contains(&oid)
                    && !copying(&self.tables, &self.cut, oid)
                {
                    tracing::info!(oid, "a table new to the stream: its rows will be copied");
                    self.tables.waiting.insert(oid);
                    self.spool.set_copy_state(&self.tables)?;
                }
                Ok(if copying(&self.tables, &self.cut, oid) {
                    Filter::Drop
                } else {
                    Filter::Keep
                })
            }
            b'T' => {
                let Message::Truncate {
                    cascade,
                    restart_identity,
                    rels,
                } = pgoutput::decode(data)?
                else {
                    return Err(CaptureError::Protocol("Truncate does not decode"));
                };
                let kept: Vec<u32> = rels
                    .iter()
                    .copied()
                    .filter(|&oid| !copying(&self.tables, &self.cut, oid))
                    .collect();
                Ok(if kept.len() == rels.len() {
                    Filter::Keep
                } else if kept.is_empty() {
                    Filter::Drop
                } else {
                    Filter::Replace(pgoutput::encode(&Message::Truncate {
                        cascade,
                        restart_identity,
                        rels: kept,
                    }))
                })
            }
            _ => Ok(Filter::Keep),
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
    /// With a cut pending, only transactions committing before it are read,
    /// and once they all are, the copy is spliced in.
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
        let upto: Option<String> = self.cut.as_ref().map(|(c, _)| c.lsn.to_string());

        let skip_through = self.spool.captured_commit_lsn();
        let mut outcome = PollOutcome::default();
        let mut last_end = Lsn::ZERO;
        let mut last_commit = Lsn::ZERO;
        let mut current: Option<Cutter> = None;
        let mut skipping = false;
        let mut in_txn = false;
        let publication = pgcourier_common::pg::quote_ident(&self.cfg.publication);
        let changes = self.cfg.capture_batch_changes as i32;
        let stream = client
            .query_raw(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, $3, \
                 'proto_version', '1', 'publication_names', $4)",
                [
                    &self.cfg.slot as &(dyn tokio_postgres::types::ToSql + Sync),
                    &upto,
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
            outcome.messages += 1;
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
                        let mut cut = Cutter::new(self.spool.next_seq(), final_lsn, commit_time);
                        cut.xid = xid;
                        current = Some(cut);
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
                    last_commit = commit_lsn;
                    if cut.part == 0 && cut.pieces.is_empty() {
                        // Every change was left to a pending copy.
                        outcome.dropped += 1;
                        continue;
                    }
                    let record = cut.take(true, end_lsn);
                    self.spool.append(record.seq, &record.encode()?)?;
                    outcome.records += 1;
                    outcome.transactions += 1;
                }
                Some(kind) => {
                    if !in_txn {
                        return Err(CaptureError::Protocol("change outside a transaction"));
                    }
                    if skipping {
                        continue;
                    }
                    let cut = current
                        .as_mut()
                        .ok_or(CaptureError::Protocol("change without Begin"))?;
                    let filtered;
                    let data = match self.filter(*kind, data)? {
                        Filter::Keep => data,
                        Filter::Drop => continue,
                        Filter::Replace(bytes) => {
                            filtered = bytes;
                            &filtered
                        }
                    };
                    let spool = &self.spool;
                    cut.push(data, &mut |record: Record| {
                        spool.append(record.seq, &record.encode()?)?;
                        outcome.records += 1;
                        Ok(())
                    })?;
                }
                None => return Err(CaptureError::Protocol("empty pgoutput message")),
            }
        }
        if in_txn {
            return Err(CaptureError::Protocol("peek ended inside a transaction"));
        }
        if outcome.transactions > 0 || outcome.dropped > 0 {
            self.spool.commit(last_commit, last_end)?;
            tracing::debug!(transactions = outcome.transactions, records = outcome.records, end_lsn = %last_end, "spooled");
        }
        // Invariant 1: everything up to last_end is fsynced in the spool (or
        // was before this call: skipped transactions; or is left to a copy
        // whose waiting tables are recorded in the same fsync).
        let mut target = if last_end > Lsn::ZERO {
            Some(last_end)
        } else if outcome.skipped == 0 && flush_lsn >= insert_lsn && self.cut.is_none() {
            Some(insert_lsn)
        } else {
            None
        };
        let cut_reached = matches!(&self.cut, Some((c, _)) if flush_lsn >= c.lsn);
        if last_end == Lsn::ZERO && outcome.skipped == 0 && cut_reached {
            // Every transaction committing before the cut is spooled.
            let (cut, job) = self.cut.take().expect("cut_reached");
            let to = self.splice(cut, job).await?;
            target = Some(to);
        }
        if let Some(to) = target {
            if to > self.confirmed {
                source::advance_slot(client, &self.cfg.slot, to).await?;
                self.confirmed = to;
            }
        }
        Ok(outcome)
    }

    /// Write the copy (to the spool, or to a seed file with a marker in the
    /// spool) as the transaction at `cut - 1`. Returns how far the slot may
    /// now be advanced.
    async fn splice(&mut self, cut: Cut, job: Job) -> Result<Lsn, CaptureError> {
        let started = std::time::Instant::now();
        let commit_lsn = Lsn(cut.lsn.0 - 1);
        let commit_time = pgcourier_common::pg::time::now_pg_micros();
        let end_lsn = cut.lsn.max(self.spool.marks().captured_end_lsn);
        match job {
            Job::Copy {
                tables,
                reason,
                only_for,
            } => {
                let (meta, relations) = copy::describe(&cut, &tables, &reason).await?;
                tracing::info!(cut = %cut.lsn, tables = meta.tables.len(), rows_estimate = meta.tables.iter().map(|t| t.rows_estimate).sum::<u64>(), "copying tables into the spool");
                let start = self.spool.next_seq();
                let mut cutter = Cutter::new(start, commit_lsn, commit_time);
                cutter.only_for = only_for.clone();
                let spool = self.spool.clone();
                let mut records = 0u64;
                let mut emit = |record: Record| -> Result<(), CaptureError> {
                    spool.append(record.seq, &record.encode()?)?;
                    records += 1;
                    Ok(())
                };
                self.write_copy(&cut, &meta, &relations, cutter, end_lsn, &mut emit)
                    .await?;
                if only_for.is_none() {
                    for oid in &tables {
                        self.tables.waiting.remove(oid);
                        self.tables.synced.insert(*oid);
                    }
                    self.spool.set_copy_state(&self.tables)?;
                }
                self.spool.commit(commit_lsn, end_lsn)?;
                if let Some(name) = &only_for {
                    self.spool
                        .copy_made_for(std::slice::from_ref(name), start)?;
                }
                let rows = self.copy_finished();
                tracing::info!(
                    tables = meta.tables.len(),
                    rows,
                    records,
                    seconds = started.elapsed().as_secs_f64(),
                    "copy spooled"
                );
            }
            Job::Seed(req) => {
                let result = self
                    .write_seed(&cut, &req.path, commit_lsn, commit_time, end_lsn, started)
                    .await;
                let reply = match &result {
                    Ok(summary) => Ok(summary.clone()),
                    Err(e) => Err(pgcourier_common::ops::backoff::error_chain(e)),
                };
                req.answer(&self.status, reply);
                match result {
                    // The file could not be written: reported; capture goes on.
                    Err(CaptureError::Seed(_)) | Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        drop(cut);
        Ok(end_lsn)
    }

    /// The copy transaction, whole: its head (metadata, Relations,
    /// TRUNCATE), every row read in the cut's snapshot, and its last record.
    /// Progress shows in status until [`Capture::copy_finished`].
    async fn write_copy(
        &self,
        cut: &Cut,
        meta: &CopyMeta,
        relations: &[pgoutput::Relation],
        mut cutter: Cutter,
        end_lsn: Lsn,
        emit: &mut impl FnMut(Record) -> Result<(), CaptureError>,
    ) -> Result<(), CaptureError> {
        self.status.lock().expect("status lock").copy = Some(CopyProgress::new(meta));
        write_copy_head(&mut cutter, meta, relations, emit)?;
        copy::read_rows(
            &self.cfg.source,
            self.cfg.copy_workers,
            cut,
            meta,
            &self.status,
            |msg| cutter.push(&msg, emit),
        )
        .await?;
        emit(cutter.take(true, end_lsn))
    }

    /// End the copy's progress in status; returns the rows it read.
    fn copy_finished(&self) -> u64 {
        self.status
            .lock()
            .expect("status lock")
            .copy
            .take()
            .map_or(0, |p| p.rows)
    }

    async fn write_seed(
        &mut self,
        cut: &Cut,
        path: &std::path::Path,
        commit_lsn: Lsn,
        commit_time: i64,
        end_lsn: Lsn,
        started: std::time::Instant,
    ) -> Result<SeedSummary, CaptureError> {
        let client = &cut.client;
        let tables = copy::published_tables(client, &self.cfg.publication).await?;
        let (meta, relations) = copy::describe(cut, &tables, "seed").await?;
        let fingerprint = pgcourier_common::transport::tls::load_identity(&self.cfg.cert, &self.cfg.key)
            .map_err(|e| CaptureError::Seed(format!("load the sender's certificate: {e}")))?
            .fingerprint()
            .to_string();
        let marker_seq = self.spool.next_seq();
        let header = SeedHeader {
            version: 1,
            source_id: self.spool.source()?.unwrap_or_default(),
            sender_fingerprint: fingerprint,
            marker_seq,
            commit_lsn,
            cut_lsn: cut.lsn,
            created_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            tables: meta.tables.iter().map(|t| t.quoted()).collect(),
        };
        let tmp = path.with_extension("partial");
        let mut writer = SeedWriter::create(&tmp, &header)
            .map_err(|e| CaptureError::Seed(pgcourier_common::ops::backoff::error_chain(&e)))?;
        tracing::info!(cut = %cut.lsn, tables = meta.tables.len(), file = %path.display(), "exporting a seed");
        let cutter = Cutter::new(1, commit_lsn, commit_time);
        let mut emit = |record: Record| -> Result<(), CaptureError> {
            writer
                .record(&record.encode()?)
                .map_err(|e| CaptureError::Seed(pgcourier_common::ops::backoff::error_chain(&e)))
        };
        self.write_copy(cut, &meta, &relations, cutter, end_lsn, &mut emit)
            .await?;
        let records = writer
            .finish()
            .map_err(|e| CaptureError::Seed(pgcourier_common::ops::backoff::error_chain(&e)))?;
        // The file under its final name is durable before the marker that
        // points at it is spooled.
        let dir = path.parent().unwrap_or(std::path::Path::new("/"));
        std::fs::rename(&tmp, path)
            .and_then(|()| std::fs::File::open(dir)?.sync_all())
            .map_err(|e| {
                CaptureError::Seed(format!(
                    "rename {} to {} and fsync {}: {e}",
                    tmp.display(),
                    path.display(),
                    dir.display()
                ))
            })?;
        // The marker: where live shipping continues for a branch seeded
        // from this file. Other branches apply it as an empty transaction.
        let content = serde_json::to_vec(&serde_json::json!({
            "file": path.display().to_string(),
            "cut_lsn": cut.lsn.to_string(),
        }))
        .expect("json");
        let mut marker = Cutter::new(marker_seq, commit_lsn, commit_time);
        marker
            .pieces
            .push(Piece::Message(pgoutput::encode(&Message::LogicalMessage {
                transactional: true,
                lsn: cut.lsn,
                prefix: SEED_PREFIX.into(),
                content,
            })));
        let record = marker.take(true, end_lsn);
        self.spool.append(record.seq, &record.encode()?)?;
        self.spool.commit(commit_lsn, end_lsn)?;
        let rows = self.copy_finished();
        let summary = SeedSummary {
            path: path.display().to_string(),
            marker_seq,
            cut_lsn: cut.lsn.to_string(),
            tables: meta.tables.len(),
            rows,
            records,
            file_bytes: std::fs::metadata(path).map_or(0, |m| m.len()),
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(file = %path.display(), marker_seq, rows, records, bytes = summary.file_bytes, "seed exported");
        Ok(summary)
    }
}

/// The copy transaction's first messages: its metadata, the tables'
/// Relations, and one TRUNCATE of them all.
fn write_copy_head(
    cutter: &mut Cutter,
    meta: &CopyMeta,
    relations: &[pgoutput::Relation],
    emit: &mut impl FnMut(Record) -> Result<(), CaptureError>,
) -> Result<(), CaptureError> {
    let content = serde_json::to_vec(meta).expect("copy metadata encodes as JSON");
    cutter.push(
        &pgoutput::encode(&Message::LogicalMessage {
            transactional: true,
            lsn: meta.cut_lsn,
            prefix: COPY_PREFIX.into(),
            content,
        }),
        emit,
    )?;
    for rel in relations {
        cutter.push(&pgoutput::encode(&Message::Relation(rel.clone())), emit)?;
    }
    if !relations.is_empty() {
        cutter.push(
            &pgoutput::encode(&Message::Truncate {
                cascade: false,
                restart_identity: false,
                rels: relations.iter().map(|r| r.oid).collect(),
            }),
            emit,
        )?;
    }
    Ok(())
}

fn parse_lsn(text: &str) -> Result<Lsn, CaptureError> {
    text.parse()
        .map_err(|_| CaptureError::Protocol("server returned an invalid LSN"))
}
