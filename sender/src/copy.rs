//! Initial copy: a consistent cut of the source, and the copy transaction
//! read under it.
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
//! on from L. See `common/src/copy.rs` for the transaction's layout.

use std::time::{Duration, Instant};

use futures_util::{pin_mut, TryStreamExt};
use pgcourier_common::store::seed_file::{CopyColumn, CopyMeta, CopyTable};
use pgcourier_proto::pgoutput::{self, Column, Message, Relation, ReplicaIdentity, Value};
use pgcourier_proto::Lsn;
use tokio_postgres::Client;

use crate::source::{self, SourceError};

/// A consistent cut: the snapshot stays open in `client` until dropped.
pub struct Cut {
    pub lsn: Lsn,
    pub client: Client,
}

/// The OIDs of the tables in the publication now.
pub async fn published_tables(client: &Client, publication: &str) -> Result<Vec<u32>, SourceError> {
    let rows = client
        .query(
            "SELECT c.oid FROM pg_publication_tables p \
             JOIN pg_namespace n ON n.nspname = p.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
             WHERE p.pubname = $1 ORDER BY 1",
            &[&publication],
        )
        .await
        .map_err(|e| SourceError::query("list the publication's tables", e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn quoted_names(client: &Client, oids: &[u32]) -> Result<Vec<String>, SourceError> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY($1) ORDER BY c.oid",
            &[&oids],
        )
        .await
        .map_err(|e| SourceError::query("look up the tables to copy", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            format!(
                "{}.{}",
                pgcourier_common::pg::quote_ident(r.get(0)),
                pgcourier_common::pg::quote_ident(r.get(1))
            )
        })
        .collect())
}

/// Take a cut over `oids` (see the module documentation). Waits for the
/// tables' current writers; gives up after `lock_wait` so the caller can
/// retry without holding writers back for long.
pub async fn take_cut(
    cfg: &tokio_postgres::Config,
    oids: &[u32],
    lock_wait: Duration,
) -> Result<Cut, SourceError> {
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
    let lsn: Lsn = row
        .get::<_, String>(0)
        .parse()
        .map_err(|_| SourceError::NotReady("server returned an invalid LSN".into()))?;
    Ok(Cut { lsn, client: snap })
}

/// A lock timeout: the tables' writers did not finish in time.
pub fn is_lock_timeout(e: &SourceError) -> bool {
    matches!(e, SourceError::Query { source, .. }
        if source.code().map(|c| c.code()) == Some("55P03"))
}

/// The definitions of the tables to copy, read in the cut's snapshot, as
/// the copy's metadata and one pgoutput Relation message per table.
pub async fn describe(
    cut: &Cut,
    oids: &[u32],
    reason: &str,
) -> Result<(CopyMeta, Vec<Relation>), SourceError> {
    let mut tables = Vec::new();
    let mut relations = Vec::new();
    for &oid in oids {
        let Some(t) = cut
            .client
            .query_opt(
                "SELECT n.nspname::text, c.relname::text, c.relreplident::text, \
                        greatest(c.reltuples, 0)::int8, pg_table_size(c.oid) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
                &[&oid],
            )
            .await
            .map_err(|e| SourceError::query("read a table to copy", e))?
        else {
            // Dropped since it was listed: nothing to copy.
            continue;
        };
        let ident: String = t.get(2);
        let cols = cut
            .client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                        a.atttypid, a.atttypmod, \
                        coalesce(a.attnum = ANY ((SELECT i.indkey FROM pg_index i \
                            WHERE i.indrelid = a.attrelid AND i.indisprimary)::int2[]), false), \
                        coalesce(a.attnum = ANY ((SELECT i.indkey FROM pg_index i \
                            WHERE i.indrelid = a.attrelid AND i.indisreplident)::int2[]), false) \
                 FROM pg_attribute a \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
                 ORDER BY a.attnum",
                &[&oid],
            )
            .await
            .map_err(|e| SourceError::query("read the columns of a table to copy", e))?;
        let pk = cut
            .client
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord) \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
                &[&oid],
            )
            .await
            .map_err(|e| SourceError::query("read the primary key of a table to copy", e))?;
        let replica_identity = match ident.as_str() {
            "n" => ReplicaIdentity::Nothing,
            "f" => ReplicaIdentity::Full,
            "i" => ReplicaIdentity::Index,
            _ => ReplicaIdentity::Default,
        };
        let relation = Relation {
            oid,
            schema: t.get(0),
            name: t.get(1),
            replica_identity,
            columns: cols
                .iter()
                .map(|c| Column {
                    key: match replica_identity {
                        ReplicaIdentity::Full => true,
                        ReplicaIdentity::Default => c.get(5),
                        ReplicaIdentity::Index => c.get(6),
                        ReplicaIdentity::Nothing => false,
                    },
                    name: c.get(0),
                    type_oid: c.get(3),
                    type_modifier: c.get(4),
                })
                .collect(),
        };
        tables.push(CopyTable {
            oid,
            schema: t.get(0),
            name: t.get(1),
            columns: cols
                .iter()
                .map(|c| CopyColumn {
                    name: c.get(0),
                    type_sql: c.get(1),
                    not_null: c.get(2),
                })
                .collect(),
            primary_key: pk.iter().map(|r| r.get(0)).collect(),
            rows_estimate: u64::try_from(t.get::<_, i64>(3)).unwrap_or(0),
            bytes_estimate: u64::try_from(t.get::<_, i64>(4)).unwrap_or(0),
        });
        relations.push(relation);
    }
    Ok((
        CopyMeta {
            cut_lsn: cut.lsn,
            reason: reason.to_owned(),
            tables,
        },
        relations,
    ))
}

/// Progress of one table's copy, for logs and status.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TableProgress {
    pub table: String,
    pub rows: u64,
    pub bytes: u64,
    pub rows_estimate: u64,
    pub bytes_estimate: u64,
    pub done: bool,
}

/// Progress of the copy being read, shared with status.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CopyProgress {
    pub reason: String,
    pub cut_lsn: String,
    pub started_unix: i64,
    pub elapsed_seconds: f64,
    pub rows: u64,
    pub bytes: u64,
    pub rows_per_second: f64,
    pub eta_seconds: Option<f64>,
    pub tables: Vec<TableProgress>,
}

impl CopyProgress {
    pub fn new(meta: &CopyMeta) -> CopyProgress {
        CopyProgress {
            reason: meta.reason.clone(),
            cut_lsn: meta.cut_lsn.to_string(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            tables: meta
                .tables
                .iter()
                .map(|t| TableProgress {
                    table: t.quoted(),
                    rows_estimate: t.rows_estimate,
                    bytes_estimate: t.bytes_estimate,
                    ..TableProgress::default()
                })
                .collect(),
            ..CopyProgress::default()
        }
    }

    fn update(&mut self, started: Instant) {
        self.elapsed_seconds = started.elapsed().as_secs_f64();
        self.rows = self.tables.iter().map(|t| t.rows).sum();
        self.bytes = self.tables.iter().map(|t| t.bytes).sum();
        self.rows_per_second = if self.elapsed_seconds > 0.0 {
            self.rows as f64 / self.elapsed_seconds
        } else {
            0.0
        };
        let left: u64 = self
            .tables
            .iter()
            .filter(|t| !t.done)
            .map(|t| t.rows_estimate.saturating_sub(t.rows))
            .sum();
        self.eta_seconds = (self.rows_per_second > 0.0).then(|| left as f64 / self.rows_per_second);
    }
}

/// A slice of one table's rows, as pgoutput Insert messages.
struct Chunk {
    table: usize,
    messages: Vec<Vec<u8>>,
    bytes: u64,
    done: bool,
}

/// A chunk is handed over at this many bytes of messages.
const CHUNK_BYTES: u64 = 64 * 1024;

/// The SELECT that reads a table's rows as text, columns in Relation order.
async fn select_sql(client: &Client, table: &CopyTable) -> Result<String, SourceError> {
    let relkind: String = client
        .query_one(
            "SELECT relkind::text FROM pg_class WHERE oid = $1",
            &[&table.oid],
        )
        .await
        .map_err(|e| SourceError::query("read a table to copy", e))?
        .get(0);
    let cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| format!("{}::text", pgcourier_common::pg::quote_ident(&c.name)))
        .collect();
    Ok(format!(
        "SELECT {} FROM {}{}",
        if cols.is_empty() {
            "NULL::text".to_owned()
        } else {
            cols.join(", ")
        },
        if relkind == "p" { "" } else { "ONLY " },
        table.quoted()
    ))
}

/// One reader: its own connection in the cut's exported snapshot; takes
/// the next table not yet taken until none is left.
async fn reader(
    cfg: tokio_postgres::Config,
    snapshot: String,
    tables: std::sync::Arc<Vec<CopyTable>>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tx: tokio::sync::mpsc::Sender<Chunk>,
) -> Result<(), SourceError> {
    let client = source::connect(&cfg).await?;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{snapshot}'"
        ))
        .await
        .map_err(|e| SourceError::query("join the copy snapshot", e))?;
    tracing::info!(%snapshot, "copy reader joined the snapshot");
    loop {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(table) = tables.get(i) else {
            return Ok(());
        };
        let sql = select_sql(&client, table).await?;
        let stream = client
            .query_raw(
                &sql,
                std::iter::empty::<&(dyn tokio_postgres::types::ToSql + Sync)>(),
            )
            .await
            .map_err(|e| SourceError::query("read rows to copy", e))?;
        pin_mut!(stream);
        let mut chunk = Chunk {
            table: i,
            messages: Vec::new(),
            bytes: 0,
            done: false,
        };
        while let Some(row) = stream
            .try_next()
            .await
            .map_err(|e| SourceError::query("read rows to copy", e))?
        {
            let new: Vec<Value> = (0..table.columns.len())
                .map(|c| match row.get::<_, Option<String>>(c) {
                    Some(t) => Value::Text(t),
                    None => Value::Null,
                })
                .collect();
            let msg = pgoutput::encode(&Message::Insert {
                rel: table.oid,
                new,
            });
            chunk.bytes += msg.len() as u64;
            chunk.messages.push(msg);
            if chunk.bytes >= CHUNK_BYTES {
                let full = std::mem::replace(
                    &mut chunk,
                    Chunk {
                        table: i,
                        messages: Vec::new(),
                        bytes: 0,
                        done: false,
                    },
                );
                if tx.send(full).await.is_err() {
                    return Ok(()); // the copy was abandoned
                }
            }
        }
        chunk.done = true;
        if tx.send(chunk).await.is_err() {
            return Ok(());
        }
    }
}

/// Stream every row of the described tables, in the cut's snapshot, as
/// pgoutput Insert messages handed to `emit`: `workers` connections read
/// tables side by side (each joins the snapshot the cut exported), and their
/// rows interleave in the copy a chunk (64 KiB) at a time. Memory is bounded
/// by the chunks in the channel. Updates `status` and logs every few seconds.
pub async fn read_rows(
    cfg: &tokio_postgres::Config,
    workers: usize,
    cut: &Cut,
    meta: &CopyMeta,
    status: &std::sync::Mutex<crate::capture::CaptureStatus>,
    mut emit: impl FnMut(Vec<u8>) -> Result<(), crate::capture::CaptureError>,
) -> Result<(), crate::capture::CaptureError> {
    let started = Instant::now();
    let mut logged = Instant::now();
    let snapshot: String = cut
        .client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .map_err(|e| SourceError::query("export the copy snapshot", e))?
        .get(0);
    if !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(SourceError::NotReady(format!("unexpected snapshot name {snapshot:?}")).into());
    }
    let tables = std::sync::Arc::new(meta.tables.clone());
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers = workers.clamp(1, tables.len().max(1));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(4 * workers);
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..workers {
        readers.spawn(reader(
            cfg.clone(),
            snapshot.clone(),
            tables.clone(),
            next.clone(),
            tx.clone(),
        ));
    }
    drop(tx);
    let mut rows = vec![0u64; tables.len()];
    let mut bytes = vec![0u64; tables.len()];
    while let Some(chunk) = rx.recv().await {
        let i = chunk.table;
        rows[i] += chunk.messages.len() as u64;
        bytes[i] += chunk.bytes;
        for msg in chunk.messages {
            emit(msg)?;
        }
        let mut st = status.lock().expect("status lock");
        if let Some(p) = st.copy.as_mut() {
            p.tables[i].rows = rows[i];
            p.tables[i].bytes = bytes[i];
            p.tables[i].done = chunk.done;
            p.update(started);
            if logged.elapsed() >= Duration::from_secs(5) {
                logged = Instant::now();
                tracing::info!(
                    rows = p.rows,
                    mb = p.bytes / 1_000_000,
                    rows_per_second = p.rows_per_second as u64,
                    eta_seconds = p.eta_seconds.map(|s| s as u64),
                    "copying"
                );
            }
        }
        drop(st);
        if chunk.done {
            tracing::info!(table = %tables[i].quoted(), rows = rows[i], mb = bytes[i] / 1_000_000, "table copied");
        }
    }
    while let Some(joined) = readers.join_next().await {
        joined.map_err(|e| SourceError::NotReady(format!("a copy reader failed: {e}")))??;
    }
    Ok(())
}
