//! A seed export (C4, seed): the copy of every published table written to
//! a file (format: `common/src/store/seed_file.rs`) instead of the spool,
//! and a one-message marker transaction (`pgcourier.seed`) spooled at the
//! copy's position: where live shipping continues for a branch seeded from
//! the file. Other branches apply the marker as an empty transaction.
//! The file is signed with the sender's TLS key; receivers verify it
//! against the certificates they pin.

use std::path::{Path, PathBuf};
use std::time::Instant;

use pgcourier_common::store::durable::Synced;
use pgcourier_common::store::seed_file::{self, SeedError, SeedHeader, SeedWriter, SEED_PREFIX};
use pgcourier_proto::cutter::{TxnCutter, TxnHead};
use pgcourier_proto::pgoutput::{self, Message};
use pgcourier_proto::record::Record;
use pgcourier_proto::Lsn;

use super::splice::CopyTxn;
use super::status::SeedSummary;
use super::{Capture, CaptureError};
use crate::copy::{self, Cut};

/// Why a seed file could not be written. Reported to whoever asked for it;
/// capture goes on.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("load the sender's certificate (settings `cert`, `key`)")]
    Identity(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the spool has no source identity yet: start the sender once against its source before exporting a seed")]
    NoSource,
    #[error(transparent)]
    File(#[from] SeedError),
    #[error("link {from} to {to}, remove the first and fsync {dir}")]
    Publish {
        from: PathBuf,
        to: PathBuf,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Capture {
    /// Write the seed file at `path`, then spool its marker. Returns the
    /// summary and the marker's fsynced end.
    pub(super) async fn write_seed(
        &mut self,
        cut: &Cut,
        path: &Path,
        txn: &CopyTxn,
        started: Instant,
    ) -> Result<(SeedSummary, Synced<Lsn>), CaptureError> {
        let tables = copy::published_tables(&cut.client, &self.cfg).await?;
        let (meta, relations) = copy::describe(cut, &tables, "seed").await?;
        let identity =
            pgcourier_common::transport::tls::load_identity(&self.cfg.cert, &self.cfg.key)
                .map_err(|e| ExportError::Identity(Box::new(e)))?;
        let marker_seq = self.spool.next_seq();
        let header = SeedHeader {
            version: 1,
            source_id: self.spool.source()?.ok_or(ExportError::NoSource)?,
            sender_cert: identity.cert.to_vec(),
            marker_seq,
            commit_lsn: txn.commit_lsn,
            cut_lsn: cut.lsn,
            created_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            tables: meta.tables.iter().map(|t| t.quoted()).collect(),
        };
        let tmp = path.with_extension("partial");
        let file = create_partial(&tmp)?;
        let mut writer =
            SeedWriter::create(&tmp, file, &header, &identity).map_err(ExportError::from)?;
        tracing::info!(cut = %cut.lsn, tables = meta.tables.len(), file = %path.display(), "exporting a seed");
        let head = |only_for| TxnHead {
            commit_lsn: txn.commit_lsn,
            commit_time: txn.commit_time,
            xid: 0,
            only_for,
        };
        let mut write = |record: Record| -> Result<(), CaptureError> {
            writer
                .record(&record.encode()?)
                .map_err(|e| ExportError::from(e).into())
        };
        // In the file, the copy's records count from 1.
        self.write_copy(
            cut,
            &meta,
            &relations,
            TxnCutter::new(1, head(None)),
            txn.end_lsn,
            &mut write,
        )
        .await?;
        let records = writer.finish().map_err(ExportError::from)?;
        // The file under its final name is durable before the marker that
        // points at it is spooled.
        publish(&tmp, path)?;
        let content = serde_json::to_vec(&serde_json::json!({
            "file": path.display().to_string(),
            "cut_lsn": cut.lsn.to_string(),
        }))
        .expect("a JSON object of two strings encodes");
        let mut marker = TxnCutter::new(marker_seq, head(None));
        for record in marker.push(&pgoutput::encode(&Message::LogicalMessage {
            transactional: true,
            lsn: cut.lsn,
            prefix: SEED_PREFIX.into(),
            content,
        })) {
            self.spool.append(record.seq, &record.encode()?)?;
        }
        let record = marker.finish(txn.end_lsn);
        self.spool.append(record.seq, &record.encode()?)?;
        let (commit, end) = (txn.commit_lsn, txn.end_lsn);
        let synced = self
            .blocking(move |spool| spool.commit(commit, end))
            .await?;
        let rows = self.copy_finished();
        let summary = SeedSummary {
            path: path.display().to_string(),
            marker_seq,
            cut_lsn: cut.lsn.to_string(),
            tables: meta.tables.len(),
            rows,
            records,
            file_bytes: std::fs::metadata(path).map_or(0, |m| m.len()),
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(file = %path.display(), marker_seq, rows, records, bytes = summary.file_bytes, "seed exported");
        Ok((summary, synced))
    }
}

/// Open the `.partial` file a seed is written to: new, private (0600),
/// never through a symbolic link.
fn create_partial(tmp: &Path) -> Result<std::fs::File, ExportError> {
    Ok(seed_file::create_private(tmp)?)
}

/// Give the finished `.partial` file its final name and make that durable.
/// `link` (not `rename`) so that an existing path, or a symbolic link put
/// there meanwhile, is never replaced: it fails with `EEXIST` instead.
fn publish(tmp: &Path, path: &Path) -> Result<(), ExportError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    if let Err(source) = std::fs::hard_link(tmp, path) {
        let _ = std::fs::remove_file(tmp);
        return Err(match source.kind() {
            std::io::ErrorKind::AlreadyExists => SeedError::Exists { path: path.into() }.into(),
            _ => ExportError::Publish {
                from: tmp.into(),
                to: path.into(),
                dir: dir.into(),
                source,
            },
        });
    }
    std::fs::remove_file(tmp)
        .and_then(|()| std::fs::File::open(dir)?.sync_all())
        .map_err(|source| ExportError::Publish {
            from: tmp.into(),
            to: path.into(),
            dir: dir.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn write_seed(tmp: &Path, path: &Path) -> Result<(), ExportError> {
        let mut f = create_partial(tmp)?;
        f.write_all(b"a seed").expect("write");
        drop(f);
        publish(tmp, path)
    }

    #[test]
    fn a_seed_file_is_created_new_private_and_never_over_or_through_an_existing_path() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, path) = (dir.path().join("s.partial"), dir.path().join("s.seed"));
        write_seed(&tmp, &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the seed file's mode");

        // An existing file is never replaced.
        let existing = dir.path().join("existing");
        std::fs::write(&existing, "precious").unwrap();
        assert!(
            write_seed(&tmp, &existing).is_err(),
            "wrote over an existing file"
        );
        assert_eq!(std::fs::read(&existing).unwrap(), b"precious");
        let _ = std::fs::remove_file(&tmp);

        // A symbolic link as the final name, or as the .partial, is never
        // followed.
        let target = dir.path().join("target");
        std::fs::write(&target, "precious").unwrap();
        let link = dir.path().join("link.seed");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(
            write_seed(&tmp, &link).is_err(),
            "wrote over a symbolic link"
        );
        let _ = std::fs::remove_file(&tmp);
        let link_partial = dir.path().join("l.partial");
        std::os::unix::fs::symlink(&target, &link_partial).unwrap();
        assert!(
            write_seed(&link_partial, &dir.path().join("l.seed")).is_err(),
            "wrote through a symbolic .partial"
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        let dangling = dir.path().join("dangling.partial");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(
            write_seed(&dangling, &dir.path().join("d.seed")).is_err(),
            "created a file through a dangling symbolic link"
        );
        assert!(!dir.path().join("nowhere").exists());
    }
}
