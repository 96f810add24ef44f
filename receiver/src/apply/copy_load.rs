//! Loading a table copy (the initial copy, a table that joins the
//! publication, a copy made for a receiver added later) or a seed file: the
//! copy's metadata creates missing tables when `create-tables` allows, and
//! its progress is tracked per table; its rows then go through the ordinary
//! path (TRUNCATE, runs of inserts as COPY) and commit as one transaction
//! with the progress row. A copy that starts a join in chunks (CopyMeta
//! `join`) or abandons joins (`aborts`) goes on in `join.rs`.

use pgcourier_common::pg::quote_ident;
use pgcourier_common::store::seed_file::{CopyMeta, SeedReader};
use pgcourier_proto::record::Record;

use super::error::{target_err, ApplyError};
use super::status::LoadProgress;
use super::{Apply, GroupEnd, Session};

impl Apply {
    /// A copy transaction begins: create its missing tables when allowed,
    /// and track its progress.
    pub(super) async fn start_copy(
        &self,
        s: &mut Session,
        seq: u64,
        content: &[u8],
    ) -> Result<(), ApplyError> {
        let meta: CopyMeta = serde_json::from_slice(content).map_err(|e| ApplyError::CopyMeta {
            seq,
            message: e.to_string(),
        })?;
        // Abandoned joins go before anything else of this copy, which
        // holds their tables' rows (`join.rs`); so does a join of a table
        // this copy holds, named or not (the sender's note of it may have
        // been lost with a crash).
        let mut aborts = meta.aborts.clone();
        aborts.extend(
            meta.tables
                .iter()
                .filter_map(|t| s.joins.loading_id(t.oid))
                .filter(|id| !meta.aborts.contains(id)),
        );
        aborts.sort_unstable();
        aborts.dedup();
        if !aborts.is_empty() {
            self.abort_joins(s, seq, &aborts).await?;
        }
        if self.cfg.create_tables {
            // Every table's DDL is built (types validated) before any runs;
            // then one statement per call, never a batch.
            let mut statements = Vec::with_capacity(meta.tables.len() * 2);
            for t in &meta.tables {
                let create = t.create_sql().map_err(|e| ApplyError::CopyMeta {
                    seq,
                    message: e.to_string(),
                })?;
                statements.push((
                    t,
                    format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(&t.schema)),
                ));
                statements.push((t, create));
            }
            self.drain(s).await?;
            for (t, sql) in statements {
                s.client
                    .execute(sql.as_str(), &[])
                    .await
                    .map_err(|e| ApplyError::Target {
                        what: format!("create table {} (setting `create-tables`)", t.quoted()),
                        source: e.into(),
                    })?;
            }
        }
        if let Some(id) = meta.join {
            // No rows in this transaction: they follow in chunks.
            return self.start_join(s, seq, id, &meta).await;
        }
        let progress = LoadProgress {
            reason: meta.reason.clone(),
            cut_lsn: meta.cut_lsn.to_string(),
            first_seq: seq,
            rows_estimate: meta.tables.iter().map(|t| t.rows_estimate).sum(),
            tables: meta
                .tables
                .iter()
                .map(|t| (t.quoted(), 0, t.rows_estimate))
                .collect(),
            started: Some(std::time::Instant::now()),
            oids: meta.tables.iter().map(|t| t.oid).collect(),
            ..LoadProgress::default()
        };
        tracing::info!(seq, reason = %meta.reason, cut = %meta.cut_lsn, tables = meta.tables.len(), rows_estimate = progress.rows_estimate, "loading a table copy");
        self.status.lock().expect("status lock").copy = Some(progress.clone());
        s.copy = Some(progress);
        Ok(())
    }

    /// Apply a seed file's copy transaction (verified beforehand by a full
    /// read) and move the progress row to the seed's marker, in one target
    /// transaction. Returns the rows loaded.
    pub async fn apply_seed(
        &self,
        reader: &mut SeedReader,
        mut on_progress: impl FnMut(&LoadProgress),
    ) -> Result<u64, ApplyError> {
        let mut s = self.new_session().await?;
        if s.marker >= reader.header.commit_lsn {
            return Err(ApplyError::Order {
                seq: reader.header.marker_seq,
                message: format!(
                    "the branch has applied up to {}, at or past the seed's {}",
                    s.marker, reader.header.commit_lsn
                ),
            });
        }
        s.client
            .batch_execute("BEGIN")
            .await
            .map_err(target_err("begin target transaction"))?;
        let mut commit_time = 0;
        while let Some(bytes) = reader.next_record()? {
            let record =
                Record::decode(&bytes).map_err(|source| ApplyError::Corrupt { seq: 0, source })?;
            commit_time = record.commit_time;
            self.queue_record(&mut s, &record).await?;
            if s.pipeline_full() {
                self.drain(&mut s).await?;
            }
            if let Some(c) = s.copy.as_mut() {
                if record.seq % 64 == 0 {
                    c.refresh();
                    on_progress(c);
                }
                if record.last {
                    c.complete = true;
                }
            }
        }
        let rows = s.copy.as_ref().map_or(0, |c| c.rows);
        let end = GroupEnd {
            seq: reader.header.marker_seq,
            commit_lsn: reader.header.commit_lsn,
            end_lsn: reader.header.cut_lsn,
            commit_time,
        };
        self.commit_group(&mut s, end, 1).await?;
        s.client.close().await;
        Ok(rows)
    }
}
