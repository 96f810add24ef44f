//! The capture loop: a session per source connection, retried with backoff
//! on transient errors; inside a session, stream after stream (capture/stream.rs), paused while the
//! spool is full, with cuts taken when a copy or a seed is due.

use std::time::{Duration, Instant};

use pgcourier_common::ops::backoff::error_chain;
use tokio_util::sync::CancellationToken;

use super::stream::{StreamEnd, STATS_EVERY};
use super::tables::Job;
use super::{Capture, CaptureError};
use crate::source::{self, SourceError};

impl Capture {
    /// Capture until `shutdown`, reconnecting with backoff on transient
    /// errors. Returns a definite error (the operator must act).
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), CaptureError> {
        let mut backoff = crate::Backoff::new(self.cfg.max_backoff);
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.session(&shutdown) => r,
            };
            // A join's snapshot ends with it: the next session abandons
            // the join (`join.rs`).
            self.join = None;
            // A cut does not survive its connection.
            if let Some(pending) = self.cut.take() {
                if let Job::Seed(req) = pending.job {
                    req.answer(
                        &self.status,
                        Err(match &result {
                            Err(e) => error_chain(e),
                            Ok(()) => "the sender is stopping".into(),
                        }),
                    );
                }
            }
            self.status.lock().expect("status lock").copy = None;
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    self.status.lock().expect("status lock").last_error = Some(error_chain(&e));
                    self.tell_started(super::CaptureStart::Retrying);
                    // What the failed peek or copy appended is not committed:
                    // the retry decodes those transactions again and must
                    // append them at the same sequence numbers, once. (No
                    // commit is in flight: the session returned, so its
                    // fsync task ended; a transient error is never the
                    // spool's own.)
                    let spool = self.spool.clone();
                    let dropped = tokio::task::spawn_blocking(move || spool.rollback_uncommitted())
                        .await
                        .map_err(CaptureError::Blocking)??;
                    if dropped > 0 {
                        tracing::info!(
                            records = dropped,
                            "dropped the records of a peek or copy cut short; they will be captured again"
                        );
                    }
                    let delay = backoff.next();
                    backoff.log_once("capture", &e, delay);
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    self.status.lock().expect("status lock").last_error = Some(error_chain(&e));
                    return Err(e);
                }
            }
        }
    }

    /// One source connection: check the source and the slot, load the copy
    /// bookkeeping, then peek until an error or `shutdown`.
    async fn session(&mut self, shutdown: &CancellationToken) -> Result<(), CaptureError> {
        let client = source::connect(&self.cfg.source).await?;
        let spooled_source = self.spool.source()?;
        let identity = source::prepare(&client, &self.cfg, spooled_source.is_some()).await?;
        match spooled_source {
            Some(s) if s != identity.source_id => {
                return Err(SourceError::WrongSource {
                    spool: s,
                    configured: identity.source_id,
                }
                .into());
            }
            Some(_) => self.check_slot_not_ahead(identity.confirmed_flush)?,
            None if !identity.created_slot => {
                // A new spool on a slot that captured before: what the slot
                // confirmed went to another spool.
                return Err(SourceError::SlotAhead {
                    slot: self.cfg.slot.clone(),
                    slot_lsn: identity.confirmed_flush,
                    spool: "a new spool-dir, which has captured nothing from it".into(),
                }
                .into());
            }
            None => {
                let (id, start) = (identity.source_id.clone(), identity.confirmed_flush);
                self.blocking(move |spool| {
                    // Nothing before the new slot's start belongs to the
                    // spool: the slot may stand there.
                    spool.note_confirmable(start)?;
                    spool.set_source(&id)
                })
                .await?;
            }
        }
        self.confirmed = identity.confirmed_flush;
        self.load_tables(&client).await?;
        tracing::info!(slot = %self.cfg.slot, confirmed = %self.confirmed, "capturing from source");
        self.tell_started(super::CaptureStart::Capturing);
        {
            let mut st = self.status.lock().expect("status lock");
            st.last_error = None;
            // Re-checked (and re-reported) before the first peek.
            st.spool_full = false;
        }
        let mut stats_at = Instant::now() - Duration::from_secs(60);
        loop {
            // While a receiver waits for a copy of its own, its position
            // (where the spool stood when it was added) holds back every
            // trim: pausing would wait for room that only that copy makes.
            // So capture goes on past spool-max-bytes until it is spliced.
            if self.spool.needs_copy().is_empty() && self.spool_full() {
                // Paused, with no stream open: the slot keeps WAL on the
                // source until receivers catch up and the spool is trimmed.
                if stats_at.elapsed() >= STATS_EVERY {
                    stats_at = Instant::now();
                    let stats = source::slot_stats(&client, &self.cfg.slot).await?;
                    self.status.lock().expect("status lock").slot = stats;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                }
                continue;
            }
            if self.cut.is_none() {
                self.next_cut(&client, shutdown).await?;
            }
            match self.stream(&client, shutdown, &mut stats_at).await? {
                StreamEnd::Stopped => return Ok(()),
                StreamEnd::CutDue | StreamEnd::Paused => {}
                StreamEnd::Splice => {
                    let pending = self
                        .cut
                        .take()
                        .expect("a splice is only due with a cut pending");
                    // Confirmed by the next stream's first status update
                    // (the slot is still held by the walsender that just
                    // ended).
                    self.confirm_on_start = Some(self.splice(pending).await?);
                }
            }
        }
    }

    /// The slot may stand at most where this spool let capture confirm it
    /// (`confirmable_lsn`, or the end of the last transaction it holds). A
    /// slot further on confirmed changes that are in no spool: the spool
    /// is older than the slot (restored from a backup, or another spool
    /// captured from the slot since). A definite error: carrying on would
    /// lose those changes and reuse sequence numbers the receivers hold.
    fn check_slot_not_ahead(&self, slot_lsn: pgcourier_proto::Lsn) -> Result<(), CaptureError> {
        let Some(confirmable) = self.spool.confirmable_lsn()? else {
            // A spool written before this mark existed: nothing to compare
            // with yet (the next slot advance writes it).
            return Ok(());
        };
        let captured = self.spool.marks().captured_end_lsn;
        let spool_lsn = confirmable.max(captured);
        if slot_lsn > spool_lsn {
            return Err(SourceError::SlotAhead {
                slot: self.cfg.slot.clone(),
                slot_lsn,
                spool: format!(
                    "it captured up to {captured} and let the slot be confirmed up to {spool_lsn}"
                ),
            }
            .into());
        }
        Ok(())
    }

    /// Whether the spool is at `spool-max-bytes`; logs and reports the
    /// change either way.
    pub(super) fn spool_full(&self) -> bool {
        let Some(max) = self.cfg.spool_max_bytes else {
            return false;
        };
        let bytes = self.spool.bytes();
        let full = bytes >= max;
        let mut st = self.status.lock().expect("status lock");
        if full != st.spool_full {
            st.spool_full = full;
            if full {
                let retained = st
                    .slot
                    .as_ref()
                    .and_then(|s| s.retained_wal_bytes)
                    .unwrap_or(0);
                let message = format!("the spool holds {bytes} bytes, at spool-max-bytes ({max}): capture is paused and the slot keeps WAL on the source until the receivers catch up");
                tracing::error!(
                    spool_bytes = bytes,
                    spool_max_bytes = max,
                    retained_wal_bytes = retained,
                    "{message}"
                );
                st.last_error = Some(message);
            } else {
                tracing::info!(
                    spool_bytes = bytes,
                    "the spool has room again; capture resumes"
                );
                st.last_error = None;
            }
        }
        full
    }
}
