//! Opening a sled store and making its writes durable.
//!
//! sled 0.34's `flush()` only calls `sync_file_range` on Linux, which does
//! not make data durable across a power loss; its background flusher
//! fsyncs only its log file (`db`). And sled writes any page image over
//! about 128 KiB (a quarter of its segment size: a leaf of about nine
//! 14-24 KiB records is enough, whatever the size of each record) to a file
//! of its own under `blobs/`, which it never fsyncs, nor that directory.
//! Its snapshots (`snap.*`) are fsynced but renamed into place without a
//! directory fsync, and `conf` is written once, unsynced.
//!
//! [`Store::sync`] therefore flushes, then fsyncs every file under the
//! store directory that changed since the last sync (`db` always; `conf`,
//! `snap.*` and each `blobs/*` file when new or changed), then every
//! directory of the store (`blobs/` and the store directory itself).
//! [`Store::open`] fsyncs the parent of each directory it creates, so a new
//! store's own directory entry is durable too. Nothing the store relies on
//! is left unsynced when `sync` returns: only then is a [`Synced`] mark
//! made.
//!
//! Files an owner keeps beside sled in a directory of the store (the
//! segment bodies of a [`SegmentLog`](crate::store::segments::SegmentLog))
//! are that owner's to fsync: it registers a [`Beside`], which `sync` asks
//! to fsync them (and their directory) before sled's own fsync, so that
//! nothing sled holds can point at bytes not yet durable, and whose files
//! no longer referenced are removed only after sled's fsync made their
//! removal from sled durable.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::{DirEntryExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
    #[error("store file {path} cannot be written or read")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Files kept beside sled, in a directory of the store, by their owner.
pub trait Beside: Send + Sync {
    /// The directory, left out of [`Store::sync`]'s own walk.
    fn dir(&self) -> &Path;
    /// fsync every file written since its last fsync, and the directory if
    /// an entry was added. Returns the files whose last reference in sled
    /// was removed before this call: [`Store::sync`] removes them once
    /// sled's fsync has made that removal durable.
    fn sync_files(&self) -> Result<Vec<PathBuf>, StoreError>;
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
    /// The store as the last [`Store::sync`] left it (fsynced).
    synced: Arc<Mutex<SyncedState>>,
    /// Owners of files beside sled ([`Beside`]).
    besides: Arc<Mutex<Vec<Arc<dyn Beside>>>>,
}

/// What the last [`Store::sync`] made durable.
#[derive(Default)]
struct SyncedState {
    /// Each file under the store: a file whose stamp is unchanged need not
    /// be fsynced again.
    files: HashMap<PathBuf, Stamp>,
    /// Each directory's entries (name and inode, sorted): a directory
    /// whose entries are unchanged need not be fsynced again.
    listings: HashMap<PathBuf, Vec<(std::ffi::OsString, u64)>>,
}

/// What tells a changed file: its inode, length and modification time.
/// sled writes each blob and snapshot once under a new name, and `conf`
/// once; only `db` is rewritten in place, and it is fsynced at every sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// How long [`Store::open`] waits for sled's lock on a store to be let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether sled refused to open because another holder has the store's
/// lock (sled 0.34 reports it as an `Other` I/O error with this text).
fn is_lock_refusal(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock"))
}

/// fsync a file or directory, naming it in the error.
pub fn fsync(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| StoreError::Sync {
            path: path.into(),
            source,
        })
}

impl Store {
    /// Open (creating it if needed) the store at `path`, a directory private
    /// to the current user (mode 0700). Each directory created on the way
    /// is made durable in its parent (fsynced) before sled writes in it.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        let dir_err = |source| StoreError::Dir {
            path: path.into(),
            source,
        };
        // The directories this open creates, outermost first.
        let mut created: Vec<&Path> = path
            .ancestors()
            .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
            .collect();
        created.reverse();
        fs::create_dir_all(path).map_err(dir_err)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(dir_err)?;
        for dir in created {
            match dir.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => fsync(parent)?,
                _ => fsync(Path::new("."))?,
            }
        }
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(1000));
        // sled's lock on `db` is let go when the last of its background
        // threads drops the file, a moment after the last handle of a store
        // closed in this process: wait that moment out, and only then say
        // that another process holds it.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match config.open() {
                Err(e) if is_lock_refusal(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => {
                    break other.map_err(|source| StoreError::Open {
                        path: path.into(),
                        source,
                    })?
                }
            }
        };
        Ok(Store {
            db,
            path: path.into(),
            synced: Arc::default(),
            besides: Arc::default(),
        })
    }

    /// Register files kept beside sled: [`Store::sync`] fsyncs them first.
    pub fn add_beside(&self, beside: Arc<dyn Beside>) {
        self.besides
            .lock()
            .expect("store besides lock")
            .push(beside);
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

    /// Make every write so far durable: the files kept beside sled
    /// ([`Beside`]) first, then sled flush, then fsync of every file under
    /// the store that changed since the last sync (`db` always, and `conf`,
    /// `snap.*`, `blobs/*` when new or changed), then of every directory of
    /// the store, deepest first; then the files beside sled that sled no
    /// longer references are removed. Blocks on the disk.
    pub fn sync(&self) -> Result<(), StoreError> {
        let mut synced = self.synced.lock().expect("store sync lock");
        let besides = self.besides.lock().expect("store besides lock").clone();
        let mut unlink = Vec::new();
        for b in &besides {
            unlink.extend(b.sync_files()?);
        }
        let beside_dirs: Vec<&Path> = besides.iter().map(|b| b.dir()).collect();
        self.db.flush().map_err(|e| self.write_err(e))?;
        let mut now = HashMap::with_capacity(synced.files.len());
        let mut listings = HashMap::with_capacity(synced.listings.len());
        let mut dirs = vec![self.path.clone()];
        let mut i = 0;
        while i < dirs.len() {
            let dir = dirs[i].clone();
            i += 1;
            let entries = fs::read_dir(&dir).map_err(|source| StoreError::Sync {
                path: dir.clone(),
                source,
            })?;
            let mut listing = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|source| StoreError::Sync {
                    path: dir.clone(),
                    source,
                })?;
                listing.push((entry.file_name(), entry.ino()));
                let path = entry.path();
                let meta = match fs::symlink_metadata(&path) {
                    Ok(m) => m,
                    // sled removed it meanwhile (an old blob or snapshot).
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(StoreError::Sync { path, source }),
                };
                if meta.is_dir() {
                    if !beside_dirs.contains(&path.as_path()) {
                        dirs.push(path);
                    }
                    continue;
                }
                if !meta.is_file() {
                    continue;
                }
                let stamp = Stamp::of(&meta);
                if path == self.path.join("db") || synced.files.get(&path) != Some(&stamp) {
                    match fsync(&path) {
                        Err(StoreError::Sync { source, .. })
                            if source.kind() == std::io::ErrorKind::NotFound =>
                        {
                            continue
                        }
                        other => other?,
                    }
                }
                now.insert(path, stamp);
            }
            listing.sort_unstable();
            listings.insert(dir, listing);
        }
        // Directory entries (new blobs, a renamed snapshot, removals): the
        // deepest directories first, the store directory last; those whose
        // entries are as the last sync left them are durable already (read
        // before that fsync: an entry added after the reading differs now).
        for dir in dirs.iter().rev() {
            if synced.listings.get(dir) != listings.get(dir) {
                fsync(dir)?;
            }
        }
        synced.files = now;
        synced.listings = listings;
        // Nothing durable references them now. A removal a crash undoes
        // leaves a file no entry references, removed on the next open.
        for path in unlink {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(file = %path.display(), error = %e, "a store file no longer needed could not be removed; it is tried again at the next start")
                }
                _ => {}
            }
        }
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

    /// Locks the store's `db` file the way sled does (flock, exclusive),
    /// as sled's background threads still do a moment after the last
    /// handle of a store is dropped.
    fn hold_lock(path: &Path) -> File {
        use std::os::fd::AsRawFd;
        let file = File::open(path.join("db")).unwrap();
        // SAFETY: flock on a descriptor this function owns.
        assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }, 0);
        file
    }

    #[test]
    fn open_waits_for_a_lock_let_go_a_moment_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        drop(Store::open(&path, 1 << 20).unwrap());
        let held = hold_lock(&path);
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        let store = Store::open(&path, 1 << 20);
        release.join().unwrap();
        assert!(store.is_ok(), "{:?}", store.err());
    }

    #[test]
    fn a_lock_held_on_is_an_error_naming_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        drop(Store::open(&path, 1 << 20).unwrap());
        let _held = hold_lock(&path);
        let err = Store::open(&path, 1 << 20).err().expect("the lock is held");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("another pgcourier process"), "{text}");
    }

    /// Set in the child process that [`sync_leaves_no_written_file_or_directory_unsynced`]
    /// runs under strace: the directory to build the store in.
    const CHILD_ENV: &str = "PGCOURIER_DURABLE_STRACE_CHILD";
    /// Opened (and not found) by the child right after `sync` returned: the
    /// line in the trace after which nothing counts.
    const SYNC_RETURNED: &str = "sync-returned";

    /// The child half: a new store, a write whose page image goes to a blob
    /// file, then `sync`. Does nothing unless the parent test started it.
    #[test]
    fn strace_child_writes_a_blob_then_syncs() {
        let Some(base) = std::env::var_os(CHILD_ENV) else {
            return;
        };
        let base = PathBuf::from(base);
        let store = Store::open(&base.join("store"), 1 << 20).unwrap();
        let records = store.tree("records").unwrap();
        // Twelve 16 KiB values in one leaf (sled splits above 16 items):
        // its page image is over sled's ~128 KiB blob threshold.
        for i in 0..12u64 {
            records
                .insert(seq_key(i), vec![i as u8 + 1; 16 << 10])
                .unwrap();
        }
        // Segment bodies in files beside sled, and their new directory.
        let log =
            crate::store::segments::SegmentLog::open(&store, "segments", None, Some(1)).unwrap();
        log.put(1, &vec![vec![7u8; 1000]; 50]).unwrap();
        store.sync().unwrap();
        let blobs = || fs::read_dir(base.join("store/blobs")).unwrap().count();
        let first = blobs();
        // A second round: a sync fsyncs a directory only when its entries
        // changed, and here they do (new blobs).
        for i in 100..112u64 {
            records
                .insert(seq_key(i), vec![i as u8 + 1; 16 << 10])
                .unwrap();
        }
        store.sync().unwrap();
        let _ = File::open(base.join(SYNC_RETURNED));
        assert!(
            first > 0,
            "no blob file was written: the test would prove nothing"
        );
        assert!(
            blobs() != first,
            "the second round changed no entry of blobs/: the test would prove nothing"
        );
        assert!(
            fs::read_dir(base.join("store/segments.d")).unwrap().count() > 0,
            "no segment file was written: the test would prove nothing"
        );
    }

    /// What a trace says about durability: files written (data or size)
    /// and directories changed (an entry created, renamed or removed) since
    /// their last fsync, up to the marker line.
    #[derive(Debug, Default)]
    struct Unsynced {
        files: std::collections::BTreeSet<String>,
        dirs: std::collections::BTreeSet<String>,
        fsyncs: usize,
        marker_seen: bool,
    }

    fn parent(path: &str) -> String {
        Path::new(path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The path strace -y prints after the first fd argument: `(7</a/b>`.
    fn fd_path(args: &str) -> Option<String> {
        let start = args.find('<')?;
        let end = args[start..].find('>')? + start;
        Some(args[start + 1..end].to_owned())
    }

    /// The quoted string arguments (paths; strace -s is large enough).
    fn quoted(args: &str) -> Vec<String> {
        args.split('"')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s.to_owned())
            .collect()
    }

    fn unsynced(trace: &str, base: &str) -> Unsynced {
        let mut u = Unsynced::default();
        let ours = |p: &str| p == base || p.starts_with(&format!("{base}/"));
        for line in trace.lines() {
            // "<pid>  name(args) = result", possibly "<unfinished ...>".
            let Some((_, call)) = line.trim_start().split_once(char::is_whitespace) else {
                continue;
            };
            let call = call.trim_start();
            if call.starts_with('<') || call.starts_with('+') || call.starts_with('-') {
                continue; // resumed, exited, signal
            }
            let Some((name, args)) = call.split_once('(') else {
                continue;
            };
            if call.contains(SYNC_RETURNED) {
                u.marker_seen = true;
                break;
            }
            let failed = args.contains(") = -1");
            match name {
                "write" | "pwrite64" | "writev" | "pwritev" | "pwritev2" | "ftruncate"
                | "fallocate" => {
                    if let Some(p) = fd_path(args).filter(|p| ours(p)) {
                        u.files.insert(p);
                    }
                }
                "fsync" | "fdatasync" => {
                    if let Some(p) = fd_path(args).filter(|p| ours(p)) {
                        u.fsyncs += 1;
                        u.files.remove(&p);
                        u.dirs.remove(&p);
                    }
                }
                "openat" if args.contains("O_CREAT") && !failed => {
                    // The opened path, as the kernel resolved it.
                    if let Some(p) = args.rsplit_once("= ").and_then(|(_, r)| fd_path(r)) {
                        if ours(&p) {
                            u.dirs.insert(parent(&p));
                        }
                    }
                }
                "mkdir" | "mkdirat" | "unlink" | "unlinkat" | "rmdir" if !failed => {
                    for p in quoted(args).iter().filter(|p| ours(p)) {
                        u.dirs.insert(parent(p));
                        u.files.remove(p);
                    }
                }
                "rename" | "renameat" | "renameat2" if !failed => {
                    let paths = quoted(args);
                    if let [from, to] = &paths[..] {
                        if u.files.remove(from) {
                            u.files.insert(to.clone());
                        }
                        u.dirs.insert(parent(from));
                        u.dirs.insert(parent(to));
                    }
                }
                _ => {}
            }
        }
        u.dirs.retain(|d| ours(d));
        u
    }

    #[test]
    fn the_trace_reader_sees_writes_creations_and_fsyncs() {
        let trace = r#"10 mkdir("/b/store", 0777) = 0
10 openat(AT_FDCWD</w>, "/b/store/db", O_RDWR|O_CREAT|O_CLOEXEC, 0666) = 5</b/store/db>
11 pwrite64(5</b/store/db>, "x", 1, 0) = 1
11 openat(AT_FDCWD</w>, "/b/store/blobs/9", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0666) = 7</b/store/blobs/9>
11 write(7</b/store/blobs/9>, "\x00", 1) = 1
10 fsync(5</b/store/db> <unfinished ...>
11 <... fsync resumed>) = 0
10 write(1</dev/pts/0>, "x", 1) = 1
10 rename("/b/store/snap.1.generating", "/b/store/snap.1") = 0
10 openat(AT_FDCWD</w>, "/b/sync-returned", O_RDONLY|O_CLOEXEC) = -1 ENOENT (No such file or directory)
10 write(7</b/store/blobs/10>, "\x00", 1) = 1
"#;
        let u = unsynced(trace, "/b");
        assert!(u.marker_seen);
        assert_eq!(u.fsyncs, 1);
        assert_eq!(
            u.files.into_iter().collect::<Vec<_>>(),
            ["/b/store/blobs/9"]
        );
        assert_eq!(
            u.dirs.into_iter().collect::<Vec<_>>(),
            ["/b", "/b/store", "/b/store/blobs"]
        );
    }

    /// Issue 12, item 3: sled writes page images over about 128 KiB to
    /// `blobs/` and never fsyncs them or that directory; `sync` must leave
    /// nothing the store wrote, nor any directory entry it made (the store
    /// directory's own in its parent included), unsynced. The child test
    /// runs under `strace -f -y`, which shows every write, creation and
    /// fsync with the path of its file descriptor.
    #[test]
    fn sync_leaves_no_written_file_or_directory_unsynced() {
        if std::env::var_os(CHILD_ENV).is_some() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(dir.path()).unwrap();
        let trace_path = base.join("trace");
        let child = module_path!()
            .split_once("::")
            .map(|(_, m)| format!("{m}::strace_child_writes_a_blob_then_syncs"))
            .unwrap();
        let exe = std::env::current_exe().unwrap();
        let status = std::process::Command::new("strace")
            .args(["-f", "-y", "-qq", "-s", "1024", "-o"])
            .arg(&trace_path)
            .arg("-e")
            .arg(
                "trace=openat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,rmdir,\
                 write,pwrite64,writev,pwritev,pwritev2,ftruncate,fallocate,fsync,fdatasync",
            )
            .arg(exe)
            .args(["--exact", &child, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &base)
            .status()
            .expect("run strace (apt-get install strace): this test traces a child's fsyncs");
        assert!(status.success(), "the traced child failed: {status}");
        let trace = fs::read_to_string(&trace_path).unwrap();
        let u = unsynced(&trace, &base.to_string_lossy());
        assert!(u.marker_seen, "the child never returned from sync");
        assert!(u.fsyncs > 0, "no fsync seen: is the trace readable?");
        assert!(
            u.files.is_empty() && u.dirs.is_empty(),
            "after sync returned, written but never fsynced: files {:?}, directories {:?}",
            u.files,
            u.dirs
        );
    }
}
