//! The unit of the spool, the wire and the inbox: one record holds a slice
//! (or all) of one source transaction's pgoutput messages.
//!
//! Layout of an encoded record (the exact bytes stored in the sender's spool,
//! shipped inside batches and stored again in the receiver's inbox, so the
//! checksum covers the whole path):
//!
//! ```text
//! [CRC-32 (IEEE) of body: u32 little-endian][body: bincode(RecordBody), standard config]
//! ```
//!
//! A transaction larger than the record size limit is split into several
//! records with consecutive sequence numbers: `part` counts from 0 and only
//! the last one has `last = true` and carries the commit's `end_lsn`.
//! Bodies are kept under [`MAX_RECORD_BYTES`]. (sled still writes a page
//! holding several records to a blob file once the page passes about
//! 128 KiB; `Store::sync` fsyncs those too.)

use serde::{Deserialize, Serialize};

use crate::Lsn;

/// Largest encoded record. Splitting starts well below this (see
/// `TARGET_RECORD_BYTES`); a single pgoutput message larger than what is
/// left is stored as chunks of a `Fragment` (see [`Piece`]).
pub const MAX_RECORD_BYTES: usize = 96 * 1024;

/// The size the sender aims for when it cuts a transaction into records.
pub const TARGET_RECORD_BYTES: usize = 8 * 1024;

/// Largest piece of one pgoutput message stored in a record: a bigger
/// message travels as [`Piece::Fragment`]s of this size, each closing a
/// record of its own but the last. With [`TARGET_RECORD_BYTES`] this keeps
/// a record's payload under 24 KiB (see `crate::cutter`).
pub const MAX_PIECE_BYTES: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the sender's spool; dense, starts at 1.
    pub seq: u64,
    /// The one receiver this record is for (a copy made for a new branch);
    /// every other receiver is shipped an empty record in its place. With
    /// [`NOT_FOR`] before the name: every receiver but that one (a change
    /// made at that receiver's site, forwarded to the others), see
    /// [`addressed_to`]. Second in the encoding so shipping reads it
    /// without a full decode.
    pub only_for: Option<String>,
    /// The source transaction's commit record LSN (pgoutput Begin final_lsn).
    pub commit_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC (PostgreSQL epoch).
    pub commit_time: i64,
    pub xid: u32,
    /// Index of this record within its transaction.
    pub part: u32,
    /// Last record of the transaction.
    pub last: bool,
    /// End of the commit record: what the source slot may be advanced to
    /// once this record is durable. Zero unless `last`.
    pub end_lsn: Lsn,
    /// pgoutput messages in source order, Begin and Commit left out (their
    /// content is in the fields above).
    pub pieces: Vec<Piece>,
}

/// One pgoutput message, or a chunk of one too large for a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Piece {
    Message(Vec<u8>),
    /// A chunk of a message; chunks follow one another (possibly across
    /// records of the same transaction); `more = false` on the final chunk.
    Fragment {
        bytes: Vec<u8>,
        more: bool,
    },
}

impl Piece {
    pub fn len(&self) -> usize {
        match self {
            Piece::Message(b) => b.len(),
            Piece::Fragment { bytes, .. } => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record is {0} bytes, shorter than its checksum")]
    TooShort(usize),
    #[error("record checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("record body does not decode")]
    Decode(#[source] bincode::error::DecodeError),
    #[error("record body does not encode")]
    Encode(#[source] bincode::error::EncodeError),
    #[error("record has {0} trailing bytes after its body")]
    Trailing(usize),
    #[error("record is {0} bytes, above the limit of {MAX_RECORD_BYTES}")]
    TooLarge(usize),
}

/// The bincode configuration of everything pgcourier stores or sends. It is
/// part of the disk and wire format: do not change it.
pub fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<{ 16 * 1024 * 1024 }>()
}

impl Record {
    /// Encode with its checksum.
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        let mut out = vec![0u8; 4];
        bincode::serde::encode_into_std_write(self, &mut out, bincode_config())
            .map_err(RecordError::Encode)?;
        if out.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(out.len()));
        }
        let crc = crc32fast::hash(&out[4..]);
        out[..4].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Check the checksum, then decode.
    pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
        verify(bytes)?;
        let (record, used) = bincode::serde::decode_from_slice(&bytes[4..], bincode_config())
            .map_err(RecordError::Decode)?;
        if used != bytes.len() - 4 {
            return Err(RecordError::Trailing(bytes.len() - 4 - used));
        }
        Ok(record)
    }

    pub fn payload_bytes(&self) -> usize {
        self.pieces.iter().map(Piece::len).sum()
    }
}

/// Check an encoded record's checksum without decoding it.
pub fn verify(bytes: &[u8]) -> Result<(), RecordError> {
    if bytes.len() < 4 {
        return Err(RecordError::TooShort(bytes.len()));
    }
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge(bytes.len()));
    }
    let stored = u32::from_le_bytes(bytes[..4].try_into().expect("length checked above"));
    let computed = crc32fast::hash(&bytes[4..]);
    if stored != computed {
        return Err(RecordError::Checksum { stored, computed });
    }
    Ok(())
}

/// Before a receiver's name in [`Record::only_for`]: the record is for
/// every receiver but that one. (Receiver names never start with it.)
pub const NOT_FOR: char = '!';

/// Whether a record whose `only_for` is this goes to receiver `name`.
pub fn addressed_to(only_for: Option<&str>, name: &str) -> bool {
    match only_for {
        None => true,
        Some(to) => match to.strip_prefix(NOT_FOR) {
            Some(not) => not != name,
            None => to == name,
        },
    }
}

/// The receivers an encoded record is addressed to (see
/// [`Record::only_for`]), read without a full decode (checksum verified).
pub fn peek_only_for(bytes: &[u8]) -> Result<Option<String>, RecordError> {
    verify(bytes)?;
    let ((_, only_for), _): ((u64, Option<String>), usize) =
        bincode::serde::decode_from_slice(&bytes[4..], bincode_config())
            .map_err(RecordError::Decode)?;
    Ok(only_for)
}

impl Record {
    /// What a receiver the record is not for gets instead: the same
    /// position and transaction boundaries, no changes.
    pub fn placeholder(&self) -> Record {
        Record {
            only_for: None,
            pieces: Vec::new(),
            ..self.clone()
        }
    }
}

/// The sequence number of an encoded record, read without a full decode
/// (the body starts with `seq` as a varint).
pub fn peek_seq(bytes: &[u8]) -> Result<u64, RecordError> {
    verify(bytes)?;
    let (seq, _): (u64, usize) = bincode::serde::decode_from_slice(&bytes[4..], bincode_config())
        .map_err(RecordError::Decode)?;
    Ok(seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            seq: 42,
            only_for: None,
            commit_lsn: Lsn(0x16_B374_D848),
            commit_time: 123_456,
            xid: 777,
            part: 0,
            last: true,
            end_lsn: Lsn(0x16_B374_D900),
            pieces: vec![Piece::Message(b"I\0\0\0\x01".to_vec())],
        }
    }

    #[test]
    fn the_addressee_is_read_without_a_full_decode() {
        let mut r = sample();
        assert_eq!(peek_only_for(&r.encode().unwrap()).unwrap(), None);
        r.only_for = Some("branch7".into());
        let bytes = r.encode().unwrap();
        assert_eq!(peek_only_for(&bytes).unwrap().as_deref(), Some("branch7"));
        assert_eq!(peek_seq(&bytes).unwrap(), 42);
        let p = Record::decode(&bytes).unwrap().placeholder();
        assert!(p.pieces.is_empty() && p.only_for.is_none() && p.last && p.seq == 42);
    }

    #[test]
    fn record_round_trips_and_exposes_its_seq() {
        let bytes = sample().encode().unwrap();
        assert_eq!(Record::decode(&bytes).unwrap(), sample());
        assert_eq!(peek_seq(&bytes).unwrap(), 42);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = sample().encode().unwrap();
        for i in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                Record::decode(&bad).is_err(),
                "flip of bit {i} went unnoticed"
            );
        }
    }

    #[test]
    fn truncated_and_oversized_records_are_refused() {
        let bytes = sample().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(Record::decode(&bytes[..n]).is_err());
        }
        assert!(matches!(
            verify(&vec![0; MAX_RECORD_BYTES + 1]),
            Err(RecordError::TooLarge(_))
        ));
    }
}
