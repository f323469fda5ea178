//! Eviction through the state: victims honour pins and recency, existence checks are not
//! uses, the counters follow, and an allocation that finds the pool full gets the regions of
//! dead owners back by evicting their keys.

use std::time::{Duration, Instant};

use maru_proto::ErrorCode;

use crate::registry::KeyRegistry;
use crate::state::fixtures::*;
use crate::state::lock;
use crate::state::notices::Returned;
use crate::state::sessions::scope_of;

const PAGE: u64 = 4096;

/// `name` as the registry knows it in `namespace` (behind the namespace's prefix).
fn key_in(namespace: &str, name: &str) -> Vec<u8> {
    let mut k = scope_of(namespace).into_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn key(name: &str) -> Vec<u8> {
    key_in("", name)
}

fn forever() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// Evicts every key that may go.
fn evict_all(st: &crate::state::ServerState) {
    st.evict(
        forever(),
        &|_, _| true,
        &mut |_| u64::MAX,
        &mut Returned::default(),
    );
}

#[test]
fn a_read_through_the_index_told_later_is_a_use_but_no_hit() {
    let (st, _rm, (_p, a, r)) = state_with_owner("a");
    for i in 0..4u64 {
        let k = key(&format!("k{i}"));
        assert!(st.register(&a, &reg(&k, &r, i * PAGE, PAGE)).unwrap());
    }
    let (k1, gone) = (key("k1"), key("never-stored"));
    st.touch(&[k1.as_slice(), gone.as_slice()], None);
    let before = st.capacity.key_bytes();
    let done = st.evict(
        forever(),
        &|_, _| true,
        &mut |_| (3 * PAGE).saturating_sub(before - st.capacity.key_bytes()),
        &mut Returned::default(),
    );
    assert_eq!(done.keys, 3);
    assert!(st.registry.lookup(&k1).is_some(), "the touched key stays");
    let ns = &st.stats().namespaces[0];
    assert_eq!(
        (ns.hits, ns.misses),
        (0, 0),
        "the server's counters are its own"
    );
    // Views a client held in its lane are a use and as many hits as views.
    st.touch(&[k1.as_slice()], Some(&[3]));
    let ns = &st.stats().namespaces[0];
    assert_eq!(
        (ns.hits, ns.misses),
        (3, 0),
        "a lane's hits are told with their count"
    );
}

#[test]
fn victims_are_unpinned_keys_oldest_first_and_exists_is_no_use() {
    let (st, _rm, (_p, a, r)) = state_with_owner("a");
    for i in 0..8u64 {
        let k = key(&format!("k{i}"));
        assert!(st.register(&a, &reg(&k, &r, i * PAGE, PAGE)).unwrap());
    }
    assert!(st.pin(&a, &key("k0")).unwrap());
    // k1 is read (a use); k2 is only checked for existence, many times.
    let mut out = Vec::new();
    st.write_lookup(&mut out, 1, None, &key("k1"));
    st.write_lookup(&mut out, 2, None, &key("nothing"));
    for _ in 0..100 {
        assert!(st.exists(&key("k2")));
    }
    // Six keys' worth: the six unpinned keys that were not read.
    let before = st.capacity.key_bytes();
    let done = st.evict(
        forever(),
        &|_, _| true,
        &mut |_| (6 * PAGE).saturating_sub(before - st.capacity.key_bytes()),
        &mut Returned::default(),
    );
    assert_eq!(done.keys, 6);
    assert!(
        st.registry.lookup(&key("k0")).is_some(),
        "a pinned key is never evicted"
    );
    assert!(
        st.registry.lookup(&key("k2")).is_none(),
        "existence checks do not keep a key"
    );
    assert!(
        st.registry.lookup(&key("k1")).is_some(),
        "a read keeps a key longer"
    );

    let s = st.stats();
    assert_eq!(s.eviction.evictions, done.keys);
    assert_eq!(s.eviction.evicted_bytes, done.keys * PAGE);
    assert_eq!(s.eviction.key_bytes, s.bytes);
    assert_eq!(s.eviction.tracked_keys, s.keys);
    assert_eq!(s.eviction.policy, "sieve");
    let ns = &s.namespaces[0];
    assert_eq!(
        (ns.namespace.as_str(), ns.hits, ns.misses, ns.pins),
        ("", 1, 1, 1)
    );
    assert_eq!(
        (ns.keys, ns.bytes, ns.evictions),
        (s.keys, s.bytes, done.keys)
    );
    let c = &s.clients[0];
    assert_eq!(
        (c.keys, c.key_bytes, c.pins, c.hits),
        (s.keys, s.bytes, 1, 1)
    );
    assert_eq!(
        (c.evictions, c.evicted_bytes),
        (done.keys, done.keys * PAGE)
    );

    // Everything else goes; the pinned key stays even when asked for more.
    evict_all(&st);
    assert_eq!(st.registry.counts().keys, 1);
    assert!(st.unpin(&a, &key("k0")));
    evict_all(&st);
    assert_eq!(st.registry.counts().keys, 0);
    assert_eq!(st.stats().clients[0].pins, 0);
}

#[test]
fn a_full_pool_gives_an_allocation_the_regions_of_gone_owners() {
    let (st, rm) = state(&["p"]);
    rm.room.lock().unwrap().insert("p".into(), 2 * MIB);
    let (mut pa, a, ra) = client_with_region(&st, "a");
    let (a0, a1, b0) = (key("a0"), key("a1"), key("b0"));
    st.batch_register(&a, &[reg(&a0, &ra, 0, PAGE), reg(&a1, &ra, PAGE, PAGE)])
        .unwrap();
    // Pinned by a live session, so it outlives its writer.
    let (_pc, c, _) = client(&st, "c");
    assert!(st.pin(&c, &a1).unwrap());
    st.goodbye(&mut pa);
    let (_pb, b, rb) = client_with_region(&st, "b");
    st.register(&b, &reg(&b0, &rb, 0, PAGE)).unwrap();
    // The pool is full and a's region is kept by a pinned key: no room.
    let e = st.request_region(&b, MIB).unwrap_err();
    assert_eq!(e.code, ErrorCode::PoolExhausted);
    assert!(
        st.registry.lookup(&key("a0")).is_none(),
        "unpinned keys of a gone owner went"
    );
    assert!(
        st.registry.lookup(&key("b0")).is_some(),
        "a live owner's keys are not touched"
    );
    // Unpinned, the last key goes and its region with it.
    assert!(st.unpin(&c, &a1));
    let r2 = st.request_region(&b, MIB).unwrap();
    assert!(st.registry.lookup(&key("a1")).is_none());
    assert_eq!(rm.live().len(), 2);
    assert!(!rm.live().contains(&ra.info.handle.region_id));
    assert_ne!(r2.info.handle.region_id, ra.info.handle.region_id);
}

#[test]
fn the_watermarks_bound_what_keys_hold() {
    let (st, _rm, (_p, a, r)) = state_with_owner("a");
    for i in 0..10u64 {
        let k = key(&format!("k{i}"));
        st.register(&a, &reg(&k, &r, i * PAGE, PAGE)).unwrap();
    }
    // The pool's size is unknown: nothing to do.
    assert_eq!(st.evict_to_watermarks(forever()).keys, 0);
    // 64 KiB: high 57.6, low 51.2; 10 keys hold 40 KiB.
    st.capacity.set_pool_bytes(64 * 1024);
    assert!(!st.capacity.over_high());
    assert_eq!(st.evict_to_watermarks(forever()).keys, 0);
    // 40 KiB: high 36, low 32: two keys go.
    st.capacity.set_pool_bytes(40 * 1024);
    assert!(st.capacity.over_high());
    let done = st.evict_to_watermarks(forever());
    assert_eq!((done.keys, st.registry.counts().keys), (2, 8));
    assert_eq!(st.capacity.key_bytes(), st.registry.counts().bytes);
}

#[test]
fn a_namespace_over_its_quota_evicts_only_its_own_keys() {
    use crate::eviction::EvictionConfig;
    let (st, _rm) = state(&[]);
    let mut config = EvictionConfig::default();
    config.add_quotas(&["t=16K"]).unwrap();
    let st = st.with_eviction(config);
    let (_p, a, r) = client_with_region(&st, "a");
    // The default namespace's keys are the oldest: a pool-wide policy would take them first.
    for i in 0..4u64 {
        st.register(&a, &reg(&key(&format!("d{i}")), &r, i * PAGE, PAGE))
            .unwrap();
    }
    for i in 0..6u64 {
        let k = key_in("t", &format!("t{i}"));
        st.register(&a, &reg(&k, &r, (10 + i) * PAGE, PAGE))
            .unwrap();
    }
    // t holds 24 KiB against a 16 KiB quota (high 14.4, low 12.8): down to 3 keys.
    let done = st.evict_to_watermarks(forever());
    assert_eq!(done.keys, 3);
    let s = st.stats();
    let by_name = |n: &str| s.namespaces.iter().find(|x| x.namespace == n).unwrap();
    assert_eq!((by_name("t").keys, by_name("t").evictions), (3, 3));
    assert_eq!(by_name("t").quota, Some(16 * 1024));
    assert_eq!((by_name("").keys, by_name("").evictions), (4, 0));
    for i in 0..4u64 {
        assert!(st.registry.lookup(&key(&format!("d{i}"))).is_some());
    }
}

#[test]
fn make_room_evicts_the_callers_own_victims_and_answers_their_pages() {
    let (st, _rm) = state(&[]);
    let (_pa, a, _) = client(&st, "a");
    let (_pb, b, _) = client(&st, "b");
    let (_pr, reader, _) = client(&st, "reader");
    let (ra, rb) = (
        st.request_region(&a, MIB).unwrap(),
        st.request_region(&b, MIB).unwrap(),
    );
    // b's keys are the oldest: a pool-wide policy would take them first.
    st.register(&b, &reg(&key("b0"), &rb, 0, PAGE)).unwrap();
    for i in 0..4u64 {
        st.register(&a, &reg(&key(&format!("a{i}")), &ra, i * PAGE, PAGE))
            .unwrap();
    }
    assert!(st.pin(&reader, &key("a0")).unwrap());
    let _view = st.find_and_hold(Some(&reader), &key("a1")).unwrap();
    let mut pages: Vec<u64> = st
        .make_room(&a, 8)
        .iter()
        .map(|p| p.offset / PAGE)
        .collect();
    pages.sort();
    assert_eq!(
        pages,
        [2, 3],
        "neither the pinned nor the viewed key's page"
    );
    assert!(st.registry.lookup(&key("b0")).is_some(), "b's key stays");
    assert!(st.registry.lookup(&key("a0")).is_some());
    assert!(st.registry.lookup(&key("a1")).is_some());
    assert!(st.make_room(&a, 8).is_empty(), "nothing left that may go");
    assert!(st.make_room(&reader, 8).is_empty(), "no regions, no room");
    assert!(
        lock(&a.notices).queued().is_empty(),
        "answered, not noticed"
    );
}
