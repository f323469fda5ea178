//! Key operations that write no page: retrieve (a view into the value's mapping), exists,
//! pin and unpin, and delete, each single and batched (one round trip per `MAX_BATCH` keys).
//! Each first waits for this handler's own write-behind registrations, so it sees its stores.

use std::sync::{Arc, MutexGuard};

use maru_proto::{DeleteStatus, Request, Response, MAX_BATCH};

use super::connected::Connected;
use super::mapped::MappedRegion;
use super::owned::Owned;
use super::write_behind::Settle;
use super::{check_key, check_keys, during, lock_hooked, read, Hooked, Lifecycle};
use crate::claims::PinBook;
use crate::error::{Error, Result};
use crate::view::View;
use crate::wait::WaitHook;

impl Hooked<'_> {
    pub fn retrieve(&self, key: &[u8]) -> Result<Option<View>> {
        during("retrieve", || {
            check_key(key)?;
            let c = self.h.connected(self.hook)?;
            c.settle_for_read(self.hook);
            if let Some(ix) = c.live_index() {
                let mut out = [None];
                if c.lane_views(ix, &[key], &mut out, &mut Vec::new())? {
                    if let Some(view) = out[0].take() {
                        return Ok(Some(view));
                    }
                }
            }
            match c.call(&Request::Lookup { key }, self.hook)? {
                Response::Lookup(None) => Ok(None),
                Response::Lookup(Some(loc)) => {
                    let id = loc.region.handle.region_id;
                    let hold = c.book_holds([(key, id, loc.offset, loc.generation)]);
                    let region = c.region_for(&loc.region, self.hook)?;
                    let hold = hold.into_iter().next().expect("one hold booked");
                    Ok(Some(c.held_view(
                        &region,
                        loc.offset,
                        loc.len,
                        loc.generation,
                        hold,
                    )?))
                }
                other => Err(Error::unexpected("lookup", &other)),
            }
        })
    }

    /// Views of `keys`: from the key index with holds in the session's lane where it can, the
    /// rest in one round trip per `MAX_BATCH` keys.
    pub fn batch_retrieve(&self, keys: &[&[u8]]) -> Result<Vec<Option<View>>> {
        during("batch_retrieve", || {
            check_keys(keys)?;
            let c = self.h.connected(self.hook)?;
            c.settle_for_read(self.hook);
            let Some(ix) = c.live_index() else {
                return self.asked_batch_retrieve(&c, keys);
            };
            let mut out = vec![None; keys.len()];
            let mut rest = Vec::new();
            if !c.lane_views(ix, keys, &mut out, &mut rest)? {
                return self.asked_batch_retrieve(&c, keys);
            }
            if rest.is_empty() {
                return Ok(out);
            }
            let asked: Vec<&[u8]> = rest.iter().map(|&i| keys[i]).collect();
            let views = self.asked_batch_retrieve(&c, &asked)?;
            for (i, view) in rest.into_iter().zip(views) {
                out[i] = view;
            }
            Ok(out)
        })
    }

    /// `batch_retrieve` through the server: it takes the holds.
    fn asked_batch_retrieve(&self, c: &Connected, keys: &[&[u8]]) -> Result<Vec<Option<View>>> {
        let mut out = Vec::with_capacity(keys.len());
        for batch in keys.chunks(MAX_BATCH) {
            let req = Request::BatchLookup {
                keys: batch.to_vec(),
            };
            let (regions, entries) = match c.call(&req, self.hook)? {
                Response::BatchLookup { regions, entries } if entries.len() == batch.len() => {
                    (regions, entries)
                }
                other => return Err(Error::unexpected("batch_lookup", &other)),
            };
            // Every slot's region, checked before anything is booked.
            let mut found = Vec::with_capacity(batch.len());
            for (key, slot) in batch.iter().zip(&entries) {
                let Some(slot) = slot else { continue };
                let i = slot.region_index as usize;
                let info = regions.get(i).ok_or_else(|| {
                    Error::protocol(
                        "batch_lookup",
                        format!(
                            "the server returned an unusable location: region index {i} \
                             out of range"
                        ),
                    )
                })?;
                found.push((*key, info.handle.region_id, slot.offset, slot.generation));
            }
            let mut holds = c.book_holds(found).into_iter();
            let mut mapped: Vec<Option<Arc<MappedRegion>>> = vec![None; regions.len()];
            for slot in entries {
                let Some(slot) = slot else {
                    out.push(None);
                    continue;
                };
                let hold = holds.next().expect("a hold booked for each slot found");
                let i = slot.region_index as usize;
                let region = match &mapped[i] {
                    Some(r) => r.clone(),
                    None => {
                        let r = c.region_for(&regions[i], self.hook)?;
                        mapped[i] = Some(r.clone());
                        r
                    }
                };
                out.push(Some(c.held_view(
                    &region,
                    slot.offset,
                    slot.len,
                    slot.generation,
                    hold,
                )?));
            }
        }
        Ok(out)
    }

    /// A single-key request answered with a boolean.
    fn bool_op(&self, key: &[u8], req: Request) -> Result<bool> {
        check_key(key)?;
        let c = self.h.connected(self.hook)?;
        c.settle_for_read(self.hook);
        let op = req.name();
        match c.call(&req, self.hook)? {
            Response::Bool(b) => Ok(b),
            other => Err(Error::unexpected(op, &other)),
        }
    }

    /// A request per `MAX_BATCH` keys, each answered with one boolean per key.
    fn bools<'k>(
        &self,
        keys: &[&'k [u8]],
        make: impl Fn(Vec<&'k [u8]>) -> Request<'k>,
    ) -> Result<Vec<bool>> {
        check_keys(keys)?;
        let c = self.h.connected(self.hook)?;
        c.settle_for_read(self.hook);
        let mut out = Vec::with_capacity(keys.len());
        for batch in keys.chunks(MAX_BATCH) {
            let req = make(batch.to_vec());
            let op = req.name();
            match c.call(&req, self.hook)? {
                Response::Bools(v) if v.len() == batch.len() => out.extend(v),
                other => return Err(Error::unexpected(op, &other)),
            }
        }
        Ok(out)
    }

    /// From the server's key index when this host maps it (no round trip), else asked.
    pub fn exists(&self, key: &[u8]) -> Result<bool> {
        during("exists", || match self.index_exists(key)? {
            Some(b) => Ok(b),
            None => self.bool_op(key, Request::Exists { key }),
        })
    }

    /// As [`Hooked::exists`], for each key.
    pub fn batch_exists(&self, keys: &[&[u8]]) -> Result<Vec<bool>> {
        during("batch_exists", || match self.index_batch_exists(keys)? {
            Some(v) => Ok(v),
            None => self.bools(keys, |keys| Request::BatchExists { keys }),
        })
    }

    // Pins and unpins are booked by the handler too, so that a resume after a server
    // restart can claim them back (`claims`).

    pub fn pin(&self, key: &[u8]) -> Result<bool> {
        during("pin", || {
            let found = self.bool_op(key, Request::Pin { key })?;
            if let (true, Some(book)) = (found, self.pin_book()) {
                book.pinned(key);
            }
            Ok(found)
        })
    }

    pub fn batch_pin(&self, keys: &[&[u8]]) -> Result<Vec<bool>> {
        during("batch_pin", || {
            let found = self.bools(keys, |keys| Request::BatchPin { keys })?;
            if let Some(book) = self.pin_book() {
                for (key, _) in keys.iter().zip(&found).filter(|(_, f)| **f) {
                    book.pinned(key);
                }
            }
            Ok(found)
        })
    }

    pub fn unpin(&self, key: &[u8]) -> Result<bool> {
        during("unpin", || {
            let had = self.bool_op(key, Request::Unpin { key })?;
            if let Some(book) = self.pin_book() {
                book.unpinned(key, had);
            }
            Ok(had)
        })
    }

    pub fn batch_unpin(&self, keys: &[&[u8]]) -> Result<Vec<bool>> {
        during("batch_unpin", || {
            let had = self.bools(keys, |keys| Request::BatchUnpin { keys })?;
            if let Some(book) = self.pin_book() {
                for (key, h) in keys.iter().zip(&had) {
                    book.unpinned(key, *h);
                }
            }
            Ok(had)
        })
    }

    /// The session's pin book, without waiting: an answered pin is booked even when the
    /// server is lost right after (a resume carries the book over; a pin the restarted
    /// server does not have leaves it at the next unpin).
    fn pin_book(&self) -> Option<Arc<PinBook>> {
        match &*read(&self.h.lifecycle) {
            Lifecycle::Connected(c) => Some(c.conns.pins.clone()),
            _ => None,
        }
    }

    /// Whether the page at `offset` of region `region_id` still holds the registration of
    /// `generation` (a [`View::generation`]): for readers that kept only an address.
    pub fn page_current(&self, region_id: u64, offset: u64, generation: u64) -> Result<bool> {
        during("page_current", || {
            let c = self.h.connected(self.hook)?;
            let req = Request::PageCurrent {
                page: maru_proto::PageRef { region_id, offset },
                generation,
            };
            match c.call(&req, self.hook)? {
                Response::Bool(b) => Ok(b),
                other => Err(Error::unexpected("page_current", &other)),
            }
        })
    }

    /// Moves the deadline of every pin this handler holds to now + the server's pin TTL.
    pub fn renew_pins(&self) -> Result<()> {
        during("renew_pins", || {
            let c = self.h.connected(self.hook)?;
            match c.call(&Request::RenewPins, self.hook)? {
                Response::Ok => Ok(()),
                other => Err(Error::unexpected("renew_pins", &other)),
            }
        })
    }

    pub fn delete(&self, key: &[u8]) -> Result<DeleteStatus> {
        during("delete", || {
            check_key(key)?;
            let c = self.h.connected(self.hook)?;
            let mut owned = lock_deleting(&c, self.hook)?;
            match c.call(&Request::Delete { key }, self.hook)? {
                Response::Delete(status) => {
                    forget_deleted(&mut owned, key, status);
                    Ok(status)
                }
                other => Err(Error::unexpected("delete", &other)),
            }
        })
    }

    pub fn batch_delete(&self, keys: &[&[u8]]) -> Result<Vec<DeleteStatus>> {
        during("batch_delete", || {
            check_keys(keys)?;
            let c = self.h.connected(self.hook)?;
            let mut owned = lock_deleting(&c, self.hook)?;
            let mut out = Vec::with_capacity(keys.len());
            for batch in keys.chunks(MAX_BATCH) {
                let req = Request::BatchDelete {
                    keys: batch.to_vec(),
                };
                match c.call(&req, self.hook)? {
                    Response::BatchDelete(v) if v.len() == batch.len() => {
                        for (key, status) in batch.iter().zip(&v) {
                            forget_deleted(&mut owned, key, *status);
                        }
                        out.extend(v);
                    }
                    other => return Err(Error::unexpected("batch_delete", &other)),
                }
            }
            Ok(out)
        })
    }
}

/// The write lock for a delete, once this handler's own registrations are settled (a key it
/// stored behind must be known before it can be forgotten).
fn lock_deleting<'c>(c: &'c Connected, hook: &dyn WaitHook) -> Result<MutexGuard<'c, Owned>> {
    let mut owned = lock_hooked(&c.owned, hook);
    c.settle_behind(&mut owned, hook, Settle::All);
    c.check_open()?;
    Ok(owned)
}

/// A deleted key of ours leaves the books; its page comes back when the server returns it
/// (once no view holds it). A pinned key stays, with its page.
fn forget_deleted(owned: &mut Owned, key: &[u8], status: DeleteStatus) {
    if status != DeleteStatus::Pinned {
        owned.forget_key(key);
    }
}
