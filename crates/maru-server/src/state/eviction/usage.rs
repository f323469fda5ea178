//! The counts behind capacity management: per namespace (hits, misses, evictions) and per
//! region (bytes, hits, pins on its keys, summed per owning instance by the stats).
//!
//! Everything the read path touches is a relaxed atomic: a hit costs one increment in its
//! namespace and one in its region; the default namespace's counters need no lookup, another
//! namespace's one read-locked map probe. A key's namespace is its registry prefix (a length
//! byte and the name, see `sessions::scope_of`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::super::lock;

/// Counts of one namespace.
#[derive(Debug, Default)]
pub(crate) struct NamespaceCounters {
    pub keys: AtomicU64,
    /// Bytes referenced by the namespace's keys.
    pub bytes: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    pub evicted_bytes: AtomicU64,
}

/// Counts of one region, on its owner's behalf.
#[derive(Debug, Default)]
pub(crate) struct RegionUsage {
    /// Keys in the region (its reference count, readable without the region's mutex).
    pub keys: AtomicU64,
    /// Bytes referenced by keys in the region.
    pub bytes: AtomicU64,
    /// Reads answered from the region's keys.
    pub hits: AtomicU64,
    /// When a key of the region was last registered or read, on the capacity's use clock
    /// (see [`super::Capacity::use_stamp`]): what a give-back chooses its region by.
    pub last_used: AtomicU64,
}

/// Evictions of one instance's keys. Rare, so kept under a mutex, by instance id.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Evicted {
    pub keys: u64,
    pub bytes: u64,
}

#[derive(Debug)]
pub(crate) struct Usage {
    default_ns: Arc<NamespaceCounters>,
    /// Namespaces other than the default one.
    named: RwLock<HashMap<String, Arc<NamespaceCounters>>>,
    evicted: Mutex<HashMap<String, Evicted>>,
}

impl Default for Usage {
    fn default() -> Self {
        Usage {
            default_ns: Arc::new(NamespaceCounters::default()),
            named: RwLock::new(HashMap::new()),
            evicted: Mutex::new(HashMap::new()),
        }
    }
}

pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn sub(c: &AtomicU64, n: u64) {
    // Never below zero, whatever order racing updates arrive in.
    let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

/// The namespace of a registry key: the name behind its length byte (empty for a key too
/// short to carry one, which no registered key is).
pub(crate) fn namespace_of(key: &[u8]) -> &[u8] {
    let len = key.first().copied().unwrap_or(0) as usize;
    key.get(1..1 + len).unwrap_or(&[])
}

/// A plain copy of a namespace's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NamespaceSnapshot {
    pub keys: u64,
    pub bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
}

impl NamespaceCounters {
    pub fn snapshot(&self) -> NamespaceSnapshot {
        NamespaceSnapshot {
            keys: get(&self.keys),
            bytes: get(&self.bytes),
            hits: get(&self.hits),
            misses: get(&self.misses),
            evictions: get(&self.evictions),
            evicted_bytes: get(&self.evicted_bytes),
        }
    }
}

/// A region's (keys, key bytes, hits).
pub(crate) fn usage_counts(region: &RegionUsage) -> (u64, u64, u64) {
    (get(&region.keys), get(&region.bytes), get(&region.hits))
}

/// A read answered from a region's keys at use-clock time `now` (the namespace's count is
/// the caller's).
pub(crate) fn usage_hit(region: &RegionUsage, now: u64) {
    add(&region.hits, 1);
    region.last_used.store(now, Ordering::Relaxed);
}

pub(crate) fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Usage {
    /// The counters of `namespace` (created on first use).
    pub fn namespace(&self, namespace: &str) -> Arc<NamespaceCounters> {
        self.namespace_bytes(namespace.as_bytes())
    }

    /// The counters of the namespace `key` (a registry key, behind its prefix) belongs to.
    pub fn of_key(&self, key: &[u8]) -> Arc<NamespaceCounters> {
        self.namespace_bytes(namespace_of(key))
    }

    /// The counters of the namespace named `namespace` (created on first use).
    pub fn namespace_bytes(&self, namespace: &[u8]) -> Arc<NamespaceCounters> {
        if namespace.is_empty() {
            return self.default_ns.clone();
        }
        let name = String::from_utf8_lossy(namespace);
        if let Some(c) = self
            .named
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name.as_ref())
        {
            return c.clone();
        }
        self.named
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.into_owned())
            .or_default()
            .clone()
    }

    pub fn record_eviction(&self, namespace: &NamespaceCounters, instance: &str, bytes: u64) {
        add(&namespace.evictions, 1);
        add(&namespace.evicted_bytes, bytes);
        let mut by_instance = lock(&self.evicted);
        let e = by_instance.entry(instance.to_owned()).or_default();
        e.keys += 1;
        e.bytes += bytes;
    }

    pub fn evicted_by_instance(&self) -> HashMap<String, Evicted> {
        lock(&self.evicted).clone()
    }

    /// Every namespace with counters, by name.
    pub fn namespaces(&self) -> BTreeMap<String, Arc<NamespaceCounters>> {
        let mut out: BTreeMap<String, Arc<NamespaceCounters>> = self
            .named
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.insert(String::new(), self.default_ns.clone());
        out
    }
}
