//! [`MaruHandler`]: connection lifecycle, owned regions and their allocators, mapped regions
//! of other instances, and every key operation.
//!
//! Locking, from outside in (a lock is only ever taken while holding the ones before it):
//! `lifecycle` (connect/close) → `state` (brief) → `Session::owned` (the write lock: allocators
//! and the key ↔ page books; held across a store's round trip, which serialises writes) →
//! `Session::regions` (brief) → the connection pool (brief) → `Session::fence` (brief). Reads
//! (retrieve, exists) take only the brief ones, so they run concurrently, each on its own
//! pooled connection. The session's watcher thread (see [`crate::watch`]) takes only the
//! fence's lock, so it never waits for a caller blocked on a dead server.
//!
//! Any lock that may be held across a [`WaitHook`] wait is taken with [`lock_hooked`], which
//! waits through the hook: a Python thread holding the GIL must never block on a lock whose
//! holder needs the GIL back to finish.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, TryLockError};
use std::time::Instant;

use maru_proto::stats::ServerStats;
use maru_proto::{
    DeleteStatus, Handle, RegionInfo, RegisterEntry, Request, Response, ServerUrl, MAX_BATCH,
};
use maru_shm::{MapMode, Mapping, ShmError};
use maru_transport::local_identity;

use crate::alloc::PageAllocator;
use crate::config::{ConfigError, MaruConfig};
use crate::error::ErrorKind;
use crate::error::{
    check_key, AllocError, ConnectError, FreeError, OpError, RetrieveError, RpcError, StateError,
    StoreError,
};
use crate::view::{AllocHandle, PageId, View};
use crate::watch::{Fence, Watcher};
use crate::wire::{Conn, Identity, Link, NoHook, WaitHook};

/// Hasher of the handler's page books: they hold only this handler's own keys, so no
/// hash-flooding defence is needed beyond foldhash's per-process seed.
type FastHash = foldhash::fast::RandomState;

/// Called with `(region_id, page_count)` for every region this handler comes to own.
pub type RegionCallback = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Regions added during an operation, `(region_id, page_count)`, reported to the callback
/// once the operation's locks are released.
type Added = Vec<(u64, u64)>;

/// What a successful store did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The key is new and now points at the page.
    Stored,
    /// The key already existed (keys are write-once): the new page was freed.
    Deduplicated,
    /// Write-behind ([`MaruConfig::write_behind`]): the registration is on its way; a later
    /// call books its outcome (and frees the page if the key already existed).
    Sent,
}

/// One entry of a batch store.
#[derive(Debug, Clone, Copy)]
pub enum StoreItem<'a> {
    /// A page from `alloc`, already written: registration only.
    Page { page: PageId, len: u64 },
    /// Bytes to copy into a fresh page: `prefix` then `data`.
    Bytes { prefix: &'a [u8], data: &'a [u8] },
}

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
}

/// A mapped region: one of ours (read-write, populated) or another instance's (read-only).
struct Region {
    info: RegionInfo,
    mapping: Arc<Mapping>,
    owned: bool,
}

struct OwnedRegion {
    region: Arc<Region>,
    alloc: PageAllocator,
}

/// Everything the write lock protects.
#[derive(Default)]
struct Owned {
    regions: Vec<OwnedRegion>,
    /// Index into `regions` of the region tried first.
    active: usize,
    /// Keys this handler registered, and the pages they point at (both directions), so that
    /// delete can free the page and free can take the key away.
    /// (One shared allocation per key; a fast hasher, since these books are updated for every
    /// key of every store and a batch of 256 spent a third of its client time in SipHash and
    /// key copies — docs/PERFORMANCE.md, finding 5.)
    stored: HashMap<Arc<[u8]>, PageId, FastHash>,
    keys: HashMap<PageId, Arc<[u8]>, FastHash>,
    behind: WriteBehind,
}

/// Write-behind registrations: sent on a connection of their own, their replies collected
/// later, in order. Lives under the write lock, like every other page book.
#[derive(Default)]
struct WriteBehind {
    conn: Option<Conn>,
    inflight: VecDeque<Unsettled>,
    /// Registrations that failed after their store returned, for `flush` to report.
    failed: u64,
    first_error: Option<(ErrorKind, String)>,
}

struct Unsettled {
    request_id: u64,
    key: Vec<u8>,
    page: PageId,
}

impl WriteBehind {
    /// Most registrations in flight; one more waits for the oldest reply.
    const WINDOW: usize = 64;

    fn holds(&self, page: PageId) -> bool {
        self.inflight.iter().any(|u| u.page == page)
    }

    fn fail(&mut self, key: &[u8], kind: ErrorKind, why: String) {
        let msg = format!("store of {:?}: {why}", String::from_utf8_lossy(key));
        tracing::warn!("write-behind {msg}");
        self.failed += 1;
        self.first_error.get_or_insert((kind, msg));
    }

    /// Gives up on the connection: every registration still in flight on it has an unknown
    /// outcome, so each counts as failed and its page stays taken (it may yet be registered).
    fn abandon(&mut self, kind: ErrorKind, why: &str) {
        for u in std::mem::take(&mut self.inflight) {
            self.fail(&u.key, kind, why.to_owned());
        }
        self.conn = None;
    }
}

/// How far [`Session::settle_behind`] goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// Only replies that are already there.
    Ready,
    /// Until there is room for one more registration.
    Room,
    /// Every outstanding registration.
    All,
}

impl Owned {
    fn region_mut(&mut self, region_id: u64) -> Option<&mut OwnedRegion> {
        self.regions
            .iter_mut()
            .find(|r| r.region.info.handle.region_id == region_id)
    }

    fn free_page(&mut self, page: PageId) -> Result<(), FreeError> {
        let not_tracked = FreeError::NotTracked {
            region_id: page.region_id,
            page_index: page.page_index,
        };
        let region = self.region_mut(page.region_id).ok_or(not_tracked)?;
        region
            .alloc
            .free(page.page_index)
            .map_err(|_| FreeError::NotTracked {
                region_id: page.region_id,
                page_index: page.page_index,
            })
    }

    /// Forgets a key that no longer exists at the server and frees its page.
    fn forget_key(&mut self, key: &[u8]) {
        if let Some(page) = self.stored.remove(key) {
            self.keys.remove(&page);
            let _ = self.free_page(page);
        }
    }

    fn stats(&self, chunk: u64) -> Vec<OwnedRegionStats> {
        self.regions
            .iter()
            .map(|r| OwnedRegionStats {
                region_id: r.region.info.handle.region_id,
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

struct Session {
    link: Link,
    config: MaruConfig,
    stride: u64,
    owned: Mutex<Owned>,
    regions: RwLock<HashMap<u64, Arc<Region>>>,
    /// Set by close() before it waits for in-flight writes; writers check it under the lock.
    closing: AtomicBool,
    /// The owned mappings to detach from the pool when the session ends, and whether the
    /// server was lost.
    fence: Arc<Fence>,
    /// Watches the session's own connection for the server's loss; stopped by close().
    watcher: Mutex<Option<Watcher>>,
    /// Write-behind registrations in flight (`Owned::behind.inflight.len()`, readable without
    /// the write lock, so that reads wait for them only when there are any).
    unsettled: AtomicUsize,
}

enum State {
    Idle { last_error: Option<String> },
    Connected(Arc<Session>),
    Closed,
}

/// A Maru client: owns regions it writes into, maps other instances' regions to read, and
/// talks to one metadata server. `Sync`: share it across threads (e.g. in an `Arc`).
pub struct MaruHandler {
    config: MaruConfig,
    url: ServerUrl,
    identity: Identity,
    state: RwLock<State>,
    lifecycle: Mutex<()>,
    on_region_added: Mutex<Option<RegionCallback>>,
}

/// Takes `m`, waiting through `hook` when it is contended (see the module docs).
fn lock_hooked<'a, T: Send>(m: &'a Mutex<T>, hook: &dyn WaitHook) -> MutexGuard<'a, T> {
    loop {
        match m.try_lock() {
            Ok(g) => return g,
            Err(TryLockError::Poisoned(p)) => return p.into_inner(),
            Err(TryLockError::WouldBlock) => hook.block(&mut || drop(m.lock())),
        }
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

fn unexpected(op: &'static str, got: Response) -> RpcError {
    RpcError::Unexpected {
        op,
        got: format!("{got:?}"),
    }
}

impl Session {
    fn chunk(&self) -> u64 {
        self.config.chunk_size_bytes
    }

    fn check_open(&self) -> Result<(), StateError> {
        if self.closing.load(Ordering::Acquire) {
            return Err(StateError::Closed);
        }
        if self.fence.is_lost() {
            return Err(StateError::ServerLost);
        }
        Ok(())
    }

    /// One round trip. When it shows the server gone (it closed or reset the connection, or
    /// says our session ended), the owned mappings are detached at once, without waiting for
    /// the watcher, and the session is marked lost; the error itself is returned as it is.
    fn call(&self, req: &Request, hook: &dyn WaitHook) -> Result<Response, RpcError> {
        let result = self.link.call(req, hook);
        if let Err(e) = &result {
            if e.means_session_lost() {
                self.fence.lose(&e.to_string());
            }
        }
        result
    }

    /// Asks the server for a region of `size` bytes and maps it read-write, populated.
    /// The populate costs ~0.7 ms per MiB, so it runs through the hook.
    fn new_owned_region(
        &self,
        size: u64,
        hook: &dyn WaitHook,
    ) -> Result<OwnedRegion, ConnectError> {
        let info = match self.call(&Request::RequestRegion { size }, hook)? {
            Response::Region(info) => info,
            other => return Err(unexpected("request_region", other).into()),
        };
        let region_id = info.handle.region_id;
        let pages = info.access.len / self.stride;
        let bad = if info.access.len == 0 || pages == 0 {
            Some(format!(
                "region {region_id} of {} bytes holds no page of {} bytes",
                info.access.len, self.stride
            ))
        } else if pages > u64::from(u32::MAX) {
            Some(format!("region {region_id} has too many pages ({pages})"))
        } else {
            None
        };
        let mapped = match bad {
            Some(msg) => Err(ConnectError::BadRegion(msg)),
            None => {
                let mut out: Option<Result<Mapping, ShmError>> = None;
                let path = std::path::Path::new(&info.access.path);
                let (offset, len) = (info.access.offset, info.access.len);
                hook.block(&mut || {
                    out = Some(Mapping::map(path, offset, len, MapMode::ReadWrite, true))
                });
                match out {
                    Some(Ok(m)) => Ok(m),
                    Some(Err(source)) => Err(ConnectError::Map { region_id, source }),
                    None => Err(ConnectError::BadRegion(
                        "the wait hook did not run the mapping".into(),
                    )),
                }
            }
        };
        let mapping = match mapped {
            Ok(m) => m,
            Err(e) => {
                // Give the region back rather than leave it to the close-time sweep.
                let _ = self.call(&Request::ReturnRegion { region_id }, hook);
                return Err(e);
            }
        };
        let region = Arc::new(Region {
            info,
            mapping: Arc::new(mapping),
            owned: true,
        });
        self.fence.add(region_id, region.mapping.clone());
        write(&self.regions).insert(region_id, region.clone());
        Ok(OwnedRegion {
            region,
            alloc: PageAllocator::new(pages as u32),
        })
    }

    /// Takes a page: active region, then any other owned region, then a new region.
    /// Regions added on the way are appended to `added`.
    fn alloc_page(
        &self,
        owned: &mut Owned,
        hook: &dyn WaitHook,
        added: &mut Vec<(u64, u64)>,
    ) -> Result<(Arc<Region>, u64), AllocError> {
        if let Some(r) = owned.regions.get_mut(owned.active) {
            if let Some(p) = r.alloc.alloc() {
                return Ok((r.region.clone(), p));
            }
        }
        let active = owned.active;
        for (i, r) in owned.regions.iter_mut().enumerate() {
            if i == active {
                continue;
            }
            if let Some(p) = r.alloc.alloc() {
                owned.active = i;
                return Ok((r.region.clone(), p));
            }
        }
        if !self.config.auto_expand {
            return Err(AllocError::Exhausted);
        }
        let mut region = self
            .new_owned_region(self.config.expand_bytes(), hook)
            .map_err(|e| match e {
                ConnectError::Rpc(e) => AllocError::Expand(e),
                ConnectError::Map { region_id, source } => AllocError::Map { region_id, source },
                ConnectError::BadRegion(m) => AllocError::BadRegion(m),
                ConnectError::State(s) => AllocError::State(s),
            })?;
        added.push((
            region.region.info.handle.region_id,
            region.alloc.page_count(),
        ));
        let page = region.alloc.alloc().ok_or(AllocError::Exhausted)?;
        let r = region.region.clone();
        owned.regions.push(region);
        owned.active = owned.regions.len() - 1;
        Ok((r, page))
    }

    /// The mapping of `info`'s region: cached, or mapped read-only now (never populated:
    /// mapping is microseconds whatever the size).
    fn region_for(&self, info: &RegionInfo) -> Result<Arc<Region>, RetrieveError> {
        let id = info.handle.region_id;
        if let Some(r) = read(&self.regions).get(&id) {
            if r.info.access == info.access {
                return Ok(r.clone());
            }
            if r.owned {
                return Err(RetrieveError::BadLocation(format!(
                    "region {id} is ours but the server describes it differently"
                )));
            }
        }
        let mapping = Mapping::map(
            std::path::Path::new(&info.access.path),
            info.access.offset,
            info.access.len,
            MapMode::ReadOnly,
            false,
        )
        .map_err(|source| RetrieveError::Map {
            region_id: id,
            source,
        })?;
        let fresh = Arc::new(Region {
            info: info.clone(),
            mapping: Arc::new(mapping),
            owned: false,
        });
        let mut map = write(&self.regions);
        match map.get(&id) {
            // Another thread mapped it meanwhile: use theirs, drop ours.
            Some(r) if r.info.access == info.access => Ok(r.clone()),
            Some(r) if r.owned => Err(RetrieveError::BadLocation(format!(
                "region {id} is ours but the server describes it differently"
            ))),
            _ => {
                map.insert(id, fresh.clone());
                Ok(fresh)
            }
        }
    }

    fn view(&self, region: &Region, offset: u64, len: u64) -> Result<View, RetrieveError> {
        let id = region.info.handle.region_id;
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > region.mapping.len() as u64) {
            return Err(RetrieveError::BadLocation(format!(
                "{offset}+{len} lies outside region {id} of {} bytes",
                region.mapping.len()
            )));
        }
        Ok(View {
            mapping: region.mapping.clone(),
            offset: offset as usize,
            len: len as usize,
            writable: region.owned,
            region_id: id,
            page_index: offset / self.stride,
        })
    }

    /// Maps every live region we do not have yet (eager_map). Best effort: a region that
    /// fails to map now is mapped lazily at retrieve.
    fn map_all(&self, hook: &dyn WaitHook) {
        if let Ok(Response::Regions(list)) = self.call(&Request::ListRegions, hook) {
            for info in list {
                let _ = self.region_for(&info);
            }
        }
    }

    /// Checks that `page` is an allocated, not yet registered page of ours.
    fn check_fresh_page(owned: &mut Owned, page: PageId) -> Result<(), StoreError> {
        let allocated = owned
            .region_mut(page.region_id)
            .is_some_and(|r| r.alloc.is_allocated(page.page_index));
        if !allocated {
            return Err(StoreError::NotTracked {
                region_id: page.region_id,
                page_index: page.page_index,
            });
        }
        if owned.keys.contains_key(&page) || owned.behind.holds(page) {
            return Err(StoreError::AlreadyStored {
                region_id: page.region_id,
                page_index: page.page_index,
            });
        }
        Ok(())
    }

    /// Books the outcome of registering `key` at `page`.
    fn settle(owned: &mut Owned, key: &[u8], page: PageId, is_new: bool) -> StoreOutcome {
        if is_new {
            let key: Arc<[u8]> = Arc::from(key);
            owned.stored.insert(key.clone(), page);
            owned.keys.insert(page, key);
            StoreOutcome::Stored
        } else {
            let _ = owned.free_page(page);
            StoreOutcome::Deduplicated
        }
    }

    /// Collects write-behind replies (as far as `how` says) and books them as a synchronous
    /// store would have. Failures are kept for `flush`, not returned: the stores they belong
    /// to have already returned.
    fn settle_behind(&self, owned: &mut Owned, hook: &dyn WaitHook, how: Settle) {
        let w = self.link.wait(hook);
        if self.fence.is_lost() {
            // The server is gone: nothing in flight will be answered.
            owned
                .behind
                .abandon(ErrorKind::Transport, "the server was lost");
        }
        loop {
            let behind = &mut owned.behind;
            let enough = match how {
                Settle::Room => behind.inflight.len() < WriteBehind::WINDOW,
                Settle::Ready | Settle::All => behind.inflight.is_empty(),
            };
            if enough {
                break;
            }
            let Some(conn) = behind.conn.as_mut() else {
                break;
            };
            if how == Settle::Ready && !conn.reply_ready() {
                break;
            }
            let Some(u) = behind.inflight.pop_front() else {
                break;
            };
            let deadline = Instant::now() + w.timeout;
            match conn.recv(u.request_id, "register", deadline, &w) {
                Ok(Response::Bool(is_new)) => {
                    Session::settle(owned, &u.key, u.page, is_new);
                }
                Ok(other) => {
                    // Whatever the server did, the page is not reused.
                    let e = unexpected("register", other);
                    behind.fail(&u.key, e.kind(), e.to_string());
                }
                Err(e) if e.surely_not_applied() => {
                    behind.fail(&u.key, e.kind(), e.to_string());
                    let _ = owned.free_page(u.page);
                }
                Err(e) => {
                    // The connection is unusable (a timed-out registration may still be
                    // applied, so its page stays taken too).
                    behind.fail(&u.key, e.kind(), e.to_string());
                    behind.abandon(e.kind(), "its connection failed");
                    if e.means_session_lost() {
                        self.fence.lose(&e.to_string());
                    }
                }
            }
        }
        self.publish_unsettled(owned);
    }

    /// Mirrors how many registrations are in flight where reads can see it without the lock.
    fn publish_unsettled(&self, owned: &Owned) {
        self.unsettled
            .store(owned.behind.inflight.len(), Ordering::Release);
    }

    /// Before a call that must see this handler's own stores: waits for every write-behind
    /// registration still in flight. Free (one atomic load) when there are none.
    fn settle_for_read(&self, hook: &dyn WaitHook) {
        if self.unsettled.load(Ordering::Acquire) > 0 {
            let mut owned = lock_hooked(&self.owned, hook);
            self.settle_behind(&mut owned, hook, Settle::All);
        }
    }

    /// Sends the registration of `key` at `page` without waiting for its reply.
    fn register_behind(
        &self,
        owned: &mut Owned,
        hook: &dyn WaitHook,
        req: &Request,
        key: &[u8],
        page: PageId,
    ) -> Result<StoreOutcome, StoreError> {
        // Replies are collected in bulk once half the window is out (one read for many), not
        // one system call per store.
        if owned.behind.inflight.len() >= WriteBehind::WINDOW / 2 {
            self.settle_behind(owned, hook, Settle::Ready);
            self.settle_behind(owned, hook, Settle::Room);
        }
        // Taken out and put back only if the send succeeds: a connection that failed a send
        // may hold part of a frame and is never reused.
        let sent = match owned.behind.conn.take() {
            Some(c) => Ok(c),
            None => self.link.open_conn(hook),
        }
        .and_then(|mut conn| {
            let id = conn.send(req, &self.link.wait(hook))?;
            Ok((conn, id))
        });
        let result = match sent {
            Ok((conn, request_id)) => {
                let behind = &mut owned.behind;
                behind.conn = Some(conn);
                behind.inflight.push_back(Unsettled {
                    request_id,
                    key: key.to_vec(),
                    page,
                });
                Ok(StoreOutcome::Sent)
            }
            Err(e) => {
                owned.behind.abandon(e.kind(), "its connection failed");
                if e.means_session_lost() {
                    self.fence.lose(&e.to_string());
                }
                if e.surely_not_applied() {
                    let _ = owned.free_page(page);
                }
                Err(e.into())
            }
        };
        self.publish_unsettled(owned);
        result
    }
}

/// A borrowed handler whose waits go through a [`WaitHook`]. Every operation of
/// [`MaruHandler`] is here; the handler's own methods use [`NoHook`].
pub struct Hooked<'a> {
    h: &'a MaruHandler,
    hook: &'a dyn WaitHook,
}

impl MaruHandler {
    /// A handler for `config` (validated here), not connected yet.
    pub fn new(config: MaruConfig) -> Result<MaruHandler, ConfigError> {
        let url = config.validate()?;
        let (host, pid, start_time) = local_identity();
        Ok(MaruHandler {
            identity: Identity {
                instance_id: config.instance_id.clone(),
                host,
                pid,
                start_time,
            },
            config,
            url,
            state: RwLock::new(State::Idle { last_error: None }),
            lifecycle: Mutex::new(()),
            on_region_added: Mutex::new(None),
        })
    }

    /// Waits of the returned adapter's calls go through `hook`.
    pub fn with_hook<'a>(&'a self, hook: &'a dyn WaitHook) -> Hooked<'a> {
        Hooked { h: self, hook }
    }

    pub fn config(&self) -> &MaruConfig {
        &self.config
    }
    pub fn instance_id(&self) -> &str {
        &self.config.instance_id
    }
    pub fn chunk_size(&self) -> u64 {
        self.config.chunk_size_bytes
    }
    /// Connected, not closing, and the server was not lost.
    pub fn is_connected(&self) -> bool {
        matches!(&*read(&self.state), State::Connected(s) if s.check_open().is_ok())
    }
    pub fn is_closed(&self) -> bool {
        matches!(&*read(&self.state), State::Closed)
    }

    fn session(&self) -> Result<Arc<Session>, StateError> {
        match &*read(&self.state) {
            State::Connected(s) => {
                s.check_open()?;
                Ok(s.clone())
            }
            State::Idle { last_error } => Err(StateError::NotConnected {
                last_error: last_error.clone(),
            }),
            State::Closed => Err(StateError::Closed),
        }
    }

    fn callback(&self) -> Option<RegionCallback> {
        self.on_region_added
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn fire(&self, added: &[(u64, u64)]) {
        if added.is_empty() {
            return;
        }
        if let Some(cb) = self.callback() {
            for &(id, pages) in added {
                cb(id, pages);
            }
        }
    }
}

macro_rules! forward {
    ($($(#[$m:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        impl MaruHandler {
            $(
                $(#[$m])*
                pub fn $name(&self $(, $arg: $ty)*) -> $ret {
                    self.with_hook(&NoHook).$name($($arg),*)
                }
            )*
        }
    };
}

forward! {
    /// Connects: handshake, first owned region of `pool_size` bytes (mapped and populated),
    /// and with `eager_map` every live region. Connecting a connected handler does nothing.
    fn connect(&self) -> Result<(), ConnectError>;
    /// Takes a page for a value of `size` bytes (at most the chunk size).
    fn alloc(&self, size: u64) -> Result<AllocHandle, AllocError>;
    /// Returns a page. If a key of ours still points at it, the key is deleted first.
    fn free(&self, page: PageId) -> Result<(), FreeError>;
    /// Registers an alloc'ed, written page under `key` (one round trip, no copy).
    fn store_handle(&self, key: &[u8], handle: &AllocHandle) -> Result<StoreOutcome, StoreError>;
    /// See [`Hooked::flush`].
    fn flush(&self) -> Result<(), StoreError>;
    /// Registers `len` bytes of an alloc'ed page under `key`.
    fn store_page(&self, key: &[u8], page: PageId, len: u64) -> Result<StoreOutcome, StoreError>;
    /// Copies `prefix` then `data` into a fresh page and registers it under `key`.
    fn store_bytes(&self, key: &[u8], prefix: &[u8], data: &[u8]) -> Result<StoreOutcome, StoreError>;
    /// Stores many entries with one round trip per `MAX_BATCH` entries.
    fn batch_store(&self, items: &[(&[u8], StoreItem<'_>)]) -> Result<Vec<StoreOutcome>, StoreError>;
    /// A view of `key`'s value, or `None` if the key does not exist.
    fn retrieve(&self, key: &[u8]) -> Result<Option<View>, RetrieveError>;
    fn batch_retrieve(&self, keys: &[&[u8]]) -> Result<Vec<Option<View>>, RetrieveError>;
    fn exists(&self, key: &[u8]) -> Result<bool, OpError>;
    fn batch_exists(&self, keys: &[&[u8]]) -> Result<Vec<bool>, OpError>;
    /// Deletes `key` (a pinned key stays) and frees its page if it is one of ours.
    fn delete(&self, key: &[u8]) -> Result<DeleteStatus, OpError>;
    fn batch_delete(&self, keys: &[&[u8]]) -> Result<Vec<DeleteStatus>, OpError>;
    /// Pins `key` against deletion; false if it does not exist.
    fn pin(&self, key: &[u8]) -> Result<bool, OpError>;
    fn batch_pin(&self, keys: &[&[u8]]) -> Result<Vec<bool>, OpError>;
    /// Unpins `key`; false if it was not pinned.
    fn unpin(&self, key: &[u8]) -> Result<bool, OpError>;
    fn batch_unpin(&self, keys: &[&[u8]]) -> Result<Vec<bool>, OpError>;
    /// Connected and the server answers a heartbeat.
    fn healthcheck(&self) -> bool;
    fn stats(&self) -> Result<HandlerStats, OpError>;
    /// Allocator state of every owned region (empty when not connected).
    fn owned_regions(&self) -> Vec<OwnedRegionStats>;
    /// Pages of a region: an owned region's allocator size, else the mapped size / stride.
    fn region_page_count(&self, region_id: u64) -> Option<u64>;
    /// A view of `len` bytes at `offset` of a mapped region (`None` if unmapped or outside).
    fn buffer(&self, region_id: u64, offset: u64, len: u64) -> Option<View>;
}

impl MaruHandler {
    /// Rejects new operations, waits for in-flight writes, says goodbye and drops the owned
    /// state. Views still alive keep their mappings. Never fails; idempotent.
    pub fn close(&self) {
        self.with_hook(&NoHook).close()
    }

    /// Sets (or clears) the callback for new owned regions; replays it for existing ones.
    pub fn set_on_region_added(&self, callback: Option<RegionCallback>) {
        self.with_hook(&NoHook).set_on_region_added(callback)
    }
}

impl Hooked<'_> {
    pub fn connect(&self) -> Result<(), ConnectError> {
        let h = self.h;
        let life = lock_hooked(&h.lifecycle, self.hook);
        match &*read(&h.state) {
            State::Connected(s) => return s.check_open().map_err(ConnectError::from),
            State::Closed => return Err(StateError::Closed.into()),
            State::Idle { .. } => {}
        }
        match self.open_session() {
            Ok((session, added)) => {
                *write(&h.state) = State::Connected(session);
                drop(life);
                h.fire(&added);
                Ok(())
            }
            Err(e) => {
                *write(&h.state) = State::Idle {
                    last_error: Some(e.to_string()),
                };
                Err(e)
            }
        }
    }

    fn open_session(&self) -> Result<(Arc<Session>, Added), ConnectError> {
        let h = self.h;
        let link = Link::establish(
            h.url.clone(),
            h.identity.clone(),
            h.config.max_inflight as usize,
            h.config.timeout(),
            h.config.reply_grace,
            h.config.busy_poll,
            self.hook,
        )?;
        let session = Arc::new(Session {
            link,
            stride: h.config.page_stride(),
            config: h.config.clone(),
            owned: Mutex::new(Owned::default()),
            regions: RwLock::new(HashMap::new()),
            closing: AtomicBool::new(false),
            fence: Arc::new(Fence::default()),
            watcher: Mutex::new(None),
            unsettled: AtomicUsize::new(0),
        });
        // The first region, then the watcher (on a connection of its own, joined to the
        // session): a server that fails the region request is reported as such.
        let started = session
            .new_owned_region(h.config.pool_size, self.hook)
            .and_then(|first| {
                let stream = session.link.open_stream(self.hook)?;
                let watcher = Watcher::start(stream, session.fence.clone()).map_err(|source| {
                    RpcError::Io {
                        op: "watch",
                        source,
                    }
                })?;
                Ok((first, watcher))
            });
        let (first, watcher) = match started {
            Ok(x) => x,
            Err(e) => {
                let _ = session.link.call(&Request::Goodbye, self.hook);
                session.link.close_all();
                return Err(e);
            }
        };
        *session.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
        let added = vec![(first.region.info.handle.region_id, first.alloc.page_count())];
        lock_hooked(&session.owned, self.hook).regions.push(first);
        if h.config.eager_map {
            session.map_all(self.hook);
        }
        Ok((session, added))
    }

    pub fn close(&self) {
        let h = self.h;
        let _life = lock_hooked(&h.lifecycle, self.hook);
        let prev = std::mem::replace(&mut *write(&h.state), State::Closed);
        if let State::Connected(s) = prev {
            s.closing.store(true, Ordering::Release);
            // Stop watching first: the watched connection closing now is no server loss.
            let watcher = s.watcher.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(mut w) = watcher {
                self.hook.block(&mut || w.stop());
            }
            // Wait for in-flight writes: they hold the write lock until their reply.
            let mut owned = lock_hooked(&s.owned, self.hook);
            s.settle_behind(&mut owned, self.hook, Settle::All);
            // Views of our pages may outlive the handler. Once we say goodbye our regions can
            // be freed and carved for another owner, so cut their writes off from the pool
            // first (if the server's loss did not already); reads through old views keep
            // working.
            s.fence.detach("closing");
            let _ = s.link.call(&Request::Goodbye, self.hook);
            *owned = Owned::default();
            drop(owned);
            write(&s.regions).clear();
            s.link.close_all();
        }
    }

    pub fn alloc(&self, size: u64) -> Result<AllocHandle, AllocError> {
        let s = self.h.session()?;
        if size > s.chunk() {
            return Err(AllocError::TooLarge {
                size,
                chunk: s.chunk(),
            });
        }
        let mut added = Vec::new();
        let result = {
            let mut owned = lock_hooked(&s.owned, self.hook);
            s.check_open()?;
            // Replies already here may free pages (keys that existed); collected in bulk.
            if owned.behind.inflight.len() >= WriteBehind::WINDOW / 2 {
                s.settle_behind(&mut owned, self.hook, Settle::Ready);
            }
            s.alloc_page(&mut owned, self.hook, &mut added)
        };
        self.h.fire(&added);
        let (region, page) = result?;
        Ok(AllocHandle {
            view: View {
                mapping: region.mapping.clone(),
                offset: (page * s.stride) as usize,
                len: size as usize,
                writable: true,
                region_id: region.info.handle.region_id,
                page_index: page,
            },
        })
    }

    pub fn free(&self, page: PageId) -> Result<(), FreeError> {
        let s = self.h.session()?;
        let mut owned = lock_hooked(&s.owned, self.hook);
        s.settle_behind(&mut owned, self.hook, Settle::All);
        s.check_open()?;
        if let Some(key) = owned.keys.get(&page).cloned() {
            // Take the key away first, so no reader can find the page once it is reused.
            match s.call(&Request::Delete { key: &key[..] }, self.hook)? {
                Response::Delete(DeleteStatus::Pinned) => {
                    return Err(FreeError::Pinned {
                        region_id: page.region_id,
                        page_index: page.page_index,
                    })
                }
                Response::Delete(_) => {
                    owned.stored.remove(&key[..]);
                    owned.keys.remove(&page);
                }
                other => return Err(unexpected("delete", other).into()),
            }
        }
        owned.free_page(page)
    }

    /// Waits until every write-behind registration ([`MaruConfig::write_behind`]) has been
    /// answered, so the keys stored so far are visible to every instance. Returns
    /// [`StoreError::Deferred`] if any registration failed since the last `flush` (each is
    /// also logged); those keys are not stored. Without write-behind there is nothing to wait
    /// for.
    pub fn flush(&self) -> Result<(), StoreError> {
        let s = self.h.session()?;
        let mut owned = lock_hooked(&s.owned, self.hook);
        s.settle_behind(&mut owned, self.hook, Settle::All);
        let behind = &mut owned.behind;
        match behind.first_error.take() {
            None => Ok(()),
            Some((first_kind, first)) => Err(StoreError::Deferred {
                failed: std::mem::take(&mut behind.failed),
                first,
                first_kind,
            }),
        }
    }

    pub fn store_handle(
        &self,
        key: &[u8],
        handle: &AllocHandle,
    ) -> Result<StoreOutcome, StoreError> {
        self.store_page(key, handle.page(), handle.size())
    }

    pub fn store_page(
        &self,
        key: &[u8],
        page: PageId,
        len: u64,
    ) -> Result<StoreOutcome, StoreError> {
        check_key(key)?;
        let s = self.h.session()?;
        if len > s.chunk() {
            return Err(StoreError::TooLarge {
                size: len,
                chunk: s.chunk(),
            });
        }
        let mut owned = lock_hooked(&s.owned, self.hook);
        s.check_open()?;
        Session::check_fresh_page(&mut owned, page)?;
        let req = Request::Register(RegisterEntry {
            key,
            region_id: page.region_id,
            offset: page.page_index * s.stride,
            len,
        });
        if s.config.write_behind {
            return s.register_behind(&mut owned, self.hook, &req, key, page);
        }
        match s.call(&req, self.hook)? {
            Response::Bool(is_new) => Ok(Session::settle(&mut owned, key, page, is_new)),
            other => Err(unexpected("register", other).into()),
        }
    }

    pub fn store_bytes(
        &self,
        key: &[u8],
        prefix: &[u8],
        data: &[u8],
    ) -> Result<StoreOutcome, StoreError> {
        check_key(key)?;
        let s = self.h.session()?;
        let total = (prefix.len() + data.len()) as u64;
        if total > s.chunk() {
            return Err(StoreError::TooLarge {
                size: total,
                chunk: s.chunk(),
            });
        }
        let mut added = Vec::new();
        let result = (|| {
            let mut owned = lock_hooked(&s.owned, self.hook);
            s.check_open()?;
            let (region, index) = s.alloc_page(&mut owned, self.hook, &mut added)?;
            let page = PageId {
                region_id: region.info.handle.region_id,
                page_index: index,
            };
            let at = (index * s.stride) as usize;
            // In bounds: the page lies inside the region and total <= chunk <= stride.
            let copied = region
                .mapping
                .write_at(at, prefix)
                .and_then(|()| region.mapping.write_at(at + prefix.len(), data));
            if let Err(e) = copied {
                let _ = owned.free_page(page);
                return Err(StoreError::Invalid(format!(
                    "copy into the page failed: {e}"
                )));
            }
            let req = Request::Register(RegisterEntry {
                key,
                region_id: page.region_id,
                offset: at as u64,
                len: total,
            });
            if s.config.write_behind {
                return s.register_behind(&mut owned, self.hook, &req, key, page);
            }
            match s.call(&req, self.hook) {
                Ok(Response::Bool(is_new)) => Ok(Session::settle(&mut owned, key, page, is_new)),
                // A reply of the wrong kind: whatever the server did, do not reuse the page.
                Ok(other) => Err(unexpected("register", other).into()),
                Err(e) => {
                    // After a timeout the server may still register the key at this page, so
                    // the page is only reused when the request surely had no effect (else it
                    // stays taken until close).
                    if e.surely_not_applied() {
                        let _ = owned.free_page(page);
                    }
                    Err(e.into())
                }
            }
        })();
        self.h.fire(&added);
        result
    }

    pub fn batch_store(
        &self,
        items: &[(&[u8], StoreItem<'_>)],
    ) -> Result<Vec<StoreOutcome>, StoreError> {
        let s = self.h.session()?;
        let chunk = s.chunk();
        // Check everything before touching any page.
        let mut seen = HashSet::new();
        for (key, item) in items {
            check_key(key)?;
            let size = match item {
                StoreItem::Page { page, len } => {
                    if !seen.insert(*page) {
                        return Err(StoreError::AlreadyStored {
                            region_id: page.region_id,
                            page_index: page.page_index,
                        });
                    }
                    *len
                }
                StoreItem::Bytes { prefix, data } => (prefix.len() + data.len()) as u64,
            };
            if size > chunk {
                return Err(StoreError::TooLarge { size, chunk });
            }
        }
        let mut added = Vec::new();
        let result = (|| {
            let mut owned = lock_hooked(&s.owned, self.hook);
            s.settle_behind(&mut owned, self.hook, Settle::All);
            s.check_open()?;
            for (_, item) in items {
                if let StoreItem::Page { page, .. } = item {
                    Session::check_fresh_page(&mut owned, *page)?;
                }
            }
            // Pages this call allocated: freed again if they end up not registered.
            let mut pages: Vec<(PageId, u64, bool)> = Vec::with_capacity(items.len());
            for (_, item) in items {
                match item {
                    StoreItem::Page { page, len } => pages.push((*page, *len, false)),
                    StoreItem::Bytes { prefix, data } => {
                        let got = s.alloc_page(&mut owned, self.hook, &mut added);
                        let (region, index) = match got {
                            Ok(x) => x,
                            Err(e) => {
                                for &(p, _, fresh) in &pages {
                                    if fresh {
                                        let _ = owned.free_page(p);
                                    }
                                }
                                return Err(e.into());
                            }
                        };
                        let at = (index * s.stride) as usize;
                        let _ = region.mapping.write_at(at, prefix);
                        let _ = region.mapping.write_at(at + prefix.len(), data);
                        let page = PageId {
                            region_id: region.info.handle.region_id,
                            page_index: index,
                        };
                        pages.push((page, (prefix.len() + data.len()) as u64, true));
                    }
                }
            }
            let mut out = Vec::with_capacity(items.len());
            for (batch_no, (batch, batch_pages)) in items
                .chunks(MAX_BATCH)
                .zip(pages.chunks(MAX_BATCH))
                .enumerate()
            {
                let entries: Vec<RegisterEntry> = batch
                    .iter()
                    .zip(batch_pages)
                    .map(|((key, _), &(page, len, _))| RegisterEntry {
                        key,
                        region_id: page.region_id,
                        offset: page.page_index * s.stride,
                        len,
                    })
                    .collect();
                let reply = s.call(&Request::BatchRegister(entries), self.hook);
                let flags = match reply {
                    Ok(Response::Bools(v)) if v.len() == batch.len() => Ok(v),
                    Ok(other) => Err((false, unexpected("batch_register", other))),
                    Err(e) => Err((e.surely_not_applied(), e)),
                };
                let flags = match flags {
                    Ok(v) => v,
                    Err((reusable, e)) => {
                        // Pages of later batches were never sent; this batch's only if the
                        // server surely did not apply it (see store_bytes).
                        let from = (batch_no + usize::from(!reusable)) * MAX_BATCH;
                        for &(p, _, fresh) in pages.iter().skip(from) {
                            if fresh {
                                let _ = owned.free_page(p);
                            }
                        }
                        return Err(e.into());
                    }
                };
                for (((key, _), &(page, _, _)), is_new) in batch.iter().zip(batch_pages).zip(flags)
                {
                    out.push(Session::settle(&mut owned, key, page, is_new));
                }
            }
            Ok(out)
        })();
        self.h.fire(&added);
        result
    }

    pub fn retrieve(&self, key: &[u8]) -> Result<Option<View>, RetrieveError> {
        check_key(key)?;
        let s = self.h.session()?;
        s.settle_for_read(self.hook);
        match s.call(&Request::Lookup { key }, self.hook)? {
            Response::Lookup(None) => Ok(None),
            Response::Lookup(Some(loc)) => {
                let region = s.region_for(&loc.region)?;
                Ok(Some(s.view(&region, loc.offset, loc.len)?))
            }
            other => Err(unexpected("lookup", other).into()),
        }
    }

    pub fn batch_retrieve(&self, keys: &[&[u8]]) -> Result<Vec<Option<View>>, RetrieveError> {
        for k in keys {
            check_key(k)?;
        }
        let s = self.h.session()?;
        s.settle_for_read(self.hook);
        let mut out = Vec::with_capacity(keys.len());
        for batch in keys.chunks(MAX_BATCH) {
            let req = Request::BatchLookup {
                keys: batch.to_vec(),
            };
            let (regions, entries) = match s.call(&req, self.hook)? {
                Response::BatchLookup { regions, entries } if entries.len() == batch.len() => {
                    (regions, entries)
                }
                other => return Err(unexpected("batch_lookup", other).into()),
            };
            let mut mapped: Vec<Option<Arc<Region>>> = vec![None; regions.len()];
            for slot in entries {
                let Some(slot) = slot else {
                    out.push(None);
                    continue;
                };
                let i = slot.region_index as usize;
                let info = regions.get(i).ok_or_else(|| {
                    RetrieveError::BadLocation(format!("region index {i} out of range"))
                })?;
                let region = match &mapped[i] {
                    Some(r) => r.clone(),
                    None => {
                        let r = s.region_for(info)?;
                        mapped[i] = Some(r.clone());
                        r
                    }
                };
                out.push(Some(s.view(&region, slot.offset, slot.len)?));
            }
        }
        Ok(out)
    }

    /// A single-key request answered with a boolean.
    fn bool_op(&self, key: &[u8], req: Request) -> Result<bool, OpError> {
        check_key(key)?;
        let s = self.h.session()?;
        s.settle_for_read(self.hook);
        let op = req.name();
        match s.call(&req, self.hook)? {
            Response::Bool(b) => Ok(b),
            other => Err(unexpected(op, other).into()),
        }
    }

    fn bools<'k>(
        &self,
        keys: &[&'k [u8]],
        make: impl Fn(Vec<&'k [u8]>) -> Request<'k>,
    ) -> Result<Vec<bool>, OpError> {
        for k in keys {
            check_key(k)?;
        }
        let s = self.h.session()?;
        s.settle_for_read(self.hook);
        let mut out = Vec::with_capacity(keys.len());
        for batch in keys.chunks(MAX_BATCH) {
            let req = make(batch.to_vec());
            let op = req.name();
            match s.call(&req, self.hook)? {
                Response::Bools(v) if v.len() == batch.len() => out.extend(v),
                other => return Err(unexpected(op, other).into()),
            }
        }
        Ok(out)
    }

    pub fn exists(&self, key: &[u8]) -> Result<bool, OpError> {
        self.bool_op(key, Request::Exists { key })
    }

    pub fn batch_exists(&self, keys: &[&[u8]]) -> Result<Vec<bool>, OpError> {
        self.bools(keys, |keys| Request::BatchExists { keys })
    }

    pub fn pin(&self, key: &[u8]) -> Result<bool, OpError> {
        self.bool_op(key, Request::Pin { key })
    }

    pub fn batch_pin(&self, keys: &[&[u8]]) -> Result<Vec<bool>, OpError> {
        self.bools(keys, |keys| Request::BatchPin { keys })
    }

    pub fn unpin(&self, key: &[u8]) -> Result<bool, OpError> {
        self.bool_op(key, Request::Unpin { key })
    }

    pub fn batch_unpin(&self, keys: &[&[u8]]) -> Result<Vec<bool>, OpError> {
        self.bools(keys, |keys| Request::BatchUnpin { keys })
    }

    pub fn delete(&self, key: &[u8]) -> Result<DeleteStatus, OpError> {
        check_key(key)?;
        let s = self.h.session()?;
        let mut owned = lock_hooked(&s.owned, self.hook);
        s.settle_behind(&mut owned, self.hook, Settle::All);
        s.check_open()?;
        match s.call(&Request::Delete { key }, self.hook)? {
            Response::Delete(status) => {
                if status != DeleteStatus::Pinned {
                    owned.forget_key(key);
                }
                Ok(status)
            }
            other => Err(unexpected("delete", other).into()),
        }
    }

    pub fn batch_delete(&self, keys: &[&[u8]]) -> Result<Vec<DeleteStatus>, OpError> {
        for k in keys {
            check_key(k)?;
        }
        let s = self.h.session()?;
        let mut owned = lock_hooked(&s.owned, self.hook);
        s.settle_behind(&mut owned, self.hook, Settle::All);
        s.check_open()?;
        let mut out = Vec::with_capacity(keys.len());
        for batch in keys.chunks(MAX_BATCH) {
            let req = Request::BatchDelete {
                keys: batch.to_vec(),
            };
            match s.call(&req, self.hook)? {
                Response::BatchDelete(v) if v.len() == batch.len() => {
                    for (key, status) in batch.iter().zip(&v) {
                        if *status != DeleteStatus::Pinned {
                            owned.forget_key(key);
                        }
                    }
                    out.extend(v);
                }
                other => return Err(unexpected("batch_delete", other).into()),
            }
        }
        Ok(out)
    }

    pub fn healthcheck(&self) -> bool {
        let Ok(s) = self.h.session() else {
            return false;
        };
        matches!(s.call(&Request::Heartbeat, self.hook), Ok(Response::Ok))
    }

    pub fn stats(&self) -> Result<HandlerStats, OpError> {
        let s = self.h.session()?;
        s.settle_for_read(self.hook);
        let server = match s.call(&Request::Stats, self.hook)? {
            Response::Stats(json) => serde_json::from_str::<ServerStats>(&json)
                .map_err(|e| OpError::BadReply(format!("server stats: {e}")))?,
            other => return Err(unexpected("stats", other).into()),
        };
        let regions = lock_hooked(&s.owned, self.hook).stats(s.chunk());
        Ok(HandlerStats { server, regions })
    }

    pub fn owned_regions(&self) -> Vec<OwnedRegionStats> {
        match self.h.session() {
            Ok(s) => lock_hooked(&s.owned, self.hook).stats(s.chunk()),
            Err(_) => Vec::new(),
        }
    }

    pub fn region_page_count(&self, region_id: u64) -> Option<u64> {
        let s = self.h.session().ok()?;
        if let Some(r) = lock_hooked(&s.owned, self.hook).region_mut(region_id) {
            return Some(r.alloc.page_count());
        }
        let len = read(&s.regions).get(&region_id)?.mapping.len() as u64;
        Some(len / s.stride)
    }

    pub fn buffer(&self, region_id: u64, offset: u64, len: u64) -> Option<View> {
        let s = self.h.session().ok()?;
        let region = read(&s.regions).get(&region_id)?.clone();
        s.view(&region, offset, len).ok()
    }

    pub fn set_on_region_added(&self, callback: Option<RegionCallback>) {
        *self
            .h
            .on_region_added
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = callback.clone();
        if let Some(cb) = callback {
            for r in self.owned_regions() {
                cb(r.region_id, r.page_count);
            }
        }
    }
}

impl Drop for MaruHandler {
    fn drop(&mut self) {
        self.close();
    }
}
