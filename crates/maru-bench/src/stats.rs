//! Samples, quantiles and the report row every measurement ends in.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Latencies of one measurement, in nanoseconds.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    ns: Vec<u64>,
    /// Wall time of the whole loop (including untimed set-up between samples is excluded by
    /// the caller): what ops/s is computed from when given.
    wall: Option<Duration>,
}

impl Samples {
    pub fn with_capacity(n: usize) -> Self {
        Samples {
            ns: Vec::with_capacity(n),
            wall: None,
        }
    }

    #[cfg(test)]
    pub fn from_ns(ns: Vec<u64>) -> Self {
        Samples { ns, wall: None }
    }

    pub fn push(&mut self, d: Duration) {
        self.ns.push(d.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// Times `f` and records it.
    pub fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.push(t.elapsed());
        out
    }

    pub fn extend(&mut self, other: &[u64]) {
        self.ns.extend_from_slice(other);
    }

    /// Forgets the first `n` samples (warm-up).
    pub fn drop_first(&mut self, n: usize) {
        self.ns.drain(..n.min(self.ns.len()));
    }

    pub fn set_wall(&mut self, wall: Duration) {
        self.wall = Some(wall);
    }

    /// p50, p99 (µs) and operations per second (from the wall time when set, else from the
    /// sum of the samples: a closed loop of one client).
    pub fn summary(&self) -> Summary {
        if self.ns.is_empty() {
            return Summary::default();
        }
        let mut s = self.ns.clone();
        s.sort_unstable();
        let q = |p: f64| s[((s.len() as f64 * p) as usize).min(s.len() - 1)] as f64 / 1e3;
        let total_ns: u128 = match self.wall {
            Some(w) => w.as_nanos(),
            None => s.iter().map(|&v| v as u128).sum(),
        };
        Summary {
            p50_us: q(0.50),
            p99_us: q(0.99),
            ops_per_s: if total_ns == 0 {
                0.0
            } else {
                s.len() as f64 * 1e9 / total_ns as f64
            },
            n: s.len(),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub p50_us: f64,
    pub p99_us: f64,
    pub ops_per_s: f64,
    pub n: usize,
}

/// One line of the report. The first ten fields say what was measured and how fast; the rest
/// say what the row was compared with and how it was measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// The Python method name (`store`, `retrieve`, …) or a named variant (`retrieve_copy`,
    /// `store_existing`, `exists_miss`, `first_retrieve_1gib`, `connect`); Redis rows use the
    /// Redis command (`GET`, `SET`, `MGET`, `EXISTS`).
    pub op: String,
    /// `tcp`, `unix`, or `shm` for rows that use no socket.
    pub transport: String,
    /// Bytes of one chunk (for `connect`: the pool size).
    pub chunk_bytes: u64,
    /// Keys per call (1 for single-key operations).
    pub batch: u32,
    /// Concurrent clients (threads, or processes when `processes`).
    pub clients: u32,
    /// Measured while another Python thread burned CPU (Python rows only).
    pub contended: bool,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Keys per second (a batch of 256 counts 256), all clients together.
    pub ops_per_s: f64,
    /// Chunk bytes moved per second at the p50 latency, where bytes move.
    pub gbps: Option<f64>,
    /// Against the row's floor: latency rows `p50 / floor_us` (1.0 = the floor, lower is
    /// better); bandwidth rows `gbps / floor_gbps` (1.0 = the floor, higher is better).
    /// Redis rows: Maru p50 / Redis p50 of the matching row (below 1: Maru is faster).
    pub ratio: Option<f64>,
    /// What `ratio` compares against, in words.
    pub floor: String,
    pub floor_us: Option<f64>,
    pub floor_gbps: Option<f64>,
    /// `rust` (maru-client), `python` (the `maru` package) or `redis`.
    pub api: String,
    /// Clients were separate processes (else threads of one process).
    pub processes: bool,
    /// Samples behind p50/p99.
    pub samples: usize,
    pub note: Option<String>,
}

impl Row {
    pub fn new(op: &str, transport: &str, chunk_bytes: u64, batch: u32, s: &Summary) -> Row {
        Row {
            op: op.to_owned(),
            transport: transport.to_owned(),
            chunk_bytes,
            batch,
            clients: 1,
            contended: false,
            p50_us: round3(s.p50_us),
            p99_us: round3(s.p99_us),
            ops_per_s: s.ops_per_s.round() * batch.max(1) as f64,
            gbps: None,
            ratio: None,
            floor: String::new(),
            floor_us: None,
            floor_gbps: None,
            api: "rust".to_owned(),
            processes: false,
            samples: s.n,
            note: None,
        }
    }

    /// A row that could not be measured here, with the reason.
    pub fn skipped(op: &str, transport: &str, chunk_bytes: u64, why: &str) -> Row {
        let mut r = Row::new(op, transport, chunk_bytes, 1, &Summary::default());
        r.note = Some(format!("skipped: {why}"));
        r
    }

    /// Sets `gbps` from `bytes` moved per operation at the p50 latency.
    pub fn with_bytes(mut self, bytes_per_op: u64) -> Row {
        if self.p50_us > 0.0 {
            self.gbps = Some(round3(bytes_per_op as f64 / (self.p50_us * 1e3)));
        }
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = Some(note.into());
        self
    }

    pub fn is_skipped(&self) -> bool {
        self.samples == 0
    }
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Four decimals: a ratio to a round trip stays above zero for calls that make none (a read
/// of the key index takes a few hundredths of a microsecond).
pub fn round4(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_rates() {
        let s = Samples::from_ns((1..=100).map(|v| v * 1000).collect());
        let m = s.summary();
        assert_eq!(m.p50_us, 51.0);
        assert_eq!(m.p99_us, 100.0);
        // 100 samples summing to 5.05 ms.
        assert!((m.ops_per_s - 100.0 / 5.05e-3).abs() < 1.0);
        let r = Row::new("store", "tcp", 1 << 20, 1, &m).with_bytes(1 << 20);
        assert!((r.gbps.unwrap() - (1u64 << 20) as f64 / 51_000.0).abs() < 1e-3);
        assert!(Samples::default().summary().p50_us == 0.0);
    }
}
