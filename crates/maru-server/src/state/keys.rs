//! Key operations: register (one or a batch), lookup (one or a batch), exists and delete
//! (pins are `leases`). Register and delete count a key in its region under the region's mutex (see
//! `regions`); lookups take only a registry shard's and the region table's read locks.
//!
//! Region slots are never reused, so a lookup that found an entry and then finds no region
//! for its slot knows the key was deleted (and its region freed) in between: it answers "not
//! found", which is what it would have answered a moment later.

use std::sync::{Arc, MutexGuard};

use maru_proto::{DeleteStatus, ErrorCode, RegisterEntry, WireError};

use super::holds::Holds;
use super::index::ToIndex;
use super::notices::Returned;
use super::regions::{check_live, RegionState, TableRegion};
use super::sessions::{session_ended, Session};
use super::{err, lock, IdMap, ServerState};
use crate::registry::{Entry, KeyRegistry, Removal};
use crate::reply;

/// Per-connection scratch space, reused across requests so batch operations do not allocate
/// in the steady state.
#[derive(Default)]
pub(crate) struct Scratch {
    /// Keys behind their namespace's prefix (see [`Scratch::scoped`]).
    scoped: Vec<u8>,
    slots: Vec<Option<(u32, u64, u64, u64)>>,
    table_index: IdMap<u32, u32>,
}

impl Scratch {
    /// `key` behind the namespace prefix `scope`: the key the registry knows it by.
    pub fn scoped(&mut self, scope: &[u8], key: &[u8]) -> &[u8] {
        self.scoped.clear();
        self.scoped.extend_from_slice(scope);
        self.scoped.extend_from_slice(key);
        &self.scoped
    }

    /// Every key of `keys` behind `scope`, and the rest of the scratch space for the
    /// operation's own use.
    pub fn scoped_all<'s>(
        &'s mut self,
        scope: &[u8],
        keys: &[&[u8]],
    ) -> (Vec<&'s [u8]>, ScratchRest<'s>) {
        self.scoped.clear();
        let mut ends = Vec::with_capacity(keys.len());
        for k in keys {
            self.scoped.extend_from_slice(scope);
            self.scoped.extend_from_slice(k);
            ends.push(self.scoped.len());
        }
        let mut start = 0;
        let scoped = ends
            .into_iter()
            .map(|end| {
                let k = &self.scoped[start..end];
                start = end;
                k
            })
            .collect();
        let rest = ScratchRest {
            slots: &mut self.slots,
            table_index: &mut self.table_index,
        };
        (scoped, rest)
    }
}

/// The parts of [`Scratch`] a batch lookup uses besides its scoped keys.
pub(crate) struct ScratchRest<'s> {
    slots: &'s mut Vec<Option<(u32, u64, u64, u64)>>,
    table_index: &'s mut IdMap<u32, u32>,
}

/// A registration as the key index stores it.
fn to_index<'a>(e: &RegisterEntry<'a>) -> ToIndex<'a> {
    ToIndex {
        scoped: e.key,
        region_id: e.region_id,
        offset: e.offset,
        len: e.len,
    }
}

impl ServerState {
    /// Checks one registration against the region it names (ownership, bounds) without
    /// changing anything.
    fn check_register(
        &self,
        session: &Session,
        e: &RegisterEntry,
    ) -> Result<(Arc<TableRegion>, Entry), WireError> {
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
        let generation = match self.index_insert(&[to_index(e)])? {
            Some(g) => match g[0] {
                Some(g) => Some(g),
                None => return Ok(false),
            },
            None => None,
        };
        let new = self.registry.insert_if_absent(e.key, entry);
        if new {
            st.refs += 1;
            self.attach_key(&mut st, &entry, generation);
            self.capacity.registered(e.key, e.len, &region.usage);
        } else if generation.is_some() {
            // Registry keys are index keys (see `index`), so this does not happen; should it,
            // the two stay in step.
            self.unindex(e.key);
        }
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
        let mut regions: Vec<Arc<TableRegion>> = Vec::new();
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
        let indexed = self.index_insert(&entries.iter().map(to_index).collect::<Vec<_>>())?;
        let mut out = Vec::with_capacity(entries.len());
        let mut added = Vec::new();
        for (n, (e, entry)) in entries.iter().zip(checked).enumerate() {
            let generation = indexed.as_ref().map(|g| g[n]);
            if generation == Some(None) {
                out.push(false);
                continue;
            }
            let new = self.registry.insert_if_absent(e.key, entry);
            if new {
                if let Some(i) = regions.iter().position(|r| r.slot == entry.region) {
                    guards[i].refs += 1;
                    self.attach_key(&mut guards[i], &entry, generation.flatten());
                    added.push((e.key, e.len, &regions[i].usage));
                }
            } else if generation.is_some() {
                self.unindex(e.key);
            }
            out.push(new);
        }
        self.capacity.registered_batch(&added);
        Ok(out)
    }

    pub fn exists(&self, key: &[u8]) -> bool {
        self.registry.exists(key)
    }

    /// Writes the lookup reply for `key`; for a session, the page found is held for it (see
    /// `holds`).
    pub fn write_lookup(
        &self,
        out: &mut Vec<u8>,
        request_id: u64,
        session: Option<&Session>,
        key: &[u8],
    ) {
        let found = self.find_and_hold(session, key);
        match &found {
            Some(h) => self.capacity.hit(key, &h.region.usage),
            None => self.capacity.miss(key),
        }
        reply::lookup(
            out,
            request_id,
            found
                .as_ref()
                .map(|h| (h.region.wire(), h.offset, h.len, h.generation)),
        )
    }

    pub fn write_batch_lookup(
        &self,
        out: &mut Vec<u8>,
        request_id: u64,
        session: Option<&Session>,
        keys: &[&[u8]],
        scratch: ScratchRest<'_>,
    ) {
        scratch.slots.clear();
        scratch.table_index.clear();
        let mut used: Vec<Arc<TableRegion>> = Vec::new();
        // One use-clock tick for the batch: its keys were read together.
        let now = self.capacity.use_stamp();
        let mut holds = Holds::default();
        self.find_and_hold_all(session.is_some(), keys, &mut holds, |found| {
            let slot = found.map(|h| {
                super::eviction::usage_hit(&h.region.usage, now);
                let next = used.len() as u32;
                let index = *scratch.table_index.entry(h.region.slot.0).or_insert(next);
                if index == next {
                    used.push(h.region);
                }
                (index, h.offset, h.len, h.generation)
            });
            scratch.slots.push(slot);
        });
        if let Some(s) = session {
            if !self.book_holds(s, &mut holds) {
                // The session ended meanwhile: its holds are released, so nothing is found.
                scratch.slots.iter_mut().for_each(|slot| *slot = None);
            }
        }
        self.capacity
            .batch_read(keys, scratch.slots.iter().map(|s| s.is_some()));
        reply::batch_lookup(
            out,
            request_id,
            used.iter().map(|r| r.wire()),
            scratch.slots,
        );
    }

    /// Keys a client read without asking (through the key index): uses for eviction, as
    /// lookups' are (a key gone meanwhile is no use of anything), and with `hits` (one count
    /// per key) as many hits of their namespace. The miss counters stay the server's own: the
    /// index's misses are never told.
    pub fn touch(&self, keys: &[&[u8]], hits: Option<&[u32]>) {
        // The regions' last uses too, which pick the region a full pool takes back.
        let now = self.capacity.use_stamp();
        {
            let table = self.table();
            for k in keys {
                let region = self
                    .registry
                    .lookup(k)
                    .and_then(|e| table.by_slot.get(&e.region.0));
                if let Some(r) = region {
                    super::eviction::usage_hit(&r.usage, now);
                }
            }
        }
        self.capacity.used(keys);
        if let Some(counts) = hits {
            self.capacity.hits_told(keys, counts);
        }
    }

    pub fn delete(&self, key: &[u8]) -> DeleteStatus {
        let mut returned = Returned::default();
        let status = self.delete_into(key, &mut returned);
        self.send_returns(returned);
        status
    }

    /// Deletes every key of a batch; their owners get their pages in one notice each.
    pub fn batch_delete(&self, keys: &[&[u8]]) -> Vec<DeleteStatus> {
        let mut returned = Returned::default();
        let statuses = keys
            .iter()
            .map(|k| self.delete_into(k, &mut returned))
            .collect();
        self.send_returns(returned);
        statuses
    }

    /// Deletes `key`; its page, if it goes back to its owner now, joins `returned`.
    fn delete_into(&self, key: &[u8], returned: &mut Returned) -> DeleteStatus {
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
                        Removal::Removed(_) => {
                            self.unindex(key);
                            DeleteStatus::Deleted
                        }
                        Removal::Pinned => DeleteStatus::Pinned,
                        Removal::NotFound | Removal::Elsewhere(_) => DeleteStatus::NotFound,
                    };
                }
                missing_region = Some(entry);
                continue;
            };
            let (page_back, to_free) = {
                let mut st = lock(&region.state);
                match self.registry.remove_if_unpinned(key, region.slot) {
                    Removal::NotFound => return DeleteStatus::NotFound,
                    Removal::Pinned => return DeleteStatus::Pinned,
                    // Deleted and registered again elsewhere meanwhile: start over.
                    Removal::Elsewhere(_) => continue,
                    Removal::Removed(gone) => {
                        self.unindex(key);
                        st.refs -= 1;
                        self.capacity.removed(key, gone.len(), &region.usage);
                        let back = self.detach_key(&region, &mut st, &gone);
                        (back, self.take_if_unreferenced(&region, &mut st))
                    }
                }
            };
            if let Some(p) = page_back {
                returned.add(&region, p);
            }
            if let Some(h) = to_free {
                self.free_at_rm(h);
            }
            return DeleteStatus::Deleted;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::*;

    #[test]
    fn registration_is_checked_against_owner_and_bounds() {
        let (st, _rm, (_pa, a, ra)) = state_with_owner("a");
        let (_pb, b, _) = client(&st, "b");
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
}
