//! Records kept in segments: runs of consecutive records in files of our
//! own, indexed by sled.
//!
//! The spool and the inbox each hold a dense sequence of encoded records,
//! every one carrying its own CRC-32 ([`Record`](pgcourier_proto::record)).
//! With one sled key per record, sled's per-key work (tree search, page
//! deltas, consolidation, deletes) was paid once per change and cost about
//! 40% of the sender's CPU and 45% of the receiver's (issue 13). A
//! [`SegmentLog`] packs consecutive records into segments of about
//! [`SEGMENT_BYTES`] and pays it once per segment.
//!
//! Why the bodies are not in sled: sled 0.34 keeps in memory the values it
//! holds, whatever its `cache_capacity` (REFERENCE.md; heaptrack on the
//! receiver during a 1M-row transaction kept in sled: 120 MiB allocated by
//! `IVec::from`, the whole transaction). Memory must not grow with the
//! backlog or a transaction's size (invariant 5), so sled keeps only a
//! small locator per segment, and the bodies go to append-only files that
//! are read back with `pread`.
//!
//! # Layout
//!
//! - Directory `<store>/<name>.d/`: files named by a number (20 digits),
//!   each a run of segment bodies appended one after another. A process
//!   appends to a file of its own, which it closes at about [`FILE_BYTES`]
//!   for the next. A body is [`FORMAT`] (one byte), then for each record
//!   `[length: u32 little-endian][the encoded record]`. Bodies are written
//!   once and never changed.
//! - Tree `<name>.index`: key = the segment's first seq (u64 big-endian),
//!   value = its [`Loc`]: file, offset and length of the body, how many of
//!   its records count and their bytes. Segments are dense and never
//!   overlap: each one's key is the previous one's key plus its record
//!   count. Cutting a segment short ([`SegmentLog::truncate_from`]) writes
//!   a smaller count; the body stays.
//! - Tree `<name>.low`, key `low`: the highest seq deleted
//!   ([`SegmentLog::trim_through`]). Records at or below it are gone even
//!   while the segment that holds them still holds later ones; a segment's
//!   locator is removed once all of its records are, and a file once no
//!   locator references it. Written with each trim and not fsynced by
//!   itself: after a crash, records at or below the real mark may come
//!   back, as a delete a crash undid always could (the spool ships from
//!   each receiver's own mark; apply skips what its progress row covers).
//!
//! Earlier versions kept the records in sled: one key per record (tree
//! `records`), then the bodies themselves in tree `<name>`.
//! [`SegmentLog::open`] moves them into files, fsynced before the old keys
//! are removed.
//!
//! # Durability
//!
//! Nothing here fsyncs by itself on the write path. The log registers with
//! its [`Store`] as a [`Beside`]: [`Store::sync`] fsyncs the files written
//! (and the directory, when a file was added) before sled's fsync, and
//! removes a file only after sled's fsync made its last locator's removal
//! durable. A locator may reach the disk before the body it points at (sled
//! writes its log when it likes): such locators are past the owner's
//! durable mark, an unfinished tail the owner cuts on open (`tail_from`).
//! The owner's durable mark itself must not reach sled before the bodies
//! it covers are fsynced: owners call [`SegmentLog::sync_files`] before
//! they write it (the spool's `sync_sealed`, the inbox's `store_batch`).
//!
//! # Memory
//!
//! Records appended and not yet written ([`SegmentLog::append`]) wait in
//! memory, at most one segment, until the segment is full or the owner
//! calls [`SegmentLog::write_pending`] (before its fsync). Reads parse one
//! segment and keep it: reading record after record costs one `pread` per
//! segment. Memory: the pending segment and the one kept for reading, each
//! under `SEGMENT_BYTES` plus one record, a handful of open files, and
//! sled's index (about 50 bytes per segment).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::store::durable::{fsync, key_seq, seq_key, Beside, Store, StoreError};

/// A segment is written once its records reach this many bytes.
pub const SEGMENT_BYTES: usize = 32 << 10;

/// A process appends to one file until it reaches this many bytes.
pub const FILE_BYTES: u64 = 16 << 20;

/// First byte of every segment body: the layout above.
const FORMAT: u8 = 1;

/// First byte of every locator.
const LOC_FORMAT: u8 = 2;

/// Key of the low mark in tree `<name>.low`.
const LOW_KEY: &[u8] = b"low";

/// Files kept open for reading, besides the one appended to.
const READERS: usize = 8;

/// Where a segment's body lies, and what of it counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    file: u64,
    offset: u64,
    len: u32,
    /// Records of the body that belong to the log (the first ones): fewer
    /// than the body holds once the segment was cut short.
    records: u32,
    /// Their bytes (records only, without the length fields).
    bytes: u64,
}

impl Loc {
    const LEN: usize = 1 + 8 + 8 + 4 + 4 + 8;

    fn encode(&self) -> [u8; Loc::LEN] {
        let mut out = [0u8; Loc::LEN];
        out[0] = LOC_FORMAT;
        out[1..9].copy_from_slice(&self.file.to_be_bytes());
        out[9..17].copy_from_slice(&self.offset.to_be_bytes());
        out[17..21].copy_from_slice(&self.len.to_be_bytes());
        out[21..25].copy_from_slice(&self.records.to_be_bytes());
        out[25..33].copy_from_slice(&self.bytes.to_be_bytes());
        out
    }

    fn decode(v: &[u8]) -> Option<Loc> {
        if v.len() != Loc::LEN || v[0] != LOC_FORMAT {
            return None;
        }
        let loc = Loc {
            file: u64::from_be_bytes(v[1..9].try_into().ok()?),
            offset: u64::from_be_bytes(v[9..17].try_into().ok()?),
            len: u32::from_be_bytes(v[17..21].try_into().ok()?),
            records: u32::from_be_bytes(v[21..25].try_into().ok()?),
            bytes: u64::from_be_bytes(v[25..33].try_into().ok()?),
        };
        (loc.records > 0).then_some(loc)
    }
}

pub struct SegmentLog {
    store: Store,
    name: String,
    index: sled::Tree,
    low_tree: sled::Tree,
    files: Arc<Files>,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Records appended and not yet in a file.
    pending: Pending,
    /// Highest seq deleted: nothing at or below it is read.
    low: u64,
    /// Highest seq stored (pending included); `low` when none is.
    last: u64,
    /// Records stored above `low` (pending included), and their bytes.
    count: u64,
    bytes: u64,
    /// Bytes appended since the log was opened (never goes down): with a
    /// [`AfterMemo`], what arrived after a mark without reading it.
    appended: u64,
    /// The segment read last, parsed.
    cached: Option<Parsed>,
    /// Counts cuts and removals of segments that may be read
    /// ([`SegmentLog::truncate_from`], [`SegmentLog::reset`]): a read that
    /// began before one does not keep what it read.
    rewrites: u64,
}

#[derive(Default)]
struct Pending {
    first: u64,
    count: u64,
    /// The segment body being built (starts with [`FORMAT`]).
    value: Vec<u8>,
}

/// What [`SegmentLog::bytes_after_memo`] keeps between calls for one mark.
#[derive(Clone, Copy, Debug)]
pub struct AfterMemo {
    seq: u64,
    bytes: u64,
    appended: u64,
    rewrites: u64,
}

/// A segment body and where each of its records (those that count) lies.
struct Parsed {
    first: u64,
    value: Vec<u8>,
    /// `(start, length)` of each record in `value`.
    spans: Vec<(usize, usize)>,
}

impl Parsed {
    fn holds(&self, seq: u64) -> bool {
        seq >= self.first && seq - self.first < self.spans.len() as u64
    }

    fn last(&self) -> u64 {
        self.first + self.spans.len() as u64 - 1
    }

    fn record(&self, seq: u64) -> &[u8] {
        let (start, len) = self.spans[(seq - self.first) as usize];
        &self.value[start..start + len]
    }

    /// Bytes of the records `from..=to` it holds.
    fn bytes_between(&self, from: u64, to: u64) -> u64 {
        let skip = from.saturating_sub(self.first) as usize;
        let take = (to.min(self.last()) + 1).saturating_sub(self.first.max(from)) as usize;
        self.spans
            .iter()
            .skip(skip)
            .take(take)
            .map(|s| s.1 as u64)
            .sum()
    }
}

/// The spans of the first `records` records in a segment body (all of
/// them with `u32::MAX`, ending where the body ends); `None` if it is not a
/// body holding that many.
fn spans(value: &[u8], records: u32) -> Option<Vec<(usize, usize)>> {
    if value.first() != Some(&FORMAT) {
        return None;
    }
    let all = records == u32::MAX;
    let mut out = Vec::with_capacity(if all { 0 } else { records as usize });
    let mut at = 1;
    while out.len() < records as usize && !(all && at == value.len()) {
        let len = u32::from_le_bytes(value.get(at..at + 4)?.try_into().ok()?) as usize;
        let start = at + 4;
        if value.len() - start < len {
            return None;
        }
        out.push((start, len));
        at = start + len;
    }
    Some(out)
}

/// The segment files of one log: the one appended to, those open for
/// reading, what awaits an fsync, and which files sled still references.
struct Files {
    dir: PathBuf,
    st: Mutex<FilesState>,
    /// Held through an fsync of the files: a second caller returns only
    /// once what the first took is durable.
    fsyncing: Mutex<()>,
}

#[derive(Default)]
struct FilesState {
    /// The file appended to: its number, handle and length.
    current: Option<(u64, Arc<File>, u64)>,
    /// The number the next new file takes.
    next: u64,
    /// Locators referencing each file.
    live: BTreeMap<u64, u64>,
    readers: BTreeMap<u64, Arc<File>>,
    /// Files written since their last fsync.
    dirty: BTreeMap<u64, Arc<File>>,
    /// A file was added to the directory since its last fsync.
    dir_dirty: bool,
    /// The directory exists (made durable in the store directory).
    dir_made: bool,
    /// The files found in the directory on open.
    found: Vec<u64>,
    /// Files no locator references any more, waiting for that to be
    /// durable before they are removed.
    doomed: Vec<u64>,
}

impl Files {
    fn path(&self, file: u64) -> PathBuf {
        self.dir.join(format!("{file:020}"))
    }

    fn io_err(&self, path: PathBuf) -> impl FnOnce(std::io::Error) -> StoreError {
        move |source| StoreError::File { path, source }
    }

    /// Append a segment body; returns its file and offset. Not fsynced.
    fn write(&self, body: &[u8]) -> Result<(u64, u64), StoreError> {
        let mut st = self.st.lock().expect("segment files lock");
        if st.current.as_ref().is_none_or(|c| c.2 >= FILE_BYTES) {
            if !st.dir_made {
                // Made at the first write, so that inspection writes nothing.
                match fs::create_dir(&self.dir) {
                    Ok(()) => fsync(self.dir.parent().expect("the store directory"))?,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(source) => {
                        return Err(StoreError::Dir {
                            path: self.dir.clone(),
                            source,
                        })
                    }
                }
                st.dir_made = true;
            }
            let n = st.next;
            let path = self.path(n);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(self.io_err(path))?;
            st.next += 1;
            st.dir_dirty = true;
            if let Some((old, _, _)) = st.current.replace((n, Arc::new(file), 0)) {
                if st.live.get(&old).copied().unwrap_or(0) == 0 {
                    st.live.remove(&old);
                    st.doomed.push(old);
                }
            }
        }
        let (n, file, len) = st.current.clone().expect("a current file");
        file.write_all_at(body, len)
            .map_err(self.io_err(self.path(n)))?;
        st.current.as_mut().expect("a current file").2 = len + body.len() as u64;
        st.dirty.insert(n, file);
        *st.live.entry(n).or_default() += 1;
        Ok((n, len))
    }

    /// One locator less references `file`.
    fn release(&self, file: u64) {
        let mut st = self.st.lock().expect("segment files lock");
        let Some(n) = st.live.get_mut(&file) else {
            return;
        };
        *n -= 1;
        if *n == 0 && st.current.as_ref().is_none_or(|c| c.0 != file) {
            st.live.remove(&file);
            st.readers.remove(&file);
            st.doomed.push(file);
        }
    }

    /// A handle to read `file`.
    fn reader(&self, file: u64) -> Result<Arc<File>, StoreError> {
        let mut st = self.st.lock().expect("segment files lock");
        if let Some(c) = st.current.as_ref().filter(|c| c.0 == file) {
            return Ok(c.1.clone());
        }
        if let Some(f) = st.readers.get(&file) {
            return Ok(f.clone());
        }
        let path = self.path(file);
        let f = Arc::new(File::open(&path).map_err(self.io_err(path))?);
        if st.readers.len() >= READERS {
            st.readers.pop_first();
        }
        st.readers.insert(file, f.clone());
        Ok(f)
    }

    /// fsync the files written, and the directory if a file was added.
    fn fsync_written(&self) -> Result<(), StoreError> {
        let _fsyncing = self.fsyncing.lock().expect("segment fsync lock");
        let (dirty, dir_dirty) = {
            let mut st = self.st.lock().expect("segment files lock");
            (
                std::mem::take(&mut st.dirty),
                std::mem::take(&mut st.dir_dirty),
            )
        };
        let put_back = |dirty: BTreeMap<u64, Arc<File>>, failed: Option<u64>| {
            let mut st = self.st.lock().expect("segment files lock");
            for (n, f) in dirty {
                st.dirty.entry(n).or_insert(f);
            }
            st.dir_dirty |= dir_dirty;
            // After a failed fsync the kernel may have dropped the pages it
            // could not write: nothing more is appended to that file.
            if failed.is_some() && st.current.as_ref().map(|c| c.0) == failed {
                if let Some((n, _, _)) = st.current.take() {
                    if st.live.get(&n) == Some(&0) {
                        st.live.remove(&n);
                        st.doomed.push(n);
                    }
                }
            }
        };
        for (n, f) in &dirty {
            if let Err(source) = f.sync_data() {
                let (n, path) = (*n, self.path(*n));
                put_back(dirty, Some(n));
                return Err(StoreError::Sync { path, source });
            }
        }
        if dir_dirty {
            if let Err(e) = fsync(&self.dir) {
                put_back(BTreeMap::new(), None);
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Beside for Files {
    fn dir(&self) -> &Path {
        &self.dir
    }

    fn sync_files(&self) -> Result<Vec<PathBuf>, StoreError> {
        // Taken first: their locators were removed before this call, so
        // the sled fsync that follows makes the removal durable.
        let doomed = std::mem::take(&mut self.st.lock().expect("segment files lock").doomed);
        if let Err(e) = self.fsync_written() {
            self.st
                .lock()
                .expect("segment files lock")
                .doomed
                .extend(doomed);
            return Err(e);
        }
        Ok(doomed.into_iter().map(|n| self.path(n)).collect())
    }
}

impl SegmentLog {
    /// Open the log in trees `<name>.index` and `<name>.low` and directory
    /// `<name>.d` of `store`, checking every locator (format, density, the
    /// file's length) and counting the records. Given `legacy`, records an
    /// earlier version kept in sled (one per key in tree `legacy`, or in
    /// segments in tree `<name>`) are moved into files first, fsynced;
    /// without it (inspection), finding such records is an error. Records
    /// from `tail_from` on are an unfinished tail the owner never made
    /// durable (the spool's past `complete_seq`, the inbox's past
    /// `durable_seq`): they are removed before the check, since a crash may
    /// have left any part of them; files no locator references are then
    /// removed at the next sync. Without `tail_from` (inspection) nothing
    /// is written.
    pub fn open(
        store: &Store,
        name: &str,
        legacy: Option<&str>,
        tail_from: Option<u64>,
    ) -> Result<SegmentLog, StoreError> {
        let dir = store.path.join(format!("{name}.d"));
        let files = Arc::new(Files {
            dir,
            st: Mutex::default(),
            fsyncing: Mutex::default(),
        });
        store.add_beside(files.clone());
        let log = SegmentLog {
            store: store.clone(),
            name: name.into(),
            index: store.tree(&format!("{name}.index"))?,
            low_tree: store.tree(&format!("{name}.low"))?,
            files,
            inner: Mutex::new(Inner {
                pending: Pending::default(),
                low: 0,
                last: 0,
                count: 0,
                bytes: 0,
                appended: 0,
                cached: None,
                rewrites: 0,
            }),
        };
        log.scan_files()?;
        match legacy {
            Some(legacy) => log.migrate(legacy)?,
            None => {
                if !store.tree(name)?.is_empty() {
                    return Err(StoreError::Dir {
                        path: store.path.clone(),
                        source: std::io::Error::other(format!(
                            "records of an earlier version in tree {name}: start the daemon once to convert them, then inspect"
                        )),
                    });
                }
            }
        }
        if let Some(from) = tail_from {
            let (dropped, _) = log.cut_tail(from)?;
            if dropped > 0 {
                tracing::info!(store = %store.path.display(), dropped, from, "removed the records of a batch never made durable (cut by a stop); they will come again");
            }
        }
        log.recount(tail_from.is_some())?;
        Ok(log)
    }

    /// Number the next file after every one in the directory.
    fn scan_files(&self) -> Result<(), StoreError> {
        let mut found = Vec::new();
        if self.files.dir.exists() {
            let entries = fs::read_dir(&self.files.dir).map_err(|source| StoreError::Dir {
                path: self.files.dir.clone(),
                source,
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| StoreError::Dir {
                    path: self.files.dir.clone(),
                    source,
                })?;
                if let Some(n) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    found.push(n);
                }
            }
        }
        let mut st = self.files.st.lock().expect("segment files lock");
        st.next = found.iter().max().map_or(0, |n| n + 1);
        st.found = found;
        Ok(())
    }

    /// Move records an earlier version kept in sled into files: one per key
    /// (key = seq, value = record) in tree `legacy`, or segment bodies in
    /// tree `<name>` (with the same low mark). Written and fsynced before
    /// the old keys are removed (and fsynced). A crash between the two
    /// leaves both; the next open starts over from the old keys.
    fn migrate(&self, legacy: &str) -> Result<(), StoreError> {
        let per_record = self.store.tree(legacy)?;
        let bodies = self.store.tree(&self.name)?;
        if per_record.is_empty() && bodies.is_empty() {
            return Ok(());
        }
        // What a migration a crash cut short left (its files are orphans,
        // removed by the open's repair).
        self.index.clear().map_err(|e| self.store.write_err(e))?;
        let mut moved = 0u64;
        let mut take = |seq: u64, record: &[u8], what: &str| -> Result<(), StoreError> {
            let inner = self.inner.lock().expect("segment log lock");
            let (count, last) = (inner.count, inner.last);
            drop(inner);
            if count == 0 {
                // Everything before the first record kept was deleted.
                self.set_low(seq - 1)?;
                let mut inner = self.inner.lock().expect("segment log lock");
                inner.low = seq - 1;
                inner.last = seq - 1;
            } else if seq != last + 1 {
                return Err(self.corrupt(&format!("{what}/{seq} (records are not dense)")));
            }
            self.append(seq, record)?;
            moved += 1;
            Ok(())
        };
        if !per_record.is_empty() {
            self.low_tree.clear().map_err(|e| self.store.write_err(e))?;
            for item in per_record.iter() {
                let (k, v) = item.map_err(|e| self.store.write_err(e))?;
                let seq = key_seq(&k)
                    .filter(|&s| s > 0)
                    .ok_or_else(|| self.corrupt(&format!("{legacy}/{k:?}")))?;
                take(seq, &v, legacy)?;
            }
        } else {
            let low = self.read_low()?;
            for item in bodies.iter() {
                let (k, v) = item.map_err(|e| self.store.write_err(e))?;
                let first =
                    key_seq(&k).ok_or_else(|| self.corrupt(&format!("{}/{k:?}", self.name)))?;
                let spans = spans(&v, u32::MAX)
                    .ok_or_else(|| self.corrupt(&format!("{}/{first}", self.name)))?;
                for (seq, (start, len)) in (first..).zip(spans) {
                    if seq > low {
                        take(seq, &v[start..start + len], &self.name)?;
                    }
                }
            }
        }
        self.write_pending()?;
        self.store.sync()?;
        per_record.clear().map_err(|e| self.store.write_err(e))?;
        bodies.clear().map_err(|e| self.store.write_err(e))?;
        self.store.sync()?;
        tracing::info!(store = %self.store.path.display(), records = moved, "moved the records an earlier version kept in sled into segment files");
        Ok(())
    }

    fn corrupt(&self, key: &str) -> StoreError {
        StoreError::Corrupt {
            path: self.store.path.clone(),
            key: key.into(),
        }
    }

    fn set_low(&self, low: u64) -> Result<(), StoreError> {
        self.low_tree
            .insert(LOW_KEY, &low.to_be_bytes())
            .map_err(|e| self.store.write_err(e))?;
        Ok(())
    }

    fn read_low(&self) -> Result<u64, StoreError> {
        match self
            .low_tree
            .get(LOW_KEY)
            .map_err(|e| self.store.write_err(e))?
        {
            Some(v) => key_seq(&v).ok_or_else(|| self.corrupt(&format!("{}.low", self.name))),
            None => Ok(0),
        }
    }

    /// A locator read from the index.
    fn loc(&self, key: &[u8], value: &[u8]) -> Result<(u64, Loc), StoreError> {
        let first =
            key_seq(key).ok_or_else(|| self.corrupt(&format!("{}.index/{key:?}", self.name)))?;
        let loc = Loc::decode(value)
            .ok_or_else(|| self.corrupt(&format!("{}.index/{first}", self.name)))?;
        Ok((first, loc))
    }

    /// Read the low mark and count what every segment holds above it; check
    /// that segments are dense and that each file holds its bodies. With
    /// `repair`, locators a crash kept below the low mark are removed, and
    /// files no locator references are removed at the next sync.
    fn recount(&self, repair: bool) -> Result<(), StoreError> {
        let low = self.read_low()?;
        let (mut count, mut bytes, mut next) = (0u64, 0u64, None::<u64>);
        let mut live: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        let mut partial = Vec::new();
        for item in self.index.iter() {
            let (k, v) = item.map_err(|e| self.store.write_err(e))?;
            let (first, loc) = self.loc(&k, &v)?;
            let last = first + u64::from(loc.records) - 1;
            if next.is_some_and(|n| n != first) {
                return Err(self.corrupt(&format!(
                    "{}.index/{first} (segments are not dense: expected {})",
                    self.name,
                    next.unwrap_or(0)
                )));
            }
            next = Some(last + 1);
            if last <= low && repair {
                // Trimmed whole, its removal lost by a crash.
                self.index.remove(&k).map_err(|e| self.store.write_err(e))?;
                continue;
            }
            let end = live.entry(loc.file).or_default();
            end.0 += 1;
            end.1 = end.1.max(loc.offset + u64::from(loc.len));
            if first > low {
                count += u64::from(loc.records);
                bytes += loc.bytes;
            } else if last > low {
                partial.push((first, loc, low + 1, last));
                count += last - low;
            }
        }
        let mut st = self.files.st.lock().expect("segment files lock");
        for (&file, &(_, end)) in &live {
            let path = self.files.path(file);
            let len = match fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(source) => return Err(StoreError::File { path, source }),
            };
            if len < end {
                return Err(StoreError::Corrupt {
                    path: path.clone(),
                    key: format!(
                        "{}.index: a segment ends at byte {end} of file {}, which holds {len} (missing or cut short)",
                        self.name,
                        path.display()
                    ),
                });
            }
        }
        st.live = live.iter().map(|(&f, &(n, _))| (f, n)).collect();
        if repair {
            let orphans: Vec<u64> = st
                .found
                .iter()
                .copied()
                .filter(|n| !st.live.contains_key(n))
                .collect();
            st.doomed.extend(orphans);
            st.found.clear();
        }
        drop(st);
        for (first, loc, from, to) in partial {
            bytes += self.body(first, loc)?.bytes_between(from, to);
        }
        let mut inner = self.inner.lock().expect("segment log lock");
        inner.low = low;
        inner.last = next.map_or(low, |n| (n - 1).max(low));
        inner.count = count;
        inner.bytes = bytes;
        inner.cached = None;
        inner.rewrites += 1;
        inner.pending = Pending::default();
        Ok(())
    }

    /// Read and parse the body a locator points at.
    fn body(&self, first: u64, loc: Loc) -> Result<Parsed, StoreError> {
        let file = self.files.reader(loc.file)?;
        let mut value = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut value, loc.offset)
            .map_err(|source| StoreError::File {
                path: self.files.path(loc.file),
                source,
            })?;
        let spans = spans(&value, loc.records).ok_or_else(|| {
            self.corrupt(&format!(
                "{}.index/{first} (its body in file {:020})",
                self.name, loc.file
            ))
        })?;
        Ok(Parsed {
            first,
            value,
            spans,
        })
    }

    /// Append one encoded record at `seq`: the next after the last stored,
    /// or any seq above the low mark when nothing is stored. Written to a
    /// file when its segment is full; not durable until the owner's fsync.
    pub fn append(&self, seq: u64, record: &[u8]) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().expect("segment log lock");
        if inner.count == 0 {
            assert!(
                seq > inner.low,
                "{}: append at {seq}, at or below the low mark {}",
                self.name,
                inner.low
            );
        } else {
            assert_eq!(seq, inner.last + 1, "{}: appends must be dense", self.name);
        }
        push(&mut inner.pending, seq, record);
        inner.last = seq;
        inner.count += 1;
        inner.bytes += record.len() as u64;
        inner.appended += record.len() as u64;
        if inner.pending.value.len() >= SEGMENT_BYTES {
            self.write_pending_locked(&mut inner)?;
        }
        Ok(())
    }

    /// Append records `first..` and write them to a file (one or more
    /// segments). Not durable until the owner's fsync.
    pub fn put(&self, first: u64, records: &[Vec<u8>]) -> Result<(), StoreError> {
        for (i, r) in records.iter().enumerate() {
            self.append(first + i as u64, r)?;
        }
        self.write_pending()
    }

    /// Write the records appended so far to a file and index them (not
    /// fsynced).
    pub fn write_pending(&self) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().expect("segment log lock");
        self.write_pending_locked(&mut inner)
    }

    fn write_pending_locked(&self, inner: &mut Inner) -> Result<(), StoreError> {
        if inner.pending.count == 0 {
            return Ok(());
        }
        let p = &inner.pending;
        let (file, offset) = self.files.write(&p.value)?;
        let loc = Loc {
            file,
            offset,
            len: u32::try_from(p.value.len()).expect("a segment is under 4 GiB"),
            records: u32::try_from(p.count).expect("a segment holds under 2^32 records"),
            bytes: (p.value.len() - 1) as u64 - 4 * p.count,
        };
        self.index
            .insert(seq_key(p.first), &loc.encode()[..])
            .map_err(|e| self.store.write_err(e))?;
        inner.pending = Pending::default();
        Ok(())
    }

    /// fsync the segment files written so far (and their directory). The
    /// owner calls it before it writes a mark saying they are durable;
    /// [`Store::sync`] calls it too.
    pub fn sync_files(&self) -> Result<(), StoreError> {
        self.files.fsync_written()
    }

    /// Records stored above the low mark, and their bytes (pending
    /// included).
    pub fn depth(&self) -> (u64, u64) {
        let inner = self.inner.lock().expect("segment log lock");
        (inner.count, inner.bytes)
    }

    /// The lowest seq stored above the low mark.
    pub fn first_seq(&self) -> Result<Option<u64>, StoreError> {
        let (low, count, pending_first) = {
            let inner = self.inner.lock().expect("segment log lock");
            let p = &inner.pending;
            (inner.low, inner.count, (p.count > 0).then_some(p.first))
        };
        if count == 0 {
            return Ok(None);
        }
        match self.index.first().map_err(|e| self.store.write_err(e))? {
            Some((k, _)) => {
                let first = key_seq(&k)
                    .ok_or_else(|| self.corrupt(&format!("{}.index/{k:?}", self.name)))?;
                Ok(Some(first.max(low + 1)))
            }
            None => Ok(pending_first),
        }
    }

    /// The locator of the segment holding `seq`, if one in the index does.
    fn find(&self, seq: u64) -> Result<Option<(sled::IVec, u64, Loc)>, StoreError> {
        let found = self
            .index
            .range(..=seq_key(seq))
            .next_back()
            .transpose()
            .map_err(|e| self.store.write_err(e))?;
        let Some((k, v)) = found else {
            return Ok(None);
        };
        let (first, loc) = self.loc(&k, &v)?;
        Ok((seq - first < u64::from(loc.records)).then_some((k, first, loc)))
    }

    /// The segment holding `seq`, read and parsed (the read cache is
    /// [`SegmentLog::get`]'s); `None` if none in the index holds it.
    fn segment(&self, seq: u64) -> Result<Option<Parsed>, StoreError> {
        match self.find(seq)? {
            Some((_, first, loc)) => self.body(first, loc).map(Some),
            None => Ok(None),
        }
    }

    /// Record `seq` if it is stored above the low mark.
    pub fn get(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let rewrites = {
            let inner = self.inner.lock().expect("segment log lock");
            if seq <= inner.low || seq > inner.last {
                return Ok(None);
            }
            let p = &inner.pending;
            if p.count > 0 && seq >= p.first {
                return Ok(pending_record(p, seq).map(<[u8]>::to_vec));
            }
            if let Some(c) = inner.cached.as_ref().filter(|c| c.holds(seq)) {
                return Ok(Some(c.record(seq).to_vec()));
            }
            inner.rewrites
        };
        let Some(seg) = self.segment(seq)? else {
            return Ok(None);
        };
        let out = seg.record(seq).to_vec();
        let mut inner = self.inner.lock().expect("segment log lock");
        if inner.rewrites == rewrites {
            inner.cached = Some(seg);
        }
        Ok(Some(out))
    }

    /// Records `from..=to` in order, at most `max_bytes` in total but at
    /// least one, stopping early at the first one not stored.
    pub fn read(&self, from: u64, to: u64, max_bytes: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut seq = from;
        while seq <= to {
            let Some(r) = self.get(seq)? else { break };
            if !out.is_empty() && bytes + r.len() > max_bytes {
                break;
            }
            bytes += r.len();
            out.push(r);
            seq += 1;
        }
        Ok(out)
    }

    /// Bytes of the records stored after `seq`: from the total kept in
    /// memory, less or plus the records on the shorter side of `seq`.
    pub fn bytes_after(&self, seq: u64) -> Result<u64, StoreError> {
        let (low, last, total) = {
            let inner = self.inner.lock().expect("segment log lock");
            (inner.low, inner.last, inner.bytes)
        };
        if seq <= low {
            return Ok(total);
        }
        if seq >= last {
            return Ok(0);
        }
        if seq - low <= last - seq {
            Ok(total.saturating_sub(self.bytes_between(low + 1, seq)?))
        } else {
            self.bytes_between(seq + 1, last)
        }
    }

    /// [`SegmentLog::bytes_after`], reading only the records between the
    /// `seq` of the last call with `memo` and this one (a reader's mark moves
    /// forward a little between two status requests): what was appended
    /// since is known from a counter, what was deleted since lies at or
    /// below the low mark. Falls back to [`SegmentLog::bytes_after`] on the
    /// first call, after a cut or reset of the log, or when `seq` moved back.
    pub fn bytes_after_memo(
        &self,
        seq: u64,
        memo: &mut Option<AfterMemo>,
    ) -> Result<u64, StoreError> {
        let (low, last, total, appended, rewrites) = {
            let inner = self.inner.lock().expect("segment log lock");
            (
                inner.low,
                inner.last,
                inner.bytes,
                inner.appended,
                inner.rewrites,
            )
        };
        let bytes = match *memo {
            _ if seq <= low => total,
            _ if seq >= last => 0,
            Some(m) if m.rewrites == rewrites && m.seq <= seq => {
                if m.seq >= low {
                    // (m.seq, seq] is still stored: take it off.
                    (m.bytes + (appended - m.appended))
                        .saturating_sub(self.bytes_between(m.seq + 1, seq)?)
                } else {
                    // Deleted through low since: count what is left below seq.
                    total.saturating_sub(self.bytes_between(low + 1, seq)?)
                }
            }
            _ => self.bytes_after(seq)?,
        };
        *memo = Some(AfterMemo {
            seq,
            bytes,
            appended,
            rewrites,
        });
        Ok(bytes)
    }

    /// Bytes of the records `from..=to` of a segment: from its locator when
    /// it lies inside, else from its body.
    fn segment_bytes(&self, first: u64, loc: Loc, from: u64, to: u64) -> Result<u64, StoreError> {
        let last = first + u64::from(loc.records) - 1;
        if from <= first && last <= to {
            return Ok(loc.bytes);
        }
        if from > last || to < first {
            return Ok(0);
        }
        Ok(self.body(first, loc)?.bytes_between(from, to))
    }

    /// Bytes of the records `from..=to` stored (pending included).
    fn bytes_between(&self, from: u64, to: u64) -> Result<u64, StoreError> {
        let mut bytes = 0;
        let pending_first = {
            let inner = self.inner.lock().expect("segment log lock");
            let p = &inner.pending;
            if p.count > 0 && to >= p.first {
                bytes += (from.max(p.first)..=to)
                    .filter_map(|s| pending_record(p, s))
                    .map(|r| r.len() as u64)
                    .sum::<u64>();
            }
            (p.count > 0).then_some(p.first)
        };
        let start = match self.find(from)? {
            Some((_, first, _)) => first,
            None => from,
        };
        for item in self.index.range(seq_key(start)..=seq_key(to)) {
            let (k, v) = item.map_err(|e| self.store.write_err(e))?;
            let (first, loc) = self.loc(&k, &v)?;
            if pending_first.is_some_and(|p| first >= p) {
                break;
            }
            #[cfg(test)]
            tests::LOCATORS_READ.with(|n| n.set(n.get() + 1));
            bytes += self.segment_bytes(first, loc, from, to)?;
        }
        Ok(bytes)
    }

    /// Delete the records at or below `seq` (never one not yet written:
    /// the owners trim only what they have made durable): the low mark
    /// moves up to it, and each segment left with nothing above it is
    /// removed. Not fsynced. Returns how many records were deleted.
    pub fn trim_through(&self, seq: u64) -> Result<u64, StoreError> {
        let mut inner = self.inner.lock().expect("segment log lock");
        let written = match inner.pending.count {
            0 => inner.last,
            _ => inner.pending.first - 1,
        };
        let old_low = inner.low;
        let new_low = seq.min(written);
        if new_low <= old_low {
            return Ok(0);
        }
        let (mut count, mut bytes) = (0u64, 0u64);
        // The segment holding the first record trimmed, then each after it.
        let start = match self.find(old_low + 1)? {
            Some((_, first, _)) => first,
            None => old_low + 1,
        };
        for item in self.index.range(seq_key(start)..) {
            let (k, v) = item.map_err(|e| self.store.write_err(e))?;
            let (first, loc) = self.loc(&k, &v)?;
            if first > new_low {
                break;
            }
            let last = first + u64::from(loc.records) - 1;
            let from = first.max(old_low + 1);
            let to = last.min(new_low);
            count += to + 1 - from;
            bytes += self.segment_bytes(first, loc, from, to)?;
            if last <= new_low {
                self.index.remove(&k).map_err(|e| self.store.write_err(e))?;
                self.files.release(loc.file);
            }
        }
        inner.low = new_low;
        inner.count -= count;
        inner.bytes -= bytes;
        self.set_low(new_low)?;
        Ok(count)
    }

    /// Delete record `seq` and every one after it (pending included); a
    /// segment that holds records before it is cut short. Not fsynced.
    /// Returns how many records were deleted.
    pub fn truncate_from(&self, seq: u64) -> Result<u64, StoreError> {
        let mut inner = self.inner.lock().expect("segment log lock");
        let from = seq.max(inner.low + 1);
        if from > inner.last {
            return Ok(0);
        }
        let (mut count, mut bytes) = (0u64, 0u64);
        let p = std::mem::take(&mut inner.pending);
        for s in p.first..p.first + p.count {
            let r = pending_record(&p, s).expect("a pending record");
            if s < from {
                push(&mut inner.pending, s, r);
            } else {
                count += 1;
                bytes += r.len() as u64;
            }
        }
        let (c, b) = self.cut_tail(from)?;
        count += c;
        bytes += b;
        inner.last = from - 1;
        inner.count -= count;
        inner.bytes -= bytes;
        inner.cached = None;
        inner.rewrites += 1;
        Ok(count)
    }

    /// Remove the locators of the segments from `from` on, the last first,
    /// then cut short the one that holds records before it (a smaller
    /// count in its locator; its body stays): whatever prefix of these
    /// writes a crash keeps, the segments left are dense. Returns the
    /// records and bytes removed (counted from the locators: a tail cut on
    /// open may point at bodies a crash lost).
    fn cut_tail(&self, from: u64) -> Result<(u64, u64), StoreError> {
        let (mut records, mut bytes) = (0u64, 0u64);
        let tail: Vec<(sled::IVec, sled::IVec)> = self
            .index
            .range(seq_key(from)..)
            .collect::<Result<_, _>>()
            .map_err(|e| self.store.write_err(e))?;
        for (k, v) in tail.iter().rev() {
            let (_, loc) = self.loc(k, v)?;
            records += u64::from(loc.records);
            bytes += loc.bytes;
            self.index.remove(k).map_err(|e| self.store.write_err(e))?;
            self.files.release(loc.file);
        }
        let before = self
            .index
            .range(..seq_key(from))
            .next_back()
            .transpose()
            .map_err(|e| self.store.write_err(e))?;
        if let Some((k, v)) = before {
            let (first, loc) = self.loc(&k, &v)?;
            let last = first + u64::from(loc.records) - 1;
            if last >= from {
                let seg = self.body(first, loc)?;
                let cut = seg.bytes_between(from, last);
                records += last + 1 - from;
                bytes += cut;
                let kept = Loc {
                    records: u32::try_from(from - first).expect("fewer records"),
                    bytes: loc.bytes - cut,
                    ..loc
                };
                self.index
                    .insert(&k, &kept.encode()[..])
                    .map_err(|e| self.store.write_err(e))?;
            }
        }
        Ok((records, bytes))
    }

    /// Delete every record; the low mark becomes `low` (the next record
    /// appended is above it). Not fsynced.
    pub fn reset(&self, low: u64) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().expect("segment log lock");
        self.index.clear().map_err(|e| self.store.write_err(e))?;
        self.set_low(low)?;
        {
            let mut st = self.files.st.lock().expect("segment files lock");
            let files: Vec<u64> = st.live.keys().copied().collect();
            st.doomed.extend(files);
            st.live.clear();
            st.readers.clear();
            st.current = None;
        }
        inner.pending = Pending::default();
        inner.cached = None;
        inner.rewrites += 1;
        inner.low = low;
        inner.last = low;
        inner.count = 0;
        inner.bytes = 0;
        Ok(())
    }

    /// The highest stored seq below `below` whose record satisfies `pred`
    /// (walking back, down to the low mark).
    pub fn rfind(
        &self,
        below: u64,
        pred: impl Fn(&[u8]) -> bool,
    ) -> Result<Option<u64>, StoreError> {
        let low = {
            let inner = self.inner.lock().expect("segment log lock");
            let p = &inner.pending;
            if p.count > 0 {
                for s in (p.first..(p.first + p.count).min(below)).rev() {
                    if pending_record(p, s).is_some_and(&pred) {
                        return Ok(Some(s));
                    }
                }
            }
            inner.low
        };
        for item in self.index.range(..seq_key(below)).rev() {
            let (k, v) = item.map_err(|e| self.store.write_err(e))?;
            let (first, loc) = self.loc(&k, &v)?;
            let seg = self.body(first, loc)?;
            for s in (seg.first.max(low + 1)..=seg.last().min(below.saturating_sub(1))).rev() {
                if pred(seg.record(s)) {
                    return Ok(Some(s));
                }
            }
            if seg.first <= low + 1 {
                break;
            }
        }
        Ok(None)
    }

    /// Put record `seq` back as a crash or a bad disk could: its bytes
    /// replaced in the segment that holds it, or, if it was deleted, as a
    /// segment of its own just before the first one, with the low mark
    /// lowered below it. For fault tests, on a store no daemon has open;
    /// fsynced.
    #[doc(hidden)]
    pub fn put_back(&self, seq: u64, record: &[u8]) -> Result<(), StoreError> {
        self.write_pending()?;
        let held = self.find(seq)?;
        let mut seg = Pending::default();
        match &held {
            Some((_, first, loc)) => {
                let old = self.body(*first, *loc)?;
                for s in old.first..=old.last() {
                    push(&mut seg, s, if s == seq { record } else { old.record(s) });
                }
            }
            None => push(&mut seg, seq, record),
        }
        if let Some((_, _, loc)) = held {
            self.files.release(loc.file);
        }
        let (file, offset) = self.files.write(&seg.value)?;
        let loc = Loc {
            file,
            offset,
            len: seg.value.len() as u32,
            records: seg.count as u32,
            bytes: (seg.value.len() - 1) as u64 - 4 * seg.count,
        };
        self.sync_files()?;
        self.index
            .insert(seq_key(seg.first), &loc.encode()[..])
            .map_err(|e| self.store.write_err(e))?;
        let low = self.inner.lock().expect("segment log lock").low;
        if seq <= low {
            self.set_low(seq - 1)?;
        }
        self.store.sync()?;
        self.recount(false)
    }
}

/// Add a record to a segment being built.
fn push(p: &mut Pending, seq: u64, record: &[u8]) {
    if p.count == 0 {
        p.first = seq;
        p.value.clear();
        p.value.push(FORMAT);
    }
    let len = u32::try_from(record.len()).expect("a record is under 4 GiB");
    p.value.extend_from_slice(&len.to_le_bytes());
    p.value.extend_from_slice(record);
    p.count += 1;
}

/// Record `seq` of a segment being built, if it holds it.
fn pending_record(p: &Pending, seq: u64) -> Option<&[u8]> {
    if p.count == 0 || seq < p.first || seq >= p.first + p.count {
        return None;
    }
    let mut at = 1;
    for s in p.first.. {
        let len = u32::from_le_bytes(p.value[at..at + 4].try_into().ok()?) as usize;
        if s == seq {
            return p.value.get(at + 4..at + 4 + len);
        }
        at += 4 + len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    thread_local! {
        /// Segment locators read by `bytes_between` on this thread.
        pub static LOCATORS_READ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    fn locators_read() -> u64 {
        LOCATORS_READ.with(|n| n.get())
    }

    /// A reader's mark moving forward in the middle of a log that grows
    /// ahead of it and is trimmed behind it (a slower reader holds the low
    /// mark back): the memo gives what a full count gives, at every step,
    /// and reads only the segments the mark crossed since the last call,
    /// where a full count walks the shorter side, thousands of records.
    #[test]
    fn bytes_after_with_a_memo_counts_as_the_full_walk_and_reads_only_what_the_mark_crossed() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, log) = open(dir.path());
        let mut memo = None;
        let mut last = 0u64;
        // About 300 segments of 1 KB records.
        for _ in 0..10_000 {
            last += 1;
            log.append(last, &rec(last, 1000 + (last % 7) as usize))
                .unwrap();
        }
        log.write_pending().unwrap();
        let (mut mark, mut slow) = (5_000u64, 1_000u64);
        log.trim_through(slow).unwrap();
        assert_eq!(
            log.bytes_after_memo(mark, &mut memo).unwrap(),
            log.bytes_after(mark).unwrap()
        );
        let mut full_reads = 0;
        for step in 0..400u64 {
            for _ in 0..(step % 5) * 20 {
                last += 1;
                log.append(last, &rec(last, 100 + (last % 300) as usize))
                    .unwrap();
            }
            if step % 3 == 0 {
                log.write_pending().unwrap();
            }
            // The mark moves forward, some steps more than others.
            mark = (mark + (step % 4) * 25).min(last);
            // The slower reader moves too: trimmed behind the mark now and
            // then, once right up to it.
            if step % 7 == 0 {
                slow = if step == 350 { mark } else { slow + 100 };
                log.trim_through(slow).unwrap();
            }
            let before = locators_read();
            let fast = log.bytes_after_memo(mark, &mut memo).unwrap();
            let read = locators_read() - before;
            let before = locators_read();
            assert_eq!(
                fast,
                log.bytes_after(mark).unwrap(),
                "step {step}, mark {mark}"
            );
            full_reads += locators_read() - before;
            // The mark crossed at most 75 records, under 3 segments.
            assert!(
                read <= 4,
                "step {step}: {read} locators read for a mark that moved a little"
            );
        }
        assert!(
            full_reads > 400 * 20,
            "the full count read only {full_reads} locators: the test does not put the mark in the middle"
        );
        // A cut behind the reader's back: counted afresh.
        log.truncate_from(last - 50).unwrap();
        assert_eq!(
            log.bytes_after_memo(mark, &mut memo).unwrap(),
            log.bytes_after(mark).unwrap()
        );
    }

    /// A record of `len` bytes that tells its seq.
    fn rec(seq: u64, len: usize) -> Vec<u8> {
        let mut r = seq.to_le_bytes().to_vec();
        r.resize(len.max(8), (seq % 251) as u8);
        r
    }

    fn open(dir: &std::path::Path) -> (Store, SegmentLog) {
        let store = Store::open(dir, 1 << 20).unwrap();
        let log = SegmentLog::open(&store, "segments", Some("records"), None).unwrap();
        (store, log)
    }

    /// Open the store at `dir` again and the log in it. sled's background
    /// thread may hold the file lock for a moment after the last handle is
    /// dropped.
    fn reopen_with(
        dir: &std::path::Path,
        legacy: Option<&str>,
        tail_from: Option<u64>,
    ) -> (Store, Result<SegmentLog, StoreError>) {
        for _ in 0..100 {
            if let Ok(store) = Store::open(dir, 1 << 20) {
                let log = SegmentLog::open(&store, "segments", legacy, tail_from);
                return (store, log);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("the store did not reopen");
    }

    fn reopen(dir: &std::path::Path) -> (Store, SegmentLog) {
        let (store, log) = reopen_with(dir, Some("records"), None);
        (store, log.unwrap())
    }

    fn all(log: &SegmentLog, from: u64, to: u64) -> Vec<Vec<u8>> {
        log.read(from, to, usize::MAX).unwrap()
    }

    #[test]
    fn records_span_segments_and_read_back_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let want: Vec<Vec<u8>> = (1..=2000)
            .map(|s| rec(s, 100 + (s as usize % 300)))
            .collect();
        {
            let (store, log) = open(dir.path());
            for (i, r) in want.iter().enumerate() {
                log.append(i as u64 + 1, r).unwrap();
            }
            // Readable before it is written out, and after.
            assert_eq!(log.get(2000).unwrap().as_ref(), Some(&want[1999]));
            log.write_pending().unwrap();
            store.sync().unwrap();
            // Each segment is written once it reaches SEGMENT_BYTES (a
            // record of at most 400 bytes past it): about total / SEGMENT_BYTES.
            let total: usize = want.iter().map(|r| r.len() + 4).sum();
            let (fewest, most) = (total / (SEGMENT_BYTES + 404), total / SEGMENT_BYTES + 1);
            let n = log.index.len();
            assert!(
                (fewest..=most).contains(&n),
                "{n} segments for 2000 records of {total} bytes: expected {fewest}..={most}"
            );
        }
        let (_store, log) = reopen(dir.path());
        let bytes: u64 = want.iter().map(|r| r.len() as u64).sum();
        assert_eq!(log.depth(), (2000, bytes));
        assert_eq!(all(&log, 1, 2000), want);
        assert_eq!(log.get(0).unwrap(), None);
        assert_eq!(log.get(2001).unwrap(), None);
        assert_eq!(log.first_seq().unwrap(), Some(1));
        // At most `max_bytes`, but at least one record.
        assert_eq!(log.read(5, 2000, 1).unwrap(), vec![want[4].clone()]);
        assert_eq!(log.read(5, 7, usize::MAX).unwrap().len(), 3);
        assert_eq!(
            log.bytes_after(1990).unwrap(),
            want[1990..].iter().map(|r| r.len() as u64).sum::<u64>()
        );
        assert_eq!(log.bytes_after(0).unwrap(), bytes);
        // Walked on the near side of seq: the total less what is before it.
        assert_eq!(
            log.bytes_after(5).unwrap(),
            want[5..].iter().map(|r| r.len() as u64).sum::<u64>()
        );
        assert_eq!(log.bytes_after(2000).unwrap(), 0);
    }

    #[test]
    fn trims_count_exactly_and_the_low_mark_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let want: Vec<Vec<u8>> = (1..=1000).map(|s| rec(s, 200)).collect();
        {
            let (store, log) = open(dir.path());
            log.put(1, &want).unwrap();
            let segments = log.index.len();
            // Mid-segment: the segment stays, its first records are gone.
            assert_eq!(log.trim_through(3).unwrap(), 3);
            assert_eq!(log.get(3).unwrap(), None);
            assert_eq!(log.get(4).unwrap().as_ref(), Some(&want[3]));
            assert_eq!(log.first_seq().unwrap(), Some(4));
            assert_eq!(log.index.len(), segments);
            assert_eq!(log.trim_through(2).unwrap(), 0, "already trimmed");
            assert_eq!(log.trim_through(700).unwrap(), 697);
            assert!(log.index.len() < segments, "whole segments are removed");
            assert_eq!(log.depth(), (300, 300 * 200));
            assert_eq!(log.bytes_after(0).unwrap(), 300 * 200);
            store.sync().unwrap();
        }
        let (_store, log) = reopen(dir.path());
        assert_eq!(log.depth(), (300, 300 * 200));
        assert_eq!(log.first_seq().unwrap(), Some(701));
        assert_eq!(log.get(700).unwrap(), None);
        assert_eq!(all(&log, 701, 1000), want[700..]);
        assert_eq!(
            log.trim_through(5000).unwrap(),
            300,
            "never past what is stored"
        );
        assert_eq!(log.first_seq().unwrap(), None);
        assert_eq!(log.depth(), (0, 0));
        log.append(1001, &rec(1001, 10)).unwrap();
        assert_eq!(log.first_seq().unwrap(), Some(1001));
    }

    #[test]
    fn truncation_cuts_a_segment_short_and_appends_go_on_from_there() {
        let dir = tempfile::tempdir().unwrap();
        let want: Vec<Vec<u8>> = (1..=600).map(|s| rec(s, 300)).collect();
        // Cut inside a written segment, then 10 appended again from there.
        let mid = 250u64;
        let kept = mid - 1 + 10;
        {
            let (store, log) = open(dir.path());
            log.put(1, &want[..500]).unwrap();
            for (i, r) in want[500..].iter().enumerate() {
                log.append(501 + i as u64, r).unwrap();
            }
            // Inside the pending segment: only its tail goes.
            assert_eq!(log.truncate_from(590).unwrap(), 11);
            assert_eq!(log.get(589).unwrap().as_ref(), Some(&want[588]));
            // Inside a written segment, not at its start.
            let held = log.segment(mid).unwrap().unwrap();
            assert!(held.first < mid, "the test must cut inside a segment");
            assert_eq!(log.truncate_from(mid).unwrap(), 589 - mid + 1);
            assert_eq!(log.get(mid).unwrap(), None);
            assert_eq!(
                log.get(mid - 1).unwrap().as_ref(),
                Some(&want[mid as usize - 2])
            );
            assert_eq!(log.depth(), (mid - 1, (mid - 1) * 300));
            log.put(mid, &want[mid as usize - 1..mid as usize + 9])
                .unwrap();
            store.sync().unwrap();
        }
        let (_store, log) = reopen(dir.path());
        assert_eq!(log.depth(), (kept, kept * 300));
        assert_eq!(all(&log, 1, 1000), want[..kept as usize]);
    }

    #[test]
    fn records_kept_one_per_key_by_an_earlier_version_move_into_segments() {
        let dir = tempfile::tempdir().unwrap();
        let want: Vec<Vec<u8>> = (41..=400).map(|s| rec(s, 150)).collect();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let old = store.tree("records").unwrap();
            for (i, r) in want.iter().enumerate() {
                old.insert(seq_key(41 + i as u64), r.as_slice()).unwrap();
            }
            store.sync().unwrap();
        }
        let (store, log) = reopen(dir.path());
        assert!(
            store.tree("records").unwrap().is_empty(),
            "old keys removed"
        );
        assert_eq!(log.first_seq().unwrap(), Some(41));
        assert_eq!(log.get(40).unwrap(), None);
        assert_eq!(all(&log, 41, 400), want);
        assert_eq!(log.depth(), (360, 360 * 150));
        log.append(401, &rec(401, 1)).unwrap();
    }

    #[test]
    fn a_gap_in_an_earlier_version_s_records_is_a_named_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let old = store.tree("records").unwrap();
            for seq in [1u64, 2, 4] {
                old.insert(seq_key(seq), rec(seq, 10)).unwrap();
            }
            store.sync().unwrap();
        }
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        match SegmentLog::open(&store, "segments", Some("records"), None) {
            Err(StoreError::Corrupt { key, .. }) => assert!(key.starts_with("records/4"), "{key}"),
            other => panic!("opened: {:?}", other.map(|_| ())),
        }
    }

    /// Soak schedule 1796400083: the sender killed while a rollback was
    /// removing an uncommitted tail left the tail's first segment removed
    /// and a later one still there; the spool did not open ("segments are
    /// not dense"). The tail past what the owner made durable is removed
    /// before the check, and removals go from the end.
    #[test]
    fn a_gap_a_crash_left_in_the_tail_past_the_durable_mark_is_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let recs: Vec<Vec<u8>> = (1..=12).map(|s| rec(s, 10)).collect();
        {
            let (store, log) = open(dir.path());
            log.put(1, &recs[..4]).unwrap();
            log.put(5, &recs[4..8]).unwrap();
            log.put(9, &recs[8..]).unwrap();
            log.index.remove(seq_key(5)).unwrap();
            store.sync().unwrap();
        }
        for _ in 0..100 {
            if let Ok(store) = Store::open(dir.path(), 1 << 20) {
                assert!(
                    matches!(
                        SegmentLog::open(&store, "segments", None, None),
                        Err(StoreError::Corrupt { .. })
                    ),
                    "the gap is damage when nothing says it is a tail"
                );
                // Durable through 3: the tail from 4 (inside the first
                // segment) goes.
                let log = SegmentLog::open(&store, "segments", None, Some(4)).unwrap();
                assert_eq!(log.depth(), (3, 30));
                assert_eq!(all(&log, 1, 12), recs[..3]);
                log.append(4, &recs[3]).unwrap();
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("the store did not reopen");
    }

    /// Reopen for inspection: no legacy, no tail.
    fn open_plain(dir: &std::path::Path) -> Result<SegmentLog, StoreError> {
        reopen_with(dir, None, None).1
    }

    #[test]
    fn a_bad_locator_a_gap_or_a_file_cut_short_is_a_named_error() {
        for bad in ["format", "gap", "key", "file"] {
            let dir = tempfile::tempdir().unwrap();
            {
                let (store, log) = open(dir.path());
                log.put(1, &[rec(1, 20), rec(2, 20)]).unwrap();
                log.put(3, &[rec(3, 20)]).unwrap();
                match bad {
                    "format" => {
                        log.index.insert(seq_key(3), &[9u8, 1, 0][..]).unwrap();
                    }
                    "gap" => {
                        let v = log.index.remove(seq_key(3)).unwrap().unwrap();
                        log.index.insert(seq_key(4), v).unwrap();
                    }
                    "key" => {
                        log.index.insert(b"x", &[LOC_FORMAT][..]).unwrap();
                    }
                    _ => {
                        store.sync().unwrap();
                        let (_, loc) = log.find(3).unwrap().map(|f| (f.1, f.2)).unwrap();
                        let f = OpenOptions::new()
                            .write(true)
                            .open(log.files.path(loc.file))
                            .unwrap();
                        f.set_len(loc.offset + 3).unwrap();
                    }
                }
                store.sync().unwrap();
            }
            match open_plain(dir.path()) {
                Err(StoreError::Corrupt { key, .. }) => {
                    assert!(key.starts_with("segments.index"), "{bad}: {key}")
                }
                other => panic!("{bad}: opened: {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn a_body_damaged_on_disk_is_a_named_error_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let loc = {
            let (store, log) = open(dir.path());
            log.put(1, &[rec(1, 20), rec(2, 20)]).unwrap();
            store.sync().unwrap();
            log.find(1).unwrap().unwrap().2
        };
        // The first length field says more than the body holds.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join(format!("segments.d/{:020}", loc.file)))
            .unwrap();
        f.write_all_at(&[0xff, 0xff, 0, 0], loc.offset + 1).unwrap();
        let log = open_plain(dir.path()).unwrap();
        match log.get(1) {
            Err(StoreError::Corrupt { key, .. }) => {
                assert!(key.starts_with("segments.index/1 (its body"), "{key}")
            }
            other => panic!("read: {other:?}"),
        }
    }

    /// Invariant 5: sled keeps in memory the values it holds, so it must
    /// hold no record bodies, only locators of a fixed size.
    #[test]
    fn sled_holds_only_locators_and_the_bodies_are_in_files() {
        let dir = tempfile::tempdir().unwrap();
        let (store, log) = open(dir.path());
        let recs: Vec<Vec<u8>> = (1..=3000).map(|s| rec(s, 1000)).collect();
        log.put(1, &recs).unwrap();
        store.sync().unwrap();
        assert!(log.index.len() >= 3000 * 1000 / (SEGMENT_BYTES + 1004));
        for item in log.index.iter() {
            let (_, v) = item.unwrap();
            assert_eq!(v.len(), Loc::LEN, "a value that is not a locator");
        }
        let on_disk: u64 = fs::read_dir(dir.path().join("segments.d"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk >= 3000 * 1004, "bodies in files: {on_disk} bytes");
    }

    /// A file is removed once no locator references it, and only after a
    /// sync made that durable; an orphan a crash left is removed after the
    /// next open's first sync.
    #[test]
    fn files_no_longer_referenced_are_removed_after_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let files = |d: &std::path::Path| fs::read_dir(d.join("segments.d")).unwrap().count();
        let per_file = (FILE_BYTES / (SEGMENT_BYTES as u64)) as usize;
        // Enough records of 8 KiB for three files and a bit.
        let n = (3 * per_file + 2) * (SEGMENT_BYTES / 8192) + 8;
        let recs: Vec<Vec<u8>> = (1..=n as u64).map(|s| rec(s, 8192)).collect();
        {
            let (store, log) = open(dir.path());
            log.put(1, &recs).unwrap();
            store.sync().unwrap();
            assert_eq!(files(dir.path()), 4);
            assert_eq!(log.trim_through(n as u64 / 2).unwrap(), n as u64 / 2);
            assert_eq!(files(dir.path()), 4, "removed before the sync");
            store.sync().unwrap();
            assert_eq!(files(dir.path()), 3, "the first file is unreferenced");
            // An orphan, as a crash between sled's fsync and the removal
            // leaves one.
            fs::write(dir.path().join(format!("segments.d/{:020}", 0)), b"x").unwrap();
            assert_eq!(log.bytes_after(0).unwrap(), (n - n / 2) as u64 * 8192);
        }
        let (store, log) = reopen(dir.path());
        store.sync().unwrap();
        assert_eq!(files(dir.path()), 4, "inspection removes nothing");
        drop((store, log));
        let (store, log) = reopen_with(dir.path(), None, Some(n as u64 + 1));
        let log = log.unwrap();
        store.sync().unwrap();
        assert_eq!(files(dir.path()), 3, "the orphan is removed");
        assert!(
            all(&log, n as u64 / 2 + 1, n as u64) == recs[n / 2..],
            "records differ"
        );
        log.reset(n as u64).unwrap();
        store.sync().unwrap();
        assert_eq!(files(dir.path()), 0);
        log.put(n as u64 + 1, &[rec(n as u64 + 1, 10)]).unwrap();
        assert_eq!(
            all(&log, n as u64 + 1, u64::MAX),
            vec![rec(n as u64 + 1, 10)]
        );
    }

    /// Session 5's store kept the segment bodies in sled (tree `segments`,
    /// with the low mark in `segments.low`): they move into files.
    #[test]
    fn segments_an_earlier_version_kept_in_sled_move_into_files() {
        let dir = tempfile::tempdir().unwrap();
        let want: Vec<Vec<u8>> = (1..=300).map(|s| rec(s, 150)).collect();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let old = store.tree("segments").unwrap();
            for first in (1..=300u64).step_by(100) {
                let mut p = Pending::default();
                for s in first..first + 100 {
                    push(&mut p, s, &want[s as usize - 1]);
                }
                old.insert(seq_key(first), p.value).unwrap();
            }
            store
                .tree("segments.low")
                .unwrap()
                .insert(LOW_KEY, &42u64.to_be_bytes())
                .unwrap();
            store.sync().unwrap();
        }
        assert!(
            matches!(open_plain(dir.path()), Err(StoreError::Dir { .. })),
            "inspection of the old layout is refused, not misread"
        );
        let (store, log) = reopen(dir.path());
        assert!(
            store.tree("segments").unwrap().is_empty(),
            "old keys removed"
        );
        assert_eq!(log.first_seq().unwrap(), Some(43));
        assert_eq!(log.depth(), (258, 258 * 150));
        assert_eq!(log.get(42).unwrap(), None);
        assert!(all(&log, 43, 300) == want[42..], "records differ");
    }

    #[test]
    fn rfind_walks_back_from_below_to_the_low_mark() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, log) = open(dir.path());
        let recs: Vec<Vec<u8>> = (1..=900).map(|s| rec(s, 100)).collect();
        log.put(1, &recs[..800]).unwrap();
        for (i, r) in recs[800..].iter().enumerate() {
            log.append(801 + i as u64, r).unwrap();
        }
        let mult = |n: u64| move |r: &[u8]| u64::from_le_bytes(r[..8].try_into().unwrap()) % n == 0;
        assert_eq!(log.rfind(u64::MAX, mult(7)).unwrap(), Some(896));
        assert_eq!(log.rfind(800, mult(7)).unwrap(), Some(798));
        assert_eq!(log.rfind(10, mult(7)).unwrap(), Some(7));
        log.trim_through(7).unwrap();
        assert_eq!(
            log.rfind(10, mult(7)).unwrap(),
            None,
            "at or below the low mark"
        );
    }

    #[test]
    fn a_record_put_back_below_the_low_mark_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, log) = open(dir.path());
        log.put(1, &[rec(1, 10), rec(2, 10), rec(3, 10)]).unwrap();
        log.trim_through(3).unwrap();
        assert_eq!(log.first_seq().unwrap(), None);
        log.put_back(3, b"bad").unwrap();
        assert_eq!(log.first_seq().unwrap(), Some(3));
        assert_eq!(log.get(3).unwrap().as_deref(), Some(&b"bad"[..]));
        log.put(4, &[rec(4, 10)]).unwrap();
        log.put_back(4, b"worse").unwrap();
        assert_eq!(all(&log, 3, 4), vec![b"bad".to_vec(), b"worse".to_vec()]);
    }
}
