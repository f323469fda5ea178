//! Storing: registering written pages under keys, one key per round trip or a batch per
//! round trip (with write-behind, see `write_behind`, a single store does not wait).
//!
//! The write lock is held across the registration's round trip: pages and their keys are
//! booked in the order the server applied them.

use std::collections::HashSet;

use maru_proto::{RegisterEntry, Request, Response, MAX_BATCH};

use super::ahead::{CopyAhead, Via};
use super::connected::Connected;
use super::owned::Owned;
use super::write_behind::Settle;
use super::{check_key, during, lock_hooked, Added, Hooked};
use crate::error::{Error, Result};
use crate::view::{AllocHandle, PageId};

/// What a successful store did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The key is new and now points at the page.
    Stored,
    /// The key already existed (keys are write-once): the new page was freed — or this very
    /// page was already stored under this key, and stays.
    Deduplicated,
    /// Write-behind ([`MaruConfig::write_behind`](crate::MaruConfig::write_behind)): the
    /// registration is on its way; a later call books its outcome (and frees the page if
    /// the key already existed).
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

impl StoreItem<'_> {
    /// The bytes a store of this item copies (none for a page written already).
    pub fn copy_len(&self) -> usize {
        match self {
            StoreItem::Bytes { prefix, data } => prefix.len() + data.len(),
            StoreItem::Page { .. } => 0,
        }
    }
}

fn check_size(size: u64, chunk: u64) -> Result<()> {
    if size > chunk {
        return Err(Error::invalid(
            "store",
            format!("data of {size} bytes exceeds chunk_size {chunk}"),
        ));
    }
    Ok(())
}

/// Frees the pages a failed batch allocated itself (`fresh`), from the `from`-th on.
fn free_fresh(owned: &mut Owned, pages: &[(PageId, u64, bool)], from: usize) {
    for &(p, _, fresh) in pages.iter().skip(from) {
        if fresh {
            let _ = owned.free_page(p);
        }
    }
}

impl Connected {
    /// Registers `key` at `page` (`req`) and books the outcome. With write-behind the
    /// request is only sent. When the server surely did not apply it, a page the store took
    /// itself (`own_page`) is freed again; after a timeout or a lost connection it may still
    /// be registered, so it stays taken until close.
    fn register(
        &self,
        owned: &mut Owned,
        hook: &dyn crate::WaitHook,
        req: &Request,
        key: &[u8],
        page: PageId,
        own_page: bool,
    ) -> Result<StoreOutcome> {
        if self.config.write_behind {
            return self.register_behind(owned, hook, req, key, page);
        }
        match self.call(req, hook) {
            Ok(Response::Bool(is_new)) => Ok(owned.book(key, page, is_new)),
            // A reply of the wrong kind: whatever the server did, do not reuse the page.
            Ok(other) => Err(Error::unexpected("register", &other)),
            Err(e) => {
                if own_page && e.surely_not_applied() {
                    let _ = owned.free_page(page);
                }
                Err(e)
            }
        }
    }
}

impl Hooked<'_> {
    pub fn store_handle(&self, key: &[u8], handle: &AllocHandle) -> Result<StoreOutcome> {
        during("store_handle", || {
            self.store_page(key, handle.page(), handle.size())
        })
    }

    pub fn store_page(&self, key: &[u8], page: PageId, len: u64) -> Result<StoreOutcome> {
        during("store_page", || {
            check_key(key)?;
            let c = self.h.connected(self.hook)?;
            check_size(len, c.chunk())?;
            let mut owned = lock_hooked(&c.owned, self.hook);
            c.check_open()?;
            if owned.keys.get(&page).is_some_and(|k| **k == *key) {
                // The same page under the same key again: already done.
                return Ok(StoreOutcome::Deduplicated);
            }
            owned.check_fresh_page(page)?;
            let req = Request::Register(RegisterEntry {
                key,
                region_id: page.region_id,
                offset: page.page_index * c.stride,
                len,
            });
            c.register(&mut owned, self.hook, &req, key, page, false)
        })
    }

    pub fn store_bytes(&self, key: &[u8], prefix: &[u8], data: &[u8]) -> Result<StoreOutcome> {
        during("store_bytes", || {
            check_key(key)?;
            let c = self.h.connected(self.hook)?;
            check_size((prefix.len() + data.len()) as u64, c.chunk())?;
            let mut added = Vec::new();
            let result = self.copy_and_register(&c, key, prefix, data, &mut added);
            self.h.fire(&added);
            result
        })
    }

    fn copy_and_register(
        &self,
        c: &Connected,
        key: &[u8],
        prefix: &[u8],
        data: &[u8],
        added: &mut Added,
    ) -> Result<StoreOutcome> {
        let total = (prefix.len() + data.len()) as u64;
        let mut owned = lock_hooked(&c.owned, self.hook);
        c.check_open()?;
        let (region, index) = c.alloc_page(&mut owned, self.hook, added)?;
        let page = PageId {
            region_id: region.info.handle.region_id,
            page_index: index,
        };
        let at = (index * c.stride) as usize;
        // In bounds: the page lies inside the region and total <= chunk <= stride.
        let via = match owned.behind.connection() {
            _ if !c.config.write_behind => Via::Shared,
            Some(conn) => Via::Behind(conn),
            None => Via::Unknown,
        };
        let mut copy = CopyAhead::new(c, total as usize, via);
        let copied = copy
            .copy(&region.mapping, at, prefix)
            .and_then(|()| copy.copy(&region.mapping, at + prefix.len(), data));
        if let Err(e) = copied {
            let _ = owned.free_page(page);
            return Err(Error::invalid(
                "store",
                format!("copy into the page failed: {e}"),
            ));
        }
        let req = Request::Register(RegisterEntry {
            key,
            region_id: page.region_id,
            offset: at as u64,
            len: total,
        });
        c.register(&mut owned, self.hook, &req, key, page, true)
    }

    pub fn batch_store(&self, items: &[(&[u8], StoreItem<'_>)]) -> Result<Vec<StoreOutcome>> {
        during("batch_store", || {
            let c = self.h.connected(self.hook)?;
            let chunk = c.chunk();
            // Check everything before touching any page.
            let mut seen = HashSet::new();
            for (key, item) in items {
                check_key(key)?;
                let size = match item {
                    StoreItem::Page { page, len } => {
                        if !seen.insert(*page) {
                            return Err(Error::invalid(
                                "store",
                                format!(
                                    "page {} of region {} is already stored under another key",
                                    page.page_index, page.region_id
                                ),
                            ));
                        }
                        *len
                    }
                    StoreItem::Bytes { prefix, data } => (prefix.len() + data.len()) as u64,
                };
                check_size(size, chunk)?;
            }
            let mut added = Vec::new();
            let result = self.batch_register(&c, items, &mut added);
            self.h.fire(&added);
            result
        })
    }

    fn batch_register(
        &self,
        c: &Connected,
        items: &[(&[u8], StoreItem<'_>)],
        added: &mut Added,
    ) -> Result<Vec<StoreOutcome>> {
        let mut owned = lock_hooked(&c.owned, self.hook);
        c.settle_behind(&mut owned, self.hook, Settle::All);
        c.check_open()?;
        for (_, item) in items {
            if let StoreItem::Page { page, .. } = item {
                owned.check_fresh_page(*page)?;
            }
        }
        // Pages this call allocated (`true`): freed again if they end up not registered.
        let mut pages: Vec<(PageId, u64, bool)> = Vec::with_capacity(items.len());
        let copied = items.iter().map(|(_, item)| item.copy_len()).sum();
        let mut copy = CopyAhead::new(c, copied, Via::Shared);
        for (_, item) in items {
            match item {
                StoreItem::Page { page, len } => pages.push((*page, *len, false)),
                StoreItem::Bytes { prefix, data } => {
                    let (region, index) = match c.alloc_page(&mut owned, self.hook, added) {
                        Ok(x) => x,
                        Err(e) => {
                            free_fresh(&mut owned, &pages, 0);
                            return Err(e);
                        }
                    };
                    let at = (index * c.stride) as usize;
                    let _ = copy.copy(&region.mapping, at, prefix);
                    let _ = copy.copy(&region.mapping, at + prefix.len(), data);
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
                    offset: page.page_index * c.stride,
                    len,
                })
                .collect();
            let flags = match c.call(&Request::BatchRegister(entries), self.hook) {
                Ok(Response::Bools(v)) if v.len() == batch.len() => v,
                reply => {
                    let (reusable, e) = match reply {
                        Ok(other) => (false, Error::unexpected("batch_register", &other)),
                        Err(e) => (e.surely_not_applied(), e),
                    };
                    // Pages of later batches were never sent; this batch's only if the server
                    // surely did not apply it (see `Connected::register`).
                    let from = (batch_no + usize::from(!reusable)) * MAX_BATCH;
                    free_fresh(&mut owned, &pages, from);
                    return Err(e);
                }
            };
            for (((key, _), &(page, _, _)), is_new) in batch.iter().zip(batch_pages).zip(flags) {
                out.push(owned.book(key, page, is_new));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::owned::tests::books_with_region;
    use super::*;

    #[test]
    fn a_failed_batch_frees_only_its_own_pages_from_the_first_unsent_one() {
        let (_dir, mut owned) = books_with_region(1, 4);
        let mut take = || PageId {
            region_id: 1,
            page_index: owned.regions[0].alloc.alloc().unwrap(),
        };
        let (caller, sent, unsent) = (take(), take(), take());
        let pages = [(caller, 1, false), (sent, 1, true), (unsent, 1, true)];
        free_fresh(&mut owned, &pages, 2);
        let alloc = &owned.regions[0].alloc;
        assert!(
            alloc.is_allocated(caller.page_index),
            "the caller's page stays"
        );
        assert!(
            alloc.is_allocated(sent.page_index),
            "a sent page may be registered"
        );
        assert!(!alloc.is_allocated(unsent.page_index));
    }

    #[test]
    fn data_above_the_chunk_size_is_refused() {
        check_size(4096, 4096).unwrap();
        let e = check_size(4097, 4096).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
        assert_eq!(e.to_string(), "data of 4097 bytes exceeds chunk_size 4096");
    }
}
