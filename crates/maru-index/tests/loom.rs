//! Model checks of the entry protocol with loom: every interleaving (up to a preemption bound)
//! of one writer changing entries and one reader looking them up; and of the hold lanes: a
//! client holding a page against the server removing its key and looking for holds. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p maru-index --release --test loom`.
//!
//! In each model the writer runs on the model's own thread and the reader is spawned: loom
//! explores schedules by moving a load before a conflicting store that preceded it, so the
//! first schedule must have the writer's stores before the reader's loads.

#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use maru_index::model::{MemLanes, MemTable};
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

/// A client looks a key up and holds its page (claim, fence, recheck) while the server removes
/// the key and scans for holds: never does the client keep the hold while the server finds none
/// and returns the page.
#[test]
fn a_held_page_is_never_returned() {
    model(|| {
        let t = Arc::new(MemTable::new(1, 4));
        let lanes = Arc::new(MemLanes::new(1, 2));
        let tag = lanes.assign(0);
        let key = b"short";
        let page = at(1);
        t.insert(0, key, page, 1);
        let client = {
            let (t, lanes) = (t.clone(), lanes.clone());
            thread::spawn(move || {
                let Some(f) = t.lookup(0, key) else {
                    return false;
                };
                assert!(lanes.claim(0, tag, 1, f.location.region, 7));
                lanes.fence();
                let keeps = t.is_current(&f);
                if !keeps {
                    lanes.release(0, tag, 1, f.location.region, 7);
                }
                keeps
            })
        };
        t.remove(0, key).unwrap();
        let held = lanes.is_held(page.region, 7);
        let keeps = client.join().unwrap();
        assert!(
            held || !keeps,
            "the client holds a page the server returned"
        );
    });
}

/// A page's bytes as plain memory, so that loom reports any access to them that is not ordered
/// by happens-before.
struct PageBytes(loom::cell::UnsafeCell<u64>);

// SAFETY: the models access the cell only under the lane protocol, and loom checks that its
// accesses are ordered (a race is a model failure, not undefined behaviour).
unsafe impl Sync for PageBytes {}

/// A client reads its held page, then releases the slot; the server writes the page (its next
/// owner's bytes) only once a scan finds no hold. The client's read happens before the write:
/// loom would report the two plain accesses as a race otherwise, and the read sees the old
/// bytes.
#[test]
fn a_released_page_is_reused_only_after_its_reads() {
    model(|| {
        let lanes = Arc::new(MemLanes::new(1, 1));
        let page = Arc::new(PageBytes(loom::cell::UnsafeCell::new(1)));
        let tag = lanes.assign(0);
        assert!(lanes.claim(0, tag, 0, 2, 5));
        lanes.fence();
        let client = {
            let (lanes, page) = (lanes.clone(), page.clone());
            thread::spawn(move || {
                // SAFETY: the page is held: the server does not write it until the release.
                let seen = page.0.with(|p| unsafe { *p });
                lanes.release(0, tag, 0, 2, 5);
                seen
            })
        };
        let reused = !lanes.is_held(2, 5);
        if reused {
            // SAFETY: no lane holds the page, so no client reads it any more.
            page.0.with_mut(|p| unsafe { *p = 2 });
        }
        assert_eq!(client.join().unwrap(), 1);
    });
}

/// A client of the lane's previous session (old tag) releases and claims while the lane's new
/// session claims the same slot for the same page: the old client never clears the new hold.
#[test]
fn a_stale_client_never_clears_a_new_sessions_hold() {
    model(|| {
        let lanes = Arc::new(MemLanes::new(1, 2));
        let old = lanes.assign(0);
        assert!(lanes.claim(0, old, 0, 3, 4));
        lanes.reset(0);
        let new = lanes.assign(0);
        let stale = {
            let lanes = lanes.clone();
            thread::spawn(move || {
                lanes.release(0, old, 0, 3, 4);
                lanes.claim(0, old, 0, 3, 4)
            })
        };
        let claimed = lanes.claim(0, new, 0, 3, 4);
        let stale_claimed = stale.join().unwrap();
        assert!(claimed != stale_claimed, "exactly one claim fills the slot");
        let expect = if claimed { new } else { old };
        assert_eq!(lanes.slot(0, 0), Some((expect, 3, 4)));
        assert!(lanes.is_held(3, 4));
        lanes.release(0, old, 0, 3, 4);
        assert_eq!(lanes.slot(0, 0).is_some(), claimed);
        lanes.release(0, new, 0, 3, 4);
        assert_eq!(lanes.slot(0, 0), None);
    });
}
