//! Synthetic KV-cache traces and a cache simulation to replay them through.
//!
//! A trace is a sequence of prefix requests. Prefix popularity follows a Zipf law (seeded, so
//! a run is repeatable); each prefix has a fixed number of chunks. A request reads the
//! prefix's chunks in order and stops at the first missing one (a prefix lookup counts leading
//! chunks); the chunks from there on are recomputed and stored together, as one batch, and
//! the cache evicts down to its capacity. The hit ratio is chunks read from the cache over
//! chunks requested.
//!
//! [`ExactLru`] is the reference: least-recently-used kept the obvious way (a tick per use and
//! an ordered map), independent of the server's policies, which replay the same trace through
//! their trait.

use std::collections::{BTreeMap, HashMap};

use maru_server::eviction::EvictionPolicy;

/// splitmix64: small, fast and good enough to draw a trace from.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf popularity over `n` items: item `i` (0-based) is drawn with probability proportional
/// to `1 / (i + 1)^s`.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for i in 0..n {
            total += 1.0 / ((i + 1) as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.next_f64();
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }
}

/// What a trace looks like.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct TraceSpec {
    pub prefixes: usize,
    /// Chunks per prefix are 1..=max_chunks, fixed per prefix.
    pub max_chunks: u32,
    pub requests: usize,
    pub zipf_s: f64,
    pub seed: u64,
}

/// One request: a prefix and how many chunks it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub prefix: u32,
    pub chunks: u32,
}

impl TraceSpec {
    /// The requests, the same for the same spec. Popularity ranks are scattered over prefix
    /// ids, so the most popular prefixes are not also the first ones registered.
    pub fn requests(&self) -> Vec<Request> {
        let zipf = Zipf::new(self.prefixes, self.zipf_s);
        let mut rng = Rng::new(self.seed);
        let mut lengths = Rng::new(self.seed ^ 0x5EED);
        let chunks: Vec<u32> = (0..self.prefixes)
            .map(|_| 1 + (lengths.next_u64() % self.max_chunks as u64) as u32)
            .collect();
        let scatter = |rank: usize| ((rank as u64 * 2_654_435_761) % self.prefixes as u64) as u32;
        (0..self.requests)
            .map(|_| {
                let prefix = scatter(zipf.sample(&mut rng));
                Request {
                    prefix,
                    chunks: chunks[prefix as usize],
                }
            })
            .collect()
    }

    /// Distinct chunks the trace can touch.
    pub fn distinct_chunks(&self, requests: &[Request]) -> usize {
        let mut seen: HashMap<u32, u32> = HashMap::new();
        for r in requests {
            seen.insert(r.prefix, r.chunks);
        }
        seen.values().map(|&c| c as usize).sum()
    }
}

pub fn chunk_key(prefix: u32, chunk: u32) -> [u8; 8] {
    (((prefix as u64) << 32) | chunk as u64).to_le_bytes()
}

/// A cache the simulation drives: lookups that count as uses, batch stores, eviction to a
/// number of keys.
pub trait SimCache {
    /// Whether `key` is held; a use when it is.
    fn contains_and_use(&mut self, key: &[u8]) -> bool;
    /// Whether `key` is held, without counting a use.
    fn contains(&mut self, key: &[u8]) -> bool;
    fn store_batch(&mut self, keys: &[&[u8]]);
    fn evict_to(&mut self, keys: usize);
}

/// A policy with the set of keys it holds beside it (the trait has no lookup: the server's
/// registry is the lookup), so a use can be reported exactly when the key is present.
pub struct Present {
    policy: Box<dyn EvictionPolicy>,
    keys: std::collections::HashSet<[u8; 8]>,
}

impl Present {
    pub fn new(policy: Box<dyn EvictionPolicy>) -> Present {
        Present {
            policy,
            keys: Default::default(),
        }
    }

    pub fn name(&self) -> &'static str {
        self.policy.name()
    }
}

fn key8(key: &[u8]) -> [u8; 8] {
    let mut k = [0u8; 8];
    k.copy_from_slice(&key[..8]);
    k
}

impl SimCache for Present {
    fn contains_and_use(&mut self, key: &[u8]) -> bool {
        let present = self.keys.contains(&key8(key));
        if present {
            self.policy.touch(key);
        }
        present
    }
    fn contains(&mut self, key: &[u8]) -> bool {
        self.keys.contains(&key8(key))
    }
    fn store_batch(&mut self, keys: &[&[u8]]) {
        self.policy.insert_batch(keys);
        self.keys.extend(keys.iter().map(|k| key8(k)));
    }
    fn evict_to(&mut self, keys: usize) {
        let over = self.policy.len().saturating_sub(keys);
        if over > 0 {
            for v in self.policy.pick_victims(over, usize::MAX, &mut |_| true) {
                self.keys.remove(&key8(&v));
            }
        }
    }
}

/// Exact LRU, the reference.
#[derive(Default)]
pub struct ExactLru {
    tick: u64,
    by_tick: BTreeMap<u64, [u8; 8]>,
    ticks: HashMap<[u8; 8], u64>,
}

impl ExactLru {
    fn bump(&mut self, key: [u8; 8]) {
        if let Some(t) = self.ticks.get(&key) {
            self.by_tick.remove(t);
        }
        self.tick += 1;
        self.ticks.insert(key, self.tick);
        self.by_tick.insert(self.tick, key);
    }
}

impl SimCache for ExactLru {
    fn contains_and_use(&mut self, key: &[u8]) -> bool {
        let k = key8(key);
        let present = self.ticks.contains_key(&k);
        if present {
            self.bump(k);
        }
        present
    }
    fn contains(&mut self, key: &[u8]) -> bool {
        self.ticks.contains_key(&key8(key))
    }
    fn store_batch(&mut self, keys: &[&[u8]]) {
        // Reverse order, as the server registers a batch: the first chunk is the most recent.
        for k in keys.iter().rev() {
            self.bump(key8(k));
        }
    }
    fn evict_to(&mut self, keys: usize) {
        while self.ticks.len() > keys {
            let Some((_, k)) = self.by_tick.pop_first() else {
                break;
            };
            self.ticks.remove(&k);
        }
    }
}

/// Replays `requests` through `cache` holding at most `capacity` chunks; returns (chunks
/// read from the cache, chunks requested).
pub fn replay(cache: &mut dyn SimCache, requests: &[Request], capacity: usize) -> (u64, u64) {
    let (mut hits, mut total) = (0u64, 0u64);
    let mut keys: Vec<[u8; 8]> = Vec::new();
    for r in requests {
        total += r.chunks as u64;
        let mut leading = 0;
        while leading < r.chunks && cache.contains_and_use(&chunk_key(r.prefix, leading)) {
            leading += 1;
        }
        hits += leading as u64;
        keys.clear();
        for c in leading..r.chunks {
            let k = chunk_key(r.prefix, c);
            if !cache.contains(&k) {
                keys.push(k);
            }
        }
        if !keys.is_empty() {
            let refs: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
            cache.store_batch(&refs);
            cache.evict_to(capacity);
        }
    }
    (hits, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_is_seeded_and_skewed() {
        let spec = TraceSpec {
            prefixes: 1000,
            max_chunks: 4,
            requests: 20_000,
            zipf_s: 1.0,
            seed: 7,
        };
        let a = spec.requests();
        assert_eq!(a, spec.requests(), "same seed, same trace");
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for r in &a {
            *counts.entry(r.prefix).or_default() += 1;
            assert!((1..=4).contains(&r.chunks));
        }
        let mut by_count: Vec<usize> = counts.values().copied().collect();
        by_count.sort_unstable_by(|x, y| y.cmp(x));
        // The most popular prefix of 1000 under s = 1 takes ~13 % of requests.
        assert!(by_count[0] > 2000 && by_count[0] < 3400, "{}", by_count[0]);
    }

    #[test]
    fn exact_lru_evicts_the_least_recent_and_a_big_cache_misses_only_once() {
        let mut lru = ExactLru::default();
        lru.store_batch(&[&chunk_key(1, 0), &chunk_key(1, 1)]);
        lru.store_batch(&[&chunk_key(2, 0)]);
        assert!(lru.contains_and_use(&chunk_key(1, 0)));
        lru.evict_to(2);
        assert!(
            !lru.contains(&chunk_key(1, 1)),
            "the later chunk of the older batch goes"
        );
        let spec = TraceSpec {
            prefixes: 100,
            max_chunks: 3,
            requests: 5000,
            zipf_s: 0.8,
            seed: 1,
        };
        let reqs = spec.requests();
        let distinct = spec.distinct_chunks(&reqs);
        let (hits, total) = replay(&mut ExactLru::default(), &reqs, distinct);
        assert_eq!(total - hits, distinct as u64, "only cold misses");
        let mut sieve = Present::new(maru_server::eviction::policy("sieve").unwrap());
        assert_eq!(replay(&mut sieve, &reqs, distinct), (hits, total));
    }
}
