//! Initial copy: what travels with a table copy, and the seed file that
//! carries a copy on a disk instead of the link.
//!
//! A copy is one source-order transaction in the spool (see
//! `sender/src/copy/` for how its cut is taken and its rows read, and
//! `sender/src/capture/splice.rs` for how it is spliced into the stream,
//! or `sender/src/capture/export.rs` into a seed file). Its records hold
//! ordinary pgoutput messages, so the receiver applies it with the same code
//! as any change:
//!
//! ```text
//! M  pgcourier.copy   CopyMeta as JSON (tables, their definitions, the cut)
//! R  relation         one per copied table
//! T  truncate         all copied tables, one statement
//! I  insert ...       every row of every table, table after table
//! ```
//!
//! Its commit LSN is `cut - 1`: above every transaction the snapshot
//! contains and below every one it does not, so the progress marker orders
//! it exactly between the two.
//!
//! A seed file is the same transaction written to a file, with a header that
//! says where the live stream continues (the spool holds a one-message
//! marker transaction, prefix `pgcourier.seed`, at that position):
//!
//! ```text
//! "PGCSEED1" zstd( frame(header) frame(record)* frame(empty) frame(trailer) )
//! frame = u32 big-endian length + bytes
//! ```
//!
//! The trailer holds the SHA-256 of every frame before it and the
//! sender's signature of that digest (with the private key of its TLS
//! identity, in the key's own algorithm: ECDSA P-256 for a key from
//! `keygen`). The header carries the sender's certificate. A reader checks,
//! before anything is applied: that the certificate's fingerprint is one the
//! receiver pins (`sender-fingerprints`), every record's CRC, the count, the
//! digest, and the signature with the certificate's public key. A file
//! rewritten by anyone without the sender's key (content and digest
//! recomputed, header copied from a genuine file) is refused.
//!
//! Copy metadata comes from the file or the link; with `create-tables` the
//! receiver turns it into DDL. [`CopyTable::create_sql`] builds it only from
//! validated type names ([`TypeName`]: identifiers, an optional schema,
//! numeric modifiers, array brackets; identifiers quoted) and the receiver
//! runs one statement per call.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::pg::quote_ident;
use crate::transport::tls::{fingerprint, Fingerprint, Identity};
use crate::Lsn;
use pgcourier_proto::record::{self, MAX_RECORD_BYTES};

/// Prefix of the logical message that opens a copy transaction.
pub const COPY_PREFIX: &str = "pgcourier.copy";
/// Prefix of the marker transaction a seed export leaves in the spool.
pub const SEED_PREFIX: &str = "pgcourier.seed";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyColumn {
    pub name: String,
    /// `format_type(atttypid, atttypmod)` on the source.
    pub type_sql: String,
    pub not_null: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyTable {
    /// Source relation OID (the pgoutput relation id).
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub columns: Vec<CopyColumn>,
    pub primary_key: Vec<String>,
    /// Planner estimates, for progress and ETA only.
    pub rows_estimate: u64,
    pub bytes_estimate: u64,
}

impl CopyTable {
    /// `"schema"."table"`, always quoted.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// `CREATE TABLE IF NOT EXISTS` with the source's columns, types, NOT
    /// NULL and primary key (receiver setting `create-tables`): one
    /// statement, every identifier quoted, every type re-rendered from a
    /// validated [`TypeName`]. A column whose type text is not a type name
    /// is refused, naming the table and the column.
    pub fn create_sql(&self) -> Result<String, BadType> {
        let mut cols = Vec::with_capacity(self.columns.len() + 1);
        for c in &self.columns {
            let ty = TypeName::parse(&c.type_sql).map_err(|why| BadType {
                table: self.quoted(),
                column: c.name.clone(),
                type_sql: c.type_sql.clone(),
                why,
            })?;
            cols.push(format!(
                "{} {}{}",
                quote_ident(&c.name),
                ty,
                if c.not_null { " NOT NULL" } else { "" }
            ));
        }
        if !self.primary_key.is_empty() {
            let pk: Vec<String> = self.primary_key.iter().map(|c| quote_ident(c)).collect();
            cols.push(format!("PRIMARY KEY ({})", pk.join(", ")));
        }
        Ok(format!(
            "CREATE TABLE IF NOT EXISTS {} ({})",
            self.quoted(),
            cols.join(", ")
        ))
    }
}

/// A column type in copy metadata that is not a type name.
#[derive(Debug, thiserror::Error)]
#[error("table {table} column {column:?}: type {type_sql:?} is not a type name ({why}); the copy metadata is not what a pgcourier sender writes: check where it came from")]
pub struct BadType {
    pub table: String,
    pub column: String,
    pub type_sql: String,
    pub why: String,
}

/// A validated column type, as `format_type` writes it on the source:
/// a (possibly schema-qualified) type name, or one of SQL's keyword type
/// names (`double precision`, `timestamp(3) with time zone`, ...), then
/// optional numeric modifiers and array brackets. Rendered back with every
/// identifier quoted; keyword names, numbers and punctuation are the only
/// other text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeName(String);

impl std::fmt::Display for TypeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TypeToken {
    Word(String),
    Quoted(String),
    Number(String),
    Punct(char),
}

/// The longest type text accepted.
const MAX_TYPE_TEXT: usize = 1024;

/// SQL's keyword type names that `format_type` writes unquoted and that
/// mean something else (or nothing) when quoted.
const KEYWORD_TYPES: &[&str] = &[
    "bigint",
    "bit",
    "boolean",
    "char",
    "character",
    "dec",
    "decimal",
    "double",
    "float",
    "int",
    "integer",
    "interval",
    "national",
    "nchar",
    "numeric",
    "real",
    "smallint",
    "time",
    "timestamp",
    "varchar",
];
const INTERVAL_FIELDS: &[&str] = &["year", "month", "day", "hour", "minute", "second"];

impl TypeName {
    pub fn parse(text: &str) -> Result<TypeName, String> {
        if text.len() > MAX_TYPE_TEXT {
            return Err(format!("longer than {MAX_TYPE_TEXT} bytes"));
        }
        let tokens = Self::tokens(text)?;
        let mut p = TypeParser { tokens, at: 0 };
        let mut out = String::new();
        let keyword = match (p.peek(), p.tokens.get(1)) {
            (Some(TypeToken::Word(w)), next)
                if KEYWORD_TYPES.contains(&w.as_str()) && next != Some(&TypeToken::Punct('.')) =>
            {
                Some(w.clone())
            }
            _ => None,
        };
        match keyword {
            Some(w) => p.keyword_type(&w, &mut out)?,
            None => {
                out.push_str(&p.ident()?);
                if p.eat_punct('.') {
                    out.push('.');
                    out.push_str(&p.ident()?);
                }
                p.modifiers(&mut out)?;
            }
        }
        while p.eat_punct('[') {
            out.push('[');
            if let Some(TypeToken::Number(n)) = p.peek().cloned() {
                p.at += 1;
                out.push_str(&n);
            }
            p.expect_punct(']')?;
            out.push(']');
        }
        match p.peek() {
            None => Ok(TypeName(out)),
            Some(t) => Err(format!("unexpected {} after the type", describe(t))),
        }
    }

    fn tokens(text: &str) -> Result<Vec<TypeToken>, String> {
        let mut out = Vec::new();
        let mut chars = text.chars().peekable();
        while let Some(&c) = chars.peek() {
            if c == ' ' {
                chars.next();
            } else if c.is_ascii_alphabetic() || c == '_' {
                let mut w = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '$' {
                        w.push(c.to_ascii_lowercase());
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(TypeToken::Word(w));
            } else if c.is_ascii_digit() {
                let mut n = String::new();
                while let Some(&c) = chars.peek().filter(|c| c.is_ascii_digit()) {
                    n.push(c);
                    chars.next();
                }
                if n.len() > 10 {
                    return Err(format!("number {n} is too long"));
                }
                out.push(TypeToken::Number(n));
            } else if c == '"' {
                chars.next();
                let mut q = String::new();
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            q.push('"');
                        }
                        Some('"') => break,
                        Some('\0') => return Err("a NUL character".into()),
                        Some(c) => q.push(c),
                        None => return Err("an unterminated quoted name".into()),
                    }
                }
                if q.is_empty() {
                    return Err("an empty quoted name".into());
                }
                out.push(TypeToken::Quoted(q));
            } else if "().,[]".contains(c) {
                chars.next();
                out.push(TypeToken::Punct(c));
            } else {
                return Err(format!("character {c:?} has no place in a type name"));
            }
        }
        if out.is_empty() {
            return Err("empty".into());
        }
        Ok(out)
    }
}

fn describe(t: &TypeToken) -> String {
    match t {
        TypeToken::Word(w) => format!("word {w:?}"),
        TypeToken::Quoted(q) => format!("name {q:?}"),
        TypeToken::Number(n) => format!("number {n}"),
        TypeToken::Punct(c) => format!("{c:?}"),
    }
}

struct TypeParser {
    tokens: Vec<TypeToken>,
    at: usize,
}

impl TypeParser {
    fn peek(&self) -> Option<&TypeToken> {
        self.tokens.get(self.at)
    }

    fn eat_punct(&mut self, c: char) -> bool {
        let hit = self.peek() == Some(&TypeToken::Punct(c));
        self.at += usize::from(hit);
        hit
    }

    fn expect_punct(&mut self, c: char) -> Result<(), String> {
        if self.eat_punct(c) {
            return Ok(());
        }
        Err(match self.peek() {
            Some(t) => format!("expected {c:?}, found {}", describe(t)),
            None => format!("expected {c:?} at the end"),
        })
    }

    fn eat_word(&mut self, w: &str) -> bool {
        let hit = matches!(self.peek(), Some(TypeToken::Word(x)) if x == w);
        self.at += usize::from(hit);
        hit
    }

    fn expect_word(&mut self, w: &str) -> Result<(), String> {
        if self.eat_word(w) {
            return Ok(());
        }
        Err(format!("expected {w:?}"))
    }

    /// An identifier, quoted.
    fn ident(&mut self) -> Result<String, String> {
        match self.peek().cloned() {
            Some(TypeToken::Word(w)) | Some(TypeToken::Quoted(w)) => {
                self.at += 1;
                Ok(quote_ident(&w))
            }
            Some(t) => Err(format!("expected a name, found {}", describe(&t))),
            None => Err("expected a name at the end".into()),
        }
    }

    /// `(n)` or `(n, m, ...)`: numbers only.
    fn modifiers(&mut self, out: &mut String) -> Result<(), String> {
        if !self.eat_punct('(') {
            return Ok(());
        }
        out.push('(');
        loop {
            match self.peek().cloned() {
                Some(TypeToken::Number(n)) => {
                    self.at += 1;
                    out.push_str(&n);
                }
                Some(t) => {
                    return Err(format!(
                        "a type modifier must be a number, not {}",
                        describe(&t)
                    ))
                }
                None => return Err("unterminated type modifiers".into()),
            }
            if self.eat_punct(',') {
                out.push(',');
                continue;
            }
            self.expect_punct(')')?;
            out.push(')');
            return Ok(());
        }
    }

    fn keyword_type(&mut self, first: &str, out: &mut String) -> Result<(), String> {
        self.at += 1;
        out.push_str(first);
        match first {
            "double" => {
                self.expect_word("precision")?;
                out.push_str(" precision");
            }
            "national" => {
                if !self.eat_word("character") {
                    self.expect_word("char")?;
                }
                out.push_str(" character");
                if self.eat_word("varying") {
                    out.push_str(" varying");
                }
            }
            "character" | "char" | "nchar" | "bit" => {
                if self.eat_word("varying") {
                    out.push_str(" varying");
                }
            }
            "interval" => {
                let field = |p: &mut TypeParser, out: &mut String| -> bool {
                    for f in INTERVAL_FIELDS {
                        if p.eat_word(f) {
                            out.push(' ');
                            out.push_str(f);
                            return true;
                        }
                    }
                    false
                };
                if field(self, out) && self.eat_word("to") {
                    out.push_str(" to");
                    if !field(self, out) {
                        return Err("expected an interval field after \"to\"".into());
                    }
                }
            }
            _ => {}
        }
        self.modifiers(out)?;
        if first == "time" || first == "timestamp" {
            if self.eat_word("with") {
                out.push_str(" with");
            } else if self.eat_word("without") {
                out.push_str(" without");
            } else {
                return Ok(());
            }
            self.expect_word("time")?;
            self.expect_word("zone")?;
            out.push_str(" time zone");
        }
        Ok(())
    }
}

/// Content of the `pgcourier.copy` message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyMeta {
    /// WAL insert position at the snapshot: transactions committed below it
    /// are in the copy, the others follow it in the stream.
    pub cut_lsn: Lsn,
    /// Why the copy was made: `initial`, `new table`, `seed`.
    pub reason: String,
    pub tables: Vec<CopyTable>,
    /// A table joining a running publication: this transaction starts join
    /// `id`, whose rows follow in chunks (`store/join.rs`); it carries
    /// no rows and no TRUNCATE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<u64>,
    /// Joins the sender abandoned (its snapshot was lost): the branch drops
    /// their staging tables and held changes first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aborts: Vec<u64>,
}

const SEED_MAGIC: &[u8; 8] = b"PGCSEED1";
/// The header version this code writes and reads: 2 adds the sender's
/// certificate and the signature (files of version 1 are unsigned).
const SEED_VERSION: u32 = 2;
/// What the signature covers, before the digest and the record count.
const SIGNED_CONTEXT: &[u8] = b"pgcourier seed file v2\0";
/// The signature schemes a seed may be signed with (the TLS 1.3 ones ring
/// implements; `keygen` makes ECDSA P-256 keys).
const SEED_SCHEMES: &[rustls::SignatureScheme] = &[
    rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
    rustls::SignatureScheme::ECDSA_NISTP384_SHA384,
    rustls::SignatureScheme::ED25519,
    rustls::SignatureScheme::RSA_PSS_SHA256,
];
const MAX_HEADER_BYTES: usize = 16 << 20;

/// What a seed file says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedHeader {
    pub version: u32,
    /// `<system identifier>/<database>/<slot>` of the source.
    pub source_id: String,
    /// DER certificate of the sender that exported and signed it; its
    /// SHA-256 fingerprint is what receivers pin.
    pub sender_cert: Vec<u8>,
    /// Spool position of the seed's marker: live shipping resumes after it.
    pub marker_seq: u64,
    /// Commit LSN the copy transaction and the marker carry (`cut - 1`).
    pub commit_lsn: Lsn,
    pub cut_lsn: Lsn,
    /// Unix seconds.
    pub created_at: i64,
    pub tables: Vec<String>,
}

impl SeedHeader {
    /// The fingerprint of the sender's certificate.
    pub fn sender_fingerprint(&self) -> Fingerprint {
        fingerprint(&self.sender_cert)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SeedTrailer {
    records: u64,
    sha256: [u8; 32],
    /// The TLS signature scheme (its IANA code) of `signature`.
    scheme: u16,
    /// The sender's signature of [`signed_message`].
    signature: Vec<u8>,
}

/// What the sender signs: a context string, the SHA-256 of every frame
/// before the trailer, and the record count.
fn signed_message(sha256: &[u8; 32], records: u64) -> Vec<u8> {
    let mut m = SIGNED_CONTEXT.to_vec();
    m.extend_from_slice(sha256);
    m.extend_from_slice(&records.to_be_bytes());
    m
}

/// The subjectPublicKey bits of a DER certificate.
fn public_key(cert_der: &[u8]) -> Option<Vec<u8>> {
    use yasna::Tag;
    yasna::parse_der(cert_der, |r| {
        r.read_sequence(|cert| {
            let key = cert.next().read_sequence(|tbs| {
                // [0] version (optional), serialNumber, signature, issuer,
                // validity, subject, then subjectPublicKeyInfo.
                tbs.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_der()))?;
                for _ in 0..5 {
                    tbs.next().read_der()?;
                }
                let key = tbs.next().read_sequence(|spki| {
                    spki.next().read_der()?;
                    spki.next().read_bitvec_bytes()
                })?;
                for _ in 0..3 {
                    tbs.read_optional(|r| r.read_der())?;
                }
                Ok(key)
            })?;
            cert.next().read_der()?;
            cert.next().read_der()?;
            Ok(key)
        })
    })
    .ok()
    .filter(|(_, bits)| bits % 8 == 0)
    .map(|(bytes, _)| bytes)
}

/// Check `signature` (scheme `scheme`) of `message` with the public key of
/// `cert_der`.
fn verify_signature(
    cert_der: &[u8],
    scheme: u16,
    message: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    use ring::signature as sig;
    let scheme = rustls::SignatureScheme::from(scheme);
    let alg: &dyn sig::VerificationAlgorithm = match scheme {
        rustls::SignatureScheme::ECDSA_NISTP256_SHA256 => &sig::ECDSA_P256_SHA256_ASN1,
        rustls::SignatureScheme::ECDSA_NISTP384_SHA384 => &sig::ECDSA_P384_SHA384_ASN1,
        rustls::SignatureScheme::ED25519 => &sig::ED25519,
        rustls::SignatureScheme::RSA_PSS_SHA256 => &sig::RSA_PSS_2048_8192_SHA256,
        other => {
            return Err(format!(
                "signature scheme {other:?} is not one pgcourier uses"
            ))
        }
    };
    let key = public_key(cert_der).ok_or("the sender certificate does not parse")?;
    sig::UnparsedPublicKey::new(alg, key)
        .verify(message, signature)
        .map_err(|_| "the signature does not verify with the sender certificate's key".into())
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cannot read or write seed file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists (a file or a symbolic link): a seed file is always written as a new file; choose another path, or remove it if it is a leftover .partial")]
    Exists { path: PathBuf },
    #[error("{path} is not a pgcourier seed file (wrong magic bytes)")]
    NotSeed { path: PathBuf },
    #[error("seed file {path} is truncated ({what}): copy it again from the sender's export")]
    Truncated { path: PathBuf, what: String },
    #[error("seed file {path} is corrupt ({what}): copy it again from the sender's export")]
    Corrupt { path: PathBuf, what: String },
    #[error("seed file {path} was exported by sender {fingerprint}, which this receiver does not pin (setting `sender-fingerprints`): use a seed from this branch's sender")]
    NotPinned {
        path: PathBuf,
        fingerprint: Fingerprint,
    },
    #[error("seed file {path} has no valid signature of sender {fingerprint} ({what}): it was altered after export, or not exported by that sender; export a new seed")]
    BadSignature {
        path: PathBuf,
        fingerprint: Fingerprint,
        what: String,
    },
    #[error("seed file {path} is of version {version}, unsigned or unknown to this receiver: export a new seed with this version of the sender")]
    Version { path: PathBuf, version: u32 },
    #[error("sign seed file {path} with the sender's key (settings `cert`, `key`)")]
    Sign {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// Create `path` for a seed file: new (`O_CREAT|O_EXCL`: never over an
/// existing file), never through a symbolic link (`O_NOFOLLOW`, and
/// `O_EXCL` refuses a link even when it dangles), mode 0600 whatever the
/// umask: a seed holds every published row.
pub fn create_private(path: &Path) -> Result<File, SeedError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => SeedError::Exists { path: path.into() },
            _ => SeedError::Io {
                path: path.into(),
                source,
            },
        })?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|source| SeedError::Io {
            path: path.into(),
            source,
        })?;
    Ok(file)
}

/// Writes a seed file: header, records, trailer.
pub struct SeedWriter {
    path: PathBuf,
    out: zstd::Encoder<'static, BufWriter<File>>,
    sha: Sha256,
    records: u64,
    signer: Box<dyn rustls::sign::Signer>,
}

impl SeedWriter {
    /// Start a seed file in `file` (opened by the caller, new and private:
    /// see `sender/src/capture/export.rs`), signed by `identity`, whose
    /// certificate replaces the header's `sender_cert`.
    pub fn create(
        path: &Path,
        file: File,
        header: &SeedHeader,
        identity: &Identity,
    ) -> Result<SeedWriter, SeedError> {
        let io = |source| SeedError::Io {
            path: path.into(),
            source,
        };
        let sign_err = |source| SeedError::Sign {
            path: path.into(),
            source,
        };
        let signer = rustls::crypto::ring::sign::any_supported_type(&identity.key)
            .map_err(sign_err)?
            .choose_scheme(SEED_SCHEMES)
            .ok_or_else(|| {
                sign_err(rustls::Error::General(
                    "the key's algorithm is not ECDSA P-256/P-384, Ed25519 or RSA".into(),
                ))
            })?;
        let header = SeedHeader {
            version: SEED_VERSION,
            sender_cert: identity.cert.to_vec(),
            ..header.clone()
        };
        let mut file = BufWriter::new(file);
        file.write_all(SEED_MAGIC).map_err(io)?;
        let out = zstd::Encoder::new(file, 3).map_err(io)?;
        let mut w = SeedWriter {
            path: path.into(),
            out,
            sha: Sha256::new(),
            records: 0,
            signer,
        };
        let bytes = bincode::serde::encode_to_vec(&header, record::bincode_config())
            .map_err(|e| w.io(std::io::Error::other(e)))?;
        w.frame(&bytes)?;
        Ok(w)
    }

    fn io(&self, source: std::io::Error) -> SeedError {
        SeedError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn frame(&mut self, bytes: &[u8]) -> Result<(), SeedError> {
        let len = u32::try_from(bytes.len()).expect("frames are bounded");
        self.sha.update(len.to_be_bytes());
        self.sha.update(bytes);
        let r = self
            .out
            .write_all(&len.to_be_bytes())
            .and_then(|_| self.out.write_all(bytes));
        r.map_err(|e| self.io(e))
    }

    /// Append one encoded (checksummed) record.
    pub fn record(&mut self, encoded: &[u8]) -> Result<(), SeedError> {
        self.records += 1;
        self.frame(encoded)
    }

    /// Write the trailer and fsync the file.
    pub fn finish(mut self) -> Result<u64, SeedError> {
        self.frame(&[])?;
        let sha256: [u8; 32] = self.sha.clone().finalize().into();
        let signature = self
            .signer
            .sign(&signed_message(&sha256, self.records))
            .map_err(|source| SeedError::Sign {
                path: self.path.clone(),
                source,
            })?;
        let trailer = SeedTrailer {
            records: self.records,
            sha256,
            scheme: u16::from(self.signer.scheme()),
            signature,
        };
        let bytes = bincode::serde::encode_to_vec(&trailer, record::bincode_config())
            .map_err(|e| self.io(std::io::Error::other(e)))?;
        let len = u32::try_from(bytes.len()).expect("small");
        let path = self.path.clone();
        let io = |source| SeedError::Io {
            path: path.clone(),
            source,
        };
        self.out.write_all(&len.to_be_bytes()).map_err(io)?;
        self.out.write_all(&bytes).map_err(io)?;
        let file = self.out.finish().map_err(io)?;
        let file = file.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(self.records)
    }
}

/// Reads a seed file, checking that its sender is pinned (at open), every
/// record's checksum and, at the end, the trailer's count, SHA-256 and
/// signature. Nothing it returns may be applied before
/// [`SeedReader::next_record`] has returned `Ok(None)` once, on an earlier
/// full pass.
pub struct SeedReader {
    path: PathBuf,
    input: zstd::Decoder<'static, BufReader<File>>,
    sha: Sha256,
    records: u64,
    pub header: SeedHeader,
}

impl SeedReader {
    /// Open a seed file signed by one of the `pinned` senders.
    pub fn open(path: &Path, pinned: &[Fingerprint]) -> Result<SeedReader, SeedError> {
        let r = Self::open_any_signer(path)?;
        let fingerprint = r.header.sender_fingerprint();
        if !pinned.contains(&fingerprint) {
            return Err(SeedError::NotPinned {
                path: path.into(),
                fingerprint,
            });
        }
        Ok(r)
    }

    /// Open a seed file whatever its signer: the signature is still checked
    /// against the certificate in the file, but that certificate is not
    /// checked against any pin. For inspection and tests only, never
    /// before applying a seed.
    pub fn open_any_signer(path: &Path) -> Result<SeedReader, SeedError> {
        let io = |source| SeedError::Io {
            path: path.into(),
            source,
        };
        let mut file = BufReader::new(File::open(path).map_err(io)?);
        let mut magic = [0u8; 8];
        if file.read_exact(&mut magic).is_err() || &magic != SEED_MAGIC {
            return Err(SeedError::NotSeed { path: path.into() });
        }
        let input = zstd::Decoder::with_buffer(file).map_err(io)?;
        let mut r = SeedReader {
            path: path.into(),
            input,
            sha: Sha256::new(),
            records: 0,
            header: SeedHeader {
                version: 0,
                source_id: String::new(),
                sender_cert: Vec::new(),
                marker_seq: 0,
                commit_lsn: Lsn::ZERO,
                cut_lsn: Lsn::ZERO,
                created_at: 0,
                tables: Vec::new(),
            },
        };
        let bytes = r
            .frame(MAX_HEADER_BYTES, true)?
            .ok_or_else(|| r.corrupt("empty header"))?;
        // The version leads the header (a varint): read it alone first, so
        // that an older file is named as such rather than as corrupt.
        let (version, _): (u32, usize) =
            bincode::serde::decode_from_slice(&bytes, record::bincode_config())
                .map_err(|e| r.corrupt(&format!("header does not decode: {e}")))?;
        if version != SEED_VERSION {
            return Err(SeedError::Version {
                path: path.into(),
                version,
            });
        }
        let (header, _): (SeedHeader, usize) =
            bincode::serde::decode_from_slice(&bytes, record::bincode_config())
                .map_err(|e| r.corrupt(&format!("header does not decode: {e}")))?;
        r.header = header;
        Ok(r)
    }

    fn corrupt(&self, what: &str) -> SeedError {
        SeedError::Corrupt {
            path: self.path.clone(),
            what: what.to_owned(),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), SeedError> {
        match self.input.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(SeedError::Truncated {
                path: self.path.clone(),
                what: format!("ends inside {what}"),
            }),
            // zstd reports a cut or altered stream as a plain I/O error.
            Err(e) => Err(self.corrupt(&format!("{what}: {e}"))),
        }
    }

    /// One frame; `None` for the empty frame that precedes the trailer.
    fn frame(&mut self, max: usize, hash: bool) -> Result<Option<Vec<u8>>, SeedError> {
        let mut len = [0u8; 4];
        self.read_exact(&mut len, "a frame length")?;
        let n = u32::from_be_bytes(len) as usize;
        if n > max {
            return Err(self.corrupt(&format!("frame of {n} bytes, above {max}")));
        }
        let mut bytes = vec![0u8; n];
        self.read_exact(&mut bytes, "a frame")?;
        if hash {
            self.sha.update(len);
            self.sha.update(&bytes);
        }
        Ok(if n == 0 { None } else { Some(bytes) })
    }

    /// The next encoded record, checksum verified; `None` after the last
    /// one, once the trailer's count and SHA-256 have been verified.
    pub fn next_record(&mut self) -> Result<Option<Vec<u8>>, SeedError> {
        match self.frame(MAX_RECORD_BYTES, true)? {
            Some(bytes) => {
                record::verify(&bytes).map_err(|e| {
                    self.corrupt(&format!("record {} of the file: {e}", self.records + 1))
                })?;
                self.records += 1;
                Ok(Some(bytes))
            }
            None => {
                let computed: [u8; 32] = self.sha.clone().finalize().into();
                let bytes = self
                    .frame(1024, false)?
                    .ok_or_else(|| self.corrupt("empty trailer"))?;
                let (trailer, _): (SeedTrailer, usize) =
                    bincode::serde::decode_from_slice(&bytes, record::bincode_config())
                        .map_err(|e| self.corrupt(&format!("trailer does not decode: {e}")))?;
                if trailer.records != self.records {
                    return Err(self.corrupt(&format!(
                        "trailer counts {} records, the file holds {}",
                        trailer.records, self.records
                    )));
                }
                if trailer.sha256 != computed {
                    return Err(self.corrupt("SHA-256 of the content differs from the trailer's"));
                }
                verify_signature(
                    &self.header.sender_cert,
                    trailer.scheme,
                    &signed_message(&computed, self.records),
                    &trailer.signature,
                )
                .map_err(|what| SeedError::BadSignature {
                    path: self.path.clone(),
                    fingerprint: self.header.sender_fingerprint(),
                    what,
                })?;
                let mut rest = [0u8; 1];
                if self
                    .input
                    .read(&mut rest)
                    .map_err(|e| self.corrupt(&e.to_string()))?
                    != 0
                {
                    return Err(self.corrupt("bytes after the trailer"));
                }
                Ok(None)
            }
        }
    }

    /// Read the whole file, verifying everything (its sender among
    /// `pinned`); returns the header and the record count.
    pub fn verify_all(path: &Path, pinned: &[Fingerprint]) -> Result<(SeedHeader, u64), SeedError> {
        let mut r = SeedReader::open(path, pinned)?;
        let mut n = 0;
        while r.next_record()?.is_some() {
            n += 1;
        }
        Ok((r.header, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tls::generate_identity;
    use pgcourier_proto::record::{Piece, Record};

    /// The test sender's identity (one per process).
    fn sender() -> &'static Identity {
        static ID: std::sync::OnceLock<Identity> = std::sync::OnceLock::new();
        ID.get_or_init(|| generate_identity("hq", |_| {}).unwrap())
    }

    fn header() -> SeedHeader {
        SeedHeader {
            version: SEED_VERSION,
            source_id: "7000/db/slot".into(),
            sender_cert: sender().cert.to_vec(),
            marker_seq: 9,
            commit_lsn: Lsn(99),
            cut_lsn: Lsn(100),
            created_at: 1,
            tables: vec!["public.t".into()],
        }
    }

    fn write(path: &Path, n: u64) {
        write_as(path, n, sender());
    }

    fn write_as(path: &Path, n: u64, identity: &Identity) {
        let file = File::create(path).unwrap();
        let mut w = SeedWriter::create(path, file, &header(), identity).unwrap();
        for i in 0..n {
            let rec = Record {
                seq: i + 1,
                only_for: None,
                commit_lsn: Lsn(99),
                commit_time: 0,
                xid: 0,
                part: i as u32,
                last: i + 1 == n,
                end_lsn: Lsn::ZERO,
                pieces: vec![Piece::Message(vec![b'I'; 1000 + i as usize])],
            };
            w.record(&rec.encode().unwrap()).unwrap();
        }
        assert_eq!(w.finish().unwrap(), n);
    }

    #[test]
    fn seed_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.seed");
        write(&path, 50);
        let (h, n) = SeedReader::verify_all(&path, &[sender().fingerprint()]).unwrap();
        assert_eq!(h, header());
        assert_eq!(n, 50);
    }

    #[test]
    fn truncated_and_altered_seeds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.seed");
        write(&path, 50);
        let good = std::fs::read(&path).unwrap();
        for cut in [9, good.len() / 3, good.len() / 2, good.len() - 1] {
            std::fs::write(&path, &good[..cut]).unwrap();
            let e = SeedReader::verify_all(&path, &[sender().fingerprint()]).unwrap_err();
            assert!(
                matches!(e, SeedError::Truncated { .. } | SeedError::Corrupt { .. }),
                "cut at {cut}: {e}"
            );
        }
        for at in [20, good.len() / 2, good.len() - 3] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            assert!(
                SeedReader::verify_all(&path, &[sender().fingerprint()]).is_err(),
                "flip at {at}"
            );
        }
        std::fs::write(&path, b"not a seed at all").unwrap();
        assert!(matches!(
            SeedReader::verify_all(&path, &[sender().fingerprint()]),
            Err(SeedError::NotSeed { .. })
        ));
    }

    /// What `seed import` checks before applying anything: the whole file,
    /// and that its sender is pinned.
    fn verify_pinned(path: &Path, pinned: &[Fingerprint]) -> Result<SeedHeader, String> {
        let (h, _) = SeedReader::verify_all(path, pinned).map_err(|e| e.to_string())?;
        Ok(h)
    }

    /// Rewrite a seed file's content the way someone who holds a genuine
    /// file but not the sender's key can: record `at` replaced by `record`
    /// (with a valid CRC), the SHA-256 recomputed and the trailer rewritten
    /// to match, everything else (header, signature) kept.
    fn forge(path: &Path, at: usize, record: &[u8]) {
        let raw = std::fs::read(path).unwrap();
        let plain = zstd::decode_all(&raw[8..]).unwrap();
        let mut frames = Vec::new();
        let mut pos = 0;
        while pos < plain.len() {
            let n = u32::from_be_bytes(plain[pos..pos + 4].try_into().unwrap()) as usize;
            frames.push(plain[pos + 4..pos + 4 + n].to_vec());
            pos += 4 + n;
        }
        frames[at] = record.to_vec();
        let (mut trailer, _): (SeedTrailer, usize) =
            bincode::serde::decode_from_slice(frames.last().unwrap(), record::bincode_config())
                .unwrap();
        let mut sha = Sha256::new();
        for f in &frames[..frames.len() - 1] {
            sha.update((f.len() as u32).to_be_bytes());
            sha.update(f);
        }
        trailer.sha256 = sha.finalize().into();
        *frames.last_mut().unwrap() =
            bincode::serde::encode_to_vec(&trailer, record::bincode_config()).unwrap();
        let mut out = Vec::new();
        for f in &frames {
            out.extend_from_slice(&(f.len() as u32).to_be_bytes());
            out.extend_from_slice(f);
        }
        let mut file = SEED_MAGIC.to_vec();
        file.extend(zstd::encode_all(&out[..], 3).unwrap());
        std::fs::write(path, file).unwrap();
    }

    #[test]
    fn a_seed_rewritten_with_a_recomputed_sha256_under_a_pinned_sender_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.seed");
        write(&path, 5);
        let pinned = vec![sender().fingerprint()];
        verify_pinned(&path, &pinned).expect("the genuine file is accepted");
        let evil = Record {
            seq: 2,
            only_for: None,
            commit_lsn: Lsn(99),
            commit_time: 0,
            xid: 0,
            part: 1,
            last: false,
            end_lsn: Lsn::ZERO,
            pieces: vec![Piece::Message(b"rows the sender never exported".to_vec())],
        };
        forge(&path, 2, &evil.encode().unwrap());
        match verify_pinned(&path, &pinned) {
            Ok(h) => panic!(
                "a rewritten seed was accepted as the pinned sender's ({})",
                h.sender_fingerprint()
            ),
            Err(e) => assert!(e.contains("signature"), "{e}"),
        }
    }

    #[test]
    fn a_seed_signed_by_another_key_is_refused_whatever_certificate_it_carries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.seed");
        let other = generate_identity("not-hq", |_| {}).unwrap();
        let pinned = [sender().fingerprint()];
        // Its own certificate: not pinned, refused at open.
        write_as(&path, 3, &other);
        let e = SeedReader::verify_all(&path, &pinned).unwrap_err();
        assert!(matches!(e, SeedError::NotPinned { .. }), "{e}");
        assert!(e.to_string().contains("does not pin"), "{e}");
        // The pinned sender's certificate, its own key: the signature fails.
        let imposter = Identity {
            cert: sender().cert.clone(),
            key: other.key.clone_key(),
        };
        write_as(&path, 3, &imposter);
        let e = SeedReader::verify_all(&path, &pinned).unwrap_err();
        assert!(matches!(e, SeedError::BadSignature { .. }), "{e}");
        // An unsigned file of the previous version is named as such.
        let mut v1 = SEED_MAGIC.to_vec();
        let head = bincode::serde::encode_to_vec(1u32, record::bincode_config()).unwrap();
        let mut plain = (head.len() as u32).to_be_bytes().to_vec();
        plain.extend(head);
        v1.extend(zstd::encode_all(&plain[..], 3).unwrap());
        std::fs::write(&path, v1).unwrap();
        let e = SeedReader::verify_all(&path, &pinned).unwrap_err();
        assert!(matches!(e, SeedError::Version { version: 1, .. }), "{e}");
    }

    #[test]
    fn create_sql_refuses_a_type_that_is_not_a_type_name() {
        let t = CopyTable {
            oid: 1,
            schema: "public".into(),
            name: "victim".into(),
            columns: vec![CopyColumn {
                name: "amount".into(),
                type_sql: "int); DROP TABLE x; --".into(),
                not_null: false,
            }],
            primary_key: vec![],
            rows_estimate: 0,
            bytes_estimate: 0,
        };
        let e = match t.create_sql() {
            Ok(sql) => panic!("the type text reached the SQL: {sql}"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("\"public\".\"victim\"") && e.contains("amount"),
            "the error names the table and the column: {e}"
        );
    }

    #[test]
    fn type_names_from_format_type_are_kept_and_identifiers_quoted() {
        for (text, sql) in [
            ("bigint", "bigint"),
            ("integer[]", "integer[]"),
            ("numeric(10,2)", "numeric(10,2)"),
            ("character varying(20)", "character varying(20)"),
            ("character(1)", "character(1)"),
            ("\"char\"", "\"char\""),
            ("double precision", "double precision"),
            ("bit varying(5)", "bit varying(5)"),
            ("timestamp(3) with time zone", "timestamp(3) with time zone"),
            ("timestamp without time zone", "timestamp without time zone"),
            ("time with time zone[]", "time with time zone[]"),
            ("interval", "interval"),
            ("interval year to month", "interval year to month"),
            ("interval day to second(3)", "interval day to second(3)"),
            ("text", "\"text\""),
            ("jsonb[]", "\"jsonb\"[]"),
            ("public.mood", "\"public\".\"mood\""),
            (
                "\"Shop\".\"Odd \"\"Type\"\"\"[]",
                "\"Shop\".\"Odd \"\"Type\"\"\"[]",
            ),
            ("ext.vector(3)", "\"ext\".\"vector\"(3)"),
            ("integer.weird", "\"integer\".\"weird\""),
        ] {
            assert_eq!(
                TypeName::parse(text).map(|t| t.to_string()),
                Ok(sql.to_owned()),
                "{text}"
            );
        }
        for bad in [
            "int); DROP TABLE x; --",
            "int; DROP TABLE x",
            "text COLLATE \"C\"",
            "int DEFAULT 1",
            "numeric(a)",
            "numeric(1",
            "a.b.c",
            "\"unterminated",
            "\"\"",
            "int -- comment",
            "int/**/",
            "",
            "text'",
            "double",
            "timestamp with zone",
            "integer[",
        ] {
            assert!(TypeName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn create_sql_quotes_everything() {
        let t = CopyTable {
            oid: 1,
            schema: "Shop".into(),
            name: "order \"lines\"".into(),
            columns: vec![
                CopyColumn {
                    name: "id".into(),
                    type_sql: "bigint".into(),
                    not_null: true,
                },
                CopyColumn {
                    name: "select".into(),
                    type_sql: "numeric(10,2)".into(),
                    not_null: false,
                },
            ],
            primary_key: vec!["id".into()],
            rows_estimate: 0,
            bytes_estimate: 0,
        };
        assert_eq!(
            t.create_sql().unwrap(),
            "CREATE TABLE IF NOT EXISTS \"Shop\".\"order \"\"lines\"\"\" (\"id\" bigint NOT NULL, \"select\" numeric(10,2), PRIMARY KEY (\"id\"))"
        );
    }
}
