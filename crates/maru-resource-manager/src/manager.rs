//! The resource manager's state and every change to it, without any networking: pools with
//! their free maps, the allocation table, the write-ahead log and checkpoints.
//!
//! Invariant: every change is appended to the WAL (and synced) *before* it is applied, and a
//! failed append changes nothing. The caller holds the one lock around a `Manager`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use maru_proto::stats::PoolStats;
use maru_proto::{Access, ErrorCode, Handle, WireError};
use maru_shm::naming::{state, Naming};
use maru_shm::{Pool, PoolSpec};

use crate::auth::{Secret, SecretFile};
use crate::checkpoint::{decode_checkpoint, encode_checkpoint, write_atomically, Checkpoint};
use crate::extent::ExtentAllocator;
use crate::wal::{decode_wal, Allocation, Owner, Wal, WalOp};
use crate::RmError;

/// One pool and what is carved out of it.
#[derive(Debug)]
pub(crate) struct PoolSlot {
    pub pool: Box<dyn Pool>,
    /// The pool's path as handles name it.
    pub name: String,
    pub extents: ExtentAllocator,
    pub regions: u64,
}

impl PoolSlot {
    fn open(spec: &PoolSpec, naming: &Naming) -> Result<PoolSlot, RmError> {
        let pool = spec.open(naming).map_err(|source| RmError::Pool {
            spec: spec.to_string(),
            source,
        })?;
        Ok(PoolSlot {
            name: pool.path().to_string_lossy().into_owned(),
            extents: ExtentAllocator::new(pool.total_size(), pool.align()),
            pool,
            regions: 0,
        })
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            path: self.name.clone(),
            kind: self.pool.kind().name().to_owned(),
            total_bytes: self.extents.capacity(),
            free_bytes: self.extents.free_bytes(),
            align: self.pool.align(),
            page_size: self.pool.page_size(),
            regions: self.regions,
            largest_free_extent: self.extents.largest_free(),
        }
    }
}

fn wire(code: ErrorCode, message: impl Into<String>) -> WireError {
    WireError::new(code, message)
}

#[derive(Debug)]
pub(crate) struct Manager {
    state_dir: PathBuf,
    naming: Naming,
    pools: Vec<PoolSlot>,
    allocations: BTreeMap<u64, Allocation>,
    /// Never handed out twice, even across restarts (stale FS_DAX files carry old ids).
    next_region_id: u64,
    wal: Wal,
    secret: Secret,
    checkpoint_every: u64,
    since_checkpoint: u64,
    reclaimed: u64,
    /// Held (flock) for the manager's lifetime.
    _lock: File,
}

impl Manager {
    /// Opens the state directory (creating it), locks it, opens the pools and recovers:
    /// checkpoint, then WAL replay (a torn tail is cut with a warning).
    pub fn open(
        state_dir: &Path,
        specs: &[PoolSpec],
        checkpoint_every: u64,
    ) -> Result<Manager, RmError> {
        let naming = Naming::default();
        let dir_err = |source: io::Error| RmError::StateDir {
            path: state_dir.to_owned(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(dir_err)?;
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(state::lock(state_dir))
            .map_err(dir_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(RmError::Locked {
                    path: state_dir.to_owned(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(dir_err(e)),
        }

        let mut pools = Vec::new();
        for spec in specs {
            let slot = PoolSlot::open(spec, &naming)?;
            if pools.iter().any(|p: &PoolSlot| p.name == slot.name) {
                continue;
            }
            pools.push(slot);
        }

        let ckpt_path = state::checkpoint(state_dir);
        let ckpt = match std::fs::read(&ckpt_path) {
            Ok(bytes) => {
                decode_checkpoint(&bytes).map_err(|source| RmError::CorruptCheckpoint {
                    path: ckpt_path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Checkpoint {
                seq: 0,
                next_region_id: 1,
                allocations: Vec::new(),
            },
            Err(e) => return Err(dir_err(e)),
        };

        let wal_path = state::wal(state_dir);
        let mut wal_file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&wal_path)
            .map_err(dir_err)?;
        let mut bytes = Vec::new();
        wal_file.read_to_end(&mut bytes).map_err(dir_err)?;
        let scan = decode_wal(&bytes).map_err(|source| RmError::CorruptWal {
            path: wal_path.clone(),
            source,
        })?;
        if let Some(torn) = &scan.torn {
            tracing::warn!(
                "write-ahead log {} has a torn tail at byte {} ({}): cutting {} bytes (an \
                 operation interrupted by a crash, never acknowledged)",
                wal_path.display(),
                torn.offset,
                torn.reason,
                bytes.len() - scan.valid_len
            );
            wal_file.set_len(scan.valid_len as u64).map_err(dir_err)?;
            wal_file.sync_all().map_err(dir_err)?;
        }

        let mut m = Manager {
            state_dir: state_dir.to_owned(),
            naming,
            pools,
            allocations: BTreeMap::new(),
            next_region_id: ckpt.next_region_id.max(1),
            wal: Wal::new(&wal_path, wal_file, scan.valid_len as u64, ckpt.seq),
            secret: Secret::unset(),
            checkpoint_every,
            since_checkpoint: 0,
            reclaimed: 0,
            _lock: lock,
        };
        let inconsistent = |reason: String| RmError::Inconsistent {
            path: state_dir.to_owned(),
            reason,
        };
        for a in ckpt.allocations {
            m.replay(WalOp::Alloc(a)).map_err(inconsistent)?;
        }
        let mut seq = ckpt.seq;
        let mut replayed = 0u64;
        let had_records = !scan.records.is_empty();
        for rec in scan.records {
            if rec.seq <= seq {
                continue; // already in the checkpoint (crash between checkpoint and log reset)
            }
            if rec.seq != seq + 1 {
                return Err(inconsistent(format!(
                    "write-ahead log jumps from sequence {seq} to {} (records are missing)",
                    rec.seq
                )));
            }
            m.replay(rec.op).map_err(inconsistent)?;
            seq = rec.seq;
            replayed += 1;
        }
        m.wal.set_seq(seq);

        let secret_path = state::secret(state_dir);
        let secret_err = |source: io::Error| RmError::Secret {
            path: secret_path.clone(),
            source,
        };
        m.secret = match Secret::load(&secret_path).map_err(secret_err)? {
            SecretFile::Present(s) => s,
            SecretFile::Missing if !m.allocations.is_empty() => {
                return Err(RmError::SecretMissing {
                    path: secret_path,
                    allocations: m.allocations.len(),
                })
            }
            SecretFile::Missing => {
                let s = Secret::generate().map_err(secret_err)?;
                s.store(&secret_path).map_err(secret_err)?;
                s
            }
        };

        m.give_back_free_memory();
        if had_records {
            tracing::info!(
                "recovered {} allocations ({replayed} log records replayed after the checkpoint)",
                m.allocations.len()
            );
            // Fold the log into a fresh checkpoint so the next start replays nothing.
            m.checkpoint();
        }
        Ok(m)
    }

    /// Applies a recovered operation (no logging: it is already durable).
    fn replay(&mut self, op: WalOp) -> Result<(), String> {
        match op {
            WalOp::Alloc(a) => {
                let slot = self
                    .pools
                    .iter_mut()
                    .find(|p| p.name == a.pool)
                    .ok_or_else(|| {
                        format!(
                            "region {} lives in pool {} which is not configured",
                            a.region_id, a.pool
                        )
                    })?;
                if self.allocations.contains_key(&a.region_id) {
                    return Err(format!("region {} allocated twice", a.region_id));
                }
                slot.extents
                    .reserve(a.offset, a.len)
                    .map_err(|e| format!("region {} in {}: {e}", a.region_id, a.pool))?;
                slot.regions += 1;
                self.next_region_id = self.next_region_id.max(a.region_id + 1);
                self.allocations.insert(a.region_id, a);
            }
            WalOp::Free { region_id } | WalOp::Reclaim { region_id } => {
                let a = self
                    .allocations
                    .remove(&region_id)
                    .ok_or_else(|| format!("region {region_id} freed but never allocated"))?;
                let slot = self
                    .pools
                    .iter_mut()
                    .find(|p| p.name == a.pool)
                    .ok_or_else(|| format!("pool {} vanished", a.pool))?;
                slot.extents
                    .free(a.offset, a.len)
                    .map_err(|e| format!("region {region_id}: {e}"))?;
                slot.regions -= 1;
            }
        }
        Ok(())
    }

    /// After recovery: memory of regions freed while the resource manager was down (or just
    /// before it crashed) may still be backed; give it back. Failures only cost memory.
    fn give_back_free_memory(&self) {
        for slot in &self.pools {
            for (off, len) in slot.extents.free_extents() {
                if let Err(e) = slot.pool.release_free_extent(off, len) {
                    tracing::warn!(
                        "cannot release free extent {off}+{len} of {}: {e}",
                        slot.name
                    );
                }
            }
            let live = |id: u64| {
                self.allocations
                    .get(&id)
                    .is_some_and(|a| a.pool == slot.name)
            };
            match slot.pool.remove_stale_regions(&live) {
                Ok(0) => {}
                Ok(n) => tracing::info!("removed {n} stale region files from {}", slot.name),
                Err(e) => tracing::warn!("cannot clean stale regions of {}: {e}", slot.name),
            }
        }
    }

    /// Opens pools of `specs` that are not open yet (hot-plugged devices). Returns how many
    /// were added.
    pub fn add_pools(&mut self, specs: &[PoolSpec]) -> usize {
        let mut added = 0;
        for spec in specs {
            if self.pools.iter().any(|p| p.pool.path() == spec.path()) {
                continue;
            }
            match PoolSlot::open(spec, &self.naming) {
                Ok(slot) => {
                    tracing::info!(
                        "added pool {} ({}, {} bytes)",
                        slot.name,
                        slot.pool.kind(),
                        slot.extents.capacity()
                    );
                    self.pools.push(slot);
                    added += 1;
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
        added
    }

    fn handle_of(&self, a: &Allocation) -> Handle {
        let owner = a.owner.key();
        Handle {
            region_id: a.region_id,
            pool: a.pool.clone(),
            offset: a.offset,
            len: a.len,
            token: self
                .secret
                .mint(a.region_id, &a.pool, a.offset, a.len, &owner),
            owner,
        }
    }

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
        let found = candidates
            .iter()
            .find_map(|&i| self.pools[i].extents.alloc(size).map(|(o, l)| (i, o, l)));
        let Some((i, offset, len)) = found else {
            let fits_ever = candidates.iter().any(|&i| {
                let x = &self.pools[i].extents;
                x.rounded(size).is_some_and(|l| l <= x.capacity())
            });
            let message = if fits_ever {
                let largest = candidates
                    .iter()
                    .map(|&i| self.pools[i].extents.largest_free())
                    .max()
                    .unwrap_or(0);
                format!("no pool has {size} contiguous free bytes now (largest free extent: {largest} bytes)")
            } else {
                let largest = candidates
                    .iter()
                    .map(|&i| self.pools[i].extents.capacity())
                    .max()
                    .unwrap_or(0);
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
        Ok(slot.pool.access(a.region_id, a.offset, a.len))
    }

    fn after_commit(&mut self) {
        self.since_checkpoint += 1;
        if self.checkpoint_every > 0 && self.since_checkpoint >= self.checkpoint_every {
            self.checkpoint();
        }
    }

    /// Writes a checkpoint and empties the log. A failure is logged and changes nothing
    /// (the log still holds everything).
    pub fn checkpoint(&mut self) {
        self.since_checkpoint = 0;
        let c = Checkpoint {
            seq: self.wal.seq(),
            next_region_id: self.next_region_id,
            allocations: self.allocations.values().cloned().collect(),
        };
        let result = encode_checkpoint(&c)
            .map_err(io::Error::other)
            .and_then(|bytes| {
                write_atomically(
                    &state::checkpoint(&self.state_dir),
                    &state::checkpoint_tmp(&self.state_dir),
                    &bytes,
                )
            });
        match result {
            Ok(()) => {
                if let Err(e) = self.wal.reset() {
                    tracing::warn!("checkpoint written but the log was not emptied: {e}");
                }
            }
            Err(e) => tracing::warn!("checkpoint failed (the log keeps every record): {e}"),
        }
    }

    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.values()
    }

    /// Every allocation with its handle.
    pub fn list(&self) -> Vec<(Handle, &Allocation)> {
        self.allocations
            .values()
            .map(|a| (self.handle_of(a), a))
            .collect()
    }

    pub fn pool_stats(&self) -> Vec<PoolStats> {
        self.pools.iter().map(PoolSlot::stats).collect()
    }

    pub fn reclaimed(&self) -> u64 {
        self.reclaimed
    }

    pub fn wal_seq(&self) -> u64 {
        self.wal.seq()
    }

    #[cfg(test)]
    pub(crate) fn wal_mut(&mut self) -> &mut Wal {
        &mut self.wal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("maru-test-")
            .tempdir_in("/dev/shm")
            .unwrap()
    }

    fn specs(d: &Path) -> Vec<PoolSpec> {
        vec![
            PoolSpec::Shm {
                path: d.join("pools/a"),
                size: 16 * MIB,
            },
            PoolSpec::Shm {
                path: d.join("pools/b"),
                size: 64 * MIB,
            },
        ]
    }

    fn owner(pid: u32) -> Owner {
        Owner {
            host: "h".into(),
            pid,
            start_time: 1,
        }
    }

    fn table(m: &Manager) -> Vec<Allocation> {
        m.allocations().cloned().collect()
    }

    #[test]
    fn state_survives_reopen_with_and_without_checkpoints() {
        for every in [0, 1, 3, 1000] {
            let d = dir();
            let state = d.path().join("state");
            let mut m = Manager::open(&state, &specs(d.path()), every).unwrap();
            let mut handles = Vec::new();
            for i in 0..10 {
                handles.push(m.alloc(&owner(i % 3), (i as u64 + 1) * MIB, None).unwrap());
            }
            for h in handles.iter().step_by(3) {
                m.free(&owner((h.region_id as u32 - 1) % 3), h).unwrap();
            }
            let before = table(&m);
            let next = m.next_region_id;
            drop(m);
            let mut m = Manager::open(&state, &specs(d.path()), every).unwrap();
            assert_eq!(table(&m), before, "checkpoint_every={every}");
            assert_eq!(m.next_region_id, next);
            let h = m.alloc(&owner(9), MIB, None).unwrap();
            assert_eq!(h.region_id, next, "region ids are never reused");
            // Handles minted before the restart still verify (the secret persisted).
            assert!(m.access(&handles[1]).is_ok());
        }
    }

    #[test]
    fn second_manager_on_one_state_dir_is_refused() {
        let d = dir();
        let state = d.path().join("state");
        let _m = Manager::open(&state, &specs(d.path()), 10).unwrap();
        assert!(matches!(
            Manager::open(&state, &specs(d.path()), 10),
            Err(RmError::Locked { .. })
        ));
    }

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

    #[test]
    fn missing_secret_with_allocations_refuses_to_start() {
        let d = dir();
        let state = d.path().join("state");
        let mut m = Manager::open(&state, &specs(d.path()), 0).unwrap();
        m.alloc(&owner(1), MIB, None).unwrap();
        drop(m);
        std::fs::remove_file(state::secret(&state)).unwrap();
        let e = Manager::open(&state, &specs(d.path()), 0).unwrap_err();
        assert!(
            matches!(e, RmError::SecretMissing { allocations: 1, .. }),
            "{e}"
        );
    }

    #[test]
    fn missing_pool_in_config_refuses_to_start() {
        let d = dir();
        let state = d.path().join("state");
        let mut m = Manager::open(&state, &specs(d.path()), 0).unwrap();
        m.alloc(&owner(1), 20 * MIB, None).unwrap(); // only fits pool b
        drop(m);
        let e = Manager::open(&state, &specs(d.path())[..1], 0).unwrap_err();
        assert!(e.to_string().contains("not configured"), "{e}");
    }
}
