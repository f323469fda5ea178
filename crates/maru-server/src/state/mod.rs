//! The server's state and every operation on it, one concept per file:
//!
//! * `sessions`: hello, joining a session with its token, disconnect, goodbye, and the end of
//!   a session, which releases its regions;
//! * `regions`: the region table, ownership, reference counts, allocation, return and release
//!   (deferred freeing);
//! * `freeing`: giving regions back to the resource manager — frees that wait for it to be
//!   reachable, the reconcile that finds regions it holds for this server that the table does
//!   not know, and the shutdown that returns everything;
//! * `keys`: register, lookup, exists and delete, one key or a batch;
//! * `index`: write-through to the key index in shared memory;
//! * `restore`: the rebuild of the registry, the region table and the eviction policy from a
//!   re-attached index at start;
//! * `holds`: view holds on pages, generations, and when a page goes back to its owner;
//! * `lanes`: holds local clients take in shared memory without a round trip, which keep
//!   pages from going back as booked holds do;
//! * `parking`: pages freed during a restarted server's reconnect grace, kept from reuse
//!   until the sessions of the process before it are back or forgotten;
//! * `notices`: the page-return notices, one per owner per operation, written without ever
//!   blocking the operation (each session's outbox);
//! * `leases`: pins as leases of a session, renewed, expired by the lease clock;
//! * `stats`: counts for the stats document and the metrics;
//! * `eviction`: the recency policies, the capacity counters and the eviction of victims.
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
//! * one mutex per session over its pins (`leases`), taken before registry shard locks;
//! * `alloc_gate`: shared by allocations, exclusive for a reconcile (see `freeing`).
//!
//! Order: a region mutex may be held while taking a registry shard lock or the region table
//! lock; nothing takes a region mutex while holding either. Lookups never take a region mutex.
//! The `freeing` set's mutex is innermost (taken under the table lock, nothing under it). The
//! eviction policy's mutex is taken under a region mutex and takes only registry shard read
//! locks (see `eviction::capacity`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use maru_proto::{request_name, ErrorCode, Handle, WireError};
use maru_telemetry::OpTable;

use crate::registry::ShardedRegistry;
use crate::resource_manager::RegionSource;

pub mod eviction;
mod freeing;
mod holds;
mod index;
mod keys;
mod lanes;
mod leases;
mod notices;
mod parking;
mod regions;
mod restore;
mod resume;
mod sessions;
mod stats;

#[cfg(test)]
mod fixtures;

pub use index::IndexOpenError;
pub(crate) use index::KeyIndex;
pub(crate) use keys::Scratch;
pub use leases::PIN_TTL;
pub use restore::Restored;
pub use resume::{ResumeClaim, Resumed};
pub(crate) use sessions::Peer;

/// A map keyed by the server's own small numbers (region slots, page numbers, region ids),
/// on every lookup's and release's path: a seeded foldhash, where SipHash would cost more
/// than the rest of a page's bookkeeping.
pub(crate) type IdMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

use eviction::{Capacity, EvictionConfig};
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
    /// Live sessions by token.
    sessions: Mutex<HashMap<[u8; maru_proto::SESSION_TOKEN_LEN], SessionRec>>,
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
    /// Regions whose free at the resource manager is done, counted; a give-back waits on
    /// `region_freed` for the count to move (see `eviction::room`). Nothing else is locked
    /// while it is held.
    regions_freed: Mutex<u64>,
    region_freed: Condvar,
    /// Held shared by every allocation from its request to the resource manager until its
    /// region is in the table (or freed again); exclusively by [`ServerState::reconcile`].
    alloc_gate: RwLock<()>,
    /// An allocation's outcome is unknown: reconcile soon.
    reconcile_due: AtomicBool,
    /// How long a pin lives without renewal (`--pin-ttl`).
    pin_ttl: Duration,
    /// Pins dropped by the lease clock since start.
    pins_expired: AtomicU64,
    /// The next registration's generation (never reused).
    next_generation: AtomicU64,
    /// Pages returned to their owners since start.
    pages_returned: AtomicU64,
    /// Sessions whose notices wait for their owner to read (see `notices`).
    stalled: Mutex<Vec<Weak<sessions::Session>>>,
    /// Eviction: the policy, the watermarks and quotas, the capacity counters.
    pub(crate) capacity: Capacity,
    pub ops: OpTable,
    started: Instant,
    pub hostname: String,
    /// Open connections of any role.
    pub connections: AtomicUsize,
    /// The key index every registration writes through to (see `index`).
    index: Option<KeyIndex>,
    /// What the previous process's sessions may claim back (see `resume`).
    resume: Mutex<resume::ResumeBook>,
    /// Pages kept from reuse until those sessions are back or forgotten (see `parking`).
    parked: Mutex<parking::ParkBook>,
    /// The park book's generation bound, readable without its lock (0: nothing parks).
    park_below: AtomicU64,
    /// Holds local clients take without a round trip (see `lanes`).
    lanes: Option<lanes::Lanes>,
}

impl ServerState {
    pub fn new(
        rm: Box<dyn RegionSource>,
        pools: Vec<String>,
        hostname: String,
        pin_ttl: Duration,
    ) -> ServerState {
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
            regions_freed: Mutex::new(0),
            region_freed: Condvar::new(),
            alloc_gate: RwLock::new(()),
            reconcile_due: AtomicBool::new(false),
            pin_ttl,
            pins_expired: AtomicU64::new(0),
            next_generation: AtomicU64::new(1),
            pages_returned: AtomicU64::new(0),
            stalled: Mutex::new(Vec::new()),
            capacity: Capacity::new(EvictionConfig::default()),
            ops: OpTable::new(
                &OP_NAMES
                    .iter()
                    .map(|t| request_name(*t))
                    .collect::<Vec<_>>(),
            ),
            started: Instant::now(),
            hostname,
            connections: AtomicUsize::new(0),
            index: None,
            resume: Mutex::new(resume::ResumeBook::default()),
            parked: Mutex::new(parking::ParkBook::default()),
            park_below: AtomicU64::new(0),
            lanes: None,
        }
    }
}

impl ServerState {
    /// The same state with capacity managed as `config` says (validated by the caller).
    pub fn with_eviction(mut self, config: EvictionConfig) -> ServerState {
        self.capacity = Capacity::new(config);
        self
    }
}
