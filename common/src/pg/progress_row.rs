//! The branch's progress row, `pgcourier.progress`: one row per source,
//! committed in the same target transaction as the changes it covers
//! (invariant 3). It is the exactly-once anchor: everything at or below its
//! `commit_lsn` is never applied again. Read here, by apply, seed import
//! and the queue CLI alike; a value that does not parse is an error, never
//! a default.

use pgcourier_proto::Lsn;

/// The table, created by apply on first start.
pub const CREATE_SQL: &str = "CREATE SCHEMA IF NOT EXISTS pgcourier; \
     CREATE TABLE IF NOT EXISTS pgcourier.progress ( \
       source text PRIMARY KEY, commit_lsn pg_lsn NOT NULL, end_lsn pg_lsn NOT NULL, \
       seq bigint NOT NULL, commit_time timestamptz, applied_at timestamptz NOT NULL DEFAULT now())";

const SELECT_SQL: &str = "SELECT commit_lsn::text, seq, \
     (extract(epoch FROM commit_time - '2000-01-01 00:00:00+00') * 1000000)::bigint \
     FROM pgcourier.progress WHERE source = $1";

/// What the branch has applied from one source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Commit LSN of the last applied source transaction.
    pub commit_lsn: Lsn,
    /// Inbox sequence of its last record.
    pub seq: u64,
    /// Its commit time, µs since 2000-01-01 UTC (0 when unknown).
    pub commit_time: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    #[error("read pgcourier.progress on the target")]
    Query(#[source] tokio_postgres::Error),
    #[error("pgcourier.progress holds commit_lsn {0:?} for this source, which is not an LSN: the row was edited by hand; restore it or re-seed the branch")]
    BadLsn(String),
    #[error("pgcourier.progress holds seq {0} for this source, which is negative: the row was edited by hand; restore it or re-seed the branch")]
    BadSeq(i64),
}

impl ProgressError {
    pub fn query_error(&self) -> Option<&tokio_postgres::Error> {
        match self {
            ProgressError::Query(e) => Some(e),
            _ => None,
        }
    }
}

/// The progress row of `source`; `None` when nothing was applied from it,
/// or when the progress table does not exist yet.
pub async fn read(
    client: &tokio_postgres::Client,
    source: &str,
) -> Result<Option<Progress>, ProgressError> {
    let row = match client.query_opt(SELECT_SQL, &[&source]).await {
        Ok(row) => row,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            return Ok(None)
        }
        Err(e) => return Err(ProgressError::Query(e)),
    };
    let Some(row) = row else { return Ok(None) };
    let text: String = row.get(0);
    let commit_lsn = text.parse().map_err(|_| ProgressError::BadLsn(text.clone()))?;
    let seq: i64 = row.get(1);
    let seq = u64::try_from(seq).map_err(|_| ProgressError::BadSeq(seq))?;
    let commit_time: Option<i64> = row.get(2);
    Ok(Some(Progress {
        commit_lsn,
        seq,
        commit_time: commit_time.unwrap_or(0),
    }))
}
