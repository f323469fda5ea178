//! The regions this handler owns and writes into: each with its page allocator, and the
//! books that tie pages to the keys registered at them. Everything here lives under the
//! handler's write lock ([`Connected::owned`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use maru_proto::{DeleteStatus, ErrorCode, Request, Response};
use maru_shm::{MapMode, Mapping, ShmError};

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
}

impl Owned {
    pub fn region_mut(&mut self, region_id: u64) -> Option<&mut OwnedRegion> {
        self.regions.iter_mut().find(|r| r.region_id() == region_id)
    }

    pub fn free_page(&mut self, page: PageId) -> Result<()> {
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

    /// Forgets a key that no longer exists at the server and frees its page.
    pub fn forget_key(&mut self, key: &[u8]) {
        if let Some(page) = self.stored.remove(key) {
            self.keys.remove(&page);
            let _ = self.free_page(page);
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
    /// The first region, at connect.
    Connect,
    /// Another region, because every owned page is taken.
    Expansion,
}

impl RegionFor {
    fn request_failed(self, e: Error) -> Error {
        match self {
            RegionFor::Connect => e,
            RegionFor::Expansion => {
                // The server had no room either: the pool is exhausted.
                let kind = match e.kind() {
                    ErrorKind::Remote(ErrorCode::PoolExhausted) => ErrorKind::Exhausted,
                    k => k,
                };
                let message =
                    format!("cannot allocate a page: pool exhausted and expansion failed: {e}");
                e.recast(kind, message)
            }
        }
    }

    fn unmappable(self, region_id: u64, e: ShmError) -> Error {
        let message = match self {
            RegionFor::Connect => format!("cannot map region {region_id}: {e}"),
            RegionFor::Expansion => format!(
                "cannot allocate a page: expansion region {region_id} cannot be mapped: {e}"
            ),
        };
        Error::shm(ErrorKind::Map, "request_region", message, e)
    }

    fn unusable(self, why: String) -> Error {
        let message = match self {
            RegionFor::Connect => format!("unusable region from the server: {why}"),
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
        let mapped = match bad {
            Some(msg) => Err(why.unusable(msg)),
            None => {
                let mut out: Option<Result<Mapping, ShmError>> = None;
                let path = Path::new(&info.access.path);
                let (offset, len) = (info.access.offset, info.access.len);
                hook.block(&mut || {
                    out = Some(Mapping::map(path, offset, len, MapMode::ReadWrite, true))
                });
                match out {
                    Some(Ok(m)) => Ok(m),
                    Some(Err(e)) => Err(why.unmappable(region_id, e)),
                    None => Err(why.unusable("the wait hook did not run the mapping".into())),
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
        let region = Arc::new(MappedRegion {
            info,
            mapping: Arc::new(mapping),
            owned: true,
        });
        self.fence.add(region_id, region.mapping.clone());
        write(&self.mapped).insert(region_id, region.clone());
        Ok(OwnedRegion {
            region,
            alloc: PageAllocator::new(pages as u32),
        })
    }

    /// Takes a page: active region, then any other owned region, then a new region.
    /// Regions added on the way are appended to `added`.
    pub fn alloc_page(
        &self,
        owned: &mut Owned,
        hook: &dyn WaitHook,
        added: &mut Vec<(u64, u64)>,
    ) -> Result<(Arc<MappedRegion>, u64)> {
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
        let exhausted = || {
            Error::new(
                ErrorKind::Exhausted,
                "alloc",
                "cannot allocate a page: pool exhausted and auto_expand is disabled",
            )
        };
        if !self.config.auto_expand {
            return Err(exhausted());
        }
        let mut region =
            self.new_owned_region(self.config.expand_bytes(), hook, RegionFor::Expansion)?;
        added.push((region.region_id(), region.alloc.page_count()));
        let page = region.alloc.alloc().ok_or_else(exhausted)?;
        let r = region.region.clone();
        owned.regions.push(region);
        owned.active = owned.regions.len() - 1;
        Ok((r, page))
    }
}

impl Hooked<'_> {
    pub fn alloc(&self, size: u64) -> Result<AllocHandle> {
        during("alloc", || {
            let c = self.h.connected()?;
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
                },
            })
        })
    }

    pub fn free(&self, page: PageId) -> Result<()> {
        during("free", || {
            let c = self.h.connected()?;
            let mut owned = lock_hooked(&c.owned, self.hook);
            c.settle_behind(&mut owned, self.hook, Settle::All);
            c.check_open()?;
            if let Some(key) = owned.keys.get(&page).cloned() {
                // Take the key away first, so no reader can find the page once it is reused.
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
    use maru_proto::{Access, Handle, RegionInfo};

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
            },
        };
        let region = Arc::new(MappedRegion {
            info,
            mapping: Arc::new(mapping),
            owned: true,
        });
        let alloc = PageAllocator::new(pages);
        (dir, OwnedRegion { region, alloc })
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

        owned.forget_key(b"k");
        assert!(owned.stored.is_empty() && owned.keys.is_empty());
        assert!(!owned.regions[0].alloc.is_allocated(a.page_index));
        owned.forget_key(b"unknown");
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
        let e = RegionFor::Connect.request_failed(full);
        assert_eq!(e.kind(), ErrorKind::Remote(ErrorCode::PoolExhausted));
        let e = RegionFor::Expansion.unusable("no page".into());
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert_eq!(
            e.to_string(),
            "cannot allocate a page: unusable expansion region: no page"
        );
    }
}
