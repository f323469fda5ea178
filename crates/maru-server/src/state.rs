//! The server's state and every operation on it: sessions, the region table with reference
//! counts and deferred freeing, and the key registry.
//!
//! # Locks, and why nothing waits on the resource manager
//!
//! * registry shards ([`ShardedRegistry`]): one read lock per lookup/exists;
//! * `regions` (a reader-writer lock over the region table): read for one hash probe by every
//!   lookup; written only to add or drop a region, never while talking to the resource
//!   manager (allocation happens first, the table insert after; removal happens first, the
//!   resource-manager free after);
//! * one mutex per region ([`RegionState`]), taken by register, delete and release. It makes
//!   "insert key + count it" and "remove key + uncount it + maybe free" atomic with respect to
//!   "owner gone + maybe free", so a region is never freed under a live key;
//! * `sessions`: hello, disconnect, goodbye.
//!
//! Order: a region mutex may be held while taking a registry shard lock or the region table
//! lock; nothing takes a region mutex while holding either. Lookups never take a region mutex.
//! The `freeing` set's mutex is innermost (taken under the table lock, nothing under it).
//!
//! # No region at the resource manager that the server does not know
//!
//! Every region the resource manager holds for this server is, whenever no allocation is in
//! flight, in the region table or in `freeing` (on its way back) — except after an allocation
//! whose outcome the server could not learn (the reply lost: the resource manager died after
//! logging it, the connection broke, a timeout). [`State::reconcile`] restores the invariant:
//! it waits until no allocation is in flight (`alloc_gate`: every allocation holds it shared
//! from its request until its region is in the table; the reconcile holds it exclusively),
//! takes the known set, lists the resource manager's regions of this server, and frees the
//! ones not in that set. Nothing enters the known set while the gate is held exclusively, so
//! a region listed but unknown is an orphan, never a concurrent allocation.
//!
//! Region slots are never reused, so a lookup that found an entry and then finds no region
//! for its slot knows the key was deleted (and its region freed) in between: it answers "not
//! found", which is what it would have answered a moment later.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::Instant;

use maru_proto::stats::{ClientStats, ServerStats};
use maru_proto::{
    request_name, DeleteStatus, ErrorCode, Handle, Hello, HelloOk, RegionInfo, RegionRecord,
    RegisterEntry, Role, WireError, SESSION_TOKEN_LEN,
};
use maru_telemetry::OpTable;

use crate::registry::{Entry, KeyRegistry, RegionSlot, Removal, ShardedRegistry};
use crate::reply;
use crate::rm::{RegionSource, RmCallError};

/// Every request a metadata server answers, for the op table.
pub(crate) const OP_NAMES: &[u16] = maru_proto::SERVER_REQUESTS;

fn err(code: ErrorCode, message: impl Into<String>) -> WireError {
    WireError::new(code, message)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below leaves its data consistent before anything that could
    // panic, so a poisoned lock still guards valid data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An instance's session: created by its first connection, joined by later ones with the
/// token, ended by goodbye or when its last connection drops.
pub(crate) struct Session {
    id: u64,
    instance_id: String,
    token: [u8; SESSION_TOKEN_LEN],
    ended: AtomicBool,
}

impl Session {
    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }
}

struct SessionRec {
    session: Arc<Session>,
    connections: usize,
}

/// Who is on the other end of a connection.
pub(crate) enum Peer {
    /// Nothing but a Hello is accepted yet.
    New,
    Client(Arc<Session>),
    /// An operator tool: reads only.
    Admin,
}

/// Mutable part of a region, behind its own mutex.
struct RegionState {
    /// Number of keys pointing into the region.
    refs: u64,
    /// The owner's session is live and has not returned the region.
    owner_live: bool,
    /// Gone from the table; on its way back to the resource manager.
    freed: bool,
}

pub(crate) struct Region {
    slot: RegionSlot,
    info: RegionInfo,
    /// The region's encoding on the wire, spliced into replies (see `reply`).
    wire: Box<[u8]>,
    instance_id: String,
    session: u64,
    state: Mutex<RegionState>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("slot", &self.slot)
            .field("region_id", &self.info.handle.region_id)
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

impl Region {
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }
}

#[derive(Default)]
struct RegionTable {
    by_slot: HashMap<u32, Arc<Region>>,
    by_id: HashMap<u64, RegionSlot>,
}

impl RegionTable {
    fn by_id(&self, region_id: u64) -> Option<&Arc<Region>> {
        self.by_id
            .get(&region_id)
            .and_then(|s| self.by_slot.get(&s.0))
    }
}

/// Per-connection scratch space, reused across requests so batch operations do not allocate
/// in the steady state.
#[derive(Default)]
pub(crate) struct Scratch {
    entries: Vec<Option<Entry>>,
    slots: Vec<Option<(u32, u64, u64)>>,
    table_index: HashMap<u32, u32>,
}

pub(crate) struct State {
    registry: ShardedRegistry,
    regions: RwLock<RegionTable>,
    next_slot: AtomicU32,
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
    /// region is in the table (or freed again); exclusively by [`State::reconcile`].
    alloc_gate: RwLock<()>,
    /// An allocation's outcome is unknown: reconcile soon.
    reconcile_due: AtomicBool,
    pub ops: OpTable,
    started: Instant,
    pub hostname: String,
    /// Open connections of any role.
    pub connections: AtomicUsize,
}

impl State {
    pub fn new(rm: Box<dyn RegionSource>, pools: Vec<String>, hostname: String) -> State {
        State {
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

    fn table(&self) -> RwLockReadGuard<'_, RegionTable> {
        self.regions.read().unwrap_or_else(|e| e.into_inner())
    }

    fn region_by_id(&self, region_id: u64) -> Option<Arc<Region>> {
        self.table().by_id(region_id).cloned()
    }

    // -----------------------------------------------------------------------------------------
    // Sessions

    pub fn hello(&self, peer: &mut Peer, hello: &Hello) -> Result<HelloOk, WireError> {
        if !matches!(peer, Peer::New) {
            return Err(err(
                ErrorCode::InvalidArgument,
                "this connection already said hello",
            ));
        }
        let ok = |token| HelloOk {
            server: format!("maru-server {}", env!("CARGO_PKG_VERSION")),
            hostname: self.hostname.clone(),
            session_token: token,
        };
        match hello.role {
            Role::Admin => {
                *peer = Peer::Admin;
                return Ok(ok([0; SESSION_TOKEN_LEN]));
            }
            Role::Server => return Err(err(
                ErrorCode::InvalidArgument,
                "role 'server' is for talking to a resource manager; connect as a client or admin",
            )),
            Role::Client => {}
        }
        if hello.instance_id.is_empty() {
            return Err(err(
                ErrorCode::InvalidArgument,
                "a client hello needs an instance id",
            ));
        }
        let mut sessions = lock(&self.sessions);
        let session = match (sessions.get_mut(hello.instance_id), hello.session_token) {
            (None, None) => {
                let mut token = [0u8; SESSION_TOKEN_LEN];
                getrandom::fill(&mut token).map_err(|e| {
                    err(
                        ErrorCode::Internal,
                        format!("no randomness for a session token: {e}"),
                    )
                })?;
                let session = Arc::new(Session {
                    id: self.next_session.fetch_add(1, Ordering::Relaxed),
                    instance_id: hello.instance_id.to_owned(),
                    token,
                    ended: AtomicBool::new(false),
                });
                sessions.insert(
                    hello.instance_id.to_owned(),
                    SessionRec {
                        session: session.clone(),
                        connections: 1,
                    },
                );
                session
            }
            (Some(rec), Some(token)) if constant_time_eq(&rec.session.token, &token) => {
                rec.connections += 1;
                rec.session.clone()
            }
            (Some(_), _) => {
                return Err(err(
                    ErrorCode::SessionConflict,
                    format!(
                        "instance id {:?} already has a live session; further connections must \
                         present its session token",
                        hello.instance_id
                    ),
                ))
            }
            (None, Some(_)) => {
                return Err(err(
                    ErrorCode::SessionConflict,
                    format!(
                        "instance {:?} has no live session (it ended); connect without a token \
                         to start a new one",
                        hello.instance_id
                    ),
                ))
            }
        };
        drop(sessions);
        let token = session.token;
        *peer = Peer::Client(session);
        Ok(ok(token))
    }

    /// A connection closed (for any reason). The last connection of a session ends it.
    pub fn disconnect(&self, peer: &mut Peer) {
        let Peer::Client(session) = std::mem::replace(peer, Peer::New) else {
            return;
        };
        let mut sessions = lock(&self.sessions);
        let last = match sessions.get_mut(&session.instance_id) {
            Some(rec) if rec.session.id == session.id => {
                rec.connections -= 1;
                rec.connections == 0
            }
            // Already ended by a goodbye (and maybe replaced by a newer session).
            _ => false,
        };
        if last {
            sessions.remove(&session.instance_id);
        }
        drop(sessions);
        if last {
            self.end_session(&session);
        }
    }

    /// Goodbye: the instance leaves on purpose. Its session ends for every connection.
    pub fn goodbye(&self, peer: &mut Peer) {
        let Peer::Client(session) = std::mem::replace(peer, Peer::New) else {
            *peer = Peer::New;
            return;
        };
        let mut sessions = lock(&self.sessions);
        if matches!(sessions.get(&session.instance_id), Some(rec) if rec.session.id == session.id) {
            sessions.remove(&session.instance_id);
        }
        drop(sessions);
        self.end_session(&session);
    }

    fn end_session(&self, session: &Session) {
        if session.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        let owned: Vec<Arc<Region>> = self
            .table()
            .by_slot
            .values()
            .filter(|r| r.session == session.id)
            .cloned()
            .collect();
        tracing::debug!(instance = %session.instance_id, regions = owned.len(), "session ended");
        for region in owned {
            self.release(&region);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Regions

    pub fn request_region(
        &self,
        session: &Arc<Session>,
        size: u64,
    ) -> Result<Arc<Region>, WireError> {
        if session.is_ended() {
            return Err(session_ended());
        }
        if size == 0 {
            return Err(err(
                ErrorCode::InvalidArgument,
                "region size must be greater than zero",
            ));
        }
        // In flight from here until the region is in the table (see the module docs).
        let in_flight = self.alloc_gate.read().unwrap_or_else(|e| e.into_inner());
        let info = self.alloc_from_pools(size).map_err(|e| e.to_wire())?;
        let Some(wire) = reply::region_wire(&info) else {
            self.free_at_rm(info.handle);
            return Err(err(
                ErrorCode::Internal,
                "region description does not fit a frame",
            ));
        };
        let slot = self
            .next_slot
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| s.checked_add(1))
            .map_err(|_| {
                err(
                    ErrorCode::Internal,
                    "region slot numbers exhausted; restart the server",
                )
            });
        let slot = match slot {
            Ok(s) => RegionSlot(s),
            Err(e) => {
                self.free_at_rm(info.handle);
                return Err(e);
            }
        };
        let region = Arc::new(Region {
            slot,
            wire,
            instance_id: session.instance_id.clone(),
            session: session.id,
            state: Mutex::new(RegionState {
                refs: 0,
                owner_live: true,
                freed: false,
            }),
            info,
        });
        {
            let mut table = self.regions.write().unwrap_or_else(|e| e.into_inner());
            table.by_id.insert(region.info.handle.region_id, slot);
            table.by_slot.insert(slot.0, region.clone());
        }
        drop(in_flight);
        // The session may have ended while the resource manager was allocating; its release
        // scan then ran before this insert, so release here (freeing the unused region).
        if session.is_ended() {
            self.release(&region);
            return Err(session_ended());
        }
        tracing::debug!(
            instance = %session.instance_id,
            region = region.info.handle.region_id,
            size,
            "region allocated"
        );
        Ok(region)
    }

    fn alloc_from_pools(&self, size: u64) -> Result<RegionInfo, RmCallError> {
        if self.pools.is_empty() {
            return self.alloc_once(size, None);
        }
        let mut last = None;
        for pool in &self.pools {
            match self.alloc_once(size, Some(pool)) {
                Ok(info) => return Ok(info),
                // Fill first: the next pool only when this one has no room.
                Err(e) if e.code() == Some(ErrorCode::PoolExhausted) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            RmCallError::Remote(err(ErrorCode::PoolExhausted, "no pool has room"))
        }))
    }

    /// One allocation at the resource manager. A failure other than "no room" may leave a
    /// region allocated there that the server never learns of (a lost reply, a region
    /// whose description or cleanup failed): a reconcile is then due.
    fn alloc_once(&self, size: u64, pool: Option<&str>) -> Result<RegionInfo, RmCallError> {
        let r = self.rm.alloc(size, pool);
        if let Err(e) = &r {
            if e.code() != Some(ErrorCode::PoolExhausted) {
                self.reconcile_due.store(true, Ordering::SeqCst);
            }
        }
        r
    }

    pub fn return_region(&self, session: &Session, region_id: u64) -> Result<(), WireError> {
        let region = self.owned_region(session, region_id)?;
        let was_live = {
            let st = lock(&region.state);
            st.owner_live && !st.freed
        };
        if !was_live {
            return Err(err(
                ErrorCode::UnknownRegion,
                format!("region {region_id} was already returned"),
            ));
        }
        self.release(&region);
        Ok(())
    }

    fn owned_region(&self, session: &Session, region_id: u64) -> Result<Arc<Region>, WireError> {
        let region = self
            .region_by_id(region_id)
            .ok_or_else(|| err(ErrorCode::UnknownRegion, format!("no region {region_id}")))?;
        if region.session != session.id {
            return Err(err(
                ErrorCode::NotOwner,
                format!(
                    "region {region_id} belongs to instance {:?}, not {:?}",
                    region.instance_id, session.instance_id
                ),
            ));
        }
        Ok(region)
    }

    /// The owner lets go of `region`; it goes back to the resource manager now if no key
    /// references it, otherwise when the last such key is deleted.
    fn release(&self, region: &Region) {
        let to_free = {
            let mut st = lock(&region.state);
            st.owner_live = false;
            self.take_if_unreferenced(region, &mut st)
        };
        if let Some(h) = to_free {
            self.free_at_rm(h);
        }
    }

    /// Called with the region's mutex held: if the region is unowned and unreferenced, drop
    /// it from the table and return its handle for freeing (after the mutex is released).
    fn take_if_unreferenced(&self, region: &Region, st: &mut RegionState) -> Option<Handle> {
        if st.owner_live || st.refs > 0 || st.freed {
            return None;
        }
        st.freed = true;
        let mut table = self.regions.write().unwrap_or_else(|e| e.into_inner());
        lock(&self.freeing).insert(region.info.handle.region_id);
        table.by_slot.remove(&region.slot.0);
        table.by_id.remove(&region.info.handle.region_id);
        Some(region.info.handle.clone())
    }

    /// Frees a region that is not (or no longer) in the table; until that is done (or known
    /// to be done) the region stays in `freeing`.
    fn free_at_rm(&self, handle: Handle) {
        lock(&self.freeing).insert(handle.region_id);
        let done = |h: &Handle| {
            lock(&self.freeing).remove(&h.region_id);
        };
        match self.rm.free(&handle) {
            Ok(()) => {
                tracing::debug!(region = handle.region_id, "region freed");
                done(&handle);
            }
            // Already gone there (e.g. reclaimed): nothing left to do.
            Err(RmCallError::Remote(e))
                if matches!(e.code, ErrorCode::DoubleFree | ErrorCode::UnknownRegion) =>
            {
                tracing::warn!(
                    region = handle.region_id,
                    "region already freed at the resource manager: {e}"
                );
                done(&handle);
            }
            Err(e) => {
                tracing::warn!(
                    region = handle.region_id,
                    "cannot free region now, will retry: {e}"
                );
                lock(&self.pending_free).push(handle);
            }
        }
    }

    /// Retries frees that failed earlier. Returns how many are still pending.
    pub fn retry_pending_frees(&self) -> usize {
        let pending = std::mem::take(&mut *lock(&self.pending_free));
        for h in pending {
            self.free_at_rm(h);
        }
        lock(&self.pending_free).len()
    }

    /// Checks the resource manager is there; logs when that changes.
    pub fn ping_rm(&self, was_up: bool) -> bool {
        match self.rm.ping() {
            Ok(()) => {
                if !was_up {
                    tracing::info!("resource manager reachable");
                }
                true
            }
            Err(e) => {
                if was_up {
                    tracing::warn!("{e}");
                }
                false
            }
        }
    }

    /// Whether an allocation's outcome was unknown since the last reconcile.
    pub fn reconcile_due(&self) -> bool {
        self.reconcile_due.load(Ordering::SeqCst)
    }

    /// Frees every region the resource manager holds for this server that the server does
    /// not know (see the module docs); returns how many it found. Waits for allocations in
    /// flight to finish (each is bounded by the resource manager's timeout) and holds new
    /// ones back for one list request.
    pub fn reconcile(&self) -> Result<usize, RmCallError> {
        self.reconcile_due.store(false, Ordering::SeqCst);
        let orphans: Vec<Handle> = {
            let _quiet = self.alloc_gate.write().unwrap_or_else(|e| e.into_inner());
            // The known set first: with no allocation in flight nothing enters it, so a
            // region the list shows outside it was never known (regions leave the table only
            // through `freeing`, and `freeing` only once their free is done).
            let mut known: HashSet<u64> = self.table().by_id.keys().copied().collect();
            known.extend(lock(&self.freeing).iter().copied());
            let listed = match self.rm.list_owned() {
                Ok(l) => l,
                Err(e) => {
                    if matches!(e, RmCallError::Unreachable { .. }) {
                        // Try again on the next maintenance pass.
                        self.reconcile_due.store(true, Ordering::SeqCst);
                    }
                    return Err(e);
                }
            };
            listed
                .into_iter()
                .filter(|h| !known.contains(&h.region_id))
                .collect()
        };
        for h in &orphans {
            tracing::warn!(
                region = h.region_id,
                len = h.len,
                "the resource manager holds a region of this server the server does not know \
                 (an allocation whose reply was lost); freeing it"
            );
            self.free_at_rm(h.clone());
        }
        Ok(orphans.len())
    }

    /// Shutdown: every region goes back to the resource manager, keys or not.
    pub fn free_everything(&self) {
        let all: Vec<Arc<Region>> = {
            let mut table = self.regions.write().unwrap_or_else(|e| e.into_inner());
            lock(&self.freeing).extend(table.by_id.keys().copied());
            table.by_id.clear();
            table.by_slot.drain().map(|(_, r)| r).collect()
        };
        for region in all {
            let free = {
                let mut st = lock(&region.state);
                !std::mem::replace(&mut st.freed, true)
            };
            if free {
                self.free_at_rm(region.info.handle.clone());
            }
        }
        self.retry_pending_frees();
    }

    pub fn get_region(&self, region_id: u64) -> Result<Arc<Region>, WireError> {
        self.region_by_id(region_id)
            .ok_or_else(|| err(ErrorCode::UnknownRegion, format!("no region {region_id}")))
    }

    pub fn write_regions(&self, out: &mut Vec<u8>, request_id: u64) {
        let table = self.table();
        let mut list: Vec<&Arc<Region>> = table.by_slot.values().collect();
        list.sort_by_key(|r| r.slot);
        reply::regions(out, request_id, list.into_iter().map(|r| r.wire()));
    }

    /// Every region in the table (a snapshot; the table lock is not held afterwards, so
    /// callers may take region mutexes).
    fn all_regions(&self) -> Vec<Arc<Region>> {
        let mut list: Vec<Arc<Region>> = self.table().by_slot.values().cloned().collect();
        list.sort_by_key(|r| r.slot);
        list
    }

    pub fn allocations(&self) -> Vec<RegionRecord> {
        self.all_regions()
            .into_iter()
            .map(|r| {
                let st = lock(&r.state);
                RegionRecord {
                    handle: r.info.handle.clone(),
                    instance_id: r.instance_id.clone(),
                    ref_count: st.refs,
                    owner_connected: st.owner_live,
                }
            })
            .collect()
    }

    // -----------------------------------------------------------------------------------------
    // Keys

    /// Checks one registration against the region it names (ownership, bounds) without
    /// changing anything.
    fn check_register(
        &self,
        session: &Session,
        e: &RegisterEntry,
    ) -> Result<(Arc<Region>, Entry), WireError> {
        let region = self.owned_region(session, e.region_id)?;
        let region_len = region.info.handle.len;
        let out_of_bounds = |why: String| err(ErrorCode::OutOfBounds, why);
        let entry = Entry::new(region.slot, e.offset, e.len)
            .map_err(|why| out_of_bounds(format!("region {}: {why}", e.region_id)))?;
        match e.offset.checked_add(e.len) {
            Some(end) if end <= region_len => Ok((region, entry)),
            _ => Err(out_of_bounds(format!(
                "offset {} + length {} is outside region {} of {region_len} bytes",
                e.offset, e.len, e.region_id
            ))),
        }
    }

    pub fn register(&self, session: &Session, e: &RegisterEntry) -> Result<bool, WireError> {
        if session.is_ended() {
            return Err(session_ended());
        }
        let (region, entry) = self.check_register(session, e)?;
        let mut st = lock(&region.state);
        check_live(&st, e.region_id)?;
        let new = self.registry.insert_if_absent(e.key, entry);
        st.refs += new as u64;
        Ok(new)
    }

    /// All entries are checked first; if any is invalid nothing is registered. The regions
    /// involved stay locked from the final check to the last insert, so none of them can be
    /// returned halfway through.
    pub fn batch_register(
        &self,
        session: &Session,
        entries: &[RegisterEntry],
    ) -> Result<Vec<bool>, WireError> {
        if session.is_ended() {
            return Err(session_ended());
        }
        let mut checked = Vec::with_capacity(entries.len());
        let mut regions: Vec<Arc<Region>> = Vec::new();
        for e in entries {
            let (region, entry) = self.check_register(session, e)?;
            if !regions.iter().any(|r| r.slot == region.slot) {
                regions.push(region);
            }
            checked.push(entry);
        }
        // A fixed order (by slot) so two batches over the same regions cannot deadlock.
        regions.sort_by_key(|r| r.slot);
        let mut guards: Vec<MutexGuard<'_, RegionState>> =
            regions.iter().map(|r| lock(&r.state)).collect();
        for (r, st) in regions.iter().zip(&guards) {
            check_live(st, r.info.handle.region_id)?;
        }
        let mut out = Vec::with_capacity(entries.len());
        for (e, entry) in entries.iter().zip(checked) {
            let new = self.registry.insert_if_absent(e.key, entry);
            if new {
                if let Some(i) = regions.iter().position(|r| r.slot == entry.region) {
                    guards[i].refs += 1;
                }
            }
            out.push(new);
        }
        Ok(out)
    }

    pub fn exists(&self, key: &[u8]) -> bool {
        self.registry.exists(key)
    }

    /// Writes the lookup reply for `key`.
    pub fn write_lookup(&self, out: &mut Vec<u8>, request_id: u64, key: &[u8]) {
        let Some(entry) = self.registry.lookup(key) else {
            return reply::lookup(out, request_id, None);
        };
        let table = self.table();
        match table.by_slot.get(&entry.region.0) {
            Some(r) => reply::lookup(
                out,
                request_id,
                Some((r.wire(), entry.offset(), entry.len())),
            ),
            None => reply::lookup(out, request_id, None),
        }
    }

    pub fn write_batch_lookup(
        &self,
        out: &mut Vec<u8>,
        request_id: u64,
        keys: &[&[u8]],
        scratch: &mut Scratch,
    ) {
        scratch.entries.clear();
        scratch
            .entries
            .extend(keys.iter().map(|k| self.registry.lookup(k)));
        scratch.slots.clear();
        scratch.table_index.clear();
        let table = self.table();
        let mut used: Vec<&[u8]> = Vec::new();
        for e in &scratch.entries {
            let slot = e.and_then(|e| {
                let region = table.by_slot.get(&e.region.0)?;
                let next = used.len() as u32;
                let index = *scratch.table_index.entry(e.region.0).or_insert(next);
                if index == next {
                    used.push(region.wire());
                }
                Some((index, e.offset(), e.len()))
            });
            scratch.slots.push(slot);
        }
        reply::batch_lookup(out, request_id, used.into_iter(), &scratch.slots);
    }

    pub fn delete(&self, key: &[u8]) -> DeleteStatus {
        let mut missing_region: Option<Entry> = None;
        loop {
            let Some(entry) = self.registry.lookup(key) else {
                return DeleteStatus::NotFound;
            };
            let Some(region) = self.table().by_slot.get(&entry.region.0).cloned() else {
                // Normally: deleted and its region freed since the lookup, so look again. The
                // same entry twice without a region would be a broken invariant; drop the
                // dangling key rather than loop forever.
                if missing_region.is_some_and(|m| m.same_place(&entry)) {
                    tracing::error!(region = ?entry.region, "key points into no region; dropping it");
                    return match self.registry.remove_if_unpinned(key, entry.region) {
                        Removal::Removed(_) => DeleteStatus::Deleted,
                        Removal::Pinned => DeleteStatus::Pinned,
                        Removal::NotFound | Removal::Elsewhere(_) => DeleteStatus::NotFound,
                    };
                }
                missing_region = Some(entry);
                continue;
            };
            let to_free = {
                let mut st = lock(&region.state);
                match self.registry.remove_if_unpinned(key, region.slot) {
                    Removal::NotFound => return DeleteStatus::NotFound,
                    Removal::Pinned => return DeleteStatus::Pinned,
                    // Deleted and registered again elsewhere meanwhile: start over.
                    Removal::Elsewhere(_) => continue,
                    Removal::Removed(_) => {
                        st.refs -= 1;
                        self.take_if_unreferenced(&region, &mut st)
                    }
                }
            };
            if let Some(h) = to_free {
                self.free_at_rm(h);
            }
            return DeleteStatus::Deleted;
        }
    }

    pub fn pin(&self, key: &[u8]) -> bool {
        self.registry.pin(key)
    }

    pub fn unpin(&self, key: &[u8]) -> bool {
        self.registry.unpin(key)
    }

    // -----------------------------------------------------------------------------------------
    // Stats

    /// Counts that need no resource manager (for metrics and stats).
    pub fn local_stats(&self) -> ServerStats {
        let counts = self.registry.counts();
        let mut per_instance: HashMap<String, ClientStats> = HashMap::new();
        let (regions, region_bytes) = {
            let table = self.table();
            for r in table.by_slot.values() {
                let c = per_instance
                    .entry(r.instance_id.clone())
                    .or_insert_with(|| ClientStats {
                        instance_id: r.instance_id.clone(),
                        ..ClientStats::default()
                    });
                c.regions += 1;
                c.bytes += r.info.handle.len;
            }
            (
                table.by_slot.len() as u64,
                table.by_slot.values().map(|r| r.info.handle.len).sum(),
            )
        };
        for (id, rec) in lock(&self.sessions).iter() {
            let c = per_instance
                .entry(id.clone())
                .or_insert_with(|| ClientStats {
                    instance_id: id.clone(),
                    ..ClientStats::default()
                });
            c.connected = true;
            c.connections = rec.connections as u64;
        }
        let mut clients: Vec<ClientStats> = per_instance.into_values().collect();
        clients.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        ServerStats {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            keys: counts.keys,
            bytes: counts.bytes,
            pinned_keys: counts.pinned_keys,
            regions,
            region_bytes,
            clients,
            pools: Vec::new(),
            rm_error: None,
            ops: self.ops.snapshot(),
        }
    }

    /// Full stats, with the resource manager's pools (or why they are missing).
    pub fn stats(&self) -> ServerStats {
        let mut s = self.local_stats();
        match self.rm.stats() {
            Ok(rm) => s.pools = rm.pools,
            Err(e) => s.rm_error = Some(e.to_string()),
        }
        s
    }

    /// Number of live instance sessions.
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    #[cfg(test)]
    pub fn check_ref_counts(&self) {
        for r in self.all_regions() {
            let st = lock(&r.state);
            assert_eq!(
                st.refs,
                self.registry.count_in_region(r.slot),
                "region {:?}",
                r.slot
            );
        }
    }
}

fn check_live(st: &RegionState, region_id: u64) -> Result<(), WireError> {
    if st.freed {
        return Err(err(
            ErrorCode::UnknownRegion,
            format!("no region {region_id}"),
        ));
    }
    if !st.owner_live {
        return Err(err(
            ErrorCode::NotOwner,
            format!("region {region_id} was returned; register into a region you hold"),
        ));
    }
    Ok(())
}

fn session_ended() -> WireError {
    err(
        ErrorCode::NotHandshaken,
        "this instance's session has ended (goodbye); reconnect to start a new one",
    )
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeRm;
    use std::collections::BTreeSet;

    const MIB: u64 = 1 << 20;

    fn state(pools: &[&str]) -> (State, Arc<FakeRm>) {
        let rm = Arc::new(FakeRm::default());
        let st = State::new(
            Box::new(rm.clone()),
            pools.iter().map(|p| p.to_string()).collect(),
            "test-host".into(),
        );
        (st, rm)
    }

    fn hello<'a>(instance: &'a str, token: Option<[u8; 16]>) -> Hello<'a> {
        Hello {
            role: Role::Client,
            instance_id: instance,
            host: "h",
            pid: 1,
            start_time: 0,
            session_token: token,
        }
    }

    fn client(st: &State, instance: &str) -> (Peer, Arc<Session>, [u8; 16]) {
        let mut peer = Peer::New;
        let ok = st.hello(&mut peer, &hello(instance, None)).unwrap();
        let Peer::Client(s) = &peer else {
            panic!("not a client")
        };
        let s = s.clone();
        (peer, s, ok.session_token)
    }

    fn reg<'a>(key: &'a [u8], region: &Region, offset: u64, len: u64) -> RegisterEntry<'a> {
        RegisterEntry {
            key,
            region_id: region.info.handle.region_id,
            offset,
            len,
        }
    }

    #[test]
    fn sessions_need_their_token_and_end_with_the_last_connection() {
        let (st, rm) = state(&[]);
        let (mut a1, sa, token) = client(&st, "a");
        let mut other = Peer::New;
        let e = st.hello(&mut other, &hello("a", None)).unwrap_err();
        assert_eq!(e.code, ErrorCode::SessionConflict);
        let e = st
            .hello(&mut other, &hello("a", Some([0; 16])))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::SessionConflict);
        assert!(
            matches!(other, Peer::New),
            "a refused hello changes nothing"
        );
        let mut a2 = Peer::New;
        st.hello(&mut a2, &hello("a", Some(token))).unwrap();
        let e = st.hello(&mut a2, &hello("a", Some(token))).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "second hello");

        let region = st.request_region(&sa, MIB).unwrap();
        assert_eq!(rm.live().len(), 1);
        st.disconnect(&mut a1);
        assert_eq!(
            rm.live().len(),
            1,
            "one connection of the instance is still open"
        );
        st.disconnect(&mut a2);
        assert!(
            rm.live().is_empty(),
            "last connection gone: unreferenced region freed"
        );
        assert!(st.get_region(region.info.handle.region_id).is_err());
        // A new session may start under the same instance id, but not with the old token.
        let mut late = Peer::New;
        let e = st.hello(&mut late, &hello("a", Some(token))).unwrap_err();
        assert_eq!(e.code, ErrorCode::SessionConflict);
        client(&st, "a");
    }

    #[test]
    fn deferred_freeing_waits_for_the_last_key() {
        let (st, rm) = state(&[]);
        let (mut peer, s, _) = client(&st, "a");
        let region = st.request_region(&s, MIB).unwrap();
        assert!(st.register(&s, &reg(b"k1", &region, 0, 10)).unwrap());
        assert!(st.register(&s, &reg(b"k2", &region, 4096, 10)).unwrap());
        assert!(!st.register(&s, &reg(b"k2", &region, 8192, 10)).unwrap());
        st.check_ref_counts();
        st.goodbye(&mut peer);
        assert!(matches!(peer, Peer::New));
        assert_eq!(rm.live().len(), 1, "keys still reference the region");
        assert!(!st.allocations()[0].owner_connected);
        assert!(st.pin(b"k1"));
        assert_eq!(st.delete(b"k1"), DeleteStatus::Pinned);
        assert_eq!(st.delete(b"k2"), DeleteStatus::Deleted);
        assert_eq!(rm.live().len(), 1);
        assert!(st.unpin(b"k1"));
        assert_eq!(st.delete(b"k1"), DeleteStatus::Deleted);
        assert!(rm.live().is_empty(), "last key gone: region freed");
        assert_eq!(st.delete(b"k1"), DeleteStatus::NotFound);
        assert!(st.allocations().is_empty());
    }

    #[test]
    fn registration_is_checked_against_owner_and_bounds() {
        let (st, _rm) = state(&[]);
        let (_pa, a, _) = client(&st, "a");
        let (_pb, b, _) = client(&st, "b");
        let ra = st.request_region(&a, MIB).unwrap();
        let cases: Vec<(RegisterEntry, ErrorCode)> = vec![
            (reg(b"k", &ra, 1, 10), ErrorCode::OutOfBounds),
            (reg(b"k", &ra, 0, 0), ErrorCode::OutOfBounds),
            (reg(b"k", &ra, MIB - 4096, 4097), ErrorCode::OutOfBounds),
            (reg(b"k", &ra, MIB, 1), ErrorCode::OutOfBounds),
            (reg(b"k", &ra, u64::MAX - 4095, 10), ErrorCode::OutOfBounds),
            (
                RegisterEntry {
                    key: b"k",
                    region_id: 999,
                    offset: 0,
                    len: 1,
                },
                ErrorCode::UnknownRegion,
            ),
        ];
        for (e, code) in &cases {
            assert_eq!(st.register(&a, e).unwrap_err().code, *code, "{e:?}");
        }
        assert_eq!(
            st.register(&b, &reg(b"k", &ra, 0, 1)).unwrap_err().code,
            ErrorCode::NotOwner
        );
        assert_eq!(
            st.return_region(&b, ra.info.handle.region_id)
                .unwrap_err()
                .code,
            ErrorCode::NotOwner
        );
        // A batch with one bad entry registers nothing.
        let batch = [reg(b"x", &ra, 0, 1), reg(b"y", &ra, 3, 1)];
        assert_eq!(
            st.batch_register(&a, &batch).unwrap_err().code,
            ErrorCode::OutOfBounds
        );
        assert_eq!(st.registry.counts().keys, 0);
        assert!(st.register(&a, &reg(b"k", &ra, MIB - 4096, 4096)).unwrap());
    }

    #[test]
    fn returned_regions_take_no_new_keys_and_free_when_empty() {
        let (st, rm) = state(&[]);
        let (_p, a, _) = client(&st, "a");
        let r = st.request_region(&a, MIB).unwrap();
        let id = r.info.handle.region_id;
        assert!(st.register(&a, &reg(b"k", &r, 0, 1)).unwrap());
        st.return_region(&a, id).unwrap();
        assert_eq!(
            st.return_region(&a, id).unwrap_err().code,
            ErrorCode::UnknownRegion
        );
        assert_eq!(
            st.register(&a, &reg(b"k2", &r, 4096, 1)).unwrap_err().code,
            ErrorCode::NotOwner
        );
        assert_eq!(
            st.batch_register(&a, &[reg(b"k3", &r, 4096, 1)])
                .unwrap_err()
                .code,
            ErrorCode::NotOwner
        );
        assert_eq!(rm.live().len(), 1);
        assert_eq!(st.delete(b"k"), DeleteStatus::Deleted);
        assert!(rm.live().is_empty());
    }

    #[test]
    fn pools_fill_first_then_fall_back() {
        let (st, rm) = state(&["/p1", "/p2"]);
        rm.room.lock().unwrap().insert("/p1".into(), 2 * MIB);
        rm.room.lock().unwrap().insert("/p2".into(), MIB);
        let (_p, a, _) = client(&st, "a");
        let pools: Vec<String> = (0..3)
            .map(|_| st.request_region(&a, MIB).unwrap().info.handle.pool.clone())
            .collect();
        assert_eq!(pools, ["/p1", "/p1", "/p2"]);
        let e = st.request_region(&a, MIB).unwrap_err();
        assert_eq!(e.code, ErrorCode::PoolExhausted);
        assert_eq!(
            st.request_region(&a, 0).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
    }

    #[test]
    fn an_unreachable_rm_is_unavailable_and_frees_are_retried() {
        let (st, rm) = state(&[]);
        let (mut p, a, _) = client(&st, "a");
        st.request_region(&a, MIB).unwrap();
        rm.down.store(true, Ordering::SeqCst);
        let e = st.request_region(&a, MIB).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert!(e.message.contains("unreachable"), "{}", e.message);
        assert!(st.stats().rm_error.is_some());
        st.goodbye(&mut p);
        assert_eq!(st.retry_pending_frees(), 1);
        assert_eq!(rm.live().len(), 1);
        rm.down.store(false, Ordering::SeqCst);
        assert_eq!(st.retry_pending_frees(), 0);
        assert!(rm.live().is_empty());
        assert!(st.stats().rm_error.is_none());
    }

    #[test]
    fn stats_count_keys_regions_and_clients() {
        let (st, _rm) = state(&[]);
        let (_p, a, _) = client(&st, "a");
        let r = st.request_region(&a, MIB).unwrap();
        st.batch_register(&a, &[reg(b"x", &r, 0, 100), reg(b"y", &r, 4096, 50)])
            .unwrap();
        st.pin(b"y");
        let s = st.stats();
        assert_eq!((s.keys, s.bytes, s.pinned_keys), (2, 150, 1));
        assert_eq!((s.regions, s.region_bytes), (1, MIB));
        assert_eq!(s.clients.len(), 1);
        assert_eq!(
            (
                s.clients[0].connected,
                s.clients[0].connections,
                s.clients[0].regions
            ),
            (true, 1, 1)
        );
        assert_eq!(s.pools.len(), 1);
    }

    #[test]
    fn a_region_whose_alloc_reply_was_lost_is_found_and_freed_by_the_reconcile() {
        let (st, rm) = state(&[]);
        let (mut p, a, _) = client(&st, "a");
        let kept = st.request_region(&a, MIB).unwrap().info.handle.region_id;
        assert!(!st.reconcile_due());
        assert_eq!(st.reconcile().unwrap(), 0, "nothing unknown yet");
        rm.lose_next_reply.store(true, Ordering::SeqCst);
        let e = st.request_region(&a, MIB).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert_eq!(rm.live().len(), 2, "allocated there, unknown here");
        assert!(
            st.reconcile_due(),
            "an unknown outcome makes a reconcile due"
        );
        assert_eq!(st.reconcile().unwrap(), 1);
        assert!(!st.reconcile_due());
        assert_eq!(rm.live().into_iter().collect::<Vec<_>>(), vec![kept]);
        // "No room" is a certain answer: nothing to reconcile.
        rm.room.lock().unwrap().insert("/dev/shm/default".into(), 0);
        assert_eq!(
            st.request_region(&a, MIB).unwrap_err().code,
            ErrorCode::PoolExhausted
        );
        assert!(!st.reconcile_due());
        rm.room.lock().unwrap().clear();

        // A region whose free is pending is known: the reconcile leaves it to the retry.
        let r = st.request_region(&a, MIB).unwrap().info.handle.region_id;
        rm.down.store(true, Ordering::SeqCst);
        st.return_region(&a, r).unwrap();
        assert!(st.reconcile().is_err(), "unreachable");
        assert!(st.reconcile_due(), "tried again later");
        rm.down.store(false, Ordering::SeqCst);
        assert_eq!(st.reconcile().unwrap(), 0);
        assert!(rm.live().contains(&r));
        assert_eq!(st.retry_pending_frees(), 0);
        assert!(!rm.live().contains(&r));
        assert_eq!(
            rm.freed
                .lock()
                .unwrap()
                .iter()
                .filter(|id| **id == r)
                .count(),
            1
        );
        st.goodbye(&mut p);
        assert!(rm.live().is_empty());
    }

    /// Allocations, frees and reconciles race; a reconcile must never free a region that is
    /// being allocated or is in the table (it would find nothing unknown at all here).
    #[test]
    fn reconciles_never_free_a_region_allocated_concurrently() {
        let (st, rm) = state(&[]);
        let st = Arc::new(st);
        let stop = Arc::new(AtomicBool::new(false));
        let reconciler = {
            let (st, stop) = (st.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut runs, mut found) = (0u64, 0usize);
                while !stop.load(Ordering::SeqCst) {
                    found += st.reconcile().unwrap();
                    runs += 1;
                }
                (runs, found)
            })
        };
        let workers: Vec<_> = (0..3)
            .map(|t| {
                let st = st.clone();
                std::thread::spawn(move || {
                    for round in 0..300 {
                        let (mut peer, s, _) = client(&st, &format!("i{t}-{round}"));
                        let r = st.request_region(&s, MIB).unwrap();
                        let key = format!("k{t}-{round}");
                        assert!(st.register(&s, &reg(key.as_bytes(), &r, 0, 1)).unwrap());
                        st.request_region(&s, MIB).unwrap();
                        st.goodbye(&mut peer);
                        if round % 2 == 0 {
                            assert_eq!(st.delete(key.as_bytes()), DeleteStatus::Deleted);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        let (runs, found) = reconciler.join().unwrap();
        assert!(runs > 0);
        assert_eq!(found, 0, "a reconcile freed a region the server knew");
        let known: BTreeSet<u64> = st
            .allocations()
            .iter()
            .map(|r| r.handle.region_id)
            .collect();
        assert_eq!(known.len(), 3 * 150, "the kept keys' regions");
        assert_eq!(rm.live(), known);
    }

    /// Writers register, delete and release concurrently; at every moment a region that has
    /// keys must still be live at the resource manager, and at the end the reference counts
    /// must match the registry.
    #[test]
    fn concurrent_register_delete_release_never_free_under_a_live_key() {
        let (st, rm) = state(&[]);
        let st = Arc::new(st);
        let stop = Arc::new(AtomicBool::new(false));
        let checker = {
            let (st, rm, stop) = (st.clone(), rm.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut checks = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    // With the table read-locked no region can leave it, and a region leaves
                    // it before it is freed at the resource manager. So every key seen now
                    // must point into a region of the table, and every region of the table
                    // must still be live at the resource manager.
                    let table = st.table();
                    let live = rm.live();
                    let mut dangling = Vec::new();
                    st.registry.for_each(&mut |k, e| {
                        if !table.by_slot.contains_key(&e.region.0) {
                            dangling.push(k.to_vec());
                        }
                    });
                    assert!(dangling.is_empty(), "keys without a region: {dangling:?}");
                    for r in table.by_slot.values() {
                        let id = r.info.handle.region_id;
                        assert!(live.contains(&id), "region {id} in use but freed");
                    }
                    drop(table);
                    checks += 1;
                }
                checks
            })
        };
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let st = st.clone();
                std::thread::spawn(move || {
                    for round in 0..200 {
                        let name = format!("i{t}-{round}");
                        let (mut peer, s, _) = client(&st, &name);
                        let r = st.request_region(&s, MIB).unwrap();
                        for k in 0..20u64 {
                            let key = format!("k{}", (k + round) % 40);
                            let _ = st.register(&s, &reg(key.as_bytes(), &r, k * 4096, 10));
                        }
                        for k in 0..10u64 {
                            st.delete(format!("k{}", (k * 3 + round) % 40).as_bytes());
                        }
                        st.goodbye(&mut peer);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        assert!(checker.join().unwrap() > 0);
        st.check_ref_counts();
        // Delete everything: every region goes back.
        let mut keys = Vec::new();
        st.registry.for_each(&mut |k, _| keys.push(k.to_vec()));
        for k in keys {
            assert_eq!(st.delete(&k), DeleteStatus::Deleted);
        }
        assert!(rm.live().is_empty(), "leaked: {:?}", rm.live());
        assert!(st.allocations().is_empty());
    }
}
