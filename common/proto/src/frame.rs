//! The frames of the pgcourier protocol between a sender and a receiver, over one QUIC
//! connection (whichever side dialed).
//!
//! ```text
//! receiver                                   sender
//!   open bidi "control" stream
//!   Hello{source, durable_seq}      ──────▶
//!   HelloSpool{spool}               ──────▶  (protocol 4; not read when
//!                                             Hello names another version)
//!                                   ◀──────  Welcome{source, spool, first_seq}
//!                                            | RefuseClassed{reason, definite}
//!                                            | Refuse{reason} (protocol mismatch)
//!                                            open uni "data" stream
//!                                   ◀──────  Batch{first_seq, last_seq, zstd(records)} ...
//!   (store, fsync)
//!   Ack{durable_seq}                ──────▶  (frees the in-flight window)
//!   (apply, target COMMIT)
//!   Applied{seq}                    ──────▶  (record it, trim the spool)
//! ```
//!
//! The sender keeps a record until every receiver has *applied* it, not
//! only stored it: a record the receiver finds corrupt in its inbox can
//! then be fetched again (the receiver drops it and everything after it,
//! and reconnects with a lower `durable_seq`).
//!
//! Record numbers name transactions only within one spool: `spool` is the
//! sender spool's random identity, made when the spool is created. The
//! inbox keeps the one it first received from; a receiver holding records
//! of one spool is refused by (and refuses) a sender with another, so a
//! replaced spool-dir that reuses the numbers is never taken for the same.
//!
//! Compatibility: the first frame (`Hello`) and the refusal every version
//! reads (`Refuse`) keep the layout they had in version 1, so a side of any
//! version can read the other's version and refuse it in a form it reads.
//! That is why the spool identity travels in a frame of its own after
//! `Hello` rather than in it. The other frames change with the version.
//!
//! Every frame is `[u32 big-endian length][bincode(Frame)]`, at most
//! [`MAX_FRAME_BYTES`]. A batch payload is the zstd compression of
//! `[u32 LE length][encoded record]...`; decompression is bounded by
//! [`MAX_BATCH_RAW_BYTES`] and every record keeps its own checksum from the
//! sender's spool.

use serde::{Deserialize, Serialize};

use crate::record::{self, bincode_config, RecordError, MAX_RECORD_BYTES};

/// 2: `Applied` frames; the spool is trimmed behind what receivers applied.
/// 3: `RefuseClassed`: a refusal says whether retrying can help, so a
/// receiver stops on a definite one instead of retrying for ever.
/// 4: the spool identity: `HelloSpool` after `Hello`, `spool` in `Welcome`.
pub const PROTOCOL_VERSION: u32 = 4;
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;
pub const MAX_BATCH_RAW_BYTES: usize = 8 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Receiver → sender, first frame on the control stream. Its layout
    /// never changes (see the module doc): the sender reads `protocol`
    /// first.
    Hello {
        protocol: u32,
        /// Source identity the receiver's inbox belongs to (`None` when new).
        source: Option<String>,
        /// Highest record sequence the receiver holds durably (0: none).
        durable_seq: u64,
    },
    /// Sender → receiver: accepted; batches follow on a uni stream.
    /// `spool`: the identity of the spool it ships from (protocol 4).
    Welcome {
        source: String,
        spool: String,
        first_seq: u64,
    },
    /// Sender → receiver: refused; the connection closes. The form every
    /// protocol version decodes (variant 2 since version 1), so a sender
    /// uses it to refuse a receiver that speaks another version; a receiver
    /// reads it as definite.
    Refuse { reason: String },
    /// Sender → receiver, on the data stream.
    Batch {
        first_seq: u64,
        last_seq: u64,
        raw_len: u32,
        payload: Vec<u8>,
    },
    /// Receiver → sender: everything up to `durable_seq` is fsynced.
    Ack { durable_seq: u64 },
    /// Receiver → sender: everything up to `seq` is applied to the target
    /// (committed with the progress row); the sender may delete it. Sent
    /// after `Welcome` and whenever it moves.
    Applied { seq: u64 },
    /// Sender → receiver (protocol 3): refused, and whether retrying can
    /// help (`definite: false`: the sender is not ready yet, the copy for a
    /// new branch is being prepared) or not (another source, records gone:
    /// an operator must act). The connection closes.
    RefuseClassed { reason: String, definite: bool },
    /// Receiver → sender (protocol 4), right after `Hello`: the identity of
    /// the spool the inbox holds records of (`None`: a new inbox, or one
    /// from before protocol 4, which adopts the sender's).
    HelloSpool { spool: Option<String> },
}

impl Frame {
    /// The variant's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "Hello",
            Frame::Welcome { .. } => "Welcome",
            Frame::Refuse { .. } => "Refuse",
            Frame::Batch { .. } => "Batch",
            Frame::Ack { .. } => "Ack",
            Frame::Applied { .. } => "Applied",
            Frame::RefuseClassed { .. } => "RefuseClassed",
            Frame::HelloSpool { .. } => "HelloSpool",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    FrameTooLarge(usize),
    #[error("frame does not decode")]
    Decode(#[source] bincode::error::DecodeError),
    #[error("frame does not encode")]
    Encode(#[source] bincode::error::EncodeError),
    #[error("batch does not decompress")]
    Decompress(#[source] std::io::Error),
    #[error("batch claims {0} raw bytes, above the limit of {MAX_BATCH_RAW_BYTES}")]
    BatchTooLarge(u64),
    #[error("batch is malformed: {0}")]
    BadBatch(&'static str),
    #[error("batch record {index} is corrupt")]
    Record {
        index: usize,
        #[source]
        source: RecordError,
    },
    #[error("batch holds seq {found} where {expected} was expected")]
    OutOfOrder { expected: u64, found: u64 },
}

/// The frame as it travels: `[u32 big-endian length][bincode(Frame)]`.
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, FrameError> {
    let body =
        bincode::serde::encode_to_vec(frame, bincode_config()).map_err(FrameError::Encode)?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(FrameError::FrameTooLarge(body.len()));
    }
    let mut buf = Vec::with_capacity(body.len() + 4);
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    Ok(buf)
}

/// The body length a frame's 4-byte prefix announces, refused above
/// [`MAX_FRAME_BYTES`] before anything is allocated.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::FrameTooLarge(len));
    }
    Ok(len)
}

pub fn decode_frame(body: &[u8]) -> Result<Frame, FrameError> {
    let (frame, used) =
        bincode::serde::decode_from_slice(body, bincode_config()).map_err(FrameError::Decode)?;
    if used != body.len() {
        return Err(FrameError::BadBatch("trailing bytes after frame"));
    }
    Ok(frame)
}

/// Build a batch frame from encoded records with consecutive sequences.
pub fn encode_batch(records: &[Vec<u8>], first_seq: u64, level: i32) -> Result<Frame, FrameError> {
    let raw_len: usize = records.iter().map(|r| r.len() + 4).sum();
    if raw_len > MAX_BATCH_RAW_BYTES {
        return Err(FrameError::BatchTooLarge(raw_len as u64));
    }
    let mut raw = Vec::with_capacity(raw_len);
    for r in records {
        raw.extend_from_slice(&(r.len() as u32).to_le_bytes());
        raw.extend_from_slice(r);
    }
    let payload = zstd::bulk::compress(&raw, level).map_err(FrameError::Decompress)?;
    Ok(Frame::Batch {
        first_seq,
        last_seq: first_seq + records.len() as u64 - 1,
        raw_len: raw_len as u32,
        payload,
    })
}

/// Decompress and split a batch, checking every record's checksum and that
/// the sequences run from `first_seq` to `last_seq` without a gap.
pub fn decode_batch(
    first_seq: u64,
    last_seq: u64,
    raw_len: u32,
    payload: &[u8],
) -> Result<Vec<Vec<u8>>, FrameError> {
    if raw_len as usize > MAX_BATCH_RAW_BYTES {
        return Err(FrameError::BatchTooLarge(raw_len.into()));
    }
    if last_seq < first_seq {
        return Err(FrameError::BadBatch("last_seq before first_seq"));
    }
    let raw = zstd::bulk::decompress(payload, raw_len as usize).map_err(FrameError::Decompress)?;
    if raw.len() != raw_len as usize {
        return Err(FrameError::BadBatch("raw length differs from the header"));
    }
    let mut out = Vec::new();
    let mut rest = &raw[..];
    let mut expected = first_seq;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(FrameError::BadBatch("truncated record length"));
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        rest = &rest[4..];
        if len > MAX_RECORD_BYTES || len > rest.len() {
            return Err(FrameError::BadBatch("record length out of bounds"));
        }
        let bytes = &rest[..len];
        rest = &rest[len..];
        let seq = record::peek_seq(bytes).map_err(|source| FrameError::Record {
            index: out.len(),
            source,
        })?;
        if seq != expected {
            return Err(FrameError::OutOfOrder {
                expected,
                found: seq,
            });
        }
        expected += 1;
        out.push(bytes.to_vec());
    }
    if expected != last_seq + 1 {
        return Err(FrameError::BadBatch(
            "batch holds fewer records than its header says",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Piece, Record};
    use crate::Lsn;

    fn rec(seq: u64) -> Vec<u8> {
        Record {
            seq,
            only_for: None,
            commit_lsn: Lsn(seq * 100),
            commit_time: 0,
            xid: 1,
            part: 0,
            last: true,
            end_lsn: Lsn(seq * 100 + 50),
            pieces: vec![Piece::Message(vec![b'I'; 300])],
        }
        .encode()
        .unwrap()
    }

    /// A small deterministic PRNG (xorshift64*), so failures replay.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed.max(1);
        move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    #[test]
    fn random_and_mutated_frames_and_batches_never_panic() {
        let seed = 0x5eed_2026;
        let mut next = rng(seed);
        let records: Vec<_> = (1..4).map(rec).collect();
        let Frame::Batch {
            raw_len, payload, ..
        } = encode_batch(&records, 1, 3).unwrap()
        else {
            unreachable!()
        };
        let frame = bincode::serde::encode_to_vec(
            &Frame::Batch {
                first_seq: 1,
                last_seq: 3,
                raw_len,
                payload: payload.clone(),
            },
            bincode_config(),
        )
        .unwrap();
        for i in 0..20_000 {
            // Random bytes as a frame body.
            let len = (next() % 64) as usize;
            let junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode_frame(&junk);
            // A mutated real frame, and a mutated compressed payload.
            let mut f = frame.clone();
            let mut p = payload.clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() as usize) % f.len();
                f[at] ^= 1 << (next() % 8);
                let at = (next() as usize) % p.len();
                p[at] = next() as u8;
            }
            if let Ok(Frame::Batch {
                first_seq,
                last_seq,
                raw_len,
                payload,
            }) = decode_frame(&f)
            {
                let _ = decode_batch(first_seq, last_seq, raw_len, &payload);
            }
            let claimed = if i % 2 == 0 {
                raw_len
            } else {
                (next() % (2 * MAX_BATCH_RAW_BYTES as u64)) as u32
            };
            if let Ok(out) = decode_batch(1, 3, claimed, &p) {
                // Whatever decodes passed every record's checksum.
                assert_eq!(
                    out, records,
                    "seed {seed:#x}, iteration {i}: a corrupted batch decoded to other records"
                );
            }
        }
    }

    #[test]
    fn batch_with_gap_or_lie_is_refused() {
        let records = vec![rec(1), rec(3)];
        let Frame::Batch {
            raw_len, payload, ..
        } = encode_batch(&records, 1, 1).unwrap()
        else {
            unreachable!()
        };
        assert!(matches!(
            decode_batch(1, 2, raw_len, &payload),
            Err(FrameError::OutOfOrder { .. })
        ));
        assert!(decode_batch(1, 2, raw_len + 10, &payload).is_err());
        assert!(decode_batch(1, 2, u32::MAX, &payload).is_err());
    }

    /// A peer of protocol 2 must still read why it is refused: `Refuse`
    /// keeps its variant index and layout, and the classified refusal is a
    /// new variant at the end.
    #[test]
    fn the_unclassified_refusal_keeps_its_protocol_2_encoding() {
        let bytes = encode_frame(&Frame::Refuse { reason: "x".into() }).unwrap();
        // [len][variant 2][string len 1]["x"]
        assert_eq!(bytes, vec![0, 0, 0, 3, 2, 1, b'x']);
        let classed = encode_frame(&Frame::RefuseClassed {
            reason: "x".into(),
            definite: true,
        })
        .unwrap();
        assert_eq!(classed[4], 6, "appended after Applied");
        assert_eq!(
            decode_frame(&classed[4..]).unwrap(),
            Frame::RefuseClassed {
                reason: "x".into(),
                definite: true
            }
        );
    }

    /// A sender of any version reads a receiver's `Hello` to say in a form
    /// it reads that it speaks another version: `Hello` keeps its version 1
    /// layout, and the spool identity (protocol 4) is a frame of its own,
    /// appended after `RefuseClassed`.
    #[test]
    fn hello_keeps_the_layout_every_version_reads_and_the_spool_follows_it() {
        let hello = encode_frame(&Frame::Hello {
            protocol: PROTOCOL_VERSION,
            source: Some("s".into()),
            durable_seq: 5,
        })
        .unwrap();
        // [len][variant 0][protocol 4][Some][string len 1]["s"][5]
        assert_eq!(hello, vec![0, 0, 0, 6, 0, 4, 1, 1, b's', 5]);
        let spool = encode_frame(&Frame::HelloSpool {
            spool: Some("ab".into()),
        })
        .unwrap();
        assert_eq!(spool, vec![0, 0, 0, 5, 7, 1, 2, b'a', b'b']);
        assert_eq!(
            decode_frame(&spool[4..]).unwrap(),
            Frame::HelloSpool {
                spool: Some("ab".into())
            }
        );
    }
}
