//! One transaction's messages cut into records: the size cut, fragments,
//! part numbering, and `last`/`end_lsn` on the closing record.

use crate::record::{Piece, Record, MAX_PIECE_BYTES, TARGET_RECORD_BYTES};
use crate::Lsn;

/// What every record of one transaction carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnHead {
    /// The commit record's LSN (pgoutput Begin `final_lsn`).
    pub commit_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC (PostgreSQL epoch).
    pub commit_time: i64,
    pub xid: u32,
    /// The one receiver the transaction is for (a copy made for a late
    /// receiver); `None`: every receiver.
    pub only_for: Option<String>,
}

/// Cuts one transaction into records with dense sequence numbers.
///
/// Rules (each has a test in `cutter/tests.rs`):
/// - Messages are kept whole and in order; a record is closed before a
///   message that would take its payload over [`TARGET_RECORD_BYTES`]
///   (a payload of exactly that size stays one record). A record holds at
///   least one piece, so a message alone may exceed the target.
/// - A message over [`MAX_PIECE_BYTES`] closes the record being filled and
///   travels as fragments of that size; every fragment but the last closes
///   its record, and the last (`more = false`) starts the next one, which
///   later messages may join while it stays under the target.
/// - `part` counts a transaction's records from 0; only the closing one
///   ([`TxnCutter::finish`]) has `last = true` and a non-zero `end_lsn`.
#[derive(Debug)]
pub struct TxnCutter {
    head: TxnHead,
    /// Sequence number of the record being filled.
    seq: u64,
    part: u32,
    pieces: Vec<Piece>,
    /// Payload bytes of `pieces`.
    bytes: usize,
}

impl TxnCutter {
    /// A transaction whose first record takes `first_seq`.
    pub fn new(first_seq: u64, head: TxnHead) -> TxnCutter {
        TxnCutter {
            head,
            seq: first_seq,
            part: 0,
            pieces: Vec::new(),
            bytes: 0,
        }
    }

    pub fn head(&self) -> &TxnHead {
        &self.head
    }

    /// Address the transaction (see [`Record::only_for`]); only before any
    /// message was pushed, so every record carries it.
    pub fn address(&mut self, only_for: Option<String>) {
        debug_assert!(self.is_empty(), "addressed after its first message");
        self.head.only_for = only_for;
    }

    /// Sequence number the next record will take.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Nothing kept so far: no record closed and no piece waiting.
    pub fn is_empty(&self) -> bool {
        self.part == 0 && self.pieces.is_empty()
    }

    /// Add one pgoutput message; returns the records it closed (usually
    /// none), in sequence order.
    pub fn push(&mut self, message: &[u8]) -> Vec<Record> {
        let mut closed = Vec::new();
        self.push_each(message, |r| {
            closed.push(r);
            Ok::<(), std::convert::Infallible>(())
        })
        .expect("infallible");
        closed
    }

    /// [`Self::push`], handing each closed record to `each` as soon as it
    /// is cut, so a large message's fragments are never all held at once
    /// (invariant 5: memory bounded by configuration, not by value size).
    /// The first error from `each` stops the cut and is returned; the
    /// transaction is then broken (the caller abandons it).
    pub fn push_each<E>(
        &mut self,
        message: &[u8],
        mut each: impl FnMut(Record) -> Result<(), E>,
    ) -> Result<(), E> {
        if message.len() <= MAX_PIECE_BYTES {
            if self.bytes + message.len() > TARGET_RECORD_BYTES && !self.pieces.is_empty() {
                each(self.close(false, Lsn::ZERO))?;
            }
            self.bytes += message.len();
            self.pieces.push(Piece::Message(message.to_vec()));
            return Ok(());
        }
        if !self.pieces.is_empty() {
            each(self.close(false, Lsn::ZERO))?;
        }
        let mut chunks = message.chunks(MAX_PIECE_BYTES).peekable();
        while let Some(chunk) = chunks.next() {
            let more = chunks.peek().is_some();
            self.pieces.push(Piece::Fragment {
                bytes: chunk.to_vec(),
                more,
            });
            if more {
                each(self.close(false, Lsn::ZERO))?;
            } else {
                self.bytes = chunk.len();
            }
        }
        Ok(())
    }

    /// The transaction's closing record (`last`, carrying `end_lsn`), with
    /// whatever pieces wait (possibly none: a copy of no rows still ends).
    pub fn finish(mut self, end_lsn: Lsn) -> Record {
        self.close(true, end_lsn)
    }

    fn close(&mut self, last: bool, end_lsn: Lsn) -> Record {
        let record = Record {
            seq: self.seq,
            only_for: self.head.only_for.clone(),
            commit_lsn: self.head.commit_lsn,
            commit_time: self.head.commit_time,
            xid: self.head.xid,
            part: self.part,
            last,
            end_lsn: if last { end_lsn } else { Lsn::ZERO },
            pieces: std::mem::take(&mut self.pieces),
        };
        self.seq += 1;
        self.part += 1;
        self.bytes = 0;
        record
    }
}
