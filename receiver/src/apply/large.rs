//! A large insert streamed from its fragments into a COPY of its own: an
//! Insert message that reaches `LARGE_CHANGE_BYTES` while its fragments are
//! put back together (a value of many MiB) is not reassembled. Its columns
//! are turned into COPY text data as the fragments arrive, record by record,
//! and sent `COPY_CHUNK_BYTES` at a time; what was queued before it is sent
//! first, and the COPY ends with its last fragment, before anything after
//! it. So the value is never held whole (invariant 5: memory bounded by
//! configuration, not by a value's size).
//!
//! [`InsertStream`] is the pure part: an Insert's bytes in, in any pieces,
//! COPY text out, with the checks `pgoutput::decode` makes (truncation,
//! UTF-8, column kinds, trailing bytes).

use std::pin::Pin;

use pgcourier_proto::pgoutput::DecodeError;
use tokio_postgres::CopyInSink;

/// Insert header: `I`, relation OID, `N`, column count.
pub(super) const INSERT_HEADER: usize = 1 + 4 + 1 + 2;

/// Where the parser is in the Insert's new tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// The next column's kind byte (or the end, after the last column).
    Kind,
    /// The 4-byte length of a text (`t`) or binary (`b`) value.
    Len { binary: bool },
    /// `left` bytes of the value to go.
    Data { binary: bool, left: u32 },
}

/// An Insert's new tuple (after its header), fed in pieces, out as one
/// COPY text row.
#[derive(Debug)]
pub(super) struct InsertStream {
    at: At,
    /// Columns not yet started.
    columns_left: u16,
    /// Columns in the row (for the separators).
    columns: u16,
    /// Bytes of a length, or of a UTF-8 sequence, cut by a piece boundary.
    carry: Vec<u8>,
    /// Offset of the next byte in the message (for errors).
    pos: usize,
}

impl InsertStream {
    /// Parse the header at the start of `message` (at least
    /// [`INSERT_HEADER`] bytes): the relation and a parser for the rest,
    /// which starts at `INSERT_HEADER`.
    pub(super) fn start(message: &[u8]) -> Result<(u32, InsertStream), DecodeError> {
        let truncated = |at| DecodeError::Truncated { kind: 'I', at };
        if message.first() != Some(&b'I') {
            return Err(DecodeError::Unexpected {
                kind: 'I',
                what: "message type",
                byte: message.first().copied().unwrap_or(0),
                at: 0,
            });
        }
        let rel = u32::from_be_bytes(
            message
                .get(1..5)
                .ok_or(truncated(1))?
                .try_into()
                .expect("4 bytes"),
        );
        match message.get(5) {
            Some(b'N') => {}
            Some(&other) => {
                return Err(DecodeError::Unexpected {
                    kind: 'I',
                    what: "tuple marker",
                    byte: other,
                    at: 5,
                })
            }
            None => return Err(truncated(5)),
        }
        let columns = u16::from_be_bytes(
            message
                .get(6..8)
                .ok_or(truncated(6))?
                .try_into()
                .expect("2 bytes"),
        );
        Ok((
            rel,
            InsertStream {
                at: At::Kind,
                columns_left: columns,
                columns,
                carry: Vec::new(),
                pos: INSERT_HEADER,
            },
        ))
    }

    /// Columns of the row.
    pub(super) fn columns(&self) -> usize {
        usize::from(self.columns)
    }

    /// The next piece of the message: its COPY text is appended to `out`
    /// (escaping at most doubles it, plus a few bytes).
    pub(super) fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        while !bytes.is_empty() {
            match self.at {
                At::Kind => {
                    if self.columns_left == 0 {
                        return Err(DecodeError::Trailing {
                            kind: 'I',
                            extra: bytes.len(),
                        });
                    }
                    let kind = bytes[0];
                    if self.columns_left < self.columns {
                        out.push(b'\t');
                    }
                    self.columns_left -= 1;
                    match kind {
                        b'n' => out.extend_from_slice(b"\\N"),
                        b't' => self.at = At::Len { binary: false },
                        b'b' => {
                            // Never requested from pgoutput; as `text_value`
                            // renders it: bytea hex.
                            out.extend_from_slice(b"\\\\x");
                            self.at = At::Len { binary: true };
                        }
                        // `u` (unchanged TOAST) has no place in an insert.
                        other => {
                            return Err(DecodeError::Unexpected {
                                kind: 'I',
                                what: "tuple column kind",
                                byte: other,
                                at: self.pos,
                            })
                        }
                    }
                    self.advance(&mut bytes, 1);
                }
                At::Len { binary } => {
                    let need = 4 - self.carry.len();
                    let take = need.min(bytes.len());
                    self.carry.extend_from_slice(&bytes[..take]);
                    self.advance(&mut bytes, take);
                    if self.carry.len() == 4 {
                        let left = u32::from_be_bytes(self.carry[..].try_into().expect("4 bytes"));
                        self.carry.clear();
                        self.at = At::Data { binary, left };
                        if left == 0 {
                            self.at = At::Kind;
                        }
                    }
                }
                At::Data { binary, left } => {
                    let take = bytes.len().min(left as usize);
                    let piece = &bytes[..take];
                    if binary {
                        for b in piece {
                            out.extend_from_slice(format!("{b:02x}").as_bytes());
                        }
                    } else {
                        self.text(piece, out)?;
                    }
                    let left = left - take as u32;
                    self.advance(&mut bytes, take);
                    self.at = if left == 0 {
                        if !self.carry.is_empty() {
                            // A UTF-8 sequence cut by the value's end.
                            return Err(DecodeError::NotUtf8 {
                                kind: 'I',
                                at: self.pos - self.carry.len(),
                            });
                        }
                        At::Kind
                    } else {
                        At::Data { binary, left }
                    };
                }
            }
        }
        Ok(())
    }

    /// The message ended: the row is whole, or it was truncated.
    pub(super) fn finish(&self, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        if self.at != At::Kind || self.columns_left > 0 {
            return Err(DecodeError::Truncated {
                kind: 'I',
                at: self.pos,
            });
        }
        out.push(b'\n');
        Ok(())
    }

    fn advance(&mut self, bytes: &mut &[u8], n: usize) {
        *bytes = &bytes[n..];
        self.pos += n;
    }

    /// Check a piece of a text value as UTF-8 (a sequence may straddle
    /// pieces: its start waits in `carry`) and append it escaped.
    fn text(&mut self, piece: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        let joined;
        let (text, start) = if self.carry.is_empty() {
            (piece, self.pos)
        } else {
            joined = [self.carry.as_slice(), piece].concat();
            (joined.as_slice(), self.pos - self.carry.len())
        };
        let valid = match std::str::from_utf8(text) {
            Ok(_) => text.len(),
            // Only the start of a sequence at the end: wait for the rest.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(e) => {
                return Err(DecodeError::NotUtf8 {
                    kind: 'I',
                    at: start + e.valid_up_to(),
                })
            }
        };
        super::pipeline::copy_escape(out, &text[..valid]);
        self.carry = text[valid..].to_vec();
        Ok(())
    }
}

/// A large insert being streamed: its parser, the open COPY, the data not
/// yet sent.
pub(super) struct LargeCopy {
    pub rel: u32,
    pub stream: InsertStream,
    pub sink: Pin<Box<CopyInSink<bytes::Bytes>>>,
    pub out: Vec<u8>,
}

impl super::Apply {
    /// Start streaming the Insert whose first `buffered` bytes (at least
    /// `LARGE_CHANGE_BYTES`, more fragments to come) are put together:
    /// what is queued goes first, then a COPY of its row opens.
    pub(super) async fn large_start(
        &self,
        s: &mut super::Session,
        seq: u64,
        buffered: &[u8],
    ) -> Result<(), super::ApplyError> {
        use super::ApplyError;
        let decode = |source| ApplyError::Decode { seq, source };
        let (rel, stream) = InsertStream::start(buffered).map_err(decode)?;
        self.resolve(s, seq, rel).await?;
        s.targets[&rel].check_columns(seq, stream.columns())?;
        self.drain(s).await?;
        let target = &s.targets[&rel];
        let cols: Vec<&str> = target.columns.iter().map(|(n, _)| n.as_str()).collect();
        let sql = format!("COPY {} ({}) FROM STDIN", target.table, cols.join(", "));
        let sink = s
            .client
            .copy_in::<_, bytes::Bytes>(&sql)
            .await
            .map_err(|e| super::pipeline::target_error(s, Some(rel), e))?;
        s.large = Some(LargeCopy {
            rel,
            stream,
            sink: Box::pin(sink),
            out: Vec::new(),
        });
        self.large_feed(s, seq, &buffered[INSERT_HEADER..], true)
            .await
    }

    /// The next fragment of the Insert being streamed; the last (`more` =
    /// false) ends its row and its COPY.
    pub(super) async fn large_feed(
        &self,
        s: &mut super::Session,
        seq: u64,
        bytes: &[u8],
        more: bool,
    ) -> Result<(), super::ApplyError> {
        use futures_util::SinkExt;
        let decode = |source| super::ApplyError::Decode { seq, source };
        let large = s.large.as_mut().expect("a large insert is being streamed");
        large.stream.feed(bytes, &mut large.out).map_err(decode)?;
        if more && large.out.len() < super::pipeline::COPY_CHUNK_BYTES {
            return Ok(());
        }
        let mut large = s.large.take().expect("checked above");
        if !more {
            large.stream.finish(&mut large.out).map_err(decode)?;
        }
        let out = std::mem::take(&mut large.out);
        let mut sent = large.sink.send(bytes::Bytes::from(out)).await;
        if sent.is_ok() && !more {
            sent = large.sink.as_mut().finish().await.map(|_| ());
            if let Some(c) = s.copy.as_mut() {
                c.count(large.rel);
            }
        }
        sent.map_err(|e| super::pipeline::target_error(s, Some(large.rel), e))?;
        if more {
            s.large = Some(large);
        } else {
            // The row was never decoded: its sequences' values are read
            // back from the table (`sequences.rs`).
            self.note_table_extremes(s, large.rel).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::pipeline::copy_row;
    use pgcourier_proto::pgoutput::{encode, Message, Value};

    fn insert(values: Vec<Value>) -> Vec<u8> {
        encode(&Message::Insert {
            rel: 0x4001,
            new: values,
        })
    }

    /// Feed `message` in pieces of `piece` bytes after a first piece of
    /// `first`; the COPY text, or the first error.
    fn stream(message: &[u8], first: usize, piece: usize) -> Result<Vec<u8>, DecodeError> {
        let (rel, mut s) = InsertStream::start(message)?;
        assert_eq!(rel, 0x4001);
        let mut out = Vec::new();
        let first = first.clamp(INSERT_HEADER, message.len());
        s.feed(&message[INSERT_HEADER..first], &mut out)?;
        for p in message[first..].chunks(piece) {
            s.feed(p, &mut out)?;
        }
        s.finish(&mut out)?;
        Ok(out)
    }

    #[test]
    fn an_insert_fed_in_any_pieces_is_the_copy_row_of_its_decoded_values() {
        let long = "é tab\there nl\n bs\\ cr\r 🚀".repeat(3000);
        let values = vec![
            Value::Text("42".into()),
            Value::Null,
            Value::Text(long.clone()),
            Value::Text(String::new()),
            Value::Binary(vec![0x00, 0xff, 0x5c]),
            Value::Text("last".into()),
        ];
        let message = insert(values);
        let mut want = Vec::new();
        copy_row(
            &mut want,
            &[
                Some("42".into()),
                None,
                Some(long),
                Some(String::new()),
                Some("\\x00ff5c".into()),
                Some("last".into()),
            ],
        );
        // Piece sizes that cut lengths, multi-byte characters and escapes.
        for (first, piece) in [(8, 1), (9, 3), (20, 7), (100, 4096), (1 << 20, 16384)] {
            assert_eq!(
                stream(&message, first, piece),
                Ok(want.clone()),
                "first {first}, pieces of {piece}"
            );
        }
        // No columns: an empty row.
        assert_eq!(stream(&insert(vec![]), 8, 1), Ok(b"\n".to_vec()));
    }

    #[test]
    fn a_malformed_insert_fails_as_decode_would() {
        let message = insert(vec![Value::Text("abc".into()), Value::Null]);
        // Cut anywhere after the header: truncated.
        for cut in INSERT_HEADER..message.len() {
            assert!(
                matches!(
                    stream(&message[..cut], 8, 1),
                    Err(DecodeError::Truncated { kind: 'I', .. })
                ),
                "{cut} bytes"
            );
        }
        // A byte after the last column.
        let mut trailing = message.clone();
        trailing.push(b'n');
        assert_eq!(
            stream(&trailing, 8, 2),
            Err(DecodeError::Trailing {
                kind: 'I',
                extra: 1
            })
        );
        // Not UTF-8, whole or cut at the value's end, in any pieces.
        let mut bad = insert(vec![Value::Text("a-b".into())]);
        let at = bad.len() - 2;
        bad[at] = 0xFF;
        for piece in [1, 2, 64] {
            assert_eq!(
                stream(&bad, 8, piece),
                Err(DecodeError::NotUtf8 { kind: 'I', at })
            );
        }
        // "aé" cut inside its "é": header, `t`, length 3 made 2, "a", 0xC3.
        let mut cut_char = insert(vec![Value::Text("aé".into())]);
        cut_char.pop();
        cut_char[9..13].copy_from_slice(&2u32.to_be_bytes());
        for piece in [1, 2, 64] {
            assert_eq!(
                stream(&cut_char, 8, piece),
                Err(DecodeError::NotUtf8 { kind: 'I', at: 14 })
            );
        }
        // An unchanged TOAST value, and other headers.
        let toast = insert(vec![Value::UnchangedToast]);
        assert!(matches!(
            stream(&toast, 8, 1),
            Err(DecodeError::Unexpected {
                what: "tuple column kind",
                ..
            })
        ));
        assert!(InsertStream::start(b"I\0\0@\x01K\0\0").is_err());
        assert!(InsertStream::start(b"U\0\0@\x01N\0\0").is_err());
        assert!(InsertStream::start(b"I\0\0@").is_err());
    }
}
