//! The regions this handler owns and writes into: each with its page allocator, and the
//! books that tie pages to the keys registered at them. Everything here lives under the
//! handler's write lock ([`Connected::owned`]).

use std::collections::HashMap;
use std::sync::Arc;

use maru_proto::{DeleteStatus, ErrorCode, PageRef, RegionInfo, Request, Response};
use maru_shm::{Mapping, ShmError};

use super::connected::Connected;
use super::mapped::MappedRegion;
use super::write_behind::{Settle, WriteBehind};
use super::{during, lock_hooked, write, Hooked, StoreOutcome};
use crate::alloc::PageAllocator;
use crate::error::{Error, ErrorKind, Result};
use crate::view::{AllocHandle, PageId, View};
use crate::wait::WaitHook;

/// Hasher of the handler's page books: they hold only this handler's own keys, so no
/// hash-flooding defence is needed beyond foldhash's per-process seed.
type FastHash = foldhash::fast::RandomState;

pub(super) struct OwnedRegion {
    pub region: Arc<MappedRegion>,
    pub alloc: PageAllocator,
    /// The server asked for the region back: no page of it is handed out, and it goes back
    /// once every page is free (see [`Connected::give_back_reclaimed`]).
    pub retiring: bool,
}

impl OwnedRegion {
    pub fn region_id(&self) -> u64 {
        self.region.info.handle.region_id
    }
}

/// Everything the write lock protects.
#[derive(Default)]
pub(super) struct Owned {
    pub regions: Vec<OwnedRegion>,
    /// Index into `regions` of the region tried first.
    pub active: usize,
    /// Keys this handler registered, and the pages they point at (both directions), so that
    /// delete can free the page and free can take the key away. Every store updates them for
    /// every key, so each key is one shared allocation and the hasher is a fast one (SipHash
    /// and key copies would be a third of a 256-key batch's client time).
    pub stored: HashMap<Arc<[u8]>, PageId, FastHash>,
    pub keys: HashMap<PageId, Arc<[u8]>, FastHash>,
    pub behind: WriteBehind,
    /// Regions with `retiring` set.
    pub retiring: usize,
    /// Pages handed out before the server was lost and not stored then: their buffers
    /// write into the detached (private) copy of the region, so they are never stored; a
    /// free puts them back.
    pub stale: std::collections::HashSet<PageId>,
}

impl Owned {
    pub fn region_mut(&mut self, region_id: u64) -> Option<&mut OwnedRegion> {
        self.regions.iter_mut().find(|r| r.region_id() == region_id)
    }

    pub fn free_page(&mut self, page: PageId) -> Result<()> {
        self.stale.remove(&page);
        let freed = self
            .region_mut(page.region_id)
            .is_some_and(|r| r.alloc.free(page.page_index).is_ok());
        if freed {
            return Ok(());
        }
        Err(Error::invalid(
            "free",
            format!(
                "page {} of region {} is not tracked (already freed or not from alloc())",
                page.page_index, page.region_id
            ),
        ))
    }

    /// Forgets a key that no longer exists at the server. Its page stays allocated: the server
    /// returns it once no view holds it ([`Owned::absorb_returns`]).
    pub fn forget_key(&mut self, key: &[u8]) {
        if let Some(page) = self.stored.remove(key) {
            self.keys.remove(&page);
        }
    }

    /// Puts pages the server returned back on their free lists (forgetting the keys that
    /// pointed at them, when another handler deleted them).
    pub fn absorb_returns(&mut self, pages: Vec<PageRef>, stride: u64) {
        for p in pages {
            let page = PageId {
                region_id: p.region_id,
                page_index: p.offset / stride,
            };
            if let Some(key) = self.keys.remove(&page) {
                self.stored.remove(&key[..]);
            }
            if self.free_page(page).is_err() {
                tracing::debug!(
                    "the server returned page {} of region {}, which is not allocated here",
                    page.page_index,
                    page.region_id
                );
            }
        }
    }

    /// Checks that `page` is an allocated, not yet registered page of ours.
    pub fn check_fresh_page(&mut self, page: PageId) -> Result<()> {
        let allocated = self
            .region_mut(page.region_id)
            .is_some_and(|r| r.alloc.is_allocated(page.page_index));
        let (index, region) = (page.page_index, page.region_id);
        if !allocated {
            return Err(Error::invalid(
                "store",
                format!("page {index} of region {region} is not an allocated page of this handler"),
            ));
        }
        if self.stale.contains(&page) {
            return Err(Error::invalid(
                "store",
                format!(
                    "page {index} of region {region} was handed out before the metadata server \
                     was lost: what was written to it stayed private; free it and store again"
                ),
            ));
        }
        if self.keys.contains_key(&page) || self.behind.holds(page) {
            return Err(Error::invalid(
                "store",
                format!("page {index} of region {region} is already stored under another key"),
            ));
        }
        Ok(())
    }

    /// Books the outcome of registering `key` at `page`: a new key points at the page; a key
    /// that existed already (keys are write-once) leaves the page free again.
    pub fn book(&mut self, key: &[u8], page: PageId, is_new: bool) -> StoreOutcome {
        if is_new && self.retiring > 0 {
            // A key stored into a region asked back (from a page taken before the request
            // came) keeps the region: the give-back is declined, and its pages are used again.
            if let Some(r) = self.region_mut(page.region_id) {
                if std::mem::take(&mut r.retiring) {
                    self.retiring -= 1;
                }
            }
        }
        if is_new {
            let key: Arc<[u8]> = Arc::from(key);
            self.stored.insert(key.clone(), page);
            self.keys.insert(page, key);
            StoreOutcome::Stored
        } else {
            let _ = self.free_page(page);
            StoreOutcome::Deduplicated
        }
    }
}

/// Why a region is requested; its failures are told in those words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RegionFor {
    /// The first region, at the first `alloc` (connect needs no free space).
    First,
    /// Another region, because every owned page is taken.
    Expansion,
}

impl RegionFor {
    fn request_failed(self, e: Error) -> Error {
        // The server had no room: the pool is exhausted.
        let kind = match e.kind() {
            ErrorKind::Remote(ErrorCode::PoolExhausted) => ErrorKind::Exhausted,
            k => k,
        };
        let message = match (self, kind) {
            (RegionFor::First, ErrorKind::Exhausted) => {
                format!("cannot allocate a page: pool exhausted: {e}")
            }
            (RegionFor::Expansion, ErrorKind::Exhausted) => {
                format!("cannot allocate a page: pool exhausted and expansion failed: {e}")
            }
            _ => format!("cannot allocate a page: no new region could be had: {e}"),
        };
        e.recast(kind, message)
    }

    fn unmappable(self, region_id: u64, e: ShmError) -> Error {
        let message = match self {
            RegionFor::First => {
                format!("cannot allocate a page: region {region_id} cannot be mapped: {e}")
            }
            RegionFor::Expansion => format!(
                "cannot allocate a page: expansion region {region_id} cannot be mapped: {e}"
            ),
        };
        Error::shm(ErrorKind::Map, "request_region", message, e)
    }

    fn unusable(self, why: String) -> Error {
        let message = match self {
            RegionFor::First => format!("cannot allocate a page: unusable region: {why}"),
            RegionFor::Expansion => {
                format!("cannot allocate a page: unusable expansion region: {why}")
            }
        };
        Error::protocol("request_region", message)
    }
}

impl Connected {
    /// Asks the server for a region of `size` bytes and maps it read-write, populated.
    /// The populate costs ~0.7 ms per MiB, so it runs through the hook.
    pub fn new_owned_region(
        &self,
        size: u64,
        hook: &dyn WaitHook,
        why: RegionFor,
    ) -> Result<OwnedRegion> {
        let info = match self.call(&Request::RequestRegion { size }, hook) {
            Ok(Response::Region(info)) => info,
            Ok(other) => {
                return Err(why.request_failed(Error::unexpected("request_region", &other)))
            }
            Err(e) => return Err(why.request_failed(e)),
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
        let file = match bad {
            Some(msg) => Err(why.unusable(msg)),
            None => self.region_source(&info, true, "request_region", hook),
        };
        let mapped = match file {
            Err(e) => Err(e),
            Ok(source) => match source.map_owned(&info, hook) {
                Some(Ok(m)) => Ok(m),
                Some(Err(e)) => Err(why.unmappable(region_id, e)),
                None => Err(why.unusable("the wait hook did not run the mapping".into())),
            },
        };
        let mapping = match mapped {
            Ok(m) => m,
            Err(e) => {
                // Give the region back rather than leave it to the close-time sweep.
                let _ = self.call(&Request::ReturnRegion { region_id }, hook);
                return Err(e);
            }
        };
        Ok(OwnedRegion {
            region: self.install_owned(info, mapping),
            alloc: PageAllocator::new(pages as u32),
            retiring: false,
        })
    }

    /// An owned region, mapped: fenced (the watcher detaches it when the server goes) and
    /// found by its id from now on.
    pub fn install_owned(&self, info: RegionInfo, mapping: Mapping) -> Arc<MappedRegion> {
        let id = info.handle.region_id;
        let region = Arc::new(MappedRegion {
            info,
            mapping: Arc::new(mapping),
            owned: true,
        });
        self.fence.add(id, region.mapping.clone());
        write(&self.mapped).insert(id, region.clone());
        region
    }

    /// Takes a page: active region, then any other owned region, then a new region (the
    /// first one, or an expansion), then room the server makes in the owned regions by
    /// evicting their victims (a full pool).
    /// Regions added on the way are appended to `added`.
    pub fn alloc_page(
        &self,
        owned: &mut Owned,
        hook: &dyn WaitHook,
        added: &mut Vec<(u64, u64)>,
    ) -> Result<(Arc<MappedRegion>, u64)> {
        self.take_returns(owned);
        if let Some(found) = take_free_page(owned) {
            return Ok(found);
        }
        // Write-behind stores still in flight may be of keys that already existed: their
        // replies give those pages back, so they are all collected before more room is sought.
        if !owned.behind.inflight.is_empty() {
            self.settle_behind(owned, hook, Settle::All);
            if let Some(found) = take_free_page(owned) {
                return Ok(found);
            }
        }
        // Pages deleted a moment ago may be on their way back: the server returns them on the
        // watch connection before it answers the delete, so one sync there brings every page
        // it has returned so far.
        if !owned.regions.is_empty() && self.link.sync(hook, self.config.timeout()) {
            self.take_returns(owned);
            if let Some(found) = take_free_page(owned) {
                return Ok(found);
            }
        }
        let exhausted = || {
            Error::new(
                ErrorKind::Exhausted,
                "alloc",
                "cannot allocate a page: pool exhausted and auto_expand is disabled",
            )
        };
        // The first region comes with the first alloc, never with connect: a handler that
        // only reads needs no free space, and connects to a full pool.
        let (size, why) = if owned.regions.is_empty() {
            (self.config.pool_size, RegionFor::First)
        } else if self.config.auto_expand {
            (self.config.expand_bytes(), RegionFor::Expansion)
        } else {
            return self.room_in_own_regions(owned, hook, exhausted());
        };
        let mut region = match self.new_owned_region(size, hook, why) {
            // The pool has no region left: room comes from this handler's own keys.
            Err(e) if why == RegionFor::Expansion && e.kind() == ErrorKind::Exhausted => {
                return self.room_in_own_regions(owned, hook, e)
            }
            r => r?,
        };
        added.push((region.region_id(), region.alloc.page_count()));
        let page = region.alloc.alloc().ok_or_else(exhausted)?;
        let r = region.region.clone();
        owned.regions.push(region);
        owned.active = owned.regions.len() - 1;
        Ok((r, page))
    }
}

impl Connected {
    /// Asks the server to evict victims of this handler's own regions (`MakeRoom`) and takes
    /// one of the pages it frees. `otherwise` is the error when it frees none: everything
    /// left in these regions is pinned or viewed (or, at a server restarted a moment ago,
    /// kept for the views of sessions that have not come back yet).
    fn room_in_own_regions(
        &self,
        owned: &mut Owned,
        hook: &dyn WaitHook,
        otherwise: Error,
    ) -> Result<(Arc<MappedRegion>, u64)> {
        let pages: u64 = owned.regions.iter().map(|r| r.alloc.page_count()).sum();
        let want = (pages / ROOM_SHARE).clamp(1, ROOM_MAX);
        let freed = match self.call(&Request::MakeRoom { pages: want as u32 }, hook) {
            Ok(Response::ReturnPages(freed)) => freed,
            Ok(other) => return Err(Error::unexpected("make_room", &other)),
            // A server that does not know the request has nothing to give.
            Err(e) if e.kind() == ErrorKind::Remote(ErrorCode::UnknownMessage) => {
                return Err(otherwise)
            }
            Err(e) => return Err(e),
        };
        owned.absorb_returns(freed, self.stride);
        take_free_page(owned).ok_or_else(|| {
            let (kind, message) = (otherwise.kind(), otherwise.to_string());
            otherwise.recast(
                kind,
                format!(
                    "{message}; nothing in this handler's regions could be evicted (every key \
                     left there is pinned or viewed, or kept for the views of sessions a \
                     restarted server is still waiting for)"
                ),
            )
        })
    }
}

impl Connected {
    /// Puts the pages the server returned back on their free lists, after marking the regions
    /// it asked back (taken in that order, see [`crate::watch::Reclaims::take`]), and gives
    /// back those of them that are wholly free now.
    pub fn take_returns(&self, owned: &mut Owned) {
        let pages = self.link.returns.take();
        let asked = self.link.reclaims.take();
        for id in asked {
            if let Some(r) = owned.region_mut(id) {
                if !std::mem::replace(&mut r.retiring, true) {
                    owned.retiring += 1;
                }
            }
        }
        owned.absorb_returns(pages, self.stride);
        if owned.retiring > 0 {
            self.give_back_free(owned);
        }
    }

    /// Gives back every region asked back whose pages are all on its free list: none is in
    /// the application's hands (an `alloc` handle not yet stored or freed) and none holds a
    /// key, so no one may write or read it through this handler any more. The region leaves
    /// the books and the mapped set and its mapping is detached from the pool *before* the
    /// server hears of it, so it is carved for another owner only once nothing here can
    /// write it.
    fn give_back_free(&self, owned: &mut Owned) {
        let mut i = 0;
        while i < owned.regions.len() {
            let r = &owned.regions[i];
            if !(r.retiring && r.alloc.allocated_pages() == 0) {
                i += 1;
                continue;
            }
            let region_id = r.region_id();
            owned.regions.remove(i);
            owned.retiring -= 1;
            if owned.active > i || owned.active >= owned.regions.len() {
                owned.active = owned.active.saturating_sub(1);
            }
            write(&self.mapped).remove(&region_id);
            self.fence.forget(region_id);
            self.link.give_back(region_id);
            tracing::debug!(region = region_id, "gave a region back to the server");
        }
    }

    /// What the watcher calls when the server asks for regions back, and on its ticks while
    /// one still waits: acts only when the write lock is free now (a caller holding it acts
    /// itself, in its next `alloc`). True while a region asked back waits for its pages.
    pub fn give_back_reclaimed(&self) -> bool {
        let Ok(mut owned) = self.owned.try_lock() else {
            return true;
        };
        self.take_returns(&mut owned);
        owned.retiring > 0
    }
}

/// A handler that must make room asks for this share of its pages at once (so one request
/// serves the next stores too), and at most [`ROOM_MAX`].
const ROOM_SHARE: u64 = 16;
const ROOM_MAX: u64 = 128;

/// A free page of an owned region that is not being given back: the active region first,
/// then the others.
fn take_free_page(owned: &mut Owned) -> Option<(Arc<MappedRegion>, u64)> {
    if let Some(r) = owned.regions.get_mut(owned.active) {
        if !r.retiring {
            if let Some(p) = r.alloc.alloc() {
                return Some((r.region.clone(), p));
            }
        }
    }
    let active = owned.active;
    for (i, r) in owned.regions.iter_mut().enumerate() {
        if i == active || r.retiring {
            continue;
        }
        if let Some(p) = r.alloc.alloc() {
            owned.active = i;
            return Some((r.region.clone(), p));
        }
    }
    None
}

impl Hooked<'_> {
    pub fn alloc(&self, size: u64) -> Result<AllocHandle> {
        during("alloc", || {
            let c = self.h.connected(self.hook)?;
            if size > c.chunk() {
                return Err(Error::invalid(
                    "alloc",
                    format!("requested size {size} exceeds chunk_size {}", c.chunk()),
                ));
            }
            let mut added = Vec::new();
            let result = {
                let mut owned = lock_hooked(&c.owned, self.hook);
                c.check_open()?;
                // Replies already here may free pages (keys that existed); collected in bulk.
                if owned.behind.inflight.len() >= WriteBehind::WINDOW / 2 {
                    c.settle_behind(&mut owned, self.hook, Settle::Ready);
                }
                c.alloc_page(&mut owned, self.hook, &mut added)
            };
            self.h.fire(&added);
            let (region, page) = result?;
            Ok(AllocHandle {
                view: View {
                    mapping: region.mapping.clone(),
                    offset: (page * c.stride) as usize,
                    len: size as usize,
                    writable: true,
                    region_id: region.info.handle.region_id,
                    page_index: page,
                    generation: 0,
                    hold: None,
                },
            })
        })
    }

    pub fn free(&self, page: PageId) -> Result<()> {
        during("free", || {
            let c = self.h.connected(self.hook)?;
            let mut owned = lock_hooked(&c.owned, self.hook);
            c.settle_behind(&mut owned, self.hook, Settle::All);
            c.check_open()?;
            if let Some(key) = owned.keys.get(&page).cloned() {
                // A stored page is freed by deleting its key: the server returns the page once
                // no view holds it (a reader's view never sees it rewritten).
                match c.call(&Request::Delete { key: &key[..] }, self.hook)? {
                    Response::Delete(DeleteStatus::Pinned) => {
                        return Err(Error::invalid(
                            "free",
                            format!(
                                "page {} of region {} holds a pinned key; unpin it first",
                                page.page_index, page.region_id
                            ),
                        ))
                    }
                    Response::Delete(_) => {
                        owned.stored.remove(&key[..]);
                        owned.keys.remove(&page);
                        return Ok(());
                    }
                    other => return Err(Error::unexpected("delete", &other)),
                }
            }
            owned.free_page(page)
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use maru_proto::{Access, Handle};
    use maru_shm::MapMode;

    /// An owned region of `pages` 4 KiB pages over a file in a temp dir under /dev/shm.
    pub fn owned_region(region_id: u64, pages: u32) -> (tempfile::TempDir, OwnedRegion) {
        let dir = maru_testkit::temp_dir();
        let path = dir.path().join("region");
        let len = u64::from(pages) * 4096;
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        let mapping = Mapping::map(&path, 0, len, MapMode::ReadWrite, false).unwrap();
        let info = RegionInfo {
            handle: Handle {
                region_id,
                pool: path.display().to_string(),
                offset: 0,
                len,
                owner: "test".into(),
                token: [0; maru_proto::TOKEN_LEN],
            },
            access: Access {
                path: path.display().to_string(),
                offset: 0,
                len,
                page_size: 4096,
                pool_uuid: [0; 16],
            },
        };
        let region = Arc::new(MappedRegion {
            info,
            mapping: Arc::new(mapping),
            owned: true,
        });
        let alloc = PageAllocator::new(pages);
        (
            dir,
            OwnedRegion {
                region,
                alloc,
                retiring: false,
            },
        )
    }

    /// Books holding one owned region of `pages` pages (see [`owned_region`]).
    pub fn books_with_region(region_id: u64, pages: u32) -> (tempfile::TempDir, Owned) {
        let (dir, region) = owned_region(region_id, pages);
        let mut owned = Owned::default();
        owned.regions.push(region);
        (dir, owned)
    }

    fn page(region_id: u64, page_index: u64) -> PageId {
        PageId {
            region_id,
            page_index,
        }
    }

    #[test]
    fn a_page_is_freed_once_and_only_if_it_is_ours() {
        let (_dir, mut owned) = books_with_region(7, 2);
        let p = owned.regions[0].alloc.alloc().unwrap();
        owned.free_page(page(7, p)).unwrap();
        for bad in [page(7, p), page(7, 99), page(8, 0)] {
            let e = owned.free_page(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(e.to_string().contains("is not tracked"), "{e}");
        }
    }

    #[test]
    fn the_books_follow_stores_duplicates_and_forgotten_keys() {
        let (_dir, mut owned) = books_with_region(1, 4);
        let a = page(1, owned.regions[0].alloc.alloc().unwrap());
        let b = page(1, owned.regions[0].alloc.alloc().unwrap());
        let never = page(1, 3);
        let e = owned.check_fresh_page(never).unwrap_err();
        assert!(e.to_string().contains("not an allocated page"), "{e}");

        owned.check_fresh_page(a).unwrap();
        assert_eq!(owned.book(b"k", a, true), StoreOutcome::Stored);
        let e = owned.check_fresh_page(a).unwrap_err();
        assert!(e.to_string().contains("already stored"), "{e}");
        assert_eq!(owned.stored.get(&b"k"[..]), Some(&a));

        // A key that existed already: the second page goes back.
        assert_eq!(owned.book(b"k", b, false), StoreOutcome::Deduplicated);
        assert!(!owned.regions[0].alloc.is_allocated(b.page_index));

        // A forgotten key's page stays taken until the server returns it.
        owned.forget_key(b"k");
        assert!(owned.stored.is_empty() && owned.keys.is_empty());
        assert!(owned.regions[0].alloc.is_allocated(a.page_index));
        owned.forget_key(b"unknown");
        owned.absorb_returns(
            vec![PageRef {
                region_id: 1,
                offset: a.page_index * 4096,
            }],
            4096,
        );
        assert!(!owned.regions[0].alloc.is_allocated(a.page_index));
        // A returned page of a key another handler deleted leaves the books too.
        let c = page(1, owned.regions[0].alloc.alloc().unwrap());
        owned.book(b"c", c, true);
        owned.absorb_returns(
            vec![PageRef {
                region_id: 1,
                offset: c.page_index * 4096,
            }],
            4096,
        );
        assert!(owned.stored.is_empty() && !owned.regions[0].alloc.is_allocated(c.page_index));
    }

    #[test]
    fn expansion_failures_say_so_and_a_full_pool_is_exhaustion() {
        let full = Error::remote(
            "request_region",
            maru_proto::WireError::new(ErrorCode::PoolExhausted, "no room"),
        );
        let e = RegionFor::Expansion.request_failed(full);
        assert_eq!(e.kind(), ErrorKind::Exhausted);
        assert!(e
            .to_string()
            .starts_with("cannot allocate a page: pool exhausted and expansion failed: "));
        let full = Error::remote(
            "request_region",
            maru_proto::WireError::new(ErrorCode::PoolExhausted, "no room"),
        );
        let e = RegionFor::First.request_failed(full);
        assert_eq!(e.kind(), ErrorKind::Exhausted);
        assert!(e
            .to_string()
            .starts_with("cannot allocate a page: pool exhausted: "));
        let e = RegionFor::Expansion.unusable("no page".into());
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert_eq!(
            e.to_string(),
            "cannot allocate a page: unusable expansion region: no page"
        );
    }
}
