//! The state's side of eviction: the policy every key operation reports to, the counters,
//! the watermarks, and [`ServerState::evict`], which takes victims out of the registry.
//!
//! Locks: the policy's mutex is innermost but for registry shard read locks (the "evictable
//! now" predicate looks a victim's entry up while the policy is locked). Register and delete
//! report to the policy while holding their region's mutex, so a key's insert and removal
//! reach the policy in the order they happened; nothing waits for a region mutex or the region
//! table lock while holding the policy (the predicate only *tries* a region's mutex, to see
//! whether a view holds the victim's page).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use super::config::EvictionConfig;
use super::usage::{add, get, namespace_of, sub, RegionUsage, Usage};
use super::{policy, EvictionPolicy};
use crate::registry::{Entry, KeyRegistry, Removal, PAGE_ALIGN};
use crate::state::notices::Returned;
use crate::state::regions::TableRegion;
use crate::state::{lock, IdMap, ServerState};

/// Victims the evictor takes per pass over the policy, and keys it may examine for them: a
/// pass holds the policy's mutex (and so delays reads that report a use) for a bounded time.
pub(crate) const VICTIMS_PER_PASS: usize = 64;
const BUDGET_PER_PASS: usize = 16 * VICTIMS_PER_PASS;

/// Everything the state keeps for capacity management.
pub(crate) struct Capacity {
    pub config: EvictionConfig,
    policy: Mutex<Box<dyn EvictionPolicy>>,
    pub usage: Usage,
    /// Bytes referenced by every key (the registry's total, kept here too so a registration
    /// can compare it with the watermark with one atomic add).
    key_bytes: AtomicU64,
    /// Bytes of the pools regions come from, as last read from the resource manager; 0 while
    /// unknown (nothing is evicted against an unknown size).
    pool_bytes: AtomicU64,
    /// Set when a registration passes the high watermark; the evictor waits on it.
    due: Mutex<bool>,
    wake: Condvar,
    stopped: AtomicBool,
    /// The use clock: one tick per registration or read that found its key, so regions can
    /// be ordered by their last use (see [`RegionUsage::last_used`]).
    clock: AtomicU64,
}

/// What one call of [`ServerState::evict`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Evicted {
    pub keys: u64,
    pub bytes: u64,
}

impl Capacity {
    /// Capacity management as `config` says; `config` must have passed
    /// [`EvictionConfig::validate`] (an unknown policy falls back to the default).
    pub fn new(config: EvictionConfig) -> Capacity {
        let chosen = policy(&config.policy).unwrap_or_else(|_| Box::new(super::Sieve::default()));
        Capacity {
            config,
            policy: Mutex::new(chosen),
            usage: Usage::default(),
            key_bytes: AtomicU64::new(0),
            pool_bytes: AtomicU64::new(0),
            due: Mutex::new(false),
            wake: Condvar::new(),
            stopped: AtomicBool::new(false),
            clock: AtomicU64::new(1),
        }
    }

    fn policy(&self) -> MutexGuard<'_, Box<dyn EvictionPolicy>> {
        lock(&self.policy)
    }

    pub fn policy_name(&self) -> &'static str {
        self.policy().name()
    }

    pub fn set_pool_bytes(&self, bytes: u64) {
        self.pool_bytes.store(bytes, Ordering::Relaxed);
    }

    pub fn pool_bytes(&self) -> u64 {
        self.pool_bytes.load(Ordering::Relaxed)
    }

    pub fn key_bytes(&self) -> u64 {
        get(&self.key_bytes)
    }

    /// Bytes above which the evictor starts, and below which it stops (0, 0 while the pool's
    /// size is unknown).
    pub fn watermarks(&self) -> (u64, u64) {
        let pool = self.pool_bytes() as f64;
        (
            (pool * self.config.high) as u64,
            (pool * self.config.low) as u64,
        )
    }

    /// Whether the keys hold more than the high watermark.
    pub fn over_high(&self) -> bool {
        let (high, _) = self.watermarks();
        high > 0 && self.key_bytes() > high
    }

    /// Wakes the evictor.
    pub fn nudge(&self) {
        *lock(&self.due) = true;
        self.wake.notify_all();
    }

    /// Stops the evictor (at shutdown).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.nudge();
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Waits until nudged or `timeout` passes; false once stopped.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut due = lock(&self.due);
        if !*due && !self.is_stopped() {
            due = self
                .wake
                .wait_timeout(due, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *due = false;
        !self.is_stopped()
    }

    /// A key registered into a region (call with the region's mutex held).
    pub fn registered(&self, key: &[u8], len: u64, region: &RegionUsage) {
        self.policy().insert(key);
        self.count_in(key, len, region);
    }

    /// Fills the policy with the keys of a rebuild at start (the order is the index's, which
    /// says nothing of their recency: the index keeps none). The counts come separately, once
    /// per region and namespace ([`Capacity::restored`]).
    pub fn load_policy<'a>(&self, keys: impl Iterator<Item = &'a [u8]>, count: usize) {
        let mut policy = self.policy();
        policy.reserve(count);
        for key in keys {
            policy.insert(key);
        }
    }

    /// Counts the keys of a rebuild at start: per region (keys, bytes), per namespace name
    /// (keys, bytes), as [`Capacity::registered`] would have one key at a time.
    pub fn restored(&self, regions: &[(&RegionUsage, u64, u64)], namespaces: &[(&[u8], u64, u64)]) {
        for (region, keys, bytes) in regions {
            add(&region.keys, *keys);
            add(&region.bytes, *bytes);
            region.last_used.store(self.use_stamp(), Ordering::Relaxed);
        }
        let mut over_quota = false;
        for (name, keys, bytes) in namespaces {
            let ns = self.usage.namespace_bytes(name);
            add(&ns.keys, *keys);
            let total = ns.bytes.fetch_add(*bytes, Ordering::Relaxed) + bytes;
            over_quota |= self
                .config
                .quotas
                .get(String::from_utf8_lossy(name).as_ref())
                .is_some_and(|q| total as f64 > *q as f64 * self.config.high);
            add(&self.key_bytes, *bytes);
        }
        if over_quota || self.over_high() {
            self.nudge();
        }
    }

    /// Keys registered together (with their regions' mutexes held), with their lengths and
    /// regions; the policy gets them in batch order.
    pub fn registered_batch(&self, added: &[(&[u8], u64, &RegionUsage)]) {
        if added.is_empty() {
            return;
        }
        let keys: Vec<&[u8]> = added.iter().map(|(k, _, _)| *k).collect();
        self.policy().insert_batch(&keys);
        for (key, len, region) in added {
            self.count_in(key, *len, region);
        }
    }

    /// The next tick of the use clock. Relaxed: racing uses may stamp a region slightly out
    /// of order, which only blurs a ranking that is approximate anyway.
    pub fn use_stamp(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn count_in(&self, key: &[u8], len: u64, region: &RegionUsage) {
        add(&region.keys, 1);
        region.last_used.store(self.use_stamp(), Ordering::Relaxed);
        add(&region.bytes, len);
        let ns = self.usage.of_key(key);
        add(&ns.keys, 1);
        let ns_total = ns.bytes.fetch_add(len, Ordering::Relaxed) + len;
        let total = self.key_bytes.fetch_add(len, Ordering::Relaxed) + len;
        let (high, _) = self.watermarks();
        let over_pool = high > 0 && total > high && total - len <= high;
        let over_quota = self
            .config
            .quotas
            .get(String::from_utf8_lossy(namespace_of(key)).as_ref())
            .is_some_and(|q| ns_total as f64 > *q as f64 * self.config.high);
        if over_pool || over_quota {
            self.nudge();
        }
    }

    /// A key gone from a region (deleted or evicted; with the region's mutex held).
    pub fn removed(&self, key: &[u8], len: u64, region: &RegionUsage) {
        self.policy().remove(key);
        sub(&region.keys, 1);
        sub(&region.bytes, len);
        let ns = self.usage.of_key(key);
        sub(&ns.keys, 1);
        sub(&ns.bytes, len);
        sub(&self.key_bytes, len);
    }

    /// A read that returned `key` from `region`.
    pub fn hit(&self, key: &[u8], region: &RegionUsage) {
        super::usage::usage_hit(region, self.use_stamp());
        add(&self.usage.of_key(key).hits, 1);
        self.policy().touch(key);
    }

    /// Hits a client answered itself and told later (views held in its hold lane), `counts[i]`
    /// of `keys[i]`: counted as its namespace's hits. Their uses come with `used`.
    pub fn hits_told(&self, keys: &[&[u8]], counts: &[u32]) {
        for (key, &n) in keys.iter().zip(counts) {
            add(&self.usage.of_key(key).hits, u64::from(n));
        }
    }

    /// A read of `key` that found nothing.
    pub fn miss(&self, key: &[u8]) {
        add(&self.usage.of_key(key).misses, 1);
    }

    /// Reads of a batch (every key of one namespace): `found[i]` is whether `keys[i]` was
    /// returned. One policy lock for the batch.
    pub fn batch_read(&self, keys: &[&[u8]], found: impl Iterator<Item = bool>) {
        let Some(first) = keys.first() else {
            return;
        };
        let ns = self.usage.of_key(first);
        let mut policy = self.policy();
        let (mut hits, mut misses) = (0, 0);
        for (key, hit) in keys.iter().zip(found) {
            if hit {
                hits += 1;
                policy.touch(key);
            } else {
                misses += 1;
            }
        }
        drop(policy);
        add(&ns.hits, hits);
        add(&ns.misses, misses);
    }

    /// Uses of `keys` that the server did not answer (reads through the key index): the
    /// policy's, without the hit counters. Keys it does not track are skipped.
    pub fn used(&self, keys: &[&[u8]]) {
        let mut policy = self.policy();
        for key in keys {
            policy.touch(key);
        }
    }

    /// A use of `key` that is no read (a pin).
    pub fn touch(&self, key: &[u8]) {
        self.policy().touch(key);
    }

    pub fn policy_len(&self) -> usize {
        self.policy().len()
    }

    /// Bytes of an average key (at least 1).
    pub fn average_key_bytes(&self) -> u64 {
        (self.key_bytes() / self.policy_len().max(1) as u64).max(1)
    }
}

impl ServerState {
    /// Evicts victims until `need` (bytes still to free, given the pages returned so far) is
    /// zero, the policy has none left that may go now, or `deadline` passes; `allow` narrows
    /// victims further (by key and entry). Pages that go back to live owners join `returned`
    /// (the caller sends them, one notice per owner).
    /// Victims are keys without pins whose page has no holds. Each pass takes about as many
    /// victims as `need` bytes make at the average key size, so the evictor stops near its
    /// target instead of a whole pass beyond it.
    ///
    /// A victim's page is handled by [`ServerState::evict_key`], the one place that decides
    /// what happens to the page of an evicted key.
    pub(crate) fn evict(
        &self,
        deadline: Instant,
        allow: &dyn Fn(&[u8], &Entry) -> bool,
        need: &mut dyn FnMut(&Returned) -> u64,
        returned: &mut Returned,
    ) -> Evicted {
        let mut done = Evicted::default();
        // A snapshot: the predicate runs under the policy's mutex, where the table lock is
        // not taken.
        let regions: IdMap<u32, Arc<TableRegion>> = self.table().by_slot.clone();
        // Passes that found nothing in a row: once they have covered every key, nothing left
        // may go now.
        let mut empty_passes = 0;
        // Read once per round: a page parking begins or ends for meanwhile is still safe
        // (an evicted key's page parks or not at its free, whatever was read here).
        let park_below = self.park_below();
        // Once per round too: a key whose view claimed its page since is evicted safely.
        let lanes = self.lane_snapshot();
        loop {
            let needed = need(returned);
            if needed == 0 || Instant::now() >= deadline {
                break;
            }
            let average = self.capacity.average_key_bytes();
            let n = needed.div_ceil(average).clamp(1, VICTIMS_PER_PASS as u64) as usize;
            let victims = self
                .capacity
                .policy()
                .pick_victims(n, BUDGET_PER_PASS, &mut |key| {
                    self.registry.lookup(key).is_some_and(|e| {
                        e.pins == 0
                            && allow(key, &e)
                            && regions.get(&e.region.0).is_none_or(|r| {
                                !page_held(r, &e, park_below) && !lanes.holds(r, &e)
                            })
                    })
                });
            if victims.is_empty() {
                empty_passes += 1;
                if empty_passes * BUDGET_PER_PASS >= self.capacity.policy_len() {
                    break;
                }
                continue;
            }
            empty_passes = 0;
            for key in victims {
                if let Some(bytes) = self.evict_key(&key, returned) {
                    done.keys += 1;
                    done.bytes += bytes;
                }
            }
        }
        done
    }

    /// Takes one victim out: the key disappears, its region's reference count drops, and its
    /// page is handled exactly as a delete handles it (a region whose owner is gone and whose
    /// last key this was goes back to the resource manager). Returns the bytes freed, or None
    /// when the key could not go after all (pinned or deleted since it was picked).
    pub(crate) fn evict_key(&self, key: &[u8], returned: &mut Returned) -> Option<u64> {
        let entry = self.registry.lookup(key)?;
        let region = self.table().by_slot.get(&entry.region.0).cloned()?;
        let to_free = {
            let mut st = lock(&region.state);
            match self.registry.remove_if_unpinned(key, region.slot) {
                Removal::Removed(e) => {
                    self.unindex(key);
                    st.refs -= 1;
                    self.capacity.removed(key, e.len(), &region.usage);
                    self.capacity.usage.record_eviction(
                        &self.capacity.usage.of_key(key),
                        &region.instance_id,
                        e.len(),
                    );
                    let returned = self.detach_key(&region, &mut st, &e);
                    (
                        returned,
                        self.take_if_unreferenced(&region, &mut st),
                        e.len(),
                    )
                }
                Removal::Pinned => {
                    // Pinned since it was picked: back into the policy, as a fresh key.
                    self.capacity.policy().insert(key);
                    return None;
                }
                Removal::NotFound | Removal::Elsewhere(_) => return None,
            }
        };
        // The page goes back to its owner once nothing holds it (as for a delete).
        if let Some(p) = to_free.0 {
            returned.add(&region, p);
        }
        if let Some(h) = to_free.1 {
            self.free_at_rm(h);
        }
        Some(to_free.2)
    }
}

/// Whether a view holds the page `entry` points at. Asked under the policy's mutex, which
/// region mutexes are taken before: so it only tries the region's mutex, and a region busy
/// right now counts as unheld (evicting a held key is safe: its page stays detached until its
/// last hold ends; it only frees nothing at once). A page of a registration older than
/// `park_below` counts as held too: freed now, it would park for the sessions that may still
/// resume (see `parking`).
fn page_held(region: &TableRegion, entry: &Entry, park_below: u64) -> bool {
    let st = match region.state.try_lock() {
        Ok(st) => st,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => return false,
    };
    let page = (entry.offset() / PAGE_ALIGN) as u32;
    st.pages
        .get(&page)
        .is_some_and(|r| (st.held > 0 && r.holds > 0) || r.generation < park_below)
}
