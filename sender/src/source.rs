//! The source database: connection, publication and slot set-up, slot
//! advance, and the prerequisite check behind `pgcourier-sender check`.
//! Errors are classified by `pgcourier_common::pg::errors::classify`, the
//! one SQLSTATE classifier; LSNs the source returns are parsed or refused,
//! never defaulted.

use pgcourier_common::pg::connect::{ConnectError, PgConnect};
use pgcourier_common::store::durable::Synced;
use pgcourier_proto::Lsn;
use tokio_postgres::Client;

use crate::config::SenderConfig;
use pgcourier_common::ops::backoff::error_chain;
use pgcourier_common::pg::errors::{classify, PgError};
use pgcourier_common::pg::{conflict, ddl, quote_ident, quote_table};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Connect(ConnectError),
    #[error("the source database refused the login (setting `source`): {hint}")]
    LoginRefused {
        hint: &'static str,
        #[source]
        source: ConnectError,
    },
    #[error("source query failed: {what}")]
    Query {
        what: &'static str,
        #[source]
        source: PgError,
    },
    #[error("source is not ready: {0}")]
    NotReady(String),
    #[error("another pgcourier sender ({holder}) is capturing from slot {slot} on this source: stop it; two senders on one slot would each miss what the other captured")]
    SlotBusy { slot: String, holder: String },
    #[error("the spool belongs to source {spool} but setting `source` points at {configured}: use a new spool-dir for a new source")]
    WrongSource { spool: String, configured: String },
    #[error(
        "replication slot {slot} has confirmed the source's changes up to {slot_lsn}, which is ahead of the spool ({spool}): \
         the changes in between are in no spool, and the slot will never return them again. \
         The spool is older than the slot: restored from a backup or a VM snapshot, or a new spool-dir on a slot that captured before. \
         Point spool-dir back at the spool that captured from this slot, or re-seed the branches: stop the sender and every receiver, \
         drop the slot on the source (SELECT pg_drop_replication_slot('{slot}')), then start with a new spool-dir and new inbox-dirs \
         so that every branch gets a fresh copy"
    )]
    SlotAhead {
        slot: String,
        slot_lsn: Lsn,
        /// What the spool holds, in words.
        spool: String,
    },
    #[error(
        "the source returned {what} = {text:?}, which is not an LSN: is it PostgreSQL 15 or later?"
    )]
    InvalidLsn { what: &'static str, text: String },
    #[error("the source's catalog returned {what}: is it PostgreSQL 15 or later?")]
    Catalog { what: String },
}

impl SourceError {
    pub fn query(what: &'static str, source: tokio_postgres::Error) -> SourceError {
        SourceError::Query {
            what,
            source: PgError(source),
        }
    }

    pub fn is_transient(&self) -> bool {
        match self {
            // Retried: after a kill the lock holder's backend may linger a moment.
            SourceError::SlotBusy { .. } => true,
            // Unreachable or starting: retried; TLS refused or failed: the
            // operator must act (sslmode, sslrootcert, the certificate).
            SourceError::Connect(e) => e.is_transient(),
            SourceError::Query { source, .. } => classify(&source.0).transient,
            SourceError::NotReady(_)
            | SourceError::InvalidLsn { .. }
            | SourceError::Catalog { .. }
            | SourceError::WrongSource { .. }
            | SourceError::SlotAhead { .. }
            | SourceError::LoginRefused { .. } => false,
        }
    }
}

/// Parse an LSN the source returned as text (`what` names the column or
/// function, for the error). Never defaults: the LSN is a position the slot
/// or the spool will trust.
pub fn parse_lsn(what: &'static str, text: &str) -> Result<Lsn, SourceError> {
    text.parse().map_err(|_| SourceError::InvalidLsn {
        what,
        text: text.to_owned(),
    })
}

/// A source connection: the client, and the task that drives its socket.
/// The task is tied to the client: [`SourceClient::close`] ends both
/// cleanly; dropping the client aborts the task. Derefs to the
/// `tokio_postgres::Client`.
pub struct SourceClient {
    /// `None` only inside [`SourceClient::close`].
    client: Option<Client>,
    driver: tokio::task::JoinHandle<()>,
}

impl std::ops::Deref for SourceClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        self.client
            .as_ref()
            .expect("a SourceClient holds its client until close() consumes it")
    }
}

impl Drop for SourceClient {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl SourceClient {
    /// Close the connection the polite way (PostgreSQL sees a Terminate,
    /// and ends an open transaction quietly), waiting at most a second for
    /// the driver to finish.
    pub async fn close(mut self) {
        drop(self.client.take());
        // Still running after that: aborted when `self` drops.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), &mut self.driver).await;
    }
}

/// Connect to the source, with the session settings capture relies on.
pub async fn connect(cfg: &PgConnect) -> Result<SourceClient, SourceError> {
    let (client, conn) = cfg.connect().await.map_err(|e| match e.login_refused() {
        Some(hint) => SourceError::LoginRefused { hint, source: e },
        None => SourceError::Connect(e),
    })?;
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "source connection ended");
        }
    });
    let client = SourceClient {
        client: Some(client),
        driver,
    };
    // Render values the way PostgreSQL's own walreceiver asks for them.
    client
        .batch_execute(
            "SET datestyle = ISO; SET intervalstyle = postgres; SET extra_float_digits = 3",
        )
        .await
        .map_err(|e| SourceError::query("set session parameters", e))?;
    Ok(client)
}

pub struct SourceIdentity {
    /// `<system identifier>/<database>/<slot>`.
    pub source_id: String,
    pub confirmed_flush: Lsn,
    /// The slot was created by this call (it did not exist).
    pub created_slot: bool,
}

/// Check wal_level, create the publication and slot when absent, and return
/// the source identity and the slot's confirmed position.
///
/// `resuming`: the spool has captured from this slot before, so a missing
/// slot is not created again (that would silently skip every change made
/// since it went away): it is a definite error.
pub async fn prepare(
    client: &Client,
    cfg: &SenderConfig,
    resuming: bool,
) -> Result<SourceIdentity, SourceError> {
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(|e| SourceError::query("read wal_level", e))?
        .get(0);
    if wal_level != "logical" {
        return Err(SourceError::NotReady(format!(
            "wal_level is {wal_level}: run ALTER SYSTEM SET wal_level = logical and restart the source"
        )));
    }
    // One sender per slot: a session-level advisory lock on the capture
    // connection, released when that connection ends.
    let row = client
        .query_one(
            "SELECT pg_try_advisory_lock(k), k FROM (SELECT hashtextextended('pgcourier slot ' || $1, 0) AS k) x",
            &[&cfg.slot],
        )
        .await
        .map_err(|e| SourceError::query("take the slot's advisory lock", e))?;
    if !row.get::<_, bool>(0) {
        let key: i64 = row.get(1);
        let pid = client
            .query_opt(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
                 AND ((classid::bigint << 32) | objid::bigint) = $1 LIMIT 1",
                &[&key],
            )
            .await
            .map_err(|e| SourceError::query("look up the slot's advisory lock", e))?
            .map(|r| r.get::<_, i32>(0));
        return Err(SourceError::SlotBusy {
            slot: cfg.slot.clone(),
            holder: match pid {
                Some(pid) => format!("source backend pid {pid}"),
                None => "a source backend that has just ended".into(),
            },
        });
    }
    let row = client
        .query_one(
            "SELECT system_identifier::text, current_database()::text FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| SourceError::query("read system identifier", e))?;
    let source_id = format!(
        "{}/{}/{}",
        row.get::<_, String>(0),
        row.get::<_, String>(1),
        cfg.slot
    );

    let has_pub = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await
        .map_err(|e| SourceError::query("look up publication", e))?
        .is_some();
    if !has_pub {
        let sql = if cfg.tables.is_empty() {
            format!(
                "CREATE PUBLICATION {} FOR ALL TABLES",
                quote_ident(&cfg.publication)
            )
        } else {
            let tables: Vec<String> = cfg.tables.iter().map(|t| quote_table(t)).collect();
            format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                quote_ident(&cfg.publication),
                tables.join(", ")
            )
        };
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| SourceError::query("create publication", e))?;
        tracing::info!(publication = %cfg.publication, "created publication");
    }

    if cfg.ddl_capture {
        install_ddl_capture(client, &cfg.publication).await?;
    }
    install_two_way(client, cfg).await?;

    let slot = client
        .query_opt(
            "SELECT plugin::text, database::text, confirmed_flush_lsn::text, wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .map_err(|e| SourceError::query("look up replication slot", e))?;
    let created_slot = slot.is_none();
    let confirmed = match slot {
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            let database: Option<String> = row.get(1);
            let wal_status: Option<String> = row.get(3);
            if plugin.as_deref() != Some("pgoutput")
                || database.as_deref() != Some(source_id.split('/').nth(1).unwrap_or(""))
            {
                return Err(SourceError::NotReady(format!(
                    "replication slot {} exists but is not a pgoutput slot of this database: choose another `slot` name",
                    cfg.slot
                )));
            }
            if wal_status.as_deref() == Some("lost") {
                return Err(SourceError::NotReady(format!(
                    "replication slot {} has lost required WAL (max_slot_wal_keep_size): the branch must be re-seeded; drop the slot and start again",
                    cfg.slot
                )));
            }
            match row.get::<_, Option<String>>(2) {
                Some(text) => parse_lsn("pg_replication_slots.confirmed_flush_lsn", &text)?,
                None => {
                    return Err(SourceError::NotReady(format!(
                    "replication slot {} has no confirmed_flush_lsn (is it still being created?)",
                    cfg.slot
                )))
                }
            }
        }
        None if resuming => {
            return Err(SourceError::NotReady(format!(
                "replication slot {} is gone (dropped?) although this spool captured from it: changes made since it went away cannot be captured; the stream cannot be continued: re-seed the branches (copy the tables), then start with a new spool-dir and inbox-dir",
                cfg.slot
            )));
        }
        None => {
            let row = client
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&cfg.slot],
                )
                .await
                .map_err(|e| SourceError::query("create replication slot", e))?;
            let lsn = parse_lsn("pg_create_logical_replication_slot().lsn", row.get(0))?;
            tracing::info!(slot = %cfg.slot, lsn = %lsn, "created replication slot");
            lsn
        }
    };
    Ok(SourceIdentity {
        source_id,
        confirmed_flush: confirmed,
        created_slot,
    })
}

/// Install (or replace) the event trigger that puts DDL into the WAL
/// (`pgcourier_common::pg::ddl`), when the role is a superuser (event
/// triggers need one on PostgreSQL 15). Otherwise one warning: DDL is then
/// not replicated, and a branch pauses at the first change it cannot apply,
/// as before.
pub async fn install_ddl_capture(client: &Client, publication: &str) -> Result<(), SourceError> {
    if !is_superuser(client).await? {
        if !ddl_capture_enabled(client).await? {
            tracing::warn!(
                "schema changes are not replicated: the sender's role is not a superuser and cannot install the DDL event trigger; run `pgcourier-sender check` for the SQL a superuser can run"
            );
        }
        return Ok(());
    }
    client
        .batch_execute(&ddl::install_sql(None, publication))
        .await
        .map_err(|e| SourceError::query("install the DDL event trigger", e))?;
    Ok(())
}

/// Whether the sender's role is a superuser (event triggers and the
/// row-clock install need one).
async fn is_superuser(client: &Client) -> Result<bool, SourceError> {
    client
        .query_one(
            "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| SourceError::query("read role attributes", e))
}

/// Tables written at several sites (`[[table]] direction = "both"`): the
/// clock and conflict functions installed or replaced, each table
/// registered and stamped (`pgcourier_common::pg::conflict`). Needs a
/// superuser, as the DDL trigger does.
async fn install_two_way(client: &Client, cfg: &SenderConfig) -> Result<(), SourceError> {
    let Some(site) = cfg.site.as_deref().filter(|_| !cfg.two_way.is_empty()) else {
        return Ok(());
    };
    if !is_superuser(client).await? {
        return Err(SourceError::NotReady(
            "tables with direction = \"both\" need the sender's role to be a superuser (it installs the row-clock trigger and signs with the DDL key)".into(),
        ));
    }
    let mut sql = conflict::install_sql(site, cfg.site_priority);
    for t in &cfg.two_way {
        sql.push_str(&conflict::two_way_sql(&t.table, &t.policy, &t.delta));
    }
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| {
            SourceError::query(
                "install the row clocks of the tables with direction = \"both\" ([[table]] entries: does each exist, with a primary key?)",
                e,
            )
        })?;
    Ok(())
}

/// The key the DDL trigger signs its messages with; `Err` says why it
/// cannot be read (not installed, or the role may not read it).
pub async fn read_ddl_key(client: &Client) -> Result<Result<Vec<u8>, String>, SourceError> {
    let sql = format!(
        "SELECT key FROM {}.{}",
        quote_ident(ddl::DDL_SCHEMA),
        quote_ident(ddl::DDL_KEY_TABLE)
    );
    match client.query_opt(&sql, &[]).await {
        Ok(Some(row)) => match row.try_get::<_, Vec<u8>>(0) {
            // The install makes 32 random bytes; a short key (set by hand)
            // would let anyone sign.
            Ok(key) if key.len() >= 16 => Ok(Ok(key)),
            Ok(key) => Ok(Err(format!(
                "{}.{} holds a key of {} bytes (at least 16 are needed; delete the row and run the sender as a superuser to make a new one)",
                ddl::DDL_SCHEMA,
                ddl::DDL_KEY_TABLE,
                key.len()
            ))),
            Err(e) => Err(SourceError::query("read the DDL signing key", e)),
        },
        Ok(None) => Ok(Err(format!(
            "{}.{} is empty",
            ddl::DDL_SCHEMA,
            ddl::DDL_KEY_TABLE
        ))),
        Err(e) => match e.code().map(|c| c.code()) {
            Some("42P01" | "3F000") => Ok(Err(format!(
                "{}.{} does not exist (the DDL trigger is not installed)",
                ddl::DDL_SCHEMA,
                ddl::DDL_KEY_TABLE
            ))),
            Some("42501") => Ok(Err(format!(
                "the sender's role may not read {}.{}",
                ddl::DDL_SCHEMA,
                ddl::DDL_KEY_TABLE
            ))),
            _ => Err(SourceError::query("read the DDL signing key", e)),
        },
    }
}

/// Whether the DDL event trigger exists and is enabled.
pub async fn ddl_capture_enabled(client: &Client) -> Result<bool, SourceError> {
    let row = client
        .query_opt(
            "SELECT evtenabled::text FROM pg_catalog.pg_event_trigger WHERE evtname = $1",
            &[&ddl::DDL_TRIGGER],
        )
        .await
        .map_err(|e| SourceError::query("look up the DDL event trigger", e))?;
    Ok(row.is_some_and(|r| r.get::<_, String>(0) != "D"))
}

/// Confirm the slot up to `to`: the source may then recycle the WAL below
/// it. Takes a [`Synced`] position only: the spool holds (fsynced)
/// everything the slot confirms (invariant 1).
pub async fn advance_slot(client: &Client, slot: &str, to: Synced<Lsn>) -> Result<(), SourceError> {
    let to = to.get();
    client
        .query_one(
            "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
            &[&slot, &to.to_string()],
        )
        .await
        .map_err(|e| SourceError::query("advance replication slot", e))?;
    Ok(())
}

/// What the source keeps for our slot.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SlotStats {
    pub slot: String,
    pub active: bool,
    pub restart_lsn: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    /// WAL the source keeps for this slot (current WAL position − restart LSN).
    pub retained_wal_bytes: Option<i64>,
    pub wal_status: Option<String>,
}

pub async fn slot_stats(client: &Client, slot: &str) -> Result<Option<SlotStats>, SourceError> {
    let row = client
        .query_opt(
            "SELECT active, restart_lsn::text, confirmed_flush_lsn::text,                     (pg_current_wal_lsn() - restart_lsn)::bigint, wal_status              FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| SourceError::query("read replication slot statistics", e))?;
    Ok(row.map(|r| SlotStats {
        slot: slot.to_owned(),
        active: r.get(0),
        restart_lsn: r.get(1),
        confirmed_flush_lsn: r.get(2),
        retained_wal_bytes: r.get(3),
        wal_status: r.get(4),
    }))
}

/// One prerequisite problem found by `check`, with its fix.
pub struct Problem {
    pub what: String,
    pub fix: String,
}

/// Verify what `run` needs, without changing anything. Returns the problems
/// (empty when ready) and informational notes.
pub async fn check(cfg: &SenderConfig) -> (Vec<Problem>, Vec<String>) {
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let client = match connect(&cfg.source).await {
        Ok(c) => c,
        Err(e) => {
            problems.push(Problem {
                what: format!("cannot connect to the source: {}", error_chain(&e)),
                fix: "correct the `source` connection string (and password-env / password-file)"
                    .into(),
            });
            return (problems, notes);
        }
    };
    let q = |what: &'static str, e: tokio_postgres::Error| Problem {
        what: format!("{what}: {}", PgError(e)),
        fix: "check the role's privileges".into(),
    };
    match client.query_one("SHOW wal_level", &[]).await {
        Ok(row) => {
            let level: String = row.get(0);
            if level != "logical" {
                problems.push(Problem {
                    what: format!("wal_level is {level}"),
                    fix: "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL".into(),
                });
            }
        }
        Err(e) => problems.push(q("read wal_level", e)),
    }
    let mut superuser = false;
    let mut role = None;
    match client
        .query_one("SELECT rolsuper, rolreplication, current_user::text FROM pg_roles WHERE rolname = current_user", &[])
        .await
    {
        Ok(row) => {
            let (sup, repl, user): (bool, bool, String) = (row.get(0), row.get(1), row.get(2));
            superuser = sup;
            role = Some(user.clone());
            if !sup && !repl {
                problems.push(Problem {
                    what: format!("role {user} has neither REPLICATION nor SUPERUSER"),
                    fix: format!("ALTER ROLE {} REPLICATION", quote_ident(&user)),
                });
            }
        }
        Err(e) => problems.push(q("read role attributes", e)),
    }
    match client
        .query_opt(
            "SELECT plugin::text, database::text = current_database(), active, wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
    {
        Ok(None) => notes.push(format!("replication slot {} is absent: run will create it", cfg.slot)),
        Ok(Some(row)) => {
            let plugin: Option<String> = row.get(0);
            let same_db: Option<bool> = row.get(1);
            let active: bool = row.get(2);
            let wal_status: Option<String> = row.get(3);
            if plugin.as_deref() != Some("pgoutput") || same_db != Some(true) {
                problems.push(Problem {
                    what: format!("replication slot {} is not a pgoutput slot of this database", cfg.slot),
                    fix: "choose another `slot` name, or drop that slot if it is unused".into(),
                });
            }
            if active {
                notes.push(format!("replication slot {} is in use by another session right now", cfg.slot));
            }
            if wal_status.as_deref() == Some("lost") {
                problems.push(Problem {
                    what: format!("replication slot {} has lost WAL it needed", cfg.slot),
                    fix: "drop the slot and re-seed the branches".into(),
                });
            }
        }
        Err(e) => problems.push(q("read replication slots", e)),
    }
    let has_pub = match client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await
    {
        Ok(r) => r.is_some(),
        Err(e) => {
            problems.push(q("read publications", e));
            false
        }
    };
    if !has_pub {
        notes.push(format!(
            "publication {} is absent: run will create it",
            cfg.publication
        ));
    }
    match ddl_capture_enabled(&client).await {
        Ok(true) if !cfg.ddl_capture => notes.push(format!(
            "the DDL event trigger {} is installed and enabled although ddl-capture is off: schema changes are still replicated; to stop it, as a superuser: DROP EVENT TRIGGER {0}; DROP EVENT TRIGGER {0}_drops;",
            ddl::DDL_TRIGGER
        )),
        Ok(false) if !cfg.ddl_capture => {}
        Ok(true) => match read_ddl_key(&client).await {
            Ok(Ok(_)) => {}
            Ok(Err(why)) => problems.push(Problem {
                what: format!("schema changes would not be replicated: {why}"),
                fix: format!(
                    "run as a superuser on the source database:\n{}",
                    ddl::install_sql(role.as_deref().filter(|_| !superuser), &cfg.publication)
                ),
            }),
            Err(e) => problems.push(Problem {
                what: error_chain(&e),
                fix: "check the role's privileges".into(),
            }),
        },
        Ok(false) if superuser => notes.push(format!(
            "the DDL event trigger {} is absent or disabled: run will install it",
            ddl::DDL_TRIGGER
        )),
        Ok(false) => problems.push(Problem {
            what: format!(
                "the DDL event trigger {} is missing or disabled: schema changes would not be replicated (run installs it when its role is a superuser)",
                ddl::DDL_TRIGGER
            ),
            fix: format!(
                "run as a superuser on the source database:\n{}",
                ddl::install_sql(role.as_deref(), &cfg.publication)
            ),
        }),
        Err(e) => problems.push(Problem {
            what: error_chain(&e),
            fix: "check the role's privileges".into(),
        }),
    }
    // Tables whose updates and deletes could not be replicated.
    let tables_sql = "SELECT n.nspname::text, c.relname::text, c.relreplident::text, \
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
                      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                      WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgcourier') \
                        AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'";
    match client.query(tables_sql, &[]).await {
        Ok(rows) => {
            let published: Option<Vec<(String, String)>> = if has_pub {
                match client
                    // pgcourier's own tables (the DDL key, which FOR ALL
                    // TABLES publishes) are never carried: not listed.
                    .query("SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 AND schemaname <> $2", &[&cfg.publication, &pgcourier_proto::cutter::OWN_SCHEMA])
                    .await
                {
                    Ok(rows) => Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect()),
                    Err(e) => {
                        problems.push(q("read the publication's tables", e));
                        None
                    }
                }
            } else if !cfg.tables.is_empty() {
                Some(
                    cfg.tables
                        .iter()
                        .map(|t| match t.split_once('.') {
                            Some((s, n)) => (s.to_owned(), n.to_owned()),
                            None => ("public".to_owned(), t.clone()),
                        })
                        .collect(),
                )
            } else {
                None
            };
            if let Some(list) = &published {
                for (s, t) in list {
                    if !rows
                        .iter()
                        .any(|r| r.get::<_, String>(0) == *s && r.get::<_, String>(1) == *t)
                    {
                        problems.push(Problem {
                            what: format!(
                                "table {} does not exist on the source",
                                quote_table(&format!("{s}.{t}"))
                            ),
                            fix: "create it or remove it from `tables`".into(),
                        });
                    }
                }
            }
            for r in &rows {
                let (s, t, ident, has_pk): (String, String, String, bool) =
                    (r.get(0), r.get(1), r.get(2), r.get(3));
                if let Some(list) = &published {
                    if !list.iter().any(|(ps, pt)| *ps == s && *pt == t) {
                        continue;
                    }
                }
                let name = format!("{}.{}", quote_ident(&s), quote_ident(&t));
                if ident == "n" || (ident == "d" && !has_pk) {
                    problems.push(Problem {
                        what: format!("table {name} has no primary key and no replica identity: its updates and deletes would fail"),
                        fix: format!("add a primary key, or ALTER TABLE {name} REPLICA IDENTITY FULL"),
                    });
                }
            }
        }
        Err(e) => problems.push(q("list tables", e)),
    }
    check_two_way(&client, cfg, superuser, &mut problems).await;
    (problems, notes)
}

/// What `run` needs for the tables written at several sites: a superuser
/// (it installs the row clocks), and each table present with a primary
/// key, its `delta` columns numeric columns of it.
async fn check_two_way(
    client: &Client,
    cfg: &SenderConfig,
    superuser: bool,
    problems: &mut Vec<Problem>,
) {
    if cfg.two_way.is_empty() {
        return;
    }
    if !superuser {
        problems.push(Problem {
            what: "tables with direction = \"both\" need row clocks, which run installs only as a superuser".into(),
            fix: "run the sender as a superuser role, or leave those tables one-way".into(),
        });
    }
    let sql = format!(
        "SELECT to_regclass($1) IS NOT NULL, \
                EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
                         WHERE i.indrelid = to_regclass($1) AND i.indisprimary), \
                ARRAY(SELECT d FROM unnest($2::text[]) d \
                       WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a \
                                          WHERE a.attrelid = to_regclass($1) AND a.attname = d \
                                            AND NOT a.attisdropped AND a.atttypid IN {}))",
        conflict::DELTA_TYPES
    );
    for t in &cfg.two_way {
        let row = match client.query_one(&sql, &[&t.table, &t.delta]).await {
            Ok(row) => row,
            Err(e) => {
                problems.push(Problem {
                    what: format!(
                        "cannot check two-way table {}: {}",
                        t.table,
                        error_chain(&e)
                    ),
                    fix: "check the role's privileges".into(),
                });
                continue;
            }
        };
        let (exists, has_pk, bad): (bool, bool, Vec<String>) = (row.get(0), row.get(1), row.get(2));
        if !exists {
            problems.push(Problem {
                what: format!("two-way table {} ([[table]] direction = \"both\") does not exist here", t.table),
                fix: "create it, with the same definition at every site, or remove its [[table]] entry".into(),
            });
        } else if !has_pk {
            problems.push(Problem {
                what: format!("two-way table {} has no primary key: its rows' clocks are kept by key", t.table),
                fix: format!("ALTER TABLE {} ADD PRIMARY KEY (...), or leave it one-way (direction = \"down\")", t.table),
            });
        }
        if exists && !bad.is_empty() {
            problems.push(Problem {
                what: format!("delta columns {} of two-way table {} are not numeric columns of it", bad.join(", "), t.table),
                fix: "list in delta only numeric columns (integer, bigint, numeric, real, double precision) of the table".into(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgcourier_common::ops::backoff::error_chain;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// A one-shot server on 127.0.0.1 that lets the login in, then answers
    /// the first query (capture's session settings) with an ErrorResponse
    /// whose message and DETAIL carry a row value, as a source error on a
    /// row (a bad value, a duplicate key) does.
    async fn source_failing_its_first_query(value: &'static str) -> SourceError {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let len = sock.read_i32().await.unwrap();
            let mut startup = vec![0; usize::try_from(len).unwrap() - 4];
            sock.read_exact(&mut startup).await.unwrap();
            let mut out = message(b'R', &0i32.to_be_bytes());
            out.extend(message(b'Z', b"I"));
            sock.write_all(&out).await.unwrap();
            let _tag = sock.read_u8().await.unwrap();
            let len = sock.read_i32().await.unwrap();
            let mut query = vec![0; usize::try_from(len).unwrap() - 4];
            sock.read_exact(&mut query).await.unwrap();
            let mut fields = Vec::new();
            for (tag, text) in [
                (b'S', "ERROR".to_owned()),
                (b'V', "ERROR".to_owned()),
                (b'C', "22P02".to_owned()),
                (
                    b'M',
                    format!("invalid input syntax for type integer: \"{value}\""),
                ),
                (b'D', format!("Key (code)=({value}) is the culprit.")),
            ] {
                fields.push(tag);
                fields.extend_from_slice(text.as_bytes());
                fields.push(0);
            }
            fields.push(0);
            let mut out = message(b'E', &fields);
            out.extend(message(b'Z', b"I"));
            sock.write_all(&out).await.unwrap();
            // Hold the connection until the client has read the answer.
            let mut rest = Vec::new();
            let _ = sock.read_to_end(&mut rest).await;
        });
        let cfg = PgConnect::from_conninfo(
            "source",
            &format!("host=127.0.0.1 port={port} user=courier dbname=postgres sslmode=disable"),
        )
        .unwrap();
        let Err(e) = connect(&cfg).await else {
            panic!("the session settings query succeeded on the test server");
        };
        server.abort();
        e
    }

    #[tokio::test]
    async fn a_source_error_is_reported_without_row_values() {
        let value = "zebra-secret-7731";
        let e = source_failing_its_first_query(value).await;
        let text = error_chain(&e);
        assert!(
            !text.contains(value),
            "a row value reached the error text: {text}"
        );
        assert!(text.contains("22P02"), "the SQLSTATE is kept: {text}");
        assert!(!e.is_transient(), "22P02 is definite");
    }
}
