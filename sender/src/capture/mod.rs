//! Capture: source WAL → pgoutput messages → spool records. Steps 1-4 of a
//! change's path (**slot stream → cutter → spool fsync → status update** →
//! ship → inbox → apply), and the copy's C1, C3 and C4.
//!
//! The slot is streamed over a replication connection of our own
//! (`START_REPLICATION .. LOGICAL`, proto_version 1: only committed
//! transactions, each whole and in commit order, decoded once as the WAL
//! is written; [`crate::replication`]). Each message goes through the pure
//! cutter ([`pgcourier_proto::cutter`]) into records of at most ~24 KiB.
//! When a batch of whole transactions is appended, [`Spool::commit`] fsyncs
//! it (off the async workers) and returns a [`Synced`] position; only with
//! it in hand is a standby status update sent with that flush position:
//! the slot never confirms what the spool could lose (invariant 1).
//!
//! After a crash between the spool fsync and the status update, the next
//! stream sends transactions already spooled again; they are recognised by
//! their commit LSN (at or below the spool's `captured_commit_lsn`) and
//! skipped.
//!
//! A quiet publication would pin WAL on the source forever (PostgreSQL 15
//! sends nothing for transactions that touch no published table), so once
//! everything received is durable, the position of the walsender's
//! keepalive (how far it has decoded) is confirmed.
//!
//! Files, by role:
//! - `run.rs`: the session loop: connect, check the source, retry with
//!   backoff, pause while the spool is full, take cuts and splice copies
//!   between streams.
//! - `stream.rs`: one stream of the slot, driven through the cutter into
//!   the spool, batches committed and confirmed.
//! - `tables.rs`: which tables wait for a copy; choosing and taking cuts.
//! - `splice.rs`: the SPLICE: a cut's copy spooled as the transaction at
//!   L − 1, the tables it copied marked synced, `needs_copy` answered.
//! - `join.rs`: a table joining a running publication: its start at
//!   L − 1, its rows spliced in chunks between live transactions, paced
//!   by the link; joins cut short abandoned.
//! - `export.rs`: a seed export: the copy written to a file, a marker
//!   spooled.
//! - `status.rs`, `error.rs`: what admin and the CLI see.
//!
//! [`Synced`]: pgcourier_common::store::durable::Synced

mod error;
mod export;
mod join;
mod run;
mod splice;
mod status;
mod stream;
mod tables;

use std::sync::{Arc, Mutex};

use pgcourier_proto::Lsn;
use tokio::sync::{mpsc, oneshot};

use crate::config::SenderConfig;
use crate::spool::{CopyState, Joins, Spool};

pub use error::CaptureError;
pub use export::ExportError;
pub use status::{CaptureStart, CaptureStatus, SeedOutcome, SeedRequest, SeedSummary};

use tables::PendingCut;

/// See [`Capture::with_link_room`].
pub type LinkRoom = Arc<dyn Fn(u64) -> bool + Send + Sync>;

pub struct Capture {
    cfg: Arc<SenderConfig>,
    spool: Arc<Spool>,
    pub status: Arc<Mutex<CaptureStatus>>,
    /// The slot's confirmed_flush_lsn as last seen or set by us.
    confirmed: Lsn,
    /// The copy bookkeeping, as in the spool's `copy_state` (loaded by each
    /// session).
    copy_state: CopyState,
    /// A cut taken and not yet spliced into the spool.
    cut: Option<PendingCut>,
    /// The joins' bookkeeping, as in the spool's `joins`.
    joins: Joins,
    /// The join being read and spliced (`join.rs`).
    join: Option<join::ActiveJoin>,
    /// Whether every connected receiver has less than the given bytes left
    /// to send (false with none connected): paces a join's chunks.
    link_room: Option<LinkRoom>,
    seeds: Option<mpsc::Receiver<SeedRequest>>,
    /// A seed asked for while a stream was open: its cut is taken next.
    pending_seed: Option<SeedRequest>,
    /// A position the spool made durable while no stream was open (a
    /// splice): the next stream confirms it first.
    confirm_on_start: Option<pgcourier_common::store::durable::Synced<Lsn>>,
    /// The batch whose fsync runs while the stream is read on
    /// (`stream.rs`); none outside a stream.
    in_flight: Option<stream::InFlight>,
    /// Told how the first session went: capturing, or retrying the source.
    started: Option<oneshot::Sender<CaptureStart>>,
    /// Whether the missing DDL key was reported (once per process).
    ddl_key_warned: bool,
}

impl Capture {
    pub fn new(cfg: Arc<SenderConfig>, spool: Arc<Spool>) -> Capture {
        Capture {
            cfg,
            spool,
            status: Arc::default(),
            confirmed: Lsn::ZERO,
            copy_state: CopyState::default(),
            cut: None,
            joins: Joins::default(),
            join: None,
            link_room: None,
            seeds: None,
            pending_seed: None,
            confirm_on_start: None,
            in_flight: None,
            started: None,
            ddl_key_warned: false,
        }
    }

    /// Tell `started` once capture streams from the slot (the slot and the
    /// publication are in place), or once its first session failed with a
    /// transient error and is retried, whichever comes first; it is dropped
    /// unanswered when capture stops on a definite error first.
    pub fn with_started(mut self, started: oneshot::Sender<CaptureStart>) -> Capture {
        self.started = Some(started);
        self
    }

    fn tell_started(&mut self, how: CaptureStart) {
        if let Some(tx) = self.started.take() {
            // The receiving end may be gone: nobody waits any more.
            let _ = tx.send(how);
        }
    }

    /// Pace a joining table's chunks by the link: `room(bytes)` says
    /// whether every connected receiver has less than `bytes` left to send
    /// (the shipper knows). Without it, no table joins in chunks.
    pub fn with_link_room(mut self, room: LinkRoom) -> Capture {
        self.link_room = Some(room);
        self
    }

    /// Accept seed export requests from this channel.
    pub fn with_seeds(mut self, seeds: mpsc::Receiver<SeedRequest>) -> Capture {
        self.seeds = Some(seeds);
        self
    }

    /// Run `f` on the spool off the async workers: for the calls that
    /// fsync.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Spool) -> Result<T, pgcourier_common::store::durable::StoreError>
            + Send
            + 'static,
    ) -> Result<T, CaptureError> {
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || f(&spool))
            .await
            .map_err(CaptureError::Blocking)?
            .map_err(CaptureError::from)
    }
}
