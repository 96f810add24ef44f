//! The cutter's rules, one test each (names say the rule), plus a property
//! test that cutting loses, reorders and oversizes nothing.

use super::*;
use crate::pgoutput::{encode, Column, Relation, ReplicaIdentity, Value};
use crate::record::{Piece, MAX_PIECE_BYTES, TARGET_RECORD_BYTES};

const A: u32 = 16_385;
const B: u32 = 16_386;
const C: u32 = 16_387;

fn begin(final_lsn: u64, xid: u32) -> Vec<u8> {
    encode(&Message::Begin {
        final_lsn: Lsn(final_lsn),
        commit_time: 1_000 + i64::from(xid),
        xid,
    })
}

fn commit(commit_lsn: u64, end_lsn: u64) -> Vec<u8> {
    encode(&Message::Commit {
        flags: 0,
        commit_lsn: Lsn(commit_lsn),
        end_lsn: Lsn(end_lsn),
        commit_time: 0,
    })
}

fn relation(oid: u32) -> Vec<u8> {
    encode(&Message::Relation(Relation {
        oid,
        schema: "public".into(),
        name: format!("t{oid}"),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![Column {
            key: true,
            name: "v".into(),
            type_oid: 25,
            type_modifier: -1,
        }],
    }))
}

fn insert(oid: u32, text: &str) -> Vec<u8> {
    encode(&Message::Insert {
        rel: oid,
        new: vec![Value::Text(text.into())],
    })
}

/// An Insert into `oid` of exactly `len` bytes.
fn insert_of_len(oid: u32, len: usize) -> Vec<u8> {
    let overhead = insert(oid, "").len();
    let msg = insert(oid, &"x".repeat(len - overhead));
    assert_eq!(msg.len(), len);
    msg
}

fn truncate(rels: &[u32]) -> Vec<u8> {
    encode(&Message::Truncate {
        cascade: true,
        restart_identity: false,
        rels: rels.to_vec(),
    })
}

fn synced(oids: &[u32]) -> Tables {
    Tables {
        synced: oids.iter().copied().collect(),
        waiting: BTreeSet::new(),
    }
}

/// Feed every message; return the records in order and the summary.
fn cut(
    next_seq: u64,
    skip_through: u64,
    tables: &mut Tables,
    messages: &[Vec<u8>],
) -> (Vec<Record>, BatchSummary) {
    let mut cutter = Cutter::new(next_seq, Lsn(skip_through));
    let mut records = Vec::new();
    for m in messages {
        records.extend(
            cutter
                .message(m, tables)
                .expect("a well-formed stream")
                .records,
        );
    }
    (
        records,
        cutter.finish().expect("the peek ends between transactions"),
    )
}

/// One transaction (Begin final LSN `lsn`, end `lsn + 8`) around `body`.
fn txn(lsn: u64, xid: u32, body: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut all = vec![begin(lsn, xid)];
    all.extend(body);
    all.push(commit(lsn, lsn + 8));
    all
}

/// The whole messages the records carry, fragments joined, in order.
fn reassemble(records: &[Record]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut partial: Option<Vec<u8>> = None;
    for r in records {
        for p in &r.pieces {
            match p {
                Piece::Message(m) => {
                    assert!(partial.is_none(), "a message inside a fragmented one");
                    out.push(m.clone());
                }
                Piece::Fragment { bytes, more } => {
                    let buf = partial.get_or_insert_with(Vec::new);
                    buf.extend_from_slice(bytes);
                    if !more {
                        out.push(partial.take().expect("just filled"));
                    }
                }
            }
        }
    }
    assert!(partial.is_none(), "a fragmented message never ended");
    out
}

#[test]
fn a_small_transaction_is_one_last_record_with_its_commit_fields_and_end_lsn() {
    let body = vec![insert(A, "one"), insert(A, "two")];
    let (records, summary) = cut(7, 0, &mut synced(&[A]), &txn(0x100, 42, body.clone()));
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(
        (
            r.seq,
            r.part,
            r.last,
            r.end_lsn,
            r.commit_lsn,
            r.commit_time,
            r.xid
        ),
        (7, 0, true, Lsn(0x108), Lsn(0x100), 1_042, 42)
    );
    assert_eq!(r.only_for, None);
    assert_eq!(
        reassemble(&records),
        body,
        "Begin and Commit are not pieces"
    );
    assert_eq!(
        summary,
        BatchSummary {
            messages: 4,
            transactions: 1,
            records: 1,
            skipped: 0,
            dropped: 0,
            last_commit: Lsn(0x100),
            last_end: Lsn(0x108),
            after_cut: 0,
            foreign_messages: 0,
            forged_ddl: 0,
            looped: 0,
            forwarded: 0,
            one_way: BTreeMap::new(),
        }
    );
}

#[test]
fn a_record_is_closed_before_a_message_that_would_take_it_past_8_kib() {
    let body = vec![
        insert_of_len(A, 3_000),
        insert_of_len(A, 3_000),
        insert_of_len(A, 3_000),
    ];
    let (records, _) = cut(1, 0, &mut synced(&[A]), &txn(0x100, 1, body.clone()));
    let sizes: Vec<usize> = records.iter().map(Record::payload_bytes).collect();
    assert_eq!(sizes, vec![6_000, 3_000]);
    assert_eq!(reassemble(&records), body);
}

#[test]
fn a_transaction_of_exactly_8_kib_is_one_record_and_one_byte_more_makes_two() {
    let half = TARGET_RECORD_BYTES / 2;
    let exact = vec![insert_of_len(A, half), insert_of_len(A, half)];
    let (records, _) = cut(1, 0, &mut synced(&[A]), &txn(0x100, 1, exact));
    assert_eq!(
        records.len(),
        1,
        "a payload of exactly the target stays whole"
    );
    assert_eq!(records[0].payload_bytes(), TARGET_RECORD_BYTES);

    let over = vec![insert_of_len(A, half), insert_of_len(A, half + 1)];
    let (records, _) = cut(1, 0, &mut synced(&[A]), &txn(0x100, 1, over));
    assert_eq!(records.len(), 2);
}

#[test]
fn parts_count_from_zero_and_only_the_last_record_carries_last_and_the_end_lsn() {
    let body: Vec<Vec<u8>> = (0..5).map(|_| insert_of_len(A, 5_000)).collect();
    let (records, _) = cut(10, 0, &mut synced(&[A]), &txn(0x100, 1, body));
    assert_eq!(records.len(), 5);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.seq, 10 + i as u64, "sequence numbers are dense");
        assert_eq!(r.part, i as u32);
        let last = i == 4;
        assert_eq!(r.last, last, "record {i}");
        assert_eq!(
            r.end_lsn,
            if last { Lsn(0x108) } else { Lsn::ZERO },
            "record {i}"
        );
        assert_eq!(r.commit_lsn, Lsn(0x100));
    }
}

#[test]
fn a_message_over_16_kib_travels_as_16_kib_fragments_each_closing_its_record() {
    let big = insert_of_len(A, 2 * MAX_PIECE_BYTES + 100);
    let body = vec![insert(A, "before"), big.clone()];
    let (records, _) = cut(1, 0, &mut synced(&[A]), &txn(0x100, 1, body.clone()));
    // The small message's record is closed first; then two full fragments
    // close their records; the last fragment ends the transaction.
    let shapes: Vec<Vec<(usize, Option<bool>)>> = records
        .iter()
        .map(|r| {
            r.pieces
                .iter()
                .map(|p| match p {
                    Piece::Message(m) => (m.len(), None),
                    Piece::Fragment { bytes, more } => (bytes.len(), Some(*more)),
                })
                .collect()
        })
        .collect();
    assert_eq!(
        shapes,
        vec![
            vec![(body[0].len(), None)],
            vec![(MAX_PIECE_BYTES, Some(true))],
            vec![(MAX_PIECE_BYTES, Some(true))],
            vec![(100, Some(false))],
        ]
    );
    assert_eq!(reassemble(&records), body);
}

#[test]
fn a_message_of_exactly_16_kib_is_one_piece_not_a_fragment() {
    let exact = insert_of_len(A, MAX_PIECE_BYTES);
    let (records, _) = cut(1, 0, &mut synced(&[A]), &txn(0x100, 1, vec![exact.clone()]));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].pieces, vec![Piece::Message(exact)]);
}

#[test]
fn messages_after_a_last_fragment_join_its_record_while_under_8_kib() {
    let big = insert_of_len(A, MAX_PIECE_BYTES + 1);
    let small = insert(A, "after");
    let (records, _) = cut(
        1,
        0,
        &mut synced(&[A]),
        &txn(0x100, 1, vec![big, small.clone()]),
    );
    assert_eq!(records.len(), 2);
    assert_eq!(
        records[1].pieces,
        vec![
            Piece::Fragment {
                bytes: vec![b'x'],
                more: false
            },
            Piece::Message(small)
        ]
    );
    // A last fragment of a full 16 KiB leaves no room: the next message
    // opens a record of its own.
    let big = insert_of_len(A, 2 * MAX_PIECE_BYTES);
    let (records, _) = cut(
        1,
        0,
        &mut synced(&[A]),
        &txn(0x100, 1, vec![big, insert(A, "after")]),
    );
    assert_eq!(records.len(), 3);
}

#[test]
fn transactions_follow_one_another_with_dense_seqs_and_parts_from_zero() {
    let mut stream = txn(
        0x100,
        1,
        vec![insert_of_len(A, 5_000), insert_of_len(A, 5_000)],
    );
    stream.extend(txn(0x200, 2, vec![insert(A, "x")]));
    let mut cutter = Cutter::new(3, Lsn::ZERO);
    let mut tables = synced(&[A]);
    let mut records = Vec::new();
    for m in &stream {
        records.extend(cutter.message(m, &mut tables).unwrap().records);
    }
    assert_eq!(cutter.next_seq(), 6);
    let ids: Vec<(u64, u32, Lsn)> = records
        .iter()
        .map(|r| (r.seq, r.part, r.commit_lsn))
        .collect();
    assert_eq!(
        ids,
        vec![(3, 0, Lsn(0x100)), (4, 1, Lsn(0x100)), (5, 0, Lsn(0x200))]
    );
    let summary = cutter.finish().unwrap();
    assert_eq!((summary.transactions, summary.records), (2, 3));
    assert_eq!(
        (summary.last_commit, summary.last_end),
        (Lsn(0x200), Lsn(0x208))
    );
}

#[test]
fn transactions_the_spool_already_holds_are_skipped_but_their_end_counts() {
    let mut stream = txn(0x100, 1, vec![insert(A, "held")]);
    stream.extend(txn(0x101, 2, vec![insert(A, "new")]));
    let (records, summary) = cut(5, 0x100, &mut synced(&[A]), &stream);
    assert_eq!(
        records.len(),
        1,
        "commit LSN at skip_through is skipped, above it is cut"
    );
    assert_eq!((records[0].seq, records[0].commit_lsn), (5, Lsn(0x101)));
    assert_eq!((summary.skipped, summary.transactions), (1, 1));

    let (records, summary) = cut(
        5,
        0x100,
        &mut synced(&[A]),
        &txn(0x100, 1, vec![insert(A, "held")]),
    );
    assert!(records.is_empty());
    assert_eq!(summary.skipped, 1);
    assert_eq!(
        summary.last_end,
        Lsn(0x108),
        "a skipped transaction's end may be confirmed"
    );
    assert_eq!(
        summary.last_commit,
        Lsn::ZERO,
        "a skipped transaction is not committed again"
    );
    assert!(!summary.needs_commit());
}

#[test]
fn a_skipped_transaction_does_not_make_its_new_tables_wait() {
    let mut tables = synced(&[]);
    let (_, summary) = cut(
        1,
        0x100,
        &mut tables,
        &txn(0x100, 1, vec![relation(B), insert(B, "x")]),
    );
    assert_eq!(summary.skipped, 1);
    assert!(tables.waiting.is_empty());
}

#[test]
fn changes_to_a_waiting_table_are_left_out_and_a_transaction_of_only_those_is_dropped() {
    let mut tables = Tables {
        synced: BTreeSet::new(),
        waiting: [A].into(),
    };
    let body = vec![
        relation(A),
        insert(A, "x"),
        encode(&Message::Update {
            rel: A,
            old: None,
            new: vec![Value::Text("y".into())],
        }),
    ];
    let (records, summary) = cut(9, 0, &mut tables, &txn(0x100, 1, body));
    assert!(records.is_empty());
    assert_eq!(summary.dropped, 1);
    assert_eq!(summary.transactions, 0);
    assert_eq!(
        summary.last_commit,
        Lsn(0x100),
        "the spool's marks move past a dropped one"
    );
    assert_eq!(summary.last_end, Lsn(0x108));
    assert!(summary.needs_commit());
}

#[test]
fn an_empty_transaction_is_dropped_without_a_record() {
    let mut cutter = Cutter::new(4, Lsn::ZERO);
    let mut tables = synced(&[A]);
    for m in txn(0x100, 1, vec![]) {
        assert!(cutter.message(&m, &mut tables).unwrap().records.is_empty());
    }
    assert_eq!(cutter.next_seq(), 4, "a dropped transaction takes no seq");
    let summary = cutter.finish().unwrap();
    assert_eq!(
        (summary.dropped, summary.transactions, summary.records),
        (1, 0, 0)
    );
}

#[test]
fn a_relation_for_a_table_never_seen_makes_it_wait_and_is_left_out_with_its_changes() {
    let mut tables = synced(&[A]);
    let mut cutter = Cutter::new(1, Lsn::ZERO);
    cutter.message(&begin(0x100, 1), &mut tables).unwrap();
    let fed = cutter.message(&relation(B), &mut tables).unwrap();
    assert_eq!(fed.new_table, Some(B));
    assert_eq!(tables.waiting, [B].into());
    let fed = cutter.message(&relation(B), &mut tables).unwrap();
    assert_eq!(fed.new_table, None, "told once");
    cutter.message(&insert(B, "left out"), &mut tables).unwrap();
    cutter.message(&insert(A, "kept"), &mut tables).unwrap();
    let records = cutter
        .message(&commit(0x100, 0x108), &mut tables)
        .unwrap()
        .records;
    assert_eq!(reassemble(&records), vec![insert(A, "kept")]);
}

#[test]
fn relations_types_origins_and_messages_of_carried_tables_stay_in_order_with_the_changes() {
    let body = vec![
        encode(&Message::Origin {
            lsn: Lsn(5),
            name: "o".into(),
        }),
        encode(&Message::Type {
            oid: 900,
            schema: "public".into(),
            name: "mood".into(),
        }),
        relation(A),
        insert(A, "1"),
        relation(A),
        insert(A, "2"),
        truncate(&[A]),
    ];
    let (records, _) = cut(1, 0, &mut synced(&[A]), &txn(0x100, 1, body.clone()));
    assert_eq!(reassemble(&records), body);
}

fn message(transactional: bool, prefix: &str, content: &[u8]) -> Vec<u8> {
    encode(&Message::LogicalMessage {
        transactional,
        lsn: Lsn(6),
        prefix: prefix.into(),
        content: content.to_vec(),
    })
}

fn signed(key: &[u8], body: &[u8]) -> Vec<u8> {
    let mac: String = ddl_mac(key, body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    [mac.as_bytes(), body].concat()
}

#[test]
fn the_ddl_signature_is_hmac_sha256_as_rfc_4231_gives_it() {
    // RFC 4231, test case 2.
    let mac = ddl_mac(b"Jefe", b"what do ya want for nothing?");
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    let body = br#"{"statement":"ALTER TABLE t ADD b int"}"#;
    assert_eq!(
        verify_ddl(b"k", &signed(b"k", body)).as_deref(),
        Some(&body[..])
    );
    assert_eq!(verify_ddl(b"other", &signed(b"k", body)), None);
    let mut tampered = signed(b"k", body);
    *tampered.last_mut().unwrap() = b' ';
    assert_eq!(verify_ddl(b"k", &tampered), None);
    assert_eq!(verify_ddl(b"k", body), None);
    assert_eq!(verify_ddl(b"k", b"zz"), None);
}

#[test]
fn other_applications_logical_messages_are_left_out_inside_and_between_transactions() {
    let mut stream = vec![message(false, "app.heartbeat", b"1")];
    stream.extend(txn(
        0x100,
        1,
        vec![
            message(true, "app.audit", b"x"),
            insert(A, "1"),
            // Not ours although it looks like it: pgcourier's copy
            // metadata is written by the sender, never read from the slot.
            message(true, "pgcourier.copy", b"{}"),
        ],
    ));
    stream.push(message(false, "pgcourier.ddl", b"{}"));
    stream.extend(txn(0x200, 2, vec![insert(A, "2")]));
    let mut tables = synced(&[A]);
    let mut cutter = Cutter::new(1, Lsn::ZERO).with_ddl_key(Some(b"k".to_vec()));
    let mut records = Vec::new();
    for m in &stream {
        records.extend(cutter.message(m, &mut tables).expect("carried on").records);
    }
    let summary = cutter.finish().expect("ends between transactions");
    assert_eq!(reassemble(&records), vec![insert(A, "1"), insert(A, "2")]);
    assert_eq!(summary.foreign_messages, 4);
    assert_eq!(summary.forged_ddl, 0);
}

#[test]
fn a_ddl_message_is_kept_unsigned_only_when_its_signature_verifies() {
    let body = br#"{"statement":"ALTER TABLE t ADD b int","search_path":"public","tags":[]}"#;
    let stream = txn(
        0x100,
        1,
        vec![
            message(true, DDL_PREFIX, &signed(b"key", body)),
            message(
                true,
                DDL_PREFIX,
                &signed(b"guess", b"{\"statement\":\"DROP TABLE t\"}"),
            ),
            message(true, DDL_PREFIX, b"{\"statement\":\"DROP TABLE t\"}"),
            insert(A, "1"),
        ],
    );
    let run = |key: Option<&[u8]>| {
        let mut tables = synced(&[A]);
        let mut cutter = Cutter::new(1, Lsn::ZERO).with_ddl_key(key.map(<[u8]>::to_vec));
        let mut records = Vec::new();
        for m in &stream {
            records.extend(cutter.message(m, &mut tables).expect("carried on").records);
        }
        (reassemble(&records), cutter.finish().expect("whole"))
    };
    let (kept, summary) = run(Some(b"key"));
    assert_eq!(kept, vec![message(true, DDL_PREFIX, body), insert(A, "1")]);
    assert_eq!(summary.forged_ddl, 2);
    // Without the key nothing is trusted.
    let (kept, summary) = run(None);
    assert_eq!(kept, vec![insert(A, "1")]);
    assert_eq!(summary.forged_ddl, 3);
}

#[test]
fn a_row_clock_is_kept_unsigned_before_its_change_only_when_it_verifies() {
    let body = br#"{"tbl":"public.t","key":{"id":1},"hlc":7,"site":"b0"}"#;
    let stream = txn(
        0x100,
        1,
        vec![
            message(true, CLOCK_PREFIX, &signed(b"key", body)),
            insert(A, "1"),
            // A forged clock (a huge one would make a row unbeatable).
            message(true, CLOCK_PREFIX, &signed(b"guess", body)),
            insert(A, "2"),
        ],
    );
    let mut tables = synced(&[A]);
    let mut cutter = Cutter::new(1, Lsn::ZERO).with_ddl_key(Some(b"key".to_vec()));
    let mut records = Vec::new();
    for m in &stream {
        records.extend(cutter.message(m, &mut tables).expect("carried on").records);
    }
    let summary = cutter.finish().expect("whole");
    assert_eq!(
        reassemble(&records),
        vec![
            message(true, CLOCK_PREFIX, body),
            insert(A, "1"),
            insert(A, "2")
        ]
    );
    assert_eq!(summary.forged_ddl, 1);
}

/// Tables A (public.tA) and B (public.tB) written, B in part of a
/// TRUNCATE too, through `cutter`, which does not ship B: only A's
/// Relation, change and part of the TRUNCATE are cut, and B's three
/// writes are counted.
fn b_is_left_out_and_counted(mut cutter: Cutter) {
    let truncate = encode(&Message::Truncate {
        cascade: false,
        restart_identity: false,
        rels: vec![A, B],
    });
    let mut stream = txn(
        0x100,
        1,
        vec![relation(A), relation(B), insert(B, "b1"), insert(A, "1")],
    );
    stream.extend(txn(0x200, 2, vec![insert(B, "b2"), truncate]));
    let mut tables = synced(&[A, B]);
    let mut records = Vec::new();
    for m in &stream {
        records.extend(cutter.message(m, &mut tables).expect("carried on").records);
    }
    let summary = cutter.finish().expect("whole");
    let kept_truncate = encode(&Message::Truncate {
        cascade: false,
        restart_identity: false,
        rels: vec![A],
    });
    assert_eq!(
        reassemble(&records),
        vec![relation(A), insert(A, "1"), kept_truncate]
    );
    assert_eq!(
        summary.one_way,
        BTreeMap::from([(format!("public.t{B}"), 3)])
    );
}

/// A branch's sender ships its two-way table A only (`only_tables`).
#[test]
fn a_site_that_ships_its_two_way_tables_only_counts_its_writes_to_the_others() {
    let only = BTreeSet::from([format!("public.t{A}")]);
    b_is_left_out_and_counted(Cutter::new(1, Lsn::ZERO).only_tables(Some(only)));
}

/// Headquarters' sender leaves out B, written at the branches only
/// (`except_tables`), its own writes to it and a TRUNCATE of it included.
#[test]
fn a_table_written_at_the_branches_only_is_not_shipped_down() {
    let up = BTreeSet::from([format!("public.t{B}")]);
    b_is_left_out_and_counted(Cutter::new(1, Lsn::ZERO).except_tables(up));
}

fn own_relation(oid: u32) -> Vec<u8> {
    encode(&Message::Relation(Relation {
        oid,
        schema: OWN_SCHEMA.into(),
        name: "ddl_key".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![Column {
            key: true,
            name: "key".into(),
            type_oid: 17,
            type_modifier: -1,
        }],
    }))
}

#[test]
fn an_own_table_first_described_in_a_skipped_transaction_is_still_left_out() {
    // The spool holds the first transaction (commit 0x100 <= 0x100):
    // pgoutput will not describe the table again in this stream.
    let mut stream = txn(0x100, 1, vec![own_relation(B), insert(B, "k1")]);
    stream.extend(txn(0x200, 2, vec![insert(B, "k2"), insert(A, "1")]));
    let mut tables = synced(&[A]);
    let (records, _) = cut(1, 0x100, &mut tables, &stream);
    assert_eq!(reassemble(&records), vec![insert(A, "1")]);
}

#[test]
fn tables_of_pgcourier_s_own_schema_are_never_carried_nor_wait_for_a_copy() {
    let own = own_relation(B);
    let body = vec![
        relation(A),
        insert(A, "1"),
        own,
        insert(B, "secret"),
        truncate(&[A, B]),
    ];
    let mut tables = synced(&[A]);
    let (records, _) = cut(1, 0, &mut tables, &txn(0x100, 1, body));
    assert_eq!(
        reassemble(&records),
        vec![relation(A), insert(A, "1"), truncate(&[A])]
    );
    assert!(tables.waiting.is_empty(), "{tables:?}");
}

#[test]
fn a_change_to_a_table_in_neither_set_is_carried() {
    let (records, _) = cut(1, 0, &mut synced(&[]), &txn(0x100, 1, vec![insert(C, "x")]));
    assert_eq!(reassemble(&records), vec![insert(C, "x")]);
}

#[test]
fn a_truncate_keeps_only_its_tables_that_are_not_waiting() {
    let mut tables = Tables {
        synced: [A, C].into(),
        waiting: [B].into(),
    };
    let body = vec![truncate(&[A, B, C]), truncate(&[B]), truncate(&[A])];
    let (records, _) = cut(1, 0, &mut tables, &txn(0x100, 1, body));
    assert_eq!(
        reassemble(&records),
        vec![truncate(&[A, C]), truncate(&[A])],
        "flags kept, waiting relation removed, a truncate of only waiting tables left out"
    );
}

#[test]
fn out_of_order_and_malformed_streams_are_errors() {
    let cases: Vec<(&str, Vec<Vec<u8>>, CutError)> = vec![
        (
            "change outside a transaction",
            vec![insert(A, "x")],
            CutError::OutOfOrder("change outside a transaction"),
        ),
        (
            "Begin inside a transaction",
            vec![begin(0x100, 1), begin(0x200, 2)],
            CutError::OutOfOrder("Begin inside a transaction"),
        ),
        (
            "Commit outside a transaction",
            vec![commit(0x100, 0x108)],
            CutError::OutOfOrder("Commit outside a transaction"),
        ),
        (
            "Commit of another transaction",
            vec![begin(0x100, 1), commit(0x200, 0x208)],
            CutError::OutOfOrder("Commit LSN differs from Begin final LSN"),
        ),
        (
            "empty message",
            vec![vec![]],
            CutError::OutOfOrder("empty pgoutput message"),
        ),
        (
            "change too short for its relation id",
            vec![begin(0x100, 1), b"I\0\0".to_vec()],
            CutError::OutOfOrder("change message too short"),
        ),
        (
            "truncated Begin",
            vec![begin(0x100, 1)[..5].to_vec()],
            CutError::Decode(DecodeError::Truncated { kind: 'B', at: 1 }),
        ),
    ];
    for (what, stream, expected) in cases {
        let mut cutter = Cutter::new(1, Lsn::ZERO);
        let mut tables = synced(&[A]);
        let err = stream
            .iter()
            .map(|m| cutter.message(m, &mut tables))
            .find_map(Result::err)
            .unwrap_or_else(|| panic!("{what}: accepted"));
        match (&err, &expected) {
            // The decoder's exact position is its own business.
            (CutError::Decode(_), CutError::Decode(_)) => {}
            _ => assert_eq!(err, expected, "{what}"),
        }
    }
    let mut cutter = Cutter::new(1, Lsn::ZERO);
    cutter.message(&begin(0x100, 1), &mut synced(&[A])).unwrap();
    assert_eq!(
        cutter.finish().unwrap_err(),
        CutError::OutOfOrder("input ended inside a transaction")
    );
}

#[test]
fn a_transaction_cut_for_one_receiver_says_so_on_every_record_and_may_end_empty() {
    let head = TxnHead {
        commit_lsn: Lsn(0xFF),
        commit_time: 5,
        xid: 0,
        only_for: Some("late".into()),
    };
    let mut txn = TxnCutter::new(20, head.clone());
    let mut records = txn.push(&insert_of_len(A, MAX_PIECE_BYTES + 10));
    records.push(txn.finish(Lsn(0x100)));
    assert_eq!(records.len(), 2);
    assert!(records
        .iter()
        .all(|r| r.only_for.as_deref() == Some("late")));
    assert_eq!(records[1].end_lsn, Lsn(0x100));

    let empty = TxnCutter::new(30, head).finish(Lsn(0x100));
    assert!(empty.last && empty.pieces.is_empty() && empty.part == 0 && empty.seq == 30);
}

#[test]
fn a_transaction_committing_at_or_after_a_pending_cut_is_left_for_after_the_splice() {
    let l = 0x2000 + 24;
    let mut tables = synced(&[A]);
    let mut messages = txn(0x1F00, 1, vec![relation(A), insert(A, "before")]);
    messages.extend(txn(l, 2, vec![insert(A, "at the cut")]));
    messages.extend(txn(l + 0x40, 3, vec![insert(A, "after")]));
    let mut cutter = Cutter::new(1, Lsn::ZERO).before_cut(Some(Lsn(l)));
    let mut records = Vec::new();
    for m in &messages {
        records.extend(cutter.message(m, &mut tables).unwrap().records);
    }
    let summary = cutter.finish().unwrap();
    assert_eq!(
        records.iter().map(|r| r.xid).collect::<Vec<_>>(),
        vec![1],
        "only the transaction below the cut is spooled before the copy"
    );
    assert_eq!(
        (summary.transactions, summary.after_cut),
        (1, 2),
        "{summary:?}"
    );
    assert_eq!(summary.last_commit, Lsn(0x1F00));
    assert_eq!(
        summary.last_end,
        Lsn(0x1F08),
        "the slot is not confirmed past the cut"
    );
    // A stream restarted from 0x1F08 sends only the transactions from L
    // on: with the cut still pending, none is spooled (the splice is due),
    // and they come after it.
    let mut cutter = Cutter::new(2, Lsn(0x1F00)).before_cut(Some(Lsn(l)));
    for m in &messages[4..] {
        assert!(cutter.message(m, &mut tables).unwrap().records.is_empty());
    }
    let summary = cutter.finish().unwrap();
    assert_eq!((summary.transactions, summary.after_cut), (0, 2));
    assert!(!summary.needs_commit());
    // Once spliced (no cut pending), it is cut as any transaction.
    let (records, _) = cut(3, 0x1F00, &mut tables, &messages[4..]);
    assert_eq!(
        records.iter().map(|r| r.xid).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert_eq!(records[0].commit_lsn, Lsn(l));
}

mod property {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the message sizes, the records give back every message in
        /// order, each record is encodable and its payload stays under
        /// 8 KiB + 16 KiB, and every piece is at most 16 KiB.
        #[test]
        fn cutting_loses_reorders_and_oversizes_nothing(
            sizes in proptest::collection::vec(20usize..40_000, 1..40),
            first_seq in 1u64..1_000,
        ) {
            let body: Vec<Vec<u8>> = sizes.iter().map(|&n| insert_of_len(A, n)).collect();
            let (records, summary) = cut(first_seq, 0, &mut synced(&[A]), &txn(0x100, 1, body.clone()));
            prop_assert_eq!(reassemble(&records), body);
            prop_assert_eq!(summary.records, records.len() as u64);
            for (i, r) in records.iter().enumerate() {
                prop_assert_eq!(r.seq, first_seq + i as u64);
                prop_assert_eq!(r.part, i as u32);
                prop_assert_eq!(r.last, i + 1 == records.len());
                prop_assert!(!r.pieces.is_empty());
                prop_assert!(r.payload_bytes() <= TARGET_RECORD_BYTES + MAX_PIECE_BYTES);
                prop_assert!(r.pieces.iter().all(|p| p.len() <= MAX_PIECE_BYTES));
                prop_assert!(r.encode().is_ok());
            }
        }
    }
}

#[test]
fn a_stream_is_judged_batch_by_batch_and_only_between_transactions() {
    let mut tables = synced(&[A]);
    let mut cutter = Cutter::new(1, Lsn(50));
    // A transaction already spooled, then a new one: the first batch.
    for m in txn(40, 1, vec![insert(A, "old")]).into_iter().chain(txn(
        100,
        2,
        vec![relation(A), insert(A, "new")],
    )) {
        cutter.message(&m, &mut tables).unwrap();
    }
    let first = cutter.take_summary().unwrap();
    assert_eq!((first.skipped, first.transactions), (1, 1));
    assert_eq!(first.last_commit, Lsn(100));
    // Inside the next transaction no batch may end.
    cutter.message(&begin(200, 3), &mut tables).unwrap();
    assert!(!cutter.is_idle());
    assert!(cutter.take_summary().is_err());
    cutter.message(&insert(A, "later"), &mut tables).unwrap();
    let fed = cutter.message(&commit(200, 208), &mut tables).unwrap();
    assert_eq!(
        fed.records[0].seq, 2,
        "sequence numbers run on across batches"
    );
    let second = cutter.take_summary().unwrap();
    assert_eq!((second.skipped, second.transactions), (0, 1));
    assert_eq!((second.last_commit, second.last_end), (Lsn(200), Lsn(208)));
    // An empty batch asks for nothing.
    assert!(!cutter.take_summary().unwrap().needs_commit());
}

#[test]
fn message_each_hands_over_each_record_as_it_is_cut_and_stops_at_the_first_error() {
    let big = insert_of_len(A, 5 * MAX_PIECE_BYTES + 7);
    let body = vec![insert(A, "before"), big, insert(A, "after")];
    let messages = txn(0x100, 1, body);
    let (want, want_summary) = cut(1, 0, &mut synced(&[A]), &messages);

    // The same records, in the same order, one call each.
    let mut cutter = Cutter::new(1, Lsn(0));
    let mut tables = synced(&[A]);
    let mut got = Vec::new();
    for m in &messages {
        let calls_before = got.len();
        let new_table = cutter
            .message_each(m, &mut tables, |r| {
                got.push(r);
                Ok::<(), CutError>(())
            })
            .expect("a well-formed stream");
        assert_eq!(new_table, None);
        if m.len() > MAX_PIECE_BYTES {
            // The big message closed the small one's record and five of its
            // own fragments, each handed over on its own.
            assert_eq!(got.len() - calls_before, 6);
        }
    }
    assert_eq!(got, want);
    assert_eq!(cutter.finish().expect("whole transactions"), want_summary);

    // The caller's error stops the cut at once and comes back unchanged.
    #[derive(Debug, PartialEq)]
    enum Caller {
        Full,
        Cut(CutError),
    }
    impl From<CutError> for Caller {
        fn from(e: CutError) -> Caller {
            Caller::Cut(e)
        }
    }
    let mut cutter = Cutter::new(1, Lsn(0));
    let mut tables = synced(&[A]);
    let mut calls = 0;
    for m in &messages[..2] {
        cutter
            .message_each(m, &mut tables, |_| Ok::<(), Caller>(()))
            .expect("begin and a small insert cut nothing");
    }
    let err = cutter
        .message_each(&messages[2], &mut tables, |_| {
            calls += 1;
            Err(Caller::Full)
        })
        .unwrap_err();
    assert_eq!(err, Caller::Full);
    assert_eq!(calls, 1, "no record is cut after the caller's error");
    // The cutter's own errors come back through the caller's type.
    let err = Cutter::new(1, Lsn(0))
        .message_each(&insert(A, "x"), &mut tables, |_| Ok::<(), Caller>(()))
        .unwrap_err();
    assert_eq!(
        err,
        Caller::Cut(CutError::OutOfOrder("change outside a transaction"))
    );
}

fn origin(name: &str) -> Vec<u8> {
    encode(&Message::Origin {
        lsn: Lsn(5),
        name: name.into(),
    })
}

#[test]
fn a_transaction_a_receiver_applied_here_is_not_carried_but_its_relations_are() {
    let ty = encode(&Message::Type {
        oid: 900,
        schema: "public".into(),
        name: "mood".into(),
    });
    let ddl_key = b"0123456789abcdef".to_vec();
    let mut stream = txn(
        0x100,
        1,
        vec![
            origin("pgcourier/7/postgres/pgcourier"),
            ty.clone(),
            relation(A),
            insert(A, "from the other site"),
            truncate(&[A]),
            signed(&ddl_key, br#"{"sql":"ALTER TABLE t ADD c int"}"#),
        ],
    );
    // Nothing of ours but the origin: dropped, its commit still counts.
    stream.extend(txn(
        0x200,
        2,
        vec![origin("pgcourier/x"), insert(A, "again")],
    ));
    // A local transaction after them: its changes need the Relation the
    // looped one carried; PostgreSQL's own subscription's origin is kept.
    let local = vec![origin("pg_16400"), insert(A, "local")];
    stream.extend(txn(0x300, 3, local.clone()));
    let mut cutter = Cutter::new(1, Lsn(0)).with_ddl_key(Some(ddl_key));
    let mut records = Vec::new();
    for m in &stream {
        records.extend(
            cutter
                .message(m, &mut synced(&[A]))
                .expect("well formed")
                .records,
        );
    }
    let summary = cutter.finish().expect("ends between transactions");
    assert_eq!(summary.looped, 2);
    assert_eq!(summary.dropped, 1, "the second has nothing to keep");
    assert_eq!(summary.transactions, 2);
    assert_eq!(summary.last_commit, Lsn(0x300));
    let first: Vec<Record> = records
        .iter()
        .filter(|r| r.commit_lsn == Lsn(0x100))
        .cloned()
        .collect();
    assert_eq!(reassemble(&first), vec![ty, relation(A)]);
    let last: Vec<Record> = records
        .iter()
        .filter(|r| r.commit_lsn == Lsn(0x300))
        .cloned()
        .collect();
    assert_eq!(reassemble(&last), local);
    // An origin of ours after a change is a stream out of order.
    let mut cutter = Cutter::new(1, Lsn(0));
    let mut tables = synced(&[A]);
    for m in [begin(0x400, 4), relation(A)] {
        cutter.message(&m, &mut tables).expect("well formed");
    }
    assert_eq!(
        cutter.message(&origin("pgcourier/y"), &mut tables),
        Err(CutError::OutOfOrder(
            "Origin message after a transaction's changes"
        ))
    );
}

#[test]
fn a_transaction_from_a_receivers_site_is_forwarded_to_the_others_only() {
    let sites: BTreeMap<String, String> = [
        ("f00d".to_string(), "branch-a".to_string()),
        ("cafe".to_string(), "branch-b".to_string()),
    ]
    .into();
    let mut cutter = Cutter::new(1, Lsn(0)).with_forwarding(sites);
    let mut tables = synced(&[A]);
    let mut records = Vec::new();
    let mut stream = txn(
        0x100,
        1,
        vec![origin("pgcourier/f00d"), relation(A), insert(A, "a")],
    );
    // From a site that is none of our receivers: not carried.
    stream.extend(txn(
        0x200,
        2,
        vec![origin("pgcourier/beef"), insert(A, "x")],
    ));
    stream.extend(txn(0x300, 3, vec![insert(A, "local")]));
    for m in &stream {
        records.extend(cutter.message(m, &mut tables).expect("well formed").records);
    }
    let summary = cutter.finish().expect("ends between transactions");
    assert_eq!(
        (summary.forwarded, summary.looped, summary.dropped),
        (1, 1, 1)
    );
    let forwarded: Vec<Record> = records
        .iter()
        .filter(|r| r.commit_lsn == Lsn(0x100))
        .cloned()
        .collect();
    assert_eq!(
        reassemble(&forwarded),
        vec![relation(A), insert(A, "a")],
        "without the Origin"
    );
    assert!(forwarded
        .iter()
        .all(|r| r.only_for.as_deref() == Some("!branch-a")));
    let local: Vec<Record> = records
        .iter()
        .filter(|r| r.commit_lsn == Lsn(0x300))
        .cloned()
        .collect();
    assert!(local.iter().all(|r| r.only_for.is_none()));
    assert!(crate::record::addressed_to(Some("!branch-a"), "branch-b"));
    assert!(!crate::record::addressed_to(Some("!branch-a"), "branch-a"));
    assert!(crate::record::addressed_to(Some("branch-a"), "branch-a"));
    assert!(!crate::record::addressed_to(Some("branch-a"), "branch-b"));
    // A branch: its one receiver is the site the change came from, so
    // there is nobody to forward to.
    let one: BTreeMap<String, String> = [("f00d".to_string(), "hq".to_string())].into();
    let mut cutter = Cutter::new(1, Lsn(0)).with_forwarding(one);
    for m in txn(0x100, 1, vec![origin("pgcourier/f00d"), insert(A, "a")]) {
        assert!(cutter
            .message(&m, &mut tables)
            .expect("well formed")
            .records
            .is_empty());
    }
    let summary = cutter.finish().expect("ends between transactions");
    assert_eq!((summary.forwarded, summary.looped), (0, 1));
}

#[test]
fn a_spliced_transaction_commits_between_its_neighbours_only_where_the_wal_leaves_room() {
    let chunk = b"M-chunk".to_vec();
    // After a transaction committing at 0x100 and ending at 0x108: room
    // for 0x101 .. 0x106 (one LSN is kept free below the end).
    let mut cutter = Cutter::new(1, Lsn::ZERO).with_room_end(Lsn(0x80));
    let mut tables = synced(&[A]);
    assert!(
        cutter.splice(&chunk, 5, None).is_some(),
        "0x1 .. 0x7e is free"
    );
    let mut cutter = Cutter::new(1, Lsn(0x80)).with_room_end(Lsn(0x80));
    assert!(
        cutter.splice(&chunk, 5, None).is_none(),
        "no LSN free above the spool's last commit"
    );
    let mut records = Vec::new();
    for m in txn(0x100, 1, vec![insert(A, "x")]) {
        records.extend(cutter.message(&m, &mut tables).unwrap().records);
    }
    let mut spliced = Vec::new();
    while let Some(r) = cutter.splice(&chunk, 5, None) {
        spliced.extend(r);
    }
    let lsns: Vec<u64> = spliced.iter().map(|r| r.commit_lsn.0).collect();
    assert_eq!(lsns, (0x101..=0x106).collect::<Vec<_>>());
    assert!(spliced.iter().all(|r| r.last && r.part == 0 && r.xid == 0));
    assert_eq!(spliced[0].seq, 2, "dense after the stream's record");
    // Inside a transaction: never.
    cutter.message(&begin(0x200, 2), &mut tables).unwrap();
    assert!(cutter.splice(&chunk, 5, None).is_none());
    for m in [insert(A, "y"), commit(0x200, 0x208)] {
        records.extend(cutter.message(&m, &mut tables).unwrap().records);
    }
    assert_eq!(
        records.last().unwrap().seq,
        8,
        "the stream goes on after them"
    );
    // A keepalive past the last commit makes room up to it.
    cutter.saw_server_end(Lsn(0x300));
    let r = cutter.splice(&chunk, 5, Some("new".into())).unwrap();
    assert_eq!((r[0].commit_lsn, r[0].seq), (Lsn(0x201), 9));
    assert_eq!(r[0].only_for.as_deref(), Some("new"));
    let summary = cutter.finish().unwrap();
    assert_eq!(summary.last_commit, Lsn(0x201));
    assert_eq!(summary.last_end, Lsn(0x300));
    assert_eq!(summary.transactions, 2 + 7);
    // Never with a cut pending: the stream stops before it for the copy.
    let mut cutter = Cutter::new(1, Lsn(0x100))
        .with_room_end(Lsn(0x400))
        .before_cut(Some(Lsn(0x400)));
    cutter.saw_server_end(Lsn(0x500));
    assert!(cutter.splice(&chunk, 5, None).is_none());
}
