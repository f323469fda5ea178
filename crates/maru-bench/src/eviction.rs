//! Eviction policies on the same traces: each of the server's policies (`--evict-policy`)
//! replays a Zipf trace of prefix requests through a cache of a fixed size, next to an exact
//! LRU simulation of the same trace and size (module `trace`). Reported as hit ratios and
//! each policy's ratio to exact LRU, for a few skews and cache sizes, in one run.
//!
//! Then stores on real daemons: their p50/p99 on a full pool, where every store's page comes
//! from eviction (the evictor's watermarks, or room the server makes in the writer's own
//! regions), against the same stores on an empty pool, in the same run.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use maru_client::{MaruConfig, MaruHandler};

use serde::Serialize;

use crate::daemons::{InProcess, Scratch};
use crate::plan::{KIB, MIB};
use crate::stats::{round3, Samples};
use crate::table::Out;
use crate::targets::Target;
use crate::trace::{replay, ExactLru, Present, TraceSpec};

#[derive(Debug, Clone, Serialize)]
pub struct PolicyRow {
    pub zipf_s: f64,
    /// Cache size as a fraction of the distinct chunks of the trace.
    pub cache_fraction: f64,
    pub capacity_chunks: usize,
    pub policy: String,
    pub hit_ratio: f64,
    /// `hit_ratio` over exact LRU's on the same trace and size.
    pub vs_exact_lru: f64,
    /// Time per chunk request in the simulation (policy bookkeeping plus the simulation's
    /// own set lookups).
    pub ns_per_chunk: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvictionReport {
    pub prefixes: usize,
    pub max_chunks: u32,
    pub requests: usize,
    pub seed: u64,
    pub rows: Vec<PolicyRow>,
    /// Stores on a full pool against an empty one (absent when the daemons could not run).
    pub full_pool: Option<FullPoolRow>,
}

/// Store latency with and without eviction on the path.
#[derive(Debug, Clone, Serialize)]
pub struct FullPoolRow {
    pub pool_bytes: u64,
    pub chunk_bytes: u64,
    /// Stores timed on the empty pool (half the pool's pages at most) and on the full one.
    pub empty_stores: usize,
    pub stores: usize,
    pub empty_p50_us: f64,
    pub empty_p99_us: f64,
    pub full_p50_us: f64,
    pub full_p99_us: f64,
    /// `full_p99_us / empty_p99_us`.
    pub p99_ratio: f64,
    /// Keys the server evicted during the full-pool stores.
    pub evictions: u64,
}

pub fn run(mode: &str, pool_dir: &Path, out: &mut Out) -> EvictionReport {
    let (prefixes, requests) = match mode {
        "smoke" => (2_000, 20_000),
        "quick" => (20_000, 200_000),
        _ => (50_000, 1_000_000),
    };
    let mut rows = Vec::new();
    let seed = 42;
    let _ = writeln!(
        out,
        "{prefixes} prefixes of 1-8 chunks, {requests} requests, seed {seed}; hit ratio = chunks \
         read from the cache / chunks requested (a prefix read stops at its first miss)"
    );
    let _ = writeln!(
        out,
        "{:>6} {:>6} {:>9} {:<10} {:>9} {:>11} {:>9}",
        "zipf", "cache", "chunks", "policy", "hit", "vs exact", "ns/chunk"
    );
    for zipf_s in [0.8, 1.0, 1.2] {
        let spec = TraceSpec {
            prefixes,
            max_chunks: 8,
            requests,
            zipf_s,
            seed,
        };
        let trace = spec.requests();
        let distinct = spec.distinct_chunks(&trace);
        for cache_fraction in [0.05, 0.2] {
            let capacity = ((distinct as f64 * cache_fraction) as usize).max(1);
            let (hits, total) = replay(&mut ExactLru::default(), &trace, capacity);
            let exact = hits as f64 / total.max(1) as f64;
            let mut add = |policy: &str, hit_ratio: f64, ns: Option<f64>| {
                let vs = if exact > 0.0 { hit_ratio / exact } else { 1.0 };
                let _ = writeln!(
                    out,
                    "{zipf_s:>6.1} {:>5.0}% {capacity:>9} {policy:<10} {hit_ratio:>9.4} {vs:>10.3}x {:>9}",
                    cache_fraction * 100.0,
                    ns.map_or_else(|| "-".to_owned(), |ns| format!("{ns:.0}"))
                );
                rows.push(PolicyRow {
                    zipf_s,
                    cache_fraction,
                    capacity_chunks: capacity,
                    policy: policy.to_owned(),
                    hit_ratio,
                    vs_exact_lru: vs,
                    ns_per_chunk: ns,
                });
            };
            add("exact-lru", exact, None);
            for name in maru_server::eviction::POLICY_NAMES {
                let Ok(policy) = maru_server::eviction::policy(name) else {
                    continue;
                };
                let mut cache = Present::new(policy);
                let t0 = Instant::now();
                let (hits, total) = replay(&mut cache, &trace, capacity);
                let ns = t0.elapsed().as_nanos() as f64 / total.max(1) as f64;
                add(cache.name(), hits as f64 / total.max(1) as f64, Some(ns));
            }
        }
    }
    let full_pool = match full_pool(mode, pool_dir) {
        Ok(r) => {
            let _ = writeln!(
                out,
                "\nstore of {} KiB on a {} MiB pool: empty ({} stores) p50 {:.1} us p99 {:.1} us; \
                 full, eviction on the path ({} stores) p50 {:.1} us p99 {:.1} us; p99 {:.2}x; \
                 {} evictions",
                r.chunk_bytes / KIB,
                r.pool_bytes / MIB,
                r.empty_stores,
                r.empty_p50_us,
                r.empty_p99_us,
                r.stores,
                r.full_p50_us,
                r.full_p99_us,
                r.p99_ratio,
                r.evictions
            );
            Some(r)
        }
        Err(e) => {
            let _ = writeln!(out, "\nstores on a full pool not measured: {e:#}");
            None
        }
    };
    EvictionReport {
        prefixes,
        max_chunks: 8,
        requests,
        seed,
        rows,
        full_pool,
    }
}

/// Stores on an empty pool, then on a full one, through one handler whose regions cover
/// the pool. Both phases store fresh keys into pages already mapped and populated (the
/// empty phase's pages come from a fill that was deleted), so the difference is eviction.
fn full_pool(mode: &str, pool_dir: &Path) -> anyhow::Result<FullPoolRow> {
    const POOL: u64 = 64 * MIB;
    const CHUNK: u64 = 64 * KIB;
    let stores = match mode {
        "smoke" => 500,
        "quick" => 3_000,
        _ => 10_000,
    };
    let scratch = Scratch::new(pool_dir, "full-pool")?;
    let daemons = InProcess::start(&scratch.path, POOL)?;
    let h = MaruHandler::new(MaruConfig {
        server_url: daemons.unix_url.clone(),
        pool_size: 4 * MIB,
        chunk_size_bytes: CHUNK,
        timeout_ms: 10_000,
        ..MaruConfig::default()
    })?;
    h.connect()?;
    let value = vec![7u8; CHUNK as usize];
    let fits = (POOL / CHUNK) as usize;
    let key = |phase: &str, i: usize| format!("{phase}-{i}").into_bytes();
    let store_all = |phase: &str, n: usize, samples: &mut Option<&mut Samples>| {
        for i in 0..n {
            let k = key(phase, i);
            let t = Instant::now();
            h.store_bytes(&k, b"", &value)?;
            if let Some(s) = samples.as_mut() {
                s.push(t.elapsed());
            }
        }
        anyhow::Ok(())
    };
    // Map and populate the whole pool, then give every page back.
    store_all("fill", fits, &mut None)?;
    for chunk in (0..fits)
        .map(|i| key("fill", i))
        .collect::<Vec<_>>()
        .chunks(256)
    {
        let refs: Vec<&[u8]> = chunk.iter().map(|k| &k[..]).collect();
        h.batch_delete(&refs)?;
    }
    // Empty: half the pool, so no watermark is reached.
    let mut empty = Samples::with_capacity(fits / 2);
    let n_empty = (fits / 2).min(stores);
    store_all("empty", n_empty, &mut Some(&mut empty))?;
    // Full: fill the rest, then every store needs a page that eviction frees.
    store_all("rest", fits - n_empty, &mut None)?;
    let before = evictions(&h)?;
    let mut full = Samples::with_capacity(stores);
    store_all("full", stores, &mut Some(&mut full))?;
    let evicted = evictions(&h)? - before;
    h.close();
    let (e, f) = (empty.summary(), full.summary());
    Ok(FullPoolRow {
        pool_bytes: POOL,
        chunk_bytes: CHUNK,
        empty_stores: n_empty,
        stores,
        empty_p50_us: round3(e.p50_us),
        empty_p99_us: round3(e.p99_us),
        full_p50_us: round3(f.p50_us),
        full_p99_us: round3(f.p99_us),
        p99_ratio: round3(f.p99_us / e.p99_us.max(1e-9)),
        evictions: evicted,
    })
}

fn evictions(h: &MaruHandler) -> anyhow::Result<u64> {
    Ok(h.stats()?.server.eviction.evictions)
}

/// The default policy keeps at least exact LRU's hit ratio on every trace and size measured.
pub fn targets(report: &EvictionReport) -> Vec<Target> {
    let default = maru_server::eviction::DEFAULT_POLICY;
    let worst = report
        .rows
        .iter()
        .filter(|r| r.policy == default)
        .min_by(|a, b| a.vs_exact_lru.total_cmp(&b.vs_exact_lru));
    let full = report.full_pool.as_ref().map(|r| Target {
        target: "store p99 on a full pool vs an empty pool".into(),
        api: "eviction".into(),
        transport: "unix".into(),
        value: r.p99_ratio,
        limit: 2.0,
        met: r.p99_ratio <= 2.0,
        detail: format!(
            "full {:.1} us vs empty {:.1} us ({} evictions)",
            r.full_p99_us, r.empty_p99_us, r.evictions
        ),
    });
    worst
        .map(|r| Target {
            target: format!("{default} hit ratio vs exact LRU (worst trace)"),
            api: "eviction".into(),
            transport: "-".into(),
            value: (r.vs_exact_lru * 1000.0).round() / 1000.0,
            limit: 1.0,
            met: r.vs_exact_lru >= 1.0,
            detail: format!(
                "zipf {} cache {:.0}%: {:.4} vs {:.4}",
                r.zipf_s,
                r.cache_fraction * 100.0,
                r.hit_ratio,
                r.hit_ratio / r.vs_exact_lru.max(1e-12)
            ),
        })
        .into_iter()
        .chain(full)
        .collect()
}
