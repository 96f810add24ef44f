//! The target connection: connect, pin the session settings that fix how
//! text values are read (`datestyle`, `intervalstyle`,
//! `extra_float_digits`), create the `pgcourier` schema and progress table
//! on first start, read the progress row (the marker: everything at or
//! below it was applied) and prepare the statement that moves it.

use std::time::Duration;

use pgcourier_proto::Lsn;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, Statement};

use super::error::ApplyError;
use super::Apply;

impl Apply {
    pub(super) async fn connect(&self) -> Result<(Client, String, Lsn, Statement), ApplyError> {
        let (client, conn) = self
            .cfg
            .target
            .connect(NoTls)
            .await
            .map_err(ApplyError::Connect)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "target connection ended");
            }
        });
        let target = |what: &str| {
            let what = what.to_owned();
            move |source| ApplyError::Target { what, source }
        };
        client
            .batch_execute("SET datestyle = ISO; SET intervalstyle = postgres; SET extra_float_digits = 3; SET lock_timeout = '30s'")
            .await
            .map_err(target("set session parameters"))?;
        if self.cfg.replica_role {
            client
                .batch_execute("SET session_replication_role = replica")
                .await
                .map_err(target("set session_replication_role = replica (needs superuser; or set replica-role = false)"))?;
        }
        // Created on the first start; later starts need no CREATE privilege.
        let exists = client
            .query_one("SELECT to_regclass('pgcourier.progress') IS NOT NULL", &[])
            .await
            .map_err(target("look up the progress table"))?
            .get::<_, bool>(0);
        if !exists {
            client
            .batch_execute(
                "SET client_min_messages = warning; CREATE SCHEMA IF NOT EXISTS pgcourier; \
                 CREATE TABLE IF NOT EXISTS pgcourier.progress ( \
                   source text PRIMARY KEY, commit_lsn pg_lsn NOT NULL, end_lsn pg_lsn NOT NULL, \
                   seq bigint NOT NULL, commit_time timestamptz, applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .map_err(target("create the pgcourier schema and progress table"))?;
        }
        let source = loop {
            if let Some(s) = self.inbox.source()? {
                break s;
            }
            // Nothing received yet: wait for the first batch.
            let mut rx = self.inbox.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
        };
        let row = client
            .query_opt(
                "SELECT commit_lsn::text, seq FROM pgcourier.progress WHERE source = $1",
                &[&source],
            )
            .await
            .map_err(target("read progress"))?;
        let marker = match row {
            Some(r) => r.get::<_, String>(0).parse().unwrap_or(Lsn::ZERO),
            None => Lsn::ZERO,
        };
        let progress = client
            .prepare_typed(
                "INSERT INTO pgcourier.progress (source, commit_lsn, end_lsn, seq, commit_time, applied_at) \
                 VALUES ($1, $2::text::pg_lsn, $3::text::pg_lsn, $4, \
                         '2000-01-01 00:00:00+00'::timestamptz + $5::bigint * interval '1 microsecond', now()) \
                 ON CONFLICT (source) DO UPDATE SET commit_lsn = EXCLUDED.commit_lsn, end_lsn = EXCLUDED.end_lsn, \
                   seq = EXCLUDED.seq, commit_time = EXCLUDED.commit_time, applied_at = EXCLUDED.applied_at",
                &[Type::TEXT, Type::TEXT, Type::TEXT, Type::INT8, Type::INT8],
            )
            .await
            .map_err(target("prepare progress statement"))?;
        Ok((client, source, marker, progress))
    }
}
