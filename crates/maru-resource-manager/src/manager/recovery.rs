//! Opening the state directory and rebuilding the allocation table: the directory lock,
//! the checkpoint, then the write-ahead log replayed over it (a torn tail is cut with a
//! warning), the token secret, and giving back memory of regions freed while down.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use maru_shm::naming::{state, Naming};
use maru_shm::PoolSpec;

use super::{Manager, PoolSlot};
use crate::auth::{Secret, SecretFile};
use crate::checkpoint::{decode_checkpoint, Checkpoint};
use crate::wal::{decode_wal, Wal, WalOp};
use crate::RmError;

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
        if !take_lock(&lock).map_err(dir_err)? {
            return Err(RmError::Locked {
                path: state_dir.to_owned(),
            });
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
                ..Checkpoint::default()
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
            bindings: ckpt.bindings.into_iter().collect(),
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
        for slot in &mut m.pools {
            crate::pool_header::settle(slot)?;
        }

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
            WalOp::Bind { owner, server_id } => {
                self.bindings.insert(owner, server_id);
            }
            WalOp::Adopt { from, to } => {
                self.apply_adopt(&from, &to);
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
}

/// How long a taken state lock is waited for before the directory counts as in use.
/// A lock is an open file description: a process that forks shares it with the child until
/// the child execs, so a manager reopened in a process that also spawns others (a supervisor,
/// a test harness) can see the lock of its own dropped predecessor for that instant.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Takes the state directory's lock, waiting up to [`LOCK_WAIT`] for a holder to let go;
/// false when another holder kept it.
fn take_lock(lock: &File) -> io::Result<bool> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(true),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(std::fs::TryLockError::WouldBlock) => return Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

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
