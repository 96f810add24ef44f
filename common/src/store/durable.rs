//! Opening a sled store and making its writes durable.
//!
//! sled 0.34's `flush()` only calls `sync_file_range` on Linux, which does
//! not make data durable across a power loss; its background flusher is the
//! only fsync. [`Store::sync`] therefore flushes and then fsyncs sled's log
//! file and the directory itself. Records are kept under ~96 KiB so they
//! stay in that log instead of sled's blob files.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store directory {path} cannot be created or secured")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store {path} cannot be opened (is another pgcourier process using it? stop it, or query it through its admin endpoint)")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("store {path} write failed")]
    Write {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("store {path} fsync failed")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store {path} holds a corrupt entry at key {key}")]
    Corrupt { path: PathBuf, key: String },
}

/// A value that is durable: every byte of the store it came from was
/// fsynced, directories included, before it was made. Only
/// [`Store::sync`]'s callers build one, so a function that takes or returns
/// `Synced<_>` says at its call site that it waited for the fsync; a plain
/// value says it did not. Acknowledging upstream (the slot, an `Ack`) takes
/// a `Synced` mark (invariants 1 and 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Synced<T>(T);

impl<T> Synced<T> {
    /// Wrap a value read back or computed right after a successful
    /// [`Store::sync`] of the store that holds it.
    pub fn after_sync(value: T) -> Synced<T> {
        Synced(value)
    }

    pub fn get(self) -> T {
        self.0
    }
}

/// A sled database and the path it lives at.
#[derive(Clone)]
pub struct Store {
    pub db: sled::Db,
    pub path: PathBuf,
}

impl Store {
    /// Open (creating it if needed) the store at `path`, a directory private
    /// to the current user (mode 0700).
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        fs::create_dir_all(path).map_err(|source| StoreError::Dir {
            path: path.into(),
            source,
        })?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(|source| {
            StoreError::Dir {
                path: path.into(),
                source,
            }
        })?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(|source| StoreError::Open {
                path: path.into(),
                source,
            })?;
        Ok(Store {
            db,
            path: path.into(),
        })
    }

    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        self.db.open_tree(name).map_err(|e| self.write_err(e))
    }

    pub fn write_err(&self, source: sled::Error) -> StoreError {
        StoreError::Write {
            path: self.path.clone(),
            source,
        }
    }

    /// Make every write so far durable: sled flush, then fsync of its log
    /// file and directory.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| self.write_err(e))?;
        let sync = |p: &Path| -> Result<(), StoreError> {
            File::open(p)
                .and_then(|f| f.sync_all())
                .map_err(|source| StoreError::Sync {
                    path: p.into(),
                    source,
                })
        };
        sync(&self.path.join("db"))?;
        sync(&self.path)?;
        Ok(())
    }
}

/// Big-endian key so sled's byte order is numeric order.
pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub fn key_seq(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// Read a u64 stored big-endian under `key` in `tree`.
pub fn get_u64(store: &Store, tree: &sled::Tree, key: &str) -> Result<Option<u64>, StoreError> {
    match tree.get(key).map_err(|e| store.write_err(e))? {
        None => Ok(None),
        Some(v) => key_seq(&v).map(Some).ok_or_else(|| StoreError::Corrupt {
            path: store.path.clone(),
            key: key.into(),
        }),
    }
}

pub fn put_u64(store: &Store, tree: &sled::Tree, key: &str, value: u64) -> Result<(), StoreError> {
    tree.insert(key, &value.to_be_bytes())
        .map_err(|e| store.write_err(e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_private_and_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let store = Store::open(&path, 1 << 20).unwrap();
        let meta = store.tree("meta").unwrap();
        put_u64(&store, &meta, "x", 7).unwrap();
        store.sync().unwrap();
        assert_eq!(get_u64(&store, &meta, "x").unwrap(), Some(7));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        drop(meta);
        drop(store);
        let store = Store::open(&path, 1 << 20).unwrap();
        assert_eq!(
            get_u64(&store, &store.tree("meta").unwrap(), "x").unwrap(),
            Some(7)
        );
    }
}
