//! The messages of a logical replication stream (`START_REPLICATION ..
//! LOGICAL`), inside the CopyBoth sub-protocol: what the walsender sends
//! (XLogData carrying one pgoutput message, and Primary keepalive) and the
//! Standby status update capture answers with. Step 1 of a change's path
//! (WAL → records → spool …): the bytes between PostgreSQL's walsender and
//! the sender's capture.
//!
//! Pure: the driver (`sender/src/replication/`) reads CopyData payloads off
//! the connection and hands them here; the time of a status update comes in
//! as microseconds since the PostgreSQL epoch.
//!
//! Layout (PostgreSQL's "Streaming Replication Protocol"): every integer is
//! big-endian.
//! - `w` XLogData: start LSN (8), current end of WAL (8), send time (8),
//!   then the message.
//! - `k` Primary keepalive: end of WAL (8), send time (8), reply requested
//!   (1).
//! - `r` Standby status update: written, flushed, applied LSN (8 each),
//!   client time (8), reply requested (1).

use crate::Lsn;

/// One CopyData payload from the walsender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerMessage<'a> {
    /// One pgoutput message. `wal_start` is the LSN of the WAL record it
    /// was decoded from (0 for messages with none, such as Relation);
    /// `wal_end` the server's WAL end when it was sent.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        send_time: i64,
        data: &'a [u8],
    },
    /// The server's WAL end and whether it wants a status update now (it
    /// asks before `wal_sender_timeout` runs out).
    Keepalive {
        wal_end: Lsn,
        send_time: i64,
        reply_requested: bool,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("replication stream message is empty")]
    Empty,
    #[error(
        "replication stream message {kind:?} is {len} bytes, shorter than its {need}-byte header"
    )]
    Short { kind: char, len: usize, need: usize },
    #[error("replication stream message of unknown kind {0:?}")]
    UnknownKind(char),
}

const XLOG_HEADER: usize = 1 + 8 + 8 + 8;
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;

/// Length of a Standby status update.
pub const STATUS_UPDATE_LEN: usize = 1 + 8 + 8 + 8 + 8 + 1;

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("an 8-byte slice"))
}

/// Parse one CopyData payload of the stream.
pub fn parse(payload: &[u8]) -> Result<ServerMessage<'_>, StreamError> {
    let Some(&kind) = payload.first() else {
        return Err(StreamError::Empty);
    };
    let need = match kind {
        b'w' => XLOG_HEADER,
        b'k' => KEEPALIVE_LEN,
        other => return Err(StreamError::UnknownKind(other as char)),
    };
    if payload.len() < need {
        return Err(StreamError::Short {
            kind: kind as char,
            len: payload.len(),
            need,
        });
    }
    Ok(match kind {
        b'w' => ServerMessage::XLogData {
            wal_start: Lsn(be_u64(&payload[1..])),
            wal_end: Lsn(be_u64(&payload[9..])),
            send_time: be_u64(&payload[17..]) as i64,
            data: &payload[XLOG_HEADER..],
        },
        _ => ServerMessage::Keepalive {
            wal_end: Lsn(be_u64(&payload[1..])),
            send_time: be_u64(&payload[9..]) as i64,
            reply_requested: payload[17] != 0,
        },
    })
}

/// What capture tells the walsender. `flush` is what the spool holds
/// durably (invariant 1): the slot's `confirmed_flush_lsn` follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusUpdate {
    /// Received and written (not necessarily durable).
    pub write: Lsn,
    /// Durable in the spool.
    pub flush: Lsn,
    /// Reported as applied: the same as `flush` (the spool is our apply).
    pub apply: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub now: i64,
    /// Ask the server to answer with a keepalive at once.
    pub reply_requested: bool,
}

impl StatusUpdate {
    /// The CopyData payload.
    pub fn encode(&self) -> [u8; STATUS_UPDATE_LEN] {
        let mut out = [0u8; STATUS_UPDATE_LEN];
        out[0] = b'r';
        out[1..9].copy_from_slice(&self.write.0.to_be_bytes());
        out[9..17].copy_from_slice(&self.flush.0.to_be_bytes());
        out[17..25].copy_from_slice(&self.apply.0.to_be_bytes());
        out[25..33].copy_from_slice(&self.now.to_be_bytes());
        out[33] = u8::from(self.reply_requested);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xlogdata_splits_header_and_message() {
        let mut p = vec![b'w'];
        p.extend_from_slice(&0x1_0000_0028u64.to_be_bytes());
        p.extend_from_slice(&0x1_0000_0100u64.to_be_bytes());
        p.extend_from_slice(&42i64.to_be_bytes());
        p.extend_from_slice(b"B-message");
        assert_eq!(
            parse(&p).unwrap(),
            ServerMessage::XLogData {
                wal_start: Lsn(0x1_0000_0028),
                wal_end: Lsn(0x1_0000_0100),
                send_time: 42,
                data: b"B-message",
            }
        );
    }

    #[test]
    fn keepalive_carries_wal_end_and_the_reply_flag() {
        let mut p = vec![b'k'];
        p.extend_from_slice(&7u64.to_be_bytes());
        p.extend_from_slice(&(-3i64).to_be_bytes());
        p.push(1);
        assert_eq!(
            parse(&p).unwrap(),
            ServerMessage::Keepalive {
                wal_end: Lsn(7),
                send_time: -3,
                reply_requested: true,
            }
        );
    }

    #[test]
    fn truncated_and_unknown_messages_are_errors_never_panics() {
        assert_eq!(parse(&[]), Err(StreamError::Empty));
        assert_eq!(parse(b"x123"), Err(StreamError::UnknownKind('x')));
        let full_w = [b'w'; XLOG_HEADER];
        for len in 1..XLOG_HEADER {
            assert_eq!(
                parse(&full_w[..len]),
                Err(StreamError::Short {
                    kind: 'w',
                    len,
                    need: XLOG_HEADER
                })
            );
        }
        // An XLogData with an empty message is well formed here; the
        // pgoutput decoder refuses the empty message.
        assert!(matches!(
            parse(&full_w),
            Ok(ServerMessage::XLogData { data: [], .. })
        ));
        let k = [b'k'; KEEPALIVE_LEN];
        for len in 1..KEEPALIVE_LEN {
            assert!(matches!(parse(&k[..len]), Err(StreamError::Short { .. })));
        }
    }

    #[test]
    fn status_update_layout() {
        let u = StatusUpdate {
            write: Lsn(0x0102_0304_0506_0708),
            flush: Lsn(2),
            apply: Lsn(3),
            now: 0x1112_1314_1516_1718,
            reply_requested: true,
        };
        let b = u.encode();
        assert_eq!(b[0], b'r');
        assert_eq!(&b[1..9], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[9..17], &2u64.to_be_bytes());
        assert_eq!(&b[17..25], &3u64.to_be_bytes());
        assert_eq!(&b[25..33], &0x1112_1314_1516_1718i64.to_be_bytes());
        assert_eq!(b[33], 1);
    }
}
