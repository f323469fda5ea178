//! The region table: the regions this server allocated on its clients' behalf, who owns each,
//! and how many keys point into each.
//!
//! A region goes back to the resource manager only when its owner is gone (it returned the
//! region, said goodbye, or its last connection closed) **and** no key references it **and**
//! no view holds a page of it (deferred freeing; holds are `holds`'). The owner letting go is [`ServerState::release`]; the last key going is
//! a delete (see `keys`); both end in `take_if_unreferenced`, under the region's own mutex.
//! How the region then reaches the resource manager is `freeing`'s.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLockReadGuard, Weak};

use maru_proto::{ErrorCode, Handle, RegionInfo, RegionRecord, WireError};

use super::eviction::RegionUsage;
use super::holds::PageRec;
use super::sessions::{session_ended, Session};
use super::{err, lock, IdMap, ServerState};
use crate::registry::RegionSlot;
use crate::reply;
use crate::resource_manager::RmCallError;

/// Mutable part of a region, behind its own mutex.
///
/// Register, delete and release take it, which makes "insert key + count it" and
/// "remove key + uncount it + maybe free" atomic with respect to "owner gone + maybe free": a
/// region is never freed under a live key.
pub(super) struct RegionState {
    /// Number of keys pointing into the region.
    pub(super) refs: u64,
    /// The owner's session is live and has not returned the region.
    pub(super) owner_live: bool,
    /// Gone from the table; on its way back to the resource manager.
    pub(super) freed: bool,
    /// Pages that a key points at or a view holds (see `holds`).
    pub(super) pages: IdMap<u32, PageRec>,
    /// Holds on pages of the region, all sessions together: a held region is not freed.
    pub(super) held: u64,
    /// Pages of the region parked for sessions that may still resume (see `parking`): they
    /// keep the region as holds do.
    pub(super) parked: u64,
}

/// A region in the server's table: allocated at the resource manager on behalf of one
/// instance's session, which owns it until it returns it or ends.
pub(crate) struct TableRegion {
    pub(super) slot: RegionSlot,
    pub(super) info: RegionInfo,
    /// The region's encoding on the wire, spliced into replies (see `reply`).
    wire: Box<[u8]>,
    pub(super) instance_id: String,
    /// The owning session's id (0: none); set again when a resumed session claims the
    /// region after a restart.
    session: AtomicU64,
    /// The owning session, for page returns.
    owner: Mutex<Weak<Session>>,
    pub(super) state: Mutex<RegionState>,
    /// Bytes, reads and pins of the region's keys (see `eviction::usage`).
    pub(super) usage: RegionUsage,
    /// The server asked its owner to give it back (see `eviction::room`).
    pub(super) asked_back: AtomicBool,
}

impl std::fmt::Debug for TableRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableRegion")
            .field("slot", &self.slot)
            .field("region_id", &self.info.handle.region_id)
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

impl TableRegion {
    /// A region found again at start-up because keys of the key index point into it; the
    /// session that owned it is gone, so it goes back with its last key.
    pub(super) fn restored(slot: RegionSlot, info: RegionInfo) -> Option<TableRegion> {
        let wire = reply::region_wire(&info)?;
        Some(TableRegion::new(slot, wire, info, None))
    }

    /// A region of `owner`'s session (`None`: a session that is gone), nothing on it yet.
    fn new(
        slot: RegionSlot,
        wire: Box<[u8]>,
        info: RegionInfo,
        owner: Option<&Arc<Session>>,
    ) -> TableRegion {
        TableRegion {
            slot,
            wire,
            instance_id: owner.map(|s| s.instance_id.clone()).unwrap_or_default(),
            session: AtomicU64::new(owner.map_or(0, |s| s.id)),
            owner: Mutex::new(owner.map_or_else(Weak::new, Arc::downgrade)),
            state: Mutex::new(RegionState {
                refs: 0,
                owner_live: owner.is_some(),
                freed: false,
                pages: IdMap::default(),
                held: 0,
                parked: 0,
            }),
            usage: RegionUsage::default(),
            asked_back: AtomicBool::new(false),
            info,
        }
    }

    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// The owning session's id (0: none).
    pub(super) fn session(&self) -> u64 {
        self.session.load(Ordering::Acquire)
    }

    /// The owning session, while it lives.
    pub(super) fn owner(&self) -> Option<Arc<Session>> {
        lock(&self.owner).upgrade()
    }

    /// Hands the region to `session` (a resumed session claiming it after a restart).
    pub(super) fn set_owner(&self, session: &Arc<Session>) {
        *lock(&self.owner) = Arc::downgrade(session);
        self.session.store(session.id, Ordering::Release);
    }
}

/// The regions of the table, by the server's slot and by the resource manager's id.
#[derive(Default)]
pub(super) struct RegionTable {
    pub(super) by_slot: IdMap<u32, Arc<TableRegion>>,
    pub(super) by_id: IdMap<u64, RegionSlot>,
}

impl RegionTable {
    pub(super) fn by_id(&self, region_id: u64) -> Option<&Arc<TableRegion>> {
        self.by_id
            .get(&region_id)
            .and_then(|s| self.by_slot.get(&s.0))
    }
}

impl ServerState {
    pub(super) fn table(&self) -> RwLockReadGuard<'_, RegionTable> {
        self.regions.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn region_by_id(&self, region_id: u64) -> Option<Arc<TableRegion>> {
        self.table().by_id(region_id).cloned()
    }

    pub fn request_region(
        &self,
        session: &Arc<Session>,
        size: u64,
    ) -> Result<Arc<TableRegion>, WireError> {
        if session.is_ended() {
            return Err(session_ended());
        }
        if size == 0 {
            return Err(err(
                ErrorCode::InvalidArgument,
                "region size must be greater than zero",
            ));
        }
        // In flight from here until the region is in the table (see `freeing`).
        let in_flight = self.alloc_gate.read().unwrap_or_else(|e| e.into_inner());
        let info = match self.alloc_from_pools(size) {
            // No region left: evict what keeps dead owners' regions alive, then try again;
            // then take one back from a live owner (see `eviction::room`).
            Err(e) if e.code() == Some(ErrorCode::PoolExhausted) => {
                let again = match self.make_room_for_region(size) {
                    true => self.alloc_from_pools(size),
                    false => Err(e),
                };
                match again {
                    Err(e) if e.code() == Some(ErrorCode::PoolExhausted) => {
                        self.take_back_region(session, size, e)
                    }
                    r => r,
                }
            }
            r => r,
        }
        .map_err(|e| e.to_wire())?;
        let region = self.insert_owned(session, info)?;
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

    /// Puts region `info` in the table as `session`'s; a region that cannot be (its
    /// description does not fit a frame, no slot number is left) goes back.
    pub(super) fn insert_owned(
        &self,
        session: &Arc<Session>,
        info: RegionInfo,
    ) -> Result<Arc<TableRegion>, WireError> {
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
        let region = Arc::new(TableRegion::new(slot, wire, info, Some(session)));
        let mut table = self.regions.write().unwrap_or_else(|e| e.into_inner());
        table.by_id.insert(region.info.handle.region_id, slot);
        table.by_slot.insert(slot.0, region.clone());
        Ok(region)
    }

    pub(super) fn alloc_from_pools(&self, size: u64) -> Result<RegionInfo, RmCallError> {
        if self.pools.is_empty() {
            return self.alloc_once(size, None);
        }
        let mut last = None;
        for pool in &self.pools {
            match self.alloc_once(size, Some(pool)) {
                Ok(info) => return Ok(info),
                // Fill first: the next pool only when this one has no room (or is unusable).
                Err(e)
                    if matches!(
                        e.code(),
                        Some(ErrorCode::PoolExhausted | ErrorCode::PoolUnhealthy)
                    ) =>
                {
                    last = Some(e)
                }
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

    /// `GiveBack`: the owner returns a region the server asked back. Answered with nothing
    /// (it travels on the watch connection), so a refusal is only logged: the region was
    /// returned already, or is not the session's.
    pub fn give_back(&self, session: &Session, region_id: u64) {
        if let Err(e) = self.return_region(session, region_id) {
            tracing::debug!(instance = %session.instance_id, "give-back refused: {}", e.message);
        }
    }

    pub(super) fn owned_region(
        &self,
        session: &Session,
        region_id: u64,
    ) -> Result<Arc<TableRegion>, WireError> {
        let region = self
            .region_by_id(region_id)
            .ok_or_else(|| err(ErrorCode::UnknownRegion, format!("no region {region_id}")))?;
        if region.session() != session.id {
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
    pub(super) fn release(&self, region: &TableRegion) {
        if let Some(h) = self.disown(region) {
            self.free_at_rm(h);
        }
    }

    /// Marks `region` as no longer owned; if no key references it either, takes it out of the
    /// table and returns its handle, for the caller to free at the resource manager.
    pub(super) fn disown(&self, region: &TableRegion) -> Option<Handle> {
        let mut st = lock(&region.state);
        st.owner_live = false;
        self.take_if_unreferenced(region, &mut st)
    }

    /// Called with the region's mutex held: if the region is unowned and unreferenced, drop
    /// it from the table and return its handle for freeing (after the mutex is released).
    pub(super) fn take_if_unreferenced(
        &self,
        region: &TableRegion,
        st: &mut RegionState,
    ) -> Option<Handle> {
        if st.owner_live || st.refs > 0 || st.held > 0 || st.parked > 0 || st.freed {
            return None;
        }
        st.freed = true;
        let mut table = self.regions.write().unwrap_or_else(|e| e.into_inner());
        lock(&self.freeing).insert(region.info.handle.region_id);
        table.by_slot.remove(&region.slot.0);
        table.by_id.remove(&region.info.handle.region_id);
        Some(region.info.handle.clone())
    }

    /// How to map region `region_id` for a descriptor request: any live region read-only,
    /// read-write only a region `session` owns and has not returned.
    pub fn descriptor_access(
        &self,
        session: &Session,
        region_id: u64,
        writable: bool,
    ) -> Result<maru_proto::Access, WireError> {
        if !writable {
            return Ok(self.get_region(region_id)?.info.access.clone());
        }
        let region = self.owned_region(session, region_id)?;
        check_live(&lock(&region.state), region_id)?;
        Ok(region.info.access.clone())
    }

    pub fn get_region(&self, region_id: u64) -> Result<Arc<TableRegion>, WireError> {
        self.region_by_id(region_id)
            .ok_or_else(|| err(ErrorCode::UnknownRegion, format!("no region {region_id}")))
    }

    pub fn write_regions(&self, out: &mut Vec<u8>, request_id: u64) {
        let table = self.table();
        let mut list: Vec<&Arc<TableRegion>> = table.by_slot.values().collect();
        list.sort_by_key(|r| r.slot);
        reply::regions(out, request_id, list.into_iter().map(|r| r.wire()));
    }

    /// Every region in the table (a snapshot; the table lock is not held afterwards, so
    /// callers may take region mutexes).
    fn all_regions(&self) -> Vec<Arc<TableRegion>> {
        let mut list: Vec<Arc<TableRegion>> = self.table().by_slot.values().cloned().collect();
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

    #[cfg(test)]
    pub fn check_ref_counts(&self) {
        use crate::registry::KeyRegistry;
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

pub(super) fn check_live(st: &RegionState, region_id: u64) -> Result<(), WireError> {
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

#[cfg(test)]
mod tests {

    use maru_proto::DeleteStatus;

    use super::*;
    use crate::registry::KeyRegistry;
    use crate::state::fixtures::*;
    use crate::state::Peer;

    #[test]
    fn deferred_freeing_waits_for_the_last_key() {
        let (st, rm, (mut peer, s, region)) = state_with_owner("a");
        let (_reader, b, _) = client(&st, "b");
        assert!(st.register(&s, &reg(b"k1", &region, 0, 10)).unwrap());
        assert!(st.register(&s, &reg(b"k2", &region, 4096, 10)).unwrap());
        assert!(!st.register(&s, &reg(b"k2", &region, 8192, 10)).unwrap());
        st.check_ref_counts();
        st.goodbye(&mut peer);
        assert!(matches!(peer, Peer::New));
        assert_eq!(rm.live().len(), 1, "keys still reference the region");
        assert!(!st.allocations()[0].owner_connected);
        assert!(st.pin(&b, b"k1").unwrap());
        assert_eq!(st.delete(b"k1"), DeleteStatus::Pinned);
        assert_eq!(st.delete(b"k2"), DeleteStatus::Deleted);
        assert_eq!(rm.live().len(), 1);
        assert!(st.unpin(&b, b"k1"));
        assert_eq!(st.delete(b"k1"), DeleteStatus::Deleted);
        assert!(rm.live().is_empty(), "last key gone: region freed");
        assert_eq!(st.delete(b"k1"), DeleteStatus::NotFound);
        assert!(st.allocations().is_empty());
    }

    #[test]
    fn returned_regions_take_no_new_keys_and_free_when_empty() {
        let (st, rm, (_p, a, r)) = state_with_owner("a");
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

    /// Writers register, delete and release concurrently; at every moment a region that has
    /// keys must still be live at the resource manager, and at the end the reference counts
    /// must match the registry.
    #[test]
    fn concurrent_register_delete_release_never_free_under_a_live_key() {
        let (st, rm, stop) = shared_state();
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
                        let (mut peer, s, r) = client_with_region(&st, &name);
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
