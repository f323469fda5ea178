use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use maru_proto::stats::OpStats;

/// Sub-buckets per power of two: quantiles are exact to within ~1/8 (12.5 %).
const SUB: usize = 8;
/// Powers of two covered, from 1 ns to ~2^40 ns (≈ 18 minutes).
const OCTAVES: usize = 40;
const BUCKETS: usize = OCTAVES * SUB;

/// A lock-free latency histogram with logarithmic buckets. Recording is two relaxed atomic
/// adds, cheap enough for every request on the hot path.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let octave = 63 - ns.leading_zeros() as usize; // floor(log2(ns)) >= 3
    let sub = ((ns >> (octave - 3)) & (SUB as u64 - 1)) as usize;
    ((octave - 2) * SUB + sub).min(BUCKETS - 1)
}

/// Upper bound (ns) of a bucket, the value reported for quantiles that land in it.
fn bucket_upper(b: usize) -> u64 {
    if b < SUB {
        return b as u64;
    }
    let octave = b / SUB + 2;
    let sub = (b % SUB) as u64;
    ((SUB as u64 + sub + 1) << (octave - 3)) - 1
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn record(&self, d: Duration) {
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        self.buckets[bucket_of(ns)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Relaxed))
    }

    /// The `q` quantile (0..=1) in nanoseconds; 0 when empty.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_upper(i);
            }
        }
        bucket_upper(BUCKETS - 1)
    }

    /// Cumulative counts at the given upper bounds (seconds), for Prometheus histograms.
    pub fn cumulative_at(&self, bounds_s: &[f64]) -> Vec<u64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        bounds_s
            .iter()
            .map(|&s| {
                let limit = (s * 1e9) as u64;
                counts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| bucket_upper(*i) <= limit)
                    .map(|(_, c)| c)
                    .sum()
            })
            .collect()
    }
}

/// Counters and a latency histogram per operation name (fixed at construction, so recording
/// never takes a lock).
pub struct OpTable {
    ops: BTreeMap<&'static str, (Histogram, AtomicU64)>,
}

impl OpTable {
    pub fn new(names: &[&'static str]) -> Self {
        OpTable {
            ops: names
                .iter()
                .map(|n| (*n, (Histogram::new(), AtomicU64::new(0))))
                .collect(),
        }
    }

    /// Records one operation; unknown names are ignored.
    pub fn record(&self, name: &str, took: Duration, ok: bool) {
        if let Some((h, errors)) = self.ops.get(name) {
            h.record(took);
            if !ok {
                errors.fetch_add(1, Relaxed);
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&Histogram> {
        self.ops.get(name).map(|(h, _)| h)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.ops.keys().copied()
    }

    /// Summary of every operation that ran at least once.
    pub fn snapshot(&self) -> BTreeMap<String, OpStats> {
        self.ops
            .iter()
            .filter(|(_, (h, _))| h.count() > 0)
            .map(|(name, (h, errors))| {
                let stats = OpStats {
                    count: h.count(),
                    errors: errors.load(Relaxed),
                    p50_us: h.quantile_ns(0.5) as f64 / 1e3,
                    p99_us: h.quantile_ns(0.99) as f64 / 1e3,
                };
                (name.to_string(), stats)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for ns in [
            0u64,
            1,
            7,
            8,
            9,
            15,
            16,
            100,
            1_000,
            12_345,
            1_000_000,
            3_000_000_000,
        ] {
            let b = bucket_of(ns);
            assert!(b >= last, "bucket order broke at {ns}");
            last = b;
            let upper = bucket_upper(b);
            assert!(upper >= ns, "{ns} above its bucket's upper bound {upper}");
            assert!(
                upper as f64 <= ns as f64 * 1.126 + 1.0,
                "{ns} reported as {upper}"
            );
        }
    }

    #[test]
    fn quantiles_follow_the_data() {
        let h = Histogram::new();
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile_ns(0.5) as f64 / 1e3;
        let p99 = h.quantile_ns(0.99) as f64 / 1e3;
        assert!((50.0..=57.0).contains(&p50), "p50 {p50}");
        assert!((99.0..=112.0).contains(&p99), "p99 {p99}");
        assert_eq!(h.count(), 100);
        assert_eq!(h.cumulative_at(&[0.000_010, 1.0]), vec![9, 100]);
    }

    #[test]
    fn op_table_reports_only_what_ran() {
        let t = OpTable::new(&["exists", "store"]);
        t.record("exists", Duration::from_micros(3), true);
        t.record("exists", Duration::from_micros(3), false);
        t.record("nope", Duration::from_micros(3), true);
        let s = t.snapshot();
        assert_eq!(s.len(), 1);
        assert_eq!(s["exists"].count, 2);
        assert_eq!(s["exists"].errors, 1);
    }
}
