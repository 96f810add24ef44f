//! A record's pgoutput messages → queued changes: Relations are
//! remembered, inserts join runs of inserts, updates and deletes by primary
//! key join runs of updates or deletes (`set_based_row` says which can;
//! the others become prepared statements with their key), a TRUNCATE is
//! queued as a barrier, a copy's metadata starts a table load, a schema
//! change runs in place (`ddl.rs`), a join's chunk or end is loaded
//! (`join.rs`), and a change to a table still joining is held instead of
//! applied (`join.rs`). Messages cut into fragments are put back together
//! first.

use pgcourier_common::pg::conflict::CLOCK_PREFIX;
use pgcourier_common::pg::ddl::DDL_PREFIX;
use pgcourier_common::store::join::JOIN_PREFIX;
use pgcourier_common::store::seed_file::COPY_PREFIX;
use pgcourier_proto::pgoutput::{self, Message, OldTuple, Tuple, Value};
use pgcourier_proto::record::{Piece, Record};

use super::error::ApplyError;
use super::mapping::TableMap;
use super::pipeline::{key_hash, Pending, LARGE_CHANGE_BYTES};
use super::sql::{text_value, truncate_sql, Op};
use super::{Apply, Session};

impl Apply {
    pub(super) async fn queue_record(
        &self,
        s: &mut Session,
        record: &Record,
    ) -> Result<u32, ApplyError> {
        let mut changes = 0;
        s.two_way_rechecked.clear();
        for piece in &record.pieces {
            let owned;
            let bytes: &[u8] = match piece {
                Piece::Message(m) => m,
                // The rest of an insert being streamed (`large.rs`).
                Piece::Fragment { bytes, more } if s.large.is_some() => {
                    self.large_feed(s, record.seq, bytes, *more).await?;
                    if !more {
                        changes += 1;
                    }
                    continue;
                }
                Piece::Fragment { bytes, more: true } => {
                    s.fragment.extend_from_slice(bytes);
                    if s.fragment.len() >= LARGE_CHANGE_BYTES
                        && s.fragment.first() == Some(&b'I')
                        && !s.joins.holds_insert(&s.fragment)
                    {
                        // Too large to put together: streamed from here on
                        // (unless held for a joining table, `join.rs`; a
                        // join's chunk is a logical message, never streamed).
                        let buffered = std::mem::take(&mut s.fragment);
                        self.large_start(s, record.seq, &buffered).await?;
                    }
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
                Message::Relation(rel) => {
                    // The run being gathered was mapped with the shape this
                    // Relation may change: queue it first.
                    self.flush_run(s).await?;
                    self.hold_relation(s, record.seq, rel.oid, bytes)?;
                    self.remember_relation(s, rel, bytes)?
                }
                Message::LogicalMessage {
                    prefix, content, ..
                } if prefix == COPY_PREFIX => {
                    self.start_copy(s, record.seq, &content).await?;
                }
                Message::LogicalMessage {
                    prefix, content, ..
                } if prefix == JOIN_PREFIX => {
                    self.join_message(s, record.seq, &content).await?;
                }
                Message::LogicalMessage {
                    prefix, content, ..
                } if prefix == CLOCK_PREFIX => {
                    // For the change right after it (`two_way.rs`); one
                    // that none followed is a deletion of its own.
                    let clock = String::from_utf8_lossy(&content).into_owned();
                    if let Some(orphan) = s.clock.replace(clock) {
                        self.queue_orphan_clock(s, orphan).await?;
                    }
                }

                Message::LogicalMessage {
                    prefix, content, ..
                } if prefix == DDL_PREFIX => {
                    self.apply_ddl(s, record.seq, &content).await?;
                }
                msg @ (Message::Insert { .. }
                | Message::Update { .. }
                | Message::Delete { .. }
                | Message::Truncate { .. }) => {
                    // Held instead while its table joins (`join.rs`).
                    self.queue_or_hold(s, record.seq, msg, bytes).await?;
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
        // A clock at the end of its transaction belongs to no change.
        if record.last {
            if let Some(orphan) = s.clock.take() {
                self.queue_orphan_clock(s, orphan).await?;
            }
        }
        Ok(changes)
    }

    /// A row change message (Insert, Update, Delete, Truncate) → queued
    /// changes: the one path for changes read live from a record and for
    /// held changes replayed at the end of a join (`join.rs`). Any other
    /// message is refused (the caller routes it elsewhere).
    pub(super) async fn queue_row_message(
        &self,
        s: &mut Session,
        seq: u64,
        msg: Message,
    ) -> Result<(), ApplyError> {
        match msg {
            Message::Insert { rel, new } => {
                self.queue_change(s, seq, rel, Op::Insert, None, &new).await
            }
            Message::Update { rel, old, new } => {
                self.queue_change(s, seq, rel, Op::Update, old.as_ref(), &new)
                    .await
            }
            Message::Delete { rel, old } => {
                self.queue_change(s, seq, rel, Op::Delete, Some(&old), old.tuple())
                    .await
            }
            Message::Truncate {
                cascade,
                restart_identity,
                rels,
            } => {
                let mut names = Vec::new();
                for oid in rels {
                    self.resolve(s, seq, oid).await?;
                    names.push(s.targets[&oid].table.clone());
                }
                let sql = truncate_sql(&names, restart_identity, cascade);
                self.flush_run(s).await?;
                s.pending.push(Pending::Sql { sql });
                Ok(())
            }
            other => Err(ApplyError::Order {
                seq,
                message: format!(
                    "a {:?} message where a row change was expected",
                    other.kind() as char
                ),
            }),
        }
    }

    /// One row change → a queued statement, or a row added to the current
    /// run (inserts: sent as one COPY; updates and deletes by primary key:
    /// one set-based statement).
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
        target.check_columns(seq, new.len())?;
        if op != Op::Delete {
            s.sequences.note_row(&target.sequences, new);
        }
        let clock = s.clock.take();
        if clock.is_some() && !target.two_way && s.two_way_rechecked.insert(oid) {
            // The writing site stamps this table: this site may have
            // registered it since the table was mapped (its own sender
            // starting after this receiver). Once a record at most.
            let table = target.table.clone();
            let two_way = self.is_two_way(s, &table).await?;
            if let Some(map) = s.targets.get_mut(&oid) {
                map.two_way = two_way;
            }
        }
        let target = &s.targets[&oid];
        if target.two_way {
            return self.queue_two_way(s, oid, op, old, new, clock).await;
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
            let wher = vec![false; set.len()];
            self.queue_run(s, oid, op, set, wher, row, None).await?;
            return Ok(());
        }
        if let Some((row, key)) = set_based_row(target, op, old, new) {
            let set = match op {
                Op::Update => set,
                _ => wher.clone(),
            };
            self.queue_run(s, oid, op, set, wher, row, Some(key))
                .await?;
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

/// The row an update or delete brings to a set-based run, and the hash of
/// its key; `None` when it must go on its own (a prepared statement): the
/// table has no primary key usable set-based (`TableMap::set_based`), a key
/// value is missing or NULL, or an update changes its key, leaves an
/// unchanged TOAST value or sets no column outside the key.
///
/// The row: an update's values of every column; a delete's key values, in
/// column order.
pub(super) fn set_based_row(
    target: &TableMap,
    op: Op,
    old: Option<&OldTuple>,
    new: &Tuple,
) -> Option<(Vec<Option<String>>, u64)> {
    if !target.set_based || target.key.is_empty() {
        return None;
    }
    let mut key_cols = target.key.clone();
    key_cols.sort_unstable();
    let key_source: &Tuple = match (op, old) {
        (Op::Insert, _) => return None,
        (_, Some(old)) => old.tuple(),
        (Op::Update, None) => new,
        (Op::Delete, None) => return None,
    };
    let mut key = Vec::with_capacity(key_cols.len());
    for &k in &key_cols {
        match key_source.get(k) {
            Some(Value::Text(t)) => key.push(t.as_str()),
            _ => return None,
        }
    }
    let row = match op {
        Op::Update => {
            // The key unchanged, every column set (no unchanged TOAST
            // value), and something to set besides the key.
            let same_key = key_cols
                .iter()
                .zip(&key)
                .all(|(&k, v)| matches!(new.get(k), Some(Value::Text(t)) if t == v));
            if !same_key
                || new.len() <= key_cols.len()
                || new.iter().any(|v| matches!(v, Value::UnchangedToast))
            {
                return None;
            }
            new.iter().map(text_value).collect()
        }
        _ => key.iter().map(|v| Some((*v).to_owned())).collect(),
    };
    Some((row, key_hash(&key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(key: Vec<usize>, set_based: bool) -> TableMap {
        TableMap {
            table: "\"s\".\"t\"".into(),
            columns: vec![
                ("\"a\"".into(), "text".into()),
                ("\"id\"".into(), "integer".into()),
                ("\"b\"".into(), "text".into()),
            ],
            key,
            key_is_pk: set_based,
            set_based,
            overriding: false,
            always: Vec::new(),
            sequences: Vec::new(),
            two_way: false,
        }
    }

    fn t(v: &str) -> Value {
        Value::Text(v.into())
    }

    #[test]
    fn an_update_by_primary_key_carries_every_column_and_hashes_its_key() {
        let m = target(vec![1], true);
        let new = vec![t("x"), t("7"), Value::Null];
        let (row, key) = set_based_row(&m, Op::Update, None, &new).unwrap();
        assert_eq!(row, vec![Some("x".into()), Some("7".into()), None]);
        assert_eq!(key, key_hash(&["7"]));
        // The same key in an old key tuple: the same run key.
        let old = OldTuple::Key(vec![Value::Null, t("7"), Value::Null]);
        let (_, again) = set_based_row(&m, Op::Update, Some(&old), &new).unwrap();
        assert_eq!(again, key);
        // Another key, another hash.
        let other = vec![t("x"), t("8"), Value::Null];
        assert_ne!(set_based_row(&m, Op::Update, None, &other).unwrap().1, key);
    }

    #[test]
    fn a_delete_carries_its_key_values_in_column_order() {
        let m = target(vec![1, 0], true);
        let old = OldTuple::Key(vec![t("x"), t("7"), Value::Null]);
        let (row, key) = set_based_row(&m, Op::Delete, Some(&old), &old.tuple().clone()).unwrap();
        assert_eq!(row, vec![Some("x".into()), Some("7".into())]);
        assert_eq!(key, key_hash(&["x", "7"]));
    }

    #[test]
    fn changes_that_cannot_join_a_set_go_on_their_own() {
        let new = vec![t("x"), t("7"), t("y")];
        // No usable primary key.
        assert!(set_based_row(&target(vec![1], false), Op::Update, None, &new).is_none());
        assert!(set_based_row(&target(vec![], true), Op::Update, None, &new).is_none());
        let m = target(vec![1], true);
        // The key changes.
        let old = OldTuple::Key(vec![Value::Null, t("6"), Value::Null]);
        assert!(set_based_row(&m, Op::Update, Some(&old), &new).is_none());
        // An unchanged TOAST value.
        let toast = vec![t("x"), t("7"), Value::UnchangedToast];
        assert!(set_based_row(&m, Op::Update, None, &toast).is_none());
        // A NULL key.
        let null_key = vec![t("x"), Value::Null, t("y")];
        assert!(set_based_row(&m, Op::Update, None, &null_key).is_none());
        let old = OldTuple::Key(null_key.clone());
        assert!(set_based_row(&m, Op::Delete, Some(&old), &null_key).is_none());
        // Nothing but the key to set.
        let all_key = target(vec![0, 1, 2], true);
        assert!(set_based_row(&all_key, Op::Update, None, &new).is_none());
        assert!(set_based_row(
            &all_key,
            Op::Delete,
            Some(&OldTuple::Key(new.clone())),
            &new
        )
        .is_some());
    }
}
