//! The key registry: insert-if-absent, lookup and delete, the work behind every store,
//! retrieve, exists and delete. `cargo bench -p maru-server --bench registry`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use maru_server::registry::{Entry, KeyRegistry, RegionSlot, ShardedRegistry};

fn key(i: u64) -> Vec<u8> {
    format!("lmcache@llama3-8b@tp1@0@{i:016x}").into_bytes()
}

fn entry(i: u64) -> Entry {
    Entry::new(RegionSlot(1), (i % 16_384) * 4096, 4096).unwrap()
}

fn registry(c: &mut Criterion) {
    let mut g = c.benchmark_group("registry");
    const N: u64 = 1_000_000;
    let keys: Vec<Vec<u8>> = (0..N).map(key).collect();
    let full = ShardedRegistry::new();
    for (i, k) in keys.iter().enumerate() {
        full.insert_if_absent(k, entry(i as u64));
    }
    let missing: Vec<Vec<u8>> = (N..N + 4096).map(key).collect();

    let mut i = 0usize;
    g.bench_function("lookup_hit_1m", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            black_box(full.lookup(&keys[i]))
        })
    });
    // The same hits in two other orders, because where keys sit in memory matters once the
    // registry outgrows the caches: a random permutation (no locality at all), and registration
    // order (what a batch of one prefix's chunk keys does; keys registered together are stored
    // together).
    let mut shuffled: Vec<usize> = (0..keys.len()).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for j in (1..shuffled.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        shuffled.swap(j, (x % (j as u64 + 1)) as usize);
    }
    g.bench_function("lookup_hit_1m_random", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(full.lookup(&keys[shuffled[i]]))
        })
    });
    g.bench_function("lookup_hit_1m_in_order", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(full.lookup(&keys[i]))
        })
    });
    drop(shuffled);
    g.bench_function("lookup_miss_1m", |b| {
        b.iter(|| {
            i = (i + 1) % missing.len();
            black_box(full.lookup(&missing[i]))
        })
    });
    g.bench_function("insert_existing_1m", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            black_box(full.insert_if_absent(&keys[i], entry(0)))
        })
    });
    // Churn at 1M keys: register one new key and delete the oldest (a sliding window over a
    // ring of 2M keys), so deletes leave garbage in the shards' key arenas and the cost of
    // compacting them is in the figure.
    let ring: Vec<Vec<u8>> = (0..2 * N).map(|i| key(3 * N + i)).collect();
    let window = ShardedRegistry::new();
    for k in &ring[..N as usize] {
        window.insert_if_absent(k, entry(0));
    }
    let mut next = N as usize;
    g.bench_function("churn_1m", |b| {
        b.iter(|| {
            let new = &ring[next % ring.len()];
            let old = &ring[(next + ring.len() - N as usize) % ring.len()];
            next += 1;
            window.insert_if_absent(new, entry(0));
            black_box(window.remove_if_unpinned(old, RegionSlot(1)))
        })
    });
    drop(window);
    // Fresh inserts: 64k keys into an empty registry per iteration (includes table growth).
    let fresh: Vec<Vec<u8>> = (0..65_536).map(|i| key(N * 2 + i)).collect();
    g.throughput(Throughput::Elements(fresh.len() as u64));
    g.bench_function("insert_new_64k", |b| {
        b.iter_batched(
            ShardedRegistry::new,
            |r| {
                for (i, k) in fresh.iter().enumerate() {
                    r.insert_if_absent(k, entry(i as u64));
                }
                r
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, registry);
criterion_main!(benches);
