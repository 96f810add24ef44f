//! The branch's progress row, `pgcourier.progress`: one row per source,
//! committed in the same target transaction as the changes it covers
//! (invariant 3). It is the exactly-once anchor: everything at or below its
//! `commit_lsn` is never applied again. Read here, by apply, seed import
//! and the queue CLI alike; a value that does not parse is an error, never
//! a default. Written only by apply (each group commit, a skip, a seed
//! import), with [`prepare_write`]; never deleted by pgcourier.

use pgcourier_proto::Lsn;

/// The table, created by apply on first start (in the `pgcourier` schema,
/// which also holds `pgcourier.skipped`).
pub const CREATE_SQL: &str = "CREATE SCHEMA IF NOT EXISTS pgcourier; \
     CREATE TABLE IF NOT EXISTS pgcourier.progress ( \
       source text PRIMARY KEY, commit_lsn pg_lsn NOT NULL, end_lsn pg_lsn NOT NULL, \
       seq bigint NOT NULL, commit_time timestamptz, applied_at timestamptz NOT NULL DEFAULT now())";

/// Insert or move the row of one source. Parameters: source, commit LSN
/// and end LSN (as text), inbox seq, commit time (µs since 2000-01-01 UTC).
const UPSERT_SQL: &str = "INSERT INTO pgcourier.progress (source, commit_lsn, end_lsn, seq, commit_time, applied_at) \
     VALUES ($1, $2::text::pg_lsn, $3::text::pg_lsn, $4, \
             '2000-01-01 00:00:00+00'::timestamptz + $5::bigint * interval '1 microsecond', now()) \
     ON CONFLICT (source) DO UPDATE SET commit_lsn = EXCLUDED.commit_lsn, end_lsn = EXCLUDED.end_lsn, \
       seq = EXCLUDED.seq, commit_time = EXCLUDED.commit_time, applied_at = EXCLUDED.applied_at";

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
    parse(&row.get::<_, String>(0), row.get(1), row.get(2)).map(Some)
}

/// One row's columns, checked: the LSN must parse and the seq must not be
/// negative (the row is the exactly-once anchor: no default stands in).
/// A NULL commit time is 0, "unknown".
fn parse(commit_lsn: &str, seq: i64, commit_time: Option<i64>) -> Result<Progress, ProgressError> {
    let commit_lsn = commit_lsn
        .parse()
        .map_err(|_| ProgressError::BadLsn(commit_lsn.to_owned()))?;
    let seq = u64::try_from(seq).map_err(|_| ProgressError::BadSeq(seq))?;
    Ok(Progress {
        commit_lsn,
        seq,
        commit_time: commit_time.unwrap_or(0),
    })
}

/// Prepare the statement that moves `source`'s row; run it inside the
/// target transaction whose changes it covers, with
/// `[source, commit_lsn.to_string(), end_lsn.to_string(), seq as i64, commit_time]`.
pub async fn prepare_write(
    client: &tokio_postgres::Client,
) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
    use tokio_postgres::types::Type;
    client
        .prepare_typed(
            UPSERT_SQL,
            &[Type::TEXT, Type::TEXT, Type::TEXT, Type::INT8, Type::INT8],
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_parses_into_its_marks() {
        assert_eq!(
            parse("1/2A", 7, Some(5)).unwrap(),
            Progress {
                commit_lsn: Lsn(0x1_0000_002A),
                seq: 7,
                commit_time: 5
            }
        );
        assert_eq!(parse("0/0", 0, None).unwrap().commit_time, 0);
    }

    #[test]
    fn an_lsn_that_does_not_parse_is_an_error_never_lsn_zero() {
        for bad in ["", "garbage", "1/", "/2", "0/G", "1-2"] {
            match parse(bad, 1, None) {
                Err(ProgressError::BadLsn(text)) => assert_eq!(text, bad),
                other => panic!("commit_lsn {bad:?} gave {other:?}, not BadLsn"),
            }
        }
    }

    #[test]
    fn a_negative_seq_is_an_error() {
        assert!(matches!(
            parse("0/1", -1, None),
            Err(ProgressError::BadSeq(-1))
        ));
    }
}
