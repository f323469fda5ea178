//! Codec cost per message: what every request and reply pays on both ends, next to a
//! ~10 µs round trip. `cargo bench -p maru-proto --bench codec`.

use std::hint::black_box;

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use maru_proto::{
    decode_frame, encode_request, encode_response, Access, Handle, Location, RegionInfo,
    RegisterEntry, Request, Response, Slot,
};

fn key(i: usize) -> Vec<u8> {
    format!("lmcache@llama3-8b@tp1@0@{i:016x}").into_bytes()
}

fn region() -> RegionInfo {
    RegionInfo {
        handle: Handle {
            region_id: 7,
            pool: "/dev/shm/maru/maru-5555.pool".into(),
            offset: 64 << 20,
            len: 64 << 20,
            owner: "host:12345".into(),
            token: [9; maru_proto::TOKEN_LEN],
        },
        access: Access {
            path: "/dev/shm/maru/maru-5555.pool".into(),
            offset: 64 << 20,
            len: 64 << 20,
            page_size: 4096,
            pool_uuid: [7; 16],
        },
    }
}

/// Benchmarks decoding the frame `encode` writes.
fn bench_decode(
    g: &mut BenchmarkGroup<'_, WallTime>,
    id: BenchmarkId,
    encode: impl FnOnce(&mut Vec<u8>),
) {
    let mut frame = Vec::new();
    encode(&mut frame);
    g.bench_function(id, |b| b.iter(|| decode_frame(black_box(&frame)).unwrap()));
}

fn single(c: &mut Criterion) {
    let k = key(1);
    let entry = RegisterEntry {
        key: &k,
        region_id: 7,
        offset: 8192,
        len: 4096,
    };
    let loc = Response::Lookup(Some(Location {
        region: region(),
        offset: 8192,
        len: 4096,
        generation: 1,
    }));
    let mut g = c.benchmark_group("single");
    let mut buf = Vec::with_capacity(4096);
    for (name, req) in [
        ("exists", Request::Exists { key: &k }),
        ("register", Request::Register(entry)),
    ] {
        g.bench_function(BenchmarkId::new("encode_request", name), |b| {
            b.iter(|| {
                buf.clear();
                encode_request(&mut buf, 1, black_box(&req)).unwrap();
            })
        });
        bench_decode(&mut g, BenchmarkId::new("decode_request", name), |f| {
            encode_request(f, 1, &req).unwrap()
        });
    }
    g.bench_function("encode_response/lookup", |b| {
        b.iter(|| {
            buf.clear();
            encode_response(&mut buf, 1, black_box(&loc)).unwrap();
        })
    });
    bench_decode(&mut g, BenchmarkId::new("decode_response", "lookup"), |f| {
        encode_response(f, 1, &loc).unwrap()
    });
    g.finish();
}

fn batches(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch");
    let mut buf = Vec::with_capacity(64 * 1024);
    for n in [32usize, 256] {
        let ks: Vec<Vec<u8>> = (0..n).map(key).collect();
        let refs: Vec<&[u8]> = ks.iter().map(|k| k.as_slice()).collect();
        g.throughput(Throughput::Elements(n as u64));
        let req = Request::BatchLookup { keys: refs.clone() };
        g.bench_function(BenchmarkId::new("encode_batch_lookup", n), |b| {
            b.iter(|| {
                buf.clear();
                encode_request(&mut buf, 1, black_box(&req)).unwrap();
            })
        });
        bench_decode(&mut g, BenchmarkId::new("decode_batch_lookup", n), |f| {
            encode_request(f, 1, &req).unwrap()
        });
        let resp = Response::BatchLookup {
            regions: vec![region()],
            entries: (0..n)
                .map(|i| {
                    Some(Slot {
                        region_index: 0,
                        offset: i as u64 * 4096,
                        len: 4096,
                        generation: i as u64,
                    })
                })
                .collect(),
        };
        bench_decode(
            &mut g,
            BenchmarkId::new("decode_batch_lookup_reply", n),
            |f| encode_response(f, 1, &resp).unwrap(),
        );
        let entries: Vec<RegisterEntry> = refs
            .iter()
            .enumerate()
            .map(|(i, k)| RegisterEntry {
                key: k,
                region_id: 7,
                offset: i as u64 * 4096,
                len: 4096,
            })
            .collect();
        let req = Request::BatchRegister(entries);
        bench_decode(&mut g, BenchmarkId::new("decode_batch_register", n), |f| {
            encode_request(f, 1, &req).unwrap()
        });
    }
    g.finish();
}

criterion_group!(benches, single, batches);
criterion_main!(benches);
