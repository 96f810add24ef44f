//! The sender's local admin endpoint and status: what `pgcourier-queue` and
//! Prometheus see. [`SenderStatus`] is built here from the spool marks,
//! capture's slot statistics and the shipper's links; the daemon serializes
//! it on `/status` and the queue CLI reads it back, typed. For a stopped
//! sender, the queue CLI builds the same view from the spool and the
//! source's slot. The routes are `pgcourier_common::ops::admin::route`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use pgcourier_common::ops::admin::{self, Endpoint, Kind, Metrics, Response, Role};
use pgcourier_common::ops::{inspect, local_time};
use pgcourier_proto::pgoutput::{self, Message, Relation};
use pgcourier_proto::record::Record;
use serde::{Deserialize, Serialize};

use crate::capture::CaptureStatus;
use crate::config::SenderConfig;
use crate::ship::{LinkStatus, Shipper};
use crate::spool::Spool;

#[derive(Debug, Serialize, Deserialize)]
pub struct ReceiverView {
    pub name: String,
    pub acked_seq: u64,
    /// Records spooled that this receiver has not acknowledged.
    pub records_behind: u64,
    /// Bytes of spooled records this receiver has not acknowledged.
    pub bytes_behind: u64,
    /// Seconds since the source commit of the oldest record it lacks.
    pub lag_seconds: f64,
    pub link: Option<LinkStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ShippingTotals {
    pub batches: u64,
    pub records: u64,
    pub raw_bytes: u64,
    pub compressed_bytes: u64,
    pub compression_ratio: f64,
    pub udp_tx_bytes: u64,
    /// Bytes sent over TCP by finished connections (TLS included).
    #[serde(default)]
    pub tcp_tx_bytes: u64,
    pub resent_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SenderStatus {
    /// Always `sender`.
    pub role: Role,
    pub running: bool,
    pub source: Option<String>,
    pub slot: Option<crate::source::SlotStats>,
    pub capture_error: Option<String>,
    /// Capture paused at `spool-max-bytes`.
    pub spool_full: bool,
    /// `spool-max-bytes`, when set.
    #[serde(default)]
    pub spool_max_bytes: Option<u64>,
    pub captured_end_lsn: String,
    pub spool_records: u64,
    pub spool_bytes: u64,
    pub first_seq: u64,
    pub complete_seq: u64,
    pub oldest_commit_time: Option<String>,
    pub oldest_age_seconds: f64,
    pub receivers: Vec<ReceiverView>,
    pub shipping: Option<ShippingTotals>,
    /// The table copy being read into the spool (or a seed file).
    pub copy: Option<crate::copy::CopyProgress>,
    /// Tables waiting for a copy (their changes wait with them).
    pub copy_waiting: usize,
    /// How the last seed export ended.
    pub last_seed: Option<crate::capture::SeedOutcome>,
    /// Transactions a receiver's apply wrote at this source since the
    /// sender started, left out of capture (no loop back to their site).
    #[serde(default)]
    pub looped_transactions: u64,
    /// Of those, transactions from the site of one of this sender's
    /// receivers, forwarded to every other receiver.
    #[serde(default)]
    pub forwarded_transactions: u64,
    /// Local writes at this site to tables it does not ship (`ship-tables
    /// = "two-way"`: one-way tables at a branch), by table, since start.
    #[serde(default)]
    pub one_way_writes: std::collections::BTreeMap<String, u64>,
}

fn commit_time(spool: &Spool, seq: u64) -> Option<i64> {
    let bytes = spool.get(seq).ok()??;
    Record::decode(&bytes).ok().map(|r| r.commit_time)
}

pub fn status(
    cfg: &SenderConfig,
    spool: &Spool,
    capture: &CaptureStatus,
    shipper: Option<&Shipper>,
    running: bool,
) -> SenderStatus {
    let marks = spool.marks();
    let (records, bytes) = spool.depth();
    let oldest = if records > 0 {
        commit_time(spool, marks.first_seq)
    } else {
        None
    };
    let links = shipper
        .map(|s| s.links.lock().expect("links lock").clone())
        .unwrap_or_default();
    let receivers = cfg
        .receivers
        .iter()
        .map(|r| {
            let acked = spool.applied(&r.name).unwrap_or(0);
            let behind = marks.complete_seq.saturating_sub(acked);
            let lag = if behind > 0 {
                commit_time(spool, acked + 1)
                    .map(inspect::age_seconds)
                    .unwrap_or(0.0)
            } else {
                0.0
            };
            let bytes_behind = if behind > 0 {
                spool.bytes_behind(&r.name, acked).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "read the spool for status");
                    0
                })
            } else {
                0
            };
            ReceiverView {
                name: r.name.clone(),
                acked_seq: acked,
                records_behind: behind,
                bytes_behind,
                lag_seconds: lag,
                link: links.get(&r.name).cloned().map(|mut link| {
                    // The cap, and the window in force now, whether or not
                    // anything waits.
                    link.max_rate_bits_per_sec = r.max_rate;
                    if let Some(budget) = &r.budget {
                        let (rate, _, next) = budget.at(local_time::seconds_of_day());
                        link.rate_in_force = Some(crate::ship::describe_rate(rate));
                        link.rate_changes_in_seconds = (!budget.windows.is_empty()).then_some(next);
                    }
                    link
                }),
            }
        })
        .collect();
    let shipping = shipper.map(|s| {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let (raw, comp) = (get(&s.stats.raw_bytes), get(&s.stats.compressed_bytes));
        ShippingTotals {
            batches: get(&s.stats.batches),
            records: get(&s.stats.records),
            raw_bytes: raw,
            compressed_bytes: comp,
            compression_ratio: if comp > 0 {
                raw as f64 / comp as f64
            } else {
                0.0
            },
            udp_tx_bytes: get(&s.stats.udp_tx_bytes),
            tcp_tx_bytes: get(&s.stats.tcp_tx_bytes),
            resent_bytes: get(&s.stats.resent_bytes),
        }
    });
    SenderStatus {
        role: Role::Sender,
        running,
        source: spool.source().ok().flatten(),
        slot: capture.slot.clone(),
        capture_error: capture.last_error.clone(),
        spool_full: capture.spool_full,
        spool_max_bytes: cfg.spool_max_bytes,
        captured_end_lsn: marks.captured_end_lsn.to_string(),
        spool_records: records,
        spool_bytes: bytes,
        first_seq: marks.first_seq,
        complete_seq: marks.complete_seq,
        oldest_commit_time: oldest.map(inspect::pg_time),
        oldest_age_seconds: oldest.map(inspect::age_seconds).unwrap_or(0.0),
        receivers,
        shipping,
        copy: capture.copy.clone(),
        copy_waiting: capture.copy_waiting,
        last_seed: capture.last_seed.clone(),
        looped_transactions: capture.looped_transactions,
        forwarded_transactions: capture.forwarded_transactions,
        one_way_writes: capture.one_way_writes.clone(),
    }
}

pub fn metrics(st: &SenderStatus) -> String {
    let mut m = Metrics::default();
    m.build_info(
        "pgcourier_sender_build_info",
        "1, labelled with the version of the pgcourier-sender that answers.",
    );
    m.gauge(
        "pgcourier_sender_spool_records",
        "Records in the spool.",
        st.spool_records as f64,
    );
    m.gauge(
        "pgcourier_sender_spool_bytes",
        "Bytes of records in the spool.",
        st.spool_bytes as f64,
    );
    m.gauge(
        "pgcourier_sender_spool_oldest_age_seconds",
        "Age of the oldest spooled record since its source commit.",
        st.oldest_age_seconds,
    );
    m.gauge(
        "pgcourier_sender_complete_seq",
        "Highest record sequence fsynced in the spool.",
        st.complete_seq as f64,
    );
    m.gauge(
        "pgcourier_sender_capture_error",
        "1 when capture's last attempt failed.",
        f64::from(u8::from(st.capture_error.is_some())),
    );
    m.gauge(
        "pgcourier_sender_spool_full",
        "1 while capture is paused at spool-max-bytes (the slot keeps WAL on the source).",
        f64::from(u8::from(st.spool_full)),
    );
    if let Some(max) = st.spool_max_bytes {
        m.gauge(
            "pgcourier_sender_spool_max_bytes",
            "The spool's limit (spool-max-bytes), when set.",
            max as f64,
        );
    }
    m.counter(
        "pgcourier_sender_looped_transactions_total",
        "Transactions a receiver's apply wrote at this source that no other receiver takes, left out of capture so they are not sent back to the site they came from.",
        st.looped_transactions as f64,
    );
    for (table, n) in &st.one_way_writes {
        m.sample(
            "pgcourier_sender_one_way_writes_total",
            "Local writes at this site to a table it does not ship (ship-tables = \"two-way\"): one-way tables written at a branch, which differ from headquarters from then on.",
            Kind::Counter,
            &[("table", table.as_str())],
            *n as f64,
        );
    }
    m.counter(
        "pgcourier_sender_forwarded_transactions_total",
        "Transactions a receiver's apply wrote at this source from the site of one of this sender's receivers, forwarded to the other receivers.",
        st.forwarded_transactions as f64,
    );
    m.gauge(
        "pgcourier_sender_copy_active",
        "1 while a table copy (or a seed export) is being read from the source.",
        f64::from(u8::from(st.copy.is_some())),
    );
    m.gauge(
        "pgcourier_sender_copy_rows",
        "Rows of the table copy (or seed export) being read, so far (0 when none).",
        st.copy.as_ref().map_or(0.0, |c| c.rows as f64),
    );
    if let Some(slot) = &st.slot {
        m.gauge(
            "pgcourier_sender_slot_retained_wal_bytes",
            "WAL the source keeps for the slot.",
            slot.retained_wal_bytes.unwrap_or(0) as f64,
        );
    }
    for r in &st.receivers {
        let l = [("receiver", r.name.as_str())];
        m.sample(
            "pgcourier_sender_receiver_acked_seq",
            "Highest record the receiver holds durably.",
            Kind::Gauge,
            &l,
            r.acked_seq as f64,
        );
        m.sample(
            "pgcourier_sender_receiver_records_behind",
            "Spooled records the receiver has not acknowledged.",
            Kind::Gauge,
            &l,
            r.records_behind as f64,
        );
        m.sample(
            "pgcourier_sender_receiver_bytes_behind",
            "Bytes of spooled records the receiver has not acknowledged.",
            Kind::Gauge,
            &l,
            r.bytes_behind as f64,
        );
        m.sample(
            "pgcourier_sender_receiver_lag_seconds",
            "Age of the oldest record the receiver lacks.",
            Kind::Gauge,
            &l,
            r.lag_seconds,
        );
        if let Some(link) = &r.link {
            m.sample(
                "pgcourier_sender_receiver_connected",
                "1 while the receiver is connected.",
                Kind::Gauge,
                &l,
                f64::from(u8::from(link.connected)),
            );
            m.sample(
                "pgcourier_sender_receiver_rtt_seconds",
                "Round-trip time to the receiver.",
                Kind::Gauge,
                &l,
                link.rtt_ms.unwrap_or(0.0) / 1000.0,
            );
            m.sample(
                "pgcourier_sender_receiver_in_flight_bytes",
                "Shipped raw bytes not yet acknowledged.",
                Kind::Gauge,
                &l,
                link.in_flight_bytes as f64,
            );
            m.sample(
                "pgcourier_sender_receiver_throughput_bytes_per_second",
                "Acknowledged raw bytes per second on the current connection.",
                Kind::Gauge,
                &l,
                link.throughput_bytes_per_sec,
            );
            m.sample(
                "pgcourier_sender_receiver_connections_total",
                "Connections with the receiver (reconnects + 1).",
                Kind::Counter,
                &l,
                link.connections as f64,
            );
            m.sample(
                "pgcourier_sender_receiver_tcp",
                "1 while the receiver's connection runs over TCP (0 over QUIC or when not connected).",
                Kind::Gauge,
                &l,
                f64::from(u8::from(link.transport.current.as_deref() == Some("tcp"))),
            );
            m.sample(
                "pgcourier_sender_receiver_tcp_fallback",
                "1 while transport = auto has fallen back to TCP for this receiver (no QUIC handshake completes).",
                Kind::Gauge,
                &l,
                f64::from(u8::from(link.transport.fell_back_to_tcp)),
            );
            m.sample(
                "pgcourier_sender_receiver_tcp_fallbacks_total",
                "Times transport = auto fell back to TCP for this receiver.",
                Kind::Counter,
                &l,
                link.transport.tcp_fallbacks as f64,
            );
        }
    }
    if let Some(s) = &st.shipping {
        m.counter(
            "pgcourier_sender_shipped_batches_total",
            "Batches shipped.",
            s.batches as f64,
        );
        m.counter(
            "pgcourier_sender_shipped_raw_bytes_total",
            "Record bytes shipped before compression.",
            s.raw_bytes as f64,
        );
        m.counter(
            "pgcourier_sender_shipped_compressed_bytes_total",
            "Batch bytes shipped after zstd.",
            s.compressed_bytes as f64,
        );
        m.counter(
            "pgcourier_sender_resent_bytes_total",
            "Compressed bytes shipped again after reconnects.",
            s.resent_bytes as f64,
        );
        m.gauge(
            "pgcourier_sender_compression_ratio",
            "Raw over compressed bytes shipped.",
            s.compression_ratio,
        );
    }
    m.finish()
}

/// Relation definitions seen in the `window` records before `seq`.
fn relations_before(spool: &Spool, seq: u64, window: u64) -> HashMap<u32, Relation> {
    let mut rels = HashMap::new();
    // The latest of each table first; then those of the window, in order.
    for raw in spool.relations().unwrap_or_default() {
        if let Ok(Message::Relation(r)) = pgoutput::decode(&raw) {
            rels.insert(r.oid, r);
        }
    }
    let from = seq.saturating_sub(window).max(spool.marks().first_seq);
    for s in from..seq {
        if let Ok(Some(bytes)) = spool.get(s) {
            if let Ok(r) = Record::decode(&bytes) {
                inspect::messages(&r, &mut rels);
            }
        }
    }
    rels
}

pub fn list(spool: &Spool, from: Option<u64>, limit: usize) -> Vec<inspect::RecordLine> {
    let marks = spool.marks();
    let start = from.unwrap_or(marks.first_seq).max(marks.first_seq);
    let mut rels = relations_before(spool, start, 2000);
    let mut out = Vec::new();
    let mut seq = start;
    while out.len() < limit && seq <= marks.complete_seq {
        match spool.get(seq) {
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

/// `show`: one record as JSON or SQL; 404 text when absent.
pub fn show(spool: &Spool, seq: u64, format: &str) -> Response {
    admin::show_record(
        seq,
        format,
        "spool",
        "acknowledged records are deleted",
        spool.get(seq),
        || relations_before(spool, seq, 2000),
    )
}

pub struct Admin {
    pub cfg: Arc<SenderConfig>,
    pub spool: Arc<Spool>,
    pub capture: Arc<Mutex<CaptureStatus>>,
    pub shipper: Arc<Shipper>,
    pub seeds: tokio::sync::mpsc::Sender<crate::capture::SeedRequest>,
}

impl Endpoint for Admin {
    type Status = SenderStatus;

    fn status(&self) -> SenderStatus {
        status(
            &self.cfg,
            &self.spool,
            &self.capture.lock().expect("capture status lock"),
            Some(&self.shipper),
            true,
        )
    }

    fn metrics(&self, st: &SenderStatus) -> String {
        metrics(st)
    }

    fn health(&self, st: &SenderStatus) -> Result<(), String> {
        match &st.capture_error {
            Some(e) => Err(format!("capture failing: {e}")),
            None => Ok(()),
        }
    }

    fn list(&self, from: Option<u64>, limit: usize) -> Vec<inspect::RecordLine> {
        list(&self.spool, from, limit)
    }

    fn show(&self, seq: u64, format: &str) -> Response {
        show(&self.spool, seq, format)
    }

    fn control(&self, path: &str, query: &HashMap<String, String>) -> Option<Response> {
        Some(match path {
            "/seed" => {
                let Some(out) = query.get("out").filter(|p| p.starts_with('/')) else {
                    return Some(Response::text(400, "seed needs out=<absolute path>"));
                };
                let (reply, _) = tokio::sync::oneshot::channel();
                let request = crate::capture::SeedRequest {
                    path: out.into(),
                    reply,
                };
                match self.seeds.try_send(request) {
                    Ok(()) => Response::text(202, "seed export queued; watch /status"),
                    Err(_) => Response::text(409, "a seed export is already queued or running"),
                }
            }
            "/skip" => Response::text(
                409,
                "skip is a receiver command: run it against the receiver whose apply is blocked",
            ),
            _ => return None,
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
        let st = SenderStatus {
            role: Role::Sender,
            running: true,
            source: Some("7000/db/pgcourier".into()),
            slot: Some(crate::source::SlotStats {
                slot: "pgcourier".into(),
                active: true,
                retained_wal_bytes: Some(4096),
                ..Default::default()
            }),
            capture_error: Some("source unreachable".into()),
            spool_full: false,
            spool_max_bytes: Some(1 << 30),
            captured_end_lsn: "0/16B3748".into(),
            spool_records: 3,
            spool_bytes: 900,
            first_seq: 7,
            complete_seq: 9,
            oldest_commit_time: Some("2026-11-02T10:00:00.000Z".into()),
            oldest_age_seconds: 1.5,
            receivers: vec![ReceiverView {
                name: "branch0".into(),
                acked_seq: 6,
                records_behind: 3,
                bytes_behind: 900,
                lag_seconds: 2.0,
                link: Some(LinkStatus {
                    connected: true,
                    rtt_ms: Some(12.5),
                    ..Default::default()
                }),
            }],
            shipping: Some(ShippingTotals {
                batches: 1,
                records: 2,
                raw_bytes: 3,
                compressed_bytes: 4,
                compression_ratio: 0.75,
                udp_tx_bytes: 5,
                tcp_tx_bytes: 7,
                resent_bytes: 6,
            }),
            copy: Some({
                let mut copy = crate::copy::CopyProgress::default();
                copy.tables = vec![crate::copy::TableProgress::default()];
                copy.eta_seconds = Some(3.0);
                copy
            }),
            copy_waiting: 1,
            last_seed: None,
            looped_transactions: 0,
            forwarded_transactions: 0,
            one_way_writes: [("public.prices".to_owned(), 2)].into(),
        };
        let written = serde_json::to_value(&st).unwrap();
        assert_eq!(written["role"], "sender");
        let read: SenderStatus = serde_json::from_value(written.clone()).unwrap();
        assert_eq!(serde_json::to_value(&read).unwrap(), written);
    }
}
