//! The sender's durable queue of captured transactions (sled). Step 3 of a
//! change's path (capture → **spool** → ship), and the end of the applied
//! path back (Applied → **spool `applied/<receiver>`** → trim).
//!
//! # Keys
//!
//! Directory `segments.d` and trees `segments.index` and `segments.low`:
//! the records, a [`SegmentLog`](pgcourier_common::store::segments):
//! segments of about 32 KiB of consecutive records in files of their own,
//! one sled key per segment (key = its first seq, u64 big-endian; value =
//! where its body lies), each record an encoded
//! [`Record`](pgcourier_proto::record::Record) (CRC-32, under
//! `MAX_RECORD_BYTES` = 96 KiB, about 24 KiB at most as capture cuts them).
//! Dense. Earlier versions kept the records in sled (one key per record in
//! tree `records`, then segment bodies in tree `segments`): [`Spool::open`]
//! moves them.
//!
//! Tree `meta` (u64 values big-endian):
//! - `complete_seq`: highest seq that ends a transaction and is fsynced:
//!   the shipping limit. Absent on a new spool (read as 0: nothing spooled).
//! - `captured_commit_lsn`, `captured_end_lsn`: commit and end LSN of that
//!   transaction. Capture skips what the slot returns at or below the first;
//!   the slot may be confirmed up to the second. Absent on a new spool (0).
//! - `source`: the source identity, `<system id>/<database>/<slot>` (UTF-8).
//!   Written once by the first capture session; a spool never changes source.
//! - `spool_id`: this spool's own identity, 128 random bits in hex (UTF-8),
//!   written and fsynced by [`Spool::open`] when the spool is created (or
//!   first opened by a version that has it); never changed. Record numbers
//!   name transactions only within one spool: receivers keep it and are
//!   refused by a spool with another (protocol 4).
//! - `copy_state`: bincode [`CopyState`] (tables synced / waiting for a
//!   copy). Absent until the first session decides what to copy.
//! - `confirmable_lsn`: the furthest position this spool has let capture
//!   confirm to the slot (the slot's start when the spool began capturing
//!   from it, a commit's end, a quiet position), fsynced before the slot is
//!   confirmed there. A slot found further on at start-up confirmed what
//!   this spool does not hold: a definite error. Absent on spools written
//!   before it existed (then nothing is compared until it is written).
//! - `applied/<receiver>`: highest seq that receiver has applied to its
//!   target (reported by its `Applied` frames). Named `ack/<receiver>` by
//!   earlier versions: [`Spool::open`] moves those keys, in one batch,
//!   fsynced.
//! - `needs_copy/<receiver>` (value `1`): a receiver configured after the
//!   spool deleted records; capture makes a copy of the tables for it alone.
//! - `start/<receiver>`: the first record of the copy made for it; it needs
//!   nothing before.
//!
//! # Size limit
//!
//! `spool-max-bytes` (sender setting): capture pauses before its next peek
//! while [`Spool::bytes`] (the records' encoded bytes) is at or above it;
//! the slot then keeps WAL on the source. A peek, or a copy, already under
//! way may take the spool past it by its own size. While a receiver waits
//! for a copy of its own (`needs_copy/`), capture does not pause: that
//! receiver's `applied/` mark holds back every trim until its copy is
//! spooled, so the copy (and the transactions before its cut) may take the
//! spool past the limit.
//!
//! # Who writes, who deletes, and when
//!
//! - Capture appends records at `next_seq` ([`Spool::append`]: not durable,
//!   not shipped; kept in memory until their segment is full) and calls [`Spool::commit`] at transaction boundaries,
//!   which writes the three marks and fsyncs (files and directory) before it
//!   returns a [`Synced`] end LSN; only with it does capture confirm the slot
//!   (invariant 1). `copy_state` is written by capture and fsynced with the
//!   next commit (or at once, [`Spool::sync`]). `source` is fsynced at once.
//! - Shipping reads records up to `complete_seq`, and records a receiver's
//!   `Applied` ([`Spool::record_applied`]): that mark is not fsynced by
//!   itself (a crash may forget the latest; the receiver reports it again).
//! - Records are deleted only up to the lowest `applied/` among the
//!   configured receivers, by [`Spool::record_applied`]. On open, records
//!   above `complete_seq` (a transaction cut by a stop) are deleted: they
//!   were never shipped, and capture decodes that transaction again. When a
//!   capture session fails (a peek or a copy cut off), capture deletes them
//!   at once ([`Spool::rollback_uncommitted`]) and its retry appends the
//!   same transactions at the same sequence numbers.
//! - `needs_copy/<receiver>` and `applied/<receiver>` are written on open for
//!   a receiver new to the spool; `needs_copy/` is deleted, and `start/`
//!   written, fsynced, when its copy is committed ([`Spool::copy_made_for`]).
//!   `applied/`, `start/`, `source` and `copy_state` are never deleted.
//!
//! # Order of marks
//!
//! captured ≥ `complete_seq` (fsynced) ≥ confirmed to the slot;
//! `complete_seq` ≥ each `applied/` ≥ trimmed (`first_seq - 1`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use pgcourier_common::store::durable::{get_u64, key_seq, put_u64, Store, StoreError, Synced};
use pgcourier_common::store::segments::{AfterMemo, SegmentLog};
use pgcourier_proto::cutter::Tables;
use pgcourier_proto::Lsn;
use tokio::sync::watch;

/// Which published tables the branches hold the rows of, and whether the
/// first session has decided it. Capture leaves out the changes to a
/// `waiting` table until its copy is spooled (the copy's snapshot holds
/// them). Stored as bincode `(initial_done, synced, waiting)`: `tables` is
/// a nested struct, which bincode lays out field after field, so the bytes
/// are those of the flat layout it replaced.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CopyState {
    /// Set once the first session has decided what to copy.
    pub initial_done: bool,
    pub tables: Tables,
}

/// Tables joining a running publication in chunks (`capture/join.rs`):
/// the joins started and not yet ended, and the ones abandoned since the
/// last copy (named in the next copy's metadata, so the branches drop what
/// they staged). Stored as bincode under `meta/joins`, durable with the
/// commit of the transaction that changes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Joins {
    /// The id the next join takes.
    pub next_id: u64,
    /// Joins whose start is spooled and whose end is not.
    pub open: Vec<OpenJoin>,
    /// Joins abandoned, not yet named in a copy.
    pub aborted: Vec<u64>,
    /// Receivers added late whose join was abandoned: each is owed a new
    /// copy, made for it alone, at its place in the stream (its start
    /// stays where it is: it applies the abandoned join's records, then
    /// the new copy).
    pub owed: Vec<String>,
}

/// A join whose start is spooled and whose end is not.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpenJoin {
    pub id: u64,
    pub tables: Vec<u32>,
    /// A join made for one receiver added late (its copy), or `None`: a
    /// table joining for every receiver.
    pub only_for: Option<String>,
}

/// What shipping and status need to know, published after every commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolMarks {
    /// Highest seq that is durable and ends a transaction.
    pub complete_seq: u64,
    /// Lowest seq still stored (complete_seq + 1 when empty).
    pub first_seq: u64,
    pub captured_end_lsn: Lsn,
}

/// A batch [`Spool::seal`] wrote and [`Spool::sync_sealed`] has yet to
/// make durable.
#[derive(Debug)]
#[must_use = "a sealed batch is shipped only once sync_sealed returns"]
pub struct Sealed {
    /// Its last record.
    complete: u64,
    commit_lsn: Lsn,
    end_lsn: Lsn,
    /// Capture's writes up to it.
    writes: u64,
}

/// Meta keys of the Relation messages kept for inspection.
const RELATION_PREFIX: &[u8] = b"relation/";

pub struct Spool {
    store: Store,
    records: SegmentLog,
    meta: sled::Tree,
    state: Mutex<State>,
    marks: watch::Sender<SpoolMarks>,
    /// Per receiver, what [`Spool::bytes_behind`] read last time.
    behind: Mutex<HashMap<String, Option<AfterMemo>>>,
}

struct State {
    next_seq: u64,
    complete_seq: u64,
    first_seq: u64,
    captured_commit_lsn: Lsn,
    captured_end_lsn: Lsn,
    /// `applied/<receiver>` of each configured receiver.
    applied: BTreeMap<String, u64>,
    /// Writes capture made (records, copy state), and how many of them the
    /// last fsync covered: equal when nothing capture wrote can be lost.
    capture_writes: u64,
    synced_writes: u64,
    /// Receivers waiting for a copy made for them (`needs_copy/<name>`).
    needs_copy: Vec<String>,
}

impl Spool {
    /// Open the spool, drop an incomplete tail, and register the receivers
    /// whose acknowledgements gate deletion.
    pub fn open(path: &Path, cache_bytes: u64, receivers: &[String]) -> Result<Spool, StoreError> {
        Spool::open_mode(path, cache_bytes, receivers, false)
    }

    /// Open for inspection (`pgcourier-queue` on a stopped sender): nothing
    /// is repaired or registered, so nothing is written.
    pub fn open_for_inspection(path: &Path, receivers: &[String]) -> Result<Spool, StoreError> {
        if !path.join("db").exists() {
            return Err(StoreError::Dir {
                path: path.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no spool here (setting `spool-dir`)",
                ),
            });
        }
        Spool::open_mode(path, 16 << 20, receivers, true)
    }

    fn open_mode(
        path: &Path,
        cache_bytes: u64,
        receivers: &[String],
        inspect: bool,
    ) -> Result<Spool, StoreError> {
        let store = Store::open(path, cache_bytes)?;
        let meta = store.tree("meta")?;
        if !inspect {
            migrate_ack_keys(&store, &meta)?;
        }
        if inspect && !store.tree("records")?.is_empty() {
            return Err(StoreError::Dir {
                path: path.into(),
                source: std::io::Error::other(
                    "a spool of an earlier version (one key per record): start the sender once to convert it, then inspect it",
                ),
            });
        }
        // Absent on a new spool: nothing spooled yet.
        let complete_seq = get_u64(&store, &meta, "complete_seq")?.unwrap_or(0);
        let captured_commit_lsn = Lsn(get_u64(&store, &meta, "captured_commit_lsn")?.unwrap_or(0));
        let captured_end_lsn = Lsn(get_u64(&store, &meta, "captured_end_lsn")?.unwrap_or(0));
        // Past `complete_seq`: a transaction tail a stop cut before its
        // commit (the slot sends it again), removed on open.
        let records = SegmentLog::open(
            &store,
            "segments",
            (!inspect).then_some("records"),
            (!inspect).then_some(complete_seq + 1),
        )?;
        let first_seq = records.first_seq()?.unwrap_or(complete_seq + 1);
        let mut applied = BTreeMap::new();
        let mut registered = false;
        for name in receivers {
            let key = applied_key(name);
            let stored = match get_u64(&store, &meta, &key)? {
                // A stopped sender of an earlier version: not migrated yet.
                None if inspect => get_u64(&store, &meta, &format!("{OLD_APPLIED_PREFIX}{name}"))?,
                found => found,
            };
            let seq = match stored {
                Some(seq) => seq,
                None => {
                    // A receiver configured at the spool's creation gets
                    // everything from record 1 (the initial copy included).
                    // One added after records were deleted needs a copy of
                    // its own, which capture makes (see `needs_copy`).
                    let seq = first_seq.saturating_sub(1);
                    if !inspect {
                        put_u64(&store, &meta, &key, seq)?;
                        if first_seq > 1 {
                            meta.insert(format!("{NEEDS_COPY_PREFIX}{name}"), &[1u8][..])
                                .map_err(|e| store.write_err(e))?;
                            tracing::info!(receiver = %name, "a receiver new to this spool: its tables will be copied for it");
                        }
                        registered = true;
                    }
                    seq
                }
            };
            applied.insert(name.clone(), seq);
        }
        if registered {
            store.sync()?;
        }
        if !inspect
            && meta
                .get(SPOOL_ID_KEY)
                .map_err(|e| store.write_err(e))?
                .is_none()
        {
            let id = format!("{:032x}", rand::random::<u128>());
            meta.insert(SPOOL_ID_KEY, id.as_bytes())
                .map_err(|e| store.write_err(e))?;
            store.sync()?;
            tracing::info!(spool_id = %id, "a new spool: its identity is made");
        }
        let mut needs_copy = Vec::new();
        for item in meta.scan_prefix(NEEDS_COPY_PREFIX) {
            let (k, _) = item.map_err(|e| store.write_err(e))?;
            needs_copy.push(receiver_of(&store, &k, NEEDS_COPY_PREFIX)?);
        }
        let marks = SpoolMarks {
            complete_seq,
            first_seq,
            captured_end_lsn,
        };
        let (marks_tx, _) = watch::channel(marks);
        Ok(Spool {
            store,
            records,
            meta,
            behind: Mutex::new(HashMap::new()),
            state: Mutex::new(State {
                next_seq: complete_seq + 1,
                complete_seq,
                first_seq,
                captured_commit_lsn,
                captured_end_lsn,
                applied,
                capture_writes: 0,
                synced_writes: 0,
                needs_copy,
            }),
            marks: marks_tx,
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<SpoolMarks> {
        self.marks.subscribe()
    }

    pub fn marks(&self) -> SpoolMarks {
        *self.marks.borrow()
    }

    pub fn next_seq(&self) -> u64 {
        self.state.lock().expect("spool state lock").next_seq
    }

    /// Commit LSN of the last transaction fully in the spool: capture skips
    /// transactions at or below it (the slot may lag after a crash).
    pub fn captured_commit_lsn(&self) -> Lsn {
        self.state
            .lock()
            .expect("spool state lock")
            .captured_commit_lsn
    }

    /// Source identity this spool belongs to; `None` until the first
    /// capture session records it.
    pub fn source(&self) -> Result<Option<String>, StoreError> {
        let Some(v) = self
            .meta
            .get("source")
            .map_err(|e| self.store.write_err(e))?
        else {
            return Ok(None);
        };
        String::from_utf8(v.to_vec())
            .map(Some)
            .map_err(|_| StoreError::Corrupt {
                path: self.store.path.clone(),
                key: "meta/source".into(),
            })
    }

    /// This spool's identity (`meta/spool_id`), made by [`Spool::open`].
    pub fn spool_id(&self) -> Result<String, StoreError> {
        let corrupt = || StoreError::Corrupt {
            path: self.store.path.clone(),
            key: format!("meta/{SPOOL_ID_KEY}"),
        };
        let v = self
            .meta
            .get(SPOOL_ID_KEY)
            .map_err(|e| self.store.write_err(e))?
            .ok_or_else(corrupt)?;
        String::from_utf8(v.to_vec()).map_err(|_| corrupt())
    }

    /// Record the source identity. Fsynced (blocks: call it off the async
    /// workers).
    pub fn set_source(&self, source: &str) -> Result<(), StoreError> {
        self.meta
            .insert("source", source.as_bytes())
            .map_err(|e| self.store.write_err(e))?;
        self.store.sync()
    }

    /// Receivers added after the spool deleted records: each needs a copy
    /// of the tables made for it alone.
    pub fn needs_copy(&self) -> Vec<String> {
        self.state
            .lock()
            .expect("spool state lock")
            .needs_copy
            .clone()
    }

    /// Where a receiver that needed a copy starts: the copy's first record.
    pub fn start_for(&self, receiver: &str) -> Result<Option<u64>, StoreError> {
        get_u64(
            &self.store,
            &self.meta,
            &format!("{START_PREFIX}{receiver}"),
        )
    }

    /// A copy for `receivers` was committed at `start`: they start there, and
    /// need nothing before it (as if they had applied everything before).
    /// Fsynced (blocks: call it off the async workers).
    pub fn copy_made_for(&self, receivers: &[String], start: u64) -> Result<(), StoreError> {
        for r in receivers {
            put_u64(
                &self.store,
                &self.meta,
                &format!("{START_PREFIX}{r}"),
                start,
            )?;
            self.meta
                .remove(format!("{NEEDS_COPY_PREFIX}{r}"))
                .map_err(|e| self.store.write_err(e))?;
        }
        self.store.sync()?;
        self.state
            .lock()
            .expect("spool state lock")
            .needs_copy
            .retain(|n| !receivers.contains(n));
        for r in receivers {
            self.record_applied(r, start - 1)?;
        }
        Ok(())
    }

    /// The copy bookkeeping (see [`CopyState`]).
    pub fn copy_state(&self) -> Result<Option<CopyState>, StoreError> {
        let Some(v) = self
            .meta
            .get("copy_state")
            .map_err(|e| self.store.write_err(e))?
        else {
            return Ok(None);
        };
        bincode::serde::decode_from_slice(&v, pgcourier_proto::record::bincode_config())
            .map(|(st, _)| Some(st))
            .map_err(|_| StoreError::Corrupt {
                path: self.store.path.clone(),
                key: "meta/copy_state".into(),
            })
    }

    /// Write the copy bookkeeping. Durable with the next [`Spool::commit`]
    /// (or [`Spool::sync`]), which is before any transaction whose changes
    /// it explains is.
    pub fn set_copy_state(&self, st: &CopyState) -> Result<(), StoreError> {
        let bytes = bincode::serde::encode_to_vec(st, pgcourier_proto::record::bincode_config())
            .expect("copy state encodes");
        self.meta
            .insert("copy_state", bytes)
            .map_err(|e| self.store.write_err(e))?;
        self.state.lock().expect("spool state lock").capture_writes += 1;
        Ok(())
    }

    /// The joins' bookkeeping (see [`Joins`]).
    pub fn joins(&self) -> Result<Joins, StoreError> {
        let Some(v) = self
            .meta
            .get("joins")
            .map_err(|e| self.store.write_err(e))?
        else {
            return Ok(Joins::default());
        };
        bincode::serde::decode_from_slice(&v, pgcourier_proto::record::bincode_config())
            .map(|(st, _)| st)
            .map_err(|_| StoreError::Corrupt {
                path: self.store.path.clone(),
                key: "meta/joins".into(),
            })
    }

    /// Write the joins' bookkeeping; durable with the next commit, as
    /// [`Spool::set_copy_state`].
    pub fn set_joins(&self, joins: &Joins) -> Result<(), StoreError> {
        let bytes = bincode::serde::encode_to_vec(joins, pgcourier_proto::record::bincode_config())
            .expect("joins encode");
        self.meta
            .insert("joins", bytes)
            .map_err(|e| self.store.write_err(e))?;
        self.state.lock().expect("spool state lock").capture_writes += 1;
        Ok(())
    }

    /// Keep a table's latest Relation message, for showing the records
    /// spooled after it (a stream sends it once per session, so the record
    /// that carried it may be trimmed long before the ones that need it).
    /// Durable with the next commit; only inspection reads it.
    pub fn save_relation(&self, oid: u32, message: &[u8]) -> Result<(), StoreError> {
        let mut key = RELATION_PREFIX.to_vec();
        key.extend_from_slice(&oid.to_be_bytes());
        self.meta
            .insert(key, message)
            .map_err(|e| self.store.write_err(e))?;
        Ok(())
    }

    /// The Relation messages kept by [`Spool::save_relation`].
    pub fn relations(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.meta
            .scan_prefix(RELATION_PREFIX)
            .values()
            .map(|v| v.map(|v| v.to_vec()).map_err(|e| self.store.write_err(e)))
            .collect()
    }

    /// fsync what was written.
    pub fn sync(&self) -> Result<(), StoreError> {
        let writes = self.state.lock().expect("spool state lock").capture_writes;
        self.store.sync()?;
        let mut st = self.state.lock().expect("spool state lock");
        st.synced_writes = st.synced_writes.max(writes);
        Ok(())
    }

    /// `lsn` as a position the slot may be confirmed to, once nothing
    /// capture wrote waits for an fsync (fsyncs first if something does;
    /// usually nothing does). For a peek that spooled nothing new: the
    /// caller has found every transaction below `lsn` already spooled
    /// (skipped) or found none at all (a quiet publication). Blocks on the
    /// fsync: call it off the async workers.
    pub fn synced_through(&self, lsn: Lsn) -> Result<Synced<Lsn>, StoreError> {
        let moved = self.note_confirmable(lsn)?;
        let pending = moved || {
            let st = self.state.lock().expect("spool state lock");
            st.capture_writes != st.synced_writes
        };
        if pending {
            self.sync()?;
        }
        Ok(Synced::after_sync(lsn))
    }

    /// The furthest position this spool has let capture confirm to the
    /// slot (`confirmable_lsn`); `None` on a spool written before the mark
    /// existed.
    pub fn confirmable_lsn(&self) -> Result<Option<Lsn>, StoreError> {
        Ok(get_u64(&self.store, &self.meta, CONFIRMABLE_KEY)?.map(Lsn))
    }

    /// Raise `confirmable_lsn` to `lsn` if it is below. Not fsynced: the
    /// caller fsyncs before the slot is confirmed there. Returns whether it
    /// moved.
    pub fn note_confirmable(&self, lsn: Lsn) -> Result<bool, StoreError> {
        if self.confirmable_lsn()?.is_some_and(|at| at >= lsn) {
            return Ok(false);
        }
        put_u64(&self.store, &self.meta, CONFIRMABLE_KEY, lsn.0)?;
        Ok(true)
    }

    /// Append one encoded record at `seq`, which must be `next_seq()`. Not
    /// durable, and not shipped, until [`Spool::commit`].
    pub fn append(&self, seq: u64, encoded: &[u8]) -> Result<(), StoreError> {
        let mut st = self.state.lock().expect("spool state lock");
        assert_eq!(seq, st.next_seq, "spool appends must be dense");
        self.records.append(seq, encoded)?;
        st.next_seq += 1;
        st.capture_writes += 1;
        Ok(())
    }

    /// Forget what capture appended since the last [`Spool::commit`]: the
    /// tail of a peek or a copy whose session failed (connection cut,
    /// source restarted, statement timeout). Those records were never
    /// shippable; the retry decodes the same transactions again and must
    /// append them at the same sequence numbers, once. Returns how many
    /// records were deleted. Not fsynced: a crash drops the tail anyway
    /// ([`Spool::open`]). Capture calls it only when no commit of its own is
    /// in flight. The marks a [`Spool::sync_sealed`] wrote before its store
    /// fsync failed are put back to those last made durable.
    pub fn rollback_uncommitted(&self) -> Result<u64, StoreError> {
        let mut st = self.state.lock().expect("spool state lock");
        let deleted = self.records.truncate_from(st.complete_seq + 1)?;
        st.next_seq = st.complete_seq + 1;
        self.write_marks(st.complete_seq, st.captured_commit_lsn, st.captured_end_lsn)?;
        Ok(deleted)
    }

    fn write_marks(&self, complete: u64, commit_lsn: Lsn, end_lsn: Lsn) -> Result<(), StoreError> {
        put_u64(&self.store, &self.meta, "complete_seq", complete)?;
        put_u64(&self.store, &self.meta, "captured_commit_lsn", commit_lsn.0)?;
        put_u64(&self.store, &self.meta, "captured_end_lsn", end_lsn.0)
    }

    /// Make everything appended durable (fsync) and shippable. The caller
    /// guarantees the last appended record ends a transaction whose commit
    /// and end LSNs are given. Blocks on the fsync (call it off the async
    /// workers); returns `end_lsn` as [`Synced`]: what the slot may now be
    /// confirmed to (invariant 1).
    pub fn commit(&self, commit_lsn: Lsn, end_lsn: Lsn) -> Result<Synced<Lsn>, StoreError> {
        let sealed = self.seal(commit_lsn, end_lsn)?;
        self.sync_sealed(sealed)
    }

    /// The first half of [`Spool::commit`], which does not wait for the
    /// disk: write everything appended so far to the store's files (the
    /// marks that make it shippable are written by [`Spool::sync_sealed`],
    /// after the files' fsync). Capture may append the next
    /// batch while [`Spool::sync_sealed`] fsyncs this one; one batch is
    /// sealed at a time. Until its fsync returns nothing it holds is
    /// shipped, and a crash, or a [`Spool::rollback_uncommitted`] after a
    /// failed fsync, drops it all.
    pub fn seal(&self, commit_lsn: Lsn, end_lsn: Lsn) -> Result<Sealed, StoreError> {
        let (complete, writes) = {
            let st = self.state.lock().expect("spool state lock");
            debug_assert!(end_lsn >= st.captured_end_lsn);
            debug_assert!(commit_lsn >= st.captured_commit_lsn);
            (st.next_seq - 1, st.capture_writes)
        };
        self.records.write_pending()?;
        Ok(Sealed {
            complete,
            commit_lsn,
            end_lsn,
            writes,
        })
    }

    /// The second half of [`Spool::commit`]: fsync the records, write the
    /// marks, fsync the store, then publish the sealed batch as shippable. Blocks on the fsync (call it off the
    /// async workers); returns its end LSN as [`Synced`].
    pub fn sync_sealed(&self, sealed: Sealed) -> Result<Synced<Lsn>, StoreError> {
        // The records' files first: the marks must not reach the disk
        // before what they cover (sled writes its log when it likes).
        self.records.sync_files()?;
        self.write_marks(sealed.complete, sealed.commit_lsn, sealed.end_lsn)?;
        self.note_confirmable(sealed.end_lsn)?;
        self.store.sync()?;
        let mut st = self.state.lock().expect("spool state lock");
        st.complete_seq = sealed.complete;
        st.captured_commit_lsn = sealed.commit_lsn;
        st.captured_end_lsn = sealed.end_lsn;
        st.synced_writes = st.synced_writes.max(sealed.writes);
        self.publish(&st);
        Ok(Synced::after_sync(sealed.end_lsn))
    }

    fn publish(&self, st: &State) {
        self.marks.send_replace(SpoolMarks {
            complete_seq: st.complete_seq,
            first_seq: st.first_seq,
            captured_end_lsn: st.captured_end_lsn,
        });
    }

    /// Encoded records from `from` on, at most `max_bytes` in total (at least
    /// one record), never past `complete_seq`.
    pub fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        let complete = self.state.lock().expect("spool state lock").complete_seq;
        if from > complete {
            return Ok(Vec::new());
        }
        let out = self.records.read(from, complete, max_bytes)?;
        if out.is_empty() {
            // Dense up to complete_seq: a record missing there is damage.
            return Err(StoreError::Corrupt {
                path: self.store.path.clone(),
                key: format!("segments/{from}"),
            });
        }
        Ok(out)
    }

    /// Total bytes of the records after `seq` (what a receiver at `seq`
    /// still lacks). Walks those records.
    pub fn bytes_after(&self, seq: u64) -> Result<u64, StoreError> {
        self.records.bytes_after(seq)
    }

    /// Bytes of the records after `seq`, which `receiver` has applied: as
    /// [`Spool::bytes_after`], reading only the records it applied since the
    /// last call for it (status and `/metrics` ask this at every request).
    pub fn bytes_behind(&self, receiver: &str, seq: u64) -> Result<u64, StoreError> {
        let mut memos = self.behind.lock().expect("spool behind lock");
        let memo = memos.entry(receiver.to_owned()).or_default();
        self.records.bytes_after_memo(seq, memo)
    }

    /// One record by seq (for inspection).
    pub fn get(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.records.get(seq)
    }

    /// Highest seq `receiver` has applied to its target (`applied/<receiver>`);
    /// `None` for a receiver not configured.
    pub fn applied(&self, receiver: &str) -> Option<u64> {
        self.state
            .lock()
            .expect("spool state lock")
            .applied
            .get(receiver)
            .copied()
    }

    /// Record that `receiver` has applied everything up to `seq` (its
    /// `Applied` frame), and delete the records every configured receiver
    /// has applied. Returns the number deleted. The mark is not fsynced by
    /// itself: after a crash the receiver reports it again.
    pub fn record_applied(&self, receiver: &str, seq: u64) -> Result<u64, StoreError> {
        let through = {
            let mut st = self.state.lock().expect("spool state lock");
            let complete = st.complete_seq;
            let Some(applied) = st.applied.get_mut(receiver) else {
                return Ok(0);
            };
            if seq <= *applied {
                return Ok(0);
            }
            // A receiver cannot hold more than was ever spooled.
            *applied = seq.min(complete);
            let applied = *applied;
            put_u64(&self.store, &self.meta, &applied_key(receiver), applied)?;
            let Some(min) = st.applied.values().copied().min() else {
                return Ok(0);
            };
            debug_assert!(min <= st.complete_seq, "applied <= complete_seq");
            if min < st.first_seq {
                return Ok(0);
            }
            st.first_seq = min + 1;
            self.publish(&st);
            min
        };
        self.records.trim_through(through)
    }

    /// Bytes of the records stored.
    pub fn bytes(&self) -> u64 {
        self.records.depth().1
    }

    /// Persist the applied marks and trims before the process exits.
    pub fn flush_on_stop(&self) {
        if let Err(e) = self.store.sync() {
            tracing::warn!(error = %e, "final spool sync failed; applied marks will be re-learned from receivers");
        }
    }

    /// Number of whole records stored (shippable) and the bytes of all
    /// records stored (what `spool-max-bytes` limits). From counters kept in
    /// memory: reads nothing.
    pub fn depth(&self) -> (u64, u64) {
        let st = self.state.lock().expect("spool state lock");
        let n = st.complete_seq + 1 - st.first_seq;
        (n, self.bytes())
    }
}

/// `meta` key prefixes (see the module documentation).
const APPLIED_PREFIX: &str = "applied/";
/// What earlier versions named `applied/`; moved on open.
const OLD_APPLIED_PREFIX: &str = "ack/";
/// `meta` key of the spool's identity.
const SPOOL_ID_KEY: &str = "spool_id";
const NEEDS_COPY_PREFIX: &str = "needs_copy/";
const START_PREFIX: &str = "start/";
const CONFIRMABLE_KEY: &str = "confirmable_lsn";

fn applied_key(receiver: &str) -> String {
    format!("{APPLIED_PREFIX}{receiver}")
}

/// The receiver name after `prefix` in a `meta` key.
fn receiver_of(store: &Store, key: &[u8], prefix: &str) -> Result<String, StoreError> {
    std::str::from_utf8(&key[prefix.len()..])
        .map(str::to_owned)
        .map_err(|_| StoreError::Corrupt {
            path: store.path.clone(),
            key: format!("meta/{}", String::from_utf8_lossy(key)),
        })
}

/// Move every `ack/<receiver>` key to `applied/<receiver>` (one atomic
/// batch, then fsync). An `applied/` key already there wins. Returns how
/// many keys moved.
fn migrate_ack_keys(store: &Store, meta: &sled::Tree) -> Result<usize, StoreError> {
    let mut batch = sled::Batch::default();
    let mut moved = 0;
    for item in meta.scan_prefix(OLD_APPLIED_PREFIX) {
        let (key, value) = item.map_err(|e| store.write_err(e))?;
        let name = receiver_of(store, &key, OLD_APPLIED_PREFIX)?;
        if key_seq(&value).is_none() {
            return Err(StoreError::Corrupt {
                path: store.path.clone(),
                key: format!("meta/{OLD_APPLIED_PREFIX}{name}"),
            });
        }
        let new_key = applied_key(&name);
        if meta
            .get(&new_key)
            .map_err(|e| store.write_err(e))?
            .is_none()
        {
            batch.insert(new_key.as_bytes(), value);
        }
        batch.remove(key);
        moved += 1;
    }
    if moved > 0 {
        meta.apply_batch(batch).map_err(|e| store.write_err(e))?;
        store.sync()?;
        tracing::info!(
            receivers = moved,
            "renamed the spool's ack/<receiver> marks to applied/<receiver>"
        );
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn uncommitted_tail_is_dropped_on_reopen_and_committed_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 20, &names(&["a"])).unwrap();
            spool.append(1, b"one").unwrap();
            spool.append(2, b"two").unwrap();
            spool.commit(Lsn(10), Lsn(20)).unwrap();
            spool.append(3, b"three").unwrap();
            assert_eq!(
                spool.read(1, 1 << 20).unwrap().len(),
                2,
                "uncommitted records are not shippable"
            );
        }
        let spool = Spool::open(dir.path(), 1 << 20, &names(&["a"])).unwrap();
        assert_eq!(spool.next_seq(), 3);
        assert_eq!(spool.captured_commit_lsn(), Lsn(10));
        assert_eq!(
            spool.read(1, 1 << 20).unwrap(),
            vec![b"one".to_vec(), b"two".to_vec()]
        );
    }

    #[test]
    fn a_sealed_batch_ships_only_after_its_fsync_and_appends_meanwhile_are_not_part_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![7u8; 40 << 10];
        {
            let spool = Spool::open(dir.path(), 1 << 20, &names(&["a"])).unwrap();
            for seq in 1..=3 {
                spool.append(seq, b"batch one").unwrap();
            }
            let sealed = spool.seal(Lsn(10), Lsn(11)).unwrap();
            assert_eq!(
                spool.marks().complete_seq,
                0,
                "not shippable before its fsync"
            );
            assert!(spool.read(1, 1 << 20).unwrap().is_empty());
            // Nor are its marks in the store: sled may write them to disk at
            // any time, and they must not get there before the records'
            // files are fsynced (sync_sealed writes them after).
            for mark in ["complete_seq", "captured_end_lsn", CONFIRMABLE_KEY] {
                assert_eq!(
                    get_u64(&spool.store, &spool.meta, mark).unwrap(),
                    None,
                    "{mark} written by the seal"
                );
            }
            // The next batch is read while the fsync runs; records this big
            // fill segments, which go to the store at once.
            spool.append(4, &big).unwrap();
            spool.append(5, &big).unwrap();
            assert_eq!(
                spool.sync_sealed(sealed).unwrap(),
                Synced::after_sync(Lsn(11))
            );
            assert_eq!(spool.marks().complete_seq, 3);
            assert_eq!(spool.read(1, 1 << 20).unwrap().len(), 3);
            assert_eq!(spool.next_seq(), 6);
        }
        let spool = Spool::open(dir.path(), 1 << 20, &names(&["a"])).unwrap();
        assert_eq!(spool.marks().complete_seq, 3);
        assert_eq!(spool.next_seq(), 4, "the unsealed batch is dropped");
        assert_eq!(spool.get(4).unwrap(), None);
        assert_eq!(spool.bytes(), 3 * 9);
    }

    #[test]
    fn a_rollback_after_a_failed_fsync_puts_back_the_marks_written_before_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 20, &names(&["a"])).unwrap();
            spool.append(1, b"one").unwrap();
            spool.append(2, b"two").unwrap();
            spool.commit(Lsn(5), Lsn(6)).unwrap();
            spool.append(3, b"three").unwrap();
            // sync_sealed fsynced the records and wrote the marks, then its
            // store fsync failed.
            let sealed = spool.seal(Lsn(7), Lsn(8)).unwrap();
            spool.records.sync_files().unwrap();
            spool
                .write_marks(sealed.complete, sealed.commit_lsn, sealed.end_lsn)
                .unwrap();
            assert_eq!(spool.rollback_uncommitted().unwrap(), 1);
            spool.sync().unwrap();
        }
        let spool = Spool::open(dir.path(), 1 << 20, &names(&["a"])).unwrap();
        assert_eq!(spool.marks().complete_seq, 2);
        assert_eq!(spool.captured_commit_lsn(), Lsn(5));
        assert_eq!(spool.read(1, 1 << 20).unwrap().len(), 2);
    }

    #[test]
    fn records_are_deleted_only_behind_the_slowest_receiver() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, &names(&["fast", "slow"])).unwrap();
        for seq in 1..=5 {
            spool.append(seq, b"x").unwrap();
        }
        spool.commit(Lsn(1), Lsn(2)).unwrap();
        assert_eq!(spool.record_applied("fast", 5).unwrap(), 0);
        assert_eq!(spool.read(1, 1 << 20).unwrap().len(), 5);
        assert_eq!(spool.record_applied("slow", 2).unwrap(), 2);
        assert_eq!(spool.marks().first_seq, 3);
        assert_eq!(spool.get(2).unwrap(), None);
        assert!(spool.get(3).unwrap().is_some());
        drop(spool);
        let spool = Spool::open(dir.path(), 1 << 20, &names(&["fast", "slow"])).unwrap();
        assert_eq!(spool.applied("slow"), Some(2));
        assert_eq!(spool.marks().first_seq, 3);
        assert_eq!(spool.depth(), (3, 3));
        assert_eq!(spool.bytes_after(3).unwrap(), 2);
    }

    /// A spool as an earlier version left it: records 1..=4 committed, and
    /// the applied marks under `ack/`.
    fn old_layout(path: &Path, marks: &[(&str, u64)]) {
        let store = Store::open(path, 1 << 20).unwrap();
        let records = store.tree("records").unwrap();
        let meta = store.tree("meta").unwrap();
        for seq in 1..=4u64 {
            records
                .insert(pgcourier_common::store::durable::seq_key(seq), &b"rec"[..])
                .unwrap();
        }
        put_u64(&store, &meta, "complete_seq", 4).unwrap();
        for (key, seq) in marks {
            put_u64(&store, &meta, key, *seq).unwrap();
        }
        store.sync().unwrap();
    }

    fn meta_keys(path: &Path) -> Vec<String> {
        let store = Store::open(path, 1 << 20).unwrap();
        let meta = store.tree("meta").unwrap();
        meta.iter()
            .keys()
            .map(|k| String::from_utf8(k.unwrap().to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn old_ack_marks_are_moved_to_applied_on_open_and_stay_moved() {
        let dir = tempfile::tempdir().unwrap();
        old_layout(dir.path(), &[("ack/a", 3), ("ack/b", 1), ("ack/gone", 2)]);
        {
            // Inspection writes nothing: it cannot convert the records.
            use pgcourier_common::ops::backoff::error_chain;
            let err = Spool::open_for_inspection(dir.path(), &names(&["a", "b"]))
                .err()
                .expect("an old spool with records is not inspected");
            assert!(
                error_chain(&err).contains("start the sender once"),
                "{}",
                error_chain(&err)
            );
        }
        assert!(meta_keys(dir.path()).contains(&"ack/a".to_owned()));
        {
            let spool = Spool::open(dir.path(), 1 << 20, &names(&["a", "b"])).unwrap();
            assert_eq!((spool.applied("a"), spool.applied("b")), (Some(3), Some(1)));
            assert!(
                spool.needs_copy().is_empty(),
                "a and b are not new receivers"
            );
        }
        let keys = meta_keys(dir.path());
        assert!(keys.iter().all(|k| !k.starts_with("ack/")), "{keys:?}");
        for k in ["applied/a", "applied/b", "applied/gone"] {
            assert!(keys.contains(&k.to_owned()), "{k} missing from {keys:?}");
        }
        let spool = Spool::open(dir.path(), 1 << 20, &names(&["a", "b"])).unwrap();
        assert_eq!((spool.applied("a"), spool.applied("b")), (Some(3), Some(1)));
        // The records moved into segments (and record 1, applied by both,
        // is still there: nothing was trimmed by the move).
        assert_eq!(spool.read(1, 1 << 20).unwrap(), vec![b"rec".to_vec(); 4]);
        assert_eq!(spool.record_applied("b", 3).unwrap(), 3);
        drop(spool);
        let spool = Spool::open_for_inspection(dir.path(), &names(&["a", "b"])).unwrap();
        assert_eq!(spool.get(4).unwrap().as_deref(), Some(&b"rec"[..]));
    }

    #[test]
    fn an_applied_mark_already_there_wins_over_an_old_ack_mark() {
        let dir = tempfile::tempdir().unwrap();
        old_layout(dir.path(), &[("ack/a", 1), ("applied/a", 3)]);
        let spool = Spool::open(dir.path(), 1 << 20, &names(&["a"])).unwrap();
        assert_eq!(spool.applied("a"), Some(3));
        drop(spool);
        assert_eq!(
            meta_keys(dir.path())
                .iter()
                .filter(|k| k.ends_with("/a"))
                .count(),
            1
        );
    }

    #[test]
    fn a_corrupt_old_ack_mark_is_an_error_naming_its_key() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            store
                .tree("meta")
                .unwrap()
                .insert("ack/a", &b"xyz"[..])
                .unwrap();
            store.sync().unwrap();
        }
        let err = Spool::open(dir.path(), 1 << 20, &names(&["a"]))
            .err()
            .unwrap();
        assert!(err.to_string().contains("meta/ack/a"), "{err}");
    }

    #[test]
    fn a_receiver_new_to_a_trimmed_spool_needs_a_copy_and_starts_at_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 20, &names(&["a"])).unwrap();
            for seq in 1..=3 {
                spool.append(seq, b"x").unwrap();
            }
            spool.commit(Lsn(1), Lsn(2)).unwrap();
            spool.record_applied("a", 3).unwrap();
            spool.flush_on_stop();
        }
        let spool = Spool::open(dir.path(), 1 << 20, &names(&["a", "late"])).unwrap();
        assert_eq!(spool.needs_copy(), vec!["late".to_owned()]);
        assert_eq!(spool.applied("late"), Some(3));
        spool.append(4, b"copy").unwrap();
        spool.commit(Lsn(9), Lsn(10)).unwrap();
        spool.copy_made_for(&names(&["late"]), 4).unwrap();
        assert!(spool.needs_copy().is_empty());
        assert_eq!(spool.start_for("late").unwrap(), Some(4));
        drop(spool);
        let spool = Spool::open(dir.path(), 1 << 20, &names(&["a", "late"])).unwrap();
        assert!(spool.needs_copy().is_empty(), "the copy was made: durable");
    }

    #[test]
    fn commit_returns_its_end_as_synced_and_synced_through_waits_for_pending_writes() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, &names(&["a"])).unwrap();
        spool.append(1, b"x").unwrap();
        assert_eq!(spool.commit(Lsn(5), Lsn(8)).unwrap().get(), Lsn(8));
        assert_eq!(spool.synced_through(Lsn(20)).unwrap().get(), Lsn(20));
        let pending = |s: &Spool| {
            let st = s.state.lock().unwrap();
            st.capture_writes != st.synced_writes
        };
        spool.set_copy_state(&CopyState::default()).unwrap();
        assert!(pending(&spool));
        spool.synced_through(Lsn(21)).unwrap();
        assert!(!pending(&spool), "synced_through fsynced the copy state");
    }

    #[test]
    fn copy_state_keeps_the_bytes_of_its_flat_layout() {
        /// The layout spools were written with before `Tables` was split out.
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Flat {
            initial_done: bool,
            synced: std::collections::BTreeSet<u32>,
            waiting: std::collections::BTreeSet<u32>,
        }
        let flat = Flat {
            initial_done: true,
            synced: [16_385, 16_390].into(),
            waiting: [16_400].into(),
        };
        let state = CopyState {
            initial_done: true,
            tables: Tables {
                synced: flat.synced.clone(),
                waiting: flat.waiting.clone(),
            },
        };
        let config = pgcourier_proto::record::bincode_config();
        let old = bincode::serde::encode_to_vec(&flat, config).unwrap();
        assert_eq!(bincode::serde::encode_to_vec(&state, config).unwrap(), old);
        let (decoded, _): (CopyState, usize) =
            bincode::serde::decode_from_slice(&old, config).unwrap();
        assert_eq!(decoded, state);
    }

    #[test]
    fn read_respects_the_byte_budget_but_returns_at_least_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, &names(&["a"])).unwrap();
        for seq in 1..=4 {
            spool.append(seq, &[0u8; 100]).unwrap();
        }
        spool.commit(Lsn(1), Lsn(2)).unwrap();
        assert_eq!(spool.read(1, 10).unwrap().len(), 1);
        assert_eq!(spool.read(1, 250).unwrap().len(), 2);
        assert_eq!(spool.read(5, 250).unwrap().len(), 0);
    }

    #[test]
    fn a_failed_peek_is_rolled_back_so_its_retry_appends_each_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, &names(&["a"])).unwrap();
        spool.append(1, b"one").unwrap();
        spool.commit(Lsn(10), Lsn(11)).unwrap();
        // A peek appends three transactions, then its connection is cut.
        for (seq, rec) in [(2, b"t2"), (3, b"t3"), (4, b"t4")] {
            spool.append(seq, rec).unwrap();
        }
        assert_eq!(spool.rollback_uncommitted().unwrap(), 3);
        assert_eq!(
            spool.next_seq(),
            2,
            "the retry starts where the commit left"
        );
        for seq in 2..=4 {
            assert_eq!(spool.get(seq).unwrap(), None, "stale record {seq}");
        }
        assert_eq!(spool.bytes(), 3, "the stale tail's bytes are gone");
        // The retry reads less this time (the slot returned fewer rows).
        spool.append(spool.next_seq(), b"t2").unwrap();
        spool.commit(Lsn(20), Lsn(21)).unwrap();
        assert_eq!(
            spool.read(1, 1 << 20).unwrap(),
            vec![b"one".to_vec(), b"t2".to_vec()]
        );
        assert_eq!(
            spool.get(3).unwrap(),
            None,
            "no stale record past the commit"
        );
        assert_eq!(spool.next_seq(), 3);
        // Nothing to roll back after a commit.
        assert_eq!(spool.rollback_uncommitted().unwrap(), 0);
        spool.append(3, b"t3").unwrap();
        spool.commit(Lsn(30), Lsn(31)).unwrap();
        assert_eq!(spool.read(1, 1 << 20).unwrap().len(), 3);
        assert_eq!(spool.bytes(), 3 + 2 + 2);
    }
}
