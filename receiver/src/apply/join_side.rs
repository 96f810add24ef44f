//! A join's side transaction: a second target connection that fills the
//! joining tables while the join loads, so that the join's end costs the
//! apply connection no time proportional to the tables (`join.rs` has the
//! join itself; this is its fast path).
//!
//! ```text
//! chunk 1 staged    side task started: connect as apply does (`target::open`),
//!                   BEGIN; DELETE FROM each of the join's tables
//! group commits     the chunks it staged go to the task (a channel), which
//!                   COPYs them into the tables, inside its open transaction
//! end               the end's own group's chunks go too; the task drains and
//!                   hands its connection back; its COMMIT (under apply's
//!                   replication origin, borrowed for it) makes the rows
//!                   visible at once; the end then only replays the held
//!                   changes and drops staging (no TRUNCATE, no INSERT ..
//!                   SELECT on the apply connection)
//! ```
//!
//! DELETE, not TRUNCATE: DELETE takes ROW EXCLUSIVE, so the branch's
//! readers keep seeing the table's old contents until the side COMMIT;
//! TRUNCATE's ACCESS EXCLUSIVE would block them for the whole join.
//!
//! A chunk goes to the side transaction once the group that staged it has
//! committed, so a chunk is never copied twice. The end's own group is the
//! exception: its chunks go just before the side COMMIT, since anything
//! that undoes that group (an error, a crash) also ends the session and
//! the side with it, and the group applied again takes the slow path.
//!
//! The side transaction is used only when it holds every chunk of the
//! join: it started with chunk 1 in this session and got each next chunk
//! in order ([`Coverage`]). Anything else gives it up ("lost": rolled back,
//! and the end takes the slow path, `TRUNCATE` + `INSERT .. SELECT` from
//! staging, which is idempotent): a receiver restarted mid-join, a chunk
//! out of order, more than [`SIDE_QUEUE`] chunks queued, any error on the
//! side connection (logged once; never an error of apply), the session
//! ending, the join aborted, and a schema change applied meanwhile (its
//! lock could wait on the side transaction's, which waits on apply: rolled
//! back first, [`Apply::abandon_sides`]).
//!
//! Exactly once: the side COMMIT comes before the commit of the end's
//! group G, which replays the held changes, drops staging and moves the
//! progress row. A crash between the two leaves staging, held changes and
//! the progress row as they were: G is applied again, by the slow path,
//! which replaces the side transaction's rows with staging's (the same
//! rows) and replays the held changes. Readers see the table's old
//! contents, then its rows at the join's cut (between the side COMMIT and
//! G's commit), then its rows with the held changes.
//!
//! Locks: apply never writes a loading table (its changes are held), so the
//! side transaction blocks apply only where apply takes a table lock on it:
//! DDL (handled above) and the slow path's TRUNCATE (never taken while the
//! side transaction is open).
//!
//! Replication origin: one session at a time may have an origin set up,
//! and the commit record's origin is what a sender capturing this database
//! looks at. Apply resets its origin, the side connection sets it up for
//! its COMMIT and resets it, and apply sets it up again, all inside the
//! end's group (its commit record carries the origin as before).
//!
//! Limits: a lock the branch takes on a loading table (a reader's `SELECT
//! .. FOR UPDATE`, a `TRUNCATE .. CASCADE` reaching it, with `replica-role
//! = false` a foreign key check of a row referencing it) waits on the side
//! transaction, up to `lock_timeout` (30 s): apply then retries, and the
//! join ends by the slow path. The side transaction's DELETE leaves dead
//! rows for VACUUM, where TRUNCATE left none. A side transaction needs one
//! more connection to the target per join being loaded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pgcourier_common::ops::backoff::error_chain;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::error::{target_err, ApplyError};
use super::pipeline::copy_in;
use super::target::{self, TargetClient};
use super::{Apply, Session};
use crate::config::ReceiverConfig;

/// Chunks a side transaction may have queued (staged by the open group,
/// or sent and not yet copied); past it the side transaction is given up.
/// Bounds memory: chunks are about 64 KiB.
pub(super) const SIDE_QUEUE: usize = 16;

/// The open group ends once it staged this many chunks of a join with a
/// side transaction, so that they go to it (and leave memory) soon.
pub(super) const GROUP_CHUNKS: usize = 8;

/// How long the join's end waits for the side transaction to copy what it
/// was sent (at most [`SIDE_QUEUE`] chunks; it waits longer only on a lock
/// someone else holds, and gives up at its `lock_timeout`).
const DRAIN_WAIT: Duration = Duration::from_secs(120);

/// How long giving a side transaction up waits for its task to roll back
/// before it is aborted (its connection dropped: the server rolls back).
const ROLLBACK_WAIT: Duration = Duration::from_secs(10);

/// A table of the join as the side transaction writes it: the quoted
/// target (as `pgcourier.joining` has it) and the published columns.
#[derive(Clone, Debug)]
pub(super) struct SideTable {
    pub(super) target: String,
    pub(super) columns: Vec<String>,
}

/// A chunk for the side transaction.
struct Chunk {
    n: u64,
    table: u32,
    rows: u64,
    data: Bytes,
}

/// What the side task is asked to do.
enum Job {
    /// COPY a chunk into its table.
    Chunk(Chunk),
    /// Every chunk sent was copied: hand the connection back, its
    /// transaction open, for the COMMIT.
    Finish(oneshot::Sender<TargetClient>),
}

/// Which chunks a side transaction holds: 1 up to `next`, none skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Coverage {
    next: u64,
}

impl Coverage {
    /// Before chunk 1.
    pub(super) fn new() -> Coverage {
        Coverage { next: 1 }
    }

    /// Chunk `n` arrives: true when it is the next one (taken); false for
    /// a gap or a repeat (the side transaction cannot be complete).
    pub(super) fn take(&mut self, n: u64) -> bool {
        if n == self.next {
            self.next += 1;
            true
        } else {
            false
        }
    }

    /// Whether every chunk of a join that sent `sent` chunks was taken.
    pub(super) fn complete(&self, sent: u64) -> bool {
        self.next == sent + 1
    }
}

/// One join's side transaction, as the apply session sees it.
pub(super) struct Side {
    join: u64,
    /// By source OID.
    tables: HashMap<u32, SideTable>,
    coverage: Coverage,
    /// Chunks the open group staged: sent once it commits.
    waiting: Vec<Chunk>,
    /// To the task; `None` once the side transaction is lost.
    tx: Option<mpsc::Sender<Job>>,
    task: Option<JoinHandle<()>>,
}

impl Side {
    /// Start join `join`'s side transaction (its task connects and deletes
    /// the tables' rows; apply does not wait for it).
    pub(super) fn start(
        cfg: Arc<ReceiverConfig>,
        join: u64,
        tables: HashMap<u32, SideTable>,
    ) -> Side {
        let (tx, rx) = mpsc::channel(SIDE_QUEUE);
        let task = tokio::spawn(run(cfg, join, tables.clone(), rx));
        tracing::debug!(join, "side transaction of a join started");
        Side {
            join,
            tables,
            coverage: Coverage::new(),
            waiting: Vec::new(),
            tx: Some(tx),
            task: Some(task),
        }
    }

    /// Whether the side transaction was given up.
    pub(super) fn lost(&self) -> bool {
        self.tx.is_none()
    }

    /// Chunks staged by the open group, not yet sent.
    pub(super) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Chunk `n` (`rows` rows of source table `table`) was staged by the
    /// open group: kept until it commits.
    pub(super) fn stage(&mut self, n: u64, table: u32, rows: u64, data: Bytes) {
        if self.lost() {
            return;
        }
        if !self.coverage.take(n) {
            self.lose(&format!("chunk {n} arrived out of order"));
            return;
        }
        self.waiting.push(Chunk {
            n,
            table,
            rows,
            data,
        });
        if self.queued() > SIDE_QUEUE {
            self.lose(&format!("more than {SIDE_QUEUE} chunks queued"));
        }
    }

    /// Chunks waiting or sent and not yet copied.
    fn queued(&self) -> usize {
        let in_channel = self
            .tx
            .as_ref()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity());
        self.waiting.len() + in_channel
    }

    /// The open group committed: its chunks go to the task.
    pub(super) fn committed(&mut self) {
        let Some(tx) = &self.tx else {
            return;
        };
        let mut closed = false;
        for chunk in std::mem::take(&mut self.waiting) {
            match tx.try_send(Job::Chunk(chunk)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.lose(&format!("more than {SIDE_QUEUE} chunks queued"));
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed {
            // The task ended on an error, and logged it.
            self.tx = None;
        }
    }

    /// Give the side transaction up (it rolls back; the end takes the slow
    /// path). Logged once, at info: no data is at risk.
    fn lose(&mut self, why: &str) {
        if self.tx.take().is_some() {
            tracing::info!(join = self.join, reason = why, "side transaction of a join given up: the join's end fills the tables from staging on the apply connection");
        }
        self.waiting.clear();
    }

    /// Roll the side transaction back and wait until it is gone (its locks
    /// released), at most [`ROLLBACK_WAIT`].
    pub(super) async fn abandon(mut self, why: &str) {
        self.lose(why);
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(ROLLBACK_WAIT, &mut task)
                .await
                .is_err()
            {
                tracing::debug!(
                    join = self.join,
                    "side transaction did not roll back in time: connection dropped"
                );
                task.abort();
                let _ = task.await;
            }
        }
    }

    /// At the join's end (`sent` chunks, the tables mapped to `mapped` by
    /// apply): the side connection, every chunk copied, its transaction
    /// open; `None` (and rolled back) when it is not complete or failed.
    async fn finish(mut self, sent: u64, mapped: &HashMap<u32, String>) -> Option<TargetClient> {
        if self.lost() {
            self.abandon("lost earlier").await;
            return None;
        }
        if !self.coverage.complete(sent) {
            self.abandon(&format!("it does not hold all {sent} chunks"))
                .await;
            return None;
        }
        let same = self.tables.len() == mapped.len()
            && self
                .tables
                .iter()
                .all(|(oid, t)| mapped.get(oid) == Some(&t.target));
        if !same {
            self.abandon("the join's tables map to other target tables now")
                .await;
            return None;
        }
        // The end's own group's chunks (see the module doc).
        self.committed();
        let (reply, back) = oneshot::channel();
        let sent_finish = match &self.tx {
            Some(tx) => tx.send(Job::Finish(reply)).await.is_ok(),
            None => false,
        };
        if !sent_finish {
            self.abandon("its connection failed").await;
            return None;
        }
        match tokio::time::timeout(DRAIN_WAIT, back).await {
            Ok(Ok(client)) => {
                if let Some(task) = self.task.take() {
                    // It returns right after handing the connection back.
                    let _ = task.await;
                }
                Some(client)
            }
            Ok(Err(_)) => {
                self.abandon("its connection failed").await;
                None
            }
            Err(_) => {
                self.abandon(&format!("it did not copy its chunks within {DRAIN_WAIT:?}"))
                    .await;
                None
            }
        }
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        // Apply cancelled (shutdown): the connection goes with the task.
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The side task: connect, BEGIN, delete the tables' rows, then COPY each
/// chunk it is sent until asked to hand the connection back; rolls back
/// when the channel closes first. An error ends it (logged once).
async fn run(
    cfg: Arc<ReceiverConfig>,
    join: u64,
    tables: HashMap<u32, SideTable>,
    mut rx: mpsc::Receiver<Job>,
) {
    let client = match begin(&cfg, &tables).await {
        Ok(client) => client,
        Err(e) => {
            lost_on(join, &e);
            return;
        }
    };
    while let Some(job) = rx.recv().await {
        match job {
            Job::Chunk(chunk) => {
                if let Err(e) = copy_chunk(&client, join, &tables, chunk).await {
                    lost_on(join, &e);
                    client.close().await;
                    return;
                }
            }
            Job::Finish(reply) => {
                if let Err(client) = reply.send(client) {
                    client.close().await;
                }
                return;
            }
        }
    }
    // Given up: roll back before closing, so its locks go at once.
    let _ = client.batch_execute("ROLLBACK").await;
    client.close().await;
    tracing::debug!(join, "side transaction of a join rolled back");
}

/// Log an error that ended a side transaction (never row values: a
/// PostgreSQL error shows through `PgError`).
fn lost_on(join: u64, e: &ApplyError) {
    tracing::warn!(join, error = %error_chain(e), "side transaction of a join failed and is given up: the join's end fills the tables from staging on the apply connection (the branch's other tables wait meanwhile)");
}

/// The side connection, its transaction open, the tables' rows deleted.
async fn begin(
    cfg: &ReceiverConfig,
    tables: &HashMap<u32, SideTable>,
) -> Result<TargetClient, ApplyError> {
    let client = target::open(cfg).await?;
    client
        .batch_execute("BEGIN")
        .await
        .map_err(target_err("begin the side transaction of a join"))?;
    for t in tables.values() {
        client
            .batch_execute(&delete_sql(&t.target))
            .await
            .map_err(|e| ApplyError::Target {
                what: format!(
                    "delete the rows of joining table {} (side transaction)",
                    t.target
                ),
                source: e.into(),
            })?;
    }
    Ok(client)
}

/// A chunk's rows into its table.
async fn copy_chunk(
    client: &TargetClient,
    join: u64,
    tables: &HashMap<u32, SideTable>,
    chunk: Chunk,
) -> Result<(), ApplyError> {
    let Some(t) = tables.get(&chunk.table) else {
        return Err(ApplyError::Join {
            seq: 0,
            message: format!(
                "chunk {} of join {join} is for source table {}, not one of the join's",
                chunk.n, chunk.table
            ),
        });
    };
    if chunk.data.is_empty() {
        return Ok(());
    }
    let loaded = copy_in(client, &copy_sql(&t.target, &t.columns), chunk.data)
        .await
        .map_err(|e| ApplyError::Target {
            what: format!(
                "load chunk {} of join {join} into {} (side transaction)",
                chunk.n, t.target
            ),
            source: e.into(),
        })?;
    if loaded != chunk.rows {
        return Err(ApplyError::Join {
            seq: 0,
            message: format!(
                "chunk {} of join {join} for {} loaded {loaded} rows in the side transaction, its header says {}",
                chunk.n, t.target, chunk.rows
            ),
        });
    }
    Ok(())
}

/// The side transaction empties a table: DELETE (ROW EXCLUSIVE: readers go
/// on seeing the old rows), not TRUNCATE.
fn delete_sql(target: &str) -> String {
    format!("DELETE FROM {target}")
}

/// A chunk's rows straight into the target table. COPY writes the given
/// values into a `GENERATED ALWAYS` identity column (as `OVERRIDING SYSTEM
/// VALUE`); a target column not listed takes its default.
fn copy_sql(target: &str, columns: &[String]) -> String {
    format!(
        "COPY {target} ({}) FROM STDIN",
        super::join::column_list(columns)
    )
}

/// Commit a side transaction under `origin` (apply's, released by apply
/// for it), then give the origin back.
async fn commit(client: &TargetClient, origin: Option<&str>) -> Result<(), ApplyError> {
    if let Some(origin) = origin {
        client
            .execute(
                "SELECT pg_catalog.pg_replication_origin_session_setup($1)",
                &[&origin],
            )
            .await
            .map_err(target_err(
                "take apply's replication origin for the side transaction's commit",
            ))?;
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(target_err("commit the side transaction of a join"))?;
    if origin.is_some() {
        client
            .batch_execute("SELECT pg_catalog.pg_replication_origin_session_reset()")
            .await
            .map_err(target_err(
                "give apply's replication origin back after the side transaction's commit",
            ))?;
    }
    Ok(())
}

impl Apply {
    /// Join `join`'s chunk `n` was staged by the open group: to its side
    /// transaction, which chunk 1 starts. The group ends soon after a few
    /// such chunks, so they reach the side transaction soon.
    pub(super) fn side_stage(
        &self,
        s: &mut Session,
        join: u64,
        n: u64,
        table: u32,
        data: Bytes,
        rows: u64,
    ) {
        if n == 1 && !s.joins.sides.contains_key(&join) {
            let tables = s.joins.side_tables(join);
            s.joins
                .sides
                .insert(join, Side::start(self.cfg.clone(), join, tables));
        }
        if let Some(side) = s.joins.sides.get_mut(&join) {
            side.stage(n, table, rows, data);
            if side.waiting() >= GROUP_CHUNKS {
                s.end_group = true;
            }
        }
    }

    /// At join `join`'s end (`sent` chunks; its tables resolved, `oids`):
    /// commit its side transaction when it holds every chunk. True: the
    /// tables hold the join's rows, committed; false: the end fills them
    /// from staging. An error is apply's own (moving its origin).
    pub(super) async fn commit_side(
        &self,
        s: &mut Session,
        join: u64,
        sent: u64,
        oids: &[u32],
    ) -> Result<bool, ApplyError> {
        let Some(side) = s.joins.sides.remove(&join) else {
            return Ok(false);
        };
        let mapped: HashMap<u32, String> = oids
            .iter()
            .filter_map(|oid| s.targets.get(oid).map(|m| (*oid, m.table.clone())))
            .collect();
        let Some(client) = side.finish(sent, &mapped).await else {
            return Ok(false);
        };
        // A replication origin is active in one session at a time: apply
        // lends it for the side COMMIT, so the rows carry it as apply's do.
        let origin = s.origin.clone();
        if origin.is_some() {
            s.client
                .batch_execute("SELECT pg_catalog.pg_replication_origin_session_reset()")
                .await
                .map_err(target_err(
                    "lend the replication origin to a join's side transaction",
                ))?;
        }
        let committed = commit(&client, origin.as_deref()).await;
        client.close().await;
        if let Some(origin) = &origin {
            s.client
                .execute(
                    "SELECT pg_catalog.pg_replication_origin_session_setup($1)",
                    &[origin],
                )
                .await
                .map_err(target_err(
                    "take the replication origin back from a join's side transaction",
                ))?;
        }
        match committed {
            Ok(()) => Ok(true),
            Err(e) => {
                lost_on(join, &e);
                Ok(false)
            }
        }
    }

    /// Roll back every side transaction before apply runs `what` (a schema
    /// change: its lock could wait on theirs while they wait on apply).
    /// Their joins end by the slow path.
    pub(super) async fn abandon_sides(&self, s: &mut Session, what: &str) {
        for (_, side) in s.joins.sides.drain() {
            side.abandon(&format!("rolled back before {what}")).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_side_transaction_is_complete_only_with_every_chunk_from_the_first_in_order() {
        let mut c = Coverage::new();
        assert!(c.complete(0), "a join of no chunks");
        assert!(!c.complete(1));
        assert!(c.take(1));
        assert!(c.take(2));
        assert!(c.complete(2));
        assert!(!c.complete(3), "a chunk still to come");
        assert!(!c.take(2), "a repeat");
        assert!(!c.take(4), "a gap");
        assert!(c.complete(2), "refused chunks change nothing");

        // A receiver restarted mid-join sees chunk 7 first: never complete.
        let mut c = Coverage::new();
        assert!(!c.take(7));
        assert!(!c.complete(7));
    }

    #[test]
    fn side_statements_quote_every_identifier_and_never_truncate() {
        let columns = vec!["id".to_owned(), "Note \"x\"".to_owned()];
        assert_eq!(delete_sql("\"s\".\"t\""), "DELETE FROM \"s\".\"t\"");
        assert_eq!(
            copy_sql("\"s\".\"t\"", &columns),
            "COPY \"s\".\"t\" (\"id\", \"Note \"\"x\"\"\") FROM STDIN"
        );
    }

    #[tokio::test]
    async fn chunks_wait_for_their_group_and_too_many_give_the_side_up() {
        let (tx, mut rx) = mpsc::channel(SIDE_QUEUE);
        let mut side = Side {
            join: 1,
            tables: HashMap::new(),
            coverage: Coverage::new(),
            waiting: Vec::new(),
            tx: Some(tx),
            task: None,
        };
        side.stage(1, 10, 1, Bytes::from_static(b"1\n"));
        side.stage(2, 10, 1, Bytes::from_static(b"2\n"));
        assert!(rx.try_recv().is_err(), "nothing sent before the commit");
        side.committed();
        assert_eq!(side.waiting(), 0);
        for n in [1, 2] {
            match rx.try_recv() {
                Ok(Job::Chunk(c)) => assert_eq!(c.n, n),
                _ => panic!("chunk {n} sent after the commit"),
            }
        }
        // The task is slow: chunks pile up in the channel and the group.
        for n in 3..3 + SIDE_QUEUE as u64 {
            side.stage(n, 10, 1, Bytes::new());
            side.committed();
        }
        assert!(!side.lost(), "{} queued", side.queued());
        side.stage(3 + SIDE_QUEUE as u64, 10, 1, Bytes::new());
        assert!(side.lost(), "more than SIDE_QUEUE chunks queued");

        // A gap gives it up too.
        let (tx, _rx) = mpsc::channel(SIDE_QUEUE);
        let mut side = Side {
            join: 2,
            tables: HashMap::new(),
            coverage: Coverage::new(),
            waiting: Vec::new(),
            tx: Some(tx),
            task: None,
        };
        side.stage(1, 10, 1, Bytes::new());
        side.stage(3, 10, 1, Bytes::new());
        assert!(side.lost());
        assert_eq!(side.waiting(), 0, "a lost side keeps no chunk");
    }
}
