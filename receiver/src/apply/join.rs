//! A table joining a running publication in chunks (the messages are
//! described in `pgcourier_common::store::join`): its rows are loaded into
//! a staging table chunk by chunk, between the live transactions, while
//! the live changes to it are held back; at the join's end the table holds
//! the join's rows and the held changes are replayed. The rows reach the
//! table by one of two paths: a side transaction on a second connection
//! fills it while the join loads and commits at the end (`join_side.rs`:
//! the end costs the apply connection no time that grows with the table),
//! or, when that side transaction does not hold every chunk (a receiver
//! restarted mid-join, an error on it, a schema change meanwhile), the end
//! replaces the table with its staging rows on the apply connection.
//!
//! ```text
//! join start   CopyMeta join = id: per table, pgcourier."join_<id>_<oid>"
//!              (the target's published columns, their types, no
//!              constraints) and a pgcourier.joining row; the table's
//!              source OID is loading from now on
//! live txn     a change to a loading table is not applied: its pgoutput
//!              message goes to pgcourier.held (id, n in arrival order); a
//!              TRUNCATE is split, the loading tables' part held, the
//!              rest applied; a Relation of a loading table is held too,
//!              so the replay decodes each change with its shape
//! chunk        COPY into the staging table; pgcourier.joining.rows grows;
//!              once its group commits, COPY into the target in the join's
//!              side transaction (opened at chunk 1: DELETE FROM target)
//! end          side transaction complete: its COMMIT; else it is rolled
//!              back, and TRUNCATE target; INSERT INTO target SELECT FROM
//!              staging. Then the held changes replayed in n order through
//!              the ordinary path (`queue_row_message`), read back
//!              REPLAY_BATCH at a time; staging dropped, held and joining
//!              rows deleted
//! abort        (an id in a later CopyMeta's aborts) staging dropped, held
//!              and joining rows deleted, before anything else of that copy
//! ```
//!
//! Exactly once: every step above runs in the target transaction of the
//! group holding its source transaction, and commits with that group's
//! progress row (`mod.rs`). A crash before the commit undoes the step with
//! the rest of the group, and the group is applied again; after it, the
//! progress row says the step's transaction was applied, and it is
//! skipped. The side transaction commits before the end's group: a crash
//! between the two leaves staging, the held changes and the progress row
//! as they were, and the end is applied again from staging, which
//! replaces the side transaction's rows with the same rows
//! (`join_side.rs`). The session's view of the loading tables ([`Joins`])
//! is read from `pgcourier.joining` and `pgcourier.held` at session start,
//! and any error ends the session, so it never outlives a rolled-back
//! transaction.
//!
//! The target a join replaces is the table apply writes the source table
//! to (by name, `mapping.rs`). The staging table has the published columns
//! (the CopyTable's, in order, as the chunks name them) with the target's
//! types, and nothing else: a target column the source does not publish
//! (NOT NULL with a default) takes its default at the end's INSERT (or the
//! side transaction's COPY), and the target's constraints are checked
//! there (a row the side transaction's COPY refuses gives it up: the end's
//! INSERT then reports it, naming the table). It is an ordinary logged
//! table: an unlogged one would be emptied by a crash of the target after
//! chunks committed.
//!
//! Limits: a row clock (two-way tables) before a held change is dropped
//! (a two-way table joining mid-run is not supported: its held changes
//! replay without their clocks, and the staging rows are inserted without
//! conflict detection); a column dropped at the source while its table
//! joins fails the end (the staging rows still name it); a held change is
//! kept whole in memory while it is held and replayed (the large insert
//! path does not stream a change to a loading table).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use pgcourier_common::pg::quote_ident;
use pgcourier_common::store::join::{JoinKind, JoinPart};
use pgcourier_common::store::seed_file::CopyMeta;
use pgcourier_proto::pgoutput::{self, Message, Relation};

use super::error::{target_err, ApplyError};
use super::join_side::{Side, SideTable};
use super::pipeline::copy_in;
use super::status::JoiningTable;
use super::{Apply, Session};

/// The join tables, created on first start beside `pgcourier.progress`:
/// the tables being loaded (`target` and `staging` are quoted names, for
/// the operator; apply derives both again from the source OID), and the
/// changes held back meanwhile (`n`: order of arrival within the join).
/// Run after `pgcourier.progress` is there, in its schema (without `CREATE
/// SCHEMA`, which asks for CREATE on the database even when the schema
/// exists).
pub(super) const CREATE_SQL: &str = "CREATE TABLE IF NOT EXISTS pgcourier.joining ( \
       id bigint NOT NULL, source_oid oid NOT NULL, target text NOT NULL, staging text NOT NULL, \
       columns text[] NOT NULL, rows bigint NOT NULL DEFAULT 0, PRIMARY KEY (id, source_oid)); \
     CREATE TABLE IF NOT EXISTS pgcourier.held ( \
       id bigint NOT NULL, n bigint NOT NULL, message bytea NOT NULL, PRIMARY KEY (id, n))";

/// Held changes read back per query at a join's end (bounds memory).
const REPLAY_BATCH: i64 = 1000;

/// A table of a join being loaded: its `pgcourier.joining` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Loading {
    pub(super) id: u64,
    /// Quoted target table (status and logs).
    pub(super) target: String,
    /// Published column names, in CopyTable order, unquoted.
    pub(super) columns: Vec<String>,
    /// Rows loaded into the staging table so far.
    pub(super) rows: u64,
}

/// The joins being loaded, as the target has them in the open transaction.
#[derive(Default)]
pub(super) struct Joins {
    /// By source OID.
    tables: HashMap<u32, Loading>,
    /// Per join, the `n` of its last held change.
    last_held: HashMap<u64, i64>,
    /// Held changes not yet sent: join, n, message (sent by `drain`, one
    /// statement for all).
    queued: Vec<(i64, i64, Vec<u8>)>,
    /// Joins the open group loaded: logged once it commits.
    loaded: Vec<Loaded>,
    /// Per join, its side transaction (`join_side.rs`), from its chunk 1.
    pub(super) sides: HashMap<u64, Side>,
}

/// A join loaded by the open group, for the log line after its commit.
pub(super) struct Loaded {
    id: u64,
    tables: Vec<String>,
    rows: u64,
    replayed: u64,
    seconds: f64,
    /// How the rows went into the tables: `side transaction` or `from
    /// staging`.
    swap: &'static str,
}

impl Joins {
    /// The join loading the source table `oid`, if one is.
    pub(super) fn loading_id(&self, oid: u32) -> Option<u64> {
        self.tables.get(&oid).map(|l| l.id)
    }

    /// The join loading the source table `oid`, if any: its changes are
    /// held.
    pub(super) fn holding(&self, oid: u32) -> Option<u64> {
        self.tables.get(&oid).map(|t| t.id)
    }

    /// Whether the start of a message being put together is an Insert to
    /// a loading table: that one is not streamed into a COPY of its own
    /// (`large.rs`) but held whole.
    pub(super) fn holds_insert(&self, message: &[u8]) -> bool {
        insert_rel(message).is_some_and(|rel| self.holding(rel).is_some())
    }

    /// Join `join`'s tables, as its side transaction writes them.
    pub(super) fn side_tables(&self, join: u64) -> HashMap<u32, SideTable> {
        self.tables
            .iter()
            .filter(|(_, t)| t.id == join)
            .map(|(&oid, t)| {
                (
                    oid,
                    SideTable {
                        target: t.target.clone(),
                        columns: t.columns.clone(),
                    },
                )
            })
            .collect()
    }

    /// The open group committed: the chunks it staged go to their side
    /// transactions.
    pub(super) fn committed(&mut self) {
        for side in self.sides.values_mut() {
            side.committed();
        }
    }

    /// The loading tables, for the status.
    pub(super) fn status(&self) -> Vec<JoiningTable> {
        let mut out: Vec<JoiningTable> = self
            .tables
            .values()
            .map(|t| JoiningTable {
                join: t.id,
                table: t.target.clone(),
                rows: t.rows,
            })
            .collect();
        out.sort_by(|a, b| (a.join, &a.table).cmp(&(b.join, &b.table)));
        out
    }
}

/// The staging table of join `id`'s source table `oid`, quoted.
pub(super) fn staging_name(id: u64, oid: u32) -> String {
    format!("pgcourier.{}", quote_ident(&format!("join_{id}_{oid}")))
}

/// The relation of an Insert message from its first bytes; `None` for any
/// other message, or fewer than five bytes.
fn insert_rel(message: &[u8]) -> Option<u32> {
    match message {
        [b'I', a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// A TRUNCATE's relations split: those applied now, and per join those
/// held (in the TRUNCATE's order).
fn split_truncate(
    rels: &[u32],
    holding: impl Fn(u32) -> Option<u64>,
) -> (Vec<u32>, BTreeMap<u64, Vec<u32>>) {
    let mut now = Vec::new();
    let mut held: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for &oid in rels {
        match holding(oid) {
            Some(join) => held.entry(join).or_default().push(oid),
            None => now.push(oid),
        }
    }
    (now, held)
}

/// The columns quoted, comma-separated.
pub(super) fn column_list(columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The staging table: the target's published columns with their types, no
/// rows, no constraints.
fn staging_sql(staging: &str, target: &str, columns: &[String]) -> String {
    format!(
        "CREATE TABLE {staging} AS SELECT {} FROM {target} WITH NO DATA",
        column_list(columns)
    )
}

/// A chunk's rows into the staging table.
fn copy_sql(staging: &str, columns: &[String]) -> String {
    format!("COPY {staging} ({}) FROM STDIN", column_list(columns))
}

/// The target's rows replaced by the staging table's. `overriding`: the
/// target has a `GENERATED ALWAYS` identity column, into which the insert
/// writes the source's values (`OVERRIDING SYSTEM VALUE`), as apply does.
fn swap_sql(target: &str, staging: &str, columns: &[String], overriding: bool) -> [String; 2] {
    let cols = column_list(columns);
    let overriding = if overriding {
        "OVERRIDING SYSTEM VALUE "
    } else {
        ""
    };
    [
        format!("TRUNCATE {target}"),
        format!("INSERT INTO {target} ({cols}) {overriding}SELECT {cols} FROM {staging}"),
    ]
}

/// A join id as the bigint the tables keep.
fn db_id(seq: u64, id: u64) -> Result<i64, ApplyError> {
    i64::try_from(id).map_err(|_| ApplyError::Join {
        seq,
        message: format!("join id {id} is out of range"),
    })
}

impl Apply {
    /// Read the joins being loaded (a receiver restarted mid-join carries
    /// on), at session start.
    pub(super) async fn load_joins(&self, s: &mut Session) -> Result<(), ApplyError> {
        let what = "read the joins being loaded (pgcourier.joining)";
        let rows = s
            .client
            .query(
                "SELECT id, source_oid, target, columns, rows FROM pgcourier.joining",
                &[],
            )
            .await
            .map_err(target_err(what))?;
        let mut joins = Joins::default();
        for row in rows {
            let id: i64 = row.try_get(0).map_err(target_err(what))?;
            let oid: u32 = row.try_get(1).map_err(target_err(what))?;
            let rows: i64 = row.try_get(4).map_err(target_err(what))?;
            joins.tables.insert(
                oid,
                Loading {
                    id: id as u64,
                    target: row.try_get(2).map_err(target_err(what))?,
                    columns: row.try_get(3).map_err(target_err(what))?,
                    rows: rows as u64,
                },
            );
        }
        let what = "read the changes held for the joins (pgcourier.held)";
        for row in s
            .client
            .query("SELECT id, max(n) FROM pgcourier.held GROUP BY id", &[])
            .await
            .map_err(target_err(what))?
        {
            let id: i64 = row.try_get(0).map_err(target_err(what))?;
            joins
                .last_held
                .insert(id as u64, row.try_get(1).map_err(target_err(what))?);
        }
        if !joins.tables.is_empty() {
            tracing::info!(
                tables = joins.tables.len(),
                "tables joining: their changes are held until their rows are loaded"
            );
        }
        s.joins = joins;
        self.status.lock().expect("status lock").joining = s.joins.status();
        Ok(())
    }

    /// A join starts (CopyMeta `join = Some(id)`, its tables created when
    /// `create-tables` allows): a staging table and a `pgcourier.joining`
    /// row per table, and its changes held from here on.
    pub(super) async fn start_join(
        &self,
        s: &mut Session,
        seq: u64,
        id: u64,
        meta: &CopyMeta,
    ) -> Result<(), ApplyError> {
        let db = db_id(seq, id)?;
        self.drain(s).await?;
        let mut names = Vec::with_capacity(meta.tables.len());
        for t in &meta.tables {
            // The table apply writes this source table to (`mapping.rs`
            // maps the Relation's schema and name the same way).
            let target = t.quoted();
            let exists: bool = s
                .client
                .query_one("SELECT to_regclass($1::text) IS NOT NULL", &[&target])
                .await
                .and_then(|row| row.try_get(0))
                .map_err(target_err("look up a joining table on the target"))?;
            if !exists {
                return Err(ApplyError::MissingTable { table: target });
            }
            let staging = staging_name(id, t.oid);
            let columns: Vec<String> = t.columns.iter().map(|c| c.name.clone()).collect();
            s.client
                .batch_execute(&staging_sql(&staging, &target, &columns))
                .await
                .map_err(|e| ApplyError::Target {
                    what: format!("create staging table {staging} for joining table {target}"),
                    source: e.into(),
                })?;
            s.client
                .execute(
                    "INSERT INTO pgcourier.joining (id, source_oid, target, staging, columns) \
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&db, &t.oid, &target, &staging, &columns],
                )
                .await
                .map_err(target_err("record a joining table (pgcourier.joining)"))?;
            let earlier = s.joins.tables.insert(
                t.oid,
                Loading {
                    id,
                    target: target.clone(),
                    columns,
                    rows: 0,
                },
            );
            if let Some(earlier) = earlier {
                tracing::warn!(seq, join = id, earlier = earlier.id, table = %target, "a table joins again while an earlier join of it is still loading: its changes are held for the new join");
            }
            names.push(target);
        }
        tracing::info!(seq, join = id, cut = %meta.cut_lsn, tables = %names.join(", "), "join started: rows follow in chunks; changes to these tables are held until the join ends");
        Ok(())
    }

    /// Joins the sender abandoned: their staging tables dropped, their held
    /// changes and joining rows deleted. An unknown id changes nothing.
    pub(super) async fn abort_joins(
        &self,
        s: &mut Session,
        seq: u64,
        ids: &[u64],
    ) -> Result<(), ApplyError> {
        self.drain(s).await?;
        for &id in ids {
            let db = db_id(seq, id)?;
            if let Some(side) = s.joins.sides.remove(&id) {
                side.abandon("the join is aborted").await;
            }
            let what = "abort a join";
            let oids: Vec<u32> = s
                .client
                .query(
                    "SELECT source_oid FROM pgcourier.joining WHERE id = $1",
                    &[&db],
                )
                .await
                .map_err(target_err(what))?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()
                .map_err(target_err(what))?;
            for &oid in &oids {
                s.client
                    .batch_execute(&format!("DROP TABLE IF EXISTS {}", staging_name(id, oid)))
                    .await
                    .map_err(target_err("drop the staging table of an aborted join"))?;
            }
            let held = s
                .client
                .execute("DELETE FROM pgcourier.held WHERE id = $1", &[&db])
                .await
                .map_err(target_err(what))?;
            s.client
                .execute("DELETE FROM pgcourier.joining WHERE id = $1", &[&db])
                .await
                .map_err(target_err(what))?;
            s.joins.tables.retain(|_, t| t.id != id);
            s.joins.last_held.remove(&id);
            if oids.is_empty() && held == 0 {
                tracing::debug!(seq, join = id, "aborted join unknown here: nothing to drop");
            } else {
                tracing::info!(seq, join = id, tables = oids.len(), held_changes = held, "join aborted: its staging tables and held changes are dropped (a later copy holds their rows)");
            }
        }
        Ok(())
    }

    /// A `pgcourier.join` message: a chunk of rows, or the join's end.
    pub(super) async fn join_message(
        &self,
        s: &mut Session,
        seq: u64,
        content: &[u8],
    ) -> Result<(), ApplyError> {
        let (part, rows) = JoinPart::decode(content).map_err(|e| ApplyError::Join {
            seq,
            message: e.to_string(),
        })?;
        match part.kind {
            JoinKind::Rows => self.join_rows(s, seq, &part, rows).await,
            JoinKind::End => self.join_end(s, seq, &part).await,
        }
    }

    /// A chunk: its rows into the table's staging table.
    async fn join_rows(
        &self,
        s: &mut Session,
        seq: u64,
        part: &JoinPart,
        rows: &[u8],
    ) -> Result<(), ApplyError> {
        let Some(t) = s.joins.tables.get(&part.table).filter(|t| t.id == part.id) else {
            tracing::debug!(
                seq,
                join = part.id,
                table_oid = part.table,
                chunk = part.n,
                "rows of a join this branch is not loading: ignored"
            );
            return Ok(());
        };
        let sql = copy_sql(&staging_name(part.id, part.table), &t.columns);
        let target = t.target.clone();
        self.drain(s).await?;
        let data = bytes::Bytes::copy_from_slice(rows);
        let loaded = if rows.is_empty() {
            0
        } else {
            copy_in(&s.client, &sql, data.clone())
                .await
                .map_err(|e| ApplyError::Target {
                    what: format!(
                        "load chunk {} of join {} into the staging table of {target}",
                        part.n, part.id
                    ),
                    source: e.into(),
                })?
        };
        if loaded != part.rows {
            return Err(ApplyError::Join {
                seq,
                message: format!(
                    "chunk {} of join {} for {target} holds {loaded} rows, its header says {}",
                    part.n, part.id, part.rows
                ),
            });
        }
        s.client
            .execute(
                "UPDATE pgcourier.joining SET rows = rows + $3 WHERE id = $1 AND source_oid = $2",
                &[&db_id(seq, part.id)?, &part.table, &(loaded as i64)],
            )
            .await
            .map_err(target_err("count the rows of a join (pgcourier.joining)"))?;
        if let Some(t) = s.joins.tables.get_mut(&part.table) {
            t.rows += loaded;
        }
        self.side_stage(s, part.id, part.n, part.table, data, loaded);
        Ok(())
    }

    /// The join's end: each table replaced by its staging rows, the held
    /// changes replayed, the join's staging tables and rows dropped.
    async fn join_end(&self, s: &mut Session, seq: u64, part: &JoinPart) -> Result<(), ApplyError> {
        let started = Instant::now();
        let mut oids: Vec<u32> = s
            .joins
            .tables
            .iter()
            .filter(|(_, t)| t.id == part.id)
            .map(|(&oid, _)| oid)
            .collect();
        if oids.is_empty() {
            tracing::debug!(
                seq,
                join = part.id,
                "end of a join this branch is not loading: ignored"
            );
            return Ok(());
        }
        oids.sort_unstable();
        let rows: u64 = oids.iter().map(|oid| s.joins.tables[oid].rows).sum();
        if rows != part.rows {
            return Err(ApplyError::Join {
                seq,
                message: format!(
                    "join {} ended with {} rows sent in {} chunks, but its staging tables hold {rows}: a chunk is missing",
                    part.id, part.rows, part.n
                ),
            });
        }
        let db = db_id(seq, part.id)?;
        self.drain(s).await?;
        for &oid in &oids {
            self.resolve(s, seq, oid).await?;
        }
        // The fast path: the side transaction filled the tables; else (or
        // once it failed) the slow one, from staging (`join_side.rs`).
        let side = self.commit_side(s, part.id, part.n, &oids).await?;
        let mut names = Vec::with_capacity(oids.len());
        for &oid in &oids {
            let map = &s.targets[&oid];
            let (target, overriding) = (map.table.clone(), map.overriding);
            if !side {
                // Only the columns the table still has: one dropped by a
                // schema change while it loaded is left out (its held
                // changes no longer name it either).
                let present: Vec<String> = s
                    .client
                    .query(
                        "SELECT attname::text FROM pg_attribute \
                         WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
                        &[&target],
                    )
                    .await
                    .map_err(target_err("read the columns of a joining table"))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let columns: Vec<String> = s.joins.tables[&oid]
                    .columns
                    .iter()
                    .filter(|c| present.contains(c))
                    .cloned()
                    .collect();
                let staging = staging_name(part.id, oid);
                for sql in swap_sql(&target, &staging, &columns, overriding) {
                    s.client
                        .batch_execute(&sql)
                        .await
                        .map_err(|e| ApplyError::Target {
                            what: format!("replace {target} by the rows of join {}", part.id),
                            source: e.into(),
                        })?;
                }
            }
            self.note_table_extremes(s, oid).await?;
            names.push(target);
        }
        // From here on their changes are applied: the held ones first.
        for oid in &oids {
            s.joins.tables.remove(oid);
        }
        let replayed = self.replay_held(s, seq, part.id, &oids).await?;
        self.drain(s).await?;
        for &oid in &oids {
            s.client
                .batch_execute(&format!("DROP TABLE {}", staging_name(part.id, oid)))
                .await
                .map_err(target_err("drop the staging table of a loaded join"))?;
        }
        for sql in [
            "DELETE FROM pgcourier.held WHERE id = $1",
            "DELETE FROM pgcourier.joining WHERE id = $1",
        ] {
            s.client
                .execute(sql, &[&db])
                .await
                .map_err(target_err("delete the rows of a loaded join"))?;
        }
        s.joins.last_held.remove(&part.id);
        s.joins.loaded.push(Loaded {
            id: part.id,
            tables: names,
            rows,
            replayed,
            seconds: started.elapsed().as_secs_f64(),
            swap: if side {
                "side transaction"
            } else {
                "from staging"
            },
        });
        Ok(())
    }

    /// Replay join `id`'s held changes in arrival order through the
    /// ordinary path, `REPLAY_BATCH` at a time. A held Relation gives the
    /// changes after it their shape for the replay only: the tables'
    /// current Relations (`oids`) are restored after it (the inbox keeps
    /// the current ones throughout).
    async fn replay_held(
        &self,
        s: &mut Session,
        seq: u64,
        id: u64,
        oids: &[u32],
    ) -> Result<u64, ApplyError> {
        let db = db_id(seq, id)?;
        let current: Vec<Relation> = oids
            .iter()
            .filter_map(|oid| s.relations.get(oid).cloned())
            .collect();
        let what = "read the held changes of a join (pgcourier.held)";
        let mut last: i64 = 0;
        let mut replayed = 0;
        loop {
            let rows = s
                .client
                .query(
                    "SELECT n, message FROM pgcourier.held WHERE id = $1 AND n > $2 ORDER BY n LIMIT $3",
                    &[&db, &last, &REPLAY_BATCH],
                )
                .await
                .map_err(target_err(what))?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                last = row.try_get(0).map_err(target_err(what))?;
                let raw: Vec<u8> = row.try_get(1).map_err(target_err(what))?;
                let msg =
                    pgoutput::decode(&raw).map_err(|source| ApplyError::Decode { seq, source })?;
                match msg {
                    Message::Relation(rel) => {
                        self.flush_run(s).await?;
                        self.use_relation(s, rel);
                    }
                    msg => {
                        self.queue_row_message(s, seq, msg).await?;
                        replayed += 1;
                    }
                }
                if s.pipeline_full() {
                    self.drain(s).await?;
                }
            }
        }
        self.flush_run(s).await?;
        for rel in current {
            self.use_relation(s, rel);
        }
        Ok(replayed)
    }

    /// A row change message read live: held when it changes a loading
    /// table (a TRUNCATE: the part naming loading tables), queued
    /// otherwise. `raw`: the message as it arrived.
    pub(super) async fn queue_or_hold(
        &self,
        s: &mut Session,
        seq: u64,
        msg: Message,
        raw: &[u8],
    ) -> Result<(), ApplyError> {
        match &msg {
            Message::Insert { rel, .. }
            | Message::Update { rel, .. }
            | Message::Delete { rel, .. } => {
                if let Some(join) = s.joins.holding(*rel) {
                    if s.clock.take().is_some() {
                        tracing::debug!(seq, join, "a row clock before a change to a joining table is dropped (two-way tables joining mid-run are not supported)");
                    }
                    return self.hold(s, seq, join, raw.to_vec());
                }
            }
            Message::Truncate {
                cascade,
                restart_identity,
                rels,
            } => {
                let (now, held) = split_truncate(rels, |oid| s.joins.holding(oid));
                if !held.is_empty() {
                    let (cascade, restart_identity) = (*cascade, *restart_identity);
                    for (join, rels) in held {
                        let part = pgoutput::encode(&Message::Truncate {
                            cascade,
                            restart_identity,
                            rels,
                        });
                        self.hold(s, seq, join, part)?;
                    }
                    if now.is_empty() {
                        return Ok(());
                    }
                    let msg = Message::Truncate {
                        cascade,
                        restart_identity,
                        rels: now,
                    };
                    return self.queue_row_message(s, seq, msg).await;
                }
            }
            _ => {}
        }
        self.queue_row_message(s, seq, msg).await
    }

    /// A Relation message of a loading table is held too (it is also
    /// remembered as any): the held changes after it replay with its shape.
    pub(super) fn hold_relation(
        &self,
        s: &mut Session,
        seq: u64,
        oid: u32,
        raw: &[u8],
    ) -> Result<(), ApplyError> {
        match s.joins.holding(oid) {
            Some(join) => self.hold(s, seq, join, raw.to_vec()),
            None => Ok(()),
        }
    }

    /// Queue a message for `pgcourier.held` as join `join`'s next.
    fn hold(
        &self,
        s: &mut Session,
        seq: u64,
        join: u64,
        message: Vec<u8>,
    ) -> Result<(), ApplyError> {
        let db = db_id(seq, join)?;
        let last = s.joins.last_held.entry(join).or_insert(0);
        *last += 1;
        s.pending_bytes += message.len();
        s.joins.queued.push((db, *last, message));
        Ok(())
    }

    /// Send the held changes queued, as one statement (called by `drain`).
    pub(super) async fn flush_held(&self, s: &mut Session) -> Result<(), ApplyError> {
        if s.joins.queued.is_empty() {
            return Ok(());
        }
        let queued = std::mem::take(&mut s.joins.queued);
        let mut ids = Vec::with_capacity(queued.len());
        let mut ns = Vec::with_capacity(queued.len());
        let mut messages = Vec::with_capacity(queued.len());
        for (id, n, m) in queued {
            ids.push(id);
            ns.push(n);
            messages.push(m);
        }
        s.client
            .execute(
                "INSERT INTO pgcourier.held (id, n, message) \
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::bytea[])",
                &[&ids, &ns, &messages],
            )
            .await
            .map_err(target_err(
                "hold changes to joining tables (insert into pgcourier.held)",
            ))?;
        Ok(())
    }

    /// After a commit: log the joins it loaded.
    pub(super) fn log_loaded_joins(&self, s: &mut Session) {
        for j in s.joins.loaded.drain(..) {
            tracing::info!(
                join = j.id,
                tables = %j.tables.join(", "),
                rows = j.rows,
                held_changes_replayed = j.replayed,
                seconds = j.seconds,
                swap = j.swap,
                "join loaded and committed: the tables are replaced by their rows and their held changes applied"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncate_is_split_between_tables_applied_and_tables_held_per_join() {
        let holding = |oid| match oid {
            10 | 12 => Some(1),
            13 => Some(2),
            _ => None,
        };
        let (now, held) = split_truncate(&[11, 12, 13, 10, 14], holding);
        assert_eq!(now, vec![11, 14]);
        assert_eq!(
            held.into_iter().collect::<Vec<_>>(),
            vec![(1, vec![12, 10]), (2, vec![13])]
        );
        let (now, held) = split_truncate(&[11], holding);
        assert_eq!((now, held.is_empty()), (vec![11], true));
    }

    #[test]
    fn only_an_insert_to_a_loading_table_is_kept_from_the_large_path() {
        let mut joins = Joins::default();
        joins.tables.insert(
            0x4001,
            Loading {
                id: 3,
                target: "\"s\".\"t\"".into(),
                columns: vec!["a".into()],
                rows: 0,
            },
        );
        assert!(joins.holds_insert(&[b'I', 0, 0, 0x40, 0x01, b'N', 0, 1]));
        assert!(!joins.holds_insert(&[b'I', 0, 0, 0x40, 0x02, b'N', 0, 1]));
        // A logical message (a join chunk) is never an insert.
        assert!(!joins.holds_insert(&[b'M', 0, 0, 0x40, 0x01]));
        assert!(!joins.holds_insert(&[b'I', 0, 0]));
        assert_eq!(joins.holding(0x4001), Some(3));
        assert_eq!(joins.holding(0x4002), None);
    }

    #[test]
    fn join_statements_quote_every_identifier() {
        let staging = staging_name(7, 16384);
        assert_eq!(staging, "pgcourier.\"join_7_16384\"");
        let columns = vec!["id".to_owned(), "Note \"x\"".to_owned()];
        assert_eq!(
            staging_sql(&staging, "\"s\".\"t\"", &columns),
            "CREATE TABLE pgcourier.\"join_7_16384\" AS SELECT \"id\", \"Note \"\"x\"\"\" \
             FROM \"s\".\"t\" WITH NO DATA"
        );
        assert_eq!(
            copy_sql(&staging, &columns),
            "COPY pgcourier.\"join_7_16384\" (\"id\", \"Note \"\"x\"\"\") FROM STDIN"
        );
        let [truncate, insert] = swap_sql("\"s\".\"t\"", &staging, &columns, false);
        assert_eq!(truncate, "TRUNCATE \"s\".\"t\"");
        assert_eq!(
            insert,
            "INSERT INTO \"s\".\"t\" (\"id\", \"Note \"\"x\"\"\") \
             SELECT \"id\", \"Note \"\"x\"\"\" FROM pgcourier.\"join_7_16384\""
        );
        let [_, insert] = swap_sql("\"s\".\"t\"", &staging, &columns, true);
        assert!(
            insert.starts_with("INSERT INTO \"s\".\"t\" (\"id\", \"Note \"\"x\"\"\") OVERRIDING SYSTEM VALUE SELECT"),
            "{insert}"
        );
    }

    #[test]
    fn the_status_lists_loading_tables_by_join_then_name() {
        let mut joins = Joins::default();
        for (oid, id, name) in [(1, 2, "b"), (2, 1, "z"), (3, 2, "a")] {
            joins.tables.insert(
                oid,
                Loading {
                    id,
                    target: name.into(),
                    columns: Vec::new(),
                    rows: u64::from(oid),
                },
            );
        }
        let st: Vec<(u64, String)> = joins
            .status()
            .into_iter()
            .map(|t| (t.join, t.table))
            .collect();
        assert_eq!(st, vec![(1, "z".into()), (2, "a".into()), (2, "b".into())]);
    }
}
