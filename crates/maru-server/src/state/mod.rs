//! The server's state and every operation on it, one concept per file:
//!
//! * `sessions`: hello, joining a session with its token, disconnect, goodbye, and the end of
//!   a session, which releases its regions;
//! * `regions`: the region table, ownership, reference counts, allocation, return and release
//!   (deferred freeing);
//! * `freeing`: giving regions back to the resource manager — frees that wait for it to be
//!   reachable, the reconcile that finds regions it holds for this server that the table does
//!   not know, and the shutdown that returns everything;
//! * `keys`: register, lookup, exists, delete, pin and unpin, one key or a batch;
//! * `stats`: counts for the stats document and the metrics.
//!
//! # Locks, and why nothing waits on the resource manager
//!
//! * registry shards ([`ShardedRegistry`]): one read lock per lookup/exists;
//! * `regions` (a reader-writer lock over the region table): read for one hash probe by every
//!   lookup; written only to add or drop a region, never while talking to the resource
//!   manager (allocation happens first, the table insert after; removal happens first, the
//!   resource-manager free after);
//! * one mutex per region (`RegionState`, see `regions`), taken by register, delete and
//!   release, so a region is never freed under a live key;
//! * `sessions`: hello, disconnect, goodbye;
//! * `alloc_gate`: shared by allocations, exclusive for a reconcile (see `freeing`).
//!
//! Order: a region mutex may be held while taking a registry shard lock or the region table
//! lock; nothing takes a region mutex while holding either. Lookups never take a region mutex.
//! The `freeing` set's mutex is innermost (taken under the table lock, nothing under it).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::Instant;

use maru_proto::{request_name, ErrorCode, Handle, WireError};
use maru_telemetry::OpTable;

use crate::registry::ShardedRegistry;
use crate::resource_manager::RegionSource;

mod freeing;
mod keys;
mod regions;
mod sessions;
mod stats;

#[cfg(test)]
mod fixtures;

pub(crate) use keys::Scratch;
pub(crate) use sessions::Peer;

use regions::RegionTable;
use sessions::SessionRec;

/// Every request a metadata server answers, for the op table.
pub(crate) const OP_NAMES: &[u16] = maru_proto::SERVER_REQUESTS;

fn err(code: ErrorCode, message: impl Into<String>) -> WireError {
    WireError::new(code, message)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section of the state leaves its data consistent before anything that
    // could panic, so a poisoned lock still guards valid data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything one metadata server knows: sessions, the region table, the key registry and
/// the counts behind its stats. Shared by every connection thread.
pub(crate) struct ServerState {
    registry: ShardedRegistry,
    regions: RwLock<RegionTable>,
    /// The next region's slot; slots are never reused (see `keys`).
    next_slot: AtomicU32,
    /// Live sessions by instance id.
    sessions: Mutex<HashMap<String, SessionRec>>,
    next_session: AtomicU64,
    rm: Box<dyn RegionSource>,
    /// Pools to allocate from, in order of preference (empty: the resource manager picks).
    pools: Vec<String>,
    /// Regions whose free at the resource manager failed (it was unreachable); retried by the
    /// maintenance thread and at shutdown.
    pending_free: Mutex<Vec<Handle>>,
    /// Ids of regions out of the table whose free has not been carried out yet (in progress
    /// or pending). A region enters it before it leaves the table.
    freeing: Mutex<HashSet<u64>>,
    /// Held shared by every allocation from its request to the resource manager until its
    /// region is in the table (or freed again); exclusively by [`ServerState::reconcile`].
    alloc_gate: RwLock<()>,
    /// An allocation's outcome is unknown: reconcile soon.
    reconcile_due: AtomicBool,
    pub ops: OpTable,
    started: Instant,
    pub hostname: String,
    /// Open connections of any role.
    pub connections: AtomicUsize,
}

impl ServerState {
    pub fn new(rm: Box<dyn RegionSource>, pools: Vec<String>, hostname: String) -> ServerState {
        ServerState {
            registry: ShardedRegistry::new(),
            regions: RwLock::new(RegionTable::default()),
            next_slot: AtomicU32::new(0),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            rm,
            pools,
            pending_free: Mutex::new(Vec::new()),
            freeing: Mutex::new(HashSet::new()),
            alloc_gate: RwLock::new(()),
            reconcile_due: AtomicBool::new(false),
            ops: OpTable::new(
                &OP_NAMES
                    .iter()
                    .map(|t| request_name(*t))
                    .collect::<Vec<_>>(),
            ),
            started: Instant::now(),
            hostname,
            connections: AtomicUsize::new(0),
        }
    }
}
