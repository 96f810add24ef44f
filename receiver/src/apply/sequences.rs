//! Sequences follow the rows that used them: pgoutput on PostgreSQL 15
//! carries no sequence, so apply moves each sequence that feeds a column of
//! the target forward in the same target transaction that applies rows
//! using it. A branch's sequences are then never behind the rows it holds,
//! at every commit, and a branch promoted to take over inserts with its
//! own defaults without a key collision. It costs no wire bytes: the values
//! are the ones the rows already carry.
//!
//! What feeds a column, found at the target when its table is resolved
//! (`mapping.rs`) and forgotten with the mapping (a Relation change, a
//! schema change): an identity column's or a serial's owned sequence
//! (`pg_get_serial_sequence`), and any sequence the column's default calls
//! `nextval` on (its `pg_attrdef` row depends on it in `pg_depend`, owned or
//! not). Only `smallint`, `integer` and `bigint` columns.
//!
//! Per target transaction (a group of source transactions) apply keeps one
//! value per sequence, not per row: the highest value an applied insert or
//! update (its new row) put in a column it feeds, the lowest for a
//! sequence that counts down. Values are pgoutput text; NULLs and what does
//! not parse as an `i64` are ignored. A large insert streamed into its own
//! COPY (`large.rs`) is never decoded: after its COPY, the table's column is
//! read back (`max`, or `min`). Copies (the initial copy, seeds) go through
//! the same inserts, so they are covered by the same values.
//!
//! Before the group's progress row, one statement per sequence touched
//! moves it, never back: only when the value is at or beyond what its next
//! `nextval` would return, to that value (`setval(.., v)`: the next
//! `nextval` returns the value after it), capped at the sequence's bounds.
//! `setval` is not transactional: when the group then rolls back, the
//! sequence stays ahead, which is harmless; its WAL precedes the commit's,
//! so a committed group's move is as durable as its rows. A `TRUNCATE ..
//! RESTART IDENTITY` in the same group as rows before it may leave the
//! sequence ahead too. A sequence that is not fed through a column's
//! default (values taken by `nextval` and inserted explicitly into a column
//! with no default tied to it) is not moved.
//!
//! The apply role needs `SELECT` (to read where the sequence stands) and
//! `UPDATE` (`setval`) on each such sequence; without them apply pauses on
//! [`ApplyError::Sequence`], which names the sequence and the `GRANT`.

use std::collections::HashMap;

use futures_util::future::try_join_all;
use pgcourier_common::pg::quote_ident;
use pgcourier_proto::pgoutput::{Tuple, Value};

use super::error::{target_err, ApplyError};
use super::{Apply, Session};

/// A target column whose values come from a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SeqColumn {
    /// The column's index in the source relation (its place in a tuple).
    pub(super) column: usize,
    /// The quoted target column name.
    pub(super) name: String,
    /// The sequence, by OID at the target (it survives a rename).
    pub(super) seq: u32,
    /// `"schema"."sequence"`, for the statement and for errors.
    pub(super) seq_name: String,
    /// The sequence counts up (increment > 0).
    pub(super) ascending: bool,
}

/// The target table `$1` (quoted name): each integer column, the sequences
/// that feed it, their quoted schema and name, and whether each counts up.
/// Owned ones (identity, serial) through `pg_get_serial_sequence`; those
/// its default calls through the default's dependencies.
const DISCOVER_SQL: &str = "WITH cols AS ( \
    SELECT a.attnum, a.attname FROM pg_catalog.pg_attribute a \
    WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
      AND a.atttypid IN ('pg_catalog.int2'::regtype, 'pg_catalog.int4'::regtype, 'pg_catalog.int8'::regtype)), \
 fed AS ( \
    SELECT c.attname, pg_catalog.pg_get_serial_sequence($1::text, c.attname::text)::regclass::oid AS seq FROM cols c \
    UNION \
    SELECT c.attname, d.refobjid FROM cols c \
    JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = $1::text::regclass AND ad.adnum = c.attnum \
    JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_attrdef'::regclass AND d.objid = ad.oid \
     AND d.refclassid = 'pg_catalog.pg_class'::regclass) \
 SELECT f.attname::text, f.seq, n.nspname::text, sc.relname::text, q.seqincrement > 0 \
 FROM fed f JOIN pg_catalog.pg_class sc ON sc.oid = f.seq AND sc.relkind = 'S' \
 JOIN pg_catalog.pg_namespace n ON n.oid = sc.relnamespace \
 JOIN pg_catalog.pg_sequence q ON q.seqrelid = f.seq \
 ORDER BY 1, 2";

/// Move sequence `seq` (quoted name) to `$2` if `$2` is at or beyond its
/// next value (capped at its bounds); `$1` is its OID, `$3` whether apply
/// tracked it as counting up (nothing happens if that changed since).
pub(super) fn setval_sql(seq: &str) -> String {
    format!(
        "SELECT pg_catalog.setval($1::oid::regclass, \
                CASE WHEN q.seqincrement > 0 THEN LEAST($2::int8, q.seqmax) ELSE GREATEST($2::int8, q.seqmin) END) \
         FROM {seq} s, pg_catalog.pg_sequence q \
         WHERE q.seqrelid = $1::oid AND (q.seqincrement > 0) = $3::bool \
           AND CASE WHEN q.seqincrement > 0 \
                    THEN $2::int8 >= CASE WHEN s.is_called THEN s.last_value::numeric + q.seqincrement ELSE s.last_value END \
                    ELSE $2::int8 <= CASE WHEN s.is_called THEN s.last_value::numeric + q.seqincrement ELSE s.last_value END END"
    )
}

/// The highest (lowest, counting down) value each sequence touched in the
/// open group was seen in a column it feeds: one entry per sequence.
#[derive(Debug, Default)]
pub(super) struct Marks {
    by_seq: HashMap<u32, Mark>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mark {
    pub(super) name: String,
    pub(super) ascending: bool,
    pub(super) value: i64,
}

impl Marks {
    /// `value` was put in a column `c` feeds.
    pub(super) fn note(&mut self, c: &SeqColumn, value: i64) {
        let mark = self.by_seq.entry(c.seq).or_insert_with(|| Mark {
            name: c.seq_name.clone(),
            ascending: c.ascending,
            value,
        });
        mark.value = if mark.ascending {
            mark.value.max(value)
        } else {
            mark.value.min(value)
        };
    }

    /// The values of a new row in the columns the table's sequences feed.
    pub(super) fn note_row(&mut self, columns: &[SeqColumn], row: &Tuple) {
        for c in columns {
            if let Some(v) = row.get(c.column).and_then(integer) {
                self.note(c, v);
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }

    /// The marks, emptied for the next group.
    pub(super) fn take(&mut self) -> Vec<(u32, Mark)> {
        let mut marks: Vec<(u32, Mark)> = self.by_seq.drain().collect();
        marks.sort_by_key(|(seq, _)| *seq);
        marks
    }
}

/// A pgoutput value as an integer: text that parses as an `i64`.
fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::Text(t) => t.trim().parse().ok(),
        _ => None,
    }
}

impl Apply {
    /// The sequences feeding the columns of target table `table` (quoted),
    /// by the source columns `source` (their names, in tuple order).
    pub(super) async fn discover_sequences(
        &self,
        s: &Session,
        table: &str,
        source: &[&str],
    ) -> Result<Vec<SeqColumn>, ApplyError> {
        let rows = s
            .client
            .query(DISCOVER_SQL, &[&table])
            .await
            .map_err(target_err(
                "read the sequences feeding the target table's columns",
            ))?;
        let mut found = Vec::new();
        for r in rows {
            let read = || -> Result<_, tokio_postgres::Error> {
                Ok((
                    r.try_get::<_, String>(0)?,
                    r.try_get::<_, u32>(1)?,
                    r.try_get::<_, String>(2)?,
                    r.try_get::<_, String>(3)?,
                    r.try_get::<_, bool>(4)?,
                ))
            };
            let (column, seq, schema, name, ascending) = read().map_err(target_err(
                "read the sequences feeding the target table's columns",
            ))?;
            // A column the source does not send is filled at the branch by
            // its default, which moves the sequence itself.
            let Some(index) = source.iter().position(|c| *c == column) else {
                continue;
            };
            found.push(SeqColumn {
                column: index,
                name: quote_ident(&column),
                seq,
                seq_name: format!("{}.{}", quote_ident(&schema), quote_ident(&name)),
                ascending,
            });
        }
        Ok(found)
    }

    /// A large insert into `oid` was streamed without being decoded: read
    /// its table's sequence columns back.
    pub(super) async fn note_table_extremes(
        &self,
        s: &mut Session,
        oid: u32,
    ) -> Result<(), ApplyError> {
        let Some(target) = s.targets.get(&oid) else {
            return Ok(());
        };
        for c in &target.sequences {
            let agg = if c.ascending { "max" } else { "min" };
            let sql = format!("SELECT {agg}({})::int8 FROM {}", c.name, target.table);
            let value: Option<i64> = s
                .client
                .query_one(sql.as_str(), &[])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(target_err(
                    "read the highest value of a column a sequence feeds",
                ))?;
            if let Some(v) = value {
                s.sequences.note(c, v);
            }
        }
        Ok(())
    }

    /// Move every sequence the open group touched forward to the value its
    /// rows reached (see the module doc); pipelined, one statement each.
    pub(super) async fn move_sequences(&self, s: &mut Session) -> Result<(), ApplyError> {
        if s.sequences.is_empty() {
            return Ok(());
        }
        let marks = s.sequences.take();
        let client = &s.client;
        let role = self.cfg.target.user();
        let moves = marks.iter().map(|(seq, mark)| async move {
            let sql = setval_sql(&mark.name);
            client
                .query(sql.as_str(), &[seq, &mark.value, &mark.ascending])
                .await
                .map_err(|source| ApplyError::Sequence {
                    sequence: mark.name.clone(),
                    role: quote_ident(role),
                    source: source.into(),
                })
        });
        try_join_all(moves).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feeds(column: usize, seq: u32, ascending: bool) -> SeqColumn {
        SeqColumn {
            column,
            name: "\"id\"".into(),
            seq,
            seq_name: format!("\"public\".\"s{seq}\""),
            ascending,
        }
    }

    fn t(v: &str) -> Value {
        Value::Text(v.into())
    }

    #[test]
    fn a_group_keeps_one_value_per_sequence_the_highest_or_lowest() {
        let up = feeds(0, 10, true);
        let other = feeds(2, 10, true); // another column, the same sequence
        let down = feeds(1, 11, false);
        let both = [up.clone(), down.clone(), other];
        let mut m = Marks::default();
        m.note_row(&both, &vec![t("5"), t("-5"), t("2")]);
        m.note_row(&both, &vec![t("3"), t("-9"), t("40")]);
        m.note_row(&both, &vec![t("7"), t("-1"), Value::Null]);
        let marks = m.take();
        assert_eq!(marks.len(), 2);
        assert_eq!((marks[0].0, marks[0].1.value), (10, 40));
        assert_eq!((marks[1].0, marks[1].1.value), (11, -9));
        assert_eq!(marks[1].1.name, "\"public\".\"s11\"");
        assert!(!marks[1].1.ascending);
        assert!(m.is_empty(), "taken for the next group");
    }

    #[test]
    fn nulls_toast_and_text_that_is_no_integer_are_ignored() {
        let c = [feeds(0, 10, true)];
        let mut m = Marks::default();
        for v in [
            Value::Null,
            Value::UnchangedToast,
            Value::Binary(vec![0, 0, 0, 9]),
            t("abc"),
            t("99999999999999999999"),
            t("1.5"),
            t(""),
        ] {
            m.note_row(&c, &vec![v]);
        }
        // A short tuple: no value for the column.
        m.note_row(&c, &vec![]);
        assert!(m.is_empty());
        m.note_row(&c, &vec![t("-9223372036854775808")]);
        m.note_row(&c, &vec![t("12")]);
        assert_eq!(m.take()[0].1.value, 12);
    }

    #[test]
    fn the_move_names_the_sequence_quoted_and_passes_values_as_parameters() {
        let sql = setval_sql("\"sales\".\"Order \"\"x\"\" seq\"");
        assert!(
            sql.contains("FROM \"sales\".\"Order \"\"x\"\" seq\" s,"),
            "{sql}"
        );
        assert!(sql.contains("setval($1::oid::regclass"), "{sql}");
        // Never back: only when the value reaches the next one.
        assert!(sql.contains("$2::int8 >= CASE WHEN s.is_called"), "{sql}");
        assert!(sql.contains("$2::int8 <= CASE WHEN s.is_called"), "{sql}");
    }
}
