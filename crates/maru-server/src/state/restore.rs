//! The rebuild at start from a re-attached key index (docs/ARCHITECTURE.md §8 *Restart*,
//! §10): the registry, the region table, the per-region reference counts, the page records
//! and the eviction policy, from the index's entries whose regions the resource manager still
//! lists as this server's; the other entries leave the index.
//!
//! It is two passes over what the index holds, and nothing is served until both are done:
//!
//! 1. **Read.** One walk over the index in slot order. A key whose region is listed gets its
//!    registry entry at once (a region gets its slot and its description from the resource
//!    manager the first time one of its keys comes by) and is staged for the registry: hashed
//!    and copied into its shard's staging area ([`crate::registry::Staged`]).
//! 2. **Fill.** The registry is filled shard by shard from the staging area while, on a
//!    second thread, the eviction policy takes the same keys. Both are independent books
//!    (the policy only orders keys) and neither is seen by anyone yet. Reference counts, page
//!    records and usage counters are summed as the registry fills, then set once per region
//!    and namespace instead of once per key.
//!
//! Why not serve before the fill ends (clients read `exists` from the index anyway): a
//! register arriving for a key the index holds but the registry does not yet would be
//! answered "existed" while the registry lacks it, a delete or an eviction would miss it, and
//! a region's reference count would be short until the fill ended, so a delete of another key
//! could free a region under a key still being restored. Serving after the fill keeps every
//! acknowledged key served and every count right, without a second set of rules for the
//! time in between.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use maru_proto::{Handle, RegionInfo};

use super::holds::PageRec;
use super::index::{scoped, split_scoped};
use super::regions::TableRegion;
use super::{lock, IdMap, ServerState};
use crate::registry::{Entry, RegionSlot, PAGE_ALIGN};

/// What a start-up rebuild found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub keys: u64,
    pub regions: u64,
    /// Keys dropped from the index because the resource manager no longer holds their
    /// region for this server.
    pub dropped: u64,
}

/// What the rebuild keeps of each staged key beside its registry entry.
struct Kept {
    namespace: u32,
    /// Place in [`Rebuild::regions`].
    region: u32,
    generation: u64,
}

/// A region being restored: its table entry, and what its keys add up to.
struct Building {
    id: u64,
    region: Arc<TableRegion>,
    refs: u64,
    bytes: u64,
    pages: IdMap<u32, PageRec>,
}

/// The state of a rebuild between its passes.
#[derive(Default)]
struct Rebuild {
    regions: Vec<Building>,
    /// Region id → place in `regions`; `None`: the region cannot be described, its keys go.
    places: HashMap<u64, Option<u32>>,
    /// Keys that leave the index: (namespace, key behind its namespace).
    gone: Vec<(u32, Vec<u8>)>,
    max_generation: u64,
}

impl ServerState {
    /// Rebuilds the registry, the region table, the reference counts, the page records and
    /// the eviction policy from a re-attached index, keeping the keys whose regions the
    /// resource manager still holds for this server; the others are dropped from the index.
    /// Call before serving.
    pub fn restore_from_index(&self) -> Result<Restored, String> {
        let Some(ix) = &self.index else {
            return Ok(Restored::default());
        };
        // Regions of the previous process that no key names (adopted from it at the
        // resource manager, their sessions gone with it) go back at the first reconcile.
        self.reconcile_due.store(true, Ordering::SeqCst);
        let mut g = lock(&ix.inner);
        let Some(w) = g.as_mut() else {
            return Ok(Restored::default());
        };
        if w.index.is_empty() {
            // No key, but sessions that may resume may still own regions.
            if let Ok(list) = self.list_owned_at_start() {
                self.keep_for_resume(list, Vec::new());
            }
            return Ok(Restored::default());
        }
        // Keys whose regions nobody can vouch for are dropped: a key the registry does not
        // know must not stay in the index (a register would answer "existed" for it).
        let listed: HashMap<u64, Handle> = match self.list_owned_at_start() {
            Ok(list) => list.into_iter().map(|h| (h.region_id, h)).collect(),
            Err(e) => {
                tracing::warn!(
                    keys = w.index.len(),
                    "the resource manager cannot list this server's regions ({e}); the key \
                     index's keys are dropped"
                );
                HashMap::new()
            }
        };

        // Pass 1: read the index.
        //
        // A namespace's name by number, for the numbers the table gives the name today: a
        // table with a name twice (written over by hand) numbers it by its last record, so
        // keys under the other number could never be deleted from the index; they go now.
        let names: Vec<Option<&[u8]>> = (0..)
            .map_while(|ns| w.names.name(ns).map(|n| (ns, n)))
            .map(|(ns, n)| (w.names.get(n) == Some(ns)).then_some(n))
            .collect();
        let mut rb = Rebuild::default();
        let mut staged = self.registry.staging::<Kept>(w.index.len() as usize);
        let mut key_buf = Vec::with_capacity(1 + 255 + maru_proto::MAX_KEY_LEN);
        // Keys of one region tend to come in runs: the last region looked up is kept.
        let mut last: Option<(u64, Option<u32>)> = None;
        let mut failed: Option<String> = None;
        w.index.for_each(|ns, key, found| {
            let region_id = u64::from(found.location.region);
            let name = names.get(ns as usize).copied().flatten();
            let (Some(name), Some(handle)) = (name, listed.get(&region_id)) else {
                rb.gone.push((ns, key.to_vec()));
                return;
            };
            let place = match last {
                Some((id, place)) if id == region_id => place,
                _ => {
                    let place = match rb.places.get(&region_id) {
                        Some(p) => *p,
                        None => match self.restore_region(handle) {
                            Ok(region) => {
                                rb.regions.push(Building {
                                    id: region_id,
                                    region: Arc::new(region),
                                    refs: 0,
                                    bytes: 0,
                                    pages: IdMap::default(),
                                });
                                let p = Some((rb.regions.len() - 1) as u32);
                                rb.places.insert(region_id, p);
                                p
                            }
                            Err(e) => {
                                failed = failed.take().or(e);
                                rb.places.insert(region_id, None);
                                None
                            }
                        },
                    };
                    last = Some((region_id, place));
                    place
                }
            };
            let slot = place.map(|p| rb.regions[p as usize].region.slot);
            let entry = slot.and_then(|slot| {
                Entry::new(slot, found.location.offset, u64::from(found.location.len)).ok()
            });
            let (Some(place), Some(entry)) = (place, entry) else {
                rb.gone.push((ns, key.to_vec()));
                return;
            };
            key_buf.clear();
            scoped(name, key, &mut key_buf);
            let kept = Kept {
                namespace: ns,
                region: place,
                generation: found.generation,
            };
            self.registry.stage(&mut staged, &key_buf, entry, kept);
        });
        if let Some(e) = failed {
            return Err(e);
        }

        // Within the reconnect grace, the regions of sessions that may resume stay: the
        // adopted ones no key names, and the restored ones (kept as if owned until claimed
        // or until the grace ends).
        let unnamed: Vec<Handle> = listed
            .iter()
            .filter(|(id, _)| !rb.places.contains_key(id))
            .map(|(_, h)| h.clone())
            .collect();
        let restored_ids: Vec<u64> = rb.places.keys().copied().collect();
        let keep = self.keep_for_resume(unnamed, restored_ids);

        // Pass 2: fill the registry, and the policy beside it.
        let mut namespaces: HashMap<u32, (u64, u64)> = HashMap::new();
        std::thread::scope(|s| {
            let policy = std::thread::Builder::new()
                .name("maru-restore-policy".into())
                .spawn_scoped(s, || {
                    self.capacity.load_policy(staged.keys(), staged.len());
                });
            self.registry.load(&staged, |key, entry, kept, stored| {
                if !stored {
                    // Cannot happen (the index holds a key once, and a name has one number);
                    // should it, the registry's key stays and the other leaves the index.
                    rb.gone.push((kept.namespace, split_scoped(key).1.to_vec()));
                    return;
                }
                let b = &mut rb.regions[kept.region as usize];
                b.refs += 1;
                b.bytes += entry.len();
                let rec = b
                    .pages
                    .entry((entry.offset() / PAGE_ALIGN) as u32)
                    .or_default();
                rec.keys += 1;
                // The latest registration at the page.
                rec.generation = rec.generation.max(kept.generation);
                rb.max_generation = rb.max_generation.max(kept.generation);
                let ns = namespaces.entry(kept.namespace).or_default();
                ns.0 += 1;
                ns.1 += entry.len();
            });
            if let Err(e) = policy {
                // No second thread to be had: the policy fills after the registry.
                tracing::debug!("restoring the eviction policy on this thread ({e})");
                self.capacity.load_policy(staged.keys(), staged.len());
            }
        });
        drop(staged);

        let mut done = Restored::default();
        let usage: Vec<(&_, u64, u64)> = rb
            .regions
            .iter()
            .map(|b| (&b.region.usage, b.refs, b.bytes))
            .collect();
        let named: Vec<(&[u8], u64, u64)> = namespaces
            .iter()
            .filter_map(|(ns, &(keys, bytes))| Some((w.names.name(*ns)?, keys, bytes)))
            .collect();
        self.capacity.restored(&usage, &named);
        drop(usage);
        // Region mutexes come before the table lock (see the state's lock order).
        for b in &mut rb.regions {
            let mut st = lock(&b.region.state);
            st.owner_live = keep;
            st.refs = b.refs;
            st.pages = std::mem::take(&mut b.pages);
            done.keys += b.refs;
            done.regions += 1;
        }
        {
            let mut table = self.regions.write().unwrap_or_else(|e| e.into_inner());
            table.by_id.reserve(rb.regions.len());
            table.by_slot.reserve(rb.regions.len());
            for b in rb.regions.drain(..) {
                table.by_id.insert(b.id, b.region.slot);
                table.by_slot.insert(b.region.slot.0, b.region);
            }
        }
        for (ns, key) in &rb.gone {
            w.index.remove(*ns, key);
        }
        done.dropped = rb.gone.len() as u64;
        self.next_generation
            .fetch_max(rb.max_generation + 1, Ordering::Relaxed);
        if keep {
            // Every restored registration may be under a view of a session not back yet.
            self.start_parking(self.next_generation.load(Ordering::Relaxed));
        }
        Ok(done)
    }

    /// A listed region that keys of the index name, with a fresh slot; `Err(None)`: the
    /// resource manager cannot describe it (its keys are dropped), `Err(Some(why))`: the
    /// rebuild cannot go on.
    fn restore_region(&self, handle: &Handle) -> Result<TableRegion, Option<String>> {
        let info = match self.rm.access(handle) {
            Ok(access) => RegionInfo {
                handle: handle.clone(),
                access,
            },
            Err(e) => {
                tracing::warn!(
                    region = handle.region_id,
                    "cannot describe a region of the key index ({e}); its keys are dropped"
                );
                return Err(None);
            }
        };
        let slot = RegionSlot(self.next_slot.fetch_add(1, Ordering::Relaxed));
        TableRegion::restored(slot, info)
            .ok_or_else(|| Some(format!("region {} does not fit a frame", handle.region_id)))
    }

    /// The resource manager's list of this server's regions, at start. A predecessor that
    /// is still going away (its process exiting) holds the server's identity for a moment
    /// and the resource manager refuses it to anyone else meanwhile: that refusal is
    /// retried for a bounded time, since giving up would drop the index's keys.
    pub(super) fn list_owned_at_start(&self) -> Result<Vec<Handle>, crate::RmCallError> {
        const PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            match self.rm.list_owned() {
                Err(e)
                    if e.code() == Some(maru_proto::ErrorCode::SessionConflict)
                        && std::time::Instant::now() < deadline =>
                {
                    tracing::info!("{e}; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::registry::KeyRegistry;
    use crate::state::fixtures::*;

    /// Per region id: reference count, page records (keys), usage (keys, bytes).
    type Books = BTreeMap<u64, (u64, BTreeMap<u32, u32>, (u64, u64))>;

    /// Generations of the page records, by (region id, page).
    fn page_generations(st: &ServerState) -> BTreeMap<(u64, u32), u64> {
        let mut out = BTreeMap::new();
        for r in st.table().by_slot.values() {
            for (&n, p) in lock(&r.state).pages.iter() {
                out.insert((r.info.handle.region_id, n), p.generation);
            }
        }
        out
    }

    fn books(st: &ServerState) -> Books {
        st.table()
            .by_slot
            .values()
            .map(|r| {
                let s = lock(&r.state);
                let pages = s
                    .pages
                    .iter()
                    .filter(|(_, p)| p.keys > 0)
                    .map(|(&n, p)| (n, p.keys))
                    .collect();
                let (keys, bytes, _) = crate::state::eviction::usage_counts(&r.usage);
                (r.info.handle.region_id, (s.refs, pages, (keys, bytes)))
            })
            .collect()
    }

    fn namespace_counts(st: &ServerState, name: &str) -> (u64, u64) {
        let n = st.capacity.usage.namespace(name).snapshot();
        (n.keys, n.bytes)
    }

    /// A rebuild restores exactly the books registrations kept: reference counts, page
    /// records with the latest generation of each page, usage per region and namespace,
    /// the policy's keys, and generations that keep growing; restored keys delete and evict
    /// like registered ones.
    #[test]
    fn a_rebuild_restores_the_books_registrations_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = index_config(&dir, 10_000, 1 << 20);
        let (st, rm) = indexed_state(&cfg);
        let (_p, a, r1) = client_with_region(&st, "a");
        let r2 = st.request_region(&a, MIB).unwrap();
        let mut keys = Vec::new();
        for i in 0..600u64 {
            // Several keys per page, so a page's generation is the latest of several.
            let (ns, region) = if i % 3 == 0 {
                (&b"tenant"[..], &r2)
            } else {
                (&b""[..], &r1)
            };
            let k = key_in(ns, format!("a key of some length, number {i}").as_bytes());
            let at = (i % 64) * 4096;
            assert!(st.register(&a, &reg(&k, region, at, 1 + i % 7)).unwrap());
            keys.push(k);
        }
        for k in keys.iter().step_by(5) {
            assert_eq!(st.delete(k), maru_proto::DeleteStatus::Deleted);
        }
        let before = books(&st);
        let counts = st.registry.counts();
        let ns_before = (namespace_counts(&st, ""), namespace_counts(&st, "tenant"));
        // A page's record carries the latest registration at it; once that key is gone the
        // index no longer knows its generation, so a rebuilt page carries the latest of the
        // keys still there.
        let reader = maru_index::IndexReader::open(&cfg.path).unwrap();
        let tenant = st.index_info("tenant").unwrap().namespace;
        let mut latest: BTreeMap<(u64, u32), u64> = BTreeMap::new();
        for k in &keys {
            let (name, key) = split_scoped(k);
            let ns = if name.is_empty() { 0 } else { tenant };
            if let Some(f) = reader.lookup(ns, key) {
                let at = (
                    u64::from(f.location.region),
                    (f.location.offset / 4096) as u32,
                );
                let g = latest.entry(at).or_default();
                *g = (*g).max(f.generation);
            }
        }
        let newest = *latest.values().max().unwrap();
        st.shut_down_regions();

        let st2 = restarted_state(&rm, &cfg);
        let restored = st2.restore_from_index().unwrap();
        assert_eq!(
            restored,
            Restored {
                keys: counts.keys,
                regions: 2,
                dropped: 0
            }
        );
        assert_eq!(books(&st2), before);
        assert_eq!(page_generations(&st2), latest);
        assert_eq!(st2.registry.counts(), counts);
        assert_eq!(st2.capacity.policy_len() as u64, counts.keys);
        assert_eq!(st2.capacity.key_bytes(), counts.bytes);
        assert_eq!(
            (namespace_counts(&st2, ""), namespace_counts(&st2, "tenant")),
            ns_before
        );
        st2.check_ref_counts();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(st2.registry.exists(k), i % 5 != 0, "key {i}");
        }
        // Restored keys leave like registered ones, and the policy knows them.
        let mut returned = crate::state::notices::Returned::default();
        assert!(st2.evict_key(&keys[1], &mut returned).is_some());
        assert_eq!(st2.delete(&keys[2]), maru_proto::DeleteStatus::Deleted);
        assert_eq!(st2.capacity.policy_len() as u64, counts.keys - 2);
        st2.check_ref_counts();
        // New registrations get generations past every restored one.
        let (_p, b, r3) = client_with_region(&st2, "b");
        let k = key_in(b"", b"after the restart");
        assert!(st2.register(&b, &reg(&k, &r3, 0, 1)).unwrap());
        assert!(st2.find_and_hold(None, &k).unwrap().generation > newest);
    }

    /// Two namespace numbers of one name (a namespace table written twice over) make two
    /// index keys one registry key: the one under the number the table gives the name stays
    /// (a delete reaches it), the other leaves the index, and the books count the key once.
    #[test]
    fn a_key_the_index_holds_twice_is_restored_once() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let cfg = index_config(&dir, 100, 64 << 10);
        let (st, rm) = indexed_state(&cfg);
        let (_p, a, r1) = client_with_region(&st, "a");
        let k = key_in(b"tenant", b"the key");
        assert!(st.register(&a, &reg(&k, &r1, 4096, 10)).unwrap());
        st.shut_down_regions();
        let ns_file = crate::registry::Namespaces::path_for(&cfg.path);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&ns_file)
            .unwrap();
        f.write_all(b"\x06tenant").unwrap();
        drop(f);
        {
            let (mut w, _) = maru_index::IndexWriter::open(&cfg.path).unwrap();
            let at = w.lookup(1, b"the key").unwrap().location;
            assert!(matches!(
                w.insert_if_absent(2, b"the key", at),
                Ok(maru_index::Inserted::New(_))
            ));
        }
        let st2 = restarted_state(&rm, &cfg);
        let restored = st2.restore_from_index().unwrap();
        assert_eq!((restored.keys, restored.dropped), (1, 1));
        assert_eq!(st2.registry.counts().keys, 1);
        assert_eq!(st2.capacity.policy_len(), 1);
        assert_eq!(namespace_counts(&st2, "tenant"), (1, 10));
        st2.check_ref_counts();
        let reader = maru_index::IndexReader::open(&cfg.path).unwrap();
        assert_eq!(reader.len(), 1);
        // The key deletes cleanly: nothing of it is left in either book.
        assert_eq!(st2.delete(&k), maru_proto::DeleteStatus::Deleted);
        assert_eq!(reader.len(), 0);
        assert_eq!(st2.capacity.policy_len(), 0);
    }
}

#[cfg(test)]
mod timing {
    use std::time::Instant;

    use super::*;
    use crate::state::fixtures::*;
    use crate::state::KeyIndex;

    /// CPU time of the whole process (the rebuild uses a second thread).
    fn process_cpu() -> std::time::Duration {
        // SAFETY: `rusage` is plain integers, for which all zeroes is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is writable storage of the right type for getrusage to fill.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let tv = |t: libc::timeval| {
            std::time::Duration::from_secs(t.tv_sec as u64)
                + std::time::Duration::from_micros(t.tv_usec as u64)
        };
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }

    /// Where a restart of 1M keys spends its time (run by hand:
    /// `cargo test --release -p maru-server --lib one_million -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn one_million_keys_restart_phases() {
        let dir = tempfile::tempdir().unwrap();
        let n = 1_000_000u64;
        let cfg = index_config(&dir, n + 1000, (n + 1000) * 48);
        let (st, rm) = indexed_state(&cfg);
        let (_p, a, r) = client_with_region(&st, "a");
        let keys: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let mut k = vec![0u8];
                k.extend_from_slice(format!("lmcache@llama3-8b@tp1@0@{i:016x}").as_bytes());
                k
            })
            .collect();
        let t = Instant::now();
        // Much as `maru bench --only index` registers them: one byte each, spread over the
        // region's pages.
        for (c, chunk) in keys.chunks(1024).enumerate() {
            let batch: Vec<_> = chunk
                .iter()
                .enumerate()
                .map(|(i, k)| reg(k, &r, ((c * 1024 + i) % 256) as u64 * 4096, 1))
                .collect();
            st.batch_register(&a, &batch).unwrap();
        }
        println!("register: {:?}", t.elapsed());
        st.shut_down_regions();
        let (t, cpu) = (Instant::now(), process_cpu());
        let ix = KeyIndex::open(&cfg).unwrap();
        println!(
            "attach: {:?} wall, {:?} CPU",
            t.elapsed(),
            process_cpu() - cpu
        );
        let st2 = ServerState::new(Box::new(rm.clone()), vec![], "h".into(), crate::PIN_TTL)
            .with_index(ix);
        let (t, cpu) = (Instant::now(), process_cpu());
        assert_eq!(st2.restore_from_index().unwrap().keys, n);
        println!(
            "rebuild: {:?} wall, {:?} CPU",
            t.elapsed(),
            process_cpu() - cpu
        );
    }
}
