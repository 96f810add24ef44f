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
mod tests;
