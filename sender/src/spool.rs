//! The sender's durable queue of captured transactions (sled).
//!
//! Layout:
//! - tree `records`: key = seq as u64 big-endian, value = an encoded
//!   [`Record`](pgcourier_proto::record::Record) (checksummed, < 96 KiB so
//!   sled keeps it in its fsynced log, never in a blob file).
//! - tree `meta`: `complete_seq` (highest seq of a whole transaction that is
//!   fsynced: the shipping limit), `captured_commit_lsn` (commit LSN of that
//!   transaction), `captured_end_lsn` (its end LSN: what the slot may be
//!   advanced to), `source` (source identity), and `ack/<receiver>` (highest
//!   seq that receiver has fsynced).
//!
//! Who writes and deletes: capture appends at `next_seq` and calls
//! [`Spool::commit`] at transaction boundaries, which writes the meta marks
//! and fsyncs before it returns; only then does capture advance the slot.
//! Shipping reads up to `complete_seq`. Records are deleted only up to the
//! lowest acknowledgement among all configured receivers. On open, records
//! above `complete_seq` (a transaction cut by a crash) are removed: they were
//! never shipped, and capture decodes that transaction again.
//!
//! Order of marks: captured >= complete (fsynced) >= confirmed to the slot;
//! complete >= each ack >= trimmed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use pgcourier_common::store::durable::{
    get_u64, key_seq, put_u64, seq_key, Store, StoreError, Synced,
};
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

/// What shipping and status need to know, published after every commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolMarks {
    /// Highest seq that is durable and ends a transaction.
    pub complete_seq: u64,
    /// Lowest seq still stored (complete_seq + 1 when empty).
    pub first_seq: u64,
    pub captured_end_lsn: Lsn,
}

pub struct Spool {
    store: Store,
    records: sled::Tree,
    meta: sled::Tree,
    state: Mutex<State>,
    marks: watch::Sender<SpoolMarks>,
    /// Bytes of the records stored (what `spool-max-bytes` limits).
    bytes: std::sync::atomic::AtomicU64,
}

struct State {
    next_seq: u64,
    complete_seq: u64,
    first_seq: u64,
    captured_commit_lsn: Lsn,
    captured_end_lsn: Lsn,
    acks: BTreeMap<String, u64>,
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
        let records = store.tree("records")?;
        let meta = store.tree("meta")?;
        let complete_seq = get_u64(&store, &meta, "complete_seq")?.unwrap_or(0);
        let captured_commit_lsn = Lsn(get_u64(&store, &meta, "captured_commit_lsn")?.unwrap_or(0));
        let captured_end_lsn = Lsn(get_u64(&store, &meta, "captured_end_lsn")?.unwrap_or(0));
        // Remove a transaction tail that was never committed to the spool.
        let mut dropped = 0u64;
        for item in records
            .range(seq_key(complete_seq + 1)..)
            .filter(|_| !inspect)
        {
            let (k, _) = item.map_err(|e| store.write_err(e))?;
            records.remove(k).map_err(|e| store.write_err(e))?;
            dropped += 1;
        }
        if dropped > 0 {
            tracing::info!(
                dropped,
                complete_seq,
                "removed spool records of a transaction cut by a stop; it will be captured again"
            );
            store.sync()?;
        }
        let first_seq = match records.first().map_err(|e| store.write_err(e))? {
            Some((k, _)) => key_seq(&k).ok_or_else(|| StoreError::Corrupt {
                path: store.path.clone(),
                key: "records".into(),
            })?,
            None => complete_seq + 1,
        };
        let mut acks = BTreeMap::new();
        for name in receivers {
            let key = format!("ack/{name}");
            let ack = match get_u64(&store, &meta, &key)? {
                Some(a) => a,
                None => {
                    // A receiver configured at the spool's creation gets
                    // everything from record 1 (the initial copy included).
                    // One added after records were deleted needs a copy of
                    // its own, which capture makes (see `needs_copy`).
                    let a = first_seq.saturating_sub(1);
                    if !inspect {
                        put_u64(&store, &meta, &key, a)?;
                        if first_seq > 1 {
                            meta.insert(format!("needs_copy/{name}"), &[1u8][..])
                                .map_err(|e| store.write_err(e))?;
                            tracing::info!(receiver = %name, "a receiver new to this spool: its tables will be copied for it");
                        }
                    }
                    a
                }
            };
            acks.insert(name.clone(), ack);
        }
        let mut needs_copy = Vec::new();
        for item in meta.scan_prefix("needs_copy/") {
            let (k, _) = item.map_err(|e| store.write_err(e))?;
            needs_copy.push(String::from_utf8_lossy(&k["needs_copy/".len()..]).into_owned());
        }
        let marks = SpoolMarks {
            complete_seq,
            first_seq,
            captured_end_lsn,
        };
        let (marks_tx, _) = watch::channel(marks);
        let bytes = records
            .iter()
            .values()
            .flatten()
            .map(|v| v.len() as u64)
            .sum();
        Ok(Spool {
            bytes: std::sync::atomic::AtomicU64::new(bytes),
            store,
            records,
            meta,
            state: Mutex::new(State {
                next_seq: complete_seq + 1,
                complete_seq,
                first_seq,
                captured_commit_lsn,
                captured_end_lsn,
                acks,
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

    /// Source identity this spool belongs to, if recorded.
    pub fn source(&self) -> Result<Option<String>, StoreError> {
        let v = self
            .meta
            .get("source")
            .map_err(|e| self.store.write_err(e))?;
        Ok(v.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

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
        get_u64(&self.store, &self.meta, &format!("start/{receiver}"))
    }

    /// A copy for `receivers` was committed at `start`: they start there, and
    /// need nothing before it. Fsynced.
    pub fn copy_made_for(&self, receivers: &[String], start: u64) -> Result<(), StoreError> {
        for r in receivers {
            put_u64(&self.store, &self.meta, &format!("start/{r}"), start)?;
            self.meta
                .remove(format!("needs_copy/{r}"))
                .map_err(|e| self.store.write_err(e))?;
        }
        self.store.sync()?;
        self.state
            .lock()
            .expect("spool state lock")
            .needs_copy
            .retain(|n| !receivers.contains(n));
        for r in receivers {
            self.acknowledge(r, start - 1)?;
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
        let pending = {
            let st = self.state.lock().expect("spool state lock");
            st.capture_writes != st.synced_writes
        };
        if pending {
            self.sync()?;
        }
        Ok(Synced::after_sync(lsn))
    }

    /// Append one encoded record at `seq`, which must be `next_seq()`. Not
    /// durable, and not shipped, until [`Spool::commit`].
    pub fn append(&self, seq: u64, encoded: &[u8]) -> Result<(), StoreError> {
        let mut st = self.state.lock().expect("spool state lock");
        assert_eq!(seq, st.next_seq, "spool appends must be dense");
        self.records
            .insert(seq_key(seq), encoded)
            .map_err(|e| self.store.write_err(e))?;
        self.bytes
            .fetch_add(encoded.len() as u64, std::sync::atomic::Ordering::Relaxed);
        st.next_seq += 1;
        st.capture_writes += 1;
        Ok(())
    }

    /// Make everything appended durable (fsync) and shippable. The caller
    /// guarantees the last appended record ends a transaction whose commit
    /// and end LSNs are given. Blocks on the fsync (call it off the async
    /// workers); returns `end_lsn` as [`Synced`]: what the slot may now be
    /// confirmed to (invariant 1).
    pub fn commit(&self, commit_lsn: Lsn, end_lsn: Lsn) -> Result<Synced<Lsn>, StoreError> {
        let (complete, writes) = {
            let st = self.state.lock().expect("spool state lock");
            debug_assert!(end_lsn >= st.captured_end_lsn);
            debug_assert!(commit_lsn >= st.captured_commit_lsn);
            (st.next_seq - 1, st.capture_writes)
        };
        put_u64(&self.store, &self.meta, "complete_seq", complete)?;
        put_u64(&self.store, &self.meta, "captured_commit_lsn", commit_lsn.0)?;
        put_u64(&self.store, &self.meta, "captured_end_lsn", end_lsn.0)?;
        self.store.sync()?;
        let mut st = self.state.lock().expect("spool state lock");
        st.complete_seq = complete;
        st.captured_commit_lsn = commit_lsn;
        st.captured_end_lsn = end_lsn;
        st.synced_writes = st.synced_writes.max(writes);
        self.publish(&st);
        Ok(Synced::after_sync(end_lsn))
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
        let mut out = Vec::new();
        let mut bytes = 0;
        if from > complete {
            return Ok(out);
        }
        for item in self.records.range(seq_key(from)..=seq_key(complete)) {
            let (k, v) = item.map_err(|e| self.store.write_err(e))?;
            let seq = key_seq(&k).ok_or_else(|| StoreError::Corrupt {
                path: self.store.path.clone(),
                key: "records".into(),
            })?;
            if seq != from + out.len() as u64 {
                return Err(StoreError::Corrupt {
                    path: self.store.path.clone(),
                    key: format!("records/{}", from + out.len() as u64),
                });
            }
            if !out.is_empty() && bytes + v.len() > max_bytes {
                break;
            }
            bytes += v.len();
            out.push(v.to_vec());
        }
        Ok(out)
    }

    /// Total bytes of the records after `seq` (what a receiver at `seq`
    /// still lacks).
    pub fn bytes_after(&self, seq: u64) -> u64 {
        self.records
            .range(seq_key(seq + 1)..)
            .values()
            .flatten()
            .map(|v| v.len() as u64)
            .sum()
    }

    /// One record by seq (for inspection).
    pub fn get(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .records
            .get(seq_key(seq))
            .map_err(|e| self.store.write_err(e))?
            .map(|v| v.to_vec()))
    }

    pub fn ack(&self, receiver: &str) -> Option<u64> {
        self.state
            .lock()
            .expect("spool state lock")
            .acks
            .get(receiver)
            .copied()
    }

    /// Record that `receiver` holds everything up to `seq` durably, and
    /// delete what every receiver now holds. Returns the number deleted.
    pub fn acknowledge(&self, receiver: &str, seq: u64) -> Result<u64, StoreError> {
        let (from, to) = {
            let mut st = self.state.lock().expect("spool state lock");
            let complete = st.complete_seq;
            let Some(ack) = st.acks.get_mut(receiver) else {
                return Ok(0);
            };
            if seq <= *ack {
                return Ok(0);
            }
            // A receiver cannot hold more than was ever spooled.
            *ack = seq.min(complete);
            let ack = *ack;
            put_u64(&self.store, &self.meta, &format!("ack/{receiver}"), ack)?;
            let min = st.acks.values().copied().min().unwrap_or(0);
            if min < st.first_seq {
                return Ok(0);
            }
            let from = st.first_seq;
            st.first_seq = min + 1;
            self.publish(&st);
            (from, min)
        };
        let mut deleted = 0;
        for seq in from..=to {
            if let Some(v) = self
                .records
                .remove(seq_key(seq))
                .map_err(|e| self.store.write_err(e))?
            {
                self.bytes
                    .fetch_sub(v.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            deleted += 1;
        }
        Ok(deleted)
    }

    /// Bytes of the records stored.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Persist acknowledgements and trims before the process exits.
    pub fn flush_on_stop(&self) {
        if let Err(e) = self.store.sync() {
            tracing::warn!(error = %e, "final spool sync failed; acknowledgements will be re-learned from receivers");
        }
    }

    /// Number of records stored and their total size.
    pub fn depth(&self) -> (u64, u64) {
        let st = self.state.lock().expect("spool state lock");
        let n = st.complete_seq + 1 - st.first_seq;
        (
            n,
            self.records
                .iter()
                .values()
                .flatten()
                .map(|v| v.len() as u64)
                .sum(),
        )
    }
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
    fn records_are_deleted_only_behind_the_slowest_receiver() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20, &names(&["fast", "slow"])).unwrap();
        for seq in 1..=5 {
            spool.append(seq, b"x").unwrap();
        }
        spool.commit(Lsn(1), Lsn(2)).unwrap();
        assert_eq!(spool.acknowledge("fast", 5).unwrap(), 0);
        assert_eq!(spool.read(1, 1 << 20).unwrap().len(), 5);
        assert_eq!(spool.acknowledge("slow", 2).unwrap(), 2);
        assert_eq!(spool.marks().first_seq, 3);
        assert_eq!(spool.get(2).unwrap(), None);
        assert!(spool.get(3).unwrap().is_some());
        drop(spool);
        let spool = Spool::open(dir.path(), 1 << 20, &names(&["fast", "slow"])).unwrap();
        assert_eq!(spool.ack("slow"), Some(2));
        assert_eq!(spool.marks().first_seq, 3);
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
}
