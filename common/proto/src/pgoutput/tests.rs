//! Decoder tests: every message kind from bytes PostgreSQL 15 produces,
//! and every malformed case returns an error.

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
    for (cascade, restart_identity) in [(false, false), (true, false), (false, true), (true, true)]
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
