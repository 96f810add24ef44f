//! What stops capture, and whether to retry.

use pgcourier_common::store::durable::StoreError;
use pgcourier_proto::cutter::CutError;
use pgcourier_proto::record::RecordError;
use pgcourier_proto::walstream::StreamError;

use super::ExportError;
use crate::copy::CopyError;
use crate::replication::ReplicationError;
use crate::source::SourceError;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error("spool write failed")]
    Spool(#[from] StoreError),
    #[error("record encoding failed")]
    Record(#[from] RecordError),
    #[error(transparent)]
    Cut(#[from] CutError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("the source's replication stream is malformed")]
    Stream(#[from] StreamError),
    /// The seed file could not be written: reported to whoever asked;
    /// capture goes on.
    #[error("seed export failed")]
    Seed(#[from] ExportError),
    #[error("the spool's fsync task stopped unexpectedly")]
    Blocking(#[source] tokio::task::JoinError),
    /// A joining table's reader ended without its end: the join is
    /// abandoned and its tables copied again from a new cut.
    #[error("the reader of a joining table stopped unexpectedly; the table will be copied again")]
    JoinReader,
}

impl CaptureError {
    /// Worth retrying after a pause (connection lost, server restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            CaptureError::Source(e) => e.is_transient(),
            CaptureError::Copy(e) => e.is_transient(),
            CaptureError::Replication(e) => e.fault().transient,
            CaptureError::JoinReader => true,
            CaptureError::Stream(_)
            | CaptureError::Spool(_)
            | CaptureError::Record(_)
            | CaptureError::Cut(_)
            | CaptureError::Seed(_)
            | CaptureError::Blocking(_) => false,
        }
    }
}
