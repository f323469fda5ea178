//! Making room: the evictor's work between the watermarks (pool-wide, and per namespace over
//! its quota), the room an allocation asks for when the pool has no region left (regions of
//! owners that are gone), and the room a live owner asks for in its own regions (`MakeRoom`).
//!
//! Every step is bounded by a deadline (and each pass over the policy by its scan budget), so
//! a pool where everything is pinned costs a bounded amount of work and then an honest
//! "pool exhausted".

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use maru_proto::{ErrorCode, PageRef, RegionInfo, WireError, MAX_BATCH};

use super::capacity::Evicted;
use super::usage::{get, namespace_of};
use crate::registry::{Entry, KeyRegistry, PAGE_ALIGN};
use crate::resource_manager::RmCallError;
use crate::state::notices::Returned;
use crate::state::regions::TableRegion;
use crate::state::sessions::Session;
use crate::state::{lock, ServerState};

/// How long one allocation may spend making room before it answers "pool exhausted".
pub(crate) const ROOM_DEADLINE: Duration = Duration::from_millis(200);

/// How long a give-back waits for one owner before it asks the next region's owner too.
const ASK_NEXT_AFTER: Duration = Duration::from_millis(50);

/// What a give-back knows of a live owner's region when it chooses one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub slot: u32,
    pub len: u64,
    /// The region's last registration or read, on the use clock.
    pub last_used: u64,
    pub keys: u64,
    /// Keys of the region that are pinned, and holds on its pages: either rules it out.
    pub pinned: u64,
    pub held: u64,
    /// Asked back before and not given back yet (its owner is busy, stopped or gone).
    pub asked: bool,
}

/// The regions a give-back may take for a region of `size` bytes, best first. Never taken: a
/// region with a pinned key or a held page (its keys must stay, or its pages could not be
/// reused anyway), and a region smaller than `size` (freeing it alone makes no room, so its
/// keys would go for nothing). Then: regions not asked back already before those whose owner
/// has not answered (a stopped owner must not stall every later request); the least recently
/// used first (its keys are the ones a recency policy would evict first, so taking it costs
/// the fewest hits); fewer keys first (less to evict); then the oldest slot.
pub(crate) fn give_back_order(mut regions: Vec<Candidate>, size: u64) -> Vec<Candidate> {
    regions.retain(|c| c.pinned == 0 && c.held == 0 && c.len >= size);
    regions.sort_by_key(|c| (c.asked, c.last_used, c.keys, c.slot));
    regions
}

impl ServerState {
    /// Reads the size of the pools regions come from (the configured ones, or every pool when
    /// the resource manager chooses). Keeps the last size when it cannot be reached.
    pub(crate) fn refresh_pool_bytes(&self) {
        let Ok(rm) = self.rm.stats() else {
            return;
        };
        let total = rm
            .pools
            .iter()
            .filter(|p| self.pools.is_empty() || self.pools.contains(&p.path))
            .map(|p| p.total_bytes)
            .sum();
        self.capacity.set_pool_bytes(total);
    }

    /// One round of background eviction: while the keys hold more than the high watermark,
    /// victims go until they are below the low one; then each namespace over its quota's high
    /// mark evicts its own keys down to its low mark. Stops at `deadline`.
    pub(crate) fn evict_to_watermarks(&self, deadline: Instant) -> Evicted {
        let cap = &self.capacity;
        let mut done = Evicted::default();
        // Owners get the pages of a round in one notice each.
        let mut returned = Returned::default();
        if cap.over_high() {
            let (_, low) = cap.watermarks();
            let round = self.evict(
                deadline,
                &|_, _| true,
                &mut |_| cap.key_bytes().saturating_sub(low),
                &mut returned,
            );
            done.keys += round.keys;
            done.bytes += round.bytes;
        }
        for (name, quota) in &cap.config.quotas {
            let ns = cap.usage.namespace(name);
            let high = (*quota as f64 * cap.config.high) as u64;
            let low = (*quota as f64 * cap.config.low) as u64;
            if get(&ns.bytes) <= high {
                continue;
            }
            // Its own keys only: another namespace's keys are never touched by its quota.
            let own = |key: &[u8], _: &Entry| namespace_of(key) == name.as_bytes();
            let round = self.evict(
                deadline,
                &own,
                &mut |_| get(&ns.bytes).saturating_sub(low),
                &mut returned,
            );
            done.keys += round.keys;
            done.bytes += round.bytes;
        }
        self.send_returns(returned);
        done
    }

    /// `MakeRoom`: the session found no free page in its regions and got no new region, so up
    /// to `pages` victims of its own regions go (policy order; no pins, no holds) and their
    /// pages are its answer. Pages of keys a view still holds come back later, as notices.
    /// Bounded by [`ROOM_DEADLINE`]; an empty answer means everything left in its regions is
    /// pinned or viewed (or it owns none).
    pub(crate) fn make_room(&self, session: &Session, pages: u32) -> Vec<PageRef> {
        let want = (pages as usize).min(MAX_BATCH);
        // Pages the hold lanes no longer keep are free already.
        self.recheck_lanes();
        let own: HashSet<u32> = self
            .table()
            .by_slot
            .values()
            .filter(|r| r.session() == session.id)
            .map(|r| r.slot.0)
            .collect();
        if own.is_empty() || want == 0 || session.is_ended() {
            return Vec::new();
        }
        let deadline = Instant::now() + ROOM_DEADLINE;
        self.recheck_lanes();
        let mut returned = Returned::default();
        let average = self.capacity.average_key_bytes();
        let done = self.evict(
            deadline,
            &|_, e| own.contains(&e.region.0),
            &mut |r| want.saturating_sub(r.count_for(session.id)) as u64 * average,
            &mut returned,
        );
        let mine = returned.take_for(session.id);
        self.send_returns(returned);
        tracing::debug!(
            instance = %session.instance_id,
            keys = done.keys,
            pages = mine.len(),
            "evicted keys of the caller's own regions, to make room"
        );
        mine
    }

    /// Room for a region of `size` bytes when the pool has none: evicts the keys of regions
    /// whose owner is gone (each such region goes back to the resource manager with its last
    /// key), oldest victims first, until `size` bytes of regions have gone or nothing more
    /// can. True when some region was freed (the caller then retries its allocation).
    pub(crate) fn make_room_for_region(&self, size: u64) -> bool {
        let deadline = Instant::now() + ROOM_DEADLINE;
        // A snapshot first: region mutexes are never taken under the table lock.
        let regions: Vec<_> = self.table().by_slot.values().cloned().collect();
        let orphans: HashSet<u32> = regions
            .iter()
            .filter(|r| !lock(&r.state).owner_live)
            .map(|r| r.slot.0)
            .collect();
        if orphans.is_empty() {
            return false;
        }
        let freed_before = self.orphan_bytes(&orphans);
        // A region goes only with its last key, so victims come a full pass at a time until
        // enough regions have gone.
        let mut returned = Returned::default();
        let done = self.evict(
            deadline,
            &|_, e| orphans.contains(&e.region.0),
            &mut |_| {
                if freed_before - self.orphan_bytes(&orphans) >= size {
                    0
                } else {
                    u64::MAX
                }
            },
            &mut returned,
        );
        // (Nothing to send: the owners of these regions are gone.)
        self.send_returns(returned);
        let freed = freed_before - self.orphan_bytes(&orphans);
        tracing::debug!(
            keys = done.keys,
            region_bytes = freed,
            "evicted keys of regions whose owner is gone, to make room"
        );
        freed > 0
    }

    /// Bytes of the regions of `slots` still in the table.
    fn orphan_bytes(&self, slots: &HashSet<u32>) -> u64 {
        let table = self.table();
        slots
            .iter()
            .filter_map(|s| table.by_slot.get(s))
            .map(|r| r.info.handle.len)
            .sum()
    }

    /// Room for a region of `size` bytes taken back from live owners, when the pool has none
    /// and no region of a gone owner could be freed (see docs/ARCHITECTURE.md §8, "Giving
    /// regions back"). A caller with evictable keys of its own takes only a region used less
    /// recently than all of its own (`MakeRoom` serves it otherwise). The best region (see
    /// [`give_back_order`]) loses its keys and its owner is asked to give it back; when it
    /// has not within [`ASK_NEXT_AFTER`], the next one is asked too. The first allocation
    /// that succeeds once a region is freed is the answer; after [`ROOM_DEADLINE`], "pool
    /// exhausted" with why. `full` is the error the pool gave.
    pub(crate) fn take_back_region(
        &self,
        caller: &Session,
        size: u64,
        full: RmCallError,
    ) -> Result<RegionInfo, RmCallError> {
        let deadline = Instant::now() + ROOM_DEADLINE;
        let (mut regions, own) = self.give_back_candidates(caller.id);
        if let Some(own) = own {
            // A caller with victims of its own takes only regions used less recently than
            // every one of its own: the region granularity of least-recently-used. Its own
            // victims otherwise come first (the client asks for them next, `MakeRoom`).
            regions.retain(|c| c.last_used < own);
        }
        let mut order = give_back_order(regions, size).into_iter();
        if order.len() == 0 && own.is_some() {
            return Err(full);
        }
        let (mut asked, mut refused) = (Vec::new(), 0usize);
        let mut next_ask = Instant::now();
        // Frees counted so far: any free after this (a region given back, or anyone's) is
        // a reason to try the pool again.
        let mut seen = *lock(&self.regions_freed);
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if now >= next_ask {
                match order.next() {
                    Some(c) => {
                        match self.ask_back_region(c.slot) {
                            Some(id) => asked.push(id),
                            None => refused += 1,
                        }
                        // The next one at once while none could be asked.
                        next_ask = match asked.len() {
                            0 => now,
                            _ => now + ASK_NEXT_AFTER,
                        };
                        continue;
                    }
                    None if asked.is_empty() => break,
                    None => next_ask = deadline,
                }
            }
            let mut freed = lock(&self.regions_freed);
            while *freed == seen {
                let left = next_ask
                    .min(deadline)
                    .saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                freed = self
                    .region_freed
                    .wait_timeout(freed, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let changed = *freed != seen;
            seen = *freed;
            drop(freed);
            if changed {
                match self.alloc_from_pools(size) {
                    Err(e) if e.code() == Some(ErrorCode::PoolExhausted) => {}
                    r => {
                        tracing::debug!(asked = ?asked, "region taken back from a live owner");
                        return r;
                    }
                }
            }
        }
        let why = if asked.is_empty() {
            format!(
                "no region of a live owner can be taken back: each holds pinned keys or pages \
                 a view holds, or is smaller than the {size} bytes asked for ({refused} kept \
                 keys that were pinned or viewed meanwhile)"
            )
        } else {
            format!(
                "the owners of regions {asked:?} were asked to give them back and did not \
                 within {} ms (pages allocated and not yet stored, or an owner that does not \
                 read)",
                ROOM_DEADLINE.as_millis()
            )
        };
        // The pool's own words first (why it has no room), then why none was taken back.
        Err(match full {
            RmCallError::Remote(e) => {
                RmCallError::Remote(WireError::new(e.code, format!("{}; {why}", e.message)))
            }
            other => other,
        })
    }

    /// Every live region of another session, as a give-back sees it (one walk over the keys
    /// counts each region's pinned keys: this path runs only when the pool is full), and,
    /// when `caller`'s own regions hold keys that may be evicted now (unpinned, on a page no
    /// view holds), the oldest last use among those regions.
    fn give_back_candidates(&self, caller: u64) -> (Vec<Candidate>, Option<u64>) {
        let regions: Vec<Arc<TableRegion>> = self.table().by_slot.values().cloned().collect();
        let own: HashSet<u32> = regions
            .iter()
            .filter(|r| r.session() == caller)
            .map(|r| r.slot.0)
            .collect();
        let mut pinned: HashMap<u32, u64> = HashMap::new();
        // Pages of the caller's unpinned keys, by region: evictable unless a view holds them.
        let mut own_pages: HashMap<u32, HashSet<u32>> = HashMap::new();
        self.registry.for_each(&mut |_, e| {
            if e.pins > 0 {
                *pinned.entry(e.region.0).or_default() += 1;
            } else if own.contains(&e.region.0) {
                let page = (e.offset() / PAGE_ALIGN) as u32;
                own_pages.entry(e.region.0).or_default().insert(page);
            }
        });
        let mut own_oldest: Option<u64> = None;
        let mut candidates = Vec::new();
        // During parking an older key's page is as good as held (see `parking`).
        let park_below = self.park_below();
        for r in &regions {
            let st = lock(&r.state);
            if r.session() == caller {
                let evictable = own_pages.get(&r.slot.0).is_some_and(|pages| {
                    pages.iter().any(|p| {
                        st.pages
                            .get(p)
                            .is_none_or(|rec| rec.holds == 0 && rec.generation >= park_below)
                    })
                });
                if evictable {
                    let used = get(&r.usage.last_used);
                    own_oldest = Some(own_oldest.map_or(used, |o| o.min(used)));
                }
                continue;
            }
            let live = r.owner().is_some_and(|o| !o.is_ended());
            if !st.owner_live || st.freed || !live {
                continue;
            }
            candidates.push(Candidate {
                slot: r.slot.0,
                len: r.info.handle.len,
                last_used: get(&r.usage.last_used),
                keys: st.refs,
                pinned: pinned.get(&r.slot.0).copied().unwrap_or(0),
                // A parked page is as good as held: it cannot be given back; so is, during
                // parking, a page of an older key (evicted, it would park). Only whether the
                // count is zero matters.
                held: st.held
                    + st.parked
                    + u64::from(
                        park_below > 0 && st.pages.values().any(|rec| rec.generation < park_below),
                    ),
                asked: r.asked_back.load(Ordering::Relaxed),
            });
        }
        (candidates, own_oldest)
    }

    /// Evicts every key of the region in `slot` and, when that leaves it empty and unheld,
    /// asks its owner to give it back: the `Reclaim` notice is queued before the pages of the
    /// keys evicted here, so the owner never takes one of them for a new store before it
    /// knows the region is asked back. Returns the region's id when asked.
    fn ask_back_region(&self, slot: u32) -> Option<u64> {
        let region = self.table().by_slot.get(&slot).cloned()?;
        let owner = region.owner()?;
        let mut keys = Vec::new();
        self.registry.for_each(&mut |k, e| {
            if e.region.0 == slot && e.pins == 0 {
                keys.push(k.to_vec());
            }
        });
        let mut returned = Returned::default();
        let mut evicted = 0u64;
        for key in &keys {
            evicted += self.evict_key(key, &mut returned).is_some() as u64;
        }
        let emptied = {
            let st = lock(&region.state);
            st.refs == 0 && st.held == 0 && st.parked == 0 && st.owner_live && !st.freed
        };
        let id = region.info.handle.region_id;
        if emptied {
            region.asked_back.store(true, Ordering::Relaxed);
            self.ask_back(&owner, id);
        }
        self.send_returns(returned);
        tracing::debug!(
            region = id,
            instance = %region.instance_id,
            keys = evicted,
            asked = emptied,
            "evicted a live owner's region, to take it back"
        );
        emptied.then_some(id)
    }
}
