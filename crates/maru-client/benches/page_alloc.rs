//! The paged allocator of an owned region: the O(1) alloc/free every store pays under the
//! handler's write lock. `cargo bench -p maru-client --bench page_alloc`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use maru_client::PageAllocator;

fn page_alloc(c: &mut Criterion) {
    let mut g = c.benchmark_group("page_alloc");
    // 64 MiB of 4 KiB pages: the benchmark's region.
    let pages = 16_384u32;
    let mut a = PageAllocator::new(pages);
    g.bench_function("alloc_free_pair", |b| {
        b.iter(|| {
            let p = a.alloc().unwrap();
            a.free(black_box(p)).unwrap();
        })
    });
    g.throughput(Throughput::Elements(pages as u64));
    g.bench_function("fill_then_drain_16k", |b| {
        b.iter_batched_ref(
            || PageAllocator::new(pages),
            |a| {
                let mut taken = Vec::with_capacity(pages as usize);
                while let Some(p) = a.alloc() {
                    taken.push(p);
                }
                for p in taken {
                    a.free(p).unwrap();
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Elements(262_144));
    g.bench_function("new_1gib_of_4k_pages", |b| {
        b.iter(|| PageAllocator::new(black_box(262_144)))
    });
    g.finish();
}

criterion_group!(benches, page_alloc);
criterion_main!(benches);
