//! Apply: inbox records → target rows, exactly once, in source commit order.
//!
//! Records are read from the inbox in sequence order. Consecutive source
//! transactions are grouped into one target transaction (up to
//! `apply-group-transactions` transactions or `apply-group-changes`
//! changes, or until the inbox runs dry), and each group commits together
//! with the progress row `pgcourier.progress` (source identity, last commit
//! LSN and record seq). On (re)start apply reads that row and skips every
//! transaction whose commit LSN is at or below it, so nothing is applied
//! twice; the inbox deletes records only after the commit that applied them.
//!
//! Changes go out as prepared statements, pipelined (many in flight before
//! the first reply), with values in PostgreSQL text form cast to the target
//! column's type (`$1::text::<type>`). Tables and columns are mapped by name,
//! never by OID. Every identifier is quoted.
//!
//! Errors are classified by SQLSTATE: a lost connection or a restarting
//! target is retried with backoff; a target problem (missing table or
//! column, type mismatch, constraint, permission) pauses apply with the
//! table, column and fix, and is retried periodically so apply resumes by
//! itself once the DBA has fixed it. The inbox keeps everything meanwhile.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::try_join_all;
use pgcourier_common::ops::backoff::{error_chain, Backoff};
use pgcourier_common::store::seed_file::{CopyMeta, COPY_PREFIX};
use pgcourier_proto::pgoutput::{
    self, Message, OldTuple, Relation, ReplicaIdentity, Tuple, Value,
};
use pgcourier_proto::record::{Piece, Record, RecordError};
use pgcourier_proto::Lsn;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, Statement};
use tokio_util::sync::CancellationToken;

use crate::config::ReceiverConfig;
use crate::inbox::Inbox;
pub use pgcourier_common::pg::quote_ident;

/// Statements queued before the pipeline is drained.
const PIPELINE_DEPTH: usize = 512;
/// ... or once the queued COPY data reaches this many bytes (bounds memory
/// in a large transaction: invariant 5).
const PIPELINE_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot connect to the target database (setting `target`)")]
    Connect(#[source] tokio_postgres::Error),
    #[error("target query failed: {what}")]
    Target {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("table {table} does not exist on the target: create it with the source's columns, then apply resumes")]
    MissingTable { table: String },
    #[error("column {column} of table {table} does not exist on the target: ALTER TABLE {table} ADD COLUMN {column} <type>, then apply resumes")]
    MissingColumn { table: String, column: String },
    #[error("table {table} has no primary key on the target and no replica identity on the source: add a primary key on the target")]
    NoKey { table: String },
    #[error("record {seq} in the inbox is corrupt")]
    Corrupt {
        seq: u64,
        #[source]
        source: RecordError,
    },
    #[error("record {seq} holds an undecodable pgoutput message")]
    Decode {
        seq: u64,
        #[source]
        source: pgoutput::DecodeError,
    },
    #[error("record {seq} refers to relation {oid}, which no Relation message described")]
    UnknownRelation { seq: u64, oid: u32 },
    #[error("inbox failed")]
    Inbox(#[from] pgcourier_common::store::durable::StoreError),
    #[error("record {seq} is out of order: {message}")]
    Order { seq: u64, message: String },
    #[error("record {seq} holds copy metadata that does not decode: {message}")]
    CopyMeta { seq: u64, message: String },
    #[error(transparent)]
    Seed(#[from] pgcourier_common::store::seed_file::SeedError),
}

impl ApplyError {
    /// Retry soon with backoff (connection, restart); otherwise the DBA must
    /// act and apply retries slowly until the problem is gone.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Connect(_) => true,
            ApplyError::Target { source, .. } => {
                if source.is_closed() {
                    return true;
                }
                match source.code() {
                    None => true,
                    Some(c) => {
                        let c = c.code();
                        c.starts_with("08")
                            || c.starts_with("57")
                            || c.starts_with("53")
                            || c == "40001"
                            || c == "40P01"
                            || c == "25006"
                    }
                }
            }
            _ => false,
        }
    }
}

impl ApplyError {
    /// A short stable name of the kind of error, for status and metrics:
    /// `connection`, `read_only`, `missing_table`, `missing_column`,
    /// `type_mismatch`, `unique_violation`, `constraint`,
    /// `permission_denied`, `no_key`, `corrupt_record`, `bad_record`,
    /// `inbox`, `seed` or `target_error`.
    pub fn class(&self) -> &'static str {
        match self {
            ApplyError::Connect(_) => "connection",
            ApplyError::Target { source, .. } => match source.code().map(|c| c.code()) {
                None => "connection",
                Some(c) if c.starts_with("08") || c.starts_with("57") || c.starts_with("53") => {
                    "connection"
                }
                Some("25006") => "read_only",
                Some("42P01") => "missing_table",
                Some("42703") => "missing_column",
                Some("42501") => "permission_denied",
                Some("23505") => "unique_violation",
                Some(c) if c.starts_with("23") => "constraint",
                Some("42804" | "42846") => "type_mismatch",
                Some(c) if c.starts_with("22") => "type_mismatch",
                Some(_) => "target_error",
            },
            ApplyError::MissingTable { .. } => "missing_table",
            ApplyError::MissingColumn { .. } => "missing_column",
            ApplyError::NoKey { .. } => "no_key",
            ApplyError::Corrupt { .. } => "corrupt_record",
            ApplyError::Decode { .. }
            | ApplyError::UnknownRelation { .. }
            | ApplyError::Order { .. }
            | ApplyError::CopyMeta { .. } => "bad_record",
            ApplyError::Inbox(_) => "inbox",
            ApplyError::Seed(_) => "seed",
        }
    }
}

/// What `status` and the logs report about apply.
#[derive(Clone, Debug, Default)]
pub struct ApplyStatus {
    pub applied_seq: u64,
    pub applied_commit_lsn: Lsn,
    pub applied_commit_time: i64,
    pub applied_transactions: u64,
    pub last_error: Option<String>,
    /// [`ApplyError::class`] of `last_error`.
    pub error_class: Option<&'static str>,
    /// Apply stopped on a definite error (the DBA must act, or skip).
    pub paused: bool,
    /// First record of the transaction apply is stuck on.
    pub blocking_seq: Option<u64>,
    pub missing_rows: u64,
    pub skipped_transactions: u64,
    /// The copy being loaded, if any.
    pub copy: Option<LoadProgress>,
}

/// Progress of a table copy being loaded into the target (it commits as one
/// transaction, so the target shows it only at the end).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LoadProgress {
    pub reason: String,
    pub cut_lsn: String,
    pub first_seq: u64,
    pub elapsed_seconds: f64,
    pub rows: u64,
    pub rows_estimate: u64,
    pub rows_per_second: f64,
    pub eta_seconds: Option<f64>,
    /// (table, rows loaded, rows estimated)
    pub tables: Vec<(String, u64, u64)>,
    #[serde(skip)]
    started: Option<std::time::Instant>,
    #[serde(skip)]
    oids: Vec<u32>,
    /// Its last record is queued: it is loaded once the group commits.
    #[serde(skip)]
    complete: bool,
}

impl LoadProgress {
    fn count(&mut self, oid: u32) {
        if self.complete {
            return;
        }
        if let Some(i) = self.oids.iter().position(|&o| o == oid) {
            self.tables[i].1 += 1;
            self.rows += 1;
            if self.rows % 4096 == 0 {
                self.refresh();
            }
        }
    }

    fn refresh(&mut self) {
        let secs = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        self.elapsed_seconds = secs;
        self.rows_per_second = if secs > 0.0 {
            self.rows as f64 / secs
        } else {
            0.0
        };
        let left: u64 = self
            .tables
            .iter()
            .map(|(_, rows, est)| est.saturating_sub(*rows))
            .sum();
        self.eta_seconds = (self.rows_per_second > 0.0).then(|| left as f64 / self.rows_per_second);
    }
}

pub struct Apply {
    cfg: Arc<ReceiverConfig>,
    inbox: Arc<Inbox>,
    pub status: Arc<Mutex<ApplyStatus>>,
    /// The record being applied; after an error, transactions up to it are
    /// applied one per target transaction, so that everything before the
    /// failing transaction commits and the pause lands exactly on it.
    position: std::sync::atomic::AtomicU64,
    careful_until: std::sync::atomic::AtomicU64,
    /// First record of the transaction being applied.
    txn_first: std::sync::atomic::AtomicU64,
    /// An operator's request to skip the blocking transaction: (seq, reason).
    skip: Mutex<Option<(u64, String)>>,
}

/// The target table a source relation maps to, resolved by name.
struct Target {
    /// `"schema"."table"`
    table: String,
    /// Per source column: quoted target column name and its type for casts.
    columns: Vec<(String, String)>,
    /// Source column indexes that identify a row on the target.
    key: Vec<usize>,
    /// `key` is the target's primary key (compare with `=`); otherwise the
    /// whole-row identity compared as text.
    key_is_pk: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Op {
    Insert,
    Update,
    Delete,
}

enum Pending {
    Prepared {
        stmt: Statement,
        params: Vec<Option<String>>,
        rel: u32,
        op: Op,
    },
    Sql {
        sql: String,
    },
    /// A run of inserts into one table, loaded with COPY (text format).
    Copy {
        sql: String,
        data: Vec<u8>,
        rel: u32,
    },
}

/// Consecutive inserts into one table with the same columns, waiting to be
/// sent as one COPY (or as single inserts when the run stays short).
struct InsertRun {
    oid: u32,
    set: Vec<bool>,
    rows: Vec<Vec<Option<String>>>,
    bytes: usize,
}

/// Runs shorter than this go out as pipelined INSERTs.
const COPY_MIN_ROWS: usize = 8;
/// A run is flushed at this many rows or bytes (bounds memory).
const COPY_MAX_ROWS: usize = 5000;
const COPY_MAX_BYTES: usize = 1 << 20;

/// Per target connection state.
struct Session {
    client: Client,
    source: String,
    marker: Lsn,
    relations: HashMap<u32, Relation>,
    targets: HashMap<u32, Target>,
    statements: HashMap<(u32, Op, Vec<bool>, Vec<bool>), Statement>,
    progress: Statement,
    pending: Vec<Pending>,
    run: Option<InsertRun>,
    fragment: Vec<u8>,
    copy: Option<LoadProgress>,
    /// COPY data queued in `pending`.
    pending_bytes: usize,
}

impl Session {
    fn pipeline_full(&self) -> bool {
        self.pending.len() >= PIPELINE_DEPTH || self.pending_bytes >= PIPELINE_BYTES
    }
}

struct GroupEnd {
    seq: u64,
    commit_lsn: Lsn,
    end_lsn: Lsn,
    commit_time: i64,
}

impl Apply {
    pub fn new(cfg: Arc<ReceiverConfig>, inbox: Arc<Inbox>) -> Apply {
        Apply {
            cfg,
            inbox,
            status: Arc::new(Mutex::new(ApplyStatus::default())),
            position: 0.into(),
            careful_until: 0.into(),
            txn_first: 0.into(),
            skip: Mutex::new(None),
        }
    }

    /// Ask apply to skip the transaction starting at record `seq`. Allowed
    /// only for the transaction that is blocking apply.
    pub fn request_skip(&self, seq: u64, reason: &str) -> Result<(), String> {
        if reason.trim().is_empty() {
            return Err("a reason is required: it is recorded in pgcourier.skipped".into());
        }
        let st = self.status.lock().expect("status lock");
        match (st.paused, st.blocking_seq) {
            (true, Some(b)) if b == seq => {
                *self.skip.lock().expect("skip lock") = Some((seq, reason.to_owned()));
                Ok(())
            }
            (true, Some(b)) => Err(format!(
                "record {seq} is not the blocking transaction; apply is blocked at record {b}"
            )),
            _ => Err(
                "apply is not blocked: only the transaction blocking apply can be skipped".into(),
            ),
        }
    }

    /// Apply until `shutdown`, retrying every error with backoff.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut transient = Backoff::new(self.cfg.max_backoff);
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.session(&shutdown) => r,
            };
            let Err(e) = result else { return };
            if let ApplyError::Corrupt { seq, .. } = &e {
                // Never apply it, never skip it: drop it and everything
                // after it from the inbox; ingest fetches them again (the
                // sender keeps records until they are applied).
                let seq = *seq;
                match self.inbox.truncate_from(seq) {
                    Ok(()) => {
                        let message = error_chain(&e);
                        tracing::error!(seq, error = %message, "a record in the inbox failed its checksum: dropped it and the records after it without applying them; fetching them again from the sender");
                        let mut st = self.status.lock().expect("status lock");
                        st.last_error = Some(message);
                        st.error_class = Some(e.class());
                        st.paused = false;
                        drop(st);
                        continue;
                    }
                    Err(te) => {
                        tracing::error!(seq, error = %error_chain(&te), "could not drop the corrupt record from the inbox");
                    }
                }
            }
            let position = self.position.load(Ordering::Relaxed);
            // Was the failing transaction applied on its own? If it was part
            // of a group, retry one transaction at a time first, so that the
            // pause lands exactly on the failing transaction.
            let isolated = position <= self.careful_until.load(Ordering::Relaxed);
            self.careful_until.store(position, Ordering::Relaxed);
            let message = error_chain(&e);
            let delay = transient.next();
            let mut st = self.status.lock().expect("status lock");
            if e.is_transient() {
                transient.log_once("apply", &e, delay);
                st.paused = false;
            } else if !isolated {
                tracing::debug!(error = %message, "apply failed inside a group; retrying transaction by transaction");
                drop(st);
                continue;
            } else {
                if st.last_error.as_deref() != Some(message.as_str()) {
                    tracing::error!(error = %message, blocking_seq = self.txn_first.load(Ordering::Relaxed), retry_in = ?delay, "apply paused: the target needs attention; the inbox keeps everything and apply resumes once it is fixed (or skip the transaction with pgcourier-queue skip)");
                }
                st.paused = true;
                st.blocking_seq = Some(self.txn_first.load(Ordering::Relaxed));
            }
            st.last_error = Some(message);
            st.error_class = Some(e.class());
            drop(st);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn connect(&self) -> Result<(Client, String, Lsn, Statement), ApplyError> {
        let (client, conn) = self
            .cfg
            .target
            .connect(NoTls)
            .await
            .map_err(ApplyError::Connect)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "target connection ended");
            }
        });
        let target = |what: &str| {
            let what = what.to_owned();
            move |source| ApplyError::Target { what, source }
        };
        client
            .batch_execute("SET datestyle = ISO; SET intervalstyle = postgres; SET extra_float_digits = 3; SET lock_timeout = '30s'")
            .await
            .map_err(target("set session parameters"))?;
        if self.cfg.replica_role {
            client
                .batch_execute("SET session_replication_role = replica")
                .await
                .map_err(target("set session_replication_role = replica (needs superuser; or set replica-role = false)"))?;
        }
        // Created on the first start; later starts need no CREATE privilege.
        let exists = client
            .query_one("SELECT to_regclass('pgcourier.progress') IS NOT NULL", &[])
            .await
            .map_err(target("look up the progress table"))?
            .get::<_, bool>(0);
        if !exists {
            client
            .batch_execute(
                "SET client_min_messages = warning; CREATE SCHEMA IF NOT EXISTS pgcourier; \
                 CREATE TABLE IF NOT EXISTS pgcourier.progress ( \
                   source text PRIMARY KEY, commit_lsn pg_lsn NOT NULL, end_lsn pg_lsn NOT NULL, \
                   seq bigint NOT NULL, commit_time timestamptz, applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .map_err(target("create the pgcourier schema and progress table"))?;
        }
        let source = loop {
            if let Some(s) = self.inbox.source()? {
                break s;
            }
            // Nothing received yet: wait for the first batch.
            let mut rx = self.inbox.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
        };
        let row = client
            .query_opt(
                "SELECT commit_lsn::text, seq FROM pgcourier.progress WHERE source = $1",
                &[&source],
            )
            .await
            .map_err(target("read progress"))?;
        let marker = match row {
            Some(r) => r.get::<_, String>(0).parse().unwrap_or(Lsn::ZERO),
            None => Lsn::ZERO,
        };
        let progress = client
            .prepare_typed(
                "INSERT INTO pgcourier.progress (source, commit_lsn, end_lsn, seq, commit_time, applied_at) \
                 VALUES ($1, $2::text::pg_lsn, $3::text::pg_lsn, $4, \
                         '2000-01-01 00:00:00+00'::timestamptz + $5::bigint * interval '1 microsecond', now()) \
                 ON CONFLICT (source) DO UPDATE SET commit_lsn = EXCLUDED.commit_lsn, end_lsn = EXCLUDED.end_lsn, \
                   seq = EXCLUDED.seq, commit_time = EXCLUDED.commit_time, applied_at = EXCLUDED.applied_at",
                &[Type::TEXT, Type::TEXT, Type::TEXT, Type::INT8, Type::INT8],
            )
            .await
            .map_err(target("prepare progress statement"))?;
        Ok((client, source, marker, progress))
    }

    /// A target connection with the relations the inbox remembers.
    async fn new_session(&self) -> Result<Session, ApplyError> {
        let (client, source, marker, progress) = self.connect().await?;
        let mut s = Session {
            client,
            source,
            marker,
            relations: HashMap::new(),
            targets: HashMap::new(),
            statements: HashMap::new(),
            progress,
            pending: Vec::new(),
            run: None,
            fragment: Vec::new(),
            copy: None,
            pending_bytes: 0,
        };
        self.status.lock().expect("status lock").copy = None;
        for raw in self.inbox.relations()? {
            if let Ok(Message::Relation(rel)) = pgoutput::decode(&raw) {
                s.relations.insert(rel.oid, rel);
            }
        }
        Ok(s)
    }

    /// Apply a seed file's copy transaction (verified beforehand by a full
    /// read) and move the progress row to the seed's marker, in one target
    /// transaction. Returns the rows loaded.
    pub async fn apply_seed(
        &self,
        reader: &mut pgcourier_common::store::seed_file::SeedReader,
        mut on_progress: impl FnMut(&LoadProgress),
    ) -> Result<u64, ApplyError> {
        let mut s = self.new_session().await?;
        if s.marker >= reader.header.commit_lsn {
            return Err(ApplyError::Order {
                seq: reader.header.marker_seq,
                message: format!(
                    "the branch has applied up to {}, at or past the seed's {}",
                    s.marker, reader.header.commit_lsn
                ),
            });
        }
        s.client
            .batch_execute("BEGIN")
            .await
            .map_err(target_err("begin target transaction"))?;
        let mut commit_time = 0;
        while let Some(bytes) = reader.next_record()? {
            let record =
                Record::decode(&bytes).map_err(|source| ApplyError::Corrupt { seq: 0, source })?;
            commit_time = record.commit_time;
            self.queue_record(&mut s, &record).await?;
            if s.pipeline_full() {
                self.drain(&mut s).await?;
            }
            if let Some(c) = s.copy.as_mut() {
                if record.seq % 64 == 0 {
                    c.refresh();
                    on_progress(c);
                }
                if record.last {
                    c.complete = true;
                }
            }
        }
        let rows = s.copy.as_ref().map_or(0, |c| c.rows);
        let end = GroupEnd {
            seq: reader.header.marker_seq,
            commit_lsn: reader.header.commit_lsn,
            end_lsn: reader.header.cut_lsn,
            commit_time,
        };
        self.commit_group(&mut s, end, 1).await?;
        Ok(rows)
    }

    async fn session(&self, shutdown: &CancellationToken) -> Result<(), ApplyError> {
        let mut s = self.new_session().await?;
        tracing::info!(marker = %s.marker, "applying to target");
        let mut cursor = match self.inbox.first_seq()? {
            Some(first) => first,
            None => self.inbox.durable_seq() + 1,
        };
        let mut durable_rx = self.inbox.subscribe();
        let mut open = false;
        let mut group_txns = 0u32;
        let mut group_changes = 0u32;
        let mut group_end: Option<GroupEnd> = None;
        let mut in_txn = false;
        loop {
            let durable = *durable_rx.borrow_and_update();
            if cursor > durable {
                // Nothing more to read now: end the group if at a boundary.
                if open && !in_txn {
                    self.commit_group(
                        &mut s,
                        group_end.take().expect("open group has an end"),
                        group_txns,
                    )
                    .await?;
                    open = false;
                    group_txns = 0;
                    group_changes = 0;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    r = durable_rx.changed() => if r.is_err() { return Ok(()) },
                }
                continue;
            }
            self.position.store(cursor, Ordering::Relaxed);
            if !open {
                // The inbox was moved forward (a new branch starting at its
                // copy): nothing before its first record is ours to apply.
                if let Some(first) = self.inbox.first_seq()? {
                    if first > cursor && self.inbox.get(cursor)?.is_none() {
                        cursor = first;
                        continue;
                    }
                }
            }
            let bytes = self.inbox.get(cursor)?.ok_or_else(|| ApplyError::Order {
                seq: cursor,
                message: "missing from the inbox".into(),
            })?;
            let record = Record::decode(&bytes).map_err(|source| ApplyError::Corrupt {
                seq: cursor,
                source,
            })?;
            if record.seq != cursor {
                return Err(ApplyError::Order {
                    seq: cursor,
                    message: format!("holds seq {}", record.seq),
                });
            }
            if record.commit_lsn <= s.marker {
                // Already applied (before a restart): only learn its relations.
                self.learn_relations(&mut s, &record)?;
                cursor += 1;
                continue;
            }
            if record.part == 0 {
                self.txn_first.store(record.seq, Ordering::Relaxed);
            }
            if !open {
                let skip = self.skip.lock().expect("skip lock").clone();
                if let Some((seq, reason)) = skip.filter(|(seq, _)| *seq == record.seq) {
                    self.skip_transaction(&mut s, seq, &reason).await?;
                    *self.skip.lock().expect("skip lock") = None;
                    continue;
                }
                s.client
                    .batch_execute("BEGIN")
                    .await
                    .map_err(target_err("begin target transaction"))?;
                open = true;
            }
            in_txn = !record.last;
            group_changes += self.queue_record(&mut s, &record).await?;
            if record.last {
                if let Some(c) = s.copy.as_mut() {
                    c.complete = true;
                }
            }
            if record.last {
                group_txns += 1;
                group_end = Some(GroupEnd {
                    seq: record.seq,
                    commit_lsn: record.commit_lsn,
                    end_lsn: record.end_lsn,
                    commit_time: record.commit_time,
                });
                let careful = record.seq <= self.careful_until.load(Ordering::Relaxed);
                if careful
                    || group_txns >= self.cfg.apply_group_transactions
                    || group_changes >= self.cfg.apply_group_changes
                {
                    self.commit_group(&mut s, group_end.take().expect("just set"), group_txns)
                        .await?;
                    open = false;
                    group_txns = 0;
                    group_changes = 0;
                }
            } else if s.pipeline_full() {
                self.drain(&mut s).await?;
            }
            cursor += 1;
        }
    }

    fn learn_relations(&self, s: &mut Session, record: &Record) -> Result<(), ApplyError> {
        for piece in &record.pieces {
            if let Piece::Message(m) = piece {
                if m.first() == Some(&b'R') {
                    let Message::Relation(rel) =
                        pgoutput::decode(m).map_err(|source| ApplyError::Decode {
                            seq: record.seq,
                            source,
                        })?
                    else {
                        continue;
                    };
                    self.remember_relation(s, rel, m)?;
                }
            }
        }
        Ok(())
    }

    fn remember_relation(
        &self,
        s: &mut Session,
        rel: Relation,
        raw: &[u8],
    ) -> Result<(), ApplyError> {
        if s.relations.get(&rel.oid) != Some(&rel) {
            self.inbox.save_relation(rel.oid, raw)?;
            s.targets.remove(&rel.oid);
            s.statements.retain(|k, _| k.0 != rel.oid);
            s.relations.insert(rel.oid, rel);
        }
        Ok(())
    }

    /// Turn a record's changes into pipelined statements. Returns the number
    /// of changes.
    async fn queue_record(&self, s: &mut Session, record: &Record) -> Result<u32, ApplyError> {
        let mut changes = 0;
        for piece in &record.pieces {
            let owned;
            let bytes: &[u8] = match piece {
                Piece::Message(m) => m,
                Piece::Fragment { bytes, more: true } => {
                    s.fragment.extend_from_slice(bytes);
                    continue;
                }
                Piece::Fragment { bytes, more: false } => {
                    s.fragment.extend_from_slice(bytes);
                    owned = std::mem::take(&mut s.fragment);
                    &owned
                }
            };
            let msg = pgoutput::decode(bytes).map_err(|source| ApplyError::Decode {
                seq: record.seq,
                source,
            })?;
            let copied = match &msg {
                Message::Insert { rel, .. } => Some(*rel),
                _ => None,
            };
            match msg {
                Message::Relation(rel) => self.remember_relation(s, rel, bytes)?,
                Message::LogicalMessage {
                    prefix, content, ..
                } if prefix == COPY_PREFIX => {
                    self.start_copy(s, record.seq, &content).await?;
                }
                Message::Insert { rel, new } => {
                    self.queue_change(s, record.seq, rel, Op::Insert, None, &new)
                        .await?;
                    changes += 1;
                }
                Message::Update { rel, old, new } => {
                    self.queue_change(s, record.seq, rel, Op::Update, old.as_ref(), &new)
                        .await?;
                    changes += 1;
                }
                Message::Delete { rel, old } => {
                    self.queue_change(s, record.seq, rel, Op::Delete, Some(&old), old.tuple())
                        .await?;
                    changes += 1;
                }
                Message::Truncate {
                    cascade,
                    restart_identity,
                    rels,
                } => {
                    let mut names = Vec::new();
                    for oid in rels {
                        self.resolve(s, record.seq, oid).await?;
                        names.push(s.targets[&oid].table.clone());
                    }
                    let mut sql = format!("TRUNCATE {}", names.join(", "));
                    if restart_identity {
                        sql.push_str(" RESTART IDENTITY");
                    }
                    if cascade {
                        sql.push_str(" CASCADE");
                    }
                    self.flush_run(s).await?;
                    s.pending.push(Pending::Sql { sql });
                    changes += 1;
                }
                Message::Begin { .. }
                | Message::Commit { .. }
                | Message::Origin { .. }
                | Message::Type { .. }
                | Message::LogicalMessage { .. } => {}
            }
            if let Some(c) = s.copy.as_mut() {
                if let Some(oid) = copied {
                    c.count(oid);
                    if c.rows % 65536 == 0 {
                        self.status.lock().expect("status lock").copy = Some(c.clone());
                    }
                }
            }
            if s.pipeline_full() {
                self.drain(s).await?;
            }
        }
        Ok(changes)
    }

    /// A copy transaction begins: create its missing tables when allowed,
    /// and track its progress.
    async fn start_copy(
        &self,
        s: &mut Session,
        seq: u64,
        content: &[u8],
    ) -> Result<(), ApplyError> {
        let meta: CopyMeta = serde_json::from_slice(content).map_err(|e| ApplyError::CopyMeta {
            seq,
            message: e.to_string(),
        })?;
        if self.cfg.create_tables {
            self.drain(s).await?;
            for t in &meta.tables {
                let sql = format!(
                    "CREATE SCHEMA IF NOT EXISTS {}; {}",
                    quote_ident(&t.schema),
                    t.create_sql()
                );
                s.client
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| ApplyError::Target {
                        what: format!("create table {} (setting `create-tables`)", t.quoted()),
                        source: e,
                    })?;
            }
        }
        let progress = LoadProgress {
            reason: meta.reason.clone(),
            cut_lsn: meta.cut_lsn.to_string(),
            first_seq: seq,
            rows_estimate: meta.tables.iter().map(|t| t.rows_estimate).sum(),
            tables: meta
                .tables
                .iter()
                .map(|t| (t.quoted(), 0, t.rows_estimate))
                .collect(),
            started: Some(std::time::Instant::now()),
            oids: meta.tables.iter().map(|t| t.oid).collect(),
            ..LoadProgress::default()
        };
        tracing::info!(seq, reason = %meta.reason, cut = %meta.cut_lsn, tables = meta.tables.len(), rows_estimate = progress.rows_estimate, "loading a table copy");
        self.status.lock().expect("status lock").copy = Some(progress.clone());
        s.copy = Some(progress);
        Ok(())
    }

    /// Map a source relation to its target table (cached per session).
    async fn resolve(&self, s: &mut Session, seq: u64, oid: u32) -> Result<(), ApplyError> {
        if s.targets.contains_key(&oid) {
            return Ok(());
        }
        let rel = s
            .relations
            .get(&oid)
            .ok_or(ApplyError::UnknownRelation { seq, oid })?
            .clone();
        let table = format!("{}.{}", quote_ident(&rel.schema), quote_ident(&rel.name));
        let rows = s
            .client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
                        coalesce(a.attnum = ANY (i.indkey::int2[]), false) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                 LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') ORDER BY a.attnum",
                &[&rel.schema, &rel.name],
            )
            .await
            .map_err(target_err("read target table definition"))?;
        if rows.is_empty() {
            return Err(ApplyError::MissingTable { table });
        }
        let target_cols: Vec<(String, String, bool)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let mut columns = Vec::new();
        for c in &rel.columns {
            let Some((name, ty, _)) = target_cols.iter().find(|(n, _, _)| *n == c.name) else {
                return Err(ApplyError::MissingColumn {
                    table,
                    column: quote_ident(&c.name),
                });
            };
            columns.push((quote_ident(name), ty.clone()));
        }
        let pk: Vec<&String> = target_cols
            .iter()
            .filter(|(_, _, pk)| *pk)
            .map(|(n, _, _)| n)
            .collect();
        let (key, key_is_pk) = if !pk.is_empty() {
            let mut key = Vec::new();
            for name in pk {
                let idx = rel
                    .columns
                    .iter()
                    .position(|c| c.name == *name)
                    .ok_or_else(|| ApplyError::MissingColumn {
                        table: format!(
                            "{table} (on the source; it is in the target's primary key)"
                        ),
                        column: quote_ident(name),
                    })?;
                key.push(idx);
            }
            (key, true)
        } else {
            let key: Vec<usize> = match rel.replica_identity {
                ReplicaIdentity::Full => (0..rel.columns.len()).collect(),
                _ => rel
                    .columns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.key)
                    .map(|(i, _)| i)
                    .collect(),
            };
            (key, false)
        };
        s.targets.insert(
            oid,
            Target {
                table,
                columns,
                key,
                key_is_pk,
            },
        );
        Ok(())
    }

    async fn queue_change(
        &self,
        s: &mut Session,
        seq: u64,
        oid: u32,
        op: Op,
        old: Option<&OldTuple>,
        new: &Tuple,
    ) -> Result<(), ApplyError> {
        self.resolve(s, seq, oid).await?;
        let target = &s.targets[&oid];
        if new.len() != target.columns.len() {
            return Err(ApplyError::Order {
                seq,
                message: format!(
                    "a change to {} has {} columns, its Relation {}",
                    target.table,
                    new.len(),
                    target.columns.len()
                ),
            });
        }
        // Which columns are set, and which identify the row.
        let set: Vec<bool> = match op {
            Op::Insert | Op::Update => new
                .iter()
                .map(|v| !matches!(v, Value::UnchangedToast))
                .collect(),
            Op::Delete => vec![false; new.len()],
        };
        let key_source: &Tuple = match (op, old) {
            (Op::Insert, _) => new,
            (_, Some(old)) => old.tuple(),
            (_, None) => new,
        };
        let mut wher = vec![false; new.len()];
        if op != Op::Insert {
            if target.key.is_empty() {
                return Err(ApplyError::NoKey {
                    table: target.table.clone(),
                });
            }
            for &k in &target.key {
                wher[k] = !matches!(key_source.get(k), Some(Value::UnchangedToast) | None);
            }
        }
        if op == Op::Insert {
            let row: Vec<Option<String>> = new
                .iter()
                .zip(&set)
                .filter(|(_, on)| **on)
                .map(|(v, _)| text_value(v))
                .collect();
            let bytes: usize = row
                .iter()
                .map(|v| v.as_ref().map_or(2, |t| t.len() + 1))
                .sum();
            let same = matches!(&s.run, Some(r) if r.oid == oid && r.set == set);
            if !same {
                self.flush_run(s).await?;
                s.run = Some(InsertRun {
                    oid,
                    set,
                    rows: Vec::new(),
                    bytes: 0,
                });
            }
            let run = s.run.as_mut().expect("run just ensured");
            run.rows.push(row);
            run.bytes += bytes;
            if run.rows.len() >= COPY_MAX_ROWS || run.bytes >= COPY_MAX_BYTES {
                self.flush_run(s).await?;
            }
            return Ok(());
        }
        self.flush_run(s).await?;
        let stmt = self.statement(s, oid, op, &set, &wher).await?;
        let mut params = Vec::new();
        for (i, v) in new.iter().enumerate() {
            if set[i] {
                params.push(text_value(v));
            }
        }
        for (i, w) in wher.iter().enumerate() {
            if *w {
                params.push(text_value(&key_source[i]));
            }
        }
        s.pending.push(Pending::Prepared {
            stmt,
            params,
            rel: oid,
            op,
        });
        Ok(())
    }

    /// The prepared statement for one change shape (cached per session).
    async fn statement(
        &self,
        s: &mut Session,
        oid: u32,
        op: Op,
        set: &[bool],
        wher: &[bool],
    ) -> Result<Statement, ApplyError> {
        let key = (oid, op, set.to_vec(), wher.to_vec());
        if let Some(st) = s.statements.get(&key) {
            return Ok(st.clone());
        }
        let target = &s.targets[&oid];
        let (sql, n) = build_sql(target, op, set, wher);
        let st = s
            .client
            .prepare_typed(&sql, &vec![Type::TEXT; n])
            .await
            .map_err(|e| ApplyError::Target {
                what: format!("prepare statement for {}", target.table),
                source: e,
            })?;
        s.statements.insert(key, st.clone());
        Ok(st)
    }

    /// Queue the pending insert run: as one COPY when long enough, else as
    /// single INSERTs.
    async fn flush_run(&self, s: &mut Session) -> Result<(), ApplyError> {
        let Some(run) = s.run.take() else {
            return Ok(());
        };
        if run.rows.len() >= COPY_MIN_ROWS {
            let target = &s.targets[&run.oid];
            let cols: Vec<&str> = (0..run.set.len())
                .filter(|&i| run.set[i])
                .map(|i| target.columns[i].0.as_str())
                .collect();
            let sql = format!("COPY {} ({}) FROM STDIN", target.table, cols.join(", "));
            let mut data = Vec::with_capacity(run.bytes + run.rows.len());
            for row in &run.rows {
                copy_row(&mut data, row);
            }
            s.pending_bytes += data.len();
            s.pending.push(Pending::Copy {
                sql,
                data,
                rel: run.oid,
            });
        } else {
            let wher = vec![false; run.set.len()];
            let stmt = self
                .statement(s, run.oid, Op::Insert, &run.set, &wher)
                .await?;
            for params in run.rows {
                s.pending.push(Pending::Prepared {
                    stmt: stmt.clone(),
                    params,
                    rel: run.oid,
                    op: Op::Insert,
                });
            }
        }
        Ok(())
    }

    /// Send every queued statement and wait for all replies: statements are
    /// pipelined; a COPY waits for what precedes it.
    async fn drain(&self, s: &mut Session) -> Result<(), ApplyError> {
        self.flush_run(s).await?;
        let pending = std::mem::take(&mut s.pending);
        s.pending_bytes = 0;
        let mut batch: Vec<Pending> = Vec::new();
        for p in pending {
            match p {
                Pending::Copy { sql, data, rel } => {
                    self.pipeline(s, std::mem::take(&mut batch)).await?;
                    copy_in(&s.client, &sql, data)
                        .await
                        .map_err(|e| target_error(s, Some(rel), e))?;
                }
                // Unprepared SQL (TRUNCATE) is parsed before it runs, so a
                // prepared statement queued after it would overtake it in
                // the pipeline: it waits for what precedes it instead.
                Pending::Sql { sql } => {
                    self.pipeline(s, std::mem::take(&mut batch)).await?;
                    s.client
                        .batch_execute(&sql)
                        .await
                        .map_err(|e| target_error(s, None, e))?;
                }
                p => batch.push(p),
            }
        }
        self.pipeline(s, batch).await
    }

    async fn pipeline(&self, s: &Session, pending: Vec<Pending>) -> Result<(), ApplyError> {
        if pending.is_empty() {
            return Ok(());
        }
        let client = &s.client;
        let futures = pending.iter().map(|p| async move {
            match p {
                Pending::Prepared {
                    stmt,
                    params,
                    rel,
                    op,
                } => {
                    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                        params.iter().map(|p| p as _).collect();
                    client
                        .execute(stmt, &refs)
                        .await
                        .map(|n| (n, Some((*rel, *op))))
                        .map_err(|e| (e, Some(*rel)))
                }
                Pending::Sql { .. } | Pending::Copy { .. } => {
                    unreachable!("SQL and COPY are never pipelined")
                }
            }
        });
        match try_join_all(futures).await {
            Ok(results) => {
                let mut missing = 0;
                for (n, what) in results {
                    if let Some((rel, op)) = what {
                        if n == 0 && op != Op::Insert {
                            missing += 1;
                            if let Some(t) = s.targets.get(&rel) {
                                tracing::warn!(table = %t.table, "row to update or delete not found on the target (it was changed there, or never copied); change skipped");
                            }
                        }
                    }
                }
                if missing > 0 {
                    self.status.lock().expect("status lock").missing_rows += missing;
                }
                Ok(())
            }
            Err((e, rel)) => Err(target_error(s, rel, e)),
        }
    }

    /// Skip the whole transaction starting at record `first`: record it,
    /// with its content, in `pgcourier.skipped`, and move the progress row
    /// past it, in one target transaction.
    async fn skip_transaction(
        &self,
        s: &mut Session,
        first: u64,
        reason: &str,
    ) -> Result<(), ApplyError> {
        const MAX_CONTENT: usize = 16 << 20;
        let mut views = Vec::new();
        let mut content_bytes = 0;
        let mut truncated = false;
        let mut seq = first;
        let mut rels: HashMap<u32, Relation> = s.relations.clone();
        let end = loop {
            let bytes = self.inbox.get(seq)?.ok_or_else(|| ApplyError::Order {
                seq,
                message: "missing from the inbox while skipping".into(),
            })?;
            let record =
                Record::decode(&bytes).map_err(|source| ApplyError::Corrupt { seq, source })?;
            self.learn_relations(s, &record)?;
            let view = pgcourier_common::ops::inspect::view(&record, &mut rels);
            let json = serde_json::to_value(&view).unwrap_or(serde_json::Value::Null);
            content_bytes += json.to_string().len();
            if content_bytes <= MAX_CONTENT {
                views.push(json);
            } else {
                truncated = true;
            }
            if record.last {
                break record;
            }
            seq += 1;
        };
        let content = serde_json::json!({ "records": views, "truncated": truncated }).to_string();
        s.client
            .batch_execute(
                "SET client_min_messages = warning; CREATE TABLE IF NOT EXISTS pgcourier.skipped (                    source text NOT NULL, seq bigint NOT NULL, commit_lsn pg_lsn NOT NULL, xid bigint NOT NULL,                    commit_time timestamptz, reason text NOT NULL, skipped_at timestamptz NOT NULL DEFAULT now(),                    content jsonb NOT NULL); BEGIN",
            )
            .await
            .map_err(target_err("begin skip transaction"))?;
        s.client
            .execute(
                "INSERT INTO pgcourier.skipped (source, seq, commit_lsn, xid, commit_time, reason, content)                  VALUES ($1, $2, $3::text::pg_lsn, $4, '2000-01-01 00:00:00+00'::timestamptz + $5::bigint * interval '1 microsecond', $6, $7::text::jsonb)",
                &[&s.source, &(first as i64), &end.commit_lsn.to_string(), &i64::from(end.xid), &end.commit_time, &reason, &content],
            )
            .await
            .map_err(target_err("record skipped transaction"))?;
        let group = GroupEnd {
            seq: end.seq,
            commit_lsn: end.commit_lsn,
            end_lsn: end.end_lsn,
            commit_time: end.commit_time,
        };
        self.commit_group(s, group, 0).await?;
        self.status
            .lock()
            .expect("status lock")
            .skipped_transactions += 1;
        tracing::warn!(seq = first, commit_lsn = %end.commit_lsn, "skipped a transaction at the operator's request; its content is in pgcourier.skipped");
        Ok(())
    }

    async fn commit_group(
        &self,
        s: &mut Session,
        end: GroupEnd,
        txns: u32,
    ) -> Result<(), ApplyError> {
        self.drain(s).await?;
        s.client
            .execute(
                &s.progress,
                &[
                    &s.source,
                    &end.commit_lsn.to_string(),
                    &end.end_lsn.to_string(),
                    &(end.seq as i64),
                    &end.commit_time,
                ],
            )
            .await
            .map_err(target_err("write progress row"))?;
        s.client
            .batch_execute("COMMIT")
            .await
            .map_err(target_err("commit target transaction"))?;
        debug_assert!(end.commit_lsn > s.marker);
        s.marker = end.commit_lsn;
        self.inbox.delete_through(end.seq)?;
        let mut st = self.status.lock().expect("status lock");
        if s.copy.as_ref().is_some_and(|c| c.complete) {
            let mut c = s.copy.take().expect("checked");
            c.refresh();
            tracing::info!(
                rows = c.rows,
                tables = c.tables.len(),
                seconds = c.elapsed_seconds,
                rows_per_second = c.rows_per_second as u64,
                "table copy loaded and committed"
            );
            st.copy = None;
        }
        if st.last_error.take().is_some() {
            tracing::info!("apply resumed");
        }
        st.error_class = None;
        st.paused = false;
        st.blocking_seq = None;
        st.applied_seq = end.seq;
        st.applied_commit_lsn = end.commit_lsn;
        st.applied_commit_time = end.commit_time;
        st.applied_transactions += u64::from(txns);
        Ok(())
    }
}

/// An apply error that names the table (and column, when PostgreSQL says).
fn target_error(s: &Session, rel: Option<u32>, e: tokio_postgres::Error) -> ApplyError {
    let table = rel
        .and_then(|r| s.targets.get(&r))
        .map(|t| t.table.clone())
        .unwrap_or_else(|| "(truncate)".into());
    let column = e
        .as_db_error()
        .and_then(|d| d.column())
        .map(|c| format!(", column {}", quote_ident(c)))
        .unwrap_or_default();
    ApplyError::Target {
        what: format!("apply change to table {table}{column}"),
        source: e,
    }
}

async fn copy_in(client: &Client, sql: &str, data: Vec<u8>) -> Result<u64, tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = client.copy_in::<_, bytes::Bytes>(sql).await?;
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data)).await?;
    sink.finish().await
}

/// One row in COPY text format.
fn copy_row(out: &mut Vec<u8>, row: &[Option<String>]) {
    for (i, v) in row.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        match v {
            None => out.extend_from_slice(b"\\N"),
            Some(t) => {
                for &b in t.as_bytes() {
                    match b {
                        b'\\' => out.extend_from_slice(b"\\\\"),
                        b'\n' => out.extend_from_slice(b"\\n"),
                        b'\r' => out.extend_from_slice(b"\\r"),
                        b'\t' => out.extend_from_slice(b"\\t"),
                        _ => out.push(b),
                    }
                }
            }
        }
    }
    out.push(b'\n');
}

fn target_err(what: &'static str) -> impl Fn(tokio_postgres::Error) -> ApplyError {
    move |source| ApplyError::Target {
        what: what.to_owned(),
        source,
    }
}

fn text_value(v: &Value) -> Option<String> {
    match v {
        Value::Text(t) => Some(t.clone()),
        Value::Null | Value::UnchangedToast => None,
        // Binary format is never requested; render as bytea hex so a
        // mismatch fails loudly rather than silently.
        Value::Binary(b) => Some(format!(
            "\\x{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        )),
    }
}

/// The SQL for one change shape and its parameter count.
fn build_sql(t: &Target, op: Op, set: &[bool], wher: &[bool]) -> (String, usize) {
    let mut n = 0;
    let mut next = || {
        n += 1;
        n
    };
    let cast = |i: usize, p: usize| format!("${p}::text::{}", t.columns[i].1);
    let mut sql = String::new();
    match op {
        Op::Insert => {
            let cols: Vec<usize> = (0..set.len()).filter(|&i| set[i]).collect();
            let names: Vec<&str> = cols.iter().map(|&i| t.columns[i].0.as_str()).collect();
            let values: Vec<String> = cols.iter().map(|&i| cast(i, next())).collect();
            sql = format!(
                "INSERT INTO {} ({}) VALUES ({})",
                t.table,
                names.join(", "),
                values.join(", ")
            );
        }
        Op::Update | Op::Delete => {
            if op == Op::Update {
                let sets: Vec<String> = (0..set.len())
                    .filter(|&i| set[i])
                    .map(|i| format!("{} = {}", t.columns[i].0, cast(i, next())))
                    .collect();
                sql.push_str(&format!("UPDATE {} SET {}", t.table, sets.join(", ")));
            } else {
                sql.push_str(&format!("DELETE FROM {}", t.table));
            }
            let conds: Vec<String> = (0..wher.len())
                .filter(|&i| wher[i])
                .map(|i| {
                    let p = next();
                    if t.key_is_pk {
                        format!("{} = {}", t.columns[i].0, cast(i, p))
                    } else {
                        format!("{}::text IS NOT DISTINCT FROM ${p}::text", t.columns[i].0)
                    }
                })
                .collect();
            if t.key_is_pk {
                sql.push_str(&format!(" WHERE {}", conds.join(" AND ")));
            } else {
                // Without a primary key, change exactly one matching row.
                sql.push_str(&format!(
                    " WHERE ctid = (SELECT ctid FROM {} WHERE {} LIMIT 1)",
                    t.table,
                    conds.join(" AND ")
                ));
            }
        }
    }
    (sql, n)
}

/// Seconds between a PostgreSQL-epoch commit time and now.
pub fn lag_seconds(commit_time: i64) -> Option<f64> {
    if commit_time == 0 {
        return None;
    }
    Some(pgcourier_common::pg::time::age_seconds(commit_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(key_is_pk: bool) -> Target {
        Target {
            table: "\"s\".\"T\"".into(),
            columns: vec![
                ("\"id\"".into(), "integer".into()),
                ("\"v\"".into(), "text".into()),
                ("\"j\"".into(), "jsonb".into()),
            ],
            key: vec![0],
            key_is_pk,
        }
    }

    #[test]
    fn insert_update_delete_sql_casts_text_to_target_types() {
        let t = target(true);
        assert_eq!(
            build_sql(&t, Op::Insert, &[true, true, true], &[false; 3]),
            ("INSERT INTO \"s\".\"T\" (\"id\", \"v\", \"j\") VALUES ($1::text::integer, $2::text::text, $3::text::jsonb)".into(), 3)
        );
        assert_eq!(
            build_sql(&t, Op::Update, &[true, false, true], &[true, false, false]),
            ("UPDATE \"s\".\"T\" SET \"id\" = $1::text::integer, \"j\" = $2::text::jsonb WHERE \"id\" = $3::text::integer".into(), 3)
        );
        assert_eq!(
            build_sql(&t, Op::Delete, &[false; 3], &[true, false, false]).0,
            "DELETE FROM \"s\".\"T\" WHERE \"id\" = $1::text::integer"
        );
    }

    #[test]
    fn tables_without_primary_key_change_exactly_one_row() {
        let mut t = target(false);
        t.key = vec![0, 1, 2];
        let (sql, n) = build_sql(&t, Op::Delete, &[false; 3], &[true, true, true]);
        assert_eq!(n, 3);
        assert!(sql.contains("WHERE ctid = (SELECT ctid FROM \"s\".\"T\" WHERE \"id\"::text IS NOT DISTINCT FROM $1::text"), "{sql}");
        assert!(sql.ends_with("LIMIT 1)"));
    }

    #[test]
    fn copy_rows_escape_separators_and_nulls() {
        let mut out = Vec::new();
        copy_row(
            &mut out,
            &[Some("a\tb\nc\\d\re".into()), None, Some(String::new())],
        );
        assert_eq!(out, b"a\\tb\\nc\\\\d\\re\t\\N\t\n".to_vec());
    }

    #[test]
    fn identifiers_are_always_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("select"), "\"select\"");
    }
}
