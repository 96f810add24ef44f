//! The splice (C4, C5b): once every transaction committing below a cut's
//! LSN L is spooled, the copy goes into the stream as one transaction with
//! commit LSN L − 1, cut into records by the same [`TxnCutter`] as any
//! transaction:
//!
//! ```text
//! M  pgcourier.copy   CopyMeta as JSON (tables, their definitions, the cut)
//! R  relation         one per copied table
//! T  truncate         all copied tables, one statement
//! I  insert ...       every row, read in the cut's snapshot (copy/read.rs)
//! ```
//!
//! For every receiver, the copied tables move from `waiting` to `synced`
//! in the same fsync as the copy's last record, and the slot may then be
//! confirmed to L. For a receiver added late (`needs_copy/<name>`), the
//! records carry `only_for = name`, nothing moves, and `start/<name>` is
//! the copy's first record. A seed export writes the same transaction to a
//! file instead (`export.rs`).

use std::time::{Duration, Instant};

use pgcourier_common::ops::backoff::error_chain;
use pgcourier_common::store::durable::Synced;
use pgcourier_common::store::seed_file::{CopyMeta, COPY_PREFIX};
use pgcourier_proto::cutter::{TxnCutter, TxnHead};
use pgcourier_proto::pgoutput::{self, Message, Relation};
use pgcourier_proto::record::Record;
use pgcourier_proto::Lsn;

use super::join::JoinJob;
use super::tables::{Job, PendingCut};
use super::{Capture, CaptureError};
use crate::copy::{self, CopyProgress, Cut, Rows};
use crate::spool::OpenJoin;

/// How often a copy's progress is logged.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// The copy transaction's position and time.
pub(super) struct CopyTxn {
    pub commit_lsn: Lsn,
    pub commit_time: i64,
    /// What the slot may be confirmed to once the copy is spooled: the cut,
    /// or the spool's end if that is further.
    pub end_lsn: Lsn,
}

impl Capture {
    /// Write the copy (to the spool, or to a seed file with a marker in the
    /// spool) as the transaction at `cut - 1`. Returns how far the slot may
    /// now be confirmed.
    pub(super) async fn splice(
        &mut self,
        pending: PendingCut,
    ) -> Result<Synced<Lsn>, CaptureError> {
        let PendingCut { cut, job } = pending;
        let started = Instant::now();
        let txn = CopyTxn {
            commit_lsn: Lsn(cut.lsn.0 - 1),
            commit_time: pgcourier_common::pg::time::now_pg_micros(),
            end_lsn: cut.lsn.max(self.spool.marks().captured_end_lsn),
        };
        let spliced = match job {
            Job::Copy {
                tables,
                reason,
                only_for,
                join: true,
                again,
            } => {
                // The cut's snapshot stays open for the join's reader.
                let job = JoinJob {
                    tables: &tables,
                    reason: &reason,
                    only_for,
                    again,
                };
                return self.start_join(cut, job, &txn, started).await;
            }
            Job::Copy {
                tables,
                reason,
                only_for,
                join: false,
                again,
            } => {
                self.splice_copy(&cut, &tables, &reason, (only_for, again), &txn, started)
                    .await
            }
            Job::Seed(req) => {
                let result = self.write_seed(&cut, &req.path, &txn, started).await;
                let reply = match &result {
                    Ok((summary, _)) => Ok(summary.clone()),
                    Err(e) => Err(error_chain(e)),
                };
                req.answer(&self.status, reply);
                match result {
                    Ok((_, synced)) => Ok(synced),
                    // The file could not be written: reported; capture goes
                    // on, and every transaction below the cut is spooled.
                    Err(CaptureError::Seed(_)) => {
                        let end = txn.end_lsn;
                        self.blocking(move |spool| spool.synced_through(end)).await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        cut.close().await;
        spliced
    }

    async fn splice_copy(
        &mut self,
        cut: &Cut,
        tables: &[u32],
        reason: &str,
        (only_for, again): (Option<String>, bool),
        txn: &CopyTxn,
        started: Instant,
    ) -> Result<Synced<Lsn>, CaptureError> {
        let (meta, relations) = self.describe_copy(cut, tables, reason, &only_for).await?;
        tracing::info!(cut = %cut.lsn, tables = meta.tables.len(), rows_estimate = meta.tables.iter().map(|t| t.rows_estimate).sum::<u64>(), "copying tables into the spool");
        let cutter = copy_cutter(self.spool.next_seq(), txn, &only_for);
        let spool = self.spool.clone();
        let mut records = 0u64;
        let mut append = |record: Record| -> Result<(), CaptureError> {
            spool.append(record.seq, &record.encode()?)?;
            records += 1;
            Ok(())
        };
        let start = cutter.next_seq();
        self.write_copy(cut, &meta, &relations, cutter, txn.end_lsn, &mut append)
            .await?;
        let settles = Settles {
            tables,
            only_for,
            again,
            aborts_named: !meta.aborts.is_empty(),
            join: None,
        };
        let synced = self.commit_copy(settles, txn, start).await?;
        let rows = self.copy_finished();
        tracing::info!(
            tables = meta.tables.len(),
            rows,
            records,
            seconds = started.elapsed().as_secs_f64(),
            "copy spooled"
        );
        Ok(synced)
    }

    /// The copy's metadata and Relations; for a copy every branch
    /// receives, the joins abandoned since the last copy go in its
    /// `aborts` (the branches drop what they staged first: `join.rs`).
    pub(super) async fn describe_copy(
        &self,
        cut: &Cut,
        tables: &[u32],
        reason: &str,
        only_for: &Option<String>,
    ) -> Result<(CopyMeta, Vec<Relation>), CaptureError> {
        let (mut meta, relations) = copy::describe(cut, tables, reason).await?;
        if only_for.is_none() {
            meta.aborts = self.joins.aborted.clone();
        }
        Ok((meta, relations))
    }

    /// Commit a copy's (or a join start's) transaction, appended, with
    /// what it settles written before the commit's fsync, so both are
    /// durable together: for every receiver, its tables move from waiting
    /// to synced and the aborts it names are forgotten; for one receiver,
    /// the copy it was owed is made; a join start opens its join. Then a
    /// receiver added late starts at the copy (unless it was owed one: its
    /// start stays).
    pub(super) async fn commit_copy(
        &mut self,
        settles: Settles<'_>,
        txn: &CopyTxn,
        start: u64,
    ) -> Result<Synced<Lsn>, CaptureError> {
        let mut joins = self.joins.clone();
        match &settles.only_for {
            None => {
                for oid in settles.tables {
                    self.copy_state.tables.waiting.remove(oid);
                    self.copy_state.tables.synced.insert(*oid);
                }
                self.spool.set_copy_state(&self.copy_state)?;
            }
            Some(name) => joins.owed.retain(|n| n != name),
        }
        if settles.aborts_named {
            joins.aborted.clear();
        }
        if let Some(join) = settles.join {
            joins.next_id = joins.next_id.max(join.id + 1);
            joins.open.push(join);
        }
        if joins != self.joins {
            self.spool.set_joins(&joins)?;
        }
        let (commit, end) = (txn.commit_lsn, txn.end_lsn);
        let synced = self
            .blocking(move |spool| spool.commit(commit, end))
            .await?;
        self.joins = joins;
        if let (Some(name), false) = (settles.only_for, settles.again) {
            self.blocking(move |spool| spool.copy_made_for(std::slice::from_ref(&name), start))
                .await?;
        }
        Ok(synced)
    }

    /// The copy transaction, whole: its head (metadata, Relations,
    /// TRUNCATE), every row read in the cut's snapshot, and its last record,
    /// each record handed to `emit`. Progress shows in status until
    /// [`Capture::copy_finished`].
    pub(super) async fn write_copy(
        &self,
        cut: &Cut,
        meta: &CopyMeta,
        relations: &[Relation],
        mut cutter: TxnCutter,
        end_lsn: Lsn,
        emit: &mut impl FnMut(Record) -> Result<(), CaptureError>,
    ) -> Result<(), CaptureError> {
        self.status.lock().expect("status lock").copy = Some(CopyProgress::new(meta));
        for message in copy_head(meta, relations, true) {
            for record in cutter.push(&message) {
                emit(record)?;
            }
        }
        let mut logged = Instant::now();
        copy::read_rows(
            &self.cfg.source,
            self.cfg.copy_workers,
            cut,
            &meta.tables,
            |rows: Rows| -> Result<(), CaptureError> {
                self.count_rows(&rows, &mut logged);
                for message in &rows.messages {
                    for record in cutter.push(message) {
                        emit(record)?;
                    }
                }
                Ok(())
            },
        )
        .await?;
        emit(cutter.finish(end_lsn))
    }

    /// Add rows read to the copy's progress; log it now and then.
    fn count_rows(&self, rows: &Rows, logged: &mut Instant) {
        let mut st = self.status.lock().expect("status lock");
        if let Some(p) = st.copy.as_mut() {
            p.add(rows);
            if logged.elapsed() >= LOG_EVERY {
                *logged = Instant::now();
                tracing::info!(
                    rows = p.rows,
                    mb = p.bytes / 1_000_000,
                    rows_per_second = p.rows_per_second as u64,
                    eta_seconds = p.eta_seconds.map(|s| s as u64),
                    "copying"
                );
            }
        }
    }

    /// End the copy's progress in status; returns the rows it read.
    pub(super) fn copy_finished(&self) -> u64 {
        self.status
            .lock()
            .expect("status lock")
            .copy
            .take()
            .map_or(0, |p| p.rows)
    }
}

/// What a copy's transaction settles ([`Capture::commit_copy`]).
pub(super) struct Settles<'a> {
    pub tables: &'a [u32],
    /// The one receiver it is for, or `None`: every receiver.
    pub only_for: Option<String>,
    /// A copy owed to `only_for` after its join was abandoned.
    pub again: bool,
    /// Its metadata names the abandoned joins in `aborts`.
    pub aborts_named: bool,
    /// A join start: the join it opens.
    pub join: Option<OpenJoin>,
}

/// The cutter of a copy's transaction at `txn`, whose first record takes
/// `start`.
pub(super) fn copy_cutter(start: u64, txn: &CopyTxn, only_for: &Option<String>) -> TxnCutter {
    TxnCutter::new(
        start,
        TxnHead {
            commit_lsn: txn.commit_lsn,
            commit_time: txn.commit_time,
            xid: 0,
            only_for: only_for.clone(),
        },
    )
}

/// The copy transaction's first messages: its metadata, the tables'
/// Relations, and (with `truncate`) one TRUNCATE of them all (none when no
/// table is left). A join's start has no TRUNCATE: its end replaces the
/// tables.
pub(super) fn copy_head(meta: &CopyMeta, relations: &[Relation], truncate: bool) -> Vec<Vec<u8>> {
    let content = serde_json::to_vec(meta).expect("copy metadata encodes as JSON");
    let mut head = vec![pgoutput::encode(&Message::LogicalMessage {
        transactional: true,
        lsn: meta.cut_lsn,
        prefix: COPY_PREFIX.into(),
        content,
    })];
    head.extend(
        relations
            .iter()
            .map(|rel| pgoutput::encode(&Message::Relation(rel.clone()))),
    );
    if truncate && !relations.is_empty() {
        head.push(pgoutput::encode(&Message::Truncate {
            cascade: false,
            restart_identity: false,
            rels: relations.iter().map(|r| r.oid).collect(),
        }));
    }
    head
}
