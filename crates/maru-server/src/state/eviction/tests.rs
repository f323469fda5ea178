//! Every policy against an exact-LRU model: unit cases for batch order, the predicate and the
//! budget, and property tests over random operation sequences.

use std::collections::{BTreeMap, HashMap, HashSet};

use proptest::prelude::*;

use super::*;

/// Exact LRU kept the obvious way: a tick per use, victims by smallest tick.
#[derive(Default)]
struct Model {
    tick: u64,
    by_tick: BTreeMap<u64, Vec<u8>>,
    ticks: HashMap<Vec<u8>, u64>,
}

impl Model {
    fn insert(&mut self, key: &[u8]) {
        if !self.ticks.contains_key(key) {
            self.touch_or(key, true);
        }
    }
    fn touch(&mut self, key: &[u8]) {
        self.touch_or(key, false);
    }
    fn touch_or(&mut self, key: &[u8], insert: bool) {
        if let Some(t) = self.ticks.get(key) {
            self.by_tick.remove(t);
        } else if !insert {
            return;
        }
        self.tick += 1;
        self.ticks.insert(key.to_vec(), self.tick);
        self.by_tick.insert(self.tick, key.to_vec());
    }
    fn remove(&mut self, key: &[u8]) -> bool {
        match self.ticks.remove(key) {
            Some(t) => {
                self.by_tick.remove(&t);
                true
            }
            None => false,
        }
    }
    /// The `n` least recent keys `evictable` accepts; keys refused on the way are in use and
    /// become the most recent, in the order they were examined.
    fn victims(&mut self, n: usize, evictable: &dyn Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut refused = Vec::new();
        for k in self.by_tick.values() {
            if out.len() == n {
                break;
            }
            if evictable(k) {
                out.push(k.clone());
            } else {
                refused.push(k.clone());
            }
        }
        for k in &out {
            self.remove(k);
        }
        for k in &refused {
            self.touch(k);
        }
        out
    }
}

fn all() -> Vec<Box<dyn EvictionPolicy>> {
    POLICY_NAMES.iter().map(|n| policy(n).unwrap()).collect()
}

fn pick(p: &mut dyn EvictionPolicy, n: usize) -> Vec<Vec<u8>> {
    p.pick_victims(n, usize::MAX, &mut |_| true)
        .into_iter()
        .map(|k| k.to_vec())
        .collect()
}

#[test]
fn later_chunks_of_a_batch_go_first_among_equals() {
    for mut p in all() {
        p.insert(b"old");
        p.insert_batch(&[b"c0", b"c1", b"c2"]);
        assert_eq!(
            pick(&mut *p, 4),
            [&b"old"[..], b"c2", b"c1", b"c0"],
            "{}",
            p.name()
        );
        assert!(p.is_empty());
    }
}

#[test]
fn a_recent_use_protects_a_key_from_the_next_victim() {
    for mut p in all() {
        p.insert_batch(&[b"a", b"b", b"c"]);
        p.touch(b"c");
        p.touch(b"unknown");
        assert_eq!(pick(&mut *p, 1), [b"b"], "{}", p.name());
        assert_eq!(p.len(), 2);
    }
}

#[test]
fn refused_keys_stay_and_the_budget_bounds_the_scan() {
    for mut p in all() {
        for i in 0..100u32 {
            p.insert(&i.to_le_bytes());
        }
        let mut asked = 0;
        let none = p.pick_victims(5, 30, &mut |_| {
            asked += 1;
            false
        });
        assert!(none.is_empty(), "{}", p.name());
        assert!(asked <= 30, "{}: {asked} keys examined", p.name());
        assert_eq!(p.len(), 100);
        let even = p.pick_victims(10, 1000, &mut |k| k[0] % 2 == 0);
        assert_eq!(even.len(), 10, "{}", p.name());
        assert!(even.iter().all(|k| k[0] % 2 == 0));
        assert!(p.remove(&1u32.to_le_bytes()));
        assert!(!p.remove(&1u32.to_le_bytes()));
        assert_eq!(p.len(), 89);
    }
}

#[test]
fn unknown_names_are_refused_with_the_known_ones() {
    let e = policy("arc").err().unwrap();
    assert_eq!(
        e.to_string(),
        "unknown eviction policy \"arc\" (known: sieve, clock, lru)"
    );
    assert_eq!(policy(DEFAULT_POLICY).unwrap().name(), DEFAULT_POLICY);
}

#[derive(Debug, Clone)]
enum Op {
    Insert(u8),
    Batch(Vec<u8>),
    Touch(u8),
    Remove(u8),
    /// Pick this many victims; keys whose number is a multiple of the divisor are pinned.
    Evict(u8, u8),
}

fn op(touches: bool) -> impl Strategy<Value = Op> {
    let key = 0u8..40;
    let touch = if touches { 3 } else { 0 };
    prop_oneof![
        4 => key.clone().prop_map(Op::Insert),
        2 => proptest::collection::vec(key.clone(), 1..6).prop_map(Op::Batch),
        touch => key.clone().prop_map(Op::Touch),
        1 => key.prop_map(Op::Remove),
        2 => (1u8..5, 2u8..6).prop_map(|(n, d)| Op::Evict(n, d)),
    ]
}

fn k(b: u8) -> [u8; 1] {
    [b]
}

/// Runs `ops` on `p` and on the model; checks what holds for every policy (membership, the
/// predicate, completeness within a full budget) and, when `same_victims`, that the victims
/// are exactly the model's. `pins`: one divisor for every eviction instead of each one's own
/// (a key refused once moves behind the hand of CLOCK and SIEVE, so their order matches
/// exact LRU only while the same keys stay pinned).
fn run(
    p: &mut dyn EvictionPolicy,
    ops: &[Op],
    same_victims: bool,
    pins: Option<u8>,
) -> Result<(), TestCaseError> {
    let mut model = Model::default();
    let mut held: HashSet<u8> = HashSet::new();
    for o in ops {
        match o {
            Op::Insert(key) => {
                p.insert(&k(*key));
                model.insert(&k(*key));
                held.insert(*key);
            }
            Op::Batch(keys) => {
                let mut unique: Vec<u8> = Vec::new();
                for key in keys {
                    if !unique.contains(key) {
                        unique.push(*key);
                    }
                }
                let bytes: Vec<[u8; 1]> = unique.iter().map(|b| k(*b)).collect();
                let refs: Vec<&[u8]> = bytes.iter().map(|b| &b[..]).collect();
                p.insert_batch(&refs);
                for b in refs.iter().rev() {
                    model.insert(b);
                }
                held.extend(unique);
            }
            Op::Touch(key) => {
                p.touch(&k(*key));
                model.touch(&k(*key));
            }
            Op::Remove(key) => {
                prop_assert_eq!(p.remove(&k(*key)), held.remove(key));
                model.remove(&k(*key));
            }
            Op::Evict(n, d) => {
                let d = pins.unwrap_or(*d);
                let evictable = |key: &[u8]| !key[0].is_multiple_of(d);
                let budget = 2 * held.len() + *n as usize;
                let got: Vec<u8> = p
                    .pick_victims(*n as usize, budget, &mut |key| evictable(key))
                    .iter()
                    .map(|key| key[0])
                    .collect();
                let candidates = held.iter().filter(|b| evictable(&k(**b))).count();
                prop_assert_eq!(
                    got.len(),
                    candidates.min(*n as usize),
                    "{} victims",
                    p.name()
                );
                for v in &got {
                    prop_assert!(evictable(&k(*v)), "{} took a pinned key", p.name());
                    prop_assert!(held.remove(v), "{} took a key it did not hold", p.name());
                }
                if same_victims {
                    let want: Vec<u8> = model
                        .victims(*n as usize, &evictable)
                        .iter()
                        .map(|key| key[0])
                        .collect();
                    prop_assert_eq!(&got, &want, "{} against exact LRU", p.name());
                } else {
                    for v in &got {
                        model.remove(&k(*v));
                    }
                }
            }
        }
        prop_assert_eq!(p.len(), held.len(), "{} holds the wrong keys", p.name());
    }
    Ok(())
}

proptest! {
    #[test]
    fn lru_is_exactly_the_model(ops in proptest::collection::vec(op(true), 1..200)) {
        run(&mut Lru::default(), &ops, true, None)?;
    }

    /// With no uses, recency is registration order: both approximations are then exact.
    #[test]
    fn approximations_are_exact_without_uses(ops in proptest::collection::vec(op(false), 1..200)) {
        run(&mut Clock::default(), &ops, true, Some(3))?;
        run(&mut Sieve::default(), &ops, true, Some(3))?;
    }

    #[test]
    fn approximations_hold_the_right_keys_and_respect_the_predicate(
        ops in proptest::collection::vec(op(true), 1..200)
    ) {
        run(&mut Clock::default(), &ops, false, None)?;
        run(&mut Sieve::default(), &ops, false, None)?;
    }
}
