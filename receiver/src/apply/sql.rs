//! One change shape → its SQL: `INSERT`, `UPDATE .. SET` or `DELETE`, every
//! identifier quoted, every value a text parameter cast to the target
//! column's type (`$n::text::<type>`), the row found by its primary key or,
//! without one, exactly one row matching the replica identity. Each shape is
//! prepared once per session.
//!
//! A run of updates or deletes to one table by its primary key goes as one
//! set-based statement instead (`build_set_sql`): each column's values as
//! one text array, `unnest`ed into rows, joined to the table on the key and
//! cast to the target's types as above.

use pgcourier_proto::pgoutput::Value;
use tokio_postgres::types::Type;
use tokio_postgres::Statement;

use super::error::ApplyError;
use super::mapping::TableMap;
use super::{Apply, Session};

/// The kind of a row change.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Op {
    Insert,
    Update,
    Delete,
}

impl Apply {
    /// The prepared statement for one change shape (cached per session).
    pub(super) async fn statement(
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
                source: e.into(),
            })?;
        s.statements.insert(key, st.clone());
        Ok(st)
    }
}

impl Apply {
    /// The prepared set-based statement for a run of `op` (update or delete)
    /// to `oid` by the key columns `wher` (cached per session).
    pub(super) async fn set_statement(
        &self,
        s: &mut Session,
        oid: u32,
        op: Op,
        wher: &[bool],
    ) -> Result<Statement, ApplyError> {
        if let Some(st) = s.set_statements.get(&(oid, op)) {
            return Ok(st.clone());
        }
        let target = &s.targets[&oid];
        let (sql, n) = build_set_sql(target, op, wher);
        let st = s
            .client
            .prepare_typed(&sql, &vec![Type::TEXT_ARRAY; n])
            .await
            .map_err(|e| ApplyError::Target {
                what: format!("prepare statement for {}", target.table),
                source: e.into(),
            })?;
        s.set_statements.insert((oid, op), st.clone());
        Ok(st)
    }
}

/// A pgoutput value as the text parameter apply sends (`None`: NULL, or an
/// unchanged TOAST value, which is never sent).
pub(super) fn text_value(v: &Value) -> Option<String> {
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
fn build_sql(t: &TableMap, op: Op, set: &[bool], wher: &[bool]) -> (String, usize) {
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
                "INSERT INTO {} ({}) {}VALUES ({})",
                t.table,
                names.join(", "),
                if t.overriding {
                    "OVERRIDING SYSTEM VALUE "
                } else {
                    ""
                },
                values.join(", ")
            );
        }
        Op::Update | Op::Delete => {
            // A GENERATED ALWAYS identity column may be set to DEFAULT only:
            // its new value (the source could not change it but to DEFAULT,
            // a new one) is checked as unchanged instead, so an update that
            // did change it finds no row and is reported as missing.
            let mut unchanged = Vec::new();
            if op == Op::Update {
                let mut sets = Vec::new();
                for i in (0..set.len()).filter(|&i| set[i]) {
                    let assign = format!("{} = {}", t.columns[i].0, cast(i, next()));
                    if t.always.get(i) == Some(&true) {
                        unchanged.push(assign);
                    } else {
                        sets.push(assign);
                    }
                }
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
                .chain(unchanged)
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

/// The set-based statement for a run of updates or deletes by the key
/// columns `wher` (a primary key), and its parameter count: one text array
/// per column the rows carry (an update: every column; a delete: the key
/// columns), in column order, `unnest`ed side by side into the rows
/// `s(c1, c2, ..)`. An update sets the columns outside the key; its key is
/// unchanged (a run holds no update that changes it).
pub(super) fn build_set_sql(t: &TableMap, op: Op, wher: &[bool]) -> (String, usize) {
    let carried: Vec<usize> = match op {
        Op::Update => (0..t.columns.len()).collect(),
        _ => (0..wher.len()).filter(|&i| wher[i]).collect(),
    };
    let arrays: Vec<String> = (1..=carried.len())
        .map(|p| format!("${p}::text[]"))
        .collect();
    let names: Vec<String> = (1..=carried.len()).map(|p| format!("c{p}")).collect();
    let rows = format!("unnest({}) AS s({})", arrays.join(", "), names.join(", "));
    // `s.cN` of column i, cast to its target type.
    let value = |i: usize| {
        let p = carried
            .iter()
            .position(|&c| c == i)
            .expect("column carried")
            + 1;
        format!("s.c{p}::{}", t.columns[i].1)
    };
    // A GENERATED ALWAYS identity column outside the key is checked as
    // unchanged, not set (see `build_sql`).
    let always = |i: usize| t.always.get(i) == Some(&true);
    let conds: Vec<String> = (0..wher.len())
        .filter(|&i| wher[i] || (op == Op::Update && always(i)))
        .map(|i| format!("t.{} = {}", t.columns[i].0, value(i)))
        .collect();
    let sql = match op {
        Op::Update => {
            let sets: Vec<String> = (0..wher.len())
                .filter(|&i| !wher[i] && !always(i))
                .map(|i| format!("{} = {}", t.columns[i].0, value(i)))
                .collect();
            format!(
                "UPDATE {} AS t SET {} FROM {rows} WHERE {}",
                t.table,
                sets.join(", "),
                conds.join(" AND ")
            )
        }
        _ => format!(
            "DELETE FROM {} AS t USING {rows} WHERE {}",
            t.table,
            conds.join(" AND ")
        ),
    };
    (sql, carried.len())
}

/// A TRUNCATE of the target tables `tables` (already quoted), with the
/// source's options.
pub(super) fn truncate_sql(tables: &[String], restart_identity: bool, cascade: bool) -> String {
    let mut sql = format!("TRUNCATE {}", tables.join(", "));
    if restart_identity {
        sql.push_str(" RESTART IDENTITY");
    }
    if cascade {
        sql.push_str(" CASCADE");
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(key_is_pk: bool) -> TableMap {
        TableMap {
            table: "\"s\".\"T\"".into(),
            columns: vec![
                ("\"id\"".into(), "integer".into()),
                ("\"v\"".into(), "text".into()),
                ("\"j\"".into(), "jsonb".into()),
            ],
            key: vec![0],
            key_is_pk,
            set_based: key_is_pk,
            overriding: false,
            always: Vec::new(),
            sequences: Vec::new(),
            two_way: false,
        }
    }

    #[test]
    fn a_generated_always_identity_column_is_checked_unchanged_never_set() {
        let mut t = target(true);
        t.always = vec![true, false, false];
        assert_eq!(
            build_sql(&t, Op::Update, &[true, true, false], &[true, false, false]),
            ("UPDATE \"s\".\"T\" SET \"v\" = $2::text::text WHERE \"id\" = $3::text::integer AND \"id\" = $1::text::integer".into(), 3)
        );
        // Outside the key too, and in the set-based form.
        t.always = vec![false, true, false];
        let (sql, _) = build_set_sql(&t, Op::Update, &[true, false, false]);
        assert!(sql.contains("SET \"j\" = s.c3::jsonb"), "{sql}");
        assert!(sql.contains("t.\"v\" = s.c2::text"), "{sql}");
        assert!(!sql.contains("\"v\" = s.c2::text,"), "{sql}");
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
    fn an_insert_into_a_generated_always_identity_table_overrides_it() {
        let mut t = target(true);
        t.overriding = true;
        assert_eq!(
            build_sql(&t, Op::Insert, &[true, true, false], &[false; 3]).0,
            "INSERT INTO \"s\".\"T\" (\"id\", \"v\") OVERRIDING SYSTEM VALUE VALUES ($1::text::integer, $2::text::text)"
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
    fn updates_without_primary_key_match_the_identity_as_text() {
        let mut t = target(false);
        t.key = vec![0, 1];
        let (sql, n) = build_sql(&t, Op::Update, &[false, true, false], &[true, true, false]);
        assert_eq!(n, 3);
        assert_eq!(
            sql,
            "UPDATE \"s\".\"T\" SET \"v\" = $1::text::text WHERE ctid = (SELECT ctid FROM \"s\".\"T\" \
             WHERE \"id\"::text IS NOT DISTINCT FROM $2::text AND \"v\"::text IS NOT DISTINCT FROM $3::text LIMIT 1)"
        );
    }

    #[test]
    fn runs_update_and_delete_in_one_statement_joined_on_the_key() {
        let mut t = target(true);
        // The key is the last column: the arrays still go in column order.
        t.columns.swap(0, 2);
        t.key = vec![2];
        let (sql, n) = build_set_sql(&t, Op::Update, &[false, false, true]);
        assert_eq!(n, 3);
        assert_eq!(
            sql,
            "UPDATE \"s\".\"T\" AS t SET \"j\" = s.c1::jsonb, \"v\" = s.c2::text \
             FROM unnest($1::text[], $2::text[], $3::text[]) AS s(c1, c2, c3) \
             WHERE t.\"id\" = s.c3::integer"
        );
        let (sql, n) = build_set_sql(&t, Op::Delete, &[false, false, true]);
        assert_eq!(n, 1);
        assert_eq!(
            sql,
            "DELETE FROM \"s\".\"T\" AS t USING unnest($1::text[]) AS s(c1) \
             WHERE t.\"id\" = s.c1::integer"
        );
        let (sql, n) = build_set_sql(&t, Op::Delete, &[true, false, true]);
        assert_eq!(n, 2);
        assert!(
            sql.ends_with("WHERE t.\"j\" = s.c1::jsonb AND t.\"id\" = s.c2::integer"),
            "{sql}"
        );
    }

    #[test]
    fn truncate_carries_the_source_options() {
        let tables = ["\"s\".\"a\"".to_owned(), "\"s\".\"b\"".to_owned()];
        assert_eq!(
            truncate_sql(&tables, false, false),
            "TRUNCATE \"s\".\"a\", \"s\".\"b\""
        );
        assert_eq!(
            truncate_sql(&tables[..1], true, false),
            "TRUNCATE \"s\".\"a\" RESTART IDENTITY"
        );
        assert_eq!(
            truncate_sql(&tables[..1], false, true),
            "TRUNCATE \"s\".\"a\" CASCADE"
        );
        assert_eq!(
            truncate_sql(&tables[..1], true, true),
            "TRUNCATE \"s\".\"a\" RESTART IDENTITY CASCADE"
        );
    }

    #[test]
    fn values_go_as_text_null_and_unchanged_toast_as_none() {
        assert_eq!(text_value(&Value::Text("x".into())), Some("x".into()));
        assert_eq!(text_value(&Value::Null), None);
        assert_eq!(text_value(&Value::UnchangedToast), None);
        assert_eq!(
            text_value(&Value::Binary(vec![0, 0xab])),
            Some("\\x00ab".into())
        );
    }
}
