//! A latency histogram that processes can ship to their parent as one text line and that
//! merges exactly: buckets of 1 µs up to 1 ms, 10 µs up to 10 ms, 1 ms up to 10 s.

use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatHist {
    /// Bucket lower bound in µs → count.
    buckets: BTreeMap<u64, u64>,
    count: u64,
}

fn bucket(us: u64) -> u64 {
    match us {
        0..1_000 => us,
        1_000..10_000 => us / 10 * 10,
        _ => (us / 1_000 * 1_000).min(10_000_000),
    }
}

impl LatHist {
    pub fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        *self.buckets.entry(bucket(us)).or_default() += 1;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn merge(&mut self, other: &LatHist) {
        for (b, n) in &other.buckets {
            *self.buckets.entry(*b).or_default() += n;
        }
        self.count += other.count;
    }

    /// The `q` quantile (0..=1) in µs (the bucket's lower bound); 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (b, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return *b;
            }
        }
        self.buckets.keys().next_back().copied().unwrap_or(0)
    }

    /// `bucket:count,bucket:count,...` (empty: `-`).
    pub fn encode(&self) -> String {
        if self.buckets.is_empty() {
            return "-".into();
        }
        self.buckets
            .iter()
            .map(|(b, n)| format!("{b}:{n}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn decode(s: &str) -> Option<LatHist> {
        let mut h = LatHist::default();
        if s == "-" {
            return Some(h);
        }
        for part in s.split(',') {
            let (b, n) = part.split_once(':')?;
            let (b, n): (u64, u64) = (b.parse().ok()?, n.parse().ok()?);
            *h.buckets.entry(b).or_default() += n;
            h.count += n;
        }
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_merge_and_round_trip() {
        let mut a = LatHist::default();
        for us in 1..=100u64 {
            a.record(Duration::from_micros(us));
        }
        assert_eq!(a.quantile_us(0.5), 50);
        assert_eq!(a.quantile_us(0.99), 99);
        let mut b = LatHist::decode(&a.encode()).unwrap();
        assert_eq!(b, a);
        b.record(Duration::from_millis(5));
        b.merge(&a);
        assert_eq!(b.count(), 201);
        assert_eq!(b.quantile_us(1.0), 5000);
    }
}
