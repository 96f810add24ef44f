//! The messages of a table that joins a running publication (issue 14):
//! its rows travel in paced chunks between the live transactions instead
//! of as one copy transaction that every later change waits behind.
//!
//! ```text
//! L − 1   the join's start: a `pgcourier.copy` transaction whose CopyMeta
//!         has `join = Some(id)`: Relations, no TRUNCATE, no rows. The
//!         branch creates a staging table per table and from now on holds
//!         the joining tables' changes (pgcourier.held) instead of
//!         applying them.
//! c₁ ..   chunk transactions, each one `pgcourier.join` message: a
//!         [`JoinPart`] `rows` header, then rows in COPY text format
//!         (the published columns, in CopyTable order), loaded into the
//!         staging table.
//! cₙ      a `pgcourier.join` `end` part: the tables are replaced by their
//!         staging tables and the held changes replayed, in one target
//!         transaction.
//! ```
//!
//! A join cut short (the sender restarted, its snapshot is gone) is
//! abandoned: the next copy's CopyMeta names it in `aborts`, and the
//! branch drops its staging tables and held changes before anything else
//! (the new copy holds their effect).
//!
//! Each chunk is an ordinary transaction of the spool, with a commit LSN
//! between the transactions around it (`Cutter::splice`), so the order
//! rule, the progress row, acknowledgements and trimming treat it as any.

use serde::{Deserialize, Serialize};

/// The prefix of a join's chunk and end messages.
pub const JOIN_PREFIX: &str = "pgcourier.join";

/// What a `pgcourier.join` message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinKind {
    /// Rows of one table, in COPY text format, after the header.
    Rows,
    /// Every row was sent: swap the tables in, replay the held changes.
    End,
}

/// The header of a `pgcourier.join` message: JSON, then `\n`, then (for
/// `rows`) the rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinPart {
    /// The join (CopyMeta `join`).
    pub id: u64,
    pub kind: JoinKind,
    /// `rows`: the source OID of the table the rows belong to.
    #[serde(default)]
    pub table: u32,
    /// `rows`: the chunk's number in the join, from 1; `end`: the number
    /// of chunks sent.
    pub n: u64,
    /// `rows`: rows in this chunk; `end`: rows in the whole join.
    pub rows: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinPartError {
    #[error("a pgcourier.join message has no header line")]
    NoHeader,
    #[error("a pgcourier.join message's header does not parse: {0}")]
    Header(#[from] serde_json::Error),
}

impl JoinPart {
    /// The message content: the header, `\n`, `rows`.
    pub fn encode(&self, rows: &[u8]) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).expect("a join part encodes as JSON");
        out.push(b'\n');
        out.extend_from_slice(rows);
        out
    }

    /// The header and the rows of a message's content.
    pub fn decode(content: &[u8]) -> Result<(JoinPart, &[u8]), JoinPartError> {
        let at = content
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(JoinPartError::NoHeader)?;
        let part = serde_json::from_slice(&content[..at])?;
        Ok((part, &content[at + 1..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_round_trips_and_its_rows_follow_the_first_newline() {
        let part = JoinPart {
            id: 7,
            kind: JoinKind::Rows,
            table: 16384,
            n: 3,
            rows: 2,
        };
        let rows = b"1\ta\\nb\n2\t\\N\n";
        let content = part.encode(rows);
        let (back, r) = JoinPart::decode(&content).unwrap();
        assert_eq!(back, part);
        assert_eq!(r, rows);
        assert!(JoinPart::decode(b"{\"id\":1}").is_err());
        assert!(JoinPart::decode(b"nonsense\n").is_err());
    }
}
