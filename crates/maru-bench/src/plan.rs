//! How many samples each kind of row takes in a run of each mode, and the keys rows use.

use std::sync::atomic::{AtomicU64, Ordering};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// How many samples each kind of row takes.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Calls per single-key row.
    pub iters: usize,
    /// Calls per batch row.
    pub batch_iters: usize,
    pub sizes: Vec<u64>,
    /// Owned region of the handlers of the single-client rows.
    pub region: u64,
    pub clients: Vec<u32>,
    /// Calls per client in the concurrency rows.
    pub conc_iters: usize,
    pub connect_pools: Vec<u64>,
    pub connect_samples: usize,
    pub cross_samples: usize,
    pub registry_keys: usize,
    pub floor_iters: usize,
    pub map_samples: usize,
}

impl Plan {
    pub fn new(mode: &'static str) -> Plan {
        let (iters, batch_iters, conc_iters, connect_samples, cross_samples, registry_keys) =
            match mode {
                "smoke" => (100, 10, 30, 1, 2, 20_000),
                "quick" => (2_000, 200, 500, 3, 5, 1_000_000),
                _ => (20_000, 2_000, 5_000, 10, 20, 1_000_000),
            };
        Plan {
            iters,
            batch_iters,
            sizes: vec![4 * KIB, 64 * KIB, MIB, 4 * MIB],
            region: 64 * MIB,
            clients: vec![1, 4, 32],
            conc_iters,
            connect_pools: vec![100 * MIB, GIB],
            connect_samples,
            cross_samples,
            registry_keys,
            floor_iters: iters,
            map_samples: match mode {
                "full" => 5,
                "quick" => 2,
                _ => 1,
            },
        }
    }
}

/// Keys look like LMCache's (`<fmt>@<model>@<world>@<worker>@<hash>`), 40 bytes each, unique
/// within a run.
pub const KEY_LEN: usize = 40;
static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

pub fn key_of(id: u64) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    let s = format!("lmcache@llama3-8b@tp1@0@{id:016x}");
    k.copy_from_slice(s.as_bytes());
    k
}

/// Reserves `n` key ids; returns the first.
pub fn next_key_ids(n: u64) -> u64 {
    NEXT_KEY.fetch_add(n, Ordering::Relaxed)
}

/// `n` fresh keys.
pub fn keys(n: usize) -> Vec<Vec<u8>> {
    let first = next_key_ids(n as u64);
    (0..n as u64).map(|i| key_of(first + i).to_vec()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fixed_length_and_unique() {
        let ks = keys(3);
        assert!(ks.iter().all(|k| k.len() == KEY_LEN));
        assert_ne!(ks[0], ks[1]);
    }
}
