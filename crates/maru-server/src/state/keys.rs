//! Key operations: register (one or a batch), lookup (one or a batch), exists, delete, pin and
//! unpin. Register and delete count a key in its region under the region's mutex (see
//! `regions`); lookups take only a registry shard's and the region table's read locks.
//!
//! Region slots are never reused, so a lookup that found an entry and then finds no region
//! for its slot knows the key was deleted (and its region freed) in between: it answers "not
//! found", which is what it would have answered a moment later.

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};

use maru_proto::{DeleteStatus, ErrorCode, RegisterEntry, WireError};

use super::regions::{check_live, RegionState, TableRegion};
use super::sessions::{session_ended, Session};
use super::{err, lock, ServerState};
use crate::registry::{Entry, KeyRegistry, Removal};
use crate::reply;

/// Per-connection scratch space, reused across requests so batch operations do not allocate
/// in the steady state.
#[derive(Default)]
pub(crate) struct Scratch {
    entries: Vec<Option<Entry>>,
    slots: Vec<Option<(u32, u64, u64)>>,
    table_index: HashMap<u32, u32>,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::*;

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
}
