//! One peek of the slot, driven through the cutter: peek rows from the
//! slot, feed each message to [`Cutter`], append the records it returns to
//! the spool, commit (fsync, off the async workers), then confirm to the
//! slot what [`PeekSummary::slot_step`] says, with the spool's `Synced`
//! mark in hand. Every decision about the messages is the cutter's.

use futures_util::{pin_mut, TryStreamExt};
use pgcourier_proto::cutter::{Cutter, PeekSummary, SlotStep};
use tokio_postgres::Client;

use super::slot::wal_position;
use super::tables::Job;
use super::{Capture, CaptureError};
use crate::source::SourceError;

impl Capture {
    /// One peek of the slot: spool what it returns, fsync, advance the slot.
    /// With a cut pending, only transactions committing before it are read,
    /// and once they all are, the copy is spliced in.
    pub(super) async fn poll(&mut self, client: &Client) -> Result<PeekSummary, CaptureError> {
        let wal = wal_position(client).await?;
        let cut_lsn = self.cut.as_ref().map(|p| p.cut.lsn);
        debug_assert!(
            match &self.cut {
                Some(p) => match &p.job {
                    Job::Copy {
                        tables,
                        only_for: None,
                        ..
                    } => tables
                        .iter()
                        .all(|t| self.copy_state.tables.waiting.contains(t)),
                    _ => true,
                },
                None => true,
            },
            "the tables being copied wait until the splice, so the cutter leaves their changes out"
        );
        let upto: Option<String> = cut_lsn.map(|l| l.to_string());
        let mut cutter = Cutter::new(self.spool.next_seq(), self.spool.captured_commit_lsn())
            .before_cut(cut_lsn);
        let publication = pgcourier_common::pg::quote_ident(&self.cfg.publication);
        let changes = self.cfg.capture_batch_changes as i32;
        let stream = client
            .query_raw(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, $3, \
                 'proto_version', '1', 'publication_names', $4)",
                [
                    &self.cfg.slot as &(dyn tokio_postgres::types::ToSql + Sync),
                    &upto,
                    &changes,
                    &publication,
                ],
            )
            .await
            .map_err(|e| SourceError::query("peek replication slot", e))?;
        pin_mut!(stream);
        let mut tables_changed = false;
        while let Some(row) = stream
            .try_next()
            .await
            .map_err(|e| SourceError::query("peek replication slot", e))?
        {
            let fed = cutter.message(row.get(0), &mut self.copy_state.tables)?;
            if let Some(oid) = fed.new_table {
                tracing::info!(oid, "a table new to the stream: its rows will be copied");
                tables_changed = true;
            }
            for record in fed.records {
                self.spool.append(record.seq, &record.encode()?)?;
            }
        }
        let peek = cutter.finish()?;
        if tables_changed {
            // Durable with the commit below, before any transaction whose
            // changes it explains.
            self.spool.set_copy_state(&self.copy_state)?;
        }
        let committed = if peek.needs_commit() {
            let (commit, end) = (peek.last_commit, peek.last_end);
            let synced = self
                .blocking(move |spool| spool.commit(commit, end))
                .await?;
            tracing::debug!(transactions = peek.transactions, records = peek.records, end_lsn = %end, "spooled");
            Some(synced)
        } else {
            None
        };
        match peek.slot_step(wal, cut_lsn) {
            SlotStep::Hold => {}
            SlotStep::Committed(end) => {
                // Skipped transactions were fsynced by an earlier commit.
                let synced = match committed {
                    Some(synced) => synced,
                    None => {
                        self.blocking(move |spool| spool.synced_through(end))
                            .await?
                    }
                };
                debug_assert_eq!(synced.get(), end);
                self.advance_slot(client, synced).await?;
            }
            SlotStep::Quiet(insert) => {
                let synced = self
                    .blocking(move |spool| spool.synced_through(insert))
                    .await?;
                self.advance_slot(client, synced).await?;
            }
            SlotStep::Splice => {
                let pending = self
                    .cut
                    .take()
                    .expect("a splice is only due with a cut pending");
                let synced = self.splice(pending).await?;
                self.advance_slot(client, synced).await?;
            }
        }
        Ok(peek)
    }
}
