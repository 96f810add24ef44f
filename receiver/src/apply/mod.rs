//! Apply: inbox records → target rows, exactly once, in source commit order
//! (steps 9 and 10 of the path of a change in ARCHITECTURE.md; the inbox is
//! before it, the target's rows after it, and its commits start the ack path
//! back: target COMMIT → inbox delete → `Applied` to the sender).
//!
//! Records are read from the inbox in sequence order. Consecutive source
//! transactions are grouped into one target transaction (up to
//! `apply-group-transactions` transactions or `apply-group-changes`
//! changes, or until the inbox runs dry), and each group commits together
//! with the progress row `pgcourier.progress` (source identity, last commit
//! LSN and record seq). On (re)start apply reads that row and skips every
//! transaction whose commit LSN is at or below it, so nothing is applied
//! twice; the inbox deletes records only after the commit that applied them.
//!
//! Changes go out as prepared statements, pipelined (many in flight before
//! the first reply), with values in PostgreSQL text form cast to the target
//! column's type (`$1::text::<type>`). Tables and columns are mapped by name,
//! never by OID. Every identifier is quoted.
//!
//! Errors are classified by SQLSTATE: a lost connection or a restarting
//! target is retried with backoff; a target problem (missing table or
//! column, type mismatch, constraint, permission) pauses apply with the
//! table, column and fix, and is retried periodically so apply resumes by
//! itself once the DBA has fixed it. The inbox keeps everything meanwhile.
//!
//! This file holds the [`Apply`] type, its retry loop and the grouping of
//! source transactions into target transactions. A record's path through
//! the other files:
//!
//! | Step | File |
//! |------|------|
//! | connect, session settings, progress table and marker | `target.rs` |
//! | pgoutput messages of a record → queued changes | `change.rs` |
//! | source relation → target table and columns, by name | `mapping.rs` |
//! | one change shape → SQL, prepared once per session | `sql.rs` |
//! | queued changes → pipelined statements, COPY runs, TRUNCATE barrier | `pipeline.rs` |
//! | an insert of many MiB streamed from its fragments into its own COPY | `large.rs` |
//! | a schema change (DDL message) run in the same target transaction, or on its own between groups (`CONCURRENTLY`) | `ddl.rs` |
//! | a table copy or seed file: create tables, load, progress | `copy_load.rs` |
//! | a table joining in chunks: staging tables, its changes held meanwhile, then swapped in and replayed | `join.rs` |
//! | a joining table filled meanwhile by a side transaction on a second connection, committed at the join's end | `join_side.rs` |
//! | sequences moved to the values applied rows used, before the commit | `sequences.rs` |
//! | the operator's skip of the blocking transaction | `skip.rs` |
//! | errors and their classes; status and lag | `error.rs`, `status.rs` |

mod change;
mod copy_load;
mod ddl;
mod error;
mod join;
mod join_side;
mod large;
mod mapping;
mod order;
mod pipeline;
mod sequences;
mod skip;
mod sql;
mod status;
mod target;
mod two_way;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use pgcourier_common::ops::backoff::{error_chain, Backoff};
use pgcourier_proto::pgoutput::{self, Message, Relation};
use pgcourier_proto::record::Record;
use pgcourier_proto::Lsn;
use std::time::Duration;

use tokio_postgres::Statement;
use tokio_util::sync::CancellationToken;

use crate::config::{Ddl, ReceiverConfig};
use crate::inbox::{Dropped, Inbox};

pub use error::ApplyError;
pub use status::{lag_seconds, ApplyStatus, JoiningTable, LoadProgress};
pub(crate) use target::TargetClient;
pub use two_way::Outcomes;

use error::target_err;
use mapping::TableMap;
use pipeline::{Pending, Run};
use sql::Op;

/// Applies the inbox to the target; one per receiver (and one per seed
/// import). `status` is read by the admin endpoint.
pub struct Apply {
    cfg: Arc<ReceiverConfig>,
    inbox: Arc<Inbox>,
    pub status: Arc<Mutex<ApplyStatus>>,
    /// The record being applied; after an error, transactions up to it are
    /// applied one per target transaction, so that everything before the
    /// failing transaction commits and the pause lands exactly on it.
    position: std::sync::atomic::AtomicU64,
    careful_until: std::sync::atomic::AtomicU64,
    /// First record of the transaction being applied.
    txn_first: std::sync::atomic::AtomicU64,
    /// An operator's request to skip the blocking transaction: (seq, reason).
    skip: Mutex<Option<(u64, String)>>,
}

/// Per target connection state.
struct Session {
    client: TargetClient,
    /// The source this branch follows (the progress row's key).
    source: String,
    /// Commit LSN of the last committed group: records at or below it were
    /// applied (before a restart) and are skipped.
    marker: Lsn,
    /// Inbox seq of the last committed group's last record (the progress
    /// row's seq): records at or below it were applied.
    marker_seq: u64,
    /// Relation messages by source OID (`mapping.rs`).
    relations: HashMap<u32, Relation>,
    /// Their target tables, resolved on first use (`mapping.rs`).
    targets: HashMap<u32, TableMap>,
    /// Prepared statements by change shape: relation, kind, columns set,
    /// columns in the WHERE (`sql.rs`).
    statements: HashMap<(u32, Op, Vec<bool>, Vec<bool>), Statement>,
    /// Set-based statements for runs of updates and deletes, by relation
    /// and kind (`sql.rs`).
    set_statements: HashMap<(u32, Op), Statement>,
    /// Moves the progress row (`target.rs`).
    progress: Statement,
    /// The replication origin apply writes under, if any (`target.rs`).
    origin: Option<String>,
    /// Changes queued, not yet sent (`pipeline.rs`).
    pending: Vec<Pending>,
    /// The run of inserts (for one COPY) or of updates or deletes (for one
    /// set-based statement) being gathered (`pipeline.rs`).
    run: Option<Run>,
    /// A message arriving in fragments, so far (`change.rs`).
    fragment: Vec<u8>,
    /// An insert too large to put together, being streamed into a COPY of
    /// its own as its fragments arrive (`large.rs`).
    large: Option<large::LargeCopy>,
    /// The table copy being loaded, if any (`copy_load.rs`).
    copy: Option<LoadProgress>,
    /// The tables joining in chunks, whose changes are held (`join.rs`).
    joins: join::Joins,
    /// COPY and set data queued in `pending`.
    pending_bytes: usize,
    /// The open group ends with the current source transaction: it ran
    /// DDL (`ddl.rs`), or staged chunks a side transaction waits for
    /// (`join_side.rs`).
    end_group: bool,
    /// Per sequence feeding a target column, the furthest value the open
    /// group's rows used (`sequences.rs`).
    sequences: sequences::Marks,
    /// The row clock read just before the change it belongs to
    /// (`two_way.rs`).
    clock: Option<String>,
    /// `pgcourier.apply_change`, prepared on first use (`two_way.rs`).
    two_way: Option<Statement>,
    /// `pgcourier.apply_orphan_clock`, looked up on first use: `Some(None)`
    /// where the target has no two-way tables.
    orphan: Option<Option<Statement>>,
    /// Tables mapped as one-way whose registration was looked up again in
    /// this record, since a change to them came with a row clock.
    two_way_rechecked: std::collections::HashSet<u32>,
}

/// The source transactions being grouped into one target transaction.
#[derive(Default)]
struct Group {
    /// A target transaction is open.
    open: bool,
    txns: u32,
    changes: u32,
    /// Set at the end of each of its source transactions.
    end: Option<GroupEnd>,
}

/// Where the open group of source transactions ends: what its progress row
/// says once it commits.
struct GroupEnd {
    seq: u64,
    commit_lsn: Lsn,
    end_lsn: Lsn,
    commit_time: i64,
}

impl Apply {
    pub fn new(cfg: Arc<ReceiverConfig>, inbox: Arc<Inbox>) -> Apply {
        Apply {
            cfg,
            inbox,
            status: Arc::new(Mutex::new(ApplyStatus::default())),
            position: 0.into(),
            careful_until: 0.into(),
            txn_first: 0.into(),
            skip: Mutex::new(None),
        }
    }

    /// Apply until `shutdown`, retrying every error with backoff.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.cfg.max_backoff);
        loop {
            let started = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.new_session() => r,
            };
            // A failed start (connect, settings, progress row) is not about
            // any transaction: it blocks none.
            let (e, in_session) = match started {
                Err(e) => (e, false),
                Ok(mut s) => {
                    let result = tokio::select! {
                        _ = shutdown.cancelled() => Ok(()),
                        r = self.session(&mut s, &shutdown) => r,
                    };
                    // Side transactions end with their session, first.
                    self.abandon_sides(&mut s, "the end of the apply session")
                        .await;
                    s.client.close().await;
                    match result {
                        Ok(()) => return,
                        Err(e) => (e, true),
                    }
                }
            };
            let Some(delay) = self.on_error(&e, in_session, &mut backoff) else {
                continue;
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Report `e` in the status and decide what comes next: `None`, start
    /// again at once (a corrupt record was dropped, or a group is retried
    /// transaction by transaction); otherwise wait the returned delay.
    fn on_error(
        &self,
        e: &ApplyError,
        in_session: bool,
        backoff: &mut Backoff,
    ) -> Option<Duration> {
        if let ApplyError::Corrupt { seq, .. } = e {
            // Never apply it, never skip it: drop it and everything
            // after it from the inbox; ingest fetches them again (the
            // sender keeps records until they are applied).
            let seq = *seq;
            match self.inbox.truncate_from(seq) {
                Ok(Dropped::Applied) => {
                    tracing::warn!(seq, error = %error_chain(e), "a record already applied failed its checksum: deleted it");
                    return None;
                }
                Ok(Dropped::Refetch) => {
                    let message = error_chain(e);
                    tracing::error!(seq, error = %message, "a record in the inbox failed its checksum: dropped it and the records after it without applying them; fetching them again from the sender");
                    let mut st = self.status.lock().expect("status lock");
                    st.last_error = Some(message);
                    st.error_class = Some(e.class());
                    st.paused = false;
                    return None;
                }
                Err(te) => {
                    tracing::error!(seq, error = %error_chain(&te), "could not drop the corrupt record from the inbox");
                }
            }
        }
        // Was the failing transaction applied on its own? If it was part
        // of a group, retry one transaction at a time first, so that the
        // pause lands exactly on the failing transaction.
        let isolated = if in_session {
            let position = self.position.load(Ordering::Relaxed);
            let isolated = position <= self.careful_until.load(Ordering::Relaxed);
            self.careful_until.store(position, Ordering::Relaxed);
            isolated
        } else {
            true
        };
        let message = error_chain(e);
        let delay = backoff.next();
        let mut st = self.status.lock().expect("status lock");
        if e.is_transient() {
            backoff.log_once("apply", e, delay);
            st.paused = false;
        } else if !isolated {
            tracing::debug!(error = %message, "apply failed inside a group; retrying transaction by transaction");
            return None;
        } else {
            // A record out of order blocks no transaction the operator may
            // skip: the fix is at the sender (and a re-seed).
            let blocking = (in_session && !matches!(e, ApplyError::OutOfOrder { .. }))
                .then(|| self.txn_first.load(Ordering::Relaxed));
            if st.last_error.as_deref() != Some(message.as_str()) {
                match blocking {
                    Some(seq) => {
                        tracing::error!(error = %message, blocking_seq = seq, retry_in = ?delay, "apply paused: the target needs attention; the inbox keeps everything and apply resumes once it is fixed (or skip the transaction with pgcourier-queue skip)")
                    }
                    None => {
                        tracing::error!(error = %message, retry_in = ?delay, "apply paused: cannot start on the target; the inbox keeps everything and apply resumes once it is fixed")
                    }
                }
            }
            st.paused = true;
            st.blocking_seq = blocking;
        }
        st.last_error = Some(message);
        st.error_class = Some(e.class());
        Some(delay)
    }

    /// A target connection with the relations the inbox remembers.
    async fn new_session(&self) -> Result<Session, ApplyError> {
        let target::Connected {
            client,
            source,
            marker,
            marker_seq,
            progress,
            origin,
        } = self.connect().await?;
        let mut s = Session {
            client,
            source,
            marker,
            marker_seq,
            relations: HashMap::new(),
            targets: HashMap::new(),
            statements: HashMap::new(),
            set_statements: HashMap::new(),
            progress,
            origin,
            pending: Vec::new(),
            run: None,
            fragment: Vec::new(),
            large: None,
            copy: None,
            joins: join::Joins::default(),
            pending_bytes: 0,
            end_group: false,
            sequences: sequences::Marks::default(),
            clock: None,
            two_way: None,
            orphan: None,
            two_way_rechecked: Default::default(),
        };
        self.status.lock().expect("status lock").copy = None;
        for raw in self.inbox.relations()? {
            match pgoutput::decode(&raw).map_err(ApplyError::StoredRelation)? {
                Message::Relation(rel) => {
                    s.relations.insert(rel.oid, rel);
                }
                // It decoded, so it has a first byte: the wrong message type.
                _ => {
                    return Err(ApplyError::StoredRelation(
                        pgoutput::DecodeError::Unexpected {
                            kind: 'R',
                            what: "message type",
                            byte: raw[0],
                            at: 0,
                        },
                    ))
                }
            }
        }
        self.load_joins(&mut s).await?;
        Ok(s)
    }

    /// One target connection's life: read the inbox from the first record
    /// not yet applied, group source transactions into target transactions
    /// and commit each group with its progress row, until `shutdown` or an
    /// error.
    async fn session(
        &self,
        s: &mut Session,
        shutdown: &CancellationToken,
    ) -> Result<(), ApplyError> {
        tracing::info!(marker = %s.marker, "applying to target");
        let mut cursor = match self.inbox.first_seq()? {
            Some(first) => first,
            None => self.inbox.durable_seq() + 1,
        };
        let mut durable_rx = self.inbox.subscribe();
        let mut group = Group::default();
        let mut in_txn = false;
        // The record read before `cursor` (`order.rs`).
        let mut prev: Option<order::Position> = None;
        loop {
            let durable = *durable_rx.borrow_and_update();
            if cursor > durable {
                // Nothing more to read now: end the group if at a boundary.
                if group.open && !in_txn {
                    self.close_group(s, &mut group).await?;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    r = durable_rx.changed() => if r.is_err() { return Ok(()) },
                }
                continue;
            }
            self.position.store(cursor, Ordering::Relaxed);
            if !group.open {
                // The inbox was moved forward (a new branch starting at its
                // copy): nothing before its first record is ours to apply.
                if let Some(first) = self.inbox.first_seq()? {
                    if first > cursor && self.inbox.get(cursor)?.is_none() {
                        cursor = first;
                        prev = None;
                        continue;
                    }
                }
            }
            let bytes = self.inbox.get(cursor)?.ok_or_else(|| ApplyError::Order {
                seq: cursor,
                message: "missing from the inbox".into(),
            })?;
            let record = match Record::decode(&bytes) {
                Ok(record) => record,
                Err(source) if cursor <= s.marker_seq && !group.open => {
                    // Applied before a restart (the progress row covers it)
                    // and back after a crash undid its delete: nothing to
                    // fetch again, nothing to apply. Drop it; never lower
                    // the inbox below what the sender was told is applied.
                    tracing::warn!(seq = cursor, error = %error_chain(&source), "a record already applied (at or below the progress row) failed its checksum: dropped it");
                    self.inbox.drop_applied(cursor)?;
                    cursor += 1;
                    prev = None;
                    continue;
                }
                Err(source) => {
                    return Err(ApplyError::Corrupt {
                        seq: cursor,
                        source,
                    })
                }
            };
            if record.seq != cursor {
                return Err(ApplyError::Order {
                    seq: cursor,
                    message: format!("holds seq {}", record.seq),
                });
            }
            let here = order::Position::of(&record);
            if let Some(message) = order::check_follows(prev.as_ref(), &here, s.marker) {
                return Err(ApplyError::OutOfOrder {
                    seq: cursor,
                    message,
                });
            }
            prev = Some(here);
            if record.commit_lsn <= s.marker {
                // Already applied (before a restart): only learn its
                // relations, and delete it (it may have come back after a
                // crash undid its delete).
                self.learn_relations(s, &record)?;
                if record.last && !group.open {
                    self.inbox.delete_through(record.seq)?;
                }
                cursor += 1;
                continue;
            }
            if record.part == 0 {
                self.txn_first.store(record.seq, Ordering::Relaxed);
                if group.open && !self.inbox.is_whole_through(record.seq) {
                    // A transaction not yet whole in the inbox joins no
                    // group: commit the group first, so that the inbox never
                    // waits at `inbox-max-bytes` for room a group holding
                    // complete transactions frees only once this one ends.
                    self.close_group(s, &mut group).await?;
                }
            }
            // A CONCURRENTLY statement, alone in its source transaction:
            // applied on its own, after the group so far (`ddl.rs`).
            let alone = match self.cfg.ddl {
                Ddl::None => None,
                _ => ddl::alone(&record),
            };
            if alone.is_some() && group.open {
                self.close_group(s, &mut group).await?;
            }
            if !group.open {
                let skip = self.skip.lock().expect("skip lock").clone();
                if let Some((seq, reason)) = skip.filter(|(seq, _)| *seq == record.seq) {
                    self.skip_transaction(s, seq, &reason).await?;
                    *self.skip.lock().expect("skip lock") = None;
                    // Its records are deleted: go on after them (reading
                    // `cursor` again found it missing when nothing had
                    // arrived after it yet, and paused apply as out of order).
                    cursor = s.marker_seq + 1;
                    prev = None;
                    continue;
                }
                if let Some(alone) = alone {
                    self.apply_alone(s, &record, alone).await?;
                    in_txn = false;
                    cursor += 1;
                    continue;
                }
                s.client
                    .batch_execute("BEGIN")
                    .await
                    .map_err(target_err("begin target transaction"))?;
                group.open = true;
            }
            in_txn = !record.last;
            group.changes += self.queue_record(s, &record).await?;
            if record.last {
                if let Some(c) = s.copy.as_mut() {
                    c.complete = true;
                }
            }
            if record.last {
                group.txns += 1;
                group.end = Some(GroupEnd {
                    seq: record.seq,
                    commit_lsn: record.commit_lsn,
                    end_lsn: record.end_lsn,
                    commit_time: record.commit_time,
                });
                let careful = record.seq <= self.careful_until.load(Ordering::Relaxed);
                if careful
                    || s.end_group
                    || group.txns >= self.cfg.apply_group_transactions
                    || group.changes >= self.cfg.apply_group_changes
                {
                    self.close_group(s, &mut group).await?;
                }
            } else if s.pipeline_full() {
                self.drain(s).await?;
            }
            cursor += 1;
        }
    }

    /// Commit `group` (open, with an end) and start the next afresh.
    async fn close_group(&self, s: &mut Session, group: &mut Group) -> Result<(), ApplyError> {
        let end = group.end.take().expect("an open group has an end");
        self.commit_group(s, end, group.txns).await?;
        *group = Group::default();
        Ok(())
    }

    /// Commit the open group: send what is queued, move its sequences
    /// forward, move the progress row, COMMIT, and only then delete its records from the inbox.
    async fn commit_group(
        &self,
        s: &mut Session,
        end: GroupEnd,
        txns: u32,
    ) -> Result<(), ApplyError> {
        self.drain(s).await?;
        self.move_sequences(s).await?;
        s.client
            .execute(
                &s.progress,
                &[
                    &s.source,
                    &end.commit_lsn.to_string(),
                    &end.end_lsn.to_string(),
                    &(end.seq as i64),
                    &end.commit_time,
                ],
            )
            .await
            .map_err(target_err("write progress row"))?;
        s.client
            .batch_execute("COMMIT")
            .await
            .map_err(target_err("commit target transaction"))?;
        debug_assert!(end.commit_lsn > s.marker);
        s.end_group = false;
        s.marker = end.commit_lsn;
        s.marker_seq = end.seq;
        self.inbox.delete_through(end.seq)?;
        s.joins.committed();
        self.log_loaded_joins(s);
        let mut st = self.status.lock().expect("status lock");
        st.joining = s.joins.status();
        if s.copy.as_ref().is_some_and(|c| c.complete) {
            let mut c = s.copy.take().expect("checked");
            c.refresh();
            tracing::info!(
                rows = c.rows,
                tables = c.tables.len(),
                seconds = c.elapsed_seconds,
                rows_per_second = c.rows_per_second as u64,
                "table copy loaded and committed"
            );
            st.copy = None;
        }
        if st.last_error.take().is_some() {
            tracing::info!("apply resumed");
        }
        st.error_class = None;
        st.paused = false;
        st.blocking_seq = None;
        st.applied_seq = end.seq;
        st.applied_commit_lsn = end.commit_lsn;
        st.applied_commit_time = end.commit_time;
        st.applied_transactions += u64::from(txns);
        Ok(())
    }
}
