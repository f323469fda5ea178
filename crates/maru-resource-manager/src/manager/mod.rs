//! The resource manager's state and every change to it, without any networking: pools with
//! their free maps, the allocation table, the write-ahead log and checkpoints.
//!
//! Invariant: every change is appended to the WAL (and synced) *before* it is applied, and a
//! failed append changes nothing. The caller holds the one lock around a `Manager`.
//!
//! The parts: [`recovery`] opens the state directory and rebuilds the table from the
//! checkpoint and the log; [`regions`] allocates, authenticates, frees and reclaims regions;
//! [`pools`] holds each pool with its free map and health. This file holds the table itself
//! and its checkpointing.

mod pools;
mod recovery;
mod regions;
mod servers;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;

use maru_proto::{ErrorCode, Handle, WireError};
use maru_shm::naming::{state, Naming};

use crate::auth::Secret;
use crate::checkpoint::{encode_checkpoint, write_atomically, Checkpoint};
use crate::wal::{Allocation, Owner, ServerId, Wal};

pub(crate) use pools::PoolSlot;

fn wire(code: ErrorCode, message: impl Into<String>) -> WireError {
    WireError::new(code, message)
}

#[derive(Debug)]
pub(crate) struct Manager {
    state_dir: PathBuf,
    naming: Naming,
    pools: Vec<PoolSlot>,
    allocations: BTreeMap<u64, Allocation>,
    /// Owners that are metadata servers with a durable identity (see `servers`).
    bindings: BTreeMap<Owner, ServerId>,
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
            bindings: self.live_bindings(),
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
pub(crate) mod test_support {
    //! A manager on two temporary shm pools, for the tests of each part.

    use std::path::Path;

    use maru_shm::PoolSpec;

    use super::Manager;
    use crate::wal::{Allocation, Owner};

    pub const MIB: u64 = 1 << 20;

    pub fn dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("maru-test-")
            .tempdir_in("/dev/shm")
            .unwrap()
    }

    pub fn specs(d: &Path) -> Vec<PoolSpec> {
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

    pub fn owner(pid: u32) -> Owner {
        Owner {
            host: "h".into(),
            pid,
            start_time: 1,
        }
    }

    pub fn table(m: &Manager) -> Vec<Allocation> {
        m.allocations().cloned().collect()
    }
}
