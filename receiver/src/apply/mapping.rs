//! Source relation → target table, by name, never by OID (OIDs differ
//! between clusters): each source column must exist on the target (its type
//! there is what values are cast to), and the row is identified by the
//! target's primary key or, without one, by the source's replica identity.
//! Relations learnt from the stream are kept in the inbox for the next
//! session; mappings, with the sequences that feed the target's columns
//! (`sequences.rs`), are cached per session and dropped when a Relation
//! changes or a schema change runs.

use pgcourier_common::pg::quote_ident;
use pgcourier_proto::pgoutput::{self, Message, Relation, ReplicaIdentity};
use pgcourier_proto::record::{Piece, Record};

use super::error::{target_err, ApplyError};
use super::sequences::SeqColumn;
use super::{Apply, Session};

/// The target table a source relation maps to, resolved by name.
pub(super) struct TableMap {
    /// `"schema"."table"`
    pub(super) table: String,
    /// Per source column: quoted target column name and its type for casts.
    pub(super) columns: Vec<(String, String)>,
    /// Source column indexes that identify a row on the target.
    pub(super) key: Vec<usize>,
    /// `key` is the target's primary key (compare with `=`); otherwise the
    /// whole-row identity compared as text.
    pub(super) key_is_pk: bool,
    /// Runs of updates and deletes may go as one set-based statement
    /// (`pipeline.rs`): `key` is the primary key, and no other unique or
    /// exclusion index and no user trigger (on the table or a partition)
    /// could tell in which order the rows of one statement were changed.
    pub(super) set_based: bool,
    /// The target has a `GENERATED ALWAYS` identity column: an `INSERT`
    /// says `OVERRIDING SYSTEM VALUE` to write the source's value (COPY
    /// writes it regardless).
    pub(super) overriding: bool,
    /// Per source column: the target's is a `GENERATED ALWAYS` identity
    /// column, which an `UPDATE` may set to `DEFAULT` only (`sql.rs`).
    pub(super) always: Vec<bool>,
    /// The columns a sequence feeds at the target (`sequences.rs`).
    pub(super) sequences: Vec<SeqColumn>,
    /// Written at several sites (registered in `pgcourier.two_way`): each
    /// change goes through `pgcourier.apply_change` with its row clock
    /// (`two_way.rs`).
    pub(super) two_way: bool,
}

impl TableMap {
    /// A change to this table carries one value per column of its Relation
    /// message: one that does not does not follow it.
    pub(super) fn check_columns(&self, seq: u64, columns: usize) -> Result<(), ApplyError> {
        if columns == self.columns.len() {
            return Ok(());
        }
        Err(ApplyError::Order {
            seq,
            message: format!(
                "a change to {} has {} columns, its Relation {}",
                self.table,
                columns,
                self.columns.len()
            ),
        })
    }
}

/// One column of the target table: name, type (`format_type`), part of the
/// primary key, a `GENERATED ALWAYS` identity column.
struct TargetColumn {
    name: String,
    ty: String,
    pk: bool,
    always: bool,
}

/// Whether the target table `$1` (quoted name) has no unique or exclusion
/// index besides its primary key and no user trigger, on it or any
/// partition: then the order in which one statement changes its rows cannot
/// matter.
/// (`pg_partition_tree` lists nothing for a table that is not partitioned.)
const SET_BASED_SQL: &str = "WITH tree AS (SELECT $1::text::regclass AS relid \
        UNION SELECT relid FROM pg_partition_tree($1::text::regclass)) \
 SELECT NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid IN (SELECT relid FROM tree) \
        AND (i.indisunique OR i.indisexclusion) AND NOT i.indisprimary) \
    AND NOT EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid IN (SELECT relid FROM tree) \
        AND NOT g.tgisinternal)";

/// The target table's columns in order; none when it does not exist.
const COLUMNS_SQL: &str = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
        coalesce(a.attnum = ANY (i.indkey::int2[]), false), a.attidentity = 'a' \
 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
 LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary \
 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') ORDER BY a.attnum";

impl Apply {
    /// Remember the Relation messages of a record already applied (before a
    /// restart), so the changes after it find their tables.
    pub(super) fn learn_relations(
        &self,
        s: &mut Session,
        record: &Record,
    ) -> Result<(), ApplyError> {
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

    /// A Relation message: keep it (in the inbox too, so the next session
    /// knows it), and forget the mapping and statements of its old shape.
    pub(super) fn remember_relation(
        &self,
        s: &mut Session,
        rel: Relation,
        raw: &[u8],
    ) -> Result<(), ApplyError> {
        if s.relations.get(&rel.oid) != Some(&rel) {
            self.inbox.save_relation(rel.oid, raw)?;
            self.use_relation(s, rel);
        }
        Ok(())
    }

    /// Map changes to `rel.oid` with this Relation from now on, in this
    /// session only (a held one replayed at a join's end, `join.rs`).
    pub(super) fn use_relation(&self, s: &mut Session, rel: Relation) {
        if s.relations.get(&rel.oid) != Some(&rel) {
            s.targets.remove(&rel.oid);
            s.statements.retain(|k, _| k.0 != rel.oid);
            s.set_statements.retain(|k, _| k.0 != rel.oid);
            s.relations.insert(rel.oid, rel);
        }
    }

    /// Map a source relation to its target table (cached per session).
    pub(super) async fn resolve(
        &self,
        s: &mut Session,
        seq: u64,
        oid: u32,
    ) -> Result<(), ApplyError> {
        if s.targets.contains_key(&oid) {
            return Ok(());
        }
        let rel = s
            .relations
            .get(&oid)
            .ok_or(ApplyError::UnknownRelation { seq, oid })?;
        let rows = s
            .client
            .query(COLUMNS_SQL, &[&rel.schema, &rel.name])
            .await
            .map_err(target_err("read target table definition"))?;
        let columns = rows
            .iter()
            .map(|r| {
                Ok(TargetColumn {
                    name: r.try_get(0)?,
                    ty: r.try_get(1)?,
                    pk: r.try_get(2)?,
                    always: r.try_get(3)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(target_err("read target table definition"))?;
        let mut map = map_table(rel, &columns)?;
        if map.key_is_pk {
            let row = s
                .client
                .query_one(SET_BASED_SQL, &[&map.table])
                .await
                .map_err(target_err("read target table indexes and triggers"))?;
            map.set_based = row
                .try_get(0)
                .map_err(target_err("read target table indexes and triggers"))?;
        }
        let source: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
        map.sequences = self.discover_sequences(s, &map.table, &source).await?;
        map.two_way = self.is_two_way(s, &map.table).await?;
        s.targets.insert(oid, map);
        Ok(())
    }
}

/// Map `rel` onto the target table whose columns are `target` (empty: the
/// table does not exist).
fn map_table(rel: &Relation, target: &[TargetColumn]) -> Result<TableMap, ApplyError> {
    let table = format!("{}.{}", quote_ident(&rel.schema), quote_ident(&rel.name));
    if target.is_empty() {
        return Err(ApplyError::MissingTable { table });
    }
    let mut columns = Vec::new();
    let mut always = Vec::new();
    for c in &rel.columns {
        let Some(t) = target.iter().find(|t| t.name == c.name) else {
            return Err(ApplyError::MissingColumn {
                table,
                column: quote_ident(&c.name),
            });
        };
        columns.push((quote_ident(&t.name), t.ty.clone()));
        always.push(t.always);
    }
    let pk: Vec<&String> = target.iter().filter(|t| t.pk).map(|t| &t.name).collect();
    let (key, key_is_pk) = if !pk.is_empty() {
        let mut key = Vec::new();
        for name in pk {
            let idx = rel
                .columns
                .iter()
                .position(|c| c.name == *name)
                .ok_or_else(|| ApplyError::MissingColumn {
                    table: format!("{table} (on the source; it is in the target's primary key)"),
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
    Ok(TableMap {
        table,
        columns,
        key,
        key_is_pk,
        set_based: false,
        overriding: target.iter().any(|t| t.always),
        always,
        sequences: Vec::new(),
        two_way: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgcourier_proto::pgoutput::Column;

    fn relation(identity: ReplicaIdentity, cols: &[(&str, bool)]) -> Relation {
        Relation {
            oid: 16384,
            schema: "shop".into(),
            name: "Order".into(),
            replica_identity: identity,
            columns: cols
                .iter()
                .map(|&(name, key)| Column {
                    key,
                    name: name.into(),
                    type_oid: 23,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn col(name: &str, ty: &str, pk: bool) -> TargetColumn {
        TargetColumn {
            name: name.into(),
            ty: ty.into(),
            pk,
            always: false,
        }
    }

    #[test]
    fn columns_map_by_name_in_source_order_with_the_target_types() {
        let rel = relation(ReplicaIdentity::Default, &[("id", true), ("note", false)]);
        // The target has the columns in another order, and one more.
        let target = [
            col("extra", "text", false),
            col("note", "character varying(20)", false),
            col("id", "bigint", true),
        ];
        let m = map_table(&rel, &target).unwrap();
        assert_eq!(m.table, "\"shop\".\"Order\"");
        assert_eq!(
            m.columns,
            vec![
                ("\"id\"".to_owned(), "bigint".to_owned()),
                ("\"note\"".to_owned(), "character varying(20)".to_owned()),
            ]
        );
        assert_eq!((m.key, m.key_is_pk), (vec![0], true));
    }

    #[test]
    fn a_generated_always_identity_column_makes_inserts_override_it() {
        let rel = relation(ReplicaIdentity::Default, &[("id", true), ("note", false)]);
        let mut target = [col("id", "bigint", true), col("note", "text", false)];
        assert!(!map_table(&rel, &target).unwrap().overriding);
        target[0].always = true;
        assert!(map_table(&rel, &target).unwrap().overriding);
    }

    #[test]
    fn a_missing_table_or_column_is_named() {
        let rel = relation(ReplicaIdentity::Default, &[("id", true), ("note", false)]);
        match map_table(&rel, &[]) {
            Err(ApplyError::MissingTable { table }) => assert_eq!(table, "\"shop\".\"Order\""),
            other => panic!("expected MissingTable, got {:?}", other.err()),
        }
        match map_table(&rel, &[col("id", "integer", true)]) {
            Err(ApplyError::MissingColumn { table, column }) => {
                assert_eq!(
                    (table.as_str(), column.as_str()),
                    ("\"shop\".\"Order\"", "\"note\"")
                )
            }
            other => panic!("expected MissingColumn, got {:?}", other.err()),
        }
    }

    #[test]
    fn a_target_primary_key_column_the_source_lacks_is_named() {
        let rel = relation(ReplicaIdentity::Default, &[("id", true)]);
        let target = [col("id", "integer", true), col("region", "text", true)];
        match map_table(&rel, &target) {
            Err(ApplyError::MissingColumn { table, column }) => {
                assert!(
                    table.contains("it is in the target's primary key"),
                    "{table}"
                );
                assert_eq!(column, "\"region\"");
            }
            other => panic!("expected MissingColumn, got {:?}", other.err()),
        }
    }

    #[test]
    fn without_a_target_primary_key_the_source_replica_identity_finds_the_row() {
        let cols = [("a", true), ("b", false), ("c", true)];
        let target = [
            col("a", "int", false),
            col("b", "int", false),
            col("c", "int", false),
        ];
        let m = map_table(&relation(ReplicaIdentity::Index, &cols), &target).unwrap();
        assert_eq!((m.key, m.key_is_pk), (vec![0, 2], false));
        let m = map_table(&relation(ReplicaIdentity::Full, &cols), &target).unwrap();
        assert_eq!((m.key, m.key_is_pk), (vec![0, 1, 2], false));
        // Nothing identifies a row: updates and deletes are refused later (NoKey).
        let none = [("a", false), ("b", false), ("c", false)];
        let m = map_table(&relation(ReplicaIdentity::Nothing, &none), &target).unwrap();
        assert!(m.key.is_empty());
    }
}
