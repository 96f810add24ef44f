//! The read: `copy-workers` connections join the cut's exported snapshot
//! and stream the tables' rows as pgoutput Insert messages, a table at a
//! time each, their rows interleaved 64 KiB at a time. Only the published
//! columns (describe.rs) of the rows the publication's row filter lets
//! through.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::{pin_mut, TryStreamExt};
use pgcourier_common::pg::quote_ident;
use pgcourier_common::store::seed_file::CopyTable;
use pgcourier_proto::pgoutput::{self, Message, Value};
use tokio_postgres::Client;

use super::describe::{published, Published};
use super::{CopyError, Cut};
use crate::source::{self, SourceError};

/// Rows of one table, as pgoutput Insert messages, in the order read.
#[derive(Debug)]
pub struct Rows {
    /// Index of the table in the list given to [`read_rows`].
    pub table: usize,
    pub messages: Vec<Vec<u8>>,
    /// Bytes of `messages`.
    pub bytes: u64,
    /// The table's last rows.
    pub done: bool,
}

impl Rows {
    fn empty(table: usize) -> Rows {
        Rows {
            table,
            messages: Vec::new(),
            bytes: 0,
            done: false,
        }
    }
}

/// Rows are handed over at this many bytes of messages.
const CHUNK_BYTES: u64 = 64 * 1024;

/// Stream every row of `tables`, read in the cut's snapshot, to `take`:
/// `workers` connections read tables side by side (each joins the snapshot
/// the cut exported). Memory is bounded by the chunks in the channel. The
/// readers are tracked in a `JoinSet`: an error from `take` ends them all.
pub async fn read_rows<E: From<CopyError>>(
    cfg: &pgcourier_common::pg::connect::PgConnect,
    workers: usize,
    cut: &Cut,
    tables: &[CopyTable],
    mut take: impl FnMut(Rows) -> Result<(), E>,
) -> Result<(), E> {
    let snapshot = cut.export_snapshot().await?;
    let tables = Arc::new(tables.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let workers = workers.clamp(1, tables.len().max(1));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Rows>(4 * workers);
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..workers {
        readers.spawn(reader(
            cfg.clone(),
            snapshot.clone(),
            cut.publication.clone(),
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
        let done = chunk.done;
        take(chunk)?;
        if done {
            tracing::info!(table = %tables[i].quoted(), rows = rows[i], mb = bytes[i] / 1_000_000, "table copied");
        }
    }
    while let Some(joined) = readers.join_next().await {
        joined
            .map_err(CopyError::Reader)?
            .map_err(CopyError::from)?;
    }
    Ok(())
}

/// The SELECT that reads a table's rows as text, columns in Relation order
/// (the published columns: describe.rs), rows as the publication's row
/// filter lets through. The filter's text comes from the source's catalog
/// and is inserted parenthesised, as PostgreSQL's own tablesync does.
async fn select_sql(
    client: &Client,
    publication: &str,
    table: &CopyTable,
) -> Result<String, SourceError> {
    let relkind: String = client
        .query_one(
            "SELECT relkind::text FROM pg_class WHERE oid = $1",
            &[&table.oid],
        )
        .await
        .map_err(|e| SourceError::query("read a table to copy", e))?
        .get(0);
    let filter = match published(client, publication, table.oid).await? {
        Some(Published {
            row_filter: Some(f),
            ..
        }) => format!(" WHERE ({f})"),
        Some(Published {
            row_filter: None, ..
        }) => String::new(),
        // Left the publication in this snapshot: it publishes no row.
        None => " WHERE false".to_owned(),
    };
    let cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| format!("{}::text", quote_ident(&c.name)))
        .collect();
    Ok(format!(
        "SELECT {} FROM {}{}{filter}",
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
/// the next table not yet taken until none is left. Stops quietly when
/// the copy was abandoned (the receiving end is gone).
async fn reader(
    cfg: pgcourier_common::pg::connect::PgConnect,
    snapshot: String,
    publication: String,
    tables: Arc<Vec<CopyTable>>,
    next: Arc<AtomicUsize>,
    tx: tokio::sync::mpsc::Sender<Rows>,
) -> Result<(), SourceError> {
    let client = source::connect(&cfg).await?;
    let read = read_tables(&client, &snapshot, &publication, &tables, &next, &tx).await;
    client.close().await;
    read
}

async fn read_tables(
    client: &Client,
    snapshot: &str,
    publication: &str,
    tables: &[CopyTable],
    next: &AtomicUsize,
    tx: &tokio::sync::mpsc::Sender<Rows>,
) -> Result<(), SourceError> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{snapshot}'"
        ))
        .await
        .map_err(|e| SourceError::query("join the copy snapshot", e))?;
    tracing::info!(%snapshot, "copy reader joined the snapshot");
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(table) = tables.get(i) else {
            return Ok(());
        };
        let sql = select_sql(client, publication, table).await?;
        let stream = client
            .query_raw(
                &sql,
                std::iter::empty::<&(dyn tokio_postgres::types::ToSql + Sync)>(),
            )
            .await
            .map_err(|e| SourceError::query("read rows to copy", e))?;
        pin_mut!(stream);
        let mut chunk = Rows::empty(i);
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
                let full = std::mem::replace(&mut chunk, Rows::empty(i));
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

/// A chunk of a join is cut once its rows reach this many bytes.
pub const JOIN_CHUNK_BYTES: usize = 64 * 1024;

/// What the join reader hands to capture: a chunk or the end, as the
/// `pgcourier.join` message to splice, and the rows it holds.
#[derive(Debug)]
pub struct JoinChunk {
    pub message: Vec<u8>,
    /// Index of the table in the join's list, its rows in this chunk, and
    /// their bytes (`None` for the end).
    pub table: Option<(usize, u64, u64)>,
    pub end: bool,
}

/// Read the tables of join `id` in the cut's own snapshot, a table at a
/// time (`COPY (SELECT ..) TO STDOUT`: the published columns, as the
/// publication's row filter lets through), and send them to `tx` in
/// chunks of [`JOIN_CHUNK_BYTES`], then the end. The channel is bounded:
/// reading waits for capture to splice, so memory holds a few chunks
/// whatever the table's size. Stops quietly when capture dropped the
/// join (the receiving end is gone). The cut is closed at the end.
pub async fn read_join(
    cut: Cut,
    id: u64,
    tables: Vec<CopyTable>,
    tx: tokio::sync::mpsc::Sender<Result<JoinChunk, CopyError>>,
) {
    let result = read_join_tables(&cut, id, &tables, &tx).await;
    cut.close().await;
    if let Err(e) = result {
        // Capture may be gone already: nothing else to tell.
        let _ = tx.send(Err(e)).await;
    }
}

async fn read_join_tables(
    cut: &Cut,
    id: u64,
    tables: &[CopyTable],
    tx: &tokio::sync::mpsc::Sender<Result<JoinChunk, CopyError>>,
) -> Result<(), CopyError> {
    use pgcourier_common::store::join::{JoinKind, JoinPart, JOIN_PREFIX};
    let message = |part: JoinPart, rows: &[u8]| {
        pgoutput::encode(&Message::LogicalMessage {
            transactional: true,
            lsn: cut.lsn,
            prefix: JOIN_PREFIX.into(),
            content: part.encode(rows),
        })
    };
    let (mut n, mut total) = (0u64, 0u64);
    for (i, table) in tables.iter().enumerate() {
        let sql = format!(
            "COPY ({}) TO STDOUT",
            select_sql(&cut.client, &cut.publication, table).await?
        );
        let stream = cut
            .client
            .copy_out(sql.as_str())
            .await
            .map_err(|e| SourceError::query("read rows of a joining table", e))?;
        pin_mut!(stream);
        let mut buf = Vec::with_capacity(JOIN_CHUNK_BYTES + 1024);
        let mut rows = 0u64;
        loop {
            let next = stream
                .try_next()
                .await
                .map_err(|e| SourceError::query("read rows of a joining table", e))?;
            let done = next.is_none();
            if let Some(data) = next {
                // COPY sends a row per CopyData, each ending in a newline
                // (one inside a value is escaped).
                rows += data.iter().filter(|&&b| b == b'\n').count() as u64;
                buf.extend_from_slice(&data);
            }
            if buf.len() >= JOIN_CHUNK_BYTES || (done && !buf.is_empty()) {
                n += 1;
                total += rows;
                let part = JoinPart {
                    id,
                    kind: JoinKind::Rows,
                    table: table.oid,
                    n,
                    rows,
                };
                let chunk = JoinChunk {
                    message: message(part, &buf),
                    table: Some((i, rows, buf.len() as u64)),
                    end: false,
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return Ok(());
                }
                buf.clear();
                rows = 0;
            }
            if done {
                break;
            }
        }
    }
    let end = JoinPart {
        id,
        kind: JoinKind::End,
        table: 0,
        n,
        rows: total,
    };
    let _ = tx
        .send(Ok(JoinChunk {
            message: message(end, &[]),
            table: None,
            end: true,
        }))
        .await;
    Ok(())
}
