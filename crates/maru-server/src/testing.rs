//! An in-memory resource manager for unit tests.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use maru_proto::stats::{PoolStats, RmStats};
use maru_proto::{Access, ErrorCode, Handle, RegionInfo, WireError};
use maru_transport::TransportError;

use crate::resource_manager::{RegionSource, RmCallError};

/// What a test runs when [`FakeRm`] is asked to free a region.
pub(crate) type FreeHook = Box<dyn Fn(u64) + Send + Sync>;

#[derive(Default)]
pub(crate) struct FakeRm {
    next: AtomicU64,
    pub live: Mutex<BTreeSet<u64>>,
    /// The handles of `live` regions, for `list_owned`.
    handles: Mutex<HashMap<u64, Handle>>,
    pub freed: Mutex<Vec<u64>>,
    /// Bytes left per pool; a pool not listed has unlimited room.
    pub room: Mutex<HashMap<String, u64>>,
    pub down: AtomicBool,
    /// The next allocation happens, but its caller is told the resource manager is
    /// unreachable (the reply was lost).
    pub lose_next_reply: AtomicBool,
    /// Called with the region id at the start of every free, to look at the server then.
    pub on_free: Mutex<Option<FreeHook>>,
}

impl FakeRm {
    pub fn live(&self) -> BTreeSet<u64> {
        self.live.lock().unwrap().clone()
    }
    fn check_up(&self) -> Result<(), RmCallError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(RmCallError::Unreachable {
                url: "fake".into(),
                source: TransportError::Io(std::io::ErrorKind::ConnectionRefused.into()).into(),
            });
        }
        Ok(())
    }
}

impl RegionSource for FakeRm {
    fn alloc(&self, size: u64, pool: Option<&str>) -> Result<RegionInfo, RmCallError> {
        self.check_up()?;
        let pool = pool.unwrap_or("/dev/shm/default").to_owned();
        if let Some(room) = self.room.lock().unwrap().get_mut(&pool) {
            if *room < size {
                return Err(RmCallError::Remote(WireError::new(
                    ErrorCode::PoolExhausted,
                    format!("{pool} is full"),
                )));
            }
            *room -= size;
        }
        let id = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        let handle = Handle {
            region_id: id,
            pool: pool.clone(),
            offset: id << 30,
            len: size,
            owner: "test:1".into(),
            token: [7; 32],
        };
        // Both maps change together (always locked in this order).
        let mut live = self.live.lock().unwrap();
        live.insert(id);
        self.handles.lock().unwrap().insert(id, handle.clone());
        drop(live);
        if self.lose_next_reply.swap(false, Ordering::SeqCst) {
            return Err(RmCallError::Unreachable {
                url: "fake".into(),
                source: TransportError::Closed.into(),
            });
        }
        Ok(RegionInfo {
            handle,
            access: Access {
                path: pool,
                offset: id << 30,
                len: size,
                page_size: 4096,
                pool_uuid: [0; 16],
            },
        })
    }

    fn free(&self, handle: &Handle) -> Result<(), RmCallError> {
        if let Some(f) = &*self.on_free.lock().unwrap() {
            f(handle.region_id);
        }
        self.check_up()?;
        let mut live = self.live.lock().unwrap();
        self.handles.lock().unwrap().remove(&handle.region_id);
        if !live.remove(&handle.region_id) {
            return Err(RmCallError::Remote(WireError::new(
                ErrorCode::DoubleFree,
                "double free",
            )));
        }
        self.freed.lock().unwrap().push(handle.region_id);
        if let Some(room) = self.room.lock().unwrap().get_mut(&handle.pool) {
            *room += handle.len;
        }
        Ok(())
    }

    fn stats(&self) -> Result<RmStats, RmCallError> {
        self.check_up()?;
        Ok(RmStats {
            pools: vec![PoolStats {
                path: "/dev/shm/default".into(),
                ..PoolStats::default()
            }],
            ..RmStats::default()
        })
    }

    fn list_owned(&self) -> Result<Vec<Handle>, RmCallError> {
        self.check_up()?;
        let live = self.live.lock().unwrap();
        let handles = self.handles.lock().unwrap();
        Ok(live.iter().map(|id| handles[id].clone()).collect())
    }

    fn access(&self, handle: &Handle) -> Result<Access, RmCallError> {
        self.check_up()?;
        if !self.live.lock().unwrap().contains(&handle.region_id) {
            return Err(RmCallError::Remote(WireError::new(
                ErrorCode::UnknownRegion,
                "no such region",
            )));
        }
        Ok(Access {
            path: handle.pool.clone(),
            offset: handle.offset,
            len: handle.len,
            page_size: 4096,
            pool_uuid: [0; 16],
        })
    }
}

/// Lets a test keep a handle on the fake after giving the server a `Box<dyn RegionSource>`.
impl RegionSource for std::sync::Arc<FakeRm> {
    fn alloc(&self, size: u64, pool: Option<&str>) -> Result<RegionInfo, RmCallError> {
        (**self).alloc(size, pool)
    }
    fn free(&self, handle: &Handle) -> Result<(), RmCallError> {
        (**self).free(handle)
    }
    fn stats(&self) -> Result<RmStats, RmCallError> {
        (**self).stats()
    }
    fn list_owned(&self) -> Result<Vec<Handle>, RmCallError> {
        (**self).list_owned()
    }
    fn access(&self, handle: &Handle) -> Result<Access, RmCallError> {
        (**self).access(handle)
    }
}
