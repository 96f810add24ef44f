//! What apply reports: [`ApplyStatus`] (marks, last error and its class,
//! pause, skip and missing-row counts) read by the admin endpoint and the
//! queue CLI, [`LoadProgress`] of a table copy or seed being loaded,
//! [`JoiningTable`] of a table joining in chunks, and the apply lag.

use pgcourier_proto::Lsn;

/// What `status` and the logs report about apply.
#[derive(Clone, Debug, Default)]
pub struct ApplyStatus {
    pub applied_seq: u64,
    pub applied_commit_lsn: Lsn,
    pub applied_commit_time: i64,
    pub applied_transactions: u64,
    pub last_error: Option<String>,
    /// [`super::ApplyError::class`] of `last_error`.
    pub error_class: Option<&'static str>,
    /// Apply stopped on a definite error (the DBA must act, or skip).
    pub paused: bool,
    /// First record of the transaction apply is stuck on (the one an
    /// operator may skip); `None` when paused because apply cannot start
    /// on the target (a refused login, a bad progress row).
    pub blocking_seq: Option<u64>,
    pub missing_rows: u64,
    /// Conflicts met on two-way tables since start, by outcome.
    pub conflicts: super::two_way::Outcomes,
    pub skipped_transactions: u64,
    /// The copy being loaded, if any.
    pub copy: Option<LoadProgress>,
    /// Tables joining in chunks, as of the last commit (`join.rs`).
    pub joining: Vec<JoiningTable>,
}

/// A table joining in chunks: its rows load into a staging table while
/// its changes are held; the target shows them once the join ends.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JoiningTable {
    /// The join (the sender's id).
    pub join: u64,
    /// The target table, quoted.
    pub table: String,
    /// Rows loaded into the staging table so far.
    pub rows: u64,
}

/// Progress of a table copy being loaded into the target (it commits as one
/// transaction, so the target shows it only at the end).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LoadProgress {
    pub reason: String,
    pub cut_lsn: String,
    pub first_seq: u64,
    pub elapsed_seconds: f64,
    pub rows: u64,
    pub rows_estimate: u64,
    pub rows_per_second: f64,
    pub eta_seconds: Option<f64>,
    /// (table, rows loaded, rows estimated)
    pub tables: Vec<(String, u64, u64)>,
    #[serde(skip)]
    pub(super) started: Option<std::time::Instant>,
    #[serde(skip)]
    pub(super) oids: Vec<u32>,
    /// Its last record is queued: it is loaded once the group commits.
    #[serde(skip)]
    pub(super) complete: bool,
}

impl LoadProgress {
    pub(super) fn count(&mut self, oid: u32) {
        if self.complete {
            return;
        }
        if let Some(i) = self.oids.iter().position(|&o| o == oid) {
            self.tables[i].1 += 1;
            self.rows += 1;
            if self.rows % 4096 == 0 {
                self.refresh();
            }
        }
    }

    pub(super) fn refresh(&mut self) {
        let secs = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        self.elapsed_seconds = secs;
        self.rows_per_second = if secs > 0.0 {
            self.rows as f64 / secs
        } else {
            0.0
        };
        let left: u64 = self
            .tables
            .iter()
            .map(|(_, rows, est)| est.saturating_sub(*rows))
            .sum();
        self.eta_seconds = (self.rows_per_second > 0.0).then(|| left as f64 / self.rows_per_second);
    }
}

/// Seconds between a PostgreSQL-epoch commit time and now.
pub fn lag_seconds(commit_time: i64) -> Option<f64> {
    if commit_time == 0 {
        return None;
    }
    Some(pgcourier_common::pg::time::age_seconds(commit_time))
}
