//! Which tables wait for a copy (C1), and the cuts that copy them (C2).
//!
//! The spool's `copy_state` says which published tables the branches hold
//! (`synced`) and which wait for a copy (`waiting`): all of them on a new
//! spool (or none, with `initial-copy = false`), then any table whose
//! Relation first appears in the stream (the cutter decides that) or that
//! appears in `pg_publication_tables`. A cut is taken for waiting tables,
//! for a receiver added late (`needs_copy/<name>`), or for a seed export;
//! the splice (`splice.rs`) ends it.

use pgcourier_common::ops::backoff::error_chain;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::status::SeedRequest;
use super::{Capture, CaptureError};
use crate::copy::{self, Cut};
use crate::spool::CopyState;

/// What a cut is for.
pub(super) enum Job {
    /// Copy these tables into the spool: for every receiver, or for one
    /// new receiver only (`only_for`; the others get placeholders, and their
    /// stream keeps every change).
    Copy {
        tables: Vec<u32>,
        reason: String,
        only_for: Option<String>,
        /// Tables joining a running publication, or a copy for a receiver
        /// added late: the rows follow in chunks (`join.rs`) instead of in
        /// the copy transaction.
        join: bool,
        /// A copy owed to `only_for` after its join was abandoned: its
        /// start stays where it is.
        again: bool,
    },
    /// Copy every published table into a seed file.
    Seed(SeedRequest),
}

/// A cut taken and not yet spliced in: capture peeks only up to its LSN.
pub(super) struct PendingCut {
    pub cut: Cut,
    pub job: Job,
}

impl Capture {
    /// Load the copy bookkeeping; on a new spool, decide what the first
    /// copy holds and record it (fsynced) before anything is captured.
    pub(super) async fn load_tables(&mut self, client: &Client) -> Result<(), CaptureError> {
        self.copy_state = match self.spool.copy_state()? {
            Some(state) => state,
            // A new spool: nothing decided yet (`initial_done` is false).
            None => CopyState::default(),
        };
        self.abandon_joins().await?;
        if self.copy_state.initial_done {
            return Ok(());
        }
        let published = copy::published_tables(client, &self.cfg).await?;
        if self.cfg.initial_copy {
            tracing::info!(
                tables = published.len(),
                "new spool: the published tables' rows will be copied first"
            );
            self.copy_state.tables.waiting.extend(published);
        } else {
            tracing::info!("new spool, initial-copy = false: only changes from now on are shipped");
            self.copy_state.tables.synced.extend(published);
        }
        self.copy_state.initial_done = true;
        self.save_tables_synced().await
    }

    /// Write the copy bookkeeping and fsync it.
    async fn save_tables_synced(&self) -> Result<(), CaptureError> {
        let state = self.copy_state.clone();
        self.blocking(move |spool| {
            spool.set_copy_state(&state)?;
            spool.sync()
        })
        .await
    }

    /// Follow the publication's membership: a table in the publication
    /// that is neither copied nor waiting (it joined, with rows of its own)
    /// waits for a copy; a synced table no longer in it leaves `synced`,
    /// because the changes made while it is out are in no stream, so if it
    /// comes back it is copied again. (Looked at every few seconds: a table
    /// dropped and added back between two looks is not noticed.)
    pub(super) async fn find_new_tables(&mut self, client: &Client) -> Result<(), CaptureError> {
        let published = copy::published_tables(client, &self.cfg).await?;
        let mut changed = false;
        let gone: Vec<u32> = self
            .copy_state
            .tables
            .synced
            .iter()
            .copied()
            .filter(|oid| !published.contains(oid))
            .collect();
        for oid in gone {
            tracing::info!(
                oid,
                "a table left the publication: its changes are no longer captured, and it will be copied again if it comes back"
            );
            self.copy_state.tables.synced.remove(&oid);
            changed = true;
        }
        for oid in published {
            let t = &mut self.copy_state.tables;
            if !t.synced.contains(&oid) && !t.waiting.contains(&oid) {
                tracing::info!(
                    oid,
                    "a table joined the publication: its rows will be copied"
                );
                t.waiting.insert(oid);
                changed = true;
            }
        }
        if changed {
            self.save_tables_synced().await?;
        }
        Ok(())
    }

    /// Start the next cut: a seed asked for, a receiver that needs a copy of
    /// its own, or tables waiting for a copy.
    pub(super) async fn next_cut(
        &mut self,
        client: &Client,
        shutdown: &CancellationToken,
    ) -> Result<(), CaptureError> {
        let seed = self
            .pending_seed
            .take()
            .or_else(|| self.seeds.as_mut().and_then(|rx| rx.try_recv().ok()));
        if let Some(req) = seed {
            return self.start_cut(client, Job::Seed(req), shutdown).await;
        }
        // A copy in chunks while no other join is read (one at a time).
        let join = self.join.is_none() && self.link_room.is_some();
        let owed = self.joins.owed.first().cloned();
        if let Some((name, again)) = owed.map(|n| (n, true)).or_else(|| {
            self.spool
                .needs_copy()
                .into_iter()
                .next()
                .map(|n| (n, false))
        }) {
            let tables = copy::published_tables(client, &self.cfg).await?;
            let job = Job::Copy {
                tables,
                reason: format!("new receiver {name}"),
                only_for: Some(name),
                join,
                again,
            };
            return self.start_cut(client, job, shutdown).await;
        }
        let t = &self.copy_state.tables;
        // Tables that join while a join is read wait for it to end.
        if !t.waiting.is_empty() && self.join.is_none() {
            let initial = t.synced.is_empty();
            let job = Job::Copy {
                tables: t.waiting.iter().copied().collect(),
                reason: if initial { "initial" } else { "new table" }.into(),
                only_for: None,
                join: !initial && join,
                again: false,
            };
            return self.start_cut(client, job, shutdown).await;
        }
        Ok(())
    }

    /// Take a cut for `job`, retrying while the tables' writers hold the
    /// lock past `copy-lock-wait`.
    pub(super) async fn start_cut(
        &mut self,
        client: &Client,
        job: Job,
        shutdown: &CancellationToken,
    ) -> Result<(), CaptureError> {
        let tables = match &job {
            Job::Copy { tables, .. } => tables.clone(),
            Job::Seed(_) => copy::published_tables(client, &self.cfg).await?,
        };
        let mut backoff = crate::Backoff::new(self.cfg.max_backoff);
        let cut = loop {
            match copy::take_cut(
                &self.cfg.source,
                &self.cfg.publication,
                &tables,
                self.cfg.copy_lock_wait,
            )
            .await
            {
                Ok(cut) => break cut,
                // Dropped since it was seen (a migration that adds a table
                // and drops it at once): the next look-up leaves it out.
                Err(e) if e.is_table_gone() => {
                    tracing::info!(error = %error_chain(&e), "a table to copy was dropped before the cut: taking the cut again without it");
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            if let Job::Seed(req) = job {
                                req.answer(&self.status, Err("the sender is stopping".into()));
                            }
                            return Ok(());
                        }
                        _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                    }
                }
                Err(e) if e.is_lock_timeout() => {
                    let delay = backoff.next();
                    backoff.log_once(
                        "copy cut (waiting for the tables' writers to finish)",
                        &e,
                        delay,
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            if let Job::Seed(req) = job {
                                req.answer(&self.status, Err("the sender is stopping".into()));
                            }
                            return Ok(());
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    if let Job::Seed(req) = job {
                        req.answer(&self.status, Err(error_chain(&e)));
                    }
                    return Err(e.into());
                }
            }
        };
        let kind = match &job {
            Job::Copy { reason, .. } => reason.as_str(),
            Job::Seed(_) => "seed",
        };
        tracing::info!(cut = %cut.lsn, tables = tables.len(), kind, "copy cut taken: transactions committed before it are spooled first");
        self.cut = Some(PendingCut { cut, job });
        Ok(())
    }
}
