//! The receiver's local admin endpoint and status: what `pgcourier-queue`
//! and Prometheus see. [`ReceiverStatus`] is assembled here from the inbox
//! (durable), the apply state and the link state; the daemon serializes it
//! on `/status` and the queue CLI reads it back, typed. For a stopped
//! receiver the queue CLI builds the same view from the inbox and the
//! target's progress row. The routes are `pgcourier_common::ops::admin::route`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pgcourier_common::ops::admin::{self, Endpoint, Kind, Metrics, Response, Role};
use pgcourier_common::ops::inspect;
use pgcourier_proto::record::Record;
use serde::{Deserialize, Serialize};

use crate::apply::{Apply, ApplyStatus};
use crate::inbox::Inbox;
use crate::ingest::LinkStatus;

/// Where apply stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyState {
    /// Applying, or caught up.
    Applying,
    /// Stopped on a definite target error: the DBA must act, or skip.
    Paused,
    /// The last attempt failed on a transient error; apply retries.
    Retrying,
}

impl ApplyState {
    /// As in `/status`: `applying`, `paused` or `retrying`.
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyState::Applying => "applying",
            ApplyState::Paused => "paused",
            ApplyState::Retrying => "retrying",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReceiverStatus {
    /// Always `receiver`.
    pub role: Role,
    pub running: bool,
    pub source: Option<String>,
    pub inbox_records: u64,
    pub inbox_bytes: u64,
    /// Ingest holds batches back at `inbox-max-bytes`.
    pub inbox_full: bool,
    /// `inbox-max-bytes`, when set.
    #[serde(default)]
    pub inbox_max_bytes: Option<u64>,
    pub durable_seq: u64,
    pub applied_seq: u64,
    pub applied_commit_lsn: String,
    pub applied_commit_time: Option<String>,
    pub applied_transactions: u64,
    /// Seconds the oldest unapplied transaction has waited since its source
    /// commit (0 when apply is caught up).
    pub apply_lag_seconds: f64,
    pub apply_state: ApplyState,
    pub last_error: Option<String>,
    /// Kind of the last error (`missing_table`, `type_mismatch`,
    /// `unique_violation`, `permission_denied`, `read_only`, `connection`...).
    pub error_class: Option<String>,
    pub blocking_seq: Option<u64>,
    pub missing_rows: u64,
    /// Conflicts on two-way tables since start: the remote version won,
    /// this site's won, parked for an operator (`pgcourier-queue
    /// conflicts`).
    #[serde(default)]
    pub conflicts: crate::apply::Outcomes,
    pub skipped_transactions: u64,
    pub link: Option<LinkStatus>,
    /// The table copy being loaded (committed as one transaction).
    pub copy: Option<crate::apply::LoadProgress>,
    /// Tables joining in chunks: rows loaded so far into their staging
    /// tables (the target shows them once the join ends).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub joining: Vec<crate::apply::JoiningTable>,
}

/// Assemble the status view.
pub fn status(
    inbox: &Inbox,
    apply: &ApplyStatus,
    link: Option<&LinkStatus>,
    running: bool,
) -> ReceiverStatus {
    let (records, bytes) = inbox.depth();
    let durable = inbox.durable_seq();
    let mut lag = 0.0;
    if durable > apply.applied_seq {
        let next = inbox
            .first_seq()
            .ok()
            .flatten()
            .map(|f| f.max(apply.applied_seq + 1))
            .unwrap_or(apply.applied_seq + 1);
        if let Ok(Some(bytes)) = inbox.get(next) {
            if let Ok(r) = Record::decode(&bytes) {
                lag = inspect::age_seconds(r.commit_time);
            }
        }
    }
    ReceiverStatus {
        role: Role::Receiver,
        running,
        source: inbox.source().ok().flatten(),
        inbox_records: records,
        inbox_bytes: bytes,
        inbox_full: inbox.is_full(),
        // The caller knows the configuration.
        inbox_max_bytes: None,
        durable_seq: durable,
        applied_seq: apply.applied_seq,
        applied_commit_lsn: apply.applied_commit_lsn.to_string(),
        applied_commit_time: (apply.applied_commit_time != 0)
            .then(|| inspect::pg_time(apply.applied_commit_time)),
        applied_transactions: apply.applied_transactions,
        apply_lag_seconds: lag,
        apply_state: match (&apply.last_error, apply.paused) {
            (None, _) => ApplyState::Applying,
            (Some(_), true) => ApplyState::Paused,
            (Some(_), false) => ApplyState::Retrying,
        },
        last_error: apply.last_error.clone(),
        error_class: apply.error_class.map(str::to_owned),
        blocking_seq: apply.blocking_seq,
        missing_rows: apply.missing_rows,
        conflicts: apply.conflicts.clone(),
        skipped_transactions: apply.skipped_transactions,
        copy: apply.copy.clone(),
        joining: apply.joining.clone(),
        link: link.cloned(),
    }
}

pub fn metrics(st: &ReceiverStatus) -> String {
    let mut m = Metrics::default();
    m.build_info(
        "pgcourier_receiver_build_info",
        "1, labelled with the version of the pgcourier-receiver that answers.",
    );
    m.gauge(
        "pgcourier_receiver_inbox_records",
        "Records stored in the inbox (received, not yet applied and deleted).",
        st.inbox_records as f64,
    );
    m.gauge(
        "pgcourier_receiver_inbox_bytes",
        "Bytes of records stored in the inbox.",
        st.inbox_bytes as f64,
    );
    m.gauge(
        "pgcourier_receiver_inbox_full",
        "1 while batches wait at the sender because the inbox is at inbox-max-bytes.",
        f64::from(u8::from(st.inbox_full)),
    );
    if let Some(max) = st.inbox_max_bytes {
        m.gauge(
            "pgcourier_receiver_inbox_max_bytes",
            "The inbox's limit (inbox-max-bytes), when set.",
            max as f64,
        );
    }
    m.gauge(
        "pgcourier_receiver_copy_active",
        "1 while a table copy is being loaded into the target.",
        f64::from(u8::from(st.copy.is_some())),
    );
    m.gauge(
        "pgcourier_receiver_copy_rows",
        "Rows of the table copy being loaded, so far (0 when none).",
        st.copy.as_ref().map_or(0.0, |c| c.rows as f64),
    );
    m.gauge(
        "pgcourier_receiver_durable_seq",
        "Highest record sequence fsynced in the inbox and acknowledged.",
        st.durable_seq as f64,
    );
    m.gauge(
        "pgcourier_receiver_applied_seq",
        "Highest record sequence applied to the target.",
        st.applied_seq as f64,
    );
    m.gauge(
        "pgcourier_receiver_records_behind",
        "Records received but not yet applied.",
        st.durable_seq.saturating_sub(st.applied_seq) as f64,
    );
    m.gauge(
        "pgcourier_receiver_apply_lag_seconds",
        "Age of the oldest unapplied transaction since its source commit.",
        st.apply_lag_seconds,
    );
    m.gauge(
        "pgcourier_receiver_apply_paused",
        "1 when apply is paused on a target error.",
        f64::from(u8::from(st.apply_state == ApplyState::Paused)),
    );
    m.gauge(
        "pgcourier_receiver_apply_error",
        "1 when the last apply attempt failed.",
        f64::from(u8::from(st.last_error.is_some())),
    );
    if let Some(class) = &st.error_class {
        m.sample(
            "pgcourier_receiver_apply_error_class",
            "1 for the kind of the last apply error, while there is one.",
            Kind::Gauge,
            &[("class", class.as_str())],
            1.0,
        );
    }
    m.counter(
        "pgcourier_receiver_applied_transactions_total",
        "Source transactions applied since start.",
        st.applied_transactions as f64,
    );
    m.counter(
        "pgcourier_receiver_missing_rows_total",
        "Updates or deletes whose row was not found on the target.",
        st.missing_rows as f64,
    );
    for (winner, n) in [
        ("remote", st.conflicts.remote_won),
        ("local", st.conflicts.local_won),
        ("parked", st.conflicts.parked),
    ] {
        m.sample(
            "pgcourier_receiver_conflicts_total",
            "Conflicts on two-way tables since start, by the version kept (parked: waiting for an operator); each is a row of pgcourier.conflicts.",
            Kind::Counter,
            &[("winner", winner)],
            n as f64,
        );
    }
    m.counter(
        "pgcourier_receiver_skipped_transactions_total",
        "Transactions skipped by an operator.",
        st.skipped_transactions as f64,
    );
    if let Some(l) = &st.link {
        m.gauge(
            "pgcourier_receiver_link_connected",
            "1 while connected to the sender.",
            f64::from(u8::from(l.connected)),
        );
        m.gauge(
            "pgcourier_receiver_link_rtt_seconds",
            "Round-trip time of the current connection.",
            l.rtt_ms.unwrap_or(0.0) / 1000.0,
        );
        m.gauge(
            "pgcourier_receiver_link_tcp",
            "1 while the connection to the sender runs over TCP (0 over QUIC or when not connected).",
            f64::from(u8::from(l.transport.current.as_deref() == Some("tcp"))),
        );
        m.gauge(
            "pgcourier_receiver_link_tcp_fallback",
            "1 while transport = auto has fallen back to TCP in reverse mode (no QUIC handshake with the sender completes).",
            f64::from(u8::from(l.transport.fell_back_to_tcp)),
        );
        m.counter(
            "pgcourier_receiver_link_tcp_fallbacks_total",
            "Times transport = auto fell back to TCP in reverse mode.",
            l.transport.tcp_fallbacks as f64,
        );
        m.counter(
            "pgcourier_receiver_connections_total",
            "Connections established with the sender (reconnects + 1).",
            l.connections as f64,
        );
        m.counter(
            "pgcourier_receiver_received_compressed_bytes_total",
            "Batch bytes received (zstd).",
            l.compressed_bytes as f64,
        );
        m.counter(
            "pgcourier_receiver_received_raw_bytes_total",
            "Record bytes received after decompression.",
            l.raw_bytes as f64,
        );
        let ratio = if l.compressed_bytes > 0 {
            l.raw_bytes as f64 / l.compressed_bytes as f64
        } else {
            0.0
        };
        m.counter(
            "pgcourier_receiver_discarded_bytes_total",
            "Bytes of batches cut by link drops and discarded (shipped again).",
            l.discarded_bytes as f64,
        );
        m.gauge(
            "pgcourier_receiver_compression_ratio",
            "Raw over compressed bytes received.",
            ratio,
        );
    }
    m.finish()
}

/// Lines of `list`, from the inbox.
pub fn list(inbox: &Inbox, from: Option<u64>, limit: usize) -> Vec<inspect::RecordLine> {
    let mut rels = relations(inbox);
    let start = from
        .or_else(|| inbox.first_seq().ok().flatten())
        .unwrap_or(1);
    let mut out = Vec::new();
    let mut seq = start;
    while out.len() < limit && seq <= inbox.durable_seq() {
        match inbox.get(seq) {
            Ok(Some(bytes)) => match Record::decode(&bytes) {
                Ok(r) => out.push(inspect::line(&r, bytes.len(), &mut rels)),
                Err(e) => out.push(inspect::unreadable(seq, bytes.len(), e)),
            },
            Ok(None) => {}
            Err(e) => out.push(inspect::unreadable(seq, 0, e)),
        }
        seq += 1;
    }
    out
}

pub fn relations(inbox: &Inbox) -> HashMap<u32, pgcourier_proto::pgoutput::Relation> {
    let mut rels = HashMap::new();
    for raw in inbox.relations().unwrap_or_default() {
        if let Ok(pgcourier_proto::pgoutput::Message::Relation(r)) =
            pgcourier_proto::pgoutput::decode(&raw)
        {
            rels.insert(r.oid, r);
        }
    }
    rels
}

/// `show`: one record as JSON or SQL; 404 text when absent.
pub fn show(inbox: &Inbox, seq: u64, format: &str) -> Response {
    admin::show_record(
        seq,
        format,
        "inbox",
        "applied records are deleted",
        inbox.get(seq),
        || relations(inbox),
    )
}

pub struct Admin {
    pub inbox: Arc<Inbox>,
    pub apply: Arc<Apply>,
    pub link: Arc<Mutex<LinkStatus>>,
    /// `inbox-max-bytes`, for the status.
    pub inbox_max_bytes: Option<u64>,
}

impl Endpoint for Admin {
    type Status = ReceiverStatus;

    fn status(&self) -> ReceiverStatus {
        let mut st = status(
            &self.inbox,
            &self.apply.status.lock().expect("status lock"),
            Some(&self.link.lock().expect("link lock")),
            true,
        );
        st.inbox_max_bytes = self.inbox_max_bytes;
        st
    }

    fn metrics(&self, st: &ReceiverStatus) -> String {
        metrics(st)
    }

    fn health(&self, st: &ReceiverStatus) -> Result<(), String> {
        if st.apply_state == ApplyState::Paused {
            Err(format!(
                "apply paused: {}",
                st.last_error.as_deref().unwrap_or_default()
            ))
        } else {
            Ok(())
        }
    }

    fn list(&self, from: Option<u64>, limit: usize) -> Vec<inspect::RecordLine> {
        list(&self.inbox, from, limit)
    }

    fn show(&self, seq: u64, format: &str) -> Response {
        show(&self.inbox, seq, format)
    }

    fn control(&self, path: &str, query: &HashMap<String, String>) -> Option<Response> {
        if path != "/skip" {
            return None;
        }
        let Some(seq) = query.get("seq").and_then(|v| v.parse().ok()) else {
            return Some(Response::text(400, "seq is required"));
        };
        let reason = query.get("reason").cloned().unwrap_or_default();
        Some(match self.apply.request_skip(seq, &reason) {
            Ok(()) => Response::text(200, format!("skip of the transaction at record {seq} requested; apply will record it in pgcourier.skipped")),
            Err(e) => Response::text(409, e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the daemon serializes on `/status`, the queue CLI reads back
    /// typed: every field, nested ones included, survives the trip.
    #[test]
    fn the_status_the_daemon_writes_is_what_the_queue_cli_reads() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path(), 1 << 20).unwrap();
        let mut apply = ApplyStatus {
            applied_seq: 4,
            applied_commit_time: 1,
            last_error: Some("relation \"t\" does not exist".into()),
            error_class: Some("missing_table"),
            paused: true,
            blocking_seq: Some(5),
            ..Default::default()
        };
        let mut copy = crate::apply::LoadProgress::default();
        copy.tables = vec![("\"public\".\"t\"".into(), 1, 2)];
        copy.eta_seconds = Some(1.0);
        apply.copy = Some(copy);
        let link = LinkStatus {
            connected: true,
            rtt_ms: Some(3.5),
            ..Default::default()
        };
        let st = status(&inbox, &apply, Some(&link), true);
        let written = serde_json::to_value(&st).unwrap();
        assert_eq!(written["role"], "receiver");
        assert_eq!(written["apply_state"], "paused");
        assert_eq!(written["error_class"], "missing_table");
        let read: ReceiverStatus = serde_json::from_value(written.clone()).unwrap();
        assert_eq!(read.apply_state, ApplyState::Paused);
        assert_eq!(serde_json::to_value(&read).unwrap(), written);
    }
}
