//! The key registry: insert-if-absent and lookup, the work behind every store, retrieve and
//! exists. `cargo bench -p maru-server --bench registry`.

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
