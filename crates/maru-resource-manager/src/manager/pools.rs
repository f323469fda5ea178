//! One pool with its free map, region count and health, and the manager's set of them
//! (hot-plugged pools join it; health checks run over it).

use maru_proto::stats::PoolStats;
use maru_shm::naming::Naming;
use maru_shm::{Pool, PoolSpec};

use super::Manager;
use crate::extent::ExtentAllocator;
use crate::health::PoolHealth;
use crate::RmError;

/// One pool and what is carved out of it.
#[derive(Debug)]
pub(crate) struct PoolSlot {
    pub pool: Box<dyn Pool>,
    /// The pool's path as handles name it.
    pub name: String,
    pub extents: ExtentAllocator,
    pub regions: u64,
    pub health: PoolHealth,
    /// The UUID of the pool's header (set by `pool_header::settle`), carried by every grant.
    pub uuid: [u8; 16],
}

impl PoolSlot {
    pub(super) fn open(spec: &PoolSpec, naming: &Naming) -> Result<PoolSlot, RmError> {
        let pool = spec.open(naming).map_err(|source| RmError::Pool {
            spec: spec.to_string(),
            source,
        })?;
        Ok(PoolSlot {
            name: pool.path().to_string_lossy().into_owned(),
            extents: ExtentAllocator::new(pool.total_size(), pool.align()),
            health: PoolHealth::watch(pool.path(), pool.kind(), pool.total_size()),
            pool,
            regions: 0,
            uuid: [0; 16],
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
            problem: self.health.problem().map(str::to_owned),
            uuid: maru_shm::pool::header::uuid_text(&self.uuid),
            reserved_bytes: self.pool.reserved(),
        }
    }
}

impl Manager {
    /// Opens pools of `specs` that are not open yet (hot-plugged devices). Returns how many
    /// were added.
    pub fn add_pools(&mut self, specs: &[PoolSpec]) -> usize {
        let mut added = 0;
        for spec in specs {
            if self.pools.iter().any(|p| p.pool.path() == spec.path()) {
                continue;
            }
            let opened = PoolSlot::open(spec, &self.naming).and_then(|mut slot| {
                crate::pool_header::settle(&mut slot)?;
                Ok(slot)
            });
            match opened {
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

    /// Checks every pool's file or device (see `health`); logs changes.
    pub fn check_pools(&mut self) {
        for p in &mut self.pools {
            p.health.check(p.pool.path());
        }
    }

    pub fn pool_stats(&self) -> Vec<PoolStats> {
        self.pools.iter().map(PoolSlot::stats).collect()
    }
}
