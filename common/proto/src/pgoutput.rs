//! Decoder for PostgreSQL's `pgoutput` logical replication messages
//! (protocol version 1, text format), as returned by
//! `pg_logical_slot_peek_binary_changes(.., 'proto_version', '1', ..)`.
//!
//! The sender spools the raw message bytes; the receiver decodes them here
//! just before apply, and the queue CLI decodes them for `show`. The decoder
//! never panics and never allocates more than the input holds: every length
//! and count is checked against the remaining bytes first.

use serde::Serialize;

use crate::Lsn;

/// Replica identity of a published table, from the Relation message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ReplicaIdentity {
    /// `d`: primary key.
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: a unique index.
    Index,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Column {
    /// Part of the replica identity (flag bit 1).
    pub key: bool,
    pub name: String,
    /// Type OID on the source (meaningless on the target: map by name).
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

/// One column value of a tuple.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Value {
    /// `n`
    Null,
    /// `u`: unchanged TOASTed value; leave the target column as it is.
    UnchangedToast,
    /// `t`: the value in PostgreSQL's text output format.
    Text(String),
    /// `b`: binary format (only with the `binary` option, which we do not use).
    Binary(Vec<u8>),
}

pub type Tuple = Vec<Value>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Message {
    /// `B`
    Begin {
        final_lsn: Lsn,
        commit_time: i64,
        xid: u32,
    },
    /// `C`
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: i64,
    },
    /// `O`
    Origin { lsn: Lsn, name: String },
    /// `R`
    Relation(Relation),
    /// `Y`
    Type {
        oid: u32,
        schema: String,
        name: String,
    },
    /// `I`
    Insert { rel: u32, new: Tuple },
    /// `U`: `old` is the `K` (old key, only when the key changed) or `O`
    /// (whole old row, REPLICA IDENTITY FULL) tuple when present.
    Update {
        rel: u32,
        old: Option<OldTuple>,
        new: Tuple,
    },
    /// `D`
    Delete { rel: u32, old: OldTuple },
    /// `T`
    Truncate {
        cascade: bool,
        restart_identity: bool,
        rels: Vec<u32>,
    },
    /// `M`
    LogicalMessage {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum OldTuple {
    /// `K`: replica identity columns only (others are Null).
    Key(Tuple),
    /// `O`: the whole old row.
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput message is empty")]
    Empty,
    #[error("pgoutput message {kind:?} is truncated at byte {at}")]
    Truncated { kind: char, at: usize },
    #[error("unknown pgoutput message type {0:#04x}")]
    UnknownMessage(u8),
    #[error("pgoutput message {kind:?} has unknown {what} {byte:#04x} at byte {at}")]
    Unexpected {
        kind: char,
        what: &'static str,
        byte: u8,
        at: usize,
    },
    #[error("pgoutput message {kind:?} has a string that is not UTF-8 at byte {at}")]
    NotUtf8 { kind: char, at: usize },
    #[error("pgoutput message {kind:?} has {extra} trailing bytes")]
    Trailing { kind: char, extra: usize },
}

impl Message {
    /// The message type byte (`B`, `C`, `O`, `R`, `Y`, `I`, `U`, `D`, `T`, `M`).
    pub fn kind(&self) -> u8 {
        match self {
            Message::Begin { .. } => b'B',
            Message::Commit { .. } => b'C',
            Message::Origin { .. } => b'O',
            Message::Relation(_) => b'R',
            Message::Type { .. } => b'Y',
            Message::Insert { .. } => b'I',
            Message::Update { .. } => b'U',
            Message::Delete { .. } => b'D',
            Message::Truncate { .. } => b'T',
            Message::LogicalMessage { .. } => b'M',
        }
    }
}

/// Namespace PostgreSQL sends as the empty string.
const PG_CATALOG: &str = "pg_catalog";

/// Relation column flag: part of the replica identity.
const COLUMN_KEY: u8 = 1;
/// Truncate option bits.
const TRUNCATE_CASCADE: u8 = 1;
const TRUNCATE_RESTART_IDENTITY: u8 = 2;
/// Logical message flag: transactional.
const MESSAGE_TRANSACTIONAL: u8 = 1;

/// Smallest encoding of one Relation column: flags, empty name, type oid,
/// type modifier.
const MIN_COLUMN_LEN: usize = 1 + 1 + 4 + 4;
/// Smallest encoding of one tuple column: the kind byte alone (`n`, `u`).
const MIN_VALUE_LEN: usize = 1;

/// Cursor over one message. Offsets in errors count from the type byte.
struct Reader<'a> {
    kind: char,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn truncated(&self) -> DecodeError {
        DecodeError::Truncated {
            kind: self.kind,
            at: self.pos,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(self.truncated());
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        Ok(Lsn(self.u64()?))
    }

    /// `Int32` length followed by that many bytes.
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let start = self.pos;
        let len = self.u32()?;
        match usize::try_from(len) {
            Ok(len) if len <= self.remaining() => self.take(len),
            _ => {
                self.pos = start;
                Err(self.truncated())
            }
        }
    }

    fn utf8(&self, bytes: &'a [u8], start: usize) -> Result<String, DecodeError> {
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(DecodeError::NotUtf8 {
                kind: self.kind,
                at: start + e.valid_up_to(),
            }),
        }
    }

    /// NUL-terminated UTF-8 string.
    fn cstring(&mut self) -> Result<String, DecodeError> {
        let start = self.pos;
        let rest = &self.buf[start..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(self.truncated());
        };
        let s = self.utf8(&rest[..nul], start)?;
        self.pos = start + nul + 1;
        Ok(s)
    }

    /// Namespace string; the empty string stands for `pg_catalog`.
    fn namespace(&mut self) -> Result<String, DecodeError> {
        let s = self.cstring()?;
        Ok(if s.is_empty() {
            PG_CATALOG.to_owned()
        } else {
            s
        })
    }

    fn unexpected(&self, what: &'static str, byte: u8, at: usize) -> DecodeError {
        DecodeError::Unexpected {
            kind: self.kind,
            what,
            byte,
            at,
        }
    }

    /// A flags byte whose bits must all be within `known`.
    fn flags(&mut self, what: &'static str, known: u8) -> Result<u8, DecodeError> {
        let at = self.pos;
        let b = self.u8()?;
        if b & !known != 0 {
            return Err(self.unexpected(what, b, at));
        }
        Ok(b)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = usize::from(self.u16()?);
        let mut out = Vec::with_capacity(n.min(self.remaining() / MIN_VALUE_LEN));
        for _ in 0..n {
            let at = self.pos;
            let value = match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let start = self.pos + 4;
                    let bytes = self.bytes()?;
                    Value::Text(self.utf8(bytes, start)?)
                }
                b'b' => Value::Binary(self.bytes()?.to_vec()),
                other => return Err(self.unexpected("tuple column kind", other, at)),
            };
            out.push(value);
        }
        Ok(out)
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let oid = self.u32()?;
        let schema = self.namespace()?;
        let name = self.cstring()?;
        let at = self.pos;
        let replica_identity = match self.u8()? {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            other => return Err(self.unexpected("replica identity", other, at)),
        };
        let n = usize::from(self.u16()?);
        let mut columns = Vec::with_capacity(n.min(self.remaining() / MIN_COLUMN_LEN));
        for _ in 0..n {
            let flags = self.flags("column flags", COLUMN_KEY)?;
            columns.push(Column {
                key: flags & COLUMN_KEY != 0,
                name: self.cstring()?,
                type_oid: self.u32()?,
                type_modifier: self.i32()?,
            });
        }
        Ok(Relation {
            oid,
            schema,
            name,
            replica_identity,
            columns,
        })
    }

    fn message(&mut self) -> Result<Message, DecodeError> {
        Ok(match self.kind {
            'B' => Message::Begin {
                final_lsn: self.lsn()?,
                commit_time: self.i64()?,
                xid: self.u32()?,
            },
            'C' => Message::Commit {
                flags: self.u8()?,
                commit_lsn: self.lsn()?,
                end_lsn: self.lsn()?,
                commit_time: self.i64()?,
            },
            'O' => Message::Origin {
                lsn: self.lsn()?,
                name: self.cstring()?,
            },
            'R' => Message::Relation(self.relation()?),
            'Y' => Message::Type {
                oid: self.u32()?,
                schema: self.namespace()?,
                name: self.cstring()?,
            },
            'I' => {
                let rel = self.u32()?;
                let at = self.pos;
                match self.u8()? {
                    b'N' => Message::Insert {
                        rel,
                        new: self.tuple()?,
                    },
                    other => return Err(self.unexpected("tuple marker", other, at)),
                }
            }
            'U' => {
                let rel = self.u32()?;
                let mut at = self.pos;
                let mut marker = self.u8()?;
                let old = match marker {
                    b'K' | b'O' => {
                        let tuple = self.tuple()?;
                        at = self.pos;
                        let old = if marker == b'K' {
                            OldTuple::Key(tuple)
                        } else {
                            OldTuple::Full(tuple)
                        };
                        marker = self.u8()?;
                        Some(old)
                    }
                    _ => None,
                };
                if marker != b'N' {
                    return Err(self.unexpected("tuple marker", marker, at));
                }
                Message::Update {
                    rel,
                    old,
                    new: self.tuple()?,
                }
            }
            'D' => {
                let rel = self.u32()?;
                let at = self.pos;
                let old = match self.u8()? {
                    b'K' => OldTuple::Key(self.tuple()?),
                    b'O' => OldTuple::Full(self.tuple()?),
                    other => return Err(self.unexpected("tuple marker", other, at)),
                };
                Message::Delete { rel, old }
            }
            'T' => {
                let n = self.u32()?;
                let options = self.flags(
                    "truncate options",
                    TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY,
                )?;
                let cap = (self.remaining() / 4).min(usize::try_from(n).unwrap_or(usize::MAX));
                let mut rels = Vec::with_capacity(cap);
                for _ in 0..n {
                    rels.push(self.u32()?);
                }
                Message::Truncate {
                    cascade: options & TRUNCATE_CASCADE != 0,
                    restart_identity: options & TRUNCATE_RESTART_IDENTITY != 0,
                    rels,
                }
            }
            'M' => {
                let flags = self.flags("message flags", MESSAGE_TRANSACTIONAL)?;
                Message::LogicalMessage {
                    transactional: flags & MESSAGE_TRANSACTIONAL != 0,
                    lsn: self.lsn()?,
                    prefix: self.cstring()?,
                    content: self.bytes()?.to_vec(),
                }
            }
            // `decode` only builds readers for the kinds above.
            _ => return Err(DecodeError::UnknownMessage(self.kind as u8)),
        })
    }
}

/// Decode one pgoutput message (the `data` column of one row).
///
/// An empty namespace decodes as `pg_catalog`. Flag bits that protocol
/// version 1 does not define are rejected, as are bytes after the message.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let Some(&kind) = bytes.first() else {
        return Err(DecodeError::Empty);
    };
    if !matches!(
        kind,
        b'B' | b'C' | b'O' | b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M'
    ) {
        return Err(DecodeError::UnknownMessage(kind));
    }
    let mut r = Reader {
        kind: char::from(kind),
        buf: bytes,
        pos: 1,
    };
    let msg = r.message()?;
    match r.remaining() {
        0 => Ok(msg),
        extra => Err(DecodeError::Trailing {
            kind: r.kind,
            extra,
        }),
    }
}

/// Encode one message the way pgoutput sends it; the inverse of [`decode`].
///
/// The namespace `pg_catalog` is written as the empty string, as PostgreSQL
/// does.
///
/// # Panics
///
/// If the message cannot be represented: a string containing NUL, more than
/// 65535 columns, more than `u32::MAX` relations, or a value or content
/// longer than `u32::MAX` bytes.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64));
    w.u8(msg.kind());
    match msg {
        Message::Begin {
            final_lsn,
            commit_time,
            xid,
        } => {
            w.u64(final_lsn.0);
            w.i64(*commit_time);
            w.u32(*xid);
        }
        Message::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
        } => {
            w.u8(*flags);
            w.u64(commit_lsn.0);
            w.u64(end_lsn.0);
            w.i64(*commit_time);
        }
        Message::Origin { lsn, name } => {
            w.u64(lsn.0);
            w.cstring(name);
        }
        Message::Relation(rel) => {
            w.u32(rel.oid);
            w.namespace(&rel.schema);
            w.cstring(&rel.name);
            w.u8(match rel.replica_identity {
                ReplicaIdentity::Default => b'd',
                ReplicaIdentity::Nothing => b'n',
                ReplicaIdentity::Full => b'f',
                ReplicaIdentity::Index => b'i',
            });
            w.count16(rel.columns.len());
            for col in &rel.columns {
                w.u8(if col.key { COLUMN_KEY } else { 0 });
                w.cstring(&col.name);
                w.u32(col.type_oid);
                w.i32(col.type_modifier);
            }
        }
        Message::Type { oid, schema, name } => {
            w.u32(*oid);
            w.namespace(schema);
            w.cstring(name);
        }
        Message::Insert { rel, new } => {
            w.u32(*rel);
            w.u8(b'N');
            w.tuple(new);
        }
        Message::Update { rel, old, new } => {
            w.u32(*rel);
            if let Some(old) = old {
                w.old(old);
            }
            w.u8(b'N');
            w.tuple(new);
        }
        Message::Delete { rel, old } => {
            w.u32(*rel);
            w.old(old);
        }
        Message::Truncate {
            cascade,
            restart_identity,
            rels,
        } => {
            w.u32(u32::try_from(rels.len()).expect("pgoutput Truncate: too many relations"));
            let mut options = 0;
            if *cascade {
                options |= TRUNCATE_CASCADE;
            }
            if *restart_identity {
                options |= TRUNCATE_RESTART_IDENTITY;
            }
            w.u8(options);
            for rel in rels {
                w.u32(*rel);
            }
        }
        Message::LogicalMessage {
            transactional,
            lsn,
            prefix,
            content,
        } => {
            w.u8(if *transactional {
                MESSAGE_TRANSACTIONAL
            } else {
                0
            });
            w.u64(lsn.0);
            w.cstring(prefix);
            w.bytes(content);
        }
    }
    w.0
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn count16(&mut self, n: usize) {
        let n = u16::try_from(n).expect("pgoutput: more than 65535 columns");
        self.0.extend_from_slice(&n.to_be_bytes());
    }

    fn cstring(&mut self, s: &str) {
        assert!(!s.contains('\0'), "pgoutput: string contains NUL: {s:?}");
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
    }

    fn namespace(&mut self, s: &str) {
        self.cstring(if s == PG_CATALOG { "" } else { s });
    }

    fn bytes(&mut self, b: &[u8]) {
        self.u32(u32::try_from(b.len()).expect("pgoutput: value longer than u32::MAX bytes"));
        self.0.extend_from_slice(b);
    }

    fn tuple(&mut self, t: &Tuple) {
        self.count16(t.len());
        for v in t {
            match v {
                Value::Null => self.u8(b'n'),
                Value::UnchangedToast => self.u8(b'u'),
                Value::Text(s) => {
                    self.u8(b't');
                    self.bytes(s.as_bytes());
                }
                Value::Binary(b) => {
                    self.u8(b'b');
                    self.bytes(b);
                }
            }
        }
    }

    fn old(&mut self, old: &OldTuple) {
        match old {
            OldTuple::Key(_) => self.u8(b'K'),
            OldTuple::Full(_) => self.u8(b'O'),
        }
        self.tuple(old.tuple());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::Text(s.to_owned())
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// OID 16385 (0x4001), used as the relation in the fixtures.
    const OID: &[u8] = &[0x00, 0x00, 0x40, 0x01];

    fn relation_fixture() -> Vec<u8> {
        cat(&[
            b"R",
            OID,
            b"public\0",
            b"accounts\0",
            b"d",
            &[0x00, 0x03],
            // id int4, key
            &[0x01],
            b"id\0",
            &[0x00, 0x00, 0x00, 0x17],
            &[0xFF, 0xFF, 0xFF, 0xFF],
            // name text
            &[0x00],
            b"name\0",
            &[0x00, 0x00, 0x00, 0x19],
            &[0xFF, 0xFF, 0xFF, 0xFF],
            // balance numeric(10,2): typmod ((10 << 16) | 2) + 4
            &[0x00],
            b"balance\0",
            &[0x00, 0x00, 0x06, 0xA4],
            &[0x00, 0x0A, 0x00, 0x06],
        ])
    }

    fn relation_expected() -> Message {
        Message::Relation(Relation {
            oid: 16385,
            schema: "public".into(),
            name: "accounts".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                Column {
                    key: true,
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                },
                Column {
                    key: false,
                    name: "name".into(),
                    type_oid: 25,
                    type_modifier: -1,
                },
                Column {
                    key: false,
                    name: "balance".into(),
                    type_oid: 1700,
                    type_modifier: 655366,
                },
            ],
        })
    }

    fn type_fixture() -> Vec<u8> {
        cat(&[b"Y", &[0x00, 0x00, 0x00, 0x17], b"\0", b"int4\0"])
    }

    fn insert_fixture() -> Vec<u8> {
        cat(&[
            b"I",
            OID,
            b"N",
            &[0x00, 0x04],
            b"t",
            &[0x00, 0x00, 0x00, 0x02],
            b"42",
            b"n",
            b"u",
            b"t",
            &[0x00, 0x00, 0x00, 0x06],
            "héllo".as_bytes(),
        ])
    }

    fn update_key_fixture() -> Vec<u8> {
        cat(&[
            b"U",
            OID,
            b"K",
            &[0x00, 0x03],
            b"t",
            &[0x00, 0x00, 0x00, 0x01],
            b"1",
            b"n",
            b"n",
            b"N",
            &[0x00, 0x03],
            b"t",
            &[0x00, 0x00, 0x00, 0x01],
            b"2",
            b"t",
            &[0x00, 0x00, 0x00, 0x03],
            b"bob",
            b"u",
        ])
    }

    fn update_old_fixture() -> Vec<u8> {
        cat(&[
            b"U",
            OID,
            b"O",
            &[0x00, 0x02],
            b"t",
            &[0x00, 0x00, 0x00, 0x01],
            b"1",
            b"t",
            &[0x00, 0x00, 0x00, 0x05],
            b"10.00",
            b"N",
            &[0x00, 0x02],
            b"t",
            &[0x00, 0x00, 0x00, 0x01],
            b"1",
            b"t",
            &[0x00, 0x00, 0x00, 0x05],
            b"12.50",
        ])
    }

    fn update_new_only_fixture() -> Vec<u8> {
        cat(&[
            b"U",
            OID,
            b"N",
            &[0x00, 0x01],
            b"t",
            &[0x00, 0x00, 0x00, 0x01],
            b"7",
        ])
    }

    fn delete_fixture() -> Vec<u8> {
        cat(&[
            b"D",
            OID,
            b"K",
            &[0x00, 0x03],
            b"t",
            &[0x00, 0x00, 0x00, 0x01],
            b"1",
            b"n",
            b"n",
        ])
    }

    fn truncate_fixture() -> Vec<u8> {
        cat(&[
            b"T",
            &[0x00, 0x00, 0x00, 0x02],
            &[0x03],
            OID,
            &[0x00, 0x00, 0x40, 0x06],
        ])
    }

    fn begin_fixture() -> Vec<u8> {
        cat(&[
            b"B",
            &[0x00, 0x00, 0x00, 0x16, 0xB3, 0x74, 0xD8, 0x48],
            &[0x00, 0x02, 0xB8, 0x6B, 0x1A, 0x2C, 0x3D, 0x4E],
            &[0x00, 0x00, 0x03, 0x09],
        ])
    }

    fn commit_fixture() -> Vec<u8> {
        cat(&[
            b"C",
            &[0x00],
            &[0x00, 0x00, 0x00, 0x16, 0xB3, 0x74, 0xD8, 0x48],
            &[0x00, 0x00, 0x00, 0x16, 0xB3, 0x74, 0xD8, 0x78],
            &[0x00, 0x02, 0xB8, 0x6B, 0x1A, 0x2C, 0x3D, 0x4E],
        ])
    }

    fn origin_fixture() -> Vec<u8> {
        cat(&[
            b"O",
            &[0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x10],
            b"upstream\0",
        ])
    }

    fn logical_message_fixture() -> Vec<u8> {
        cat(&[
            b"M",
            &[0x01],
            &[0x00, 0x00, 0x00, 0x16, 0xB3, 0x74, 0xD8, 0x50],
            b"courier\0",
            &[0x00, 0x00, 0x00, 0x03],
            &[0x00, 0xFF, 0x7F],
        ])
    }

    fn fixtures() -> Vec<(Vec<u8>, Message)> {
        vec![
            (relation_fixture(), relation_expected()),
            (
                type_fixture(),
                Message::Type {
                    oid: 23,
                    schema: "pg_catalog".into(),
                    name: "int4".into(),
                },
            ),
            (
                insert_fixture(),
                Message::Insert {
                    rel: 16385,
                    new: vec![
                        text("42"),
                        Value::Null,
                        Value::UnchangedToast,
                        text("héllo"),
                    ],
                },
            ),
            (
                update_key_fixture(),
                Message::Update {
                    rel: 16385,
                    old: Some(OldTuple::Key(vec![text("1"), Value::Null, Value::Null])),
                    new: vec![text("2"), text("bob"), Value::UnchangedToast],
                },
            ),
            (
                update_old_fixture(),
                Message::Update {
                    rel: 16385,
                    old: Some(OldTuple::Full(vec![text("1"), text("10.00")])),
                    new: vec![text("1"), text("12.50")],
                },
            ),
            (
                update_new_only_fixture(),
                Message::Update {
                    rel: 16385,
                    old: None,
                    new: vec![text("7")],
                },
            ),
            (
                delete_fixture(),
                Message::Delete {
                    rel: 16385,
                    old: OldTuple::Key(vec![text("1"), Value::Null, Value::Null]),
                },
            ),
            (
                truncate_fixture(),
                Message::Truncate {
                    cascade: true,
                    restart_identity: true,
                    rels: vec![16385, 16390],
                },
            ),
            (
                begin_fixture(),
                Message::Begin {
                    final_lsn: Lsn(0x16_B374_D848),
                    commit_time: 0x0002_B86B_1A2C_3D4E,
                    xid: 777,
                },
            ),
            (
                commit_fixture(),
                Message::Commit {
                    flags: 0,
                    commit_lsn: Lsn(0x16_B374_D848),
                    end_lsn: Lsn(0x16_B374_D878),
                    commit_time: 0x0002_B86B_1A2C_3D4E,
                },
            ),
            (
                origin_fixture(),
                Message::Origin {
                    lsn: Lsn(0x1_0000_0010),
                    name: "upstream".into(),
                },
            ),
            (
                logical_message_fixture(),
                Message::LogicalMessage {
                    transactional: true,
                    lsn: Lsn(0x16_B374_D850),
                    prefix: "courier".into(),
                    content: vec![0x00, 0xFF, 0x7F],
                },
            ),
        ]
    }

    #[test]
    fn hand_built_fixtures_decode_to_the_expected_messages() {
        for (bytes, expected) in fixtures() {
            assert_eq!(
                decode(&bytes),
                Ok(expected),
                "fixture {:?}",
                char::from(bytes[0])
            );
        }
    }

    #[test]
    fn encoding_a_decoded_fixture_gives_back_the_same_bytes() {
        for (bytes, _) in fixtures() {
            let msg = decode(&bytes).unwrap();
            assert_eq!(encode(&msg), bytes, "fixture {:?}", char::from(bytes[0]));
        }
    }

    #[test]
    fn every_message_kind_survives_an_encode_decode_round_trip() {
        let tuple = vec![
            Value::Null,
            Value::UnchangedToast,
            text(""),
            text("with\0nul and ünïcode"),
            Value::Binary(vec![]),
            Value::Binary(vec![0, 1, 2, 255]),
        ];
        let mut messages = vec![
            Message::Begin {
                final_lsn: Lsn(u64::MAX),
                commit_time: i64::MIN,
                xid: u32::MAX,
            },
            Message::Begin {
                final_lsn: Lsn::ZERO,
                commit_time: 0,
                xid: 0,
            },
            Message::Commit {
                flags: 0xAB,
                commit_lsn: Lsn(1),
                end_lsn: Lsn(2),
                commit_time: -1,
            },
            Message::Origin {
                lsn: Lsn(42),
                name: String::new(),
            },
            Message::Type {
                oid: 16400,
                schema: "public".into(),
                name: "mood".into(),
            },
            Message::Type {
                oid: 25,
                schema: "pg_catalog".into(),
                name: "text".into(),
            },
            Message::Insert {
                rel: 1,
                new: tuple.clone(),
            },
            Message::Insert {
                rel: 1,
                new: vec![],
            },
            Message::Update {
                rel: 2,
                old: None,
                new: tuple.clone(),
            },
            Message::Update {
                rel: 2,
                old: Some(OldTuple::Key(tuple.clone())),
                new: tuple.clone(),
            },
            Message::Update {
                rel: 2,
                old: Some(OldTuple::Full(tuple.clone())),
                new: vec![],
            },
            Message::Delete {
                rel: 3,
                old: OldTuple::Key(tuple.clone()),
            },
            Message::Delete {
                rel: 3,
                old: OldTuple::Full(vec![]),
            },
            Message::LogicalMessage {
                transactional: false,
                lsn: Lsn(9),
                prefix: "p".into(),
                content: vec![],
            },
            Message::LogicalMessage {
                transactional: true,
                lsn: Lsn(9),
                prefix: String::new(),
                content: vec![0; 300],
            },
        ];
        for identity in [
            ReplicaIdentity::Default,
            ReplicaIdentity::Nothing,
            ReplicaIdentity::Full,
            ReplicaIdentity::Index,
        ] {
            messages.push(Message::Relation(Relation {
                oid: 7,
                schema: "pg_catalog".into(),
                name: "t".into(),
                replica_identity: identity,
                columns: vec![
                    Column {
                        key: true,
                        name: "a".into(),
                        type_oid: u32::MAX,
                        type_modifier: i32::MIN,
                    },
                    Column {
                        key: false,
                        name: String::new(),
                        type_oid: 0,
                        type_modifier: 0,
                    },
                ],
            }));
        }
        for (cascade, restart_identity) in
            [(false, false), (true, false), (false, true), (true, true)]
        {
            messages.push(Message::Truncate {
                cascade,
                restart_identity,
                rels: vec![1, u32::MAX],
            });
        }
        messages.push(Message::Truncate {
            cascade: false,
            restart_identity: false,
            rels: vec![],
        });

        let mut kinds: Vec<u8> = messages.iter().map(Message::kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds, b"BCDIMORTUY");

        for msg in messages {
            assert_eq!(decode(&encode(&msg)), Ok(msg.clone()), "{msg:?}");
        }
    }

    #[test]
    fn an_empty_namespace_decodes_as_pg_catalog_and_encodes_back_as_empty() {
        let msg = decode(&type_fixture()).unwrap();
        assert!(matches!(&msg, Message::Type { schema, .. } if schema == "pg_catalog"));
        assert_eq!(encode(&msg), type_fixture());
    }

    #[test]
    fn every_truncation_of_every_fixture_is_an_error() {
        for (bytes, _) in fixtures() {
            let kind = char::from(bytes[0]);
            assert_eq!(decode(&[]), Err(DecodeError::Empty));
            for len in 1..bytes.len() {
                match decode(&bytes[..len]) {
                    Err(DecodeError::Truncated { kind: k, at }) => {
                        assert_eq!(k, kind);
                        assert!(at <= len, "{kind:?} cut at {len} reported at {at}");
                    }
                    other => panic!("{kind:?} cut at {len} gave {other:?}"),
                }
            }
        }
    }

    #[test]
    fn huge_counts_and_lengths_with_few_bytes_fail_at_the_first_missing_field() {
        // Relation claiming 65535 columns with only 3 bytes of the first one.
        let relation = cat(&[
            b"R",
            OID,
            b"s\0",
            b"t\0",
            b"d",
            &[0xFF, 0xFF],
            &[0x01],
            b"a\0",
        ]);
        assert_eq!(
            decode(&relation),
            Err(DecodeError::Truncated { kind: 'R', at: 15 })
        );

        // Tuple claiming 65535 columns, two present.
        let insert = cat(&[b"I", OID, b"N", &[0xFF, 0xFF], b"nn"]);
        assert_eq!(
            decode(&insert),
            Err(DecodeError::Truncated { kind: 'I', at: 10 })
        );

        // Text values claiming 4 GiB - 1 and 2 GiB - 1 bytes.
        for len in [[0xFF, 0xFF, 0xFF, 0xFF], [0x7F, 0xFF, 0xFF, 0xFF]] {
            let insert = cat(&[b"I", OID, b"N", &[0x00, 0x01], b"t", &len, b"abc"]);
            assert_eq!(
                decode(&insert),
                Err(DecodeError::Truncated { kind: 'I', at: 9 })
            );
            let binary = cat(&[b"I", OID, b"N", &[0x00, 0x01], b"b", &len, b"abc"]);
            assert_eq!(
                decode(&binary),
                Err(DecodeError::Truncated { kind: 'I', at: 9 })
            );
        }

        // Truncate claiming 4 Gi relations, one present.
        let truncate = cat(&[b"T", &[0xFF, 0xFF, 0xFF, 0xFF], &[0x00], OID]);
        assert_eq!(
            decode(&truncate),
            Err(DecodeError::Truncated { kind: 'T', at: 10 })
        );

        // Logical message content claiming 4 GiB - 1 bytes.
        let message = cat(&[
            b"M",
            &[0x00],
            &[0; 8],
            b"p\0",
            &[0xFF, 0xFF, 0xFF, 0xFF],
            b"x",
        ]);
        assert_eq!(
            decode(&message),
            Err(DecodeError::Truncated { kind: 'M', at: 12 })
        );
    }

    #[test]
    fn text_that_is_not_utf8_is_rejected_with_its_offset() {
        let insert = cat(&[
            b"I",
            OID,
            b"N",
            &[0x00, 0x01],
            b"t",
            &[0x00, 0x00, 0x00, 0x03],
            &[b'a', 0xFF, b'b'],
        ]);
        assert_eq!(
            decode(&insert),
            Err(DecodeError::NotUtf8 { kind: 'I', at: 14 })
        );

        let mut relation = relation_fixture();
        relation[5] = 0xC3; // first byte of "public"
        assert_eq!(
            decode(&relation),
            Err(DecodeError::NotUtf8 { kind: 'R', at: 5 })
        );
    }

    #[test]
    fn an_unknown_kind_byte_is_rejected() {
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownMessage(b'Z')));
        // Streaming start (protocol version 2) is not part of version 1.
        assert_eq!(
            decode(b"S\0\0\0\x01\x01"),
            Err(DecodeError::UnknownMessage(b'S'))
        );
        assert_eq!(decode(&[0x00]), Err(DecodeError::UnknownMessage(0)));
    }

    #[test]
    fn a_trailing_byte_after_any_fixture_is_rejected() {
        for (mut bytes, _) in fixtures() {
            let kind = char::from(bytes[0]);
            bytes.push(0);
            assert_eq!(
                decode(&bytes),
                Err(DecodeError::Trailing { kind, extra: 1 })
            );
        }
    }

    #[test]
    fn unknown_markers_identities_and_flag_bits_are_rejected_with_their_offset() {
        let unexpected = |kind, what, byte, at| {
            Err(DecodeError::Unexpected {
                kind,
                what,
                byte,
                at,
            })
        };

        let mut relation = relation_fixture();
        relation[21] = b'x';
        assert_eq!(
            decode(&relation),
            unexpected('R', "replica identity", b'x', 21)
        );
        let mut relation = relation_fixture();
        relation[24] = 0x02;
        assert_eq!(decode(&relation), unexpected('R', "column flags", 0x02, 24));

        let mut insert = insert_fixture();
        insert[5] = b'K';
        assert_eq!(decode(&insert), unexpected('I', "tuple marker", b'K', 5));
        let mut insert = insert_fixture();
        insert[8] = b'x';
        assert_eq!(
            decode(&insert),
            unexpected('I', "tuple column kind", b'x', 8)
        );

        let mut update = update_key_fixture();
        update[5] = b'X';
        assert_eq!(decode(&update), unexpected('U', "tuple marker", b'X', 5));
        let mut update = update_key_fixture();
        update[16] = b'K';
        assert_eq!(decode(&update), unexpected('U', "tuple marker", b'K', 16));

        let mut delete = delete_fixture();
        delete[5] = b'N';
        assert_eq!(decode(&delete), unexpected('D', "tuple marker", b'N', 5));

        let mut truncate = truncate_fixture();
        truncate[5] = 0x04;
        assert_eq!(
            decode(&truncate),
            unexpected('T', "truncate options", 0x04, 5)
        );

        let mut message = logical_message_fixture();
        message[1] = 0x81;
        assert_eq!(decode(&message), unexpected('M', "message flags", 0x81, 1));
    }

    /// xorshift64* with a fixed seed: the same inputs on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
    }

    /// Decoding must not panic; whatever decodes must survive a round trip.
    fn check(bytes: &[u8]) {
        if let Ok(msg) = decode(bytes) {
            assert_eq!(decode(&encode(&msg)), Ok(msg.clone()), "input {bytes:?}");
        }
    }

    #[test]
    fn random_bytes_and_mutated_fixtures_never_panic_the_decoder() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        const KINDS: &[u8] = b"BCORYIUDTM";
        const INTERESTING: &[u8] = &[
            0, 1, 0x7F, 0x80, 0xFF, b'n', b'u', b't', b'b', b'K', b'O', b'N',
        ];

        for _ in 0..20_000 {
            let len = rng.below(64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            if !bytes.is_empty() && rng.below(4) != 0 {
                bytes[0] = KINDS[rng.below(KINDS.len())];
            }
            check(&bytes);
        }

        let fixtures = fixtures();
        for _ in 0..20_000 {
            let mut bytes = fixtures[rng.below(fixtures.len())].0.clone();
            for _ in 0..=rng.below(3) {
                let at = rng.below(bytes.len() + 1);
                match rng.below(6) {
                    0 if at < bytes.len() => bytes[at] ^= 1 << rng.below(8),
                    1 if at < bytes.len() => bytes[at] = INTERESTING[rng.below(INTERESTING.len())],
                    2 => bytes.insert(at, rng.byte()),
                    3 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    4 => bytes.truncate(at),
                    _ => {
                        // Overwrite with a huge big-endian count or length.
                        for b in bytes.iter_mut().skip(at).take(1 + rng.below(4)) {
                            *b = 0xFF;
                        }
                    }
                }
            }
            check(&bytes);
        }
    }
}
