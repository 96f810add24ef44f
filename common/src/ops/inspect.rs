//! Human and machine views of spool and inbox records, for
//! `pgcourier-queue list` and `show`, and for the audit row written when a
//! transaction is skipped. Row values appear here only because an operator
//! asked for one record; they never go to logs.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

pub use crate::pg::quote_ident;
use pgcourier_proto::pgoutput::{self, Message, OldTuple, Relation, Tuple, Value};
use pgcourier_proto::record::{Piece, Record};

/// A PostgreSQL-epoch timestamp (µs since 2000-01-01 UTC) as RFC 3339.
pub fn pg_time(micros: i64) -> String {
    humantime::format_rfc3339_millis(crate::pg::time::from_pg_micros(micros)).to_string()
}

/// Seconds from a PostgreSQL-epoch timestamp to now (0 if in the future).
pub fn age_seconds(micros: i64) -> f64 {
    crate::pg::time::age_seconds(micros)
}

/// One line of `list`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RecordLine {
    pub seq: u64,
    pub commit_lsn: String,
    pub commit_time: String,
    pub xid: u32,
    pub part: u32,
    pub last: bool,
    pub changes: usize,
    pub bytes: usize,
    pub tables: Vec<String>,
    /// Why this record could not be read or decoded, whole or in part
    /// (`list` shows such a record rather than leaving it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// One change of `show`, decoded.
#[derive(Debug, Serialize)]
pub struct ChangeView {
    pub op: &'static str,
    pub table: String,
    pub columns: Vec<String>,
    /// New values (insert, update) in PostgreSQL text form; `null` is SQL NULL.
    pub new: Option<Vec<Option<String>>>,
    /// Old key or row (update with a key change or FULL identity, delete).
    pub old: Option<Vec<Option<String>>>,
}

#[derive(Debug, Serialize)]
pub struct RecordView {
    pub seq: u64,
    pub commit_lsn: String,
    pub end_lsn: String,
    pub commit_time: String,
    pub xid: u32,
    pub part: u32,
    pub last: bool,
    pub changes: Vec<ChangeView>,
    /// Truncations: table lists with their options.
    pub truncates: Vec<String>,
    /// Pieces that are fragments of a message continued in another record.
    pub fragments: usize,
    /// Whole messages that do not decode (shown as a count, never hidden).
    pub undecodable_messages: usize,
}

fn table_name(rels: &HashMap<u32, Relation>, oid: u32) -> String {
    rels.get(&oid)
        .map(|r| format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.name)))
        .unwrap_or_else(|| format!("(relation {oid})"))
}

fn values(t: &Tuple) -> Vec<Option<String>> {
    t.iter()
        .map(|v| match v {
            Value::Null => None,
            Value::UnchangedToast => Some("(unchanged TOAST value)".into()),
            Value::Text(s) => Some(s.clone()),
            Value::Binary(b) => Some(format!(
                "\\x{}",
                b.iter().map(|x| format!("{x:02x}")).collect::<String>()
            )),
        })
        .collect()
}

/// Decode a record's whole messages, learning Relation messages into `rels`;
/// also how many of them do not decode (they are counted, never hidden).
pub fn messages(record: &Record, rels: &mut HashMap<u32, Relation>) -> (Vec<Message>, usize) {
    let mut out = Vec::new();
    let mut undecodable = 0;
    for piece in &record.pieces {
        if let Piece::Message(m) = piece {
            match pgoutput::decode(m) {
                Ok(msg) => {
                    if let Message::Relation(r) = &msg {
                        rels.insert(r.oid, r.clone());
                    }
                    out.push(msg);
                }
                Err(_) => undecodable += 1,
            }
        }
    }
    (out, undecodable)
}

/// The `list` line of a record that cannot be read or decoded.
pub fn unreadable(seq: u64, bytes: usize, why: impl std::fmt::Display) -> RecordLine {
    RecordLine {
        seq,
        commit_lsn: String::new(),
        commit_time: String::new(),
        xid: 0,
        part: 0,
        last: true,
        changes: 0,
        bytes,
        tables: Vec::new(),
        problem: Some(format!("unreadable: {why}")),
    }
}

pub fn line(record: &Record, bytes: usize, rels: &mut HashMap<u32, Relation>) -> RecordLine {
    let (msgs, undecodable) = messages(record, rels);
    let mut tables: Vec<String> = Vec::new();
    let mut changes = 0;
    for m in &msgs {
        let oids: Vec<u32> = match m {
            Message::Insert { rel, .. }
            | Message::Update { rel, .. }
            | Message::Delete { rel, .. } => vec![*rel],
            Message::Truncate { rels, .. } => rels.clone(),
            _ => continue,
        };
        changes += 1;
        for oid in oids {
            let name = table_name(rels, oid);
            if !tables.contains(&name) {
                tables.push(name);
            }
        }
    }
    RecordLine {
        seq: record.seq,
        commit_lsn: record.commit_lsn.to_string(),
        commit_time: pg_time(record.commit_time),
        xid: record.xid,
        part: record.part,
        last: record.last,
        changes,
        bytes,
        tables,
        problem: (undecodable > 0)
            .then(|| format!("{undecodable} pgoutput messages do not decode")),
    }
}

pub fn view(record: &Record, rels: &mut HashMap<u32, Relation>) -> RecordView {
    let (msgs, undecodable) = messages(record, rels);
    let mut changes = Vec::new();
    let mut truncates = Vec::new();
    for m in msgs {
        let cols = |oid: u32| {
            rels.get(&oid)
                .map(|r| r.columns.iter().map(|c| c.name.clone()).collect())
                .unwrap_or_default()
        };
        match m {
            Message::Insert { rel, new } => changes.push(ChangeView {
                op: "insert",
                table: table_name(rels, rel),
                columns: cols(rel),
                new: Some(values(&new)),
                old: None,
            }),
            Message::Update { rel, old, new } => changes.push(ChangeView {
                op: "update",
                table: table_name(rels, rel),
                columns: cols(rel),
                new: Some(values(&new)),
                old: old.as_ref().map(|o| values(o.tuple())),
            }),
            Message::Delete { rel, old } => changes.push(ChangeView {
                op: "delete",
                table: table_name(rels, rel),
                columns: cols(rel),
                new: None,
                old: Some(values(old.tuple())),
            }),
            Message::Truncate {
                cascade,
                restart_identity,
                rels: oids,
            } => {
                let names: Vec<String> = oids.iter().map(|o| table_name(rels, *o)).collect();
                truncates.push(format!(
                    "{}{}{}",
                    names.join(", "),
                    if restart_identity {
                        " RESTART IDENTITY"
                    } else {
                        ""
                    },
                    if cascade { " CASCADE" } else { "" }
                ));
            }
            _ => {}
        }
    }
    RecordView {
        seq: record.seq,
        commit_lsn: record.commit_lsn.to_string(),
        end_lsn: record.end_lsn.to_string(),
        commit_time: pg_time(record.commit_time),
        xid: record.xid,
        part: record.part,
        last: record.last,
        changes,
        truncates,
        fragments: record
            .pieces
            .iter()
            .filter(|p| matches!(p, Piece::Fragment { .. }))
            .count(),
        undecodable_messages: undecodable,
    }
}

fn literal(v: &Option<String>) -> String {
    match v {
        None => "NULL".into(),
        Some(s) => format!("'{}'", s.replace('\'', "''")),
    }
}

/// The record's changes as SQL statements (for reading, not for replay:
/// values are literals, and the key of an update without an old key is
/// taken from the new row).
pub fn sql(view: &RecordView, rels: &HashMap<u32, Relation>) -> String {
    let mut out = format!(
        "-- record {} of transaction {} (commit {} at {})\n",
        view.seq, view.xid, view.commit_lsn, view.commit_time
    );
    for c in &view.changes {
        let key_cols: Vec<usize> = rels
            .values()
            .find(|r| format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.name)) == c.table)
            .map(|r| {
                r.columns
                    .iter()
                    .enumerate()
                    .filter(|(_, col)| col.key)
                    .map(|(i, _)| i)
                    .collect()
            })
            .unwrap_or_default();
        let cols: Vec<String> = c.columns.iter().map(|n| quote_ident(n)).collect();
        let wher = |vals: &Vec<Option<String>>| -> String {
            let idx: Vec<usize> = if key_cols.is_empty() {
                (0..vals.len()).collect()
            } else {
                key_cols.clone()
            };
            idx.iter()
                .filter_map(|&i| {
                    Some(format!(
                        "{} IS NOT DISTINCT FROM {}",
                        cols.get(i)?,
                        literal(vals.get(i)?)
                    ))
                })
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        match c.op {
            "insert" => {
                let vals: Vec<String> = c.new.iter().flatten().map(literal).collect();
                out.push_str(&format!(
                    "INSERT INTO {} ({}) VALUES ({});\n",
                    c.table,
                    cols.join(", "),
                    vals.join(", ")
                ));
            }
            "update" => {
                let new = c.new.clone().unwrap_or_default();
                let sets: Vec<String> = new
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.as_deref() != Some("(unchanged TOAST value)"))
                    .filter_map(|(i, v)| Some(format!("{} = {}", cols.get(i)?, literal(v))))
                    .collect();
                let key = c.old.as_ref().unwrap_or(&new);
                out.push_str(&format!(
                    "UPDATE {} SET {} WHERE {};\n",
                    c.table,
                    sets.join(", "),
                    wher(key)
                ));
            }
            _ => {
                let old = c.old.clone().unwrap_or_default();
                out.push_str(&format!("DELETE FROM {} WHERE {};\n", c.table, wher(&old)));
            }
        }
    }
    for t in &view.truncates {
        out.push_str(&format!("TRUNCATE {t};\n"));
    }
    out
}

/// Used by OldTuple consumers that only need the values.
pub fn old_values(o: &OldTuple) -> Vec<Option<String>> {
    values(o.tuple())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Lsn;

    fn record(pieces: Vec<Piece>) -> Record {
        Record {
            seq: 7,
            only_for: None,
            commit_lsn: Lsn(100),
            commit_time: 0,
            xid: 3,
            part: 0,
            last: true,
            end_lsn: Lsn(150),
            pieces,
        }
    }

    #[test]
    fn a_message_that_does_not_decode_is_counted_never_hidden() {
        let r = record(vec![
            Piece::Message(b"B garbage".to_vec()),
            Piece::Message(vec![0xff]),
        ]);
        let mut rels = HashMap::new();
        let line = line(&r, 42, &mut rels);
        assert_eq!(
            line.problem.as_deref(),
            Some("2 pgoutput messages do not decode")
        );
        assert_eq!(view(&r, &mut rels).undecodable_messages, 2);
        let clean = super::line(&record(vec![]), 1, &mut rels);
        assert_eq!(clean.problem, None);
    }

    #[test]
    fn an_unreadable_record_gets_a_line_that_says_why() {
        let l = unreadable(9, 12, "record checksum mismatch");
        assert_eq!(l.seq, 9);
        assert_eq!(
            l.problem.as_deref(),
            Some("unreadable: record checksum mismatch")
        );
    }
}
