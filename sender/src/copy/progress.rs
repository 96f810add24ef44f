//! Progress of the copy being read, for status, metrics and the seed
//! export's progress bar. The copy defines it; capture keeps it in
//! `CaptureStatus::copy` and adds each [`Rows`] it takes.

use std::time::Instant;

use pgcourier_common::store::seed_file::CopyMeta;

use super::Rows;

/// Progress of one table's copy.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TableProgress {
    pub table: String,
    pub rows: u64,
    pub bytes: u64,
    pub rows_estimate: u64,
    pub bytes_estimate: u64,
    pub done: bool,
}

/// Progress of the copy being read.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CopyProgress {
    pub reason: String,
    pub cut_lsn: String,
    pub started_unix: i64,
    pub elapsed_seconds: f64,
    pub rows: u64,
    pub bytes: u64,
    pub rows_per_second: f64,
    pub eta_seconds: Option<f64>,
    pub tables: Vec<TableProgress>,
    /// When reading started (this process's clock; not reported).
    #[serde(skip)]
    started: Option<Instant>,
}

impl CopyProgress {
    /// A copy of the tables in `meta`, starting now.
    pub fn new(meta: &CopyMeta) -> CopyProgress {
        CopyProgress {
            reason: meta.reason.clone(),
            cut_lsn: meta.cut_lsn.to_string(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            tables: meta
                .tables
                .iter()
                .map(|t| TableProgress {
                    table: t.quoted(),
                    rows_estimate: t.rows_estimate,
                    bytes_estimate: t.bytes_estimate,
                    ..TableProgress::default()
                })
                .collect(),
            started: Some(Instant::now()),
            ..CopyProgress::default()
        }
    }

    /// Count rows taken from a reader, and update the totals and the
    /// estimate of the time left.
    pub fn add(&mut self, rows: &Rows) {
        self.add_counts(
            rows.table,
            rows.messages.len() as u64,
            rows.bytes,
            rows.done,
        );
    }

    /// Count `rows` rows of `bytes` read from the table at `table` (in
    /// the copy's list); `done`: its last.
    pub fn add_counts(&mut self, table: usize, rows: u64, bytes: u64, done: bool) {
        if let Some(t) = self.tables.get_mut(table) {
            t.rows += rows;
            t.bytes += bytes;
            t.done = done;
        }
        self.elapsed_seconds = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        self.rows = self.tables.iter().map(|t| t.rows).sum();
        self.bytes = self.tables.iter().map(|t| t.bytes).sum();
        self.rows_per_second = if self.elapsed_seconds > 0.0 {
            self.rows as f64 / self.elapsed_seconds
        } else {
            0.0
        };
        let left: u64 = self
            .tables
            .iter()
            .filter(|t| !t.done)
            .map(|t| t.rows_estimate.saturating_sub(t.rows))
            .sum();
        self.eta_seconds = (self.rows_per_second > 0.0).then(|| left as f64 / self.rows_per_second);
    }
}
