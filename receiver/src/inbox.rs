//! The receiver's durable inbox of records received from the sender (sled).
//! Ingest writes it (after the sender's batch is verified), apply reads and
//! empties it: QUIC → ingest → **inbox** → apply → target.
//!
//! Keys and values:
//! - directory `segments.d`, trees `segments.index` and `segments.low`:
//!   the records, a [`SegmentLog`](pgcourier_common::store::segments)
//!   (segments of about 32 KiB of consecutive records in files of their
//!   own; one sled key per segment, key = its first seq as u64 big-endian,
//!   value = where its body lies), each the encoded record exactly as the
//!   sender spooled it (its checksum is checked on arrival and again before
//!   apply). Dense from the first stored seq to `durable_seq`. Earlier
//!   versions kept the records in sled (tree `records`, one key per record;
//!   then tree `segments`): [`Inbox::open`] moves them.
//! - tree `meta`:
//!   - `durable_seq`: u64 big-endian, highest seq stored and fsynced (what
//!     ingest acknowledges; 0: none).
//!   - `source`: UTF-8 identity of the source the inbox belongs to (absent
//!     in a new inbox; set by the first sender's `Welcome` or a seed import,
//!     never changed afterwards).
//!   - `spool_id`: UTF-8 identity of the sender spool the records came from
//!     (absent in a new inbox, or one from before protocol 4; set, fsynced,
//!     by the first sender's `Welcome`, before anything is stored; never
//!     changed afterwards: a sender with another spool is refused).
//! - tree `relations`: key = source relation OID (u32 big-endian), value =
//!   the latest pgoutput Relation message seen for it at apply time, so apply
//!   can resume after a restart with records whose Relation message was in a
//!   record already applied and deleted.
//!
//! Limits: a record is at most [`MAX_RECORD_BYTES`](pgcourier_proto::record::MAX_RECORD_BYTES). The records' total is held
//! under `inbox-max-bytes` by ingest, which waits (the sender keeps the batch)
//! while a batch would take the inbox past it; an inbox that holds no
//! complete transaction apply could commit (empty, or the start of one
//! transaction larger than the limit) always takes a batch, so the most the
//! inbox holds is the limit, or the largest transaction, plus one batch
//! ([`MAX_BATCH_RAW_BYTES`](pgcourier_proto::frame::MAX_BATCH_RAW_BYTES)).
//! Apply never opens a transaction that is not whole in the inbox inside a
//! group of others: it commits the group first, so a complete transaction
//! held is always one apply can commit. `relations` holds one entry per published
//! table ever seen. Without a limit the inbox grows while apply is stopped.
//!
//! Who writes and deletes: ingest appends whole batches and fsyncs before it
//! acknowledges ([`Inbox::store_batch`] returns a [`Synced`] mark, and only
//! a `Synced` mark is acknowledged). Apply deletes records only after the
//! target transaction holding them (and the progress row) committed
//! ([`Inbox::delete_through`], not synced: a record that reappears after a
//! crash is skipped by the progress row); what it deleted is the `applied`
//! mark ingest reports to the sender, which keeps records until then. A
//! record apply finds corrupt is dropped with everything after it
//! ([`Inbox::truncate_from`]): `durable_seq` goes back below it and ingest
//! reconnects to fetch it again; never at or below the applied mark (such a
//! record, back after a crash, is already applied: it alone is deleted). A seed import or a copy made for a new
//! branch moves the inbox ([`Inbox::reset_to_seed`]).
//!
//! Every call that fsyncs blocks: from async code, call it through
//! `tokio::task::spawn_blocking` (the inbox is shared in an `Arc`).
//!
//! Order of marks: durable >= applied >= deleted.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use pgcourier_common::store::durable::{get_u64, put_u64, Store, StoreError, Synced};
use pgcourier_common::store::segments::SegmentLog;
use tokio::sync::watch;

/// What [`Inbox::truncate_from`] did with a corrupt record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Dropped with everything after it; ingest fetches them again.
    Refetch,
    /// At or below the applied mark: already applied, deleted alone.
    Applied,
}

/// The highest stored seq below `below` that ends its transaction (0: none).
fn last_boundary(records: &SegmentLog, below: u64) -> Result<u64, StoreError> {
    Ok(records.rfind(below, is_last)?.unwrap_or(0))
}

pub struct Inbox {
    store: Store,
    records: SegmentLog,
    meta: sled::Tree,
    relations: sled::Tree,
    durable: watch::Sender<u64>,
    /// Highest seq applied (deleted after the target commit).
    applied: watch::Sender<u64>,
    /// Counts [`Inbox::truncate_from`] calls: ingest reconnects on a change.
    truncations: watch::Sender<u64>,
    /// Serialises appends and truncations.
    write: std::sync::Mutex<()>,
    /// Ingest is holding batches back at `inbox-max-bytes`.
    full: std::sync::atomic::AtomicBool,
    /// Highest stored seq that is the last record of its transaction (0:
    /// none): the transactions through it are whole in the inbox.
    boundary: AtomicU64,
}

/// Whether an encoded record (checksum verified) is the last of its
/// transaction; one that does not decode counts as not.
fn is_last(bytes: &[u8]) -> bool {
    pgcourier_proto::record::Record::decode(bytes).is_ok_and(|r| r.last)
}

impl Inbox {
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Inbox, StoreError> {
        let store = Store::open(path, cache_bytes)?;
        let meta = store.tree("meta")?;
        let relations = store.tree("relations")?;
        let durable = get_u64(&store, &meta, "durable_seq")?.unwrap_or(0);
        // Past `durable_seq`: a batch a crash cut before its fsync.
        let records = SegmentLog::open(&store, "segments", Some("records"), Some(durable + 1))?;
        let (tx, _) = watch::channel(durable);
        // Records are deleted only once applied: below the first one left,
        // everything is applied.
        let applied = match records.first_seq()? {
            Some(first) => first - 1,
            None => durable,
        };
        let boundary = last_boundary(&records, u64::MAX)?;
        Ok(Inbox {
            boundary: AtomicU64::new(boundary),
            full: false.into(),
            store,
            records,
            meta,
            relations,
            durable: tx,
            applied: watch::channel(applied).0,
            truncations: watch::channel(0).0,
            write: std::sync::Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.store.path
    }

    pub fn durable_seq(&self) -> u64 {
        *self.durable.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

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

    /// The sender spool this inbox holds records of (`None`: none yet).
    pub fn spool_id(&self) -> Result<Option<String>, StoreError> {
        let v = self
            .meta
            .get("spool_id")
            .map_err(|e| self.store.write_err(e))?;
        Ok(v.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Record the sender spool this inbox holds records of. Fsynced.
    pub fn set_spool_id(&self, spool: &str) -> Result<(), StoreError> {
        self.meta
            .insert("spool_id", spool.as_bytes())
            .map_err(|e| self.store.write_err(e))?;
        self.store.sync()
    }

    /// The certificate fingerprint of the sender that last welcomed this
    /// inbox (`None`: not recorded yet): apply's replication origin is
    /// named after it, so that a sender at this site can tell which of its
    /// receivers' sites a change came from.
    pub fn sender_fingerprint(&self) -> Result<Option<String>, StoreError> {
        let v = self
            .meta
            .get("sender_fingerprint")
            .map_err(|e| self.store.write_err(e))?;
        Ok(v.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Record the sender's fingerprint (when it changed). Fsynced.
    pub fn set_sender_fingerprint(&self, fingerprint: &str) -> Result<(), StoreError> {
        if self.sender_fingerprint()?.as_deref() == Some(fingerprint) {
            return Ok(());
        }
        self.meta
            .insert("sender_fingerprint", fingerprint.as_bytes())
            .map_err(|e| self.store.write_err(e))?;
        self.store.sync()
    }

    /// Highest seq applied to the target (and deleted here).
    pub fn applied_seq(&self) -> u64 {
        *self.applied.borrow()
    }

    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    pub fn subscribe_truncations(&self) -> watch::Receiver<u64> {
        self.truncations.subscribe()
    }

    /// The durable mark as a [`Synced`] value: it is published only after
    /// the fsync of what it covers (by [`Inbox::store_batch`],
    /// [`Inbox::truncate_from`] and [`Inbox::reset_to_seed`]).
    pub fn synced_seq(&self) -> Synced<u64> {
        Synced::after_sync(self.durable_seq())
    }

    /// Store records `first_seq..` (already checksum-verified), fsync, and
    /// only then publish the new durable mark. Returns the mark, or `None`
    /// if `first_seq` no longer follows the durable mark (the inbox was
    /// truncated meanwhile): nothing is stored. Blocks on the fsync.
    pub fn store_batch(
        &self,
        first_seq: u64,
        records: &[Vec<u8>],
    ) -> Result<Option<Synced<u64>>, StoreError> {
        let _write = self.write.lock().expect("inbox write lock");
        let durable = self.durable_seq();
        if first_seq != durable + 1 {
            return Ok(None);
        }
        self.records.put(first_seq, records)?;
        // The records' files first: the mark must not reach the disk before
        // what it covers (sled writes its log when it likes).
        self.records.sync_files()?;
        let last = first_seq + records.len() as u64 - 1;
        put_u64(&self.store, &self.meta, "durable_seq", last)?;
        self.store.sync()?;
        if let Some(i) = records.iter().rposition(|r| is_last(r)) {
            self.boundary
                .fetch_max(first_seq + i as u64, Ordering::Relaxed);
        }
        self.durable.send_replace(last);
        Ok(Some(Synced::after_sync(last)))
    }

    /// Drop record `seq` (found corrupt before apply) and everything after
    /// it, and lower the durable mark below it, fsynced: the sender ships
    /// them again on the next connection ([`Dropped::Refetch`]).
    ///
    /// Never at or below the applied mark: the sender was told those are
    /// applied and may have trimmed them, so an inbox lowered there would be
    /// refused for ever. Such a record (back after a crash undid its delete)
    /// is already applied: it alone is deleted ([`Dropped::Applied`]) and
    /// the durable mark stays.
    pub fn truncate_from(&self, seq: u64) -> Result<Dropped, StoreError> {
        if seq <= self.applied_seq() {
            self.drop_applied(seq)?;
            return Ok(Dropped::Applied);
        }
        let _write = self.write.lock().expect("inbox write lock");
        self.records.truncate_from(seq)?;
        let durable = seq.saturating_sub(1).min(self.durable_seq());
        put_u64(&self.store, &self.meta, "durable_seq", durable)?;
        self.store.sync()?;
        let boundary = last_boundary(&self.records, seq)?;
        self.boundary.store(boundary, Ordering::Relaxed);
        self.durable.send_replace(durable);
        self.truncations.send_modify(|n| *n += 1);
        Ok(Dropped::Refetch)
    }

    /// Delete record `seq`, known applied (the target's progress row covers
    /// it) though still here (back after a crash undid its delete), and
    /// everything before it; the applied mark moves up to it.
    pub fn drop_applied(&self, seq: u64) -> Result<(), StoreError> {
        self.delete_through(seq)
    }

    /// After a seed import: the inbox belongs to `source` and holds
    /// everything through `seq` (the seed's marker), so the sender ships
    /// from `seq + 1`. Older records are removed. Fsynced.
    pub fn reset_to_seed(&self, source: &str, seq: u64) -> Result<(), StoreError> {
        self.records.reset(seq)?;
        put_u64(&self.store, &self.meta, "durable_seq", seq)?;
        self.store.sync()?;
        self.boundary.store(seq, Ordering::Relaxed);
        // Nothing at or below `seq` is ours to apply: count it as applied.
        self.applied.send_replace(seq);
        self.durable.send_replace(seq);
        // Last: apply starts once the inbox has a source, and must then see
        // the new position.
        self.set_source(source)
    }

    /// The record at `seq`, if stored.
    pub fn get(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.records.get(seq)
    }

    /// Lowest stored seq.
    pub fn first_seq(&self) -> Result<Option<u64>, StoreError> {
        self.records.first_seq()
    }

    /// Delete records up to `seq` after they were applied (not synced: a
    /// record that reappears after a crash is skipped by the progress mark).
    pub fn delete_through(&self, seq: u64) -> Result<(), StoreError> {
        self.records.trim_through(seq)?;
        self.applied.send_if_modified(|a| {
            let moved = seq > *a;
            *a = (*a).max(seq);
            moved
        });
        Ok(())
    }

    /// Bytes of the records stored.
    pub fn bytes(&self) -> u64 {
        self.records.depth().1
    }

    /// Whether the inbox holds the last record of a transaction not yet
    /// applied (apply can commit it and free room).
    pub fn holds_complete_transaction(&self) -> bool {
        self.boundary.load(Ordering::Relaxed) > self.applied_seq()
    }

    /// Whether the transaction of record `seq` is whole in the inbox (its
    /// last record is stored).
    pub fn is_whole_through(&self, seq: u64) -> bool {
        self.boundary.load(Ordering::Relaxed) >= seq
    }

    /// Whether ingest is holding batches back at `inbox-max-bytes`.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::Relaxed);
    }

    pub fn save_relation(&self, oid: u32, message: &[u8]) -> Result<(), StoreError> {
        self.relations
            .insert(oid.to_be_bytes(), message)
            .map_err(|e| self.store.write_err(e))?;
        Ok(())
    }

    pub fn relations(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.relations
            .iter()
            .values()
            .map(|v| v.map(|v| v.to_vec()).map_err(|e| self.store.write_err(e)))
            .collect()
    }

    /// Records stored (not yet deleted) and their bytes: counters kept by
    /// every write, counted from the store when it opens.
    pub fn depth(&self) -> (u64, u64) {
        self.records.depth()
    }

    pub fn sync(&self) -> Result<(), StoreError> {
        self.store.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Open again after a drop: sled's background thread may hold the file
    /// lock for a moment after the last handle is dropped.
    fn reopen(path: &std::path::Path) -> Inbox {
        for _ in 0..100 {
            if let Ok(inbox) = Inbox::open(path, 1 << 20) {
                return inbox;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Inbox::open(path, 1 << 20).unwrap()
    }

    #[test]
    fn a_malformed_record_key_is_an_error_never_boundary_zero() {
        let dir = tempfile::tempdir().unwrap();
        {
            let inbox = Inbox::open(dir.path(), 1 << 20).unwrap();
            // A key that is not 8 bytes, holding a transaction's last record.
            let segments = inbox.store.tree("segments.index").unwrap();
            segments.insert(b"bad", record(1, true)).unwrap();
            inbox.sync().unwrap();
        }
        let mut last = None;
        for _ in 0..100 {
            match Inbox::open(dir.path(), 1 << 20) {
                Err(StoreError::Open { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                other => {
                    last = Some(other);
                    break;
                }
            }
        }
        assert!(
            matches!(last, Some(Err(StoreError::Corrupt { .. }))),
            "a malformed key was read as a boundary: {:?}",
            last.map(|r| r.map(|i| i.durable_seq()))
        );
    }

    #[test]
    fn stored_batches_survive_reopen_and_deletes_follow_apply() {
        let dir = tempfile::tempdir().unwrap();
        {
            let inbox = Inbox::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(
                inbox
                    .store_batch(1, &[b"a".to_vec(), b"b".to_vec()])
                    .unwrap(),
                Some(Synced::after_sync(2))
            );
            assert_eq!(
                inbox.store_batch(3, &[b"c".to_vec()]).unwrap(),
                Some(Synced::after_sync(3))
            );
            assert_eq!(inbox.store_batch(5, &[b"e".to_vec()]).unwrap(), None);
            assert_eq!(inbox.depth(), (3, 3));
            inbox.delete_through(1).unwrap();
            assert_eq!(inbox.depth(), (2, 2));
        }
        let inbox = reopen(dir.path());
        assert_eq!(inbox.depth(), (2, 2), "counted again on open");
        assert_eq!(inbox.durable_seq(), 3);
        assert_eq!(inbox.first_seq().unwrap(), Some(2));
        assert_eq!(inbox.get(3).unwrap().as_deref(), Some(&b"c"[..]));
        assert_eq!(inbox.applied_seq(), 1, "deleted records were applied");
    }

    #[test]
    fn truncation_drops_a_record_and_all_after_it_and_lowers_the_durable_mark() {
        let dir = tempfile::tempdir().unwrap();
        {
            let inbox = Inbox::open(dir.path(), 1 << 20).unwrap();
            let recs: Vec<Vec<u8>> = (1..=5).map(|i| vec![i as u8]).collect();
            inbox.store_batch(1, &recs).unwrap();
            inbox.delete_through(1).unwrap();
            let t = inbox.subscribe_truncations();
            inbox.truncate_from(3).unwrap();
            assert!(t.has_changed().unwrap());
            assert_eq!(inbox.durable_seq(), 2);
            assert_eq!(inbox.get(3).unwrap(), None);
            assert_eq!(inbox.get(2).unwrap(), Some(vec![2]));
            assert_eq!(inbox.depth(), (1, 1), "1 deleted, 3..=5 dropped");
            // The sender ships them again from 3.
            assert_eq!(
                inbox.store_batch(3, &[vec![3]]).unwrap(),
                Some(Synced::after_sync(3))
            );
        }
        let inbox = reopen(dir.path());
        assert_eq!(inbox.durable_seq(), 3);
        assert_eq!(inbox.get(4).unwrap(), None);
    }

    fn record(seq: u64, last: bool) -> Vec<u8> {
        pgcourier_proto::record::Record {
            seq,
            only_for: None,
            commit_lsn: pgcourier_proto::Lsn(seq * 100),
            commit_time: 0,
            xid: 1,
            part: 0,
            last,
            end_lsn: pgcourier_proto::Lsn(0),
            pieces: Vec::new(),
        }
        .encode()
        .unwrap()
    }

    #[test]
    fn the_inbox_knows_whether_it_holds_a_whole_transaction_apply_can_commit() {
        let dir = tempfile::tempdir().unwrap();
        {
            let inbox = Inbox::open(dir.path(), 1 << 20).unwrap();
            assert!(!inbox.holds_complete_transaction());
            inbox
                .store_batch(1, &[record(1, false), record(2, false)])
                .unwrap();
            assert!(!inbox.holds_complete_transaction(), "only a start");
            assert!(!inbox.is_whole_through(1));
            inbox
                .store_batch(3, &[record(3, true), record(4, false)])
                .unwrap();
            assert!(inbox.holds_complete_transaction());
            assert!(inbox.is_whole_through(1) && !inbox.is_whole_through(4));
            inbox.delete_through(3).unwrap();
            assert!(!inbox.holds_complete_transaction(), "applied");
        }
        let inbox = reopen(dir.path());
        assert!(!inbox.is_whole_through(4));
        assert!(!inbox.holds_complete_transaction());
        inbox.store_batch(5, &[record(5, true)]).unwrap();
        assert!(inbox.holds_complete_transaction());
        assert_eq!(inbox.truncate_from(5).unwrap(), Dropped::Refetch);
        assert!(
            !inbox.holds_complete_transaction(),
            "counted again after a truncation"
        );
    }

    #[test]
    fn a_corrupt_record_at_or_below_the_applied_mark_is_deleted_never_truncated_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::open(dir.path(), 1 << 20).unwrap();
        let recs: Vec<Vec<u8>> = (1..=5).map(|i| vec![i as u8]).collect();
        inbox.store_batch(1, &recs).unwrap();
        // Records 1..=3 applied; record 3 back (a crash undid its delete).
        inbox.delete_through(3).unwrap();
        inbox.records.put_back(3, &[3u8]).unwrap();
        let t = inbox.subscribe_truncations();
        assert_eq!(inbox.truncate_from(3).unwrap(), Dropped::Applied);
        assert!(
            !t.has_changed().unwrap(),
            "no refetch: ingest keeps its session"
        );
        assert_eq!(
            inbox.durable_seq(),
            5,
            "the durable mark never goes below applied"
        );
        assert_eq!(inbox.applied_seq(), 3);
        assert_eq!(inbox.get(3).unwrap(), None);
        assert_eq!(
            inbox.get(4).unwrap(),
            Some(vec![4]),
            "unapplied records stay"
        );
        assert_eq!(inbox.truncate_from(4).unwrap(), Dropped::Refetch);
        assert_eq!(inbox.durable_seq(), 3);
    }
}
