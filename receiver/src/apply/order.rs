//! The order rule apply checks before it applies a record: each record must
//! follow the one before it in the inbox. A record that does not is a
//! definite error (class `out_of_order`), never applied: a sender that
//! spooled a transaction twice (a stale tail shipped after a capture
//! retry) or out of commit order would otherwise have it applied twice.
//!
//! The rule, for a record `next` read right after `prev`:
//! - seqs are dense: `next.seq == prev.seq + 1`;
//! - inside a transaction (`prev` is not its last record) parts run on
//!   (`next.part == prev.part + 1`) with the same xid and commit LSN;
//! - after a transaction's last record, `next` starts a new transaction
//!   (`part == 0`) whose commit LSN is above the previous one's.
//!
//! With no previous record (the first record of an apply session, after a
//! restart or a jump of the inbox), a record apply has not applied yet
//! (commit LSN above the progress row's) must start its transaction.

use pgcourier_proto::record::Record;
use pgcourier_proto::Lsn;

/// Where a record stands in the stream: what the order rule compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Position {
    pub seq: u64,
    pub xid: u32,
    pub commit_lsn: Lsn,
    pub part: u32,
    pub last: bool,
}

impl Position {
    pub(crate) fn of(r: &Record) -> Position {
        Position {
            seq: r.seq,
            xid: r.xid,
            commit_lsn: r.commit_lsn,
            part: r.part,
            last: r.last,
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "record {} (xid {}, commit LSN {}, part {}{})",
            self.seq,
            self.xid,
            self.commit_lsn,
            self.part,
            if self.last { ", last" } else { "" }
        )
    }
}

/// Why `next` does not follow `prev` (`None` when it does). `marker` is the
/// commit LSN of the progress row: with no `prev`, a record above it must
/// be the first part of its transaction.
pub(crate) fn check_follows(
    prev: Option<&Position>,
    next: &Position,
    marker: Lsn,
) -> Option<String> {
    let Some(prev) = prev else {
        return (next.commit_lsn > marker && next.part != 0).then(|| {
            format!(
                "{next} is the first record apply reads of a transaction it has not applied (progress row at commit LSN {marker}), but it is not part 0"
            )
        });
    };
    if next.seq != prev.seq + 1 {
        return Some(format!("{next} does not follow {prev}: seqs must be dense"));
    }
    if !prev.last {
        if next.part != prev.part + 1 || next.xid != prev.xid || next.commit_lsn != prev.commit_lsn
        {
            return Some(format!(
                "{next} does not follow {prev}: the transaction of {} is not finished, so {} must be its part {} with the same xid and commit LSN",
                prev.seq,
                next.seq,
                prev.part + 1
            ));
        }
    } else if next.part != 0 || next.commit_lsn <= prev.commit_lsn {
        return Some(format!(
            "{next} does not follow {prev}: after a transaction's last record comes part 0 of a transaction with a higher commit LSN (a transaction spooled twice, or out of commit order)"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(seq: u64, xid: u32, lsn: u64, part: u32, last: bool) -> Position {
        Position {
            seq,
            xid,
            commit_lsn: Lsn(lsn),
            part,
            last,
        }
    }

    /// Checks a whole run; the index of the first record refused.
    fn first_refused(run: &[Position], marker: u64) -> Option<usize> {
        let mut prev: Option<&Position> = None;
        for (i, p) in run.iter().enumerate() {
            if check_follows(prev, p, Lsn(marker)).is_some() {
                return Some(i);
            }
            prev = Some(p);
        }
        None
    }

    #[test]
    fn a_well_formed_stream_is_accepted() {
        let run = [
            pos(1, 10, 100, 0, false),
            pos(2, 10, 100, 1, false),
            pos(3, 10, 100, 2, true),
            pos(4, 11, 200, 0, true),
            pos(5, 9, 300, 0, true),
        ];
        assert_eq!(first_refused(&run, 0), None);
        // After a restart, records already applied may start mid-transaction.
        assert_eq!(first_refused(&run[1..], 100), None);
    }

    #[test]
    fn a_transaction_spooled_twice_at_new_seqs_is_refused() {
        // The capture bug: a failed peek's tail stayed, the next peek
        // appended the same transactions again.
        let run = [
            pos(1, 10, 100, 0, false),
            pos(2, 10, 100, 1, true),
            pos(3, 11, 200, 0, true),
            pos(4, 10, 100, 0, false),
            pos(5, 10, 100, 1, true),
            pos(6, 11, 200, 0, true),
        ];
        assert_eq!(first_refused(&run, 0), Some(3));
        // The same transaction twice in a row.
        let run = [pos(1, 10, 100, 0, true), pos(2, 10, 100, 0, true)];
        assert_eq!(first_refused(&run, 0), Some(1));
        let msg = check_follows(Some(&run[0]), &run[1], Lsn(0)).unwrap();
        assert!(
            msg.contains("record 2") && msg.contains("record 1") && msg.contains("0/64"),
            "{msg}"
        );
    }

    #[test]
    fn broken_parts_gaps_and_stale_starts_are_refused() {
        let start = pos(1, 10, 100, 0, false);
        for bad in [
            pos(2, 10, 100, 2, false), // a part skipped
            pos(2, 11, 100, 1, false), // another xid
            pos(2, 10, 150, 1, true),  // another commit LSN
            pos(2, 12, 200, 0, true),  // a new transaction before the last part
            pos(3, 10, 100, 1, true),  // a seq skipped
        ] {
            assert!(check_follows(Some(&start), &bad, Lsn(0)).is_some(), "{bad}");
        }
        let end = pos(5, 10, 100, 3, true);
        assert!(check_follows(Some(&end), &pos(6, 11, 200, 1, true), Lsn(0)).is_some());
        assert!(check_follows(Some(&end), &pos(6, 11, 90, 0, true), Lsn(0)).is_some());
        // No previous record: an unapplied transaction must start at part 0.
        assert!(check_follows(None, &pos(7, 11, 200, 1, true), Lsn(100)).is_some());
        assert!(check_follows(None, &pos(7, 11, 200, 0, true), Lsn(100)).is_none());
    }
}
