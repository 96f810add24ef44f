//! A schema change captured at the source (a `pgcourier.ddl` logical
//! message, `pgcourier_common::pg::ddl`) → the same statement at the branch,
//! at its place in the source transaction and inside the same target
//! transaction: what is queued before it is sent first, the source's
//! `search_path` is set for it alone (transaction-locally), and the cached
//! target descriptions are forgotten, so the next change to a table
//! resolves it afresh.
//!
//! Settings: `ddl = "none"` ignores every message; a command tag in
//! `ddl-deny` leaves the statement out, logged as skipped by rule. A query
//! string holding several statements is not run: apply pauses, naming it
//! (apply it by hand, then `pgcourier-queue skip`). Nor is one that is not
//! itself a DDL statement (`DO`, `SELECT f()`, `CALL`: the trigger fired
//! for DDL that code ran): replaying it would run that code at the branch
//! with the apply role's rights. Statements run as the apply role; the
//! role that ran them at the source is logged. `CREATE TABLE .. AS` runs
//! `WITH NO DATA`: its rows come as changes (when published), never from
//! the branch's own rows. `CONCURRENTLY` cannot
//! run inside a transaction block: it is dropped, and the index is built
//! (or dropped) inside the target transaction, holding its lock until the
//! group commits. The group ends after a transaction with DDL, so that what
//! it created (an enum value) is committed before the next transaction uses
//! it.

use pgcourier_common::pg::ddl::{
    ctas_without_data, is_ddl_statement, split_statements, without_concurrently, DdlMessage,
};

use super::error::{target_err, ApplyError};
use super::{Apply, Session};
use crate::config::Ddl;

/// DDL text longer than this is cut in logs, status and errors.
const SHOWN_CHARS: usize = 200;

/// The statement as shown in logs and errors: at most [`SHOWN_CHARS`]
/// characters, on one line.
pub(super) fn shown(statement: &str) -> String {
    let one_line: String = statement.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(SHOWN_CHARS) {
        Some((at, _)) => format!("{}...", &one_line[..at]),
        None => one_line,
    }
}

impl Apply {
    /// Apply one DDL message of record `seq` (see the module doc).
    pub(super) async fn apply_ddl(
        &self,
        s: &mut Session,
        seq: u64,
        content: &[u8],
    ) -> Result<(), ApplyError> {
        if self.cfg.ddl == Ddl::None {
            return Ok(());
        }
        let msg: DdlMessage =
            serde_json::from_slice(content).map_err(|e| ApplyError::DdlMessage {
                seq,
                message: e.to_string(),
            })?;
        let text = shown(&msg.statement);
        if let Some(tag) = msg
            .tags
            .iter()
            .find(|t| self.cfg.ddl_deny.contains(&t.to_uppercase()))
        {
            tracing::info!(seq, tag = %tag, statement = %text, "schema change skipped by rule (ddl-deny)");
            return Ok(());
        }
        let statement = match split_statements(&msg.statement).as_slice() {
            [] => return Ok(()),
            [one] => one.clone(),
            _ => {
                return Err(ApplyError::DdlSeveral {
                    seq,
                    statement: text,
                })
            }
        };
        if !is_ddl_statement(&statement) {
            return Err(ApplyError::DdlByCode {
                seq,
                statement: text,
            });
        }
        let statement = if msg.tags.iter().any(|t| t == "CREATE TABLE AS") {
            ctas_without_data(&statement)
        } else {
            statement
        };
        let statement = without_concurrently(&statement).unwrap_or(statement);
        // Order: everything queued before the statement reaches the target
        // first, and nothing after it is prepared against the old shape.
        self.drain(s).await?;
        s.client
            .execute(
                "SELECT pg_catalog.set_config('pgcourier.search_path', pg_catalog.current_setting('search_path'), true), \
                        pg_catalog.set_config('search_path', $1, true)",
                &[&msg.search_path],
            )
            .await
            .map_err(target_err("set the source's search_path"))?;
        s.client
            .batch_execute(&statement)
            .await
            .map_err(|source| ApplyError::Ddl {
                seq,
                statement: text.clone(),
                source: source.into(),
            })?;
        s.client
            .batch_execute(
                "SELECT pg_catalog.set_config('search_path', pg_catalog.current_setting('pgcourier.search_path'), true)",
            )
            .await
            .map_err(target_err("restore the search_path"))?;
        s.targets.clear();
        s.statements.clear();
        s.set_statements.clear();
        s.end_group = true;
        tracing::info!(seq, statement = %text, source_role = msg.role.as_deref().unwrap_or("?"), "applied schema change");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_statements_are_shown_cut_and_on_one_line() {
        assert_eq!(
            shown("ALTER TABLE t\n   ADD COLUMN a int"),
            "ALTER TABLE t ADD COLUMN a int"
        );
        let long = format!("COMMENT ON TABLE t IS '{}'", "é".repeat(400));
        let s = shown(&long);
        assert_eq!(s.chars().count(), SHOWN_CHARS + 3);
        assert!(s.ends_with("..."));
    }
}
