//! Model checks of the entry protocol with loom: every interleaving (up to a preemption bound)
//! of one writer changing entries and one reader looking them up. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p maru-index --release --test loom`.
//!
//! In each model the writer runs on the model's own thread and the reader is spawned: loom
//! explores schedules by moving a load before a conflicting store that preceded it, so the
//! first schedule must have the writer's stores before the reader's loads.

#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use maru_index::model::MemTable;
use maru_index::{Found, Location};

fn at(region: u32) -> Location {
    Location {
        region,
        offset: region as u64 * 4096,
        len: 100 + region,
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

fn seen(f: Option<Found>) -> Option<(Location, u64)> {
    f.map(|f| (f.location, f.generation))
}

/// An update is seen whole or not at all: never the new location with the old generation.
#[test]
fn an_update_is_never_seen_half_done() {
    model(|| {
        let t = Arc::new(MemTable::new(1, 16));
        let key = b"key-longer-than-sixteen-bytes";
        t.insert(0, key, at(1), 1);
        let r = {
            let t = t.clone();
            thread::spawn(move || seen(t.lookup(0, key)))
        };
        t.update(0, key, at(2), 2).unwrap();
        let got = r.join().unwrap();
        assert!(
            got == Some((at(1), 1)) || got == Some((at(2), 2)),
            "{got:?}"
        );
        assert_eq!(seen(t.lookup(0, key)), Some((at(2), 2)));
    });
}

/// A removed key's slot and key bytes reused at once for another key of the same length: a
/// reader never answers one key with the other's location (the ABA a lookup without a version
/// recheck falls into).
#[test]
fn a_reused_slot_never_answers_for_the_old_key() {
    model(|| {
        let t = Arc::new(MemTable::new(1, 8));
        let (old, new) = (b"aaaaaaaaaaaaaaaaaaaa-1", b"aaaaaaaaaaaaaaaaaaaa-2");
        t.insert_at_slot(0, 0, old, at(1), 1, 0);
        let r = {
            let t = t.clone();
            thread::spawn(move || (seen(t.lookup(0, old)), seen(t.lookup(0, new))))
        };
        t.remove(0, old).unwrap();
        t.insert_at_slot(0, 0, new, at(2), 2, 0);
        let (got_old, got_new) = r.join().unwrap();
        assert!(
            got_old.is_none() || got_old == Some((at(1), 1)),
            "{got_old:?}"
        );
        assert!(
            got_new.is_none() || got_new == Some((at(2), 2)),
            "{got_new:?}"
        );
        assert_eq!(seen(t.lookup(0, old)), None);
        assert_eq!(seen(t.lookup(0, new)), Some((at(2), 2)));
    });
}

/// Two short keys whose home is bucket 0, one of which sits in bucket 1. While the writer
/// inserts a third key and removes it again (moving bucket 0's overflow count up and down),
/// the overflowed key is always found and the new key is seen only whole.
#[test]
fn a_key_that_overflowed_is_never_missed() {
    let keys: Vec<Vec<u8>> = (0u32..)
        .map(|i| format!("k{i}").into_bytes())
        .filter(|k| MemTable::home_bucket(2, 0, k) == 0)
        .take(2)
        .collect();
    model(move || {
        let t = Arc::new(MemTable::new(2, 4));
        let (stays, churns) = (keys[0].clone(), keys[1].clone());
        t.insert_at_slot(15, 0, &stays, at(1), 1, 0); // bucket 1, home bucket 0
        let r = {
            let t = t.clone();
            let (stays, churns) = (stays.clone(), churns.clone());
            thread::spawn(move || (seen(t.lookup(0, &stays)), seen(t.lookup(0, &churns))))
        };
        t.insert_at_slot(16, 0, &churns, at(2), 2, 0); // also overflowed
        t.remove(0, &churns).unwrap();
        let (got_stays, got) = r.join().unwrap();
        assert_eq!(got_stays, Some((at(1), 1)));
        assert!(got.is_none() || got == Some((at(2), 2)), "{got:?}");
        assert_eq!(seen(t.lookup(0, &stays)), Some((at(1), 1)));
        assert_eq!(seen(t.lookup(0, &churns)), None);
    });
}
