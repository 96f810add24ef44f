//! The initial copy, sender side: the **cut** and the **read**. Step C2 and
//! the rows of C4 on the copy's path (see ARCHITECTURE.md):
//!
//! ```text
//! tables waiting (capture/tables.rs)
//!   → cut.rs: LOCK .. IN SHARE MODE, REPEATABLE READ snapshot, L, exported snapshot
//!   → capture peeks up to L (capture/poll.rs)
//!   → describe.rs: the tables' definitions in the snapshot (published columns only)
//!   → read.rs: readers join the exported snapshot, rows become pgoutput Inserts
//!     (the publication's row filter as WHERE)
//!   → capture/splice.rs: the SPLICE, the copy spooled as the transaction at L − 1
//!     (or written to a seed file: common/src/store/seed_file.rs is its format)
//! ```
//!
//! **The cut.** One connection takes `LOCK TABLE .. IN SHARE MODE` on every
//! table to copy: that waits for every transaction writing them to end and
//! holds new writers back. While the lock is held, a second connection opens
//! a `REPEATABLE READ` transaction and reads `pg_current_wal_insert_lsn()`
//! (call it L) in its first statement, which also takes its snapshot; then
//! the lock is released (it is held for milliseconds, not for the copy).
//! So, for the copied tables:
//! - a transaction that wrote them and committed before the lock is visible
//!   in the snapshot, and its commit record starts below L;
//! - one that writes them after the lock is released is invisible, and its
//!   commit record starts at or above L.
//!
//! L is an exact cut of the change stream for those tables. Capture spools
//! every transaction committing below L first (peeking with `upto_lsn = L`,
//! and leaving out their changes to the copied tables, which the snapshot
//! holds), then the copy transaction with commit LSN `L - 1`, then carries
//! on from L.
//!
//! This module knows nothing of capture: it returns its own [`CopyError`]
//! and hands rows over as [`read::Rows`]; progress is kept by capture in a
//! [`CopyProgress`] this module defines.

mod cut;
mod describe;
mod progress;
mod read;

pub use cut::{take_cut, Cut};
pub use describe::{describe, published_tables};
pub use progress::{CopyProgress, TableProgress};
pub use read::{read_join, read_rows, JoinChunk, Rows, JOIN_CHUNK_BYTES};

use crate::source::SourceError;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("the source returned an invalid cut position {0:?}")]
    InvalidLsn(String),
    #[error("the source exported an unexpected snapshot name {0:?}")]
    SnapshotName(String),
    #[error("table {table} has replica identity {value:?}, which this version does not know (expected d, n, f or i)")]
    ReplicaIdentity { table: String, value: String },
    #[error("a copy reader stopped unexpectedly")]
    Reader(#[source] tokio::task::JoinError),
}

impl CopyError {
    /// Worth retrying after a pause (connection lost, server restarting).
    pub fn is_transient(&self) -> bool {
        matches!(self, CopyError::Source(e) if e.is_transient())
    }

    /// A table to copy was dropped between the look-up of its name and the
    /// cut's lock (SQLSTATE 42P01): take the cut again (the look-up then
    /// leaves it out).
    pub fn is_table_gone(&self) -> bool {
        matches!(self, CopyError::Source(SourceError::Query { source, .. })
            if source.0.code().map(|c| c.code()) == Some("42P01"))
    }

    /// A lock timeout while taking the cut: the tables' writers did not
    /// finish within `copy-lock-wait`; retry later.
    pub fn is_lock_timeout(&self) -> bool {
        matches!(self, CopyError::Source(SourceError::Query { source, .. })
            if source.0.code().map(|c| c.code()) == Some("55P03"))
    }
}
