//! What a handler reports about itself: the server's statistics with its own allocator
//! state, region sizes, and whether the server answers at all.

use maru_proto::stats::ServerStats;
use maru_proto::{Handle, Request, Response};

use super::owned::Owned;
use super::{during, lock_hooked, read, Hooked};
use crate::error::{Error, Result};

/// Allocator state of one owned region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRegionStats {
    pub region_id: u64,
    /// The region's handle as the resource manager issued it (offset, length, auth token).
    pub handle: Handle,
    /// Bytes of the region.
    pub pool_size: u64,
    pub chunk_size: u64,
    pub page_count: u64,
    pub free_pages: u64,
    pub allocated_pages: u64,
}

/// Server statistics plus this handler's own allocator state.
#[derive(Debug, Clone)]
pub struct HandlerStats {
    pub server: ServerStats,
    pub regions: Vec<OwnedRegionStats>,
    /// The most calls this handler's session had in flight at once on its shared connection
    /// (`use_async_rpc`; bounded by `max_inflight`); 0 without pipelining.
    pub peak_inflight: usize,
}

impl Owned {
    fn stats(&self, chunk: u64) -> Vec<OwnedRegionStats> {
        self.regions
            .iter()
            .map(|r| OwnedRegionStats {
                region_id: r.region_id(),
                handle: r.region.info.handle.clone(),
                pool_size: r.region.mapping.len() as u64,
                chunk_size: chunk,
                page_count: r.alloc.page_count(),
                free_pages: r.alloc.free_pages(),
                allocated_pages: r.alloc.allocated_pages(),
            })
            .collect()
    }
}

impl Hooked<'_> {
    pub fn healthcheck(&self) -> bool {
        let Ok(c) = self.h.connected(self.hook) else {
            return false;
        };
        matches!(c.call(&Request::Heartbeat, self.hook), Ok(Response::Ok))
    }

    pub fn stats(&self) -> Result<HandlerStats> {
        during("stats", || {
            let c = self.h.connected(self.hook)?;
            c.settle_for_read(self.hook);
            let server = match c.call(&Request::Stats, self.hook)? {
                Response::Stats(json) => {
                    serde_json::from_str::<ServerStats>(&json).map_err(|e| {
                        Error::protocol("stats", format!("bad reply: server stats: {e}"))
                    })?
                }
                other => return Err(Error::unexpected("stats", &other)),
            };
            let regions = lock_hooked(&c.owned, self.hook).stats(c.chunk());
            Ok(HandlerStats {
                server,
                regions,
                peak_inflight: c.conns.peak_inflight(),
            })
        })
    }

    /// See [`HandlerStats::peak_inflight`] (no round trip; 0 when not connected).
    pub fn peak_inflight(&self) -> usize {
        self.h
            .connected(self.hook)
            .map_or(0, |c| c.conns.peak_inflight())
    }

    pub fn owned_regions(&self) -> Vec<OwnedRegionStats> {
        match self.h.connected(self.hook) {
            Ok(c) => {
                let mut owned = lock_hooked(&c.owned, self.hook);
                // Pages the server returned count as free as soon as they are here.
                owned.absorb_returns(c.link.returns.take(), c.stride);
                owned.stats(c.chunk())
            }
            Err(_) => Vec::new(),
        }
    }

    pub fn region_page_count(&self, region_id: u64) -> Option<u64> {
        let c = self.h.connected(self.hook).ok()?;
        if let Some(r) = lock_hooked(&c.owned, self.hook).region_mut(region_id) {
            return Some(r.alloc.page_count());
        }
        let len = read(&c.mapped).get(&region_id)?.mapping.len() as u64;
        Some(len / c.stride)
    }
}

#[cfg(test)]
mod tests {
    use super::super::owned::tests::books_with_region;

    #[test]
    fn region_stats_count_the_allocators_pages() {
        let (_dir, mut owned) = books_with_region(5, 8);
        owned.regions[0].alloc.alloc().unwrap();
        let stats = owned.stats(4000);
        assert_eq!(stats.len(), 1);
        let s = &stats[0];
        assert_eq!((s.region_id, s.handle.region_id), (5, 5));
        assert_eq!((s.pool_size, s.chunk_size), (8 * 4096, 4000));
        assert_eq!((s.page_count, s.free_pages, s.allocated_pages), (8, 7, 1));
    }
}
