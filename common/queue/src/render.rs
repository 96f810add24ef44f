//! What `pgcourier-queue` prints for a person: the status page of each
//! daemon (one labelled line per fact, labels padded to 18 columns), the
//! record table of `list`, and sizes and durations in human units. Nothing
//! here reads a store or an endpoint: it renders what `fetch` returned.

use comfy_table::{presets, Cell, CellAlignment, Table};
use pgcourier_common::ops::inspect::RecordLine;
use pgcourier_common::ops::progress;
use pgcourier_receiver::admin::ReceiverStatus;
use pgcourier_sender::admin::SenderStatus;

use crate::fetch::Status;

/// `1.5 MiB`; whole bytes below 1 KiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `350 ms`, `12.5 s`, `3.0 min`, `2.5 h`.
pub fn human_secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// The record table of `list`.
pub fn list(lines: &[RecordLine]) -> String {
    const NUMERIC: [usize; 4] = [0, 1, 3, 4];
    let header = [
        "seq",
        "commit lsn",
        "commit time",
        "changes",
        "bytes",
        "tables",
    ];
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(header.iter().enumerate().map(|(i, h)| {
            let cell = Cell::new(h);
            if NUMERIC.contains(&i) {
                cell.set_alignment(CellAlignment::Right)
            } else {
                cell
            }
        }));
    for r in lines {
        let continues = if r.last { "" } else { "  (continues)" };
        table.add_row(vec![
            r.seq.to_string(),
            r.commit_lsn.clone(),
            r.commit_time.clone(),
            r.changes.to_string(),
            human_bytes(r.bytes as u64),
            match &r.problem {
                Some(problem) => problem.clone(),
                None => format!("{}{continues}", r.tables.join(", ")),
            },
        ]);
    }
    let last = table.column_count().saturating_sub(1);
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, if i == last { 0 } else { 2 }));
        if NUMERIC.contains(&i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table.trim_fmt()
}

/// The status page.
pub fn status(st: &Status) -> String {
    match st {
        Status::Sender(s) => sender(s),
        Status::Receiver(r) => receiver(r),
    }
}

fn state(running: bool) -> &'static str {
    if running {
        "running"
    } else {
        "stopped (read from its store)"
    }
}

/// A table copy in progress: totals with a bar, then each table.
struct Copy<'a> {
    rows: u64,
    rate: f64,
    eta: Option<f64>,
    reason: &'a str,
    cut_lsn: &'a str,
    tables: Vec<(&'a str, u64, u64)>,
}

impl Copy<'_> {
    fn render(&self, out: &mut String, what: &str, verb: &str) {
        let total = self.tables.iter().map(|t| t.2).sum();
        out.push_str(&format!(
            "{:<18}{} ({}, cut {})\n",
            what,
            progress::line(verb, self.rows, total, self.rate, self.eta),
            self.reason,
            self.cut_lsn,
        ));
        for (name, rows, estimate) in &self.tables {
            out.push_str(&format!("  {name:<30} {rows} of ~{estimate} rows\n"));
        }
    }
}

fn sender(st: &SenderStatus) -> String {
    let mut out = String::new();
    let mut line = |label: &str, text: String| out.push_str(&format!("{label:<18}{text}\n"));
    line("sender", state(st.running).into());
    line("source", st.source.as_deref().unwrap_or("-").into());
    if let Some(slot) = &st.slot {
        line(
            "slot",
            format!(
                "{} ({}), confirmed {}, WAL retained on the source {}",
                slot.slot,
                if slot.active { "active" } else { "inactive" },
                slot.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                human_bytes(slot.retained_wal_bytes.unwrap_or(0).max(0) as u64)
            ),
        );
    }
    line("captured up to", st.captured_end_lsn.clone());
    line(
        "spool",
        format!(
            "{} records, {}, oldest {} ({} old)",
            st.spool_records,
            human_bytes(st.spool_bytes),
            st.oldest_commit_time.as_deref().unwrap_or("-"),
            human_secs(st.oldest_age_seconds)
        ),
    );
    if let Some(e) = &st.capture_error {
        line("capture error", e.clone());
    }
    let copy = st.copy.as_ref().map(|c| Copy {
        rows: c.rows,
        rate: c.rows_per_second,
        eta: c.eta_seconds,
        reason: &c.reason,
        cut_lsn: &c.cut_lsn,
        tables: c
            .tables
            .iter()
            .map(|t| (t.table.as_str(), t.rows, t.rows_estimate))
            .collect(),
    });
    if let Some(copy) = copy {
        copy.render(&mut out, "copying", "read");
    }
    let mut line = |label: &str, text: String| out.push_str(&format!("{label:<18}{text}\n"));
    if st.copy_waiting > 0 {
        line(
            "copy waiting",
            format!("{} tables (their changes wait with them)", st.copy_waiting),
        );
    }
    if let Some(seed) = &st.last_seed {
        match (&seed.error, &seed.summary) {
            (Some(e), _) => line("last seed", format!("{} failed: {e}", seed.path)),
            (None, summary) => line(
                "last seed",
                format!(
                    "{} (live shipping continues after record {})",
                    seed.path,
                    summary
                        .as_ref()
                        .map_or("-".to_owned(), |s| s.marker_seq.to_string())
                ),
            ),
        }
    }
    for r in &st.receivers {
        let conn = match &r.link {
            Some(link) if link.connected => format!(
                "connected since {} from {}, rtt {:.1} ms, in flight {}, {}/s",
                link.connected_since.as_deref().unwrap_or("-"),
                link.peer.as_deref().unwrap_or("-"),
                link.rtt_ms.unwrap_or(0.0),
                human_bytes(link.in_flight_bytes),
                human_bytes(link.throughput_bytes_per_sec as u64)
            ),
            _ => "not connected".into(),
        };
        let conn = match r.link.as_ref() {
            Some(l) if l.rate_in_force.is_some() || l.max_rate_bits_per_sec.is_some() => {
                let rate = l.rate_in_force.clone().unwrap_or_else(|| {
                    format!("{} kbit/s", l.max_rate_bits_per_sec.unwrap_or(0) / 1000)
                });
                match l.rate_changes_in_seconds {
                    Some(s) => format!("{conn}; rate {rate}, next window change in {s} s"),
                    None => format!("{conn}; rate {rate}"),
                }
            }
            _ => conn,
        };
        out.push_str(&format!(
            "receiver {:<8} acked {} ({} records, {} behind, lag {}); {conn}\n",
            r.name,
            r.acked_seq,
            r.records_behind,
            human_bytes(r.bytes_behind),
            human_secs(r.lag_seconds)
        ));
    }
    if let Some(sh) = &st.shipping {
        out.push_str(&format!(
            "{:<18}{} batches, {} records, {} raw → {} compressed (ratio {:.1})\n",
            "shipped",
            sh.batches,
            sh.records,
            human_bytes(sh.raw_bytes),
            human_bytes(sh.compressed_bytes),
            sh.compression_ratio
        ));
    }
    out
}

fn receiver(st: &ReceiverStatus) -> String {
    let mut out = String::new();
    let mut line = |label: &str, text: String| out.push_str(&format!("{label:<18}{text}\n"));
    line("receiver", state(st.running).into());
    line("source", st.source.as_deref().unwrap_or("-").into());
    line(
        "inbox",
        format!(
            "{} records, {}, durable up to {}",
            st.inbox_records,
            human_bytes(st.inbox_bytes),
            st.durable_seq
        ),
    );
    line(
        "applied",
        format!(
            "record {} (commit {} at {})",
            st.applied_seq,
            st.applied_commit_lsn,
            st.applied_commit_time.as_deref().unwrap_or("-")
        ),
    );
    line(
        "apply",
        format!(
            "{}, lag {} behind the source commit",
            st.apply_state.as_str(),
            human_secs(st.apply_lag_seconds)
        ),
    );
    if let Some(e) = &st.last_error {
        line(
            "last error",
            format!("{e} ({})", st.error_class.as_deref().unwrap_or("-")),
        );
    }
    if let Some(c) = &st.copy {
        Copy {
            rows: c.rows,
            rate: c.rows_per_second,
            eta: c.eta_seconds,
            reason: &c.reason,
            cut_lsn: &c.cut_lsn,
            tables: c
                .tables
                .iter()
                .map(|(name, rows, estimate)| (name.as_str(), *rows, *estimate))
                .collect(),
        }
        .render(&mut out, "loading copy", "loaded");
    }
    let mut line = |label: &str, text: String| out.push_str(&format!("{label:<18}{text}\n"));
    if let Some(b) = st.blocking_seq {
        line(
            "blocked at",
            format!("record {b}: fix the target, or `pgcourier-queue skip {b} --reason ...`"),
        );
    }
    match &st.link {
        Some(link) if link.connected => line(
            "link",
            format!(
                "connected since {} to {}, rtt {:.1} ms, {} batches, ratio {:.1}",
                link.connected_since.as_deref().unwrap_or("-"),
                link.peer.as_deref().unwrap_or("-"),
                link.rtt_ms.unwrap_or(0.0),
                link.batches,
                link.raw_bytes as f64 / (link.compressed_bytes as f64).max(1.0)
            ),
        ),
        Some(_) => line("link", "not connected".into()),
        None => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_in_human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_secs(0.25), "250 ms");
        assert_eq!(human_secs(12.5), "12.5 s");
        assert_eq!(human_secs(180.0), "3.0 min");
        assert_eq!(human_secs(9000.0), "2.5 h");
    }

    #[test]
    fn the_record_table_has_a_header_and_one_aligned_row_per_record() {
        let line = |seq, last| RecordLine {
            seq,
            commit_lsn: "0/16B3748".into(),
            commit_time: "2026-11-02T10:00:00.000Z".into(),
            xid: 7,
            part: 0,
            last,
            changes: 3,
            bytes: 2048,
            tables: vec!["\"public\".\"items\"".into(), "\"public\".\"t\"".into()],
            problem: None,
        };
        let text = list(&[line(9, false), line(10, true)]);
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows.len(), 3, "{text}");
        assert!(
            rows[0].starts_with("seq  commit lsn  commit time "),
            "{text}"
        );
        assert!(
            rows[1].starts_with("  9   0/16B3748  2026-11-02T10:00:00.000Z"),
            "{text}"
        );
        assert!(
            rows[1].ends_with("\"public\".\"items\", \"public\".\"t\"  (continues)"),
            "{text}"
        );
        assert!(rows[2].starts_with(" 10  "), "{text}");
        assert!(rows[2].contains("2.0 KiB"), "{text}");
        assert!(!text.lines().any(|l| l.ends_with(' ')), "{text:?}");
    }
}
