//! What is copied: the publication's tables, and their definitions read in
//! the cut's snapshot (the copy's metadata and one Relation per table).
//!
//! Only what the publication publishes: a PostgreSQL 15 column list leaves
//! columns out of the definitions (and so of the rows, read.rs, and of the
//! branch's CREATE TABLE), as pgoutput leaves them out of the live stream;
//! a row filter is applied by the readers. Only the configured publication
//! counts, whatever other publications the table is in.

use pgcourier_common::pg::quote_ident;
use pgcourier_common::store::seed_file::{CopyColumn, CopyMeta, CopyTable};
use pgcourier_proto::cutter::OWN_SCHEMA;
use pgcourier_proto::pgoutput::{Column, Relation, ReplicaIdentity};
use tokio_postgres::Client;

use super::{CopyError, Cut};
use crate::config::SenderConfig;
use crate::source::SourceError;

/// The OIDs of the tables in the publication now that this sender ships
/// (`SenderConfig::ships`), but for pgcourier's own (schema `pgcourier`:
/// the DDL key, which `FOR ALL TABLES` publishes), which are never copied,
/// as capture never carries them.
pub async fn published_tables(
    client: &Client,
    cfg: &SenderConfig,
) -> Result<Vec<u32>, SourceError> {
    let publication = &cfg.publication;
    let rows = client
        .query(
            "SELECT c.oid, p.schemaname::text || '.' || p.tablename::text FROM pg_publication_tables p \
             JOIN pg_namespace n ON n.nspname = p.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
             WHERE p.pubname = $1 AND p.schemaname <> $2 ORDER BY 1",
            &[&publication, &OWN_SCHEMA],
        )
        .await
        .map_err(|e| SourceError::query("list the publication's tables", e))?;
    Ok(rows
        .iter()
        .filter(|r| cfg.ships(r.get(1)))
        .map(|r| r.get(0))
        .collect())
}

/// What a publication publishes of one table (`pg_publication_tables`):
/// its columns (every column when it has no column list) and its row
/// filter, the text of a boolean SQL expression on the table's columns.
pub(super) struct Published {
    pub columns: Vec<String>,
    pub row_filter: Option<String>,
}

/// What `publication` publishes of table `oid`, as seen now by `client`;
/// `None` when the table is not in it.
pub(super) async fn published(
    client: &Client,
    publication: &str,
    oid: u32,
) -> Result<Option<Published>, SourceError> {
    let row = client
        .query_opt(
            "SELECT p.attnames::text[], p.rowfilter FROM pg_publication_tables p \
             JOIN pg_namespace n ON n.nspname = p.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
             WHERE p.pubname = $1 AND c.oid = $2 AND p.schemaname <> $3",
            &[&publication, &oid, &OWN_SCHEMA],
        )
        .await
        .map_err(|e| SourceError::query("read what the publication publishes of a table", e))?;
    let Some(row) = row else { return Ok(None) };
    // PostgreSQL 15 lists every column when there is no column list; a NULL
    // would copy a table with no columns, so it is refused, never read as
    // an empty list.
    let columns: Option<Vec<String>> = row.get(0);
    let columns = columns.ok_or_else(|| SourceError::Catalog {
        what: format!(
            "no published columns (pg_publication_tables.attnames is NULL) for table oid {oid} in publication {publication}"
        ),
    })?;
    Ok(Some(Published {
        columns,
        row_filter: row.get(1),
    }))
}

pub(super) async fn quoted_names(
    client: &Client,
    oids: &[u32],
) -> Result<Vec<String>, SourceError> {
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
        .map(|r| format!("{}.{}", quote_ident(r.get(0)), quote_ident(r.get(1))))
        .collect())
}

/// The definitions of the tables to copy, read in the cut's snapshot, as
/// the copy's metadata and one pgoutput Relation message per table.
pub async fn describe(
    cut: &Cut,
    oids: &[u32],
    reason: &str,
) -> Result<(CopyMeta, Vec<Relation>), CopyError> {
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
        let Some(publishes) = published(&cut.client, &cut.publication, oid).await? else {
            // Left the publication since it was listed: nothing to copy.
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
        // Only the published columns, in table order (pgoutput's order).
        let cols: Vec<_> = cols
            .into_iter()
            .filter(|c| publishes.columns.iter().any(|p| p == c.get::<_, &str>(0)))
            .collect();
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
        let mut primary_key: Vec<String> = pk.iter().map(|r| r.get(0)).collect();
        if !primary_key.iter().all(|k| publishes.columns.contains(k)) {
            // A key on columns the branch does not get would be a different
            // (or impossible) constraint: the branch's table has none.
            primary_key.clear();
        }
        let replica_identity = match ident.as_str() {
            "d" => ReplicaIdentity::Default,
            "n" => ReplicaIdentity::Nothing,
            "f" => ReplicaIdentity::Full,
            "i" => ReplicaIdentity::Index,
            _ => {
                return Err(CopyError::ReplicaIdentity {
                    table: format!("{}.{}", quote_ident(t.get(0)), quote_ident(t.get(1))),
                    value: ident,
                })
            }
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
            primary_key,
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
            join: None,
            aborts: Vec::new(),
        },
        relations,
    ))
}
