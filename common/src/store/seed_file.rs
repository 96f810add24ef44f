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
//! The trailer holds the SHA-256 of every frame before it, so a truncated
//! or altered file is refused before anything is applied.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use pgcourier_proto::record::{self, MAX_RECORD_BYTES};
use crate::Lsn;
use crate::pg::quote_ident;

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
    /// NULL and primary key (receiver setting `create-tables`).
    pub fn create_sql(&self) -> String {
        let mut cols: Vec<String> = self
            .columns
            .iter()
            .map(|c| {
                format!(
                    "{} {}{}",
                    quote_ident(&c.name),
                    c.type_sql,
                    if c.not_null { " NOT NULL" } else { "" }
                )
            })
            .collect();
        if !self.primary_key.is_empty() {
            let pk: Vec<String> = self.primary_key.iter().map(|c| quote_ident(c)).collect();
            cols.push(format!("PRIMARY KEY ({})", pk.join(", ")));
        }
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({})",
            self.quoted(),
            cols.join(", ")
        )
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
}

const SEED_MAGIC: &[u8; 8] = b"PGCSEED1";
const MAX_HEADER_BYTES: usize = 16 << 20;

/// What a seed file says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedHeader {
    pub version: u32,
    /// `<system identifier>/<database>/<slot>` of the source.
    pub source_id: String,
    /// SHA-256 fingerprint of the sender that exported it (receivers pin it).
    pub sender_fingerprint: String,
    /// Spool position of the seed's marker: live shipping resumes after it.
    pub marker_seq: u64,
    /// Commit LSN the copy transaction and the marker carry (`cut - 1`).
    pub commit_lsn: Lsn,
    pub cut_lsn: Lsn,
    /// Unix seconds.
    pub created_at: i64,
    pub tables: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SeedTrailer {
    records: u64,
    sha256: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cannot read or write seed file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a pgcourier seed file (wrong magic bytes)")]
    NotSeed { path: PathBuf },
    #[error("seed file {path} is truncated ({what}): copy it again from the sender's export")]
    Truncated { path: PathBuf, what: String },
    #[error("seed file {path} is corrupt ({what}): copy it again from the sender's export")]
    Corrupt { path: PathBuf, what: String },
}

/// Writes a seed file: header, records, trailer.
pub struct SeedWriter {
    path: PathBuf,
    out: zstd::Encoder<'static, BufWriter<File>>,
    sha: Sha256,
    records: u64,
}

impl SeedWriter {
    pub fn create(path: &Path, header: &SeedHeader) -> Result<SeedWriter, SeedError> {
        let io = |source| SeedError::Io {
            path: path.into(),
            source,
        };
        let mut file = BufWriter::new(File::create(path).map_err(io)?);
        file.write_all(SEED_MAGIC).map_err(io)?;
        let out = zstd::Encoder::new(file, 3).map_err(io)?;
        let mut w = SeedWriter {
            path: path.into(),
            out,
            sha: Sha256::new(),
            records: 0,
        };
        let bytes = bincode::serde::encode_to_vec(header, record::bincode_config())
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
        let trailer = SeedTrailer {
            records: self.records,
            sha256: self.sha.clone().finalize().into(),
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

/// Reads a seed file, checking every record's checksum and, at the end,
/// the trailer's count and SHA-256. Nothing it returns may be applied
/// before [`SeedReader::next_record`] has returned `Ok(None)` once, on an
/// earlier full pass.
pub struct SeedReader {
    path: PathBuf,
    input: zstd::Decoder<'static, BufReader<File>>,
    sha: Sha256,
    records: u64,
    pub header: SeedHeader,
}

impl SeedReader {
    pub fn open(path: &Path) -> Result<SeedReader, SeedError> {
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
                sender_fingerprint: String::new(),
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
        let (header, _): (SeedHeader, usize) =
            bincode::serde::decode_from_slice(&bytes, record::bincode_config())
                .map_err(|e| r.corrupt(&format!("header does not decode: {e}")))?;
        if header.version != 1 {
            return Err(r.corrupt(&format!("unknown version {}", header.version)));
        }
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

    /// Read the whole file, verifying everything; returns the record count.
    pub fn verify_all(path: &Path) -> Result<(SeedHeader, u64), SeedError> {
        let mut r = SeedReader::open(path)?;
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
    use pgcourier_proto::record::{Piece, Record};

    fn header() -> SeedHeader {
        SeedHeader {
            version: 1,
            source_id: "7000/db/slot".into(),
            sender_fingerprint: "ab".repeat(32),
            marker_seq: 9,
            commit_lsn: Lsn(99),
            cut_lsn: Lsn(100),
            created_at: 1,
            tables: vec!["public.t".into()],
        }
    }

    fn write(path: &Path, n: u64) {
        let mut w = SeedWriter::create(path, &header()).unwrap();
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
        let (h, n) = SeedReader::verify_all(&path).unwrap();
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
            let e = SeedReader::verify_all(&path).unwrap_err();
            assert!(
                matches!(e, SeedError::Truncated { .. } | SeedError::Corrupt { .. }),
                "cut at {cut}: {e}"
            );
        }
        for at in [20, good.len() / 2, good.len() - 3] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            assert!(SeedReader::verify_all(&path).is_err(), "flip at {at}");
        }
        std::fs::write(&path, b"not a seed at all").unwrap();
        assert!(matches!(
            SeedReader::verify_all(&path),
            Err(SeedError::NotSeed { .. })
        ));
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
            t.create_sql(),
            "CREATE TABLE IF NOT EXISTS \"Shop\".\"order \"\"lines\"\"\" (\"id\" bigint NOT NULL, \"select\" numeric(10,2), PRIMARY KEY (\"id\"))"
        );
    }
}
