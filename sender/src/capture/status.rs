//! Capture's state for status and metrics, and seed export requests and
//! their outcome (what `pgcourier-sender seed export` follows).

use std::path::PathBuf;

use tokio::sync::oneshot;

use crate::copy::CopyProgress;
use crate::source;

/// Capture's state for status and metrics.
#[derive(Clone, Debug, Default)]
pub struct CaptureStatus {
    pub slot: Option<source::SlotStats>,
    pub last_error: Option<String>,
    /// Capture is paused: the spool holds `spool-max-bytes` or more.
    pub spool_full: bool,
    pub transactions: u64,
    /// Transactions a receiver's apply wrote here, not captured (they came
    /// from another site; carrying them would send them back).
    pub looped_transactions: u64,
    /// Transactions a receiver's apply wrote here from the site of one of
    /// this sender's receivers, forwarded to the others.
    pub forwarded_transactions: u64,
    /// Local writes to tables this site does not ship (`ship-tables =
    /// "two-way"`), by table, since start.
    pub one_way_writes: std::collections::BTreeMap<String, u64>,
    /// The copy being read, if any.
    pub copy: Option<CopyProgress>,
    /// Tables waiting for a copy.
    pub copy_waiting: usize,
    /// How the last seed export ended.
    pub last_seed: Option<SeedOutcome>,
}

/// How capture's first session went (`Capture::with_started`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureStart {
    /// The slot is in place and capture streams from it.
    Capturing,
    /// The source could not be reached or refused for now; capture retries.
    Retrying,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SeedOutcome {
    pub path: String,
    pub summary: Option<SeedSummary>,
    pub error: Option<String>,
}

/// An operator's request for a seed file (`pgcourier-sender seed export`).
pub struct SeedRequest {
    pub path: PathBuf,
    pub reply: oneshot::Sender<Result<SeedSummary, String>>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SeedSummary {
    pub path: String,
    pub marker_seq: u64,
    pub cut_lsn: String,
    pub tables: usize,
    pub rows: u64,
    pub records: u64,
    pub file_bytes: u64,
    pub seconds: f64,
}

impl SeedRequest {
    /// Answer the requester and record the outcome for status.
    pub(super) fn answer(
        self,
        status: &std::sync::Mutex<CaptureStatus>,
        result: Result<SeedSummary, String>,
    ) {
        status.lock().expect("status lock").last_seed = Some(SeedOutcome {
            path: self.path.display().to_string(),
            summary: result.as_ref().ok().cloned(),
            error: result.as_ref().err().cloned(),
        });
        if let Err(e) = &result {
            tracing::error!(file = %self.path.display(), error = %e, "seed export failed");
        }
        // The requester may have gone (a CLI that was interrupted).
        let _ = self.reply.send(result);
    }
}
