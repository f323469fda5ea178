//! Registry memory per key, measured with a counting allocator over one million keys. The
//! budget is 100 bytes of server overhead per key beyond the key's own bytes, and the
//! count is deterministic (allocations, not RSS), so the test holds the layout to it (~56
//! bytes with the per-shard key arenas); the figure is printed for the record (`cargo test -p maru-server --test bytes_per_key -- --nocapture`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use maru_server::registry::{Entry, KeyRegistry, RegionSlot, ShardedRegistry, PAGE_ALIGN};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours, passed through.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours, passed through.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as ours, passed through.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn one_million_keys_cost_at_most_100_bytes_each_beyond_the_key() {
    const N: u64 = 1_000_000;
    // Keys shaped like a KV-cache chunk key: a model/prefix hash in hex plus a chunk index.
    let key = |i: u64| {
        format!(
            "llama-3-8b@{:016x}:{i}",
            i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        )
    };
    let key_bytes: u64 = (0..N).map(|i| key(i).len() as u64).sum();

    let before = LIVE.load(Ordering::Relaxed);
    let reg = ShardedRegistry::new();
    for i in 0..N {
        let e = Entry::new(RegionSlot((i % 16) as u32), (i % 4096) * PAGE_ALIGN, 65_536).unwrap();
        assert!(reg.insert_if_absent(key(i).as_bytes(), e));
    }
    let used = (LIVE.load(Ordering::Relaxed) - before) as u64;
    assert_eq!(reg.counts().keys, N);
    let overhead = (used - key_bytes) as f64 / N as f64;
    println!(
        "registry: {N} keys, {:.1} MiB total, {:.1} bytes/key of which {:.1} are key bytes: \
         {overhead:.1} bytes/key overhead",
        used as f64 / (1 << 20) as f64,
        used as f64 / N as f64,
        key_bytes as f64 / N as f64,
    );
    assert!(overhead < 100.0, "{overhead:.1} bytes per key of overhead");
    drop(reg);
}
