//! Property tests (proptest) of everything that decodes bytes from the
//! network or the disk: whatever the bytes and whatever a length field
//! claims, decoding returns a value or an error, never panics, and never
//! produces more than the limits allow.

use pgcourier_proto::frame::{
    self as wire, decode_batch, decode_frame, Frame, MAX_BATCH_RAW_BYTES,
};
use pgcourier_proto::record::{Piece, Record, MAX_RECORD_BYTES};
use pgcourier_proto::{pgoutput, Lsn};
use proptest::prelude::*;

fn record(seq: u64, body: Vec<u8>) -> Vec<u8> {
    Record {
        seq,
        only_for: None,
        commit_lsn: Lsn(seq * 100),
        commit_time: 0,
        xid: 1,
        part: 0,
        last: true,
        end_lsn: Lsn(seq * 100 + 50),
        pieces: vec![Piece::Message(body)],
    }
    .encode()
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn frames_from_any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode_frame(&bytes);
    }

    #[test]
    fn batches_with_any_header_and_payload_stay_within_their_limits(
        first in any::<u64>(),
        span in 0u64..64,
        raw_len in any::<u32>(),
        payload in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        if let Ok(records) = decode_batch(first, first.saturating_add(span), raw_len, &payload) {
            let total: usize = records.iter().map(Vec::len).sum();
            prop_assert!(total <= raw_len as usize && total <= MAX_BATCH_RAW_BYTES);
            prop_assert!(records.iter().all(|r| r.len() <= MAX_RECORD_BYTES));
        }
    }

    #[test]
    fn real_batches_survive_any_single_byte_change_without_panic(
        bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..512), 1..8),
        at in any::<usize>(),
        value in any::<u8>(),
    ) {
        let records: Vec<Vec<u8>> = bodies
            .into_iter()
            .enumerate()
            .map(|(i, b)| record(i as u64 + 1, b))
            .collect();
        let n = records.len() as u64;
        let Frame::Batch { raw_len, mut payload, .. } = wire::encode_batch(&records, 1, 3).unwrap() else {
            unreachable!("encode_batch returns a batch")
        };
        // Unchanged, it decodes to exactly what was sent.
        prop_assert_eq!(&decode_batch(1, n, raw_len, &payload).unwrap(), &records);
        let i = at % payload.len();
        payload[i] = value;
        if let Ok(got) = decode_batch(1, n, raw_len, &payload) {
            // Whatever gets through zstd's checks still passed every record's CRC.
            for r in &got {
                prop_assert!(Record::decode(r).is_ok());
            }
        }
    }

    #[test]
    fn pgoutput_messages_from_any_bytes_decode_or_fail_cleanly(
        kind in proptest::sample::select(b"BCORYIUDTMX".to_vec()),
        rest in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut bytes = vec![kind];
        bytes.extend(rest);
        let _ = pgoutput::decode(&bytes);
    }

    #[test]
    fn records_from_any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = Record::decode(&bytes);
    }
}
