//! The WAL and checkpoint decoders are pure functions of bytes: on any input they return a
//! value or a typed error, never panic, and never accept a damaged checkpoint. (Fuzz targets
//! can drive the same functions with coverage guidance.)

use maru_resource_manager::{
    decode_checkpoint, decode_wal, encode_checkpoint, encode_record, Allocation, Checkpoint, Owner,
    WalOp,
};
use proptest::prelude::*;

fn allocation() -> impl Strategy<Value = Allocation> {
    (
        any::<u64>(),
        "[a-z/]{0,20}",
        any::<u64>(),
        any::<u64>(),
        "[a-z.-]{0,12}",
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(
            |(region_id, pool, offset, len, host, pid, start_time)| Allocation {
                region_id,
                pool,
                offset,
                len,
                owner: Owner {
                    host,
                    pid,
                    start_time,
                },
            },
        )
}

fn op() -> impl Strategy<Value = WalOp> {
    prop_oneof![
        allocation().prop_map(WalOp::Alloc),
        any::<u64>().prop_map(|region_id| WalOp::Free { region_id }),
        any::<u64>().prop_map(|region_id| WalOp::Reclaim { region_id }),
        (allocation(), any::<[u8; 16]>()).prop_map(|(a, server_id)| WalOp::Bind {
            owner: a.owner,
            server_id
        }),
        (allocation(), allocation()).prop_map(|(a, b)| WalOp::Adopt {
            from: a.owner,
            to: b.owner
        }),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(scan) = decode_wal(&bytes) {
            prop_assert!(scan.valid_len <= bytes.len());
        }
        let _ = decode_checkpoint(&bytes);
    }

    #[test]
    fn a_log_decodes_to_its_records_and_any_cut_to_a_prefix(ops in proptest::collection::vec(op(), 0..12), first in 0u64..1_000_000, cut in any::<prop::sample::Index>()) {
        let mut bytes = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            bytes.extend(encode_record(first + i as u64, op).unwrap());
        }
        let scan = decode_wal(&bytes).unwrap();
        prop_assert_eq!(scan.records.iter().map(|r| r.op.clone()).collect::<Vec<_>>(), ops.clone());
        let cut = if bytes.is_empty() { 0 } else { cut.index(bytes.len()) };
        let part = decode_wal(&bytes[..cut]).unwrap();
        prop_assert!(part.records.len() <= ops.len());
        prop_assert_eq!(&part.records[..], &scan.records[..part.records.len()]);
    }

    #[test]
    fn checkpoints_round_trip_and_mutations_are_refused(allocations in proptest::collection::vec(allocation(), 0..8), seq in any::<u64>(), next in any::<u64>(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let bindings = allocations.iter().map(|a| (a.owner.clone(), [a.len as u8; 16])).collect();
        let c = Checkpoint { seq, next_region_id: next, allocations, bindings };
        let bytes = encode_checkpoint(&c).unwrap();
        prop_assert_eq!(decode_checkpoint(&bytes).unwrap(), c);
        let mut bad = bytes.clone();
        let i = at.index(bad.len());
        bad[i] ^= 1 << bit;
        prop_assert!(decode_checkpoint(&bad).is_err());
    }
}
