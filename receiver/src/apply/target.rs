//! The target connection: connect, pin the session settings that fix how
//! text values are read (`datestyle`, `intervalstyle`,
//! `extra_float_digits`), create the `pgcourier` schema and progress table
//! (and the join tables, `join.rs`) on first start, read the progress row (the marker: everything at or
//! below it was applied) and prepare the statement that moves it.
//!
//! The connection's driver task is owned by the [`TargetClient`] it serves:
//! [`TargetClient::close`] ends the session and waits for the driver (a
//! bounded wait); dropping the client (apply cancelled at shutdown) aborts
//! it. No driver outlives its client.

use std::ops::Deref;
use std::time::Duration;

use pgcourier_common::pg::connect::{ConnectError, PgConnect};
use pgcourier_common::pg::progress_row;
use pgcourier_proto::cutter::ORIGIN_PREFIX;
use pgcourier_proto::Lsn;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Statement};

use super::error::{target_err, ApplyError};
use super::Apply;
use crate::config::ReceiverConfig;

/// How long [`TargetClient::close`] waits for the server to see the
/// session end before it drops the connection.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// A target connection: the client, and the task driving its socket.
pub(crate) struct TargetClient {
    client: Client,
    /// `None` once [`TargetClient::close`] took it.
    driver: Option<JoinHandle<()>>,
}

impl TargetClient {
    /// Connect to the target (setting `target`) and start the connection's
    /// driver task.
    pub(crate) async fn connect(cfg: &PgConnect) -> Result<Self, ConnectError> {
        let (client, conn) = cfg.connect().await?;
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "target connection ended");
            }
        });
        Ok(TargetClient {
            client,
            driver: Some(driver),
        })
    }

    /// End the session (the driver sends Terminate) and wait for the driver,
    /// at most [`CLOSE_WAIT`]; then it is aborted.
    pub(crate) async fn close(mut self) {
        let driver = self.driver.take();
        drop(self);
        if let Some(mut driver) = driver {
            if tokio::time::timeout(CLOSE_WAIT, &mut driver).await.is_err() {
                tracing::debug!("target connection did not close in time; dropped");
                driver.abort();
            }
        }
    }
}

impl Deref for TargetClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Drop for TargetClient {
    fn drop(&mut self) {
        if let Some(driver) = &self.driver {
            driver.abort();
        }
    }
}

/// A target session ready to apply: where apply stands, and the statement
/// that moves the progress row.
pub(super) struct Connected {
    pub(super) client: TargetClient,
    /// The source this branch follows (from the inbox).
    pub(super) source: String,
    /// Commit LSN of the last applied transaction, from the progress row
    /// (zero when nothing was applied from this source yet).
    pub(super) marker: Lsn,
    /// Inbox seq of the last applied record, from the progress row (zero
    /// when nothing was applied from this source yet).
    pub(super) marker_seq: u64,
    pub(super) progress: Statement,
    /// The replication origin the session applies under (`origin`), by
    /// name: a join's side transaction borrows it for its commit.
    pub(super) origin: Option<String>,
}

/// A target connection with apply's session settings: how text values
/// are read, the lock timeout, and `session_replication_role = replica`
/// when `replica-role` is set. The apply session and a join's side
/// transaction (`join_side.rs`) both start here, so they write alike.
pub(super) async fn open(cfg: &ReceiverConfig) -> Result<TargetClient, ApplyError> {
    let client = TargetClient::connect(&cfg.target)
        .await
        .map_err(ApplyError::Connect)?;
    client
        .batch_execute("SET datestyle = ISO; SET intervalstyle = postgres; SET extra_float_digits = 3; SET lock_timeout = '30s'")
        .await
        .map_err(target_err("set session parameters"))?;
    if cfg.replica_role {
        client
            .batch_execute("SET session_replication_role = replica")
            .await
            .map_err(target_err("set session_replication_role = replica (needs superuser; or set replica-role = false)"))?;
    }
    Ok(client)
}

impl Apply {
    pub(super) async fn connect(&self) -> Result<Connected, ApplyError> {
        let client = open(&self.cfg).await?;
        // Created on the first start; later starts need no CREATE privilege.
        let exists: bool = client
            .query_one("SELECT to_regclass('pgcourier.progress') IS NOT NULL", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(target_err("look up the progress table"))?;
        if !exists {
            client
                .batch_execute(&format!(
                    "SET client_min_messages = warning; {}",
                    progress_row::CREATE_SQL
                ))
                .await
                .map_err(target_err("create the pgcourier schema and progress table"))?;
        }
        // The join tables came later than the progress table: created on
        // the first start of a version that has them.
        let joins: bool = client
            .query_one(
                "SELECT to_regclass('pgcourier.joining') IS NOT NULL \
                 AND to_regclass('pgcourier.held') IS NOT NULL",
                &[],
            )
            .await
            .and_then(|row| row.try_get(0))
            .map_err(target_err("look up the join tables"))?;
        if !joins {
            client
                .batch_execute(&format!(
                    "SET client_min_messages = warning; {}",
                    super::join::CREATE_SQL
                ))
                .await
                .map_err(target_err(
                    "create the join tables (pgcourier.joining, pgcourier.held)",
                ))?;
        }
        let source = loop {
            if let Some(s) = self.inbox.source()? {
                break s;
            }
            // Nothing received yet: wait for the first batch, looking again
            // at least every second.
            let mut rx = self.inbox.subscribe();
            match tokio::time::timeout(Duration::from_secs(1), rx.changed()).await {
                Ok(Ok(())) | Err(_) => {}
                // The inbox's mark is gone (it lives as long as apply, so
                // this does not happen): look again in a second.
                Ok(Err(_)) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        };
        let mut origin = None;
        if self.cfg.origin {
            // Every transaction this session commits carries the origin in
            // its WAL, and a sender capturing this database leaves it out
            // (`ORIGIN_PREFIX`): what came from another site is not sent
            // back there.
            // Named after the sender that shipped (its certificate: the
            // site's identity), so a sender here forwards what came from
            // one of its receivers' sites to the others only; an inbox
            // that has not recorded it yet uses the source.
            let site = self
                .inbox
                .sender_fingerprint()?
                .unwrap_or_else(|| source.clone());
            let name = format!("{ORIGIN_PREFIX}{site}");
            client
                .execute(
                    "SELECT pg_catalog.pg_replication_origin_create($1) WHERE pg_catalog.pg_replication_origin_oid($1) IS NULL",
                    &[&name],
                )
                .await
                .map_err(target_err("create the replication origin apply writes under (needs superuser or EXECUTE on pg_replication_origin_create; or set origin = false)"))?;
            client
                .execute(
                    "SELECT pg_catalog.pg_replication_origin_session_setup($1)",
                    &[&name],
                )
                .await
                .map_err(target_err("apply under the replication origin (needs superuser or EXECUTE on pg_replication_origin_session_setup; or set origin = false)"))?;
            origin = Some(name);
        }
        let (marker, marker_seq) = match progress_row::read(&client, &source).await? {
            Some(p) => (p.commit_lsn, p.seq),
            None => (Lsn::ZERO, 0),
        };
        let progress = progress_row::prepare_write(&client)
            .await
            .map_err(target_err("prepare progress statement"))?;
        Ok(Connected {
            client,
            source,
            marker,
            marker_seq,
            progress,
            origin,
        })
    }
}
