//! A schema change captured at the source (a `pgcourier.ddl` logical
//! message, `pgcourier_common::pg::ddl`) → the same statement at the branch,
//! at its place in the source transaction and inside the same target
//! transaction: what is queued before it is sent first, the source's
//! `search_path` is set for it alone (transaction-locally), and the cached
//! target descriptions are forgotten, so the next change to a table
//! resolves it afresh.
//!
//! Settings: `ddl = "none"` ignores every message; `ddl = "tables"` applies
//! a message whose command tags are all about tables and what they need
//! ([`TABLE_TAGS`], and `COMMENT` on a table or column), leaves out (logged)
//! one whose tags are all outside that set, and pauses on a mix (one query
//! string doing both: apply the part wanted by hand, then `pgcourier-queue
//! skip`); a command tag in `ddl-deny` leaves the statement out, logged as
//! skipped by rule. A query string holding several statements is not run:
//! apply pauses, naming it (apply it by hand, then `pgcourier-queue skip`).
//! Nor is one that is not itself a DDL statement (`DO`, `SELECT f()`,
//! `CALL`: the trigger fired for DDL that code ran): replaying it would run
//! that code at the branch with the apply role's rights. Statements run as
//! the apply role; the role that ran them at the source is logged. `CREATE
//! TABLE .. AS` runs `WITH NO DATA`: its rows come as changes or as the new
//! table's copy, never from the branch's own rows. The group ends after a transaction with DDL, so that what it created (an
//! enum value) is committed before the next transaction uses it.
//!
//! `CONCURRENTLY` (`CREATE INDEX`, `DROP INDEX`, `REINDEX`) cannot run
//! inside a transaction block, and at the source it cannot either: there
//! its transaction holds that statement and nothing else. Such a source
//! transaction is applied on its own, between groups ([`Apply::apply_alone`]):
//! the open group commits first (with its progress row), the statement runs
//! with `CONCURRENTLY` in autocommit, waiting as long as the branch's older
//! transactions make it wait (no `lock_timeout`: meanwhile it blocks no
//! reader or writer), and then the progress row moves past it in a small
//! transaction of its own. A crash between the two replays the statement,
//! so it is made harmless first: an index of that name that exists and is
//! valid is taken as built; an invalid one (left by an interrupted or
//! failed build) is dropped and built again; an index to drop that is gone
//! is taken as dropped; `REINDEX` just rebuilds again. A failed build drops
//! the invalid index it leaves, so that a skip leaves nothing behind. A
//! statement that cannot be made harmless that way (an index created
//! without a name), or whose source transaction holds anything else, runs
//! as before: without `CONCURRENTLY`, inside the target transaction,
//! holding its lock until the group commits (logged).

use pgcourier_common::pg::ddl::{
    comments_on_table, concurrently, ctas_without_data, is_ddl_statement, split_statements,
    without_concurrently, Concurrently, DdlMessage, DDL_PREFIX,
};
use pgcourier_proto::pgoutput::{self, Message};
use pgcourier_proto::record::{Piece, Record};

use super::error::{target_err, ApplyError};
use super::{Apply, GroupEnd, Session};
use crate::config::{Ddl, TABLE_TAGS};

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

/// A source transaction that is one `CONCURRENTLY` statement and nothing
/// else: applied on its own, between groups (see the module doc).
pub(super) struct Alone {
    msg: DdlMessage,
    statement: String,
    shape: Concurrently,
}

/// `record`, a whole source transaction, as an [`Alone`]; `None` when it is
/// anything else (row changes, several messages, a statement without
/// `CONCURRENTLY` or whose index has no name, a message that does not
/// decode: the usual path applies or reports those).
pub(super) fn alone(record: &Record) -> Option<Alone> {
    // Cheap for every other transaction: at most an Origin and the
    // message, told by their first byte before anything is decoded.
    if record.part != 0 || !record.last || record.pieces.len() > 2 {
        return None;
    }
    let mut content = None;
    for piece in &record.pieces {
        let Piece::Message(bytes) = piece else {
            return None;
        };
        if !matches!(bytes.first(), Some(b'O' | b'M')) {
            return None;
        }
        match pgoutput::decode(bytes).ok()? {
            Message::Origin { .. } => {}
            Message::LogicalMessage {
                prefix, content: c, ..
            } if prefix == DDL_PREFIX && content.is_none() => content = Some(c),
            _ => return None,
        }
    }
    let msg: DdlMessage = serde_json::from_slice(&content?).ok()?;
    let [statement] = split_statements(&msg.statement).try_into().ok()?;
    let shape = concurrently(&statement)?;
    Some(Alone {
        msg,
        statement,
        shape,
    })
}

/// Under `ddl = "tables"`: the tags of `msg` outside the table set
/// ([`TABLE_TAGS`]; `COMMENT` is inside when every comment in the text is
/// on a table or a column), and whether any tag is inside.
fn outside_tables(msg: &DdlMessage) -> (Vec<String>, bool) {
    let mut outside = Vec::new();
    let mut inside = false;
    for tag in &msg.tags {
        let upper = tag.to_uppercase();
        if upper == "COMMENT" {
            let comments: Vec<bool> = split_statements(&msg.statement)
                .iter()
                .filter(|s| {
                    s.split_whitespace()
                        .next()
                        .is_some_and(|w| w.eq_ignore_ascii_case("comment"))
                })
                .map(|s| comments_on_table(s))
                .collect();
            if comments.iter().any(|on_table| *on_table) {
                inside = true;
            }
            if comments.is_empty() || comments.iter().any(|on_table| !on_table) {
                outside.push(tag.clone());
            }
        } else if TABLE_TAGS.contains(&upper.as_str()) {
            inside = true;
        } else {
            outside.push(tag.clone());
        }
    }
    (outside, inside)
}

impl Apply {
    /// What this branch's settings make of DDL message `msg` of record
    /// `seq`: the one statement to run, `None` when it is left out (logged),
    /// or the error that pauses apply on it.
    fn ddl_statement(&self, seq: u64, msg: &DdlMessage) -> Result<Option<String>, ApplyError> {
        if self.cfg.ddl == Ddl::None {
            return Ok(None);
        }
        let text = shown(&msg.statement);
        if let Some(tag) = msg
            .tags
            .iter()
            .find(|t| self.cfg.ddl_deny.contains(&t.to_uppercase()))
        {
            tracing::info!(seq, tag = %tag, statement = %text, "schema change skipped by rule (ddl-deny)");
            return Ok(None);
        }
        if self.cfg.ddl == Ddl::Tables {
            match outside_tables(msg) {
                (outside, _) if outside.is_empty() => {}
                (outside, false) => {
                    tracing::info!(seq, tag = %outside[0], statement = %text, "schema change skipped by rule (ddl = \"tables\")");
                    return Ok(None);
                }
                (outside, true) => {
                    return Err(ApplyError::DdlMixed {
                        seq,
                        statement: text,
                        outside: outside.join(", "),
                    })
                }
            }
        }
        match split_statements(&msg.statement).as_slice() {
            [] => Ok(None),
            [one] if !is_ddl_statement(one) => Err(ApplyError::DdlByCode {
                seq,
                statement: text,
            }),
            [one] if msg.tags.iter().any(|t| t == "CREATE TABLE AS") => {
                Ok(Some(ctas_without_data(one)))
            }
            [one] => Ok(Some(one.clone())),
            _ => Err(ApplyError::DdlSeveral {
                seq,
                statement: text,
            }),
        }
    }

    /// Apply one DDL message of record `seq` inside the open target
    /// transaction (see the module doc).
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
        let Some(statement) = self.ddl_statement(seq, &msg)? else {
            return Ok(());
        };
        // Its lock could wait on a side transaction's, which waits on apply.
        self.abandon_sides(s, "a schema change").await;
        let text = shown(&msg.statement);
        let statement = match without_concurrently(&statement) {
            Some(plain) => {
                tracing::info!(seq, statement = %text, "CONCURRENTLY left out: the statement runs inside the target transaction, holding its lock until the group commits (its source transaction holds more than this statement, or the index has no name for a replay to check)");
                plain
            }
            None => statement,
        };
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

    /// Apply `record`, a source transaction that is one `CONCURRENTLY`
    /// statement ([`alone`]), on its own: no target transaction is open.
    /// The statement runs in autocommit, then the progress row moves past
    /// the record in a transaction of its own (see the module doc for a
    /// crash in between).
    pub(super) async fn apply_alone(
        &self,
        s: &mut Session,
        record: &Record,
        alone: Alone,
    ) -> Result<(), ApplyError> {
        let seq = record.seq;
        if let Some(statement) = self.ddl_statement(seq, &alone.msg)? {
            debug_assert_eq!(statement, alone.statement);
            // CONCURRENTLY waits for every older transaction to end.
            self.abandon_sides(s, "a schema change").await;
            self.session_settings(s, &alone.msg.search_path, Some("0"))
                .await?;
            if let Err(e) = self.run_alone(s, seq, &statement, &alone.shape).await {
                // The session ends with this error, and its settings with it.
                if let Concurrently::CreateIndex { index, table } = &alone.shape {
                    self.drop_failed_build(s, seq, &alone.msg.search_path, table, index)
                        .await;
                }
                return Err(e);
            }
            self.session_settings(s, "", None).await?;
            s.targets.clear();
            s.statements.clear();
            s.set_statements.clear();
        }
        s.client
            .batch_execute("BEGIN")
            .await
            .map_err(target_err("begin target transaction"))?;
        let end = GroupEnd {
            seq,
            commit_lsn: record.commit_lsn,
            end_lsn: record.end_lsn,
            commit_time: record.commit_time,
        };
        self.commit_group(s, end, 1).await
    }

    /// Set the session's `search_path` and, when given, `lock_timeout`
    /// (remembering their values); with `search_path` empty, put back the
    /// remembered ones. Session-wide: in autocommit a transaction-local setting ends
    /// with the statement that set it.
    async fn session_settings(
        &self,
        s: &mut Session,
        search_path: &str,
        lock_timeout: Option<&str>,
    ) -> Result<(), ApplyError> {
        if search_path.is_empty() {
            s.client
                .batch_execute(
                    "SELECT pg_catalog.set_config('search_path', pg_catalog.current_setting('pgcourier.search_path'), false), \
                            pg_catalog.set_config('lock_timeout', pg_catalog.current_setting('pgcourier.lock_timeout'), false)",
                )
                .await
                .map_err(target_err("restore the search_path and lock_timeout"))?;
        } else {
            s.client
                .execute(
                    "SELECT pg_catalog.set_config('pgcourier.search_path', pg_catalog.current_setting('search_path'), false), \
                            pg_catalog.set_config('pgcourier.lock_timeout', pg_catalog.current_setting('lock_timeout'), false), \
                            pg_catalog.set_config('search_path', $1, false), \
                            pg_catalog.set_config('lock_timeout', coalesce($2, pg_catalog.current_setting('lock_timeout')), false)",
                    &[&search_path, &lock_timeout],
                )
                .await
                .map_err(target_err("set the source's search_path"))?;
        }
        Ok(())
    }

    /// Run `statement` (with its `CONCURRENTLY`) in autocommit, under the
    /// source's `search_path`, unless a first run already did it.
    async fn run_alone(
        &self,
        s: &mut Session,
        seq: u64,
        statement: &str,
        shape: &Concurrently,
    ) -> Result<(), ApplyError> {
        let text = shown(statement);
        let ddl_err = |source: tokio_postgres::Error| ApplyError::Ddl {
            seq,
            statement: text.clone(),
            source: source.into(),
        };
        match shape {
            Concurrently::CreateIndex { index, table } => {
                match index_state(s, table, index).await? {
                    Some((true, name)) => {
                        tracing::info!(seq, index = %name, statement = %text, "the index exists and is valid: taken as built (a replay after a restart)");
                        return Ok(());
                    }
                    Some((false, name)) => {
                        tracing::info!(seq, index = %name, statement = %text, "an invalid index of that name is left by an interrupted build: dropping it and building again");
                        s.client
                            .batch_execute(&format!("DROP INDEX CONCURRENTLY {name}"))
                            .await
                            .map_err(ddl_err)?;
                    }
                    None => {}
                }
            }
            Concurrently::DropIndex { index } => {
                let exists: bool = s
                    .client
                    .query_one(
                        "SELECT pg_catalog.to_regclass($1::text) IS NOT NULL",
                        &[index],
                    )
                    .await
                    .and_then(|row| row.try_get(0))
                    .map_err(target_err("look up the index to drop"))?;
                if !exists {
                    tracing::info!(seq, statement = %text, "the index to drop is gone: taken as dropped (a replay after a restart)");
                    return Ok(());
                }
            }
            Concurrently::Reindex => {}
        }
        tracing::info!(seq, statement = %text, "applying schema change on its own, outside a transaction block (it waits for the branch's older transactions, blocking none)");
        s.client.batch_execute(statement).await.map_err(ddl_err)?;
        tracing::info!(seq, statement = %text, "applied schema change");
        Ok(())
    }

    /// After a failed `CREATE INDEX CONCURRENTLY`: drop the invalid index it
    /// left, so that a skip leaves nothing behind (a retry would drop it
    /// too). Best effort: a failure is logged, the build's error is what
    /// apply reports.
    async fn drop_failed_build(
        &self,
        s: &mut Session,
        seq: u64,
        search_path: &str,
        table: &str,
        index: &str,
    ) {
        let result = async {
            // The session's own lock_timeout again: this drop waits for the
            // branch's transactions too, and the build's error should not
            // wait long to be reported.
            self.session_settings(s, "", None).await?;
            self.session_settings(s, search_path, None).await?;
            if let Some((false, name)) = index_state(s, table, index).await? {
                s.client
                    .batch_execute(&format!("DROP INDEX CONCURRENTLY {name}"))
                    .await
                    .map_err(target_err("drop the invalid index"))?;
                tracing::info!(seq, index = %name, "dropped the invalid index the failed build left");
            }
            Ok::<(), ApplyError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(seq, index = %index, error = %pgcourier_common::ops::backoff::error_chain(&e), "could not drop the invalid index a failed build left: a retry drops it; after a skip, drop it by hand");
        }
    }
}

/// The index `index` (as written) in the schema of table `table` (as
/// written, resolved with the session's `search_path`): whether it is
/// valid (`pg_index.indisvalid`) and its name as the session can write it;
/// `None` when there is no index of that name.
async fn index_state(
    s: &Session,
    table: &str,
    index: &str,
) -> Result<Option<(bool, String)>, ApplyError> {
    let row = s
        .client
        .query_opt(
            "SELECT i.indisvalid, i.indexrelid::pg_catalog.regclass::pg_catalog.text \
               FROM pg_catalog.pg_index i \
              WHERE i.indexrelid = pg_catalog.to_regclass( \
                      (SELECT pg_catalog.quote_ident(n.nspname) \
                         FROM pg_catalog.pg_class c \
                         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                        WHERE c.oid = pg_catalog.to_regclass($1::text)) || '.' || $2::text)",
            &[&table, &index],
        )
        .await
        .map_err(target_err("look up the index being built"))?;
    match row {
        Some(row) => Ok(Some((
            row.try_get(0)
                .map_err(target_err("read pg_index.indisvalid"))?,
            row.try_get(1).map_err(target_err("read the index name"))?,
        ))),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(statement: &str, tags: &[&str]) -> DdlMessage {
        DdlMessage {
            statement: statement.into(),
            search_path: "public".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            role: None,
        }
    }

    #[test]
    fn ddl_tables_keeps_table_tags_and_comments_on_tables_only() {
        let (out, inside) = outside_tables(&msg(
            "CREATE TABLE t (id serial)",
            &["CREATE TABLE", "CREATE SEQUENCE", "ALTER SEQUENCE"],
        ));
        assert!(out.is_empty() && inside);
        let (out, inside) = outside_tables(&msg("CREATE VIEW v AS SELECT 1", &["CREATE VIEW"]));
        assert_eq!((out, inside), (vec!["CREATE VIEW".to_string()], false));
        let (out, inside) = outside_tables(&msg("COMMENT ON COLUMN t.a IS 'x'", &["COMMENT"]));
        assert!(out.is_empty() && inside);
        let (out, inside) = outside_tables(&msg("COMMENT ON FUNCTION f() IS 'x'", &["COMMENT"]));
        assert_eq!((out, inside), (vec!["COMMENT".to_string()], false));
        // One statement doing both: a mix.
        let (out, inside) = outside_tables(&msg(
            "CREATE SCHEMA s CREATE TABLE t (a int) CREATE VIEW v AS SELECT a FROM t",
            &["CREATE SCHEMA", "CREATE TABLE", "CREATE VIEW"],
        ));
        assert_eq!((out, inside), (vec!["CREATE VIEW".to_string()], true));
    }

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
