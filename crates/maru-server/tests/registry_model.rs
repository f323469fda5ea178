//! The sharded registry behaves exactly like a plain map model under any sequence of
//! operations (property test).

use std::collections::HashMap;

use maru_server::registry::{Entry, KeyRegistry, RegionSlot, Removal, ShardedRegistry, PAGE_ALIGN};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Insert(Vec<u8>, u32, u64, u64),
    Lookup(Vec<u8>),
    Remove(Vec<u8>, u32),
    Pin(Vec<u8>),
    Unpin(Vec<u8>),
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    // A small key space, so operations keep meeting the same keys.
    prop_oneof![
        (0u8..12).prop_map(|b| vec![b]),
        proptest::collection::vec(any::<u8>(), 0..40),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (key(), 0u32..4, 0u64..64, 1u64..100_000).prop_map(|(k, r, p, l)| Op::Insert(k, r, p, l)),
        2 => key().prop_map(Op::Lookup),
        2 => (key(), 0u32..4).prop_map(|(k, r)| Op::Remove(k, r)),
        1 => key().prop_map(Op::Pin),
        1 => key().prop_map(Op::Unpin),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn registry_matches_a_model(ops in proptest::collection::vec(op(), 1..200)) {
        let reg = ShardedRegistry::new();
        // key -> (region, offset, len, pins)
        let mut model: HashMap<Vec<u8>, (u32, u64, u64, u32)> = HashMap::new();
        for op in ops {
            match op {
                Op::Insert(k, r, page, len) => {
                    let e = Entry::new(RegionSlot(r), page * PAGE_ALIGN, len).unwrap();
                    let new = !model.contains_key(&k);
                    if new {
                        model.insert(k.clone(), (r, page * PAGE_ALIGN, len, 0));
                    }
                    prop_assert_eq!(reg.insert_if_absent(&k, e), new);
                }
                Op::Lookup(k) => {
                    let got = reg.lookup(&k).map(|e| (e.region.0, e.offset(), e.len(), e.pins));
                    prop_assert_eq!(got, model.get(&k).copied());
                    prop_assert_eq!(reg.exists(&k), model.contains_key(&k));
                }
                Op::Remove(k, r) => {
                    let expected = match model.get(&k).copied() {
                        None => "not found",
                        Some((mr, ..)) if mr != r => "elsewhere",
                        Some((.., pins)) if pins > 0 => "pinned",
                        Some(_) => "removed",
                    };
                    let got = match reg.remove_if_unpinned(&k, RegionSlot(r)) {
                        Removal::NotFound => "not found",
                        Removal::Elsewhere(_) => "elsewhere",
                        Removal::Pinned => "pinned",
                        Removal::Removed(_) => "removed",
                    };
                    prop_assert_eq!(got, expected);
                    if expected == "removed" {
                        model.remove(&k);
                    }
                }
                Op::Pin(k) => {
                    let found = match model.get_mut(&k) {
                        Some(v) => { v.3 += 1; true }
                        None => false,
                    };
                    prop_assert_eq!(reg.pin(&k), found);
                }
                Op::Unpin(k) => {
                    let was = match model.get_mut(&k) {
                        Some(v) if v.3 > 0 => { v.3 -= 1; true }
                        _ => false,
                    };
                    prop_assert_eq!(reg.unpin(&k), was);
                }
            }
            let c = reg.counts();
            prop_assert_eq!(c.keys, model.len() as u64);
            prop_assert_eq!(c.bytes, model.values().map(|v| v.2).sum::<u64>());
            prop_assert_eq!(c.pinned_keys, model.values().filter(|v| v.3 > 0).count() as u64);
        }
        for r in 0..4 {
            let expected = model.values().filter(|v| v.0 == r).count() as u64;
            prop_assert_eq!(reg.count_in_region(RegionSlot(r)), expected);
        }
        let mut seen = 0;
        reg.for_each(&mut |k, e| {
            seen += 1;
            assert_eq!(model.get(k).map(|v| (v.0, v.1, v.2, v.3)), Some((e.region.0, e.offset(), e.len(), e.pins)));
        });
        prop_assert_eq!(seen, model.len());
    }
}
