//! The capture cutter: pgoutput messages from the slot's stream in, spool
//! records out. Step 2 of a change's path (WAL → **records** → spool →
//! ship → inbox → apply); the sender's `capture/stream.rs` is its driver: it
//! feeds each message of the stream here, appends the records this returns
//! to the spool, and at the end of each batch of whole transactions
//! ([`Cutter::take_summary`]) commits (fsync) and confirms the position to
//! the source.
//!
//! Pure: no I/O, no clock. Everything the cutter knows comes in as values
//! (message bytes, the spool's next sequence number, the commit LSN already
//! spooled, the tables' copy state, the pending cut).
//!
//! What it decides, in the order the stream's messages meet it:
//! - **Begin** opens a transaction. One whose commit LSN is at or below
//!   `skip_through` (what the spool already holds: the slot lagged behind
//!   the spool after a crash) is read through and *skipped*. With a cut
//!   pending at L, one whose commit LSN is at or after L is read through and
//!   left *after the cut* ([`Cutter::before_cut`]): it follows the copy.
//! - **Changes** are filtered against [`Tables`]: a Relation for a table
//!   neither synced nor waiting makes it wait for a copy; Relations,
//!   Inserts, Updates and Deletes of a waiting table are left out (the
//!   copy's snapshot holds them); a Truncate keeps only its relations that
//!   are not waiting. Tables of pgcourier's own schema ([`OWN_SCHEMA`]:
//!   the DDL key at the source, bookkeeping) are never carried, whatever
//!   the publication says. Everything else (Relations of other tables,
//!   Types, Origins) is kept, in order.
//! - **Origin**: a transaction whose Origin message (right after Begin)
//!   names one of pgcourier's replication origins ([`ORIGIN_PREFIX`] and
//!   the certificate fingerprint of the sender that shipped it) was
//!   written by a receiver's apply at this site: it came from another
//!   site. When that site is one of this sender's receivers and there are
//!   others ([`Cutter::with_forwarding`]: headquarters, forwarding a
//!   branch's change to the other branches) it is cut as usual, addressed
//!   to every receiver but that one ([`crate::record::NOT_FOR`]), without
//!   the Origin message; counted in [`BatchSummary::forwarded`]. Otherwise
//!   (a branch, whose only receiver is the site the change came from) its
//!   changes, messages and the Origin are left out, counted in
//!   [`BatchSummary::looped`]; its Relations and Types are kept (pgoutput
//!   sends them once per stream, and a later local transaction needs
//!   them). Either way a change never goes back to the site it came from.
//!   Other origins (PostgreSQL's own subscriptions) are carried.
//! - **Logical messages**: only transactional ones with the prefix
//!   [`DDL_PREFIX`] or [`CLOCK_PREFIX`] whose signature verifies with the
//!   source's DDL key
//!   ([`Cutter::with_ddl_key`]) are kept, without the signature. Any role
//!   at the source may call `pg_logical_emit_message`: other applications'
//!   messages (transactional or not, the latter arriving between
//!   transactions) are left out, counted in
//!   [`BatchSummary::foreign_messages`], and a `pgcourier.ddl` message that
//!   does not verify (forged: the branch would run its statement) is left
//!   out and counted in [`BatchSummary::forged_ddl`].
//! - Kept messages are cut into records by [`TxnCutter`] (≤ 8 KiB plus one
//!   message; fragments of 16 KiB for bigger messages).
//! - **Commit** closes the transaction with its `end_lsn` on the last
//!   record. A transaction with nothing kept is *dropped*: no record, but
//!   its commit still counts for the spool's marks.
//! - Anything out of order (a change outside a transaction, Begin inside
//!   one, a Commit whose LSN differs from its Begin's, a batch that ends
//!   inside a transaction, an empty message) is a [`CutError`].

mod txn;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::pgoutput::{self, DecodeError, Message};
use crate::record::Record;
use crate::Lsn;

pub use txn::{TxnCutter, TxnHead};

/// The prefix of the logical messages that carry DDL
/// (`pgcourier_common::pg::ddl`).
pub const DDL_PREFIX: &str = "pgcourier.ddl";

/// The prefix of the logical messages that carry a row's clock, for
/// tables written at several sites (`pgcourier_common::pg::conflict`);
/// signed and kept as DDL messages are.
pub const CLOCK_PREFIX: &str = "pgcourier.clock";

/// pgcourier's schema at both sites: its tables are never carried.
pub const OWN_SCHEMA: &str = "pgcourier";

/// How the replication origins a receiver's apply writes under begin
/// (`pgcourier/<fingerprint of the sender that shipped it>`, or
/// `pgcourier/<source>` for an inbox that has not recorded its sender's
/// fingerprint): transactions carrying one are never sent back.
pub const ORIGIN_PREFIX: &str = "pgcourier/";

/// Hex characters of the signature that opens a DDL message's content.
const MAC_HEX: usize = 64;

/// HMAC-SHA256 of `content` under `key` (RFC 2104), as the source's
/// trigger computes it in SQL (`pgcourier.ddl_emit`).
pub fn ddl_mac(key: &[u8], content: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(content)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// The content of a signed DDL message without its signature, when the
/// signature (64 lowercase hex characters before the JSON) verifies.
pub fn verify_ddl(key: &[u8], content: &[u8]) -> Option<Vec<u8>> {
    if content.len() < MAC_HEX {
        return None;
    }
    let (hex, body) = content.split_at(MAC_HEX);
    let expected = ddl_mac(key, body);
    let mut diff = 0u8;
    for (i, want) in expected.iter().enumerate() {
        let pair = std::str::from_utf8(&hex[2 * i..2 * i + 2]).ok()?;
        let got = u8::from_str_radix(pair, 16).ok()?;
        diff |= got ^ want;
    }
    (diff == 0).then(|| body.to_vec())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CutError {
    #[error("pgoutput message from the slot does not decode")]
    Decode(#[from] DecodeError),
    #[error("pgoutput stream out of order: {0}")]
    OutOfOrder(&'static str),
}

/// Which published tables the branches hold the rows of. The two sets are
/// disjoint; a table in neither (not published when capture started) is
/// carried as it comes until its Relation makes it wait.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tables {
    /// Copied, or present before with `initial-copy = false`: their changes
    /// are carried.
    pub synced: BTreeSet<u32>,
    /// Waiting for a copy (or being copied): their changes are left out.
    pub waiting: BTreeSet<u32>,
}

/// What one message did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fed {
    /// Records closed by this message, in sequence order: append them.
    pub records: Vec<Record>,
    /// A Relation for a table new to the stream: it was added to
    /// `Tables::waiting`, which must be made durable with the next commit.
    pub new_table: Option<u32>,
}

/// Why feeding a message stopped: the cutter's error, or the caller's
/// (kept by [`Cutter::message_each`]).
enum Stop {
    Cut(CutError),
    Stopped,
}

impl From<CutError> for Stop {
    fn from(e: CutError) -> Stop {
        Stop::Cut(e)
    }
}

impl From<DecodeError> for Stop {
    fn from(e: DecodeError) -> Stop {
        Stop::Cut(e.into())
    }
}

/// What [`Cutter::message_each`] counts of one message.
#[derive(Default)]
struct FedEach {
    records: u64,
    new_table: Option<u32>,
}

/// Counts and positions of one batch, for the spool commit, the slot and
/// status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchSummary {
    /// Messages fed, Begin and Commit included.
    pub messages: u64,
    /// Transactions cut into records.
    pub transactions: u64,
    /// Records returned.
    pub records: u64,
    /// Transactions already in the spool (commit LSN ≤ `skip_through`).
    pub skipped: u64,
    /// Transactions whose every change was left to a pending copy.
    pub dropped: u64,
    /// Commit LSN of the last transaction cut or dropped (not skipped).
    pub last_commit: Lsn,
    /// Highest end LSN of any transaction seen, skipped ones included.
    pub last_end: Lsn,
    /// Transactions committing at or after the pending cut, left for the
    /// stream after the splice.
    pub after_cut: u64,
    /// Other applications' logical messages left out.
    pub foreign_messages: u64,
    /// `pgcourier.ddl` messages left out because their signature did not
    /// verify (or no DDL key was given).
    pub forged_ddl: u64,
    /// Transactions a receiver's apply wrote here (their origin is one of
    /// pgcourier's): their changes left out, so they are not sent back.
    pub looped: u64,
    /// Transactions a receiver's apply wrote here from the site of one of
    /// this sender's receivers: cut for every receiver but that one.
    pub forwarded: u64,
    /// Changes to tables this site does not ship ([`Cutter::only_tables`]:
    /// a branch ships its two-way tables only), left out, by table.
    pub one_way: BTreeMap<String, u64>,
}

impl BatchSummary {
    /// Whether the spool must commit (fsync) this batch's work: something
    /// was cut, or a dropped transaction moves the spool's marks.
    pub fn needs_commit(&self) -> bool {
        self.transactions > 0 || self.dropped > 0
    }
}

enum Open {
    /// Between transactions.
    Idle,
    /// Inside a transaction the spool already holds.
    Skipping,
    /// Inside a transaction committing at or after the pending cut.
    AfterCut,
    /// Inside a transaction being cut.
    Cutting(TxnCutter),
    /// Inside a transaction a receiver's apply wrote (its origin is one of
    /// ours): only its Relations and Types are kept.
    Looped(TxnCutter),
}

/// Cuts the messages of one slot stream into records.
pub struct Cutter {
    next_seq: u64,
    skip_through: Lsn,
    cut: Option<Lsn>,
    open: Open,
    summary: BatchSummary,
    ddl_key: Option<Vec<u8>>,
    /// Relations of [`OWN_SCHEMA`] seen in this stream (pgoutput sends a
    /// relation's Relation before its first change in each stream).
    own: BTreeSet<u32>,
    /// The tables shipped (`schema.name`), when not all are
    /// ([`Cutter::only_tables`]).
    only: Option<BTreeSet<String>>,
    /// Tables never shipped (`schema.name`: [`Cutter::except_tables`]).
    except: BTreeSet<String>,
    /// Relations seen in this stream of tables not shipped, by name.
    one_way: BTreeMap<u32, String>,
    /// Origin names (after [`ORIGIN_PREFIX`]) of the sites of this
    /// sender's receivers, and the receiver at each.
    forward: BTreeMap<String, String>,
    /// Commit LSN of the last transaction spooled, skipped or spliced:
    /// a spliced transaction takes a commit LSN above it.
    last_commit: Lsn,
    /// No transaction still to come commits below this: the end of the
    /// last commit record read, or what the walsender said it has read
    /// ([`Cutter::saw_server_end`]).
    room_end: Lsn,
}

impl Cutter {
    /// A stream whose first record takes `next_seq` (the spool's), and whose
    /// transactions committing at or below `skip_through` (the spool's
    /// captured commit LSN) are already spooled.
    pub fn new(next_seq: u64, skip_through: Lsn) -> Cutter {
        Cutter {
            next_seq,
            skip_through,
            cut: None,
            open: Open::Idle,
            summary: BatchSummary::default(),
            ddl_key: None,
            own: BTreeSet::new(),
            only: None,
            except: BTreeSet::new(),
            one_way: BTreeMap::new(),
            forward: BTreeMap::new(),
            last_commit: skip_through,
            room_end: Lsn::ZERO,
        }
    }

    /// The spool holds everything that commits below `end` (its captured
    /// end LSN): no transaction of this stream commits below it.
    pub fn with_room_end(mut self, end: Lsn) -> Cutter {
        self.room_end = end;
        self
    }

    /// The walsender has read the WAL up to `end` (a keepalive): every
    /// transaction committing below it was delivered before. Only between
    /// transactions.
    pub fn saw_server_end(&mut self, end: Lsn) {
        if self.is_idle() && self.cut.is_none() {
            self.room_end = self.room_end.max(end);
        }
    }

    /// Splice a transaction of our own between the stream's transactions
    /// (a joining table's chunk, `store/join.rs`): `message` alone, with
    /// commit LSN one above the last transaction's and below any still to
    /// come, so the order rule and the exactly-once marker hold for it as
    /// for any. `only_for`: the one receiver it is for (a join made for a
    /// new receiver), as [`Record::only_for`]. `None`: no LSN is free
    /// between them (the WAL must move on first), or a transaction or a
    /// cut is open; nothing was cut.
    pub fn splice(
        &mut self,
        message: &[u8],
        commit_time: i64,
        only_for: Option<String>,
    ) -> Option<Vec<Record>> {
        let commit_lsn = Lsn(self.last_commit.0 + 1);
        // One LSN is left free below `room_end`: a copy cut taken next may
        // be as low as `room_end`, and its copy commits at the cut − 1.
        if !self.is_idle() || self.cut.is_some() || commit_lsn.0 + 1 >= self.room_end.0 {
            return None;
        }
        let mut txn = TxnCutter::new(
            self.next_seq,
            TxnHead {
                commit_lsn,
                commit_time,
                xid: 0,
                only_for,
            },
        );
        let mut records = txn.push(message);
        records.push(txn.finish(commit_lsn));
        self.next_seq += records.len() as u64;
        self.last_commit = commit_lsn;
        self.summary.messages += 1;
        self.summary.transactions += 1;
        self.summary.records += records.len() as u64;
        self.summary.last_commit = commit_lsn;
        // Everything committing below `room_end` was fed before: the
        // batch's end may stand there (never behind the spool's).
        self.summary.last_end = self.summary.last_end.max(self.room_end);
        Some(records)
    }

    /// Ship only these tables (`schema.name`): a branch's sender ships its
    /// two-way tables; a local write to any other table is left out and
    /// counted in [`BatchSummary::one_way`] (it is one-way, headquarters to
    /// the branches). `None`: every published table.
    pub fn only_tables(mut self, tables: Option<BTreeSet<String>>) -> Cutter {
        self.only = tables;
        self
    }

    /// Never ship these tables (`schema.name`): headquarters' sender and
    /// the tables written at the branches only (`direction = "up"`); a
    /// local write to one, or a branch's forwarded, is left out and
    /// counted in [`BatchSummary::one_way`] like the others.
    pub fn except_tables(mut self, tables: BTreeSet<String>) -> Cutter {
        self.except = tables;
        self
    }

    /// Forward what a receiver's apply wrote here from the site of one of
    /// this sender's receivers (`sites`: origin name after
    /// [`ORIGIN_PREFIX`] → receiver name) to every other receiver.
    pub fn with_forwarding(mut self, sites: BTreeMap<String, String>) -> Cutter {
        self.forward = sites;
        self
    }

    /// Keep the `pgcourier.ddl` messages signed with `key` (the source's
    /// `pgcourier.ddl_key`); without one every DDL message is left out.
    pub fn with_ddl_key(mut self, key: Option<Vec<u8>>) -> Cutter {
        self.ddl_key = key;
        self
    }

    /// A stream read with a cut pending at `cut`: only transactions
    /// committing before it are cut; those committing at or after it are
    /// read through and left for the stream after the splice (counted in
    /// [`BatchSummary::after_cut`]), which starts at L and so sends them
    /// again. A commit may start exactly at L (when the cut lies just past
    /// a WAL page header, L is where the next record goes): that
    /// transaction is not in the copy's snapshot, and the copy (commit LSN
    /// L − 1) must come before it.
    pub fn before_cut(mut self, cut: Option<Lsn>) -> Cutter {
        self.cut = cut;
        self
    }

    /// Sequence number the next record will take.
    pub fn next_seq(&self) -> u64 {
        match &self.open {
            Open::Cutting(txn) | Open::Looped(txn) => txn.next_seq(),
            Open::Idle | Open::Skipping | Open::AfterCut => self.next_seq,
        }
    }

    /// Feed one pgoutput message, as the stream delivered it.
    pub fn message(&mut self, data: &[u8], tables: &mut Tables) -> Result<Fed, CutError> {
        let mut records = Vec::new();
        let new_table = self.message_each(data, tables, |r| {
            records.push(r);
            Ok::<(), CutError>(())
        })?;
        Ok(Fed { records, new_table })
    }

    /// [`Self::message`], handing each record to `each` as soon as it is
    /// cut (in sequence order) instead of gathering them: a message of
    /// 100 MiB is then held once (the caller's bytes), not twice (invariant
    /// 5). Returns [`Fed::new_table`]. The first error from `each` is
    /// returned; the stream is then broken (the caller ends it, and its
    /// uncommitted records are dropped).
    pub fn message_each<E: From<CutError>>(
        &mut self,
        data: &[u8],
        tables: &mut Tables,
        mut each: impl FnMut(Record) -> Result<(), E>,
    ) -> Result<Option<u32>, E> {
        let mut failed = None;
        let result = self.feed(data, tables, &mut |record| {
            each(record).map_err(|e| {
                failed = Some(e);
                Stop::Stopped
            })
        });
        match (result, failed) {
            (_, Some(e)) => Err(e),
            (Ok(new_table), None) => Ok(new_table),
            (Err(Stop::Cut(e)), None) => Err(e.into()),
            (Err(Stop::Stopped), None) => unreachable!("stopped only with an error"),
        }
    }

    fn feed(
        &mut self,
        data: &[u8],
        tables: &mut Tables,
        each: &mut dyn FnMut(Record) -> Result<(), Stop>,
    ) -> Result<Option<u32>, Stop> {
        self.summary.messages += 1;
        let mut fed = FedEach::default();
        // Logical messages are decided before the transaction state: a
        // non-transactional one arrives between transactions.
        let replaced;
        let data = if data.first() == Some(&b'M') {
            match self.logical_message(data)? {
                Some(kept) if matches!(self.open, Open::Cutting(_)) => {
                    replaced = kept;
                    &replaced[..]
                }
                Some(_) if matches!(self.open, Open::Idle) => {
                    return Err(Stop::from(CutError::OutOfOrder(
                        "transactional logical message outside a transaction",
                    )))
                }
                _ => return Ok(fed.new_table),
            }
        } else {
            data
        };
        match data.first() {
            None => return Err(Stop::from(CutError::OutOfOrder("empty pgoutput message"))),
            Some(b'B') => {
                let Message::Begin {
                    final_lsn,
                    commit_time,
                    xid,
                } = pgoutput::decode(data)?
                else {
                    return Err(Stop::from(CutError::OutOfOrder(
                        "Begin message does not decode as Begin",
                    )));
                };
                if !matches!(self.open, Open::Idle) {
                    return Err(Stop::from(CutError::OutOfOrder(
                        "Begin inside a transaction",
                    )));
                }
                self.open = if final_lsn <= self.skip_through {
                    Open::Skipping
                } else if self.cut.is_some_and(|cut| final_lsn >= cut) {
                    Open::AfterCut
                } else {
                    Open::Cutting(TxnCutter::new(
                        self.next_seq,
                        TxnHead {
                            commit_lsn: final_lsn,
                            commit_time,
                            xid,
                            only_for: None,
                        },
                    ))
                };
            }
            Some(b'C') => {
                let Message::Commit {
                    end_lsn,
                    commit_lsn,
                    ..
                } = pgoutput::decode(data)?
                else {
                    return Err(Stop::from(CutError::OutOfOrder(
                        "Commit message does not decode as Commit",
                    )));
                };
                let txn = match std::mem::replace(&mut self.open, Open::Idle) {
                    Open::Idle => {
                        return Err(Stop::from(CutError::OutOfOrder(
                            "Commit outside a transaction",
                        )))
                    }
                    Open::Skipping => {
                        self.room_end = self.room_end.max(end_lsn);
                        self.summary.last_end = self.summary.last_end.max(end_lsn);
                        self.summary.skipped += 1;
                        return Ok(fed.new_table);
                    }
                    // Neither spooled nor confirmed: the slot returns it
                    // again after the splice.
                    Open::AfterCut => {
                        self.summary.after_cut += 1;
                        return Ok(fed.new_table);
                    }
                    Open::Cutting(txn) => txn,
                    Open::Looped(txn) => {
                        self.summary.looped += 1;
                        txn
                    }
                };
                if txn.head().commit_lsn != commit_lsn {
                    return Err(Stop::from(CutError::OutOfOrder(
                        "Commit LSN differs from Begin final LSN",
                    )));
                }
                self.summary.last_end = self.summary.last_end.max(end_lsn);
                self.summary.last_commit = commit_lsn;
                self.last_commit = commit_lsn;
                self.room_end = self.room_end.max(end_lsn);
                if txn.is_empty() {
                    self.summary.dropped += 1;
                    return Ok(fed.new_table);
                }
                let record = txn.finish(end_lsn);
                self.next_seq = record.seq + 1;
                fed.records += 1;
                each(record)?;
                self.summary.transactions += 1;
            }
            Some(&kind) => {
                let ours = if kind == b'O' {
                    our_origin(data)?
                } else {
                    None
                };
                if kind == b'R' {
                    // pgoutput sends a Relation once per stream: one read
                    // anywhere still tells later transactions' changes.
                    self.note_relation(data)?;
                }
                let txn = match &mut self.open {
                    Open::Idle => {
                        return Err(Stop::from(CutError::OutOfOrder(
                            "change outside a transaction",
                        )))
                    }
                    Open::Skipping | Open::AfterCut => {
                        return Ok(fed.new_table);
                    }
                    Open::Looped(txn) => {
                        if !matches!(kind, b'R' | b'Y') {
                            return Ok(fed.new_table);
                        }
                        txn
                    }
                    Open::Cutting(txn) if ours.is_some() => {
                        let site = ours.unwrap_or_default();
                        if !txn.is_empty() {
                            return Err(Stop::from(CutError::OutOfOrder(
                                "Origin message after a transaction's changes",
                            )));
                        }
                        // Forwarded when another receiver is there to take it.
                        if let Some(receiver) =
                            self.forward.get(&site).filter(|_| self.forward.len() > 1)
                        {
                            txn.address(Some(format!("{}{receiver}", crate::record::NOT_FOR)));
                            self.summary.forwarded += 1;
                            return Ok(fed.new_table);
                        }
                        let Open::Cutting(txn) = std::mem::replace(&mut self.open, Open::Idle)
                        else {
                            unreachable!("matched as Cutting");
                        };
                        self.open = Open::Looped(txn);
                        return Ok(fed.new_table);
                    }
                    Open::Cutting(txn) => txn,
                };
                let kept;
                if let Some(name) = change_oid(kind, data)?.and_then(|oid| self.one_way.get(&oid)) {
                    if kind != b'R' {
                        *self.summary.one_way.entry(name.clone()).or_default() += 1;
                    }
                    return Ok(fed.new_table);
                }
                let data = match filter(
                    kind,
                    data,
                    tables,
                    &self.own,
                    &self.one_way,
                    &mut self.summary.one_way,
                    &mut fed.new_table,
                )? {
                    Filter::Keep => data,
                    Filter::Drop => return Ok(fed.new_table),
                    Filter::Replace(bytes) => {
                        kept = bytes;
                        &kept
                    }
                };
                let mut cut = 0;
                let pushed = txn.push_each(data, |r| {
                    cut += 1;
                    each(r)
                });
                fed.records += cut;
                self.summary.records += cut;
                pushed?;
                return Ok(fed.new_table);
            }
        }
        self.summary.records += fed.records;
        Ok(fed.new_table)
    }

    /// A logical message (see the module doc): the message to keep, with
    /// the signature taken out, or `None` to leave it out (counted).
    fn logical_message(&mut self, data: &[u8]) -> Result<Option<Vec<u8>>, CutError> {
        let Message::LogicalMessage {
            transactional,
            lsn,
            prefix,
            content,
        } = pgoutput::decode(data)?
        else {
            return Err(CutError::OutOfOrder(
                "logical message does not decode as one",
            ));
        };
        if !transactional || (prefix != DDL_PREFIX && prefix != CLOCK_PREFIX) {
            self.summary.foreign_messages += 1;
            return Ok(None);
        }
        let verified = self
            .ddl_key
            .as_deref()
            .and_then(|key| verify_ddl(key, &content));
        let Some(content) = verified else {
            self.summary.forged_ddl += 1;
            return Ok(None);
        };
        Ok(Some(pgoutput::encode(&Message::LogicalMessage {
            transactional,
            lsn,
            prefix,
            content,
        })))
    }

    /// Transactions committing at or after the pending cut read so far in
    /// this batch: the stream has delivered everything before the cut.
    pub fn after_cut(&self) -> u64 {
        self.summary.after_cut
    }

    /// Between transactions: the stream may stop here, or a batch commit.
    pub fn is_idle(&self) -> bool {
        matches!(self.open, Open::Idle)
    }

    /// For a stream that goes on: the counts and positions of what was fed
    /// since the last call (a batch), starting a new
    /// one. Only between transactions.
    pub fn take_summary(&mut self) -> Result<BatchSummary, CutError> {
        if !self.is_idle() {
            return Err(CutError::OutOfOrder("batch ended inside a transaction"));
        }
        Ok(std::mem::take(&mut self.summary))
    }

    /// End of the input. Input that ends inside a transaction is an error:
    /// proto_version 1 sends whole transactions only.
    pub fn finish(self) -> Result<BatchSummary, CutError> {
        match self.open {
            Open::Idle => Ok(self.summary),
            Open::Skipping | Open::AfterCut | Open::Cutting(_) | Open::Looped(_) => {
                Err(CutError::OutOfOrder("input ended inside a transaction"))
            }
        }
    }
}

/// The site (after [`ORIGIN_PREFIX`]) when the Origin message `data` names
/// one of pgcourier's origins.
fn our_origin(data: &[u8]) -> Result<Option<String>, CutError> {
    let Message::Origin { name, .. } = pgoutput::decode(data)? else {
        return Err(CutError::OutOfOrder("Origin does not decode"));
    };
    Ok(name.strip_prefix(ORIGIN_PREFIX).map(Into::into))
}

impl Cutter {
    /// Remember whether the Relation `data` is one of [`OWN_SCHEMA`]'s
    /// tables, or one this site does not ship.
    fn note_relation(&mut self, data: &[u8]) -> Result<(), CutError> {
        let Message::Relation(rel) = pgoutput::decode(data)? else {
            return Err(CutError::OutOfOrder("Relation does not decode"));
        };
        if rel.schema == OWN_SCHEMA {
            self.own.insert(rel.oid);
        } else {
            self.own.remove(&rel.oid);
        }
        let name = format!("{}.{}", rel.schema, rel.name);
        let shipped = rel.schema == OWN_SCHEMA
            || (self.only.as_ref().map_or(true, |only| only.contains(&name))
                && !self.except.contains(&name));
        if shipped {
            self.one_way.remove(&rel.oid);
        } else {
            self.one_way.insert(rel.oid, name);
        }
        Ok(())
    }
}

/// The relation a Relation, Insert, Update or Delete is about.
fn change_oid(kind: u8, data: &[u8]) -> Result<Option<u32>, CutError> {
    if !matches!(kind, b'R' | b'I' | b'U' | b'D') {
        return Ok(None);
    }
    match data.get(1..5) {
        Some(b) => Ok(Some(u32::from_be_bytes(
            b.try_into().expect("a 4-byte slice"),
        ))),
        None => Err(CutError::OutOfOrder("change message too short")),
    }
}

enum Filter {
    Keep,
    Drop,
    Replace(Vec<u8>),
}

/// Leave out what a pending copy's snapshot holds: changes to tables
/// waiting for a copy. A Relation for a table never seen makes it wait.
/// Leave out pgcourier's own tables (`own`, learnt from their Relations)
/// and, from a TRUNCATE, tables not shipped (`one_way`), each counted as
/// one write in `one_way_writes`.
fn filter(
    kind: u8,
    data: &[u8],
    tables: &mut Tables,
    own: &BTreeSet<u32>,
    one_way: &BTreeMap<u32, String>,
    one_way_writes: &mut BTreeMap<String, u64>,
    new_table: &mut Option<u32>,
) -> Result<Filter, CutError> {
    match kind {
        b'R' | b'I' | b'U' | b'D' => {
            // Every one of these starts with the relation id.
            let oid = match data.get(1..5) {
                Some(b) => u32::from_be_bytes(b.try_into().expect("a 4-byte slice")),
                None => return Err(CutError::OutOfOrder("change message too short")),
            };
            if own.contains(&oid) {
                return Ok(Filter::Drop);
            }
            if kind == b'R' && !tables.synced.contains(&oid) && !tables.waiting.contains(&oid) {
                tables.waiting.insert(oid);
                *new_table = Some(oid);
            }
            Ok(if tables.waiting.contains(&oid) {
                Filter::Drop
            } else {
                Filter::Keep
            })
        }
        b'T' => {
            let Message::Truncate {
                cascade,
                restart_identity,
                rels,
            } = pgoutput::decode(data)?
            else {
                return Err(CutError::OutOfOrder("Truncate does not decode"));
            };
            for oid in &rels {
                if let Some(name) = one_way.get(oid) {
                    *one_way_writes.entry(name.clone()).or_default() += 1;
                }
            }
            let kept: Vec<u32> = rels
                .iter()
                .copied()
                .filter(|oid| {
                    !tables.waiting.contains(oid)
                        && !own.contains(oid)
                        && !one_way.contains_key(oid)
                })
                .collect();
            Ok(if kept.len() == rels.len() {
                Filter::Keep
            } else if kept.is_empty() {
                Filter::Drop
            } else {
                Filter::Replace(pgoutput::encode(&Message::Truncate {
                    cascade,
                    restart_identity,
                    rels: kept,
                }))
            })
        }
        _ => Ok(Filter::Keep),
    }
}
