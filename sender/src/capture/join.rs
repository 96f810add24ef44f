//! A table joining a running publication, in chunks (`store/join.rs` has
//! the messages, docs/design.md the reasons). The cut is taken as for any
//! copy; then:
//!
//! 1. **Start** (`start_join`): the transaction at L − 1 carries the
//!    tables' definitions and Relations only; the tables move from
//!    `waiting` to `synced`, so their changes after L are spooled like any
//!    (the branch holds them until the rows are in). The join is `open` in
//!    the spool's [`Joins`], durable with that transaction.
//! 2. **Chunks**: a reader task (`copy::read_join`) reads the tables in
//!    the cut's snapshot, which stays open, into a bounded channel; the
//!    stream loop splices one chunk at a time between the live
//!    transactions (`Cutter::splice`: a commit LSN the WAL leaves free
//!    between them), only while every connected receiver has less than
//!    two chunks left to send. So a live transaction waits behind at most
//!    two chunks on the link, and the copy takes the rest of the link.
//!    With no receiver connected, nothing is spliced: the copy waits with
//!    the link. When no LSN is free (a quiet source), the sender commits
//!    an empty transaction with an XID (`SELECT txid_current()`: a commit
//!    record, nothing decoded) and asks the walsender where it has read to.
//! 3. **End**: spliced like a chunk; the join leaves `open` in the same
//!    commit.
//!
//! A join cut short (the session or the sender ended: its snapshot is
//! gone) is abandoned when the next session loads the tables: its tables
//! wait for a copy again, from a new cut, and its id is named in that
//! copy's `aborts`, so the branches drop what they staged and held before
//! loading the new copy (which holds the effect of those changes).

use std::time::{Duration, Instant};

use pgcourier_common::store::durable::Synced;
use pgcourier_proto::cutter::Cutter;
use pgcourier_proto::pgoutput;
use pgcourier_proto::Lsn;
use tokio_postgres::Client;

use super::splice::{copy_cutter, copy_head, CopyTxn, Settles};
use super::{Capture, CaptureError};
use crate::copy::{self, CopyProgress, Cut, JoinChunk, JOIN_CHUNK_BYTES};
use crate::spool::OpenJoin;

/// How often the stream loop looks again for room on the link while a
/// chunk waits.
pub(super) const JOIN_POLL: Duration = Duration::from_millis(20);

/// At most one empty transaction this often, to move the WAL on.
const TICK_EVERY: Duration = Duration::from_millis(100);

/// Chunks read ahead of the splice.
const READ_AHEAD: usize = 2;

/// The join being read and spliced.
pub(super) struct ActiveJoin {
    pub id: u64,
    /// The receiver it is for, or `None`: every receiver.
    only_for: Option<String>,
    /// The columns each table had at the cut (published ones, in order).
    columns: std::collections::HashMap<u32, Vec<String>>,
    rx: tokio::sync::mpsc::Receiver<Result<JoinChunk, copy::CopyError>>,
    /// The next chunk, read and not yet spliced.
    pub pending: Option<JoinChunk>,
    task: tokio::task::JoinHandle<()>,
    ticked: Option<Instant>,
    /// When the link last had no room for the pending chunk.
    no_room: Option<Instant>,
    chunks: u64,
}

impl Drop for ActiveJoin {
    fn drop(&mut self) {
        // Its snapshot connection ends with it.
        self.task.abort();
    }
}

impl ActiveJoin {
    /// The next chunk from the reader (`None`: it stopped without an end,
    /// which it never does while capture holds the join).
    pub async fn recv(&mut self) -> Option<Result<JoinChunk, copy::CopyError>> {
        self.rx.recv().await
    }
}

/// What a join copies, and for whom.
pub(super) struct JoinJob<'a> {
    pub tables: &'a [u32],
    pub reason: &'a str,
    pub only_for: Option<String>,
    /// A copy owed to `only_for` after its join was abandoned: its start
    /// stays.
    pub again: bool,
}

/// What splicing the pending chunk did.
pub(super) enum Spliced {
    /// Nothing was pending, or the link or the WAL has no room yet.
    Nothing,
    /// A chunk went into the batch.
    Chunk,
    /// The join's end went into the batch: the join is over.
    End,
}

impl Capture {
    /// Abandon the joins a previous session or process left open: their
    /// tables wait for a new copy, and the copy names the joins in
    /// `aborts`. Before anything is captured.
    pub(super) async fn abandon_joins(&mut self) -> Result<(), CaptureError> {
        self.joins = self.spool.joins()?;
        if self.joins.open.is_empty() {
            return Ok(());
        }
        for join in std::mem::take(&mut self.joins.open) {
            self.abandon(
                join,
                "a table join was cut short (its snapshot is gone): its tables will be copied again from a new cut",
            );
        }
        let (state, joins) = (self.copy_state.clone(), self.joins.clone());
        self.blocking(move |spool| {
            spool.set_copy_state(&state)?;
            spool.set_joins(&joins)?;
            spool.sync()
        })
        .await
    }

    /// Abandon `join` (no longer open): a join for every receiver makes its
    /// tables wait for a new copy, whose metadata names it in `aborts`; a
    /// join for a receiver added late leaves it owed a new copy made for
    /// it (it applies what it was sent, then that copy, which drops the
    /// abandoned join first). The caller makes the state durable.
    fn abandon(&mut self, join: OpenJoin, why: &str) {
        tracing::info!(
            join = join.id,
            tables = join.tables.len(),
            receiver = join.only_for.as_deref().unwrap_or("every receiver"),
            "{why}"
        );
        match join.only_for {
            Some(name) => {
                if !self.joins.owed.contains(&name) {
                    self.joins.owed.push(name);
                }
            }
            None => {
                for oid in join.tables {
                    if self.copy_state.tables.synced.remove(&oid) {
                        self.copy_state.tables.waiting.insert(oid);
                    }
                }
                self.joins.aborted.push(join.id);
            }
        }
    }

    /// A Relation in the stream: if it is a table the active join reads
    /// and its columns are no longer those the join started with (a
    /// schema change while it loads), the join is abandoned at once, its
    /// reader stopped, and the tables copied again from a new cut (the
    /// branch's staging table and held changes no longer match the table).
    /// Returns whether it was (the copy and join state then go with the
    /// batch's commit).
    pub(super) fn relation_seen(&mut self, oid: u32, relation: &[u8]) -> bool {
        let Some(expected) = self.join.as_ref().and_then(|j| j.columns.get(&oid)) else {
            return false;
        };
        let Ok(pgoutput::Message::Relation(rel)) = pgoutput::decode(relation) else {
            return false;
        };
        if rel.columns.iter().map(|c| &c.name).eq(expected.iter()) {
            return false;
        }
        let join = self.join.take().expect("checked");
        self.copy_finished();
        let Some(i) = self.joins.open.iter().position(|j| j.id == join.id) else {
            return false;
        };
        let open = self.joins.open.remove(i);
        self.abandon(
            open,
            "a joining table's columns changed while it loaded: the join is abandoned and the table copied again from a new cut",
        );
        true
    }

    /// Spool the join's start at the cut − 1 and start reading its rows.
    /// `only_for`: a copy made for a receiver added late, as a join (it
    /// starts at the join's start, unless `again`: a copy it is owed after
    /// an abandoned one).
    pub(super) async fn start_join(
        &mut self,
        cut: Cut,
        job: JoinJob<'_>,
        txn: &CopyTxn,
        started: Instant,
    ) -> Result<Synced<Lsn>, CaptureError> {
        let JoinJob {
            tables,
            reason,
            only_for,
            again,
        } = job;
        let id = self.joins.next_id;
        let (mut meta, relations) = self.describe_copy(&cut, tables, reason, &only_for).await?;
        meta.join = Some(id);
        let mut cutter = copy_cutter(self.spool.next_seq(), txn, &only_for);
        let start = cutter.next_seq();
        for message in copy_head(&meta, &relations, false) {
            for record in cutter.push(&message) {
                self.spool.append(record.seq, &record.encode()?)?;
            }
        }
        let last = cutter.finish(txn.end_lsn);
        self.spool.append(last.seq, &last.encode()?)?;
        let settles = Settles {
            tables,
            only_for: only_for.clone(),
            again,
            aborts_named: !meta.aborts.is_empty(),
            join: Some(OpenJoin {
                id,
                tables: tables.to_vec(),
                only_for: only_for.clone(),
            }),
        };
        let synced = self.commit_copy(settles, txn, start).await?;
        tracing::info!(
            join = id,
            cut = %cut.lsn,
            tables = meta.tables.len(),
            rows_estimate = meta.tables.iter().map(|t| t.rows_estimate).sum::<u64>(),
            seconds = started.elapsed().as_secs_f64(),
            "a table joins: its rows follow in chunks between the live transactions"
        );
        self.status.lock().expect("status lock").copy = Some(CopyProgress::new(&meta));
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
        let task = tokio::spawn(copy::read_join(cut, id, meta.tables.clone(), tx));
        self.join = Some(ActiveJoin {
            id,
            columns: meta
                .tables
                .iter()
                .map(|t| (t.oid, t.columns.iter().map(|c| c.name.clone()).collect()))
                .collect(),
            only_for,
            rx,
            pending: None,
            task,
            ticked: None,
            no_room: None,
            chunks: 0,
        });
        Ok(synced)
    }

    /// Whether a chunk may go to the link now: every connected receiver has
    /// less than two chunks left to send, and one is connected.
    fn link_has_room(&self) -> bool {
        self.link_room
            .as_ref()
            .is_some_and(|room| room(2 * JOIN_CHUNK_BYTES as u64))
    }

    /// Splice the pending chunk into the stream between transactions, when
    /// the link and the WAL have room for it. Moves the WAL on (an empty
    /// transaction, and a status update asking where the walsender has
    /// read to) when only the WAL lacks room.
    pub(super) async fn splice_chunk(
        &mut self,
        cutter: &mut Cutter,
        client: &Client,
        stream: &mut crate::replication::ReplicationStream,
    ) -> Result<Spliced, CaptureError> {
        // The link is asked at most once per JOIN_POLL while it has no room
        // (this runs between every two transactions of the stream).
        let ask = self
            .join
            .as_ref()
            .is_some_and(|j| j.pending.is_some() && due(j.no_room, JOIN_POLL));
        if !ask {
            return Ok(Spliced::Nothing);
        }
        if !self.link_has_room() {
            self.join.as_mut().expect("checked").no_room = Some(Instant::now());
            return Ok(Spliced::Nothing);
        }
        let join = self.join.as_mut().expect("checked");
        join.no_room = None;
        let chunk = join.pending.as_ref().expect("checked");
        let now = pgcourier_common::pg::time::now_pg_micros();
        let Some(records) = cutter.splice(&chunk.message, now, join.only_for.clone()) else {
            if due(join.ticked, TICK_EVERY) {
                join.ticked = Some(Instant::now());
                client
                    .batch_execute("SELECT txid_current()")
                    .await
                    .map_err(|e| {
                        crate::source::SourceError::query(
                            "move the WAL on for a joining table's next chunk",
                            e,
                        )
                    })?;
                self.send_status(stream, true).await?;
            }
            return Ok(Spliced::Nothing);
        };
        for record in records {
            self.spool.append(record.seq, &record.encode()?)?;
        }
        let chunk = join.pending.take().expect("checked");
        join.chunks += 1;
        if let Some((table, rows, bytes)) = chunk.table {
            if let Some(p) = self.status.lock().expect("status lock").copy.as_mut() {
                p.add_counts(table, rows, bytes, false);
            }
        }
        if !chunk.end {
            return Ok(Spliced::Chunk);
        }
        let join = self.join.take().expect("checked");
        self.joins.open.retain(|j| j.id != join.id);
        let rows = self.copy_finished();
        tracing::info!(
            join = join.id,
            chunks = join.chunks,
            rows,
            "a table join's rows are all spooled"
        );
        Ok(Spliced::End)
    }

    /// Write the joins' bookkeeping with the batch that changed it.
    pub(super) fn save_joins(&self) -> Result<(), CaptureError> {
        Ok(self.spool.set_joins(&self.joins)?)
    }
}

/// Never, or longer ago than `every`.
fn due(last: Option<Instant>, every: Duration) -> bool {
    match last {
        None => true,
        Some(t) => t.elapsed() >= every,
    }
}
