//! One stream of the slot, driven through the cutter: the walsender sends
//! each pgoutput message as it decodes it (once, in commit order); each
//! message goes to [`Cutter`], the records it returns are appended to the
//! spool, and a batch of whole transactions is sealed when nothing more is
//! buffered or after `capture-batch-changes` messages. Its fsync runs off
//! the async workers while the stream is read on; the next batch is sealed
//! when that fsync returns (one batch in flight: a batch is whatever
//! arrived during the fsync before it, a group commit). Only with the spool's `Synced`
//! mark in hand is the new position sent to the source in a standby status
//! update (invariant 1). Every decision about the messages is the cutter's.
//!
//! A stream ends between transactions, with a last status update, when:
//! - a cut is pending and every transaction committing before it is
//!   spooled (a transaction committing at or after the cut arrived, or a
//!   keepalive says the walsender has read past it): the copy is spliced
//!   in while no stream is open, and the next stream starts after it;
//! - a copy or a seed is due (a cut is taken while no stream is open: its
//!   lock may wait for the tables' writers);
//! - the spool is full (capture pauses; the slot keeps WAL on the source);
//! - the sender stops.
//!
//! A quiet publication: once every transaction received is durable, the
//! walsender's keepalive position (what it has read of the WAL) is
//! confirmed, at most once per [`STATUS_EVERY`], so the source keeps no
//! WAL for us.

use std::time::{Duration, Instant};

use pgcourier_common::store::durable::{StoreError, Synced};
use pgcourier_proto::cutter::Cutter;
use pgcourier_proto::walstream::{self, ServerMessage, StatusUpdate};
use pgcourier_proto::Lsn;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::join::{Spliced, JOIN_POLL};
use super::{Capture, CaptureError};
use crate::replication::{self, ReplicationError, ReplicationStream};
use crate::source;

/// How often a status update is sent (and a quiet position confirmed).
pub(super) const STATUS_EVERY: Duration = Duration::from_secs(1);

/// How often slot statistics are read and new tables looked for.
pub(super) const STATS_EVERY: Duration = Duration::from_secs(2);

/// How long a stream start waits for the slot to be released by the
/// walsender of the stream this sender just ended.
const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(15);

/// How long to wait for the walsender's side of a stream's end.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Why a stream ended (always between transactions, all of it spooled).
pub(super) enum StreamEnd {
    /// The sender is stopping.
    Stopped,
    /// A cut is pending and everything before it is spooled: splice.
    Splice,
    /// A copy or a seed is due: take its cut.
    CutDue,
    /// The spool is full.
    Paused,
}

/// A sealed batch whose fsync is running.
pub(super) struct InFlight {
    fsync: tokio::task::JoinHandle<Result<Synced<Lsn>, StoreError>>,
    transactions: u64,
    records: u64,
}

impl Capture {
    /// Stream the slot until one of [`StreamEnd`]'s reasons. Whatever the
    /// outcome, no fsync is left running when it returns: a rollback after
    /// an error must see what it made durable.
    pub(super) async fn stream(
        &mut self,
        client: &Client,
        shutdown: &CancellationToken,
        stats_at: &mut Instant,
    ) -> Result<StreamEnd, CaptureError> {
        let streamed = self.stream_once(client, shutdown, stats_at).await;
        let settled = self.settle(None).await;
        let end = streamed?;
        settled?;
        Ok(end)
    }

    async fn stream_once(
        &mut self,
        client: &Client,
        shutdown: &CancellationToken,
        stats_at: &mut Instant,
    ) -> Result<StreamEnd, CaptureError> {
        if stats_at.elapsed() >= STATS_EVERY {
            *stats_at = Instant::now();
            self.read_stats(client).await?;
        }
        let marks = self.spool.marks();
        let confirm_first = self.confirm_on_start.take();
        let start = self
            .confirmed
            .max(marks.captured_end_lsn)
            .max(confirm_first.as_ref().map_or(Lsn::ZERO, |s| s.get()));
        let Some(mut stream) = self.start_stream(start, shutdown).await? else {
            return Ok(StreamEnd::Stopped);
        };
        if let Some(synced) = confirm_first {
            self.confirm(&mut stream, synced).await?;
        }
        let cut = self.cut.as_ref().map(|p| p.cut.lsn);
        let ddl_key = self.ddl_key(client).await?;
        let mut cutter = Cutter::new(self.spool.next_seq(), self.spool.captured_commit_lsn())
            .with_room_end(marks.captured_end_lsn)
            .before_cut(cut)
            .with_ddl_key(ddl_key)
            .only_tables(self.cfg.only_tables())
            .except_tables(self.cfg.except_tables())
            .with_forwarding(
                self.cfg
                    .receivers
                    .iter()
                    .map(|r| (r.fingerprint.to_string(), r.name.clone()))
                    .collect(),
            );
        let batch_max = u64::from(self.cfg.capture_batch_changes);
        let mut batch = Batch::default();
        // A transaction committing at or after the pending cut arrived.
        let mut past_cut = false;
        // What the walsender has read of the WAL, from its keepalives.
        let mut server_end = Lsn::ZERO;
        let mut quiet_at = Instant::now();
        let mut status_at = tokio::time::Instant::now() + STATUS_EVERY;
        let end = loop {
            let idle = cutter.is_idle();
            // A joining table's chunk, between transactions, one per batch
            // (`join.rs`).
            if idle && self.cut.is_none() && !batch.chunk {
                match self.splice_chunk(&mut cutter, client, &mut stream).await? {
                    Spliced::Nothing => {}
                    Spliced::Chunk => {
                        batch.messages += 1;
                        batch.chunk = true;
                    }
                    Spliced::End => {
                        batch.messages += 1;
                        batch.chunk = true;
                        batch.joins_changed = true;
                    }
                }
            }
            if idle && (batch.messages >= batch_max || !stream.has_buffered() || past_cut) {
                let end = self.stream_end(cut, past_cut, server_end, shutdown);
                // Group commit: while the batch before is being fsynced
                // this one grows with whatever arrives; it is sealed when
                // that fsync returns (or when it is full, or the stream
                // ends).
                let seal = self.in_flight.is_none()
                    || batch.messages >= batch_max
                    || past_cut
                    || end.is_some();
                if batch.messages > 0 && seal {
                    self.end_batch(&mut stream, &mut cutter, &mut batch).await?;
                }
                if let Some(end) = end {
                    break end;
                }
            }
            let seeds = self.seeds.as_mut();
            let take_seed = idle && self.cut.is_none() && self.pending_seed.is_none();
            let in_flight = self.in_flight.as_mut();
            // The join's reader: its next chunk once the last is spliced;
            // while one waits for room, a look again soon.
            let chunk_waits = self.join.as_ref().is_some_and(|j| j.pending.is_some());
            let join = self.join.as_mut().filter(|j| j.pending.is_none());
            let event = tokio::select! {
                _ = shutdown.cancelled() => Event::Stop,
                payload = stream.next() => Event::Payload(payload?),
                _ = tokio::time::sleep_until(status_at) => Event::Tick,
                done = async move {
                    match in_flight {
                        Some(f) => (&mut f.fsync).await,
                        None => std::future::pending().await,
                    }
                } => Event::Synced(done),
                Some(req) = async move {
                    match seeds {
                        Some(rx) if take_seed => rx.recv().await,
                        _ => std::future::pending().await,
                    }
                } => Event::Seed(req),
                chunk = async move {
                    match join {
                        Some(j) => j.recv().await,
                        None => std::future::pending().await,
                    }
                } => Event::Chunk(chunk),
                _ = async {
                    if chunk_waits {
                        tokio::time::sleep(JOIN_POLL).await
                    } else {
                        std::future::pending().await
                    }
                } => Event::JoinPoll,
            };
            match event {
                Event::Stop if idle => {
                    if batch.messages > 0 {
                        self.end_batch(&mut stream, &mut cutter, &mut batch).await?;
                    }
                    break StreamEnd::Stopped;
                }
                Event::Stop => {
                    // Inside a transaction: what it appended is not
                    // committed; the next start drops it, and the slot
                    // sends the transaction again.
                    self.settle(Some(&mut stream)).await?;
                    stream.close(CLOSE_WAIT).await;
                    return Ok(StreamEnd::Stopped);
                }
                // The server ends a stream only when it shuts down.
                Event::Payload(None) => {
                    return Err(ReplicationError::Io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the source ended the replication stream",
                    ))
                    .into())
                }
                Event::Payload(Some(payload)) => match walstream::parse(&payload)? {
                    ServerMessage::XLogData { data, .. } => {
                        batch.messages += 1;
                        // Each record goes to the spool as it is cut: a
                        // large value's fragments are not all held at once.
                        let spool = &self.spool;
                        let new_table = cutter.message_each(
                            data,
                            &mut self.copy_state.tables,
                            |record| -> Result<(), CaptureError> {
                                Ok(spool.append(record.seq, &record.encode()?)?)
                            },
                        )?;
                        if let (Some(b'R'), Some(oid)) = (data.first(), data.get(1..5)) {
                            let oid = u32::from_be_bytes(oid.try_into().expect("4 bytes"));
                            self.spool.save_relation(oid, data)?;
                            if self.relation_seen(oid, data) {
                                batch.tables_changed = true;
                                batch.joins_changed = true;
                            }
                        }
                        if let Some(oid) = new_table {
                            tracing::info!(
                                oid,
                                "a table new to the stream: its rows will be copied"
                            );
                            batch.tables_changed = true;
                        }
                        past_cut |= cutter.after_cut() > 0;
                    }
                    ServerMessage::Keepalive {
                        wal_end,
                        reply_requested,
                        ..
                    } => {
                        server_end = server_end.max(wal_end);
                        cutter.saw_server_end(wal_end);
                        // Quiet: everything received is durable, so what
                        // the walsender has read may be confirmed.
                        if idle
                            && batch.messages == 0
                            && self.in_flight.is_none()
                            && self.cut.is_none()
                            && wal_end > self.confirmed
                            && (reply_requested || quiet_at.elapsed() >= STATUS_EVERY)
                        {
                            quiet_at = Instant::now();
                            let synced = self
                                .blocking(move |spool| spool.synced_through(wal_end))
                                .await?;
                            self.confirm(&mut stream, synced).await?;
                        } else if reply_requested {
                            self.send_status(&mut stream, false).await?;
                        }
                    }
                },
                Event::Tick => {
                    status_at = tokio::time::Instant::now() + STATUS_EVERY;
                    // With a cut pending, ask where the walsender is: past
                    // the cut, everything before it has arrived.
                    let ask = idle && cut.is_some_and(|c| server_end < c);
                    self.send_status(&mut stream, ask).await?;
                    if stats_at.elapsed() >= STATS_EVERY {
                        *stats_at = Instant::now();
                        self.read_stats(client).await?;
                    }
                }
                Event::Seed(req) => self.pending_seed = Some(req),
                Event::Chunk(Some(Ok(chunk))) => {
                    if let Some(j) = self.join.as_mut() {
                        j.pending = Some(chunk);
                    }
                }
                Event::Chunk(Some(Err(e))) => return Err(e.into()),
                Event::Chunk(None) => {
                    return Err(CaptureError::JoinReader);
                }
                Event::JoinPoll => {}
                Event::Synced(done) => {
                    let f = self.in_flight.take().expect("a batch in flight");
                    self.landed(Some(&mut stream), f, done).await?;
                }
            }
        };
        self.settle(Some(&mut stream)).await?;
        // The walsender keeps only what a status update told it.
        self.send_status(&mut stream, false).await?;
        stream.close(CLOSE_WAIT).await;
        Ok(end)
    }

    /// Whether the stream ends here (between transactions, the batch
    /// committed), and why.
    fn stream_end(
        &self,
        cut: Option<Lsn>,
        past_cut: bool,
        server_end: Lsn,
        shutdown: &CancellationToken,
    ) -> Option<StreamEnd> {
        if shutdown.is_cancelled() {
            return Some(StreamEnd::Stopped);
        }
        if let Some(cut) = cut {
            if past_cut || server_end >= cut {
                return Some(StreamEnd::Splice);
            }
        }
        // Tables that join while a join is read wait for its end.
        let copy_due = self.cut.is_none()
            && (self.pending_seed.is_some()
                || (!self.copy_state.tables.waiting.is_empty() && self.join.is_none())
                || !self.joins.owed.is_empty()
                || !self.spool.needs_copy().is_empty());
        if copy_due {
            return Some(StreamEnd::CutDue);
        }
        if self.spool.needs_copy().is_empty() && self.spool_full() {
            return Some(StreamEnd::Paused);
        }
        None
    }

    /// Commit the batch's transactions (fsync) and confirm them.
    async fn end_batch(
        &mut self,
        stream: &mut ReplicationStream,
        cutter: &mut Cutter,
        batch: &mut Batch,
    ) -> Result<(), CaptureError> {
        let summary = cutter.take_summary()?;
        if summary.forged_ddl > 0 {
            tracing::warn!(
                messages = summary.forged_ddl,
                "left out pgcourier.ddl logical messages whose signature does not verify: not written by pgcourier's DDL trigger (a role at the source called pg_logical_emit_message with pgcourier's prefix), or pgcourier.ddl_key changed while they were in the WAL; their statements are not replicated"
            );
        }
        if batch.tables_changed {
            // Durable with the commit below, before any transaction whose
            // changes it explains.
            self.spool.set_copy_state(&self.copy_state)?;
        }
        if batch.joins_changed {
            // A join's end: it leaves `open` with the commit that spools it.
            self.save_joins()?;
        }
        let synced = if summary.needs_commit() {
            // One batch in flight: the one before must be durable first.
            self.settle(Some(stream)).await?;
            let sealed = self.spool.seal(summary.last_commit, summary.last_end)?;
            let spool = self.spool.clone();
            self.in_flight = Some(InFlight {
                fsync: tokio::task::spawn_blocking(move || spool.sync_sealed(sealed)),
                transactions: summary.transactions,
                records: summary.records,
            });
            None
        } else if summary.last_end > Lsn::ZERO || batch.tables_changed {
            // Transactions the spool already held (fsynced by an earlier
            // commit), or only the copy state changed.
            self.settle(Some(stream)).await?;
            let end = summary.last_end.max(self.confirmed);
            Some(
                self.blocking(move |spool| spool.synced_through(end))
                    .await?,
            )
        } else {
            None
        };
        {
            let mut st = self.status.lock().expect("status lock");
            st.transactions += summary.transactions;
            st.looped_transactions += summary.looped;
            st.forwarded_transactions += summary.forwarded;
            for (table, n) in &summary.one_way {
                let seen = st.one_way_writes.entry(table.clone()).or_default();
                if *seen == 0 {
                    tracing::warn!(%table, "a local write to a one-way table is not shipped (ship-tables = \"two-way\"): this site's copy of the table now differs from headquarters', whose changes to those rows will overwrite it; write it at headquarters, or make it two-way");
                }
                *seen += n;
            }
            st.copy_waiting = self.copy_state.tables.waiting.len();
        }
        *batch = Batch::default();
        if let Some(synced) = synced {
            self.confirm(stream, synced).await?;
        }
        Ok(())
    }

    /// Wait for the batch in flight, if any, and confirm it (on `stream`,
    /// if one is open; otherwise the next stream starts after it).
    async fn settle(&mut self, stream: Option<&mut ReplicationStream>) -> Result<(), CaptureError> {
        let Some(mut f) = self.in_flight.take() else {
            return Ok(());
        };
        let done = (&mut f.fsync).await;
        self.landed(stream, f, done).await
    }

    /// The batch in flight's fsync returned: confirm it.
    async fn landed(
        &mut self,
        stream: Option<&mut ReplicationStream>,
        f: InFlight,
        done: Result<Result<Synced<Lsn>, StoreError>, tokio::task::JoinError>,
    ) -> Result<(), CaptureError> {
        let synced = done.map_err(CaptureError::Blocking)??;
        tracing::debug!(transactions = f.transactions, records = f.records, end_lsn = %synced.get(), "spooled");
        if let Some(stream) = stream {
            self.confirm(stream, synced).await?;
        }
        Ok(())
    }

    /// Tell the walsender that the spool holds everything up to `to`.
    async fn confirm(
        &mut self,
        stream: &mut ReplicationStream,
        to: Synced<Lsn>,
    ) -> Result<(), CaptureError> {
        if to.get() > self.confirmed {
            self.confirmed = to.get();
            self.send_status(stream, false).await?;
        }
        Ok(())
    }

    /// A status update: flushed and applied = what the spool holds durably.
    pub(super) async fn send_status(
        &self,
        stream: &mut ReplicationStream,
        reply_requested: bool,
    ) -> Result<(), CaptureError> {
        let flush = self.confirmed;
        stream
            .send_status(StatusUpdate {
                write: flush,
                flush,
                apply: flush,
                now: pgcourier_common::pg::time::now_pg_micros(),
                reply_requested,
            })
            .await?;
        Ok(())
    }

    /// Slot statistics for status, and tables that joined or left the
    /// publication.
    pub(super) async fn read_stats(&mut self, client: &Client) -> Result<(), CaptureError> {
        let stats = source::slot_stats(client, &self.cfg.slot).await?;
        self.status.lock().expect("status lock").slot = stats;
        self.find_new_tables(client).await
    }

    /// The key DDL messages are signed with (`pgcourier.ddl_key`), with
    /// `ddl-capture`; read at each stream's start (a superuser may install
    /// it while the sender runs). Missing or unreadable: `None` (DDL
    /// messages are then left out), said once.
    async fn ddl_key(&mut self, client: &Client) -> Result<Option<Vec<u8>>, CaptureError> {
        if !self.cfg.ddl_capture {
            return Ok(None);
        }
        match crate::source::read_ddl_key(client).await? {
            Ok(key) => Ok(Some(key)),
            Err(why) => {
                if !std::mem::replace(&mut self.ddl_key_warned, true) {
                    tracing::warn!("schema changes are not replicated: {why}; run `pgcourier-sender check` for the SQL a superuser can run");
                }
                Ok(None)
            }
        }
    }

    /// Open the replication connection and start streaming at `start`.
    /// The slot may still be held for a moment by the walsender of the
    /// stream this sender just ended: that is waited for. `None`: the
    /// sender is stopping.
    async fn start_stream(
        &self,
        start: Lsn,
        shutdown: &CancellationToken,
    ) -> Result<Option<ReplicationStream>, CaptureError> {
        let publication = pgcourier_common::pg::quote_ident(&self.cfg.publication);
        // Logical messages only with `ddl-capture` (DDL travels as one,
        // `pgcourier.ddl`): pgoutput also sends other applications'
        // messages, the non-transactional ones outside any transaction,
        // which capture refuses as out of order.
        let messages = if self.cfg.ddl_capture {
            "true"
        } else {
            "false"
        };
        let options = [
            ("proto_version", "1"),
            ("publication_names", publication.as_str()),
            ("messages", messages),
        ];
        let deadline = Instant::now() + SLOT_RELEASE_WAIT;
        loop {
            let conn = replication::open(&self.cfg.source).await?;
            match conn.start_logical(&self.cfg.slot, start, &options).await {
                Ok(stream) => return Ok(Some(stream)),
                Err(ReplicationError::Server(e))
                    if e.code == "55006" && Instant::now() < deadline =>
                {
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// What woke the stream's loop.
enum Event {
    Stop,
    Payload(Option<bytes::Bytes>),
    Tick,
    Seed(super::SeedRequest),
    /// The join's reader sent a chunk (or failed, or stopped).
    Chunk(Option<Result<crate::copy::JoinChunk, crate::copy::CopyError>>),
    /// Look again whether the waiting chunk has room.
    JoinPoll,
    /// The batch in flight's fsync returned.
    Synced(Result<Result<Synced<Lsn>, StoreError>, tokio::task::JoinError>),
}

/// What the current batch holds.
#[derive(Default)]
struct Batch {
    /// Messages fed since the last commit.
    messages: u64,
    /// A Relation made a table wait for a copy.
    tables_changed: bool,
    /// A joining table's chunk was spliced into it.
    chunk: bool,
    /// A join ended in it (`join.rs`).
    joins_changed: bool,
}
