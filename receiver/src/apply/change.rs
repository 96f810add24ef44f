//! A record's pgoutput messages → queued changes: Relations are
//! remembered, inserts join runs of inserts, updates and deletes become
//! prepared statements with their key, a TRUNCATE is queued as a barrier, a
//! copy's metadata starts a table load. Messages cut into fragments are
//! put back together first.

use pgcourier_common::store::seed_file::COPY_PREFIX;
use pgcourier_proto::pgoutput::{self, Message, OldTuple, Tuple, Value};
use pgcourier_proto::record::{Piece, Record};

use super::error::ApplyError;
use super::pipeline::Pending;
use super::sql::{text_value, truncate_sql, Op};
use super::{Apply, Session};

impl Apply {
    pub(super) async fn queue_record(
        &self,
        s: &mut Session,
        record: &Record,
    ) -> Result<u32, ApplyError> {
        let mut changes = 0;
        for piece in &record.pieces {
            let owned;
            let bytes: &[u8] = match piece {
                Piece::Message(m) => m,
                Piece::Fragment { bytes, more: true } => {
                    s.fragment.extend_from_slice(bytes);
                    continue;
                }
                Piece::Fragment { bytes, more: false } => {
                    s.fragment.extend_from_slice(bytes);
                    owned = std::mem::take(&mut s.fragment);
                    &owned
                }
            };
            let msg = pgoutput::decode(bytes).map_err(|source| ApplyError::Decode {
                seq: record.seq,
                source,
            })?;
            let copied = match &msg {
                Message::Insert { rel, .. } => Some(*rel),
                _ => None,
            };
            match msg {
                Message::Relation(rel) => self.remember_relation(s, rel, bytes)?,
                Message::LogicalMessage {
                    prefix, content, ..
                } if prefix == COPY_PREFIX => {
                    self.start_copy(s, record.seq, &content).await?;
                }
                Message::Insert { rel, new } => {
                    self.queue_change(s, record.seq, rel, Op::Insert, None, &new)
                        .await?;
                    changes += 1;
                }
                Message::Update { rel, old, new } => {
                    self.queue_change(s, record.seq, rel, Op::Update, old.as_ref(), &new)
                        .await?;
                    changes += 1;
                }
                Message::Delete { rel, old } => {
                    self.queue_change(s, record.seq, rel, Op::Delete, Some(&old), old.tuple())
                        .await?;
                    changes += 1;
                }
                Message::Truncate {
                    cascade,
                    restart_identity,
                    rels,
                } => {
                    let mut names = Vec::new();
                    for oid in rels {
                        self.resolve(s, record.seq, oid).await?;
                        names.push(s.targets[&oid].table.clone());
                    }
                    let sql = truncate_sql(&names, restart_identity, cascade);
                    self.flush_run(s).await?;
                    s.pending.push(Pending::Sql { sql });
                    changes += 1;
                }
                Message::Begin { .. }
                | Message::Commit { .. }
                | Message::Origin { .. }
                | Message::Type { .. }
                | Message::LogicalMessage { .. } => {}
            }
            if let Some(c) = s.copy.as_mut() {
                if let Some(oid) = copied {
                    c.count(oid);
                    if c.rows % 65536 == 0 {
                        self.status.lock().expect("status lock").copy = Some(c.clone());
                    }
                }
            }
            if s.pipeline_full() {
                self.drain(s).await?;
            }
        }
        Ok(changes)
    }

    /// One row change → a queued statement, or a row added to the current
    /// run of inserts (sent as one COPY).
    async fn queue_change(
        &self,
        s: &mut Session,
        seq: u64,
        oid: u32,
        op: Op,
        old: Option<&OldTuple>,
        new: &Tuple,
    ) -> Result<(), ApplyError> {
        self.resolve(s, seq, oid).await?;
        let target = &s.targets[&oid];
        if new.len() != target.columns.len() {
            return Err(ApplyError::Order {
                seq,
                message: format!(
                    "a change to {} has {} columns, its Relation {}",
                    target.table,
                    new.len(),
                    target.columns.len()
                ),
            });
        }
        // Which columns are set, and which identify the row.
        let set: Vec<bool> = match op {
            Op::Insert | Op::Update => new
                .iter()
                .map(|v| !matches!(v, Value::UnchangedToast))
                .collect(),
            Op::Delete => vec![false; new.len()],
        };
        let key_source: &Tuple = match (op, old) {
            (Op::Insert, _) => new,
            (_, Some(old)) => old.tuple(),
            (_, None) => new,
        };
        let mut wher = vec![false; new.len()];
        if op != Op::Insert {
            if target.key.is_empty() {
                return Err(ApplyError::NoKey {
                    table: target.table.clone(),
                });
            }
            for &k in &target.key {
                wher[k] = !matches!(key_source.get(k), Some(Value::UnchangedToast) | None);
            }
        }
        if op == Op::Insert {
            let row: Vec<Option<String>> = new
                .iter()
                .zip(&set)
                .filter(|(_, on)| **on)
                .map(|(v, _)| text_value(v))
                .collect();
            self.queue_insert(s, oid, set, row).await?;
            return Ok(());
        }
        self.flush_run(s).await?;
        let stmt = self.statement(s, oid, op, &set, &wher).await?;
        let mut params = Vec::new();
        for (i, v) in new.iter().enumerate() {
            if set[i] {
                params.push(text_value(v));
            }
        }
        for (i, w) in wher.iter().enumerate() {
            if *w {
                params.push(text_value(&key_source[i]));
            }
        }
        s.pending.push(Pending::Prepared {
            stmt,
            params,
            rel: oid,
            op,
        });
        Ok(())
    }
}
