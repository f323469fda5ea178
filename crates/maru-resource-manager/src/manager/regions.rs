//! The life of a region: allocation (first fit over the healthy pools), authentication
//! of a handle's token, free by its owner, reclaim from a dead owner, and access for mapping.
//! Each change is logged before it is applied; a failed append changes nothing.

use maru_proto::{Access, ErrorCode, Handle, WireError};

use super::{wire, Manager};
use crate::extent::ExtentAllocator;
use crate::wal::{Allocation, Owner, WalOp};

impl Manager {
    /// Allocates `size` bytes (rounded up to the pool's alignment) for `owner`, from `pool`
    /// (a pool path) or the first pool with room.
    pub fn alloc(
        &mut self,
        owner: &Owner,
        size: u64,
        pool: Option<&str>,
    ) -> Result<Handle, WireError> {
        if size == 0 {
            return Err(wire(
                ErrorCode::InvalidArgument,
                "allocation size must be greater than zero",
            ));
        }
        let candidates: Vec<usize> = match pool {
            Some(name) => {
                let i = self
                    .pools
                    .iter()
                    .position(|p| p.name == name)
                    .ok_or_else(|| {
                        let names: Vec<&str> = self.pools.iter().map(|p| p.name.as_str()).collect();
                        wire(
                            ErrorCode::NoSuchPool,
                            format!("no pool {name:?}; pools are {names:?}"),
                        )
                    })?;
                vec![i]
            }
            None => (0..self.pools.len()).collect(),
        };
        // A pool whose file or device is gone gives no regions; if that leaves none, say why.
        self.check_pools();
        let (candidates, unhealthy): (Vec<usize>, Vec<usize>) = candidates
            .into_iter()
            .partition(|&i| self.pools[i].health.problem().is_none());
        if candidates.is_empty() && !unhealthy.is_empty() {
            let why: Vec<&str> = unhealthy
                .iter()
                .filter_map(|&i| self.pools[i].health.problem())
                .collect();
            return Err(wire(ErrorCode::PoolUnhealthy, why.join("; ")));
        }
        let found = candidates
            .iter()
            .find_map(|&i| self.pools[i].extents.alloc(size).map(|(o, l)| (i, o, l)));
        let Some((i, offset, len)) = found else {
            let extents = || candidates.iter().map(|&i| &self.pools[i].extents);
            let largest = |of: fn(&ExtentAllocator) -> u64| extents().map(of).max().unwrap_or(0);
            let fits_ever = extents().any(|x| x.rounded(size).is_some_and(|l| l <= x.capacity()));
            let message = if fits_ever {
                let largest = largest(ExtentAllocator::largest_free);
                format!("no pool has {size} contiguous free bytes now (largest free extent: {largest} bytes)")
            } else {
                let largest = largest(ExtentAllocator::capacity);
                format!("{size} bytes is larger than any pool; the largest possible allocation is {largest} bytes")
            };
            return Err(wire(ErrorCode::PoolExhausted, message));
        };
        // Consumed even if this allocation fails below: an id that reached a file or the log
        // must never come back.
        let region_id = self.next_region_id;
        self.next_region_id += 1;
        let undo_extent = |m: &mut Manager| {
            if let Err(e) = m.pools[i].extents.free(offset, len) {
                tracing::error!("cannot undo a failed allocation: {e}");
            }
        };
        if let Err(e) = self.pools[i].pool.prepare_region(region_id, offset, len) {
            undo_extent(self);
            return Err(wire(
                ErrorCode::Storage,
                format!("cannot prepare region: {e}"),
            ));
        }
        let a = Allocation {
            region_id,
            pool: self.pools[i].name.clone(),
            offset,
            len,
            owner: owner.clone(),
        };
        if let Err(e) = self.wal.append(&WalOp::Alloc(a.clone())) {
            undo_extent(self);
            let _ = self.pools[i].pool.release_region(region_id, offset, len);
            tracing::error!("allocation refused: {e}");
            return Err(wire(ErrorCode::Storage, e.to_string()));
        }
        self.pools[i].regions += 1;
        let handle = self.handle_of(&a);
        self.allocations.insert(region_id, a);
        self.after_commit();
        Ok(handle)
    }

    /// The allocation `h` stands for, if its token is genuine and current. `missing` is the
    /// code for a genuine handle whose region is gone.
    fn authenticate(&self, h: &Handle, missing: ErrorCode) -> Result<&Allocation, WireError> {
        if !self.secret.verify(h) {
            return Err(wire(
                ErrorCode::BadToken,
                format!(
                    "token of region {} does not match the handle (forged, altered, or minted by another resource manager)",
                    h.region_id
                ),
            ));
        }
        let a = self.allocations.get(&h.region_id).ok_or_else(|| {
            wire(
                missing,
                format!(
                    "region {} is not allocated (already freed or reclaimed)",
                    h.region_id
                ),
            )
        })?;
        if a.pool != h.pool || a.offset != h.offset || a.len != h.len || a.owner.key() != h.owner {
            return Err(wire(
                ErrorCode::BadToken,
                format!("stale handle for region {}", h.region_id),
            ));
        }
        Ok(a)
    }

    /// Frees a region: the token must be genuine and `caller` its owner.
    pub fn free(&mut self, caller: &Owner, h: &Handle) -> Result<(), WireError> {
        let a = self.authenticate(h, ErrorCode::DoubleFree)?;
        if a.owner != *caller {
            return Err(wire(
                ErrorCode::NotOwner,
                format!(
                    "region {} belongs to {}, not {}",
                    h.region_id,
                    a.owner.key(),
                    caller.key()
                ),
            ));
        }
        let region_id = a.region_id;
        self.wal
            .append(&WalOp::Free { region_id })
            .map_err(|e| wire(ErrorCode::Storage, e.to_string()))?;
        self.remove(region_id);
        self.after_commit();
        Ok(())
    }

    /// Takes a region back from `owner` (found dead). `None` when it is no longer theirs.
    pub fn reclaim(
        &mut self,
        region_id: u64,
        owner: &Owner,
    ) -> Result<Option<Allocation>, WireError> {
        if self
            .allocations
            .get(&region_id)
            .is_none_or(|a| a.owner != *owner)
        {
            return Ok(None);
        }
        self.wal
            .append(&WalOp::Reclaim { region_id })
            .map_err(|e| wire(ErrorCode::Storage, e.to_string()))?;
        let a = self.remove(region_id);
        self.reclaimed += 1;
        self.after_commit();
        Ok(a)
    }

    /// Applies a logged free or reclaim.
    fn remove(&mut self, region_id: u64) -> Option<Allocation> {
        let a = self.allocations.remove(&region_id)?;
        if let Some(slot) = self.pools.iter_mut().find(|p| p.name == a.pool) {
            if let Err(e) = slot.extents.free(a.offset, a.len) {
                tracing::error!("free map out of step for region {region_id}: {e}");
            }
            slot.regions -= 1;
            if let Err(e) = slot.pool.release_region(region_id, a.offset, a.len) {
                tracing::warn!("cannot give back the memory of region {region_id}: {e}");
            }
        }
        Some(a)
    }

    /// How to map the region of a genuine handle (any holder may map it).
    pub fn access(&self, h: &Handle) -> Result<Access, WireError> {
        let a = self.authenticate(h, ErrorCode::UnknownRegion)?;
        let slot = self
            .pools
            .iter()
            .find(|p| p.name == a.pool)
            .ok_or_else(|| wire(ErrorCode::Internal, "pool of a live region is gone"))?;
        Ok(slot.pool.access(a.region_id, a.offset, a.len, slot.uuid))
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::super::test_support::*;
    use super::*;

    #[test]
    fn failing_log_append_is_a_storage_error_and_changes_nothing() {
        let d = dir();
        let mut m = Manager::open(&d.path().join("state"), &specs(d.path()), 0).unwrap();
        let kept = m.alloc(&owner(1), MIB, None).unwrap();
        let before = table(&m);
        let stats = m.pool_stats();
        // Every write to /dev/full fails with ENOSPC, like a full disk.
        let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
        m.wal_mut().replace_file_for_test(full);
        let e = m.alloc(&owner(1), MIB, None).unwrap_err();
        assert_eq!(e.code, ErrorCode::Storage, "{e}");
        let e = m.free(&owner(1), &kept).unwrap_err();
        assert_eq!(e.code, ErrorCode::Storage, "{e}");
        assert_eq!(table(&m), before);
        assert_eq!(m.pool_stats(), stats);
    }
}
