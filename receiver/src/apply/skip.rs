//! The operator's skip (`pgcourier-queue skip SEQ --reason ..`, through the
//! admin endpoint): only the transaction blocking a paused apply may be
//! skipped; apply then records it, with its content, in `pgcourier.skipped`
//! and moves the progress row past it in one target transaction, instead of
//! applying it.

use std::collections::HashMap;

use pgcourier_proto::pgoutput::Relation;
use pgcourier_proto::record::Record;

use super::error::{target_err, ApplyError};
use super::{Apply, GroupEnd, Session};

impl Apply {
    /// Ask apply to skip the transaction starting at record `seq`. Allowed
    /// only for the transaction that is blocking apply.
    pub fn request_skip(&self, seq: u64, reason: &str) -> Result<(), String> {
        if reason.trim().is_empty() {
            return Err("a reason is required: it is recorded in pgcourier.skipped".into());
        }
        let st = self.status.lock().expect("status lock");
        match (st.paused, st.blocking_seq) {
            (true, Some(b)) if b == seq => {
                *self.skip.lock().expect("skip lock") = Some((seq, reason.to_owned()));
                Ok(())
            }
            (true, Some(b)) => Err(format!(
                "record {seq} is not the blocking transaction; apply is blocked at record {b}"
            )),
            (true, None) => Err(
                "apply cannot start on the target (see last_error): no transaction is blocking, so there is nothing to skip; fix the target".into(),
            ),
            (false, _) => Err(
                "apply is not blocked: only the transaction blocking apply can be skipped".into(),
            ),
        }
    }

    /// Skip the whole transaction starting at record `first`: record it,
    /// with its content, in `pgcourier.skipped`, and move the progress row
    /// past it, in one target transaction.
    pub(super) async fn skip_transaction(
        &self,
        s: &mut Session,
        first: u64,
        reason: &str,
    ) -> Result<(), ApplyError> {
        const MAX_CONTENT: usize = 16 << 20;
        let mut views = Vec::new();
        let mut content_bytes = 0;
        let mut truncated = false;
        let mut seq = first;
        let mut rels: HashMap<u32, Relation> = s.relations.clone();
        let end = loop {
            let bytes = self.inbox.get(seq)?.ok_or_else(|| ApplyError::Order {
                seq,
                message: "missing from the inbox while skipping".into(),
            })?;
            let record =
                Record::decode(&bytes).map_err(|source| ApplyError::Corrupt { seq, source })?;
            self.learn_relations(s, &record)?;
            let view = pgcourier_common::ops::inspect::view(&record, &mut rels);
            let json = serde_json::to_value(&view)
                .map_err(|source| ApplyError::SkipContent { seq, source })?;
            content_bytes += json.to_string().len();
            if content_bytes <= MAX_CONTENT {
                views.push(json);
            } else {
                truncated = true;
            }
            if record.last {
                break record;
            }
            seq += 1;
        };
        let content = serde_json::json!({ "records": views, "truncated": truncated }).to_string();
        s.client
            .batch_execute(
                "SET client_min_messages = warning; CREATE TABLE IF NOT EXISTS pgcourier.skipped (                    source text NOT NULL, seq bigint NOT NULL, commit_lsn pg_lsn NOT NULL, xid bigint NOT NULL,                    commit_time timestamptz, reason text NOT NULL, skipped_at timestamptz NOT NULL DEFAULT now(),                    content jsonb NOT NULL); BEGIN",
            )
            .await
            .map_err(target_err("begin skip transaction"))?;
        s.client
            .execute(
                "INSERT INTO pgcourier.skipped (source, seq, commit_lsn, xid, commit_time, reason, content)                  VALUES ($1, $2, $3::text::pg_lsn, $4, '2000-01-01 00:00:00+00'::timestamptz + $5::bigint * interval '1 microsecond', $6, $7::text::jsonb)",
                &[&s.source, &(first as i64), &end.commit_lsn.to_string(), &i64::from(end.xid), &end.commit_time, &reason, &content],
            )
            .await
            .map_err(target_err("record skipped transaction"))?;
        let group = GroupEnd {
            seq: end.seq,
            commit_lsn: end.commit_lsn,
            end_lsn: end.end_lsn,
            commit_time: end.commit_time,
        };
        self.commit_group(s, group, 0).await?;
        self.status
            .lock()
            .expect("status lock")
            .skipped_transactions += 1;
        tracing::warn!(seq = first, commit_lsn = %end.commit_lsn, "skipped a transaction at the operator's request; its content is in pgcourier.skipped");
        Ok(())
    }
}
