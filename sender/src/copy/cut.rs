//! The cut: a consistent position L of the change stream for the tables to
//! copy, and a snapshot that holds exactly what committed below it (see the
//! module documentation of `copy`).

use std::time::Duration;

use pgcourier_proto::Lsn;

use super::describe::quoted_names;
use super::CopyError;
use crate::source::{self, SourceClient, SourceError};

/// A consistent cut: the snapshot stays open in `client` until dropped
/// (or [`Cut::close`]d).
pub struct Cut {
    pub lsn: Lsn,
    pub client: SourceClient,
    /// The publication whose tables are copied: its column lists and row
    /// filters say what of them the copy sends (describe.rs, read.rs).
    pub publication: String,
}

/// Take a cut over `oids`, tables of `publication`. Waits for the tables' current writers; gives up
/// after `lock_wait` ([`CopyError::is_lock_timeout`]) so the caller can
/// retry without holding writers back for long.
pub async fn take_cut(
    cfg: &pgcourier_common::pg::connect::PgConnect,
    publication: &str,
    oids: &[u32],
    lock_wait: Duration,
) -> Result<Cut, CopyError> {
    let lock = source::connect(cfg).await?;
    let snap = source::connect(cfg).await?;
    let names = quoted_names(&lock, oids).await?;
    lock.batch_execute(&format!(
        "BEGIN; SET LOCAL lock_timeout = '{}ms'",
        lock_wait.as_millis()
    ))
    .await
    .map_err(|e| SourceError::query("begin the cut", e))?;
    if !names.is_empty() {
        lock.batch_execute(&format!("LOCK TABLE {} IN SHARE MODE", names.join(", ")))
            .await
            .map_err(|e| SourceError::query("lock the tables to copy for a moment", e))?;
    }
    snap.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| SourceError::query("open the copy snapshot", e))?;
    let row = snap
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(|e| SourceError::query("read the cut position", e))?;
    lock.batch_execute("COMMIT")
        .await
        .map_err(|e| SourceError::query("release the cut's lock", e))?;
    lock.close().await;
    let text: String = row.get(0);
    let lsn: Lsn = text.parse().map_err(|_| CopyError::InvalidLsn(text))?;
    Ok(Cut {
        lsn,
        client: snap,
        publication: publication.to_owned(),
    })
}

impl Cut {
    /// End the snapshot's connection cleanly.
    pub async fn close(self) {
        self.client.close().await;
    }

    /// Export the cut's snapshot so other connections can join it
    /// (`SET TRANSACTION SNAPSHOT`). Valid while `client` stays open and idle.
    pub async fn export_snapshot(&self) -> Result<String, CopyError> {
        let name: String = self
            .client
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .map_err(|e| SourceError::query("export the copy snapshot", e))?
            .get(0);
        // It is spliced into SQL text by the readers.
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(CopyError::SnapshotName(name));
        }
        Ok(name)
    }
}
