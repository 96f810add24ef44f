//! Queued changes → the target, fast and in order: prepared statements are
//! pipelined (up to `PIPELINE_DEPTH` in flight before the first reply);
//! runs of inserts into one table go out as one COPY; unprepared SQL
//! (TRUNCATE) and COPY are barriers that wait for what precedes them. What
//! is queued is bounded in statements and COPY bytes (invariant 5).

use futures_util::future::try_join_all;
use pgcourier_common::pg::quote_ident;
use tokio_postgres::{Client, Statement};

use super::error::ApplyError;
use super::sql::Op;
use super::{Apply, Session};

/// Statements queued before the pipeline is drained.
const PIPELINE_DEPTH: usize = 512;
/// ... or once the queued COPY data reaches this many bytes (bounds memory
/// in a large transaction: invariant 5).
const PIPELINE_BYTES: usize = 4 << 20;

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
    /// A run of inserts into one table, loaded with COPY (text format).
    Copy {
        sql: String,
        data: Vec<u8>,
        rel: u32,
    },
}

/// Consecutive inserts into one table with the same columns, waiting to be
/// sent as one COPY (or as single inserts when the run stays short).
pub(super) struct InsertRun {
    oid: u32,
    set: Vec<bool>,
    rows: Vec<Vec<Option<String>>>,
    bytes: usize,
}

/// Runs shorter than this go out as pipelined INSERTs.
const COPY_MIN_ROWS: usize = 8;
/// A run is flushed at this many rows or bytes (bounds memory).
const COPY_MAX_ROWS: usize = 5000;
const COPY_MAX_BYTES: usize = 1 << 20;

impl Session {
    /// Time to drain: enough statements or COPY bytes are queued.
    pub(super) fn pipeline_full(&self) -> bool {
        self.pending.len() >= PIPELINE_DEPTH || self.pending_bytes >= PIPELINE_BYTES
    }
}

impl Apply {
    /// Add an insert's row (the values of the columns in `set`) to the run
    /// of inserts into its table, starting a new run when the table or the
    /// columns differ.
    pub(super) async fn queue_insert(
        &self,
        s: &mut Session,
        oid: u32,
        set: Vec<bool>,
        row: Vec<Option<String>>,
    ) -> Result<(), ApplyError> {
        let bytes: usize = row
            .iter()
            .map(|v| v.as_ref().map_or(2, |t| t.len() + 1))
            .sum();
        let same = matches!(&s.run, Some(r) if r.oid == oid && r.set == set);
        if !same {
            self.flush_run(s).await?;
            s.run = Some(InsertRun {
                oid,
                set,
                rows: Vec::new(),
                bytes: 0,
            });
        }
        let run = s.run.as_mut().expect("run just ensured");
        run.rows.push(row);
        run.bytes += bytes;
        if run.rows.len() >= COPY_MAX_ROWS || run.bytes >= COPY_MAX_BYTES {
            self.flush_run(s).await?;
        }
        Ok(())
    }

    /// Queue the pending insert run: as one COPY when long enough, else as
    /// single INSERTs.
    pub(super) async fn flush_run(&self, s: &mut Session) -> Result<(), ApplyError> {
        let Some(run) = s.run.take() else {
            return Ok(());
        };
        if run.rows.len() >= COPY_MIN_ROWS {
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
        } else {
            let wher = vec![false; run.set.len()];
            let stmt = self
                .statement(s, run.oid, Op::Insert, &run.set, &wher)
                .await?;
            for params in run.rows {
                s.pending.push(Pending::Prepared {
                    stmt: stmt.clone(),
                    params,
                    rel: run.oid,
                    op: Op::Insert,
                });
            }
        }
        Ok(())
    }

    /// Send every queued statement and wait for all replies: statements are
    /// pipelined; a COPY waits for what precedes it.
    pub(super) async fn drain(&self, s: &mut Session) -> Result<(), ApplyError> {
        self.flush_run(s).await?;
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
                    client
                        .execute(stmt, &refs)
                        .await
                        .map(|n| (n, Some((*rel, *op))))
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
                for (n, what) in results {
                    if let Some((rel, op)) = what {
                        if n == 0 && op != Op::Insert {
                            missing += 1;
                            if let Some(t) = s.targets.get(&rel) {
                                tracing::warn!(table = %t.table, "row to update or delete not found on the target (it was changed there, or never copied); change skipped");
                            }
                        }
                    }
                }
                if missing > 0 {
                    self.status.lock().expect("status lock").missing_rows += missing;
                }
                Ok(())
            }
            Err((e, rel)) => Err(target_error(s, rel, e)),
        }
    }
}

/// Send one COPY's data in text format and wait for its completion.
async fn copy_in(client: &Client, sql: &str, data: Vec<u8>) -> Result<u64, tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = client.copy_in::<_, bytes::Bytes>(sql).await?;
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data)).await?;
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
            Some(t) => {
                for &b in t.as_bytes() {
                    match b {
                        b'\\' => out.extend_from_slice(b"\\\\"),
                        b'\n' => out.extend_from_slice(b"\\n"),
                        b'\r' => out.extend_from_slice(b"\\r"),
                        b'\t' => out.extend_from_slice(b"\\t"),
                        _ => out.push(b),
                    }
                }
            }
        }
    }
    out.push(b'\n');
}

/// An apply error that names the table (and column, when PostgreSQL says).
fn target_error(s: &Session, rel: Option<u32>, e: tokio_postgres::Error) -> ApplyError {
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
}
