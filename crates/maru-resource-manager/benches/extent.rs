//! First-fit extent allocation over a pool: what every region request pays at the resource
//! manager (besides its write-ahead log). `cargo bench -p maru-resource-manager --bench extent`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use maru_resource_manager::extent::ExtentAllocator;

const MIB: u64 = 1 << 20;
const ALIGN: u64 = 2 * MIB;

fn extent(c: &mut Criterion) {
    let mut g = c.benchmark_group("extent");
    let mut a = ExtentAllocator::new(64 << 30, ALIGN);
    g.bench_function("alloc_free_empty_pool", |b| {
        b.iter(|| {
            let (off, len) = a.alloc(black_box(100 * MIB)).unwrap();
            a.free(off, len).unwrap();
        })
    });
    // A fragmented pool: 4096 regions, every other one freed (2048 holes).
    let mut frag = ExtentAllocator::new(64 << 30, ALIGN);
    let taken: Vec<(u64, u64)> = (0..4096).map(|_| frag.alloc(4 * MIB).unwrap()).collect();
    for (off, len) in taken.iter().step_by(2) {
        frag.free(*off, *len).unwrap();
    }
    g.bench_function("alloc_free_fragmented_fits_hole", |b| {
        b.iter(|| {
            let (off, len) = frag.alloc(black_box(4 * MIB)).unwrap();
            frag.free(off, len).unwrap();
        })
    });
    g.bench_function("alloc_free_fragmented_past_holes", |b| {
        b.iter(|| {
            let (off, len) = frag.alloc(black_box(64 * MIB)).unwrap();
            frag.free(off, len).unwrap();
        })
    });
    g.bench_function("free_coalescing_4096", |b| {
        b.iter_batched(
            || {
                let mut a = ExtentAllocator::new(64 << 30, ALIGN);
                let v: Vec<(u64, u64)> = (0..4096).map(|_| a.alloc(4 * MIB).unwrap()).collect();
                (a, v)
            },
            |(mut a, v)| {
                for (off, len) in v {
                    a.free(off, len).unwrap();
                }
                a
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, extent);
criterion_main!(benches);
