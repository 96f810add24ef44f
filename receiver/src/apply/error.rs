//! What can stop apply, and what happens next: [`ApplyError::is_transient`]
//! errors (the target is unreachable or restarting) are retried soon with
//! backoff; the others pause apply on the transaction they name until the
//! DBA fixes the target (or skips it), retried slowly meanwhile.
//! [`ApplyError::class`] is the stable name shown in status and metrics.

use pgcourier_proto::pgoutput;
use pgcourier_proto::record::RecordError;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot connect to the target database (setting `target`)")]
    Connect(#[source] tokio_postgres::Error),
    #[error("target query failed: {what}")]
    Target {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("table {table} does not exist on the target: create it with the source's columns, then apply resumes")]
    MissingTable { table: String },
    #[error("column {column} of table {table} does not exist on the target: ALTER TABLE {table} ADD COLUMN {column} <type>, then apply resumes")]
    MissingColumn { table: String, column: String },
    #[error("table {table} has no primary key on the target and no replica identity on the source: add a primary key on the target")]
    NoKey { table: String },
    #[error("record {seq} in the inbox is corrupt")]
    Corrupt {
        seq: u64,
        #[source]
        source: RecordError,
    },
    #[error("record {seq} holds an undecodable pgoutput message")]
    Decode {
        seq: u64,
        #[source]
        source: pgoutput::DecodeError,
    },
    #[error("record {seq} refers to relation {oid}, which no Relation message described")]
    UnknownRelation { seq: u64, oid: u32 },
    #[error("inbox failed")]
    Inbox(#[from] pgcourier_common::store::durable::StoreError),
    #[error("record {seq} is out of order: {message}")]
    Order { seq: u64, message: String },
    #[error("record {seq} holds copy metadata that does not decode: {message}")]
    CopyMeta { seq: u64, message: String },
    #[error(transparent)]
    Seed(#[from] pgcourier_common::store::seed_file::SeedError),
}

impl ApplyError {
    /// Retry soon with backoff (connection, restart); otherwise the DBA must
    /// act and apply retries slowly until the problem is gone.
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Connect(_) => true,
            ApplyError::Target { source, .. } => {
                if source.is_closed() {
                    return true;
                }
                match source.code() {
                    None => true,
                    Some(c) => {
                        let c = c.code();
                        c.starts_with("08")
                            || c.starts_with("57")
                            || c.starts_with("53")
                            || c == "40001"
                            || c == "40P01"
                            || c == "25006"
                    }
                }
            }
            _ => false,
        }
    }
}

impl ApplyError {
    /// A short stable name of the kind of error, for status and metrics:
    /// `connection`, `read_only`, `missing_table`, `missing_column`,
    /// `type_mismatch`, `unique_violation`, `constraint`,
    /// `permission_denied`, `no_key`, `corrupt_record`, `bad_record`,
    /// `inbox`, `seed` or `target_error`.
    pub fn class(&self) -> &'static str {
        match self {
            ApplyError::Connect(_) => "connection",
            ApplyError::Target { source, .. } => match source.code().map(|c| c.code()) {
                None => "connection",
                Some(c) if c.starts_with("08") || c.starts_with("57") || c.starts_with("53") => {
                    "connection"
                }
                Some("25006") => "read_only",
                Some("42P01") => "missing_table",
                Some("42703") => "missing_column",
                Some("42501") => "permission_denied",
                Some("23505") => "unique_violation",
                Some(c) if c.starts_with("23") => "constraint",
                Some("42804" | "42846") => "type_mismatch",
                Some(c) if c.starts_with("22") => "type_mismatch",
                Some(_) => "target_error",
            },
            ApplyError::MissingTable { .. } => "missing_table",
            ApplyError::MissingColumn { .. } => "missing_column",
            ApplyError::NoKey { .. } => "no_key",
            ApplyError::Corrupt { .. } => "corrupt_record",
            ApplyError::Decode { .. }
            | ApplyError::UnknownRelation { .. }
            | ApplyError::Order { .. }
            | ApplyError::CopyMeta { .. } => "bad_record",
            ApplyError::Inbox(_) => "inbox",
            ApplyError::Seed(_) => "seed",
        }
    }
}

/// Wrap a target error with what apply was doing (verb + object).
pub(super) fn target_err(what: &'static str) -> impl Fn(tokio_postgres::Error) -> ApplyError {
    move |source| ApplyError::Target {
        what: what.to_owned(),
        source,
    }
}
