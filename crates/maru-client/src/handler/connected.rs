//! The live state of a connected handler ([`Connected`]): the session's connection pool, its
//! owned and mapped regions, the fence that detaches them when the server is lost and the
//! watcher that notices it. Connect builds it; close takes it apart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use maru_proto::{Request, Response};

use super::ahead::CopyRate;
use super::index_read::ClientIndex;
use super::mapped::MappedRegion;
use super::owned::Owned;
use super::pool_check::PoolCheck;
use super::region_fd::{FdMode, RegionFds};
use super::write_behind::Settle;
use super::{during, lock_hooked, read, write, Added, Hooked, Lifecycle};
use crate::claims::Claims;
use crate::config::MaruConfig;
use crate::connections::{Books, ConnectionPool, Sharing, Timing};
use crate::error::{Error, Result};
use crate::fork::{self, Birth};
use crate::view::PageId;
use crate::wait::WaitHook;
use crate::watch::{Fence, WatchLink, Watcher};

pub(super) struct Connected {
    pub conns: ConnectionPool,
    pub config: MaruConfig,
    /// Distance between two pages of a region (see [`MaruConfig::page_stride`]).
    pub stride: u64,
    pub owned: Mutex<Owned>,
    /// Every region this handler has mapped, its own and other instances', by id.
    pub mapped: RwLock<HashMap<u64, Arc<MappedRegion>>>,
    /// Set by close() before it waits for in-flight writes; writers check it under the lock.
    pub closing: AtomicBool,
    /// The owned mappings to detach from the pool when the session ends, and whether the
    /// server was lost.
    pub fence: Arc<Fence>,
    /// Watches the session's own connection for the server's loss; stopped by close().
    pub watcher: Mutex<Option<Watcher>>,
    /// The watch connection's shared side: pages returned to us, syncs, releases.
    pub link: Arc<WatchLink>,
    /// Write-behind registrations in flight (`Owned::behind.inflight.len()`, readable without
    /// the write lock, so that reads wait for them only when there are any).
    pub unsettled: AtomicUsize,
    /// The process generation the session was opened in (see `fork.rs`).
    pub birth: Birth,
    /// The server's key index, mapped read-only when this host can open it (see
    /// `index_read`).
    pub index: Option<ClientIndex>,
    /// This host's path of the pool and the pools whose headers were checked (see
    /// `pool_check`).
    pub pools: PoolCheck,
    /// Whether regions are mapped from descriptors the server passes (see `region_fd`).
    pub fds: RegionFds,
    /// The restarted server refused to resume this session.
    pub resume_refused: AtomicBool,
    /// How fast this handler's long copies go (for the `Ahead` of the next one).
    pub copy_rate: CopyRate,
}

impl Connected {
    pub fn chunk(&self) -> u64 {
        self.config.chunk_size_bytes
    }

    /// Gives up a session inherited through `fork()` without touching the parent's
    /// connections (see `fork.rs`). Locks another thread held at the fork stay held in the
    /// child, so each is only tried: what it guards is then left open, not waited for.
    pub fn abandon_after_fork(self: Arc<Self>) {
        let mut fds = self.conns.raw_fds();
        if let Ok(Some(w)) = self.watcher.try_lock().as_deref() {
            fds.extend(w.raw_fds());
        }
        if let Ok(owned) = self.owned.try_lock() {
            fds.extend(owned.behind.raw_fd());
        }
        fork::abandon(self, fds);
    }

    pub fn check_open(&self) -> Result<()> {
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::closed());
        }
        if self.fence.is_lost() {
            return Err(Error::server_lost());
        }
        Ok(())
    }

    /// One round trip. When it shows the server gone (it closed or reset the connection, or
    /// says our session ended), the owned mappings are detached at once, without waiting for
    /// the watcher, and the session is marked lost; the error itself is returned as it is.
    pub fn call(&self, req: &Request, hook: &dyn WaitHook) -> Result<Response> {
        let result = self.conns.call(req, hook);
        if let Err(e) = &result {
            self.lose_if_gone(e);
        }
        result
    }

    /// Marks the session lost if `e` shows the server gone.
    pub fn lose_if_gone(&self, e: &Error) {
        if e.means_session_lost() {
            self.fence.lose(&e.to_string());
        }
    }

    /// Maps every live region we do not have yet (eager_map). Best effort: a region that
    /// fails to map now is mapped lazily at retrieve.
    fn map_all(&self, hook: &dyn WaitHook) {
        if let Ok(Response::Regions(list)) = self.call(&Request::ListRegions, hook) {
            for info in list {
                let _ = self.region_for(&info, hook);
            }
        }
    }
}

impl Hooked<'_> {
    pub fn connect(&self) -> Result<()> {
        during("connect", || {
            let h = self.h;
            let transition = lock_hooked(&h.transition, self.hook);
            match &*read(&h.lifecycle) {
                Lifecycle::Connected(c) => return c.check_open(),
                Lifecycle::Closed => return Err(Error::closed()),
                Lifecycle::Idle { .. } => {}
            }
            match self.open_session() {
                Ok((connected, added)) => {
                    *write(&h.lifecycle) = Lifecycle::Connected(connected);
                    drop(transition);
                    h.fire(&added);
                    Ok(())
                }
                Err(e) => {
                    *write(&h.lifecycle) = Lifecycle::Idle {
                        last_error: Some(e.to_string()),
                    };
                    Err(e)
                }
            }
        })
    }

    fn open_session(&self) -> Result<(Arc<Connected>, Added)> {
        let h = self.h;
        let fd_mode = FdMode::from_env()?.given_pool_path(h.config.pool_path_here().is_some());
        let timing = Timing {
            timeout: h.config.timeout(),
            grace: h.config.reply_grace,
            busy_poll: h.config.busy_poll,
        };
        let conns = ConnectionPool::establish(
            h.url.clone(),
            h.identity.here(),
            Sharing {
                pipelined: h.config.use_async_rpc,
                max_inflight: h.config.max_inflight as usize,
            },
            timing,
            self.hook,
        )?;
        let c = self.build(conns, fd_mode, Owned::default())?;
        let added = Vec::new();
        if h.config.eager_map {
            c.map_all(self.hook);
        }
        Ok((c, added))
    }

    /// The live state over a session's pool: its watcher started, `owned` its books.
    fn build(
        &self,
        conns: ConnectionPool,
        fd_mode: FdMode,
        owned: Owned,
    ) -> Result<Arc<Connected>> {
        let h = self.h;
        // The watcher, on a connection of its own joined to the session.
        let fence = Arc::new(Fence::default());
        let started = conns.open_stream(self.hook).and_then(|stream| {
            Watcher::start(stream, fence.clone(), conns.releases.clone())
                .map_err(|e| Error::io("watch", e))
        });
        let (watcher, link) = match started {
            Ok(w) => w,
            Err(e) => {
                let _ = conns.call(&Request::Goodbye, self.hook);
                conns.close_all();
                return Err(e);
            }
        };
        let index = conns.index.as_ref().and_then(ClientIndex::open);
        // Holds without a round trip need the index to recheck against.
        let lane = conns
            .index
            .as_ref()
            .and_then(|ix| ix.lane.as_ref())
            .filter(|_| index.is_some())
            .and_then(open_lane);
        conns.releases.set_lane(lane);
        let c = Arc::new(Connected {
            index,
            conns,
            stride: h.config.page_stride(),
            config: h.config.clone(),
            owned: Mutex::new(owned),
            mapped: RwLock::new(HashMap::new()),
            closing: AtomicBool::new(false),
            fence,
            watcher: Mutex::new(None),
            link,
            unsettled: AtomicUsize::new(0),
            birth: Birth::now(),
            pools: PoolCheck::new(h.config.pool_path_here()),
            fds: RegionFds::new(fd_mode),
            resume_refused: AtomicBool::new(false),
            copy_rate: CopyRate::default(),
        });
        *c.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
        // Regions the server asks back go back from the watcher's thread, so an idle handler
        // gives them back too. Weak: the watcher must not keep the handler alive (close()
        // stops it first).
        let weak = Arc::downgrade(&c);
        c.link.reclaims.set_action(Box::new(move || {
            weak.upgrade().is_some_and(|c| c.give_back_reclaimed())
        }));
        Ok(c)
    }

    /// After the server was lost: takes the session up again at the restarted server with
    /// the regions it owns and the pins and live view holds of its books (see
    /// `ConnectionPool::resume`; what the server refuses leaves the books). The old state's
    /// owned mappings were detached when the server was lost; every region the server gives
    /// back to the session is mapped again, shared, and its pages handed out before the loss
    /// and not stored are kept from being stored (their bytes stayed in the detached copy).
    /// Regions the server refused are dropped with the keys this handler stored in them.
    pub(super) fn resume(&self, old: &Arc<Connected>) -> Result<Arc<Connected>> {
        let h = self.h;
        // Stop the old watcher (its connection is gone) before its state is taken apart.
        let watcher = old.watcher.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut w) = watcher {
            self.hook.block(&mut || w.stop());
        }
        let ids: Vec<u64> = lock_hooked(&old.owned, self.hook)
            .regions
            .iter()
            .map(|r| r.region_id())
            .collect();
        let timing = Timing {
            timeout: h.config.timeout(),
            grace: h.config.reply_grace,
            busy_poll: h.config.busy_poll,
        };
        let books = Books {
            releases: old.conns.releases.clone(),
            pins: old.conns.pins.clone(),
        };
        let claims = Claims::take(&books.releases, &books.pins);
        let resumed = ConnectionPool::resume(
            h.url.clone(),
            old.conns.identity().clone(),
            old.conns.token(),
            &ids,
            &claims,
            books,
            Sharing {
                pipelined: h.config.use_async_rpc,
                max_inflight: h.config.max_inflight as usize,
            },
            timing,
            self.hook,
        );
        let (conns, refused) = match resumed {
            Ok((conns, refused)) => {
                let (pins_lost, holds_lost) = claims.granted(&refused.pins, &refused.holds);
                if pins_lost + holds_lost > 0 {
                    tracing::info!(
                        "maru: resume: the restarted server did not take back {pins_lost} \
                         pin(s) and {holds_lost} view hold(s) (keys gone or changed); views \
                         without a hold read as raw addresses do"
                    );
                }
                (conns, refused.regions)
            }
            Err(e) => {
                claims.failed();
                // The server answered and will not take the session back: later calls fail
                // as lost without asking again.
                if matches!(e.kind(), crate::ErrorKind::Remote(_)) {
                    old.resume_refused.store(true, Ordering::Release);
                }
                return Err(e);
            }
        };
        let mut owned = std::mem::take(&mut *lock_hooked(&old.owned, self.hook));
        // Registrations in flight when the server went are unknown: their pages stay
        // allocated, and their keys are not booked.
        owned.behind = Default::default();
        let fd_mode = FdMode::from_env()?.given_pool_path(h.config.pool_path_here().is_some());
        let regions = std::mem::take(&mut owned.regions);
        let c = self.build(conns, fd_mode, owned)?;
        let mut owned = lock_hooked(&c.owned, self.hook);
        let mut kept = Vec::new();
        let mut dropped = refused;
        for mut r in regions {
            let id = r.region_id();
            if dropped.contains(&id) {
                continue;
            }
            let info = r.region.info.clone();
            let source = c.region_source(&info, true, "resume", self.hook);
            let mapped = source.and_then(|s| match s.map_owned(&info, self.hook) {
                Some(Ok(m)) => Ok(m),
                Some(Err(e)) => Err(Error::io("resume", std::io::Error::other(e.to_string()))),
                None => Err(Error::io(
                    "resume",
                    std::io::Error::other("the wait hook did not run the mapping"),
                )),
            });
            let mapping = match mapped {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(
                        "maru: resume: cannot map region {id} again ({e}); it is given back"
                    );
                    let _ = c.call(&Request::ReturnRegion { region_id: id }, self.hook);
                    dropped.push(id);
                    continue;
                }
            };
            r.region = c.install_owned(info, mapping);
            kept.push(r);
        }
        // Pages allocated and not stored were handed out over the detached mapping.
        for r in &kept {
            for index in 0..r.alloc.page_count() {
                let page = PageId {
                    region_id: r.region_id(),
                    page_index: index,
                };
                if r.alloc.is_allocated(index) && !owned.keys.contains_key(&page) {
                    owned.stale.insert(page);
                }
            }
        }
        owned.regions = kept;
        owned.active = 0;
        owned.retiring = owned.regions.iter().filter(|r| r.retiring).count();
        let gone: Vec<Arc<[u8]>> = owned
            .stored
            .iter()
            .filter(|(_, p)| dropped.contains(&p.region_id))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            owned.forget_key(&k);
        }
        owned.stale.retain(|p| !dropped.contains(&p.region_id));
        drop(owned);
        tracing::info!(
            "maru: the session resumed at the restarted metadata server ({} region(s) refused)",
            dropped.len()
        );
        Ok(c)
    }

    pub fn close(&self) {
        let h = self.h;
        let _transition = lock_hooked(&h.transition, self.hook);
        let prev = std::mem::replace(&mut *write(&h.lifecycle), Lifecycle::Closed);
        if let Lifecycle::Connected(c) = prev {
            if c.birth.inherited() {
                c.abandon_after_fork();
                return;
            }
            c.closing.store(true, Ordering::Release);
            // Stop watching first: the watched connection closing now is no server loss.
            let watcher = c.watcher.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(mut w) = watcher {
                self.hook.block(&mut || w.stop());
            }
            // Wait for in-flight writes: they hold the write lock until their reply.
            let mut owned = lock_hooked(&c.owned, self.hook);
            c.settle_behind(&mut owned, self.hook, Settle::All);
            // Views of our pages may outlive the handler. Once we say goodbye our regions can
            // be freed and carved for another owner, so cut their writes off from the pool
            // first (if the server's loss did not already); reads through old views keep
            // working.
            c.fence.detach("closing");
            let _ = c.conns.call(&Request::Goodbye, self.hook);
            *owned = Owned::default();
            drop(owned);
            write(&c.mapped).clear();
            c.conns.close_all();
        }
    }
}

/// The session's lane of the server's hold lanes, if this host can map it read-write.
fn open_lane(info: &maru_proto::LaneInfo) -> Option<Arc<maru_index::LaneWriter>> {
    match maru_index::LaneWriter::open(std::path::Path::new(&info.path), info.lane, info.tag) {
        Ok(w) => Some(Arc::new(w)),
        Err(e) => {
            tracing::debug!("view holds take a round trip: {e}");
            None
        }
    }
}
