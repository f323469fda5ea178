//! The evictor thread on real daemons: registrations that pass the high watermark wake it,
//! it evicts down to the low one, pinned keys stay, and an existence storm does not keep
//! anything alive.

mod common;

use std::time::Duration;

use common::*;
use maru_proto::*;

#[test]
fn the_evictor_keeps_keys_between_the_watermarks_and_spares_pinned_ones() {
    let c = InProcessCluster::with(|_, _| {}, |_, s| s.eviction.policy = "clock".into());
    let mut a = c.client("a");
    let mut storm = c.client("storm");
    let r = a.region(2 * MIB).handle.region_id;
    let key = |i: u64| format!("chunk-{i}").into_bytes();
    // The pool is 64 MiB: high 57.6, low 51.2. Keys of 1 MiB (the server does not mind that
    // they share pages).
    for i in 0..5 {
        assert!(a.register(&key(i), r, 0, MIB));
        assert!(a.bool(&Request::Pin { key: &key(i) }));
    }
    assert!(wait_until(TIMEOUT, || a.stats().eviction.pool_bytes == 64 * MIB));
    // 58 keys: past the high watermark with the last one; the evictor goes down to the low.
    for i in 5..58 {
        assert!(a.register(&key(i), r, 0, MIB));
    }
    let mut s = a.stats();
    assert!(
        wait_until(TIMEOUT, || {
            s = a.stats();
            s.eviction.key_bytes <= 51 * MIB
        }),
        "keys still hold {} bytes: {:?}",
        s.eviction.key_bytes,
        s.eviction
    );
    assert!(
        s.eviction.key_bytes > 45 * MIB,
        "evicted far past the low watermark: {s:?}"
    );
    // More keys while another client checks every key's existence, over and over.
    for i in 58..90 {
        assert!(a.register(&key(i), r, 0, MIB));
        for j in 0..i {
            storm.bool(&Request::Exists { key: &key(j) });
        }
    }
    assert!(
        wait_until(TIMEOUT, || {
            s = a.stats();
            s.eviction.key_bytes <= 57 * MIB
        }),
        "{:?}",
        s.eviction
    );
    assert_eq!(s.eviction.policy, "clock");
    assert_eq!((s.eviction.high, s.eviction.low), (0.9, 0.8));
    assert!(s.eviction.evictions >= 90 - 57, "{:?}", s.eviction);
    assert_eq!(s.bytes, s.eviction.key_bytes);
    for i in 0..5 {
        assert!(a.lookup(&key(i)).is_some(), "pinned key {i} was evicted");
    }
    // The last keys registered are the newest: they stay.
    assert!(a.lookup(&key(89)).is_some());
    // Settled: nothing more goes while the keys stay below the high watermark.
    let settled = s.eviction.evictions;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(a.stats().eviction.evictions, settled);
}
