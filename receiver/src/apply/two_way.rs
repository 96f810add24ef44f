//! Changes to a table written at several sites (`direction = "both"`):
//! each goes, with the row clock that preceded it in its transaction, to
//! `pgcourier.apply_change` at the target, which detects a conflict,
//! resolves it by the table's policy and records it
//! (`pgcourier_common::pg::conflict`). A clock message is kept on the
//! session until the next change, whichever table it is to: a clock
//! belongs to the change right after it.

use pgcourier_proto::pgoutput::{OldTuple, Tuple, Value};
use tokio_postgres::types::Type;

use super::error::{target_err, ApplyError};
use super::sql::{text_value, Op};
use super::{Apply, Session};

/// One change through the conflict function: table, clock (empty: none),
/// op (`I`, `U`, `D`), the new row and a delete's old key as JSON objects
/// of text values by column name.
const APPLY_CHANGE_SQL: &str = "SELECT pgcourier.apply_change($1::text::regclass, $2, $3, \
     $4::text::jsonb, $5::text::jsonb)";

impl Apply {
    /// Whether the target table `table` (quoted name) is registered as
    /// written at several sites (the site's sender registers it).
    pub(super) async fn is_two_way(&self, s: &Session, table: &str) -> Result<bool, ApplyError> {
        let what = "look up the table in pgcourier.two_way";
        let installed: bool = s
            .client
            .query_one("SELECT to_regclass('pgcourier.two_way') IS NOT NULL", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(target_err(what))?;
        if !installed {
            return Ok(false);
        }
        s.client
            .query_one(
                "SELECT count(*) > 0 FROM pgcourier.two_way WHERE tbl = $1::text::regclass",
                &[&table],
            )
            .await
            .and_then(|row| row.try_get(0))
            .map_err(target_err(what))
    }

    /// Queue a clock message that no change followed (a deletion that
    /// found nothing to delete at the site that forwarded it), for
    /// `pgcourier.apply_orphan_clock`; nothing where this site has no
    /// two-way tables.
    pub(super) async fn queue_orphan_clock(
        &self,
        s: &mut Session,
        clock: String,
    ) -> Result<(), ApplyError> {
        let what = "look up pgcourier.apply_orphan_clock";
        if s.orphan.is_none() {
            let installed: bool = s
                .client
                .query_one(
                    "SELECT to_regprocedure('pgcourier.apply_orphan_clock(text)') IS NOT NULL",
                    &[],
                )
                .await
                .and_then(|row| row.try_get(0))
                .map_err(target_err(what))?;
            let stmt = if installed {
                Some(
                    s.client
                        .prepare_typed("SELECT pgcourier.apply_orphan_clock($1)", &[Type::TEXT])
                        .await
                        .map_err(target_err("prepare pgcourier.apply_orphan_clock"))?,
                )
            } else {
                None
            };
            s.orphan = Some(stmt);
        }
        let Some(Some(stmt)) = s.orphan.clone() else {
            return Ok(());
        };
        self.flush_run(s).await?;
        s.pending.push(super::pipeline::Pending::TwoWay {
            stmt,
            params: vec![Some(clock)],
        });
        Ok(())
    }

    /// Queue one change to a two-way table (`Session::targets[oid]`).
    pub(super) async fn queue_two_way(
        &self,
        s: &mut Session,
        oid: u32,
        op: Op,
        old: Option<&OldTuple>,
        new: &Tuple,
        clock: Option<String>,
    ) -> Result<(), ApplyError> {
        let table = s.targets[&oid].table.clone();
        if !self.cfg.replica_role {
            // Apply's own writes would fire the stamping trigger and get a
            // clock of this site's.
            return Err(ApplyError::TwoWayNeedsReplicaRole { table });
        }
        self.flush_run(s).await?;
        let stmt = match &s.two_way {
            Some(st) => st.clone(),
            None => {
                let st = s
                    .client
                    .prepare_typed(APPLY_CHANGE_SQL, &[Type::TEXT; 5])
                    .await
                    .map_err(target_err("prepare pgcourier.apply_change"))?;
                s.two_way = Some(st.clone());
                st
            }
        };
        let rel = &s.relations[&oid];
        let names = rel.columns.iter().map(|c| c.name.as_str());
        let (code, row, old_key) = match op {
            Op::Insert | Op::Update => (
                if op == Op::Insert { "I" } else { "U" },
                Some(row_json(names, new)),
                None,
            ),
            Op::Delete => {
                let key = old.map_or(new, OldTuple::tuple);
                ("D", None, Some(row_json(names, key)))
            }
        };
        s.pending.push(super::pipeline::Pending::TwoWay {
            stmt,
            params: vec![
                Some(table),
                Some(clock.unwrap_or_default()),
                Some(code.into()),
                row,
                old_key,
            ],
        });
        Ok(())
    }
}

/// What `pgcourier.apply_change` did with the changes of a drain, by its
/// answer: 0 no conflict, 1 a conflict the remote version won, 2 one this
/// site's version won, 3 parked for an operator (policy `manual`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Outcomes {
    pub remote_won: u64,
    pub local_won: u64,
    pub parked: u64,
}

impl Outcomes {
    pub fn count(&mut self, code: i32) {
        match code {
            1 => self.remote_won += 1,
            2 => self.local_won += 1,
            3 => self.parked += 1,
            _ => {}
        }
    }

    pub fn add(&mut self, other: &Outcomes) {
        self.remote_won += other.remote_won;
        self.local_won += other.local_won;
        self.parked += other.parked;
    }
}

/// A row as a JSON object of its values as text (NULL as null), by column
/// name; unchanged TOAST values (not sent) left out.
fn row_json<'a>(names: impl Iterator<Item = &'a str>, row: &Tuple) -> String {
    let mut map = serde_json::Map::new();
    for (name, v) in names.zip(row) {
        if matches!(v, Value::UnchangedToast) {
            continue;
        }
        let value = text_value(v).map_or(serde_json::Value::Null, serde_json::Value::String);
        map.insert(name.to_owned(), value);
    }
    serde_json::Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_goes_as_text_values_by_name_without_unchanged_toast() {
        let row = vec![
            Value::Text("7".into()),
            Value::Null,
            Value::UnchangedToast,
            Value::Text("a \"b\"".into()),
        ];
        let json = row_json(["id", "n", "big", "v"].into_iter(), &row);
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"id": "7", "n": null, "v": "a \"b\""})
        );
    }
}
