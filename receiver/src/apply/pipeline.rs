//! Queued changes → the target, fast and in order: prepared statements are
//! pipelined (up to `PIPELINE_DEPTH` in flight before the first reply);
//! runs of inserts into one table go out as one COPY, runs of updates or of
//! deletes by primary key to one table as one set-based statement
//! (`UPDATE .. FROM unnest(..)` / `DELETE .. USING unnest(..)`, `sql.rs`);
//! unprepared SQL (TRUNCATE) and COPY are barriers that wait for what
//! precedes them. What is queued is bounded in statements and bytes
//! (invariant 5).
//!
//! Order: a run holds consecutive changes only, and a run of updates or
//! deletes never holds the same key twice (the change that would repeat a
//! key starts the next run), so applying a run as one statement changes
//! each row once, as the changes one by one would have.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};

use futures_util::future::try_join_all;
use pgcourier_common::pg::quote_ident;
use tokio_postgres::{Client, Statement};

use super::error::ApplyError;
use super::sql::Op;
use super::{Apply, Session};

/// Statements queued before the pipeline is drained.
const PIPELINE_DEPTH: usize = 512;
/// ... or once the queued COPY and set data reaches this many bytes (bounds
/// memory in a large transaction: invariant 5).
const PIPELINE_BYTES: usize = 4 << 20;

/// An insert whose fragments reach this many bytes is not put together:
/// it is streamed into a COPY of its own (`large.rs`), so a value of many
/// MiB is never held whole.
pub(super) const LARGE_CHANGE_BYTES: usize = 1 << 20;
/// COPY data of a large insert goes out in pieces of about this size.
pub(super) const COPY_CHUNK_BYTES: usize = 256 << 10;

/// A change queued on the session, waiting for the next drain.
pub(super) enum Pending {
    Prepared {
        stmt: Statement,
        params: Vec<Option<String>>,
        rel: u32,
        op: Op,
    },
    Sql {
        sql: String,
    },
    /// A change to a two-way table through `pgcourier.apply_change`
    /// (`two_way.rs`), which answers what it did with a conflict.
    TwoWay {
        stmt: Statement,
        params: Vec<Option<String>>,
    },
    /// A run of inserts into one table, loaded with COPY (text format).
    Copy {
        sql: String,
        data: Vec<u8>,
        rel: u32,
    },
    /// A run of updates or deletes to one table as one statement: one text
    /// array per column (`sql.rs`, `build_set_sql`), `rows` rows.
    Set {
        stmt: Statement,
        columns: Vec<Vec<Option<String>>>,
        rows: u64,
        rel: u32,
    },
}

/// Consecutive changes of one kind to one table with the same columns,
/// waiting to be sent as one statement (a COPY, or one set-based UPDATE or
/// DELETE) or, when the run stays short, as one statement per row.
pub(super) struct Run {
    oid: u32,
    op: Op,
    /// The columns whose values a row holds: an insert's columns set; an
    /// update's columns (all of them: a run holds no unchanged TOAST
    /// value); a delete's key columns.
    set: Vec<bool>,
    /// The key columns (updates: the key is among the values; inserts:
    /// none).
    wher: Vec<bool>,
    rows: Vec<Vec<Option<String>>>,
    /// Hashes of the keys in the run (updates and deletes): a change whose
    /// key hashes to one of them starts a new run. A collision only ends a
    /// run early.
    keys: HashSet<u64>,
    bytes: usize,
}

/// Runs shorter than this go out as one statement per row.
const RUN_MIN_ROWS: usize = 8;
/// A run is flushed at this many rows or bytes (bounds memory).
const RUN_MAX_ROWS: usize = 5000;
const RUN_MAX_BYTES: usize = 1 << 20;

/// The hash a run keeps of a row's key (its values as text).
pub(super) fn key_hash(key: &[&str]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

impl Run {
    fn new(oid: u32, op: Op, set: Vec<bool>, wher: Vec<bool>) -> Run {
        Run {
            oid,
            op,
            set,
            wher,
            rows: Vec::new(),
            keys: HashSet::new(),
            bytes: 0,
        }
    }

    /// Whether a change joins this run: same table, kind and columns, and
    /// (updates and deletes) a key not yet in the run.
    fn admits(&self, oid: u32, op: Op, set: &[bool], key: Option<u64>) -> bool {
        self.oid == oid
            && self.op == op
            && self.set == set
            && key.is_none_or(|k| !self.keys.contains(&k))
    }

    fn push(&mut self, row: Vec<Option<String>>, key: Option<u64>) {
        self.bytes += row
            .iter()
            .map(|v| v.as_ref().map_or(2, |t| t.len() + 1))
            .sum::<usize>();
        if let Some(k) = key {
            self.keys.insert(k);
            self.bytes += 8;
        }
        self.rows.push(row);
    }

    fn full(&self) -> bool {
        self.rows.len() >= RUN_MAX_ROWS || self.bytes >= RUN_MAX_BYTES
    }
}

impl Session {
    /// Time to drain: enough statements or COPY bytes are queued.
    pub(super) fn pipeline_full(&self) -> bool {
        self.pending.len() >= PIPELINE_DEPTH || self.pending_bytes >= PIPELINE_BYTES
    }
}

impl Apply {
    /// Add a change's row to the run of its kind and table, starting a new
    /// run when the table, kind or columns differ or the key is already in
    /// the run. `row`: an insert's values of the columns in `set`; an
    /// update's values of every column (`set` all true, its key columns in
    /// `wher`); a delete's values of the key columns (`set` = `wher`).
    /// `key`: the hash of an update's or delete's key (`key_hash`).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn queue_run(
        &self,
        s: &mut Session,
        oid: u32,
        op: Op,
        set: Vec<bool>,
        wher: Vec<bool>,
        row: Vec<Option<String>>,
        key: Option<u64>,
    ) -> Result<(), ApplyError> {
        let same = matches!(&s.run, Some(r) if r.admits(oid, op, &set, key));
        if !same {
            self.flush_run(s).await?;
            s.run = Some(Run::new(oid, op, set, wher));
        }
        let run = s.run.as_mut().expect("run just ensured");
        run.push(row, key);
        if run.full() {
            self.flush_run(s).await?;
        }
        Ok(())
    }

    /// Queue the pending run: as one COPY or one set-based statement when
    /// long enough, else as one statement per row.
    pub(super) async fn flush_run(&self, s: &mut Session) -> Result<(), ApplyError> {
        let Some(run) = s.run.take() else {
            return Ok(());
        };
        let long = run.rows.len() >= RUN_MIN_ROWS;
        match run.op {
            Op::Insert if long => {
                let target = &s.targets[&run.oid];
                let cols: Vec<&str> = (0..run.set.len())
                    .filter(|&i| run.set[i])
                    .map(|i| target.columns[i].0.as_str())
                    .collect();
                let sql = format!("COPY {} ({}) FROM STDIN", target.table, cols.join(", "));
                let mut data = Vec::with_capacity(run.bytes + run.rows.len());
                for row in &run.rows {
                    copy_row(&mut data, row);
                }
                s.pending_bytes += data.len();
                s.pending.push(Pending::Copy {
                    sql,
                    data,
                    rel: run.oid,
                });
            }
            Op::Update | Op::Delete if long => {
                let stmt = self.set_statement(s, run.oid, run.op, &run.wher).await?;
                let rows = run.rows.len();
                let mut columns = vec![Vec::with_capacity(rows); run.rows[0].len()];
                for row in run.rows {
                    for (c, v) in row.into_iter().enumerate() {
                        columns[c].push(v);
                    }
                }
                s.pending_bytes += run.bytes;
                s.pending.push(Pending::Set {
                    stmt,
                    columns,
                    rows: rows as u64,
                    rel: run.oid,
                });
            }
            op => {
                // One statement per row, as each change would have gone on
                // its own: a delete sets nothing; an update also sends its
                // key for the WHERE.
                let set = match op {
                    Op::Delete => vec![false; run.set.len()],
                    _ => run.set.clone(),
                };
                let stmt = self.statement(s, run.oid, op, &set, &run.wher).await?;
                for mut params in run.rows {
                    if op == Op::Update {
                        let key: Vec<Option<String>> = (0..run.wher.len())
                            .filter(|&i| run.wher[i])
                            .map(|i| params[i].clone())
                            .collect();
                        params.extend(key);
                    }
                    s.pending.push(Pending::Prepared {
                        stmt: stmt.clone(),
                        params,
                        rel: run.oid,
                        op,
                    });
                }
            }
        }
        Ok(())
    }

    /// Send every queued statement and wait for all replies: statements are
    /// pipelined; a COPY waits for what precedes it. Changes held for
    /// joining tables go first, in one statement (`join.rs`).
    pub(super) async fn drain(&self, s: &mut Session) -> Result<(), ApplyError> {
        self.flush_run(s).await?;
        self.flush_held(s).await?;
        let pending = std::mem::take(&mut s.pending);
        s.pending_bytes = 0;
        let mut batch: Vec<Pending> = Vec::new();
        for p in pending {
            match p {
                Pending::Copy { sql, data, rel } => {
                    self.pipeline(s, std::mem::take(&mut batch)).await?;
                    copy_in(&s.client, &sql, data)
                        .await
                        .map_err(|e| target_error(s, Some(rel), e))?;
                }
                // Unprepared SQL (TRUNCATE) is parsed before it runs, so a
                // prepared statement queued after it would overtake it in
                // the pipeline: it waits for what precedes it instead.
                Pending::Sql { sql } => {
                    self.pipeline(s, std::mem::take(&mut batch)).await?;
                    s.client
                        .batch_execute(&sql)
                        .await
                        .map_err(|e| target_error(s, None, e))?;
                }
                p => batch.push(p),
            }
        }
        self.pipeline(s, batch).await
    }

    async fn pipeline(&self, s: &Session, pending: Vec<Pending>) -> Result<(), ApplyError> {
        if pending.is_empty() {
            return Ok(());
        }
        let client = &s.client;
        // Each reply: rows changed, rows the statement should have changed
        // (an insert: not checked), table, and for a two-way change what
        // `pgcourier.apply_change` did (`two_way::Outcome`).
        let futures = pending.iter().map(|p| async move {
            match p {
                Pending::Prepared {
                    stmt,
                    params,
                    rel,
                    op,
                } => {
                    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                        params.iter().map(|p| p as _).collect();
                    let expected = u64::from(*op != Op::Insert);
                    client
                        .execute(stmt, &refs)
                        .await
                        .map(|n| (n, expected, *rel, None))
                        .map_err(|e| (e, Some(*rel)))
                }
                Pending::TwoWay { stmt, params } => {
                    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                        params.iter().map(|p| p as _).collect();
                    client
                        .query_one(stmt, &refs)
                        .await
                        .and_then(|row| row.try_get::<_, i32>(0))
                        .map(|code| (0, 0, 0, Some(code)))
                        .map_err(|e| (e, None))
                }
                Pending::Set {
                    stmt,
                    columns,
                    rows,
                    rel,
                } => {
                    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                        columns.iter().map(|c| c as _).collect();
                    client
                        .execute(stmt, &refs)
                        .await
                        .map(|n| (n, *rows, *rel, None))
                        .map_err(|e| (e, Some(*rel)))
                }
                Pending::Sql { .. } | Pending::Copy { .. } => {
                    unreachable!("SQL and COPY are never pipelined")
                }
            }
        });
        match try_join_all(futures).await {
            Ok(results) => {
                let mut missing = 0;
                let mut outcomes = super::two_way::Outcomes::default();
                for (n, expected, rel, code) in results {
                    if let Some(code) = code {
                        outcomes.count(code);
                    }
                    // A row to update or delete that is not there: the
                    // change is skipped and counted, one by one or in a set.
                    let absent = expected.saturating_sub(n);
                    if absent > 0 {
                        missing += absent;
                        if let Some(t) = s.targets.get(&rel) {
                            tracing::warn!(table = %t.table, rows = absent, "row to update or delete not found on the target (it was changed there, or never copied); change skipped");
                        }
                    }
                }
                if missing > 0 {
                    self.status.lock().expect("status lock").missing_rows += missing;
                }
                if outcomes != super::two_way::Outcomes::default() {
                    self.status
                        .lock()
                        .expect("status lock")
                        .conflicts
                        .add(&outcomes);
                }
                Ok(())
            }
            Err((e, rel)) => Err(target_error(s, rel, e)),
        }
    }
}

/// Send one COPY's data in text format and wait for its completion.
pub(super) async fn copy_in(
    client: &Client,
    sql: &str,
    data: impl Into<bytes::Bytes>,
) -> Result<u64, tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = client.copy_in::<_, bytes::Bytes>(sql).await?;
    futures_util::pin_mut!(sink);
    sink.send(data.into()).await?;
    sink.finish().await
}

/// One row in COPY text format.
pub(super) fn copy_row(out: &mut Vec<u8>, row: &[Option<String>]) {
    for (i, v) in row.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        match v {
            None => out.extend_from_slice(b"\\N"),
            Some(t) => copy_escape(out, t.as_bytes()),
        }
    }
    out.push(b'\n');
}

/// A value's text escaped for COPY text format.
pub(super) fn copy_escape(out: &mut Vec<u8>, text: &[u8]) {
    for &b in text {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
}

/// An apply error that names the table (and column, when PostgreSQL says).
pub(super) fn target_error(s: &Session, rel: Option<u32>, e: tokio_postgres::Error) -> ApplyError {
    // A TRUNCATE names its tables in its own statement, not in `rel`.
    let table = match rel.and_then(|r| s.targets.get(&r)) {
        Some(t) => t.table.as_str(),
        None => "(truncate)",
    };
    let column = match e.as_db_error().and_then(|d| d.column()) {
        Some(c) => format!(", column {}", quote_ident(c)),
        None => String::new(),
    };
    ApplyError::Target {
        what: format!("apply change to table {table}{column}"),
        source: e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_escape_separators_and_nulls() {
        let mut out = Vec::new();
        copy_row(
            &mut out,
            &[Some("a\tb\nc\\d\re".into()), None, Some(String::new())],
        );
        assert_eq!(out, b"a\\tb\\nc\\\\d\\re\t\\N\t\n".to_vec());
    }

    fn row(v: &str) -> Vec<Option<String>> {
        vec![Some(v.into()), None]
    }

    #[test]
    fn a_run_ends_where_a_key_repeats() {
        let (k1, k2) = (Some(key_hash(&["1"])), Some(key_hash(&["2"])));
        let mut run = Run::new(7, Op::Update, vec![true, true], vec![true, false]);
        assert!(run.admits(7, Op::Update, &[true, true], k1));
        run.push(row("1"), k1);
        assert!(run.admits(7, Op::Update, &[true, true], k2));
        run.push(row("2"), k2);
        // The same key again (same row updated twice): not in this run, so
        // the second update is applied after the first.
        assert!(!run.admits(7, Op::Update, &[true, true], k1));
        assert!(!run.admits(7, Op::Update, &[true, true], k2));
        // Deletes of the same keys start their own run too.
        let mut del = Run::new(7, Op::Delete, vec![true, false], vec![true, false]);
        del.push(row("1"), k1);
        assert!(!del.admits(7, Op::Delete, &[true, false], k1));
        assert!(del.admits(7, Op::Delete, &[true, false], k2));
    }

    #[test]
    fn a_run_holds_one_kind_of_change_to_one_table_with_one_shape() {
        let k = Some(key_hash(&["1"]));
        let run = Run::new(7, Op::Update, vec![true, true], vec![true, false]);
        assert!(!run.admits(8, Op::Update, &[true, true], k));
        assert!(!run.admits(7, Op::Delete, &[true, true], k));
        assert!(!run.admits(7, Op::Update, &[true, false], k));
        let inserts = Run::new(7, Op::Insert, vec![true, true], vec![false, false]);
        assert!(inserts.admits(7, Op::Insert, &[true, true], None));
        assert!(!inserts.admits(7, Op::Update, &[true, true], k));
    }

    #[test]
    fn a_run_is_full_at_its_row_or_byte_cap() {
        let mut run = Run::new(7, Op::Delete, vec![true], vec![true]);
        for i in 0..RUN_MAX_ROWS - 1 {
            let key = i.to_string();
            run.push(vec![Some(key.clone())], Some(key_hash(&[&key])));
        }
        assert!(!run.full());
        run.push(vec![Some("last".into())], Some(key_hash(&["last"])));
        assert!(run.full());
        let mut big = Run::new(7, Op::Update, vec![true, true], vec![true, false]);
        big.push(
            vec![Some("1".into()), Some("x".repeat(RUN_MAX_BYTES / 2))],
            k_of("1"),
        );
        assert!(!big.full());
        big.push(
            vec![Some("2".into()), Some("x".repeat(RUN_MAX_BYTES / 2))],
            k_of("2"),
        );
        assert!(big.full());
    }

    fn k_of(v: &str) -> Option<u64> {
        Some(key_hash(&[v]))
    }
}
