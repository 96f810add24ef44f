//! `pgcourier-receiver seed import FILE`: load a seed file exported by the
//! sender into the branch, so live shipping continues from the seed's
//! marker with no gap and no duplicate.
//!
//! The whole file is read and verified (its sender's certificate pinned in
//! `sender-fingerprints`, every record's checksum, the count, SHA-256 and
//! the sender's signature in its trailer) before anything is applied, and
//! refused when it comes from another sender or source, or is older than
//! what the branch already holds. It is then applied as one target transaction
//! together with the progress row; only after that commit is the inbox moved
//! to the seed's marker (running the import again after a crash between the
//! two completes it).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use pgcourier_common::ops::progress::Bar;
use pgcourier_common::pg::progress_row;
use pgcourier_common::store::seed_file::SeedReader;
use pgcourier_proto::Lsn;

use crate::apply::{Apply, TargetClient};
use crate::inbox::Inbox;
use crate::ReceiverConfig;

pub struct Imported {
    pub rows: u64,
    pub records: u64,
    pub marker_seq: u64,
    pub cut_lsn: Lsn,
    /// The seed had been applied already; only the inbox was moved.
    pub completed_earlier: bool,
}

pub fn import(cfg: ReceiverConfig, file: &Path) -> anyhow::Result<Imported> {
    let pinned = cfg.sender_fingerprints.clone();
    let (header, records) = SeedReader::verify_all(file, &pinned)?;
    let inbox = Arc::new(
        Inbox::open(&cfg.inbox_dir, cfg.cache_capacity).with_context(|| {
            format!(
                "open inbox {} (setting `inbox-dir`); stop the receiver before importing a seed",
                cfg.inbox_dir.display()
            )
        })?,
    );
    if let Some(source) = inbox.source()? {
        if source != header.source_id {
            bail!(
                "seed file {} comes from source {}, but this branch follows {}: use a seed from this branch's source",
                file.display(),
                header.source_id,
                source
            );
        }
    }
    if inbox.durable_seq() > header.marker_seq {
        bail!(
            "seed file {} is older than what this branch already holds (inbox at record {}, seed at record {}): export a new seed",
            file.display(),
            inbox.durable_seq(),
            header.marker_seq
        );
    }
    let rt = pgcourier_common::ops::logging::runtime();
    rt.block_on(async {
        let applied = applied_lsn(&cfg, &header.source_id).await?;
        if let Some(applied) = applied.filter(|&a| a > header.commit_lsn) {
            bail!(
                "seed file {} is older than what this branch already applied (branch at {}, seed at {}): export a new seed",
                file.display(),
                applied,
                header.commit_lsn
            );
        }
        let mut out = Imported {
            rows: 0,
            records,
            marker_seq: header.marker_seq,
            cut_lsn: header.cut_lsn,
            completed_earlier: applied == Some(header.commit_lsn),
        };
        if !out.completed_earlier {
            if inbox.source()?.is_none() {
                inbox.set_source(&header.source_id)?;
            }
            let apply = Apply::new(Arc::new(cfg), inbox.clone());
            let mut reader = SeedReader::open(file, &pinned)?;
            let mut bar = Bar::default();
            out.rows = apply
                .apply_seed(&mut reader, |p| {
                    bar.draw("seed import", p.rows, p.rows_estimate, p.rows_per_second, p.eta_seconds)
                })
                .await?;
            bar.finish();
        }
        inbox.reset_to_seed(&header.source_id, header.marker_seq)?;
        Ok(out)
    })
}

/// The commit LSN this branch has applied from `source`, from its progress
/// row (`None`: nothing applied yet, or no progress table).
async fn applied_lsn(cfg: &ReceiverConfig, source: &str) -> anyhow::Result<Option<Lsn>> {
    let client = TargetClient::connect(&cfg.target)
        .await
        .context("connect to the target database (setting `target`)")?;
    let progress = progress_row::read(&client, source).await;
    client.close().await;
    Ok(progress?.map(|p| p.commit_lsn))
}
