//! Statistics documents. They travel as JSON (they are read by people and dashboards, not on
//! a hot path), so fields can be added without a protocol version bump.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Count and latency summary of one operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OpStats {
    pub count: u64,
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One pool, as the resource manager reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolStats {
    pub path: String,
    /// `shm`, `fs-dax` or `dev-dax`.
    pub kind: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub align: u64,
    pub page_size: u64,
    pub regions: u64,
    pub largest_free_extent: u64,
    /// Why no region can come from the pool now (its file or device is gone), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// UUID of the pool's header (what clients check the file they map against).
    #[serde(default)]
    pub uuid: String,
    /// Bytes at the start of the pool that hold its header and are never allocated (not in
    /// `total_bytes`).
    #[serde(default)]
    pub reserved_bytes: u64,
}

/// Resource-manager statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RmStats {
    pub version: String,
    pub pools: Vec<PoolStats>,
    pub allocations: u64,
    pub allocated_bytes: u64,
    pub connected_clients: u64,
    /// Regions reclaimed from dead owners since start.
    pub reclaimed_regions: u64,
    /// Sequence number of the last write-ahead-log record.
    pub wal_seq: u64,
    pub ops: BTreeMap<String, OpStats>,
}

/// Per-instance usage, as the metadata server sees it. Key counts are of the keys in the
/// instance's regions; `hits` are reads answered from them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientStats {
    pub instance_id: String,
    pub connected: bool,
    pub connections: u64,
    pub regions: u64,
    /// Bytes of the instance's regions.
    pub bytes: u64,
    pub keys: u64,
    /// Bytes referenced by the keys in the instance's regions.
    pub key_bytes: u64,
    /// Pins the instance's sessions hold.
    pub pins: u64,
    /// View holds the instance's sessions have on pages (of any instance's regions).
    pub holds: u64,
    pub hits: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
}

/// One namespace (tenant): its keys, reads and evictions. The empty name is the default
/// namespace.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NamespaceStats {
    pub namespace: String,
    /// Byte quota (`--quota`), if any.
    pub quota: Option<u64>,
    pub keys: u64,
    pub bytes: u64,
    /// Pins held by the namespace's sessions.
    pub pins: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
}

/// How the metadata server manages capacity (its settings and where it stands).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvictionStats {
    /// `--evict-policy`.
    pub policy: String,
    /// `--evict-high` and `--evict-low`, fractions of the pool.
    pub high: f64,
    pub low: f64,
    /// Bytes of the pools regions come from (0 while unknown).
    pub pool_bytes: u64,
    /// Bytes referenced by every key, compared with the watermarks.
    pub key_bytes: u64,
    /// Keys the policy orders (every registered key).
    pub tracked_keys: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
}

/// Metadata-server statistics (`maru stats --json` prints this document).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerStats {
    pub version: String,
    pub uptime_s: f64,
    /// Number of registered keys.
    pub keys: u64,
    /// Bytes referenced by registered keys.
    pub bytes: u64,
    pub pinned_keys: u64,
    /// Pins dropped by the lease clock because their deadline passed (since start).
    #[serde(default)]
    pub pins_expired: u64,
    /// Pages freed during a restarted server's reconnect grace and kept from reuse until
    /// the previous process's sessions are back or forgotten (a view of theirs may show
    /// them).
    #[serde(default)]
    pub pages_parked: u64,
    /// Pages whose keys are gone, kept because a view holds them in a hold lane (they go back
    /// within a tick of its end).
    #[serde(default)]
    pub pages_lane_kept: u64,
    pub regions: u64,
    pub region_bytes: u64,
    pub clients: Vec<ClientStats>,
    /// The resource manager's pools (empty with `rm_error` set when it cannot be reached).
    pub pools: Vec<PoolStats>,
    pub rm_error: Option<String>,
    pub ops: BTreeMap<String, OpStats>,
    #[serde(default)]
    pub eviction: EvictionStats,
    #[serde(default)]
    pub namespaces: Vec<NamespaceStats>,
}
