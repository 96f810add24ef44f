//! The slot's side of capture: the WAL positions a peek is judged by, and
//! the advance, which takes only a position the spool has fsynced
//! (invariant 1).

use pgcourier_common::store::durable::Synced;
use pgcourier_proto::cutter::WalPosition;
use pgcourier_proto::Lsn;
use tokio_postgres::Client;

use super::{Capture, CaptureError};
use crate::source::{self, SourceError};

/// The source's WAL insert and flush positions, read before a peek.
pub(super) async fn wal_position(client: &Client) -> Result<WalPosition, CaptureError> {
    let row = client
        .query_one(
            "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text",
            &[],
        )
        .await
        .map_err(|e| SourceError::query("read WAL position", e))?;
    Ok(WalPosition {
        insert: source::parse_lsn("pg_current_wal_insert_lsn()", row.get(0))?,
        flush: source::parse_lsn("pg_current_wal_flush_lsn()", row.get(1))?,
    })
}

impl Capture {
    /// Confirm the slot up to `to`, if that is further than it is.
    pub(super) async fn advance_slot(
        &mut self,
        client: &Client,
        to: Synced<Lsn>,
    ) -> Result<(), CaptureError> {
        if to.get() > self.confirmed {
            source::advance_slot(client, &self.cfg.slot, to).await?;
            self.confirmed = to.get();
        }
        Ok(())
    }
}
