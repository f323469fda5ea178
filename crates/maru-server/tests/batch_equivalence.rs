//! Every batch operation gives the same results as the per-key operation applied to the same
//! keys in order (property test against a live server).
//!
//! Two "worlds" live side by side on one server: keys prefixed `b/` only ever see batch
//! requests, keys prefixed `s/` only per-key requests, each world registering into a region
//! of its own. The same generated operation runs in both worlds and the results must match
//! (lookups compare "in this world's region, at offset, len").

mod common;

use std::cell::{Cell, RefCell};

use common::*;
use maru_proto::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[derive(Debug, Clone)]
enum Op {
    Register(Vec<(u8, u64, u64)>),
    Lookup(Vec<u8>),
    Exists(Vec<u8>),
    Delete(Vec<u8>),
    Pin(Vec<u8>),
    Unpin(Vec<u8>),
}

fn keys() -> impl Strategy<Value = Vec<u8>> {
    // Few distinct keys and repeats within a batch, so batches meet their own earlier items.
    proptest::collection::vec(0u8..6, 0..10)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => proptest::collection::vec((0u8..6, 0u64..16, 1u64..8192), 0..8).prop_map(Op::Register),
        2 => keys().prop_map(Op::Lookup),
        1 => keys().prop_map(Op::Exists),
        2 => keys().prop_map(Op::Delete),
        1 => keys().prop_map(Op::Pin),
        1 => keys().prop_map(Op::Unpin),
    ]
}

/// A result in a form both worlds share.
#[derive(Debug, PartialEq)]
enum Out {
    Bools(Vec<bool>),
    Found(Vec<Option<(bool, u64, u64)>>),
    Deleted(Vec<DeleteStatus>),
}

struct World<'a> {
    client: &'a RefCell<Client>,
    prefix: String,
    region: u64,
}

impl World<'_> {
    fn key(&self, k: u8) -> Vec<u8> {
        format!("{}{k}", self.prefix).into_bytes()
    }

    fn batch(&self, op: &Op) -> Out {
        let mut c = self.client.borrow_mut();
        let owned: Vec<Vec<u8>> = match op {
            Op::Register(e) => e.iter().map(|(k, ..)| self.key(*k)).collect(),
            Op::Lookup(k) | Op::Exists(k) | Op::Delete(k) | Op::Pin(k) | Op::Unpin(k) => {
                k.iter().map(|k| self.key(*k)).collect()
            }
        };
        let keys: Vec<&[u8]> = owned.iter().map(|k| k.as_slice()).collect();
        let req = match op {
            Op::Register(e) => Request::BatchRegister(
                e.iter()
                    .zip(&keys)
                    .map(|((_, page, len), key)| RegisterEntry {
                        key,
                        region_id: self.region,
                        offset: page * 4096,
                        len: *len,
                    })
                    .collect(),
            ),
            Op::Lookup(_) => Request::BatchLookup { keys },
            Op::Exists(_) => Request::BatchExists { keys },
            Op::Delete(_) => Request::BatchDelete { keys },
            Op::Pin(_) => Request::BatchPin { keys },
            Op::Unpin(_) => Request::BatchUnpin { keys },
        };
        match c.call(&req).unwrap() {
            Response::Bools(v) => Out::Bools(v),
            Response::BatchDelete(v) => Out::Deleted(v),
            Response::BatchLookup { regions, entries } => {
                let mut ids: Vec<u64> = regions.iter().map(|r| r.handle.region_id).collect();
                ids.sort();
                ids.dedup();
                assert_eq!(ids.len(), regions.len(), "region table not deduplicated");
                Out::Found(
                    entries
                        .iter()
                        .map(|e| {
                            e.map(|s| {
                                let r = &regions[s.region_index as usize];
                                (r.handle.region_id == self.region, s.offset, s.len)
                            })
                        })
                        .collect(),
                )
            }
            other => panic!("{other:?}"),
        }
    }

    fn per_key(&self, op: &Op) -> Out {
        let mut c = self.client.borrow_mut();
        match op {
            Op::Register(e) => Out::Bools(
                e.iter()
                    .map(|(k, page, len)| c.register(&self.key(*k), self.region, page * 4096, *len))
                    .collect(),
            ),
            Op::Lookup(k) => Out::Found(
                k.iter()
                    .map(|k| {
                        c.lookup(&self.key(*k))
                            .map(|l| (l.region.handle.region_id == self.region, l.offset, l.len))
                    })
                    .collect(),
            ),
            Op::Exists(k) => Out::Bools(
                k.iter()
                    .map(|k| c.bool(&Request::Exists { key: &self.key(*k) }))
                    .collect(),
            ),
            Op::Delete(k) => Out::Deleted(k.iter().map(|k| c.delete(&self.key(*k))).collect()),
            Op::Pin(k) => Out::Bools(
                k.iter()
                    .map(|k| c.bool(&Request::Pin { key: &self.key(*k) }))
                    .collect(),
            ),
            Op::Unpin(k) => Out::Bools(
                k.iter()
                    .map(|k| c.bool(&Request::Unpin { key: &self.key(*k) }))
                    .collect(),
            ),
        }
    }
}

#[test]
fn every_batch_op_equals_the_per_key_ops_in_order() {
    let c = InProcessCluster::start();
    let client = RefCell::new(c.client("p"));
    let batch_region = client.borrow_mut().region(2 * MIB).handle.region_id;
    let single_region = client.borrow_mut().region(2 * MIB).handle.region_id;
    let case = Cell::new(0u32);
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&proptest::collection::vec(op(), 1..12), |ops| {
            // A fresh key space per case, so cases do not see each other's keys.
            let n = case.get();
            case.set(n + 1);
            let batch = World {
                client: &client,
                prefix: format!("c{n}/b/"),
                region: batch_region,
            };
            let single = World {
                client: &client,
                prefix: format!("c{n}/s/"),
                region: single_region,
            };
            for op in &ops {
                let (b, s) = (batch.batch(op), single.per_key(op));
                prop_assert_eq!(b, s, "{:?}", op);
            }
            Ok(())
        })
        .unwrap();
    // Both worlds ended with the same number of keys and pins.
    let s = c.stats();
    assert_eq!(s.keys % 2, 0, "{} keys", s.keys);
    assert_eq!(s.pinned_keys % 2, 0, "{} pinned", s.pinned_keys);
}

#[test]
fn batch_register_checks_every_entry_before_applying_any() {
    let c = InProcessCluster::start();
    let mut a = c.client("a");
    let r = a.region(2 * MIB).handle.region_id;
    let e = |key: &'static [u8], offset, len| RegisterEntry {
        key,
        region_id: r,
        offset,
        len,
    };
    for bad in [e(b"z", 3, 1), e(b"z", 0, 0), e(b"z", 2 * MIB, 1)] {
        let req = Request::BatchRegister(vec![e(b"x", 0, 1), e(b"y", 4096, 1), bad]);
        assert_eq!(a.fails(&req), ErrorCode::OutOfBounds);
    }
    assert_eq!(c.stats().keys, 0, "nothing applied");
    let ok = Request::BatchRegister(vec![e(b"x", 0, 1), e(b"x", 4096, 1), e(b"y", 0, 1)]);
    assert_eq!(
        a.call(&ok).unwrap(),
        Response::Bools(vec![true, false, true])
    );
    assert_eq!(a.allocations()[0].ref_count, 2);
}
