//! Records kept in segments: one sled key per run of consecutive records.
//!
//! The spool and the inbox each hold a dense sequence of encoded records,
//! every one carrying its own CRC-32 ([`Record`](pgcourier_proto::record)).
//! With one sled key per record, sled's per-key work (tree search, page
//! deltas, consolidation, deletes) was paid once per change and cost about
//! 40% of the sender's CPU and 45% of the receiver's (issue 13). A
//! [`SegmentLog`] packs consecutive records into segments of about
//! [`SEGMENT_BYTES`] and pays it once per segment.
//!
//! Why 4 KiB: sled 0.34 keeps large values in memory whatever its
//! `cache_capacity` (REFERENCE.md; measured here: with 32 KiB segments the
//! receiver held a 64 MiB value's 128 MiB of hex text, 161 MiB peak, against
//! 120 MiB with 4 KiB), while 4 KiB already packs about 25 single-row
//! transactions per key. A record larger than a segment (records are cut at
//! about 8 KiB, a large value's fragments at 16 KiB) is a segment alone.
//!
//! # Layout
//!
//! - Tree `<name>`: key = the segment's first seq (u64 big-endian), value =
//!   [`FORMAT`] (one byte), then for each record `[length: u32
//!   little-endian][the encoded record]`. Segments are dense and never
//!   overlap: each one's key is the previous one's key plus its record
//!   count. Written once; rewritten only to cut a segment short
//!   ([`SegmentLog::truncate_from`]).
//! - Tree `<name>.low`, key `low`: the highest seq deleted
//!   ([`SegmentLog::trim_through`]). Records at or below it are gone even
//!   while the segment that holds them still holds later ones; a segment is
//!   removed once all of its records are. Written with each trim and not
//!   fsynced by itself: after a crash, records at or below the real mark
//!   may come back, as a delete a crash undid always could (the spool
//!   ships from each receiver's own mark; apply skips what its progress
//!   row covers).
//!
//! Records appended and not yet written ([`SegmentLog::append`]) wait in
//! memory, at most one segment, until the segment is full or the owner
//! calls [`SegmentLog::write_pending`] (before its fsync). Reads parse one
//! segment and keep it: reading record after record costs one sled lookup
//! per segment. Memory: the pending segment and the one kept for reading,
//! each under `SEGMENT_BYTES` plus one record.
//!
//! Nothing here fsyncs: the owner calls [`Store::sync`] (invariants 1 and 2
//! are the owner's: the spool's commit, the inbox's batch).

use std::sync::Mutex;

use crate::store::durable::{key_seq, seq_key, Store, StoreError};

/// A segment is written once its records reach this many bytes.
pub const SEGMENT_BYTES: usize = 4 << 10;

/// First byte of every segment value: the layout above.
const FORMAT: u8 = 1;

/// Key of the low mark in tree `<name>.low`.
const LOW_KEY: &[u8] = b"low";

pub struct SegmentLog {
    store: Store,
    name: String,
    tree: sled::Tree,
    low_tree: sled::Tree,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Records appended and not yet in the tree.
    pending: Pending,
    /// Highest seq deleted: nothing at or below it is read.
    low: u64,
    /// Highest seq stored (pending included); `low` when none is.
    last: u64,
    /// Records stored above `low` (pending included), and their bytes.
    count: u64,
    bytes: u64,
    /// The segment read last, parsed.
    cached: Option<Parsed>,
    /// Counts rewrites and removals of segments that may be read
    /// ([`SegmentLog::truncate_from`], [`SegmentLog::reset`]): a read that
    /// began before one does not keep what it read.
    rewrites: u64,
}

#[derive(Default)]
struct Pending {
    first: u64,
    count: u64,
    /// The segment value being built (starts with [`FORMAT`]).
    value: Vec<u8>,
}

/// A segment value and where each record lies in it.
struct Parsed {
    first: u64,
    value: sled::IVec,
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

    /// Bytes of the records from `from` on.
    fn bytes_from(&self, from: u64) -> u64 {
        let skip = from.saturating_sub(self.first) as usize;
        self.spans.iter().skip(skip).map(|s| s.1 as u64).sum()
    }
}

/// The spans of the records in a segment value; `None` if it is not one.
fn spans(value: &[u8]) -> Option<Vec<(usize, usize)>> {
    if value.first() != Some(&FORMAT) {
        return None;
    }
    let mut out = Vec::new();
    let mut at = 1;
    while at < value.len() {
        let len = u32::from_le_bytes(value.get(at..at + 4)?.try_into().ok()?) as usize;
        let start = at + 4;
        if value.len() - start < len {
            return None;
        }
        out.push((start, len));
        at = start + len;
    }
    (!out.is_empty()).then_some(out)
}

impl SegmentLog {
    /// Open the log in trees `<name>` and `<name>.low` of `store`, checking
    /// every segment (format, density) and counting its records. Records a
    /// store of an earlier version kept one per key in tree `legacy` are
    /// moved into segments first, fsynced. Records from `tail_from` on are
    /// an unfinished tail the owner never made durable (the spool's past
    /// `complete_seq`, the inbox's past `durable_seq`): they are removed
    /// before the segments are checked, since a crash may have left any
    /// part of them.
    pub fn open(
        store: &Store,
        name: &str,
        legacy: Option<&str>,
        tail_from: Option<u64>,
    ) -> Result<SegmentLog, StoreError> {
        let log = SegmentLog {
            store: store.clone(),
            name: name.into(),
            tree: store.tree(name)?,
            low_tree: store.tree(&format!("{name}.low"))?,
            inner: Mutex::new(Inner {
                pending: Pending::default(),
                low: 0,
                last: 0,
                count: 0,
                bytes: 0,
                cached: None,
                rewrites: 0,
            }),
        };
        if let Some(legacy) = legacy {
            log.migrate(legacy)?;
        }
        if let Some(from) = tail_from {
            let (dropped, _) = log.cut_tail(from)?;
            if dropped > 0 {
                tracing::info!(store = %store.path.display(), dropped, from, "removed the records of a batch never made durable (cut by a stop); they will come again");
            }
        }
        log.recount()?;
        Ok(log)
    }

    /// Move records kept one per key (key = seq, value = record) in tree
    /// `legacy` into segments: written and fsynced before the old keys are
    /// removed (and fsynced). A crash between the two leaves both; the next
    /// open starts over from the old keys.
    fn migrate(&self, legacy: &str) -> Result<(), StoreError> {
        let old = self.store.tree(legacy)?;
        if old.is_empty() {
            return Ok(());
        }
        self.tree.clear().map_err(|e| self.store.write_err(e))?;
        self.low_tree.clear().map_err(|e| self.store.write_err(e))?;
        let mut moved = 0u64;
        for item in old.iter() {
            let (k, v) = item.map_err(|e| self.store.write_err(e))?;
            let seq = key_seq(&k)
                .filter(|&s| s > 0)
                .ok_or_else(|| self.corrupt(&format!("{legacy}/{k:?}")))?;
            if moved == 0 {
                // Everything before the first record kept was deleted.
                self.set_low(seq - 1)?;
                self.inner.lock().expect("segment log lock").low = seq - 1;
            } else if seq != self.inner.lock().expect("segment log lock").last + 1 {
                return Err(self.corrupt(&format!("{legacy}/{seq} (records are not dense)")));
            }
            self.append(seq, &v)?;
            moved += 1;
        }
        self.write_pending()?;
        self.store.sync()?;
        old.clear().map_err(|e| self.store.write_err(e))?;
        self.store.sync()?;
        tracing::info!(store = %self.store.path.display(), records = moved, "moved the records of an earlier version's store into segments");
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

    /// Read the low mark and count what every segment holds above it.
    fn recount(&self) -> Result<(), StoreError> {
        let low = match self
            .low_tree
            .get(LOW_KEY)
            .map_err(|e| self.store.write_err(e))?
        {
            Some(v) => key_seq(&v).ok_or_else(|| self.corrupt(&format!("{}.low", self.name)))?,
            None => 0,
        };
        let (mut count, mut bytes, mut next) = (0u64, 0u64, None::<u64>);
        for item in self.tree.iter() {
            let (k, v) = item.map_err(|e| self.store.write_err(e))?;
            let seg = self.parse(&k, v)?;
            if next.is_some_and(|n| n != seg.first) {
                return Err(self.corrupt(&format!(
                    "{}/{} (segments are not dense: expected {})",
                    self.name,
                    seg.first,
                    next.unwrap_or(0)
                )));
            }
            next = Some(seg.last() + 1);
            if seg.last() <= low {
                // Trimmed whole, its removal lost by a crash.
                self.tree.remove(&k).map_err(|e| self.store.write_err(e))?;
                continue;
            }
            let from = seg.first.max(low + 1);
            if from <= seg.last() {
                count += seg.last() + 1 - from;
                bytes += seg.bytes_from(from);
            }
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

    fn parse(&self, key: &[u8], value: sled::IVec) -> Result<Parsed, StoreError> {
        let first = key_seq(key).ok_or_else(|| self.corrupt(&format!("{}/{key:?}", self.name)))?;
        let spans = spans(&value).ok_or_else(|| self.corrupt(&format!("{}/{first}", self.name)))?;
        Ok(Parsed {
            first,
            value,
            spans,
        })
    }

    /// Append one encoded record at `seq`: the next after the last stored,
    /// or any seq above the low mark when nothing is stored. Written to the
    /// tree when its segment is full; not durable until the owner's fsync.
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
        if inner.pending.value.len() >= SEGMENT_BYTES {
            self.write_pending_locked(&mut inner)?;
        }
        Ok(())
    }

    /// Append records `first..` and write them to the tree (one or more
    /// segments). Not durable until the owner's fsync.
    pub fn put(&self, first: u64, records: &[Vec<u8>]) -> Result<(), StoreError> {
        for (i, r) in records.iter().enumerate() {
            self.append(first + i as u64, r)?;
        }
        self.write_pending()
    }

    /// Write the records appended so far to the tree (not fsynced).
    pub fn write_pending(&self) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().expect("segment log lock");
        self.write_pending_locked(&mut inner)
    }

    fn write_pending_locked(&self, inner: &mut Inner) -> Result<(), StoreError> {
        if inner.pending.count == 0 {
            return Ok(());
        }
        let p = std::mem::take(&mut inner.pending);
        self.tree
            .insert(seq_key(p.first), p.value)
            .map_err(|e| self.store.write_err(e))?;
        Ok(())
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
        match self.tree.first().map_err(|e| self.store.write_err(e))? {
            Some((k, _)) => {
                let first =
                    key_seq(&k).ok_or_else(|| self.corrupt(&format!("{}/{k:?}", self.name)))?;
                Ok(Some(first.max(low + 1)))
            }
            None => Ok(pending_first),
        }
    }

    /// The segment in the tree holding `seq`, read and parsed (the read
    /// cache is [`SegmentLog::get`]'s); `None` if none holds it.
    fn segment(&self, seq: u64) -> Result<Option<Parsed>, StoreError> {
        let found = self
            .tree
            .range(..=seq_key(seq))
            .next_back()
            .transpose()
            .map_err(|e| self.store.write_err(e))?;
        let Some((k, v)) = found else {
            return Ok(None);
        };
        let seg = self.parse(&k, v)?;
        Ok(seg.holds(seq).then_some(seg))
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
    /// memory, walking the records on the shorter side of `seq`.
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
        let start = match self.segment(from)? {
            Some(seg) => seg.first,
            None => from,
        };
        for item in self.tree.range(seq_key(start)..=seq_key(to)) {
            let (k, v) = item.map_err(|e| self.store.write_err(e))?;
            let first = key_seq(&k).ok_or_else(|| self.corrupt(&format!("{}/{k:?}", self.name)))?;
            if pending_first.is_some_and(|p| first >= p) {
                break;
            }
            bytes += walk(&v, first, from, to)
                .ok_or_else(|| self.corrupt(&format!("{}/{first}", self.name)))?;
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
        let start = match self.segment(old_low + 1)? {
            Some(seg) => seg.first,
            None => old_low + 1,
        };
        for item in self.tree.range(seq_key(start)..) {
            let (k, v) = item.map_err(|e| self.store.write_err(e))?;
            let seg = self.parse(&k, v)?;
            if seg.first > new_low {
                break;
            }
            let from = seg.first.max(old_low + 1);
            let to = seg.last().min(new_low);
            count += to + 1 - from;
            bytes += seg.bytes_from(from) - seg.bytes_from(to + 1);
            if seg.last() <= new_low {
                self.tree.remove(&k).map_err(|e| self.store.write_err(e))?;
            }
        }
        inner.low = new_low;
        inner.count -= count;
        inner.bytes -= bytes;
        self.set_low(new_low)?;
        Ok(count)
    }

    /// Delete record `seq` and every one after it (pending included); a
    /// segment that holds records before it is rewritten without the rest.
    /// Not fsynced. Returns how many records were deleted.
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

    /// Remove the segments from `from` on, the last first, then cut short
    /// the one that holds records before it: whatever prefix of these
    /// writes a crash keeps, the segments left are dense. Returns the
    /// records and bytes removed.
    fn cut_tail(&self, from: u64) -> Result<(u64, u64), StoreError> {
        let (mut records, mut bytes) = (0u64, 0u64);
        let tail: Vec<sled::IVec> = self
            .tree
            .range(seq_key(from)..)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| self.store.write_err(e))?;
        for k in tail.iter().rev() {
            if let Some(v) = self.tree.get(k).map_err(|e| self.store.write_err(e))? {
                let seg = self.parse(k, v)?;
                records += seg.spans.len() as u64;
                bytes += seg.bytes_from(seg.first);
            }
            self.tree.remove(k).map_err(|e| self.store.write_err(e))?;
        }
        let before = self
            .tree
            .range(..seq_key(from))
            .next_back()
            .transpose()
            .map_err(|e| self.store.write_err(e))?;
        if let Some((k, v)) = before {
            let seg = self.parse(&k, v)?;
            if seg.last() >= from {
                records += seg.last() + 1 - from;
                bytes += seg.bytes_from(from);
                let mut kept = Pending::default();
                for s in seg.first..from {
                    push(&mut kept, s, seg.record(s));
                }
                self.tree
                    .insert(&k, kept.value)
                    .map_err(|e| self.store.write_err(e))?;
            }
        }
        Ok((records, bytes))
    }

    /// Delete every record; the low mark becomes `low` (the next record
    /// appended is above it). Not fsynced.
    pub fn reset(&self, low: u64) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().expect("segment log lock");
        self.tree.clear().map_err(|e| self.store.write_err(e))?;
        self.set_low(low)?;
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
        for item in self.tree.range(..seq_key(below)).rev() {
            let (k, v) = item.map_err(|e| self.store.write_err(e))?;
            let seg = self.parse(&k, v)?;
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
    /// lowered below it. For fault tests, on a store no daemon has open.
    #[doc(hidden)]
    pub fn put_back(&self, seq: u64, record: &[u8]) -> Result<(), StoreError> {
        self.write_pending()?;
        let held = self.segment(seq)?;
        let mut seg = Pending::default();
        match held {
            Some(old) => {
                for s in old.first..=old.last() {
                    push(&mut seg, s, if s == seq { record } else { old.record(s) });
                }
            }
            None => push(&mut seg, seq, record),
        }
        self.tree
            .insert(seq_key(seg.first), seg.value)
            .map_err(|e| self.store.write_err(e))?;
        let low = self.inner.lock().expect("segment log lock").low;
        if seq <= low {
            self.set_low(seq - 1)?;
        }
        self.recount()
    }
}

/// Bytes of the records `from..=to` in segment `value` (whose first record
/// is `first`), read without copying; `None` if it is not a segment.
fn walk(value: &[u8], first: u64, from: u64, to: u64) -> Option<u64> {
    if value.first() != Some(&FORMAT) {
        return None;
    }
    let (mut at, mut seq, mut bytes) = (1, first, 0u64);
    while at < value.len() && seq <= to {
        let len = u32::from_le_bytes(value.get(at..at + 4)?.try_into().ok()?) as usize;
        if value.len() - (at + 4) < len {
            return None;
        }
        if seq >= from {
            bytes += len as u64;
        }
        at += 4 + len;
        seq += 1;
    }
    Some(bytes)
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

    /// sled's background thread may hold the file lock for a moment after
    /// the last handle is dropped.
    fn reopen(dir: &std::path::Path) -> (Store, SegmentLog) {
        for _ in 0..100 {
            if let Ok(store) = Store::open(dir, 1 << 20) {
                let log = SegmentLog::open(&store, "segments", Some("records"), None).unwrap();
                return (store, log);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        open(dir)
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
            let n = log.tree.len();
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
            let segments = log.tree.len();
            // Mid-segment: the segment stays, its first records are gone.
            assert_eq!(log.trim_through(3).unwrap(), 3);
            assert_eq!(log.get(3).unwrap(), None);
            assert_eq!(log.get(4).unwrap().as_ref(), Some(&want[3]));
            assert_eq!(log.first_seq().unwrap(), Some(4));
            assert_eq!(log.tree.len(), segments);
            assert_eq!(log.trim_through(2).unwrap(), 0, "already trimmed");
            assert_eq!(log.trim_through(700).unwrap(), 697);
            assert!(log.tree.len() < segments, "whole segments are removed");
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
            log.tree.remove(seq_key(5)).unwrap();
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

    #[test]
    fn a_bad_segment_or_a_gap_between_segments_is_a_named_error() {
        for bad in ["format", "length", "gap", "key"] {
            let dir = tempfile::tempdir().unwrap();
            {
                let (store, log) = open(dir.path());
                log.put(1, &[rec(1, 20), rec(2, 20)]).unwrap();
                log.put(3, &[rec(3, 20)]).unwrap();
                match bad {
                    "format" => log.tree.insert(seq_key(3), &[9u8, 1, 0, 0, 0, 7][..]),
                    "length" => log.tree.insert(seq_key(3), &[FORMAT, 200, 0, 0, 0, 7][..]),
                    "gap" => log
                        .tree
                        .insert(seq_key(4), log.tree.remove(seq_key(3)).unwrap().unwrap()),
                    _ => log.tree.insert(b"x", &[FORMAT][..]),
                }
                .unwrap();
                store.sync().unwrap();
            }
            let mut got = None;
            for _ in 0..100 {
                match Store::open(dir.path(), 1 << 20) {
                    Ok(store) => {
                        got = Some(SegmentLog::open(&store, "segments", None, None).map(|_| ()));
                        break;
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
            match got {
                Some(Err(StoreError::Corrupt { key, .. })) => {
                    assert!(key.starts_with("segments/"), "{bad}: {key}")
                }
                other => panic!("{bad}: opened: {other:?}"),
            }
        }
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
