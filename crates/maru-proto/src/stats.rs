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

/// Per-instance usage, as the metadata server sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientStats {
    pub instance_id: String,
    pub connected: bool,
    pub connections: u64,
    pub regions: u64,
    pub bytes: u64,
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
    pub regions: u64,
    pub region_bytes: u64,
    pub clients: Vec<ClientStats>,
    /// The resource manager's pools (empty with `rm_error` set when it cannot be reached).
    pub pools: Vec<PoolStats>,
    pub rm_error: Option<String>,
    pub ops: BTreeMap<String, OpStats>,
}
