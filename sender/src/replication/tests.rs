use bytes::{BufMut, BytesMut};

use super::wire::{decode, split_frame, Backend};
use super::ReplicationError;

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

#[test]
fn frames_are_split_only_when_whole_and_in_order() {
    let mut wire = message(b'd', b"wxyz");
    wire.extend(message(b'Z', b"I"));
    let mut buf = BytesMut::new();
    // Byte by byte: nothing until a message is whole.
    let mut got = Vec::new();
    for &b in &wire {
        buf.put_u8(b);
        while let Some(f) = split_frame(&mut buf, 1 << 20).unwrap() {
            got.push((f.tag, f.body.to_vec()));
        }
    }
    assert_eq!(got, vec![(b'd', b"wxyz".to_vec()), (b'Z', b"I".to_vec())]);
    assert!(buf.is_empty());
}

#[test]
fn a_length_out_of_bounds_is_a_protocol_error_not_an_allocation() {
    for len in [0u32, 3, (1 << 20) + 5] {
        let mut buf = BytesMut::new();
        buf.put_u8(b'd');
        buf.put_u32(len);
        assert!(matches!(
            split_frame(&mut buf, 1 << 20),
            Err(ReplicationError::Protocol(_))
        ));
    }
}

#[test]
fn an_error_response_keeps_severity_code_and_message_but_never_detail() {
    let mut body = Vec::new();
    for (f, v) in [
        (b'S', "FEHLER"),
        (b'V', "ERROR"),
        (b'C', "22P02"),
        (b'M', "invalid input syntax for type integer: \"secret-42\""),
        (b'D', "Key (email)=(someone@example.com) already exists"),
    ] {
        body.push(f);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut buf = BytesMut::from(&message(b'E', &body)[..]);
    let frame = split_frame(&mut buf, 1 << 20).unwrap().unwrap();
    let Backend::Error(e) = decode(frame).unwrap() else {
        panic!("not an error")
    };
    assert_eq!((e.severity.as_str(), e.code.as_str()), ("ERROR", "22P02"));
    let text = e.to_string();
    assert!(!text.contains("secret-42"), "{text}");
    assert!(!text.contains("someone@example.com"), "{text}");
    assert!(text.contains("22P02"), "{text}");
}

#[test]
fn truncated_bodies_are_errors_never_panics() {
    let cases: [(u8, &[u8]); 6] = [
        (b'R', b""),
        (b'R', &[0, 0, 0, 5, 1]),
        (b'R', &[0, 0, 0, 10, b'S']),
        (b'D', &[0]),
        (b'D', &[0, 1, 0, 0, 0, 9, b'x']),
        (b'E', &[b'C', b'2']),
    ];
    for (tag, body) in cases {
        let mut buf = BytesMut::from(&message(tag, body)[..]);
        let frame = split_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert!(
            matches!(decode(frame), Err(ReplicationError::Protocol(_))),
            "{:?} {body:?}",
            tag as char
        );
    }
}

#[test]
fn data_rows_carry_nulls_and_text() {
    let mut body = vec![0, 2];
    body.extend_from_slice(&(-1i32).to_be_bytes());
    body.extend_from_slice(&3i32.to_be_bytes());
    body.extend_from_slice(b"0/1");
    let mut buf = BytesMut::from(&message(b'D', &body)[..]);
    let Backend::DataRow(row) = decode(split_frame(&mut buf, 1 << 20).unwrap().unwrap()).unwrap()
    else {
        panic!("not a row")
    };
    assert_eq!(row, vec![None, Some("0/1".to_owned())]);
}
