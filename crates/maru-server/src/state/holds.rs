//! View holds and page returns: the page side of §8 of docs/ARCHITECTURE.md.
//!
//! A lookup that answers a client session with a view takes a *hold* on the page, in the same
//! operation (under the region's mutex, after checking the key still points there). The
//! session counts its holds per page and releases them with [`ServerState::release_holds`]
//! when its views are gone, or all at once when it ends. Holds never expire.
//!
//! A page is *returned* to its region's owner — a notice on the owner's watch connection,
//! after which the owner's allocator may hand the page out again — exactly when no key
//! points at it and no hold is on it: [`ServerState::detach_key`] is the one place a key
//! leaves its page (delete and eviction), and `release_page_holds` the one place a
//! hold ends; both return the page once both counts are zero (unless it parks for a
//! session that has not resumed after a restart: `parking`). A region goes back to the
//! resource manager once its owner let it go, no key points into it and no page of it is
//! held or parked (`regions::take_if_unreferenced`).
//!
//! Every registration also gets a *generation* from a counter that never repeats, kept with
//! the page and returned with each lookup, so a reader that kept only an address can ask
//! whether the page still holds what it read ([`ServerState::page_current`]).
//!
//! Pages go back to their owners through `notices`.
//!
//! Lock order: a region's mutex, then (after releasing it) a session's hold book or outbox;
//! the outbox is innermost.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use maru_proto::PageRef;

use super::notices::Returned;
use super::regions::{RegionState, TableRegion};
use super::sessions::Session;
use super::{lock, IdMap, ServerState};
use crate::registry::{Entry, KeyRegistry, PAGE_ALIGN};

/// What the server knows of one page of a region that a key points at or a view holds.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PageRec {
    /// The latest registration at the page.
    pub generation: u64,
    /// Keys pointing at the page (one, unless a client registered a page twice).
    pub keys: u32,
    /// Holds of views over the page, of any session.
    pub holds: u32,
    /// Freed during a restarted server's reconnect grace and kept for the sessions that
    /// have not resumed (see `parking`).
    pub parked: bool,
}

/// The holds one session has, by (region slot, page).
#[derive(Default)]
pub(crate) struct HoldBook {
    by_page: IdMap<(u32, u32), u32>,
}

impl HoldBook {
    /// Holds the session has, each page's counted.
    pub(super) fn holds(&self) -> u64 {
        self.by_page.values().map(|&n| u64::from(n)).sum()
    }
}

/// A hold a resuming session claims (see [`ServerState::restore_holds`]).
pub(crate) struct Claim {
    pub page: PageRef,
    pub generation: u64,
    pub count: u32,
}

/// The most keys of a batch lookup one lock of a region's mutex covers: a batch of one region
/// keeps that region's registrations and deletes waiting for at most this many lookups.
const HOLD_RUN: usize = 64;

/// Holds counted at their pages and not yet booked for their session: (region, page, count).
/// The last region also saves a batch's next key of the same region a table lookup.
#[derive(Default)]
pub(crate) struct Holds {
    taken: Vec<(Arc<TableRegion>, u32, u32)>,
}

impl Holds {
    pub(super) fn add(&mut self, region: &Arc<TableRegion>, page: u32, count: u32) {
        self.taken.push((region.clone(), page, count));
    }

    fn last_region(&self, slot: u32) -> Option<Arc<TableRegion>> {
        self.taken
            .last()
            .filter(|(r, ..)| r.slot.0 == slot)
            .map(|(r, ..)| r.clone())
    }
}

/// A found key with the hold taken on its page (if a session asked for one).
pub(crate) struct Held {
    pub region: Arc<TableRegion>,
    pub offset: u64,
    pub len: u64,
    pub generation: u64,
}

fn page_of(entry: &Entry) -> u32 {
    (entry.offset() / PAGE_ALIGN) as u32
}

impl ServerState {
    pub(super) fn next_generation(&self) -> u64 {
        self.next_generation.fetch_add(1, Ordering::Relaxed)
    }

    /// Books a new registration at `entry`'s page (under the region's mutex), with the
    /// generation the key index gave it, or a fresh one.
    pub(super) fn attach_key(&self, st: &mut RegionState, entry: &Entry, generation: Option<u64>) {
        let rec = st.pages.entry(page_of(entry)).or_default();
        rec.keys += 1;
        rec.generation = generation.unwrap_or_else(|| self.next_generation());
    }

    /// A key leaves its page (deleted, or evicted), under the region's mutex, which the
    /// caller holds and has already uncounted the key from `refs` under. Returns the page for
    /// its owner when nothing holds it any more; a held page stays detached until its last
    /// hold goes (see `release_page_holds`).
    pub(super) fn detach_key(
        &self,
        region: &TableRegion,
        st: &mut RegionState,
        entry: &Entry,
    ) -> Option<PageRef> {
        let page = page_of(entry);
        let rec = st.pages.get_mut(&page)?;
        rec.keys = rec.keys.saturating_sub(1);
        self.free_if_unused(region, st, page)
    }

    /// Looks `key` up and, for a session, takes a hold on its page in the same step.
    pub(crate) fn find_and_hold(&self, session: Option<&Session>, key: &[u8]) -> Option<Held> {
        let mut holds = Holds::default();
        let held = self.hold_found(session.is_some(), key, None, &mut holds)?;
        match session {
            Some(s) if !self.book_holds(s, &mut holds) => None,
            _ => Some(held),
        }
    }

    /// Gives a resumed session the holds of its live views from before the restart: `claims`
    /// are (namespace-scoped key, claim). A claim is granted only where a lookup of the key
    /// by the session would take the same hold now — the key exists, points at the claimed
    /// page, and the page holds the claimed registration — or where the page is parked and
    /// was freed from the claimed registration (`parking`): either way the view shows what
    /// it showed before the restart. Returns the positions of the refused claims, ascending.
    pub(super) fn restore_holds(&self, session: &Session, claims: &[(Vec<u8>, Claim)]) -> Vec<u32> {
        let mut refused = Vec::new();
        for (i, (key, claim)) in claims.iter().enumerate() {
            // A key gone since the restart may have left its page parked for this view.
            let mut holds = Holds::default();
            let found = self
                .hold_found(true, key, Some(claim), &mut holds)
                .is_some();
            if !(found && self.book_holds(session, &mut holds) || self.hold_parked(session, claim))
            {
                refused.push(i as u32);
            }
        }
        refused
    }

    /// Looks `key` up and, for a session (`hold`), takes holds on its page in the same step:
    /// one, or for a resumed `claim` its count, and only if the key is where the claim says.
    /// The holds are counted at the page and go into `holds`, for the caller to book.
    fn hold_found(
        &self,
        hold: bool,
        key: &[u8],
        claim: Option<&Claim>,
        holds: &mut Holds,
    ) -> Option<Held> {
        loop {
            let entry = self.registry.lookup(key)?;
            let region = match holds.last_region(entry.region.0) {
                Some(r) => r,
                None => self.table().by_slot.get(&entry.region.0).cloned()?,
            };
            if claim.is_some_and(|c| {
                c.page.region_id != region.info.handle.region_id || c.page.offset != entry.offset()
            }) {
                return None;
            }
            let mut st = lock(&region.state);
            // Deletes remove keys under this mutex: if the key still points here now, its page
            // cannot be returned before the hold below is counted.
            match self.registry.lookup(key) {
                Some(now) if now.same_place(&entry) => {}
                Some(_) if claim.is_some() => return None,
                Some(_) => continue,
                None => return None,
            }
            return self.hold_at(&region, &mut st, &entry, hold, claim, holds);
        }
    }

    /// [`find_and_hold`](Self::find_and_hold) for every key of `keys`, each answer to `each`,
    /// in order; the holds go into `holds`, for [`book_holds`](Self::book_holds) to book at
    /// the batch's end under one lock of the session's book. A run of keys in one region (at most [`HOLD_RUN`]) is looked up
    /// under a single lock of the region's mutex: under it, a key found in that region stays
    /// there until the unlock, so it needs one lookup and no lock of its own.
    pub(crate) fn find_and_hold_all(
        &self,
        hold: bool,
        keys: &[&[u8]],
        holds: &mut Holds,
        mut each: impl FnMut(Option<Held>),
    ) {
        let mut i = 0;
        // The entry of `keys[i]` when a run ended on it, found in another region.
        let mut next: Option<Entry> = None;
        while i < keys.len() {
            let Some(entry) = next.take().or_else(|| self.registry.lookup(keys[i])) else {
                each(None);
                i += 1;
                continue;
            };
            let region = match holds.last_region(entry.region.0) {
                Some(r) => r,
                None => match self.table().by_slot.get(&entry.region.0).cloned() {
                    Some(r) => r,
                    None => {
                        each(None);
                        i += 1;
                        continue;
                    }
                },
            };
            let mut st = lock(&region.state);
            let end = keys.len().min(i + HOLD_RUN);
            while i < end {
                match self.registry.lookup(keys[i]) {
                    None => each(None),
                    Some(e) if e.region == entry.region => {
                        each(self.hold_at(&region, &mut st, &e, hold, None, holds))
                    }
                    Some(e) => {
                        next = Some(e);
                        break;
                    }
                }
                i += 1;
            }
        }
    }

    /// Under `region`'s mutex (`st`), for `entry`, a key's entry found under it: the
    /// registration's generation at its page and, with `hold`, the holds (one, or a `claim`'s
    /// count) counted at the page and put in `holds`. `None` when the region is being freed,
    /// the claim names another registration, or the count would overflow.
    fn hold_at(
        &self,
        region: &Arc<TableRegion>,
        st: &mut RegionState,
        entry: &Entry,
        hold: bool,
        claim: Option<&Claim>,
        holds: &mut Holds,
    ) -> Option<Held> {
        if st.freed {
            return None;
        }
        let page = page_of(entry);
        let rec = st.pages.get_mut(&page);
        let generation = rec.as_ref().map_or(0, |r| r.generation);
        if claim.is_some_and(|c| c.generation != generation) {
            return None;
        }
        let count = claim.map_or(1, |c| c.count);
        if hold {
            match rec {
                Some(rec) => rec.holds = rec.holds.checked_add(count)?,
                None if claim.is_some() => return None,
                None => {}
            }
            st.held += u64::from(count);
            holds.add(region, page, count);
        }
        Some(Held {
            offset: entry.offset(),
            len: entry.len(),
            generation,
            region: region.clone(),
        })
    }

    /// Books `holds`, already counted at their pages, for `session`, and empties them; false
    /// (and the holds released again) when the session has ended.
    pub(crate) fn book_holds(&self, session: &Session, holds: &mut Holds) -> bool {
        if holds.taken.is_empty() {
            return !session.is_ended();
        }
        let mut book = lock(&session.holds);
        // Checked under the book's mutex: a session's end marks it ended before it takes
        // this mutex to release the book.
        if session.is_ended() {
            drop(book);
            let mut returned = Returned::default();
            for (region, page, count) in holds.taken.drain(..) {
                self.release_page_holds(&region, page, count, &mut returned);
            }
            self.send_returns(returned);
            return false;
        }
        for (region, page, count) in holds.taken.drain(..) {
            // No overflow: the session's holds of a page are some of the page's.
            *book.by_page.entry((region.slot.0, page)).or_insert(0) += count;
        }
        true
    }

    /// The session's views of `pages` are gone: one hold each. Pages it holds no hold on
    /// are ignored (a release can only be for one's own holds). The session's book is
    /// locked once for all of them, each page's region once per run of pages in it.
    pub fn release_holds(&self, session: &Session, pages: &[PageRef]) {
        let mut ending: Vec<(Arc<TableRegion>, u32)> = Vec::with_capacity(pages.len());
        {
            let table = self.table();
            for p in pages {
                if !p.offset.is_multiple_of(PAGE_ALIGN) {
                    continue;
                }
                let region = match ending.last() {
                    Some((r, _)) if r.info.handle.region_id == p.region_id => r.clone(),
                    _ => match table.by_id(p.region_id) {
                        Some(r) => r.clone(),
                        None => continue,
                    },
                };
                ending.push((region, (p.offset / PAGE_ALIGN) as u32));
            }
        }
        {
            let mut book = lock(&session.holds);
            ending.retain(|(region, page)| {
                let at = (region.slot.0, *page);
                let Some(n) = book.by_page.get_mut(&at) else {
                    return false;
                };
                *n -= 1;
                if *n == 0 {
                    book.by_page.remove(&at);
                }
                true
            });
        }
        let mut returned = Returned::default();
        let mut pages: Vec<(u32, u32)> = Vec::new();
        for run in ending.chunk_by(|a, b| Arc::ptr_eq(&a.0, &b.0)) {
            pages.clear();
            pages.extend(run.iter().map(|(_, page)| (*page, 1)));
            self.release_holds_in(&run[0].0, &pages, &mut returned);
        }
        self.send_returns(returned);
    }

    /// Releases every hold of a session that ended.
    pub(super) fn drop_holds(&self, session: &Session) -> u64 {
        let book = std::mem::take(&mut *lock(&session.holds));
        let mut returned = Returned::default();
        let mut n = 0;
        for ((slot, page), count) in book.by_page {
            let Some(region) = self.table().by_slot.get(&slot).cloned() else {
                continue;
            };
            self.release_page_holds(&region, page, count, &mut returned);
            n += u64::from(count);
        }
        self.send_returns(returned);
        n
    }

    /// `n` holds on `page` of `region` end: the page goes back to its owner if no key points
    /// at it any more, and the region to the resource manager if that was all that kept it.
    /// The page, if it goes back, joins `returned`.
    pub(super) fn release_page_holds(
        &self,
        region: &Arc<TableRegion>,
        page: u32,
        n: u32,
        returned: &mut Returned,
    ) {
        self.release_holds_in(region, &[(page, n)], returned);
    }

    /// [`release_page_holds`](Self::release_page_holds) for each (page, holds) of `pages`,
    /// all of `region`, under one lock of its mutex.
    fn release_holds_in(
        &self,
        region: &Arc<TableRegion>,
        pages: &[(u32, u32)],
        returned: &mut Returned,
    ) {
        let mut back = Vec::new();
        let to_free = {
            let mut st = lock(&region.state);
            let mut released = false;
            for &(page, n) in pages {
                let Some(rec) = st.pages.get_mut(&page) else {
                    continue;
                };
                let n = n.min(rec.holds);
                if n == 0 {
                    continue;
                }
                rec.holds -= n;
                st.held -= u64::from(n);
                released = true;
                back.extend(self.free_if_unused(region, &mut st, page));
            }
            if !released {
                return;
            }
            self.take_if_unreferenced(region, &mut st)
        };
        for p in back {
            returned.add(region, p);
        }
        if let Some(h) = to_free {
            self.free_at_rm(h);
        }
    }

    /// Whether `page` still holds the registration of `generation`.
    pub fn page_current(&self, page: PageRef, generation: u64) -> bool {
        let Ok(region) = self.get_region(page.region_id) else {
            return false;
        };
        if !page.offset.is_multiple_of(PAGE_ALIGN) {
            return false;
        }
        let st = lock(&region.state);
        st.pages
            .get(&((page.offset / PAGE_ALIGN) as u32))
            .is_some_and(|r| r.keys > 0 && r.generation == generation)
    }
}

impl ServerState {
    /// Under the region's mutex: forgets `page` and names it for its owner once no key
    /// points at it, no hold is on it and no lane names it (see `lanes`) — unless it parks for the sessions that may still
    /// resume (see `parking`), or is parked already.
    pub(super) fn free_if_unused(
        &self,
        region: &TableRegion,
        st: &mut RegionState,
        page: u32,
    ) -> Option<PageRef> {
        let rec = st.pages.get(&page)?;
        if rec.keys > 0 || rec.holds > 0 || rec.parked {
            return None;
        }
        let generation = rec.generation;
        if self.lane_keeps(region, st, page) {
            return None;
        }
        if generation < self.park_below() && self.park(region.slot.0, st, page, generation) {
            return None;
        }
        st.pages.remove(&page);
        st.owner_live.then_some(PageRef {
            region_id: region.info.handle.region_id,
            offset: u64::from(page) * PAGE_ALIGN,
        })
    }
}

#[cfg(test)]
mod tests {
    use maru_proto::DeleteStatus;

    use super::*;
    use crate::state::fixtures::*;

    fn queued(s: &Session) -> Vec<PageRef> {
        lock(&s.notices).queued()
    }

    #[test]
    fn a_held_page_returns_to_its_owner_only_after_its_last_hold() {
        let (st, rm, (mut owner_peer, owner, r)) = state_with_owner("owner");
        let (_rp, reader, _) = client(&st, "reader");
        let id = r.info.handle.region_id;
        assert!(st.register(&owner, &reg(b"k", &r, 4096, 10)).unwrap());
        let first = st.find_and_hold(Some(&reader), b"k").unwrap();
        let second = st.find_and_hold(Some(&reader), b"k").unwrap();
        assert_eq!(first.generation, second.generation);
        assert!(st.page_current(
            PageRef {
                region_id: id,
                offset: 4096
            },
            first.generation
        ));
        assert_eq!(st.delete(b"k"), DeleteStatus::Deleted);
        assert!(st.find_and_hold(Some(&reader), b"k").is_none());
        assert!(!st.page_current(
            PageRef {
                region_id: id,
                offset: 4096
            },
            first.generation
        ));
        let page = PageRef {
            region_id: id,
            offset: 4096,
        };
        assert!(queued(&owner).is_empty(), "held: not returned");
        // A release the owner never took is ignored; the reader's first leaves one hold.
        st.release_holds(&owner, &[page]);
        st.release_holds(&reader, &[page]);
        assert!(queued(&owner).is_empty());
        st.release_holds(&reader, &[page]);
        assert_eq!(queued(&owner), [page], "returned once the last hold went");
        // A region whose owner left stays while a page of it is held.
        assert!(st.register(&owner, &reg(b"k2", &r, 0, 10)).unwrap());
        let held = st.find_and_hold(Some(&reader), b"k2").unwrap();
        assert!(
            held.generation > first.generation,
            "generations are never reused"
        );
        st.goodbye(&mut owner_peer);
        assert_eq!(st.delete(b"k2"), DeleteStatus::Deleted);
        assert_eq!(rm.live().len(), 1, "a held page keeps its region");
        st.release_holds(
            &reader,
            &[PageRef {
                region_id: id,
                offset: 0,
            }],
        );
        assert!(rm.live().is_empty(), "last hold gone: region freed");
    }

    #[test]
    fn a_batch_lookup_books_every_hold_and_a_batch_release_returns_each_page_once() {
        let (st, _rm, (_op, owner, r)) = state_with_owner("owner");
        let (_op2, other, r2) = client_with_region(&st, "other");
        let (_rp, reader, _) = client(&st, "reader");
        let at = |region: &TableRegion, offset| PageRef {
            region_id: region.info.handle.region_id,
            offset,
        };
        let (pa, pb, pc) = (at(&r, 0), at(&r, 4096), at(&r2, 0));
        assert!(st.register(&owner, &reg(b"a", &r, 0, 10)).unwrap());
        assert!(st.register(&owner, &reg(b"b", &r, 4096, 10)).unwrap());
        assert!(st.register(&other, &reg(b"c", &r2, 0, 10)).unwrap());
        let mut scratch = crate::state::keys::Scratch::default();
        let keys: [&[u8]; 5] = [b"a", b"c", b"a", b"missing", b"b"];
        let (scoped, rest) = scratch.scoped_all(b"", &keys);
        let mut out = Vec::new();
        st.write_batch_lookup(&mut out, 1, Some(&reader), &scoped, rest);
        assert_eq!(lock(&reader.holds).holds(), 4, "one hold per key found");
        for k in [b"a", b"b", b"c"] {
            assert_eq!(st.delete(k), DeleteStatus::Deleted);
        }
        assert!(queued(&owner).is_empty() && queued(&other).is_empty());
        // Across regions and out of order; a page held twice keeps its second hold.
        st.release_holds(&reader, &[pa, pc, pb]);
        assert_eq!(queued(&owner), [pb]);
        assert_eq!(queued(&other), [pc]);
        // A release beyond the session's holds changes nothing.
        st.release_holds(&reader, &[pb, pc]);
        assert_eq!(lock(&reader.holds).holds(), 1);
        st.release_holds(&reader, &[pa]);
        assert_eq!(queued(&owner), [pb, pa]);
        assert_eq!(lock(&reader.holds).holds(), 0);
    }

    #[test]
    fn a_batch_lookup_by_an_ended_session_finds_nothing_and_holds_nothing() {
        let (st, _rm, (_op, owner, r)) = state_with_owner("owner");
        let (mut rp, reader, _) = client(&st, "reader");
        assert!(st.register(&owner, &reg(b"a", &r, 0, 10)).unwrap());
        st.disconnect(&mut rp);
        let mut scratch = crate::state::keys::Scratch::default();
        let keys: [&[u8]; 2] = [b"a", b"a"];
        let (scoped, rest) = scratch.scoped_all(b"", &keys);
        let mut out = Vec::new();
        st.write_batch_lookup(&mut out, 1, Some(&reader), &scoped, rest);
        let header = maru_proto::Header::decode(&out[..maru_proto::HEADER_LEN]).unwrap();
        match maru_proto::decode_response(&header, &out[maru_proto::HEADER_LEN..]).unwrap() {
            maru_proto::Response::BatchLookup { entries, .. } => {
                assert!(entries.iter().all(Option::is_none), "{entries:?}")
            }
            other => panic!("not a batch lookup: {other:?}"),
        }
        assert_eq!(st.delete(b"a"), DeleteStatus::Deleted);
        assert_eq!(queued(&owner).len(), 1, "no hold kept the page");
    }

    #[test]
    fn a_sessions_end_releases_its_holds() {
        let (st, _rm, (_op, owner, r)) = state_with_owner("owner");
        let (mut rp, reader, _) = client(&st, "reader");
        assert!(st.register(&owner, &reg(b"k", &r, 0, 10)).unwrap());
        st.find_and_hold(Some(&reader), b"k").unwrap();
        // An admin's lookup takes no hold.
        st.find_and_hold(None, b"k").unwrap();
        assert_eq!(st.delete(b"k"), DeleteStatus::Deleted);
        assert!(queued(&owner).is_empty());
        st.disconnect(&mut rp);
        assert_eq!(queued(&owner).len(), 1);
        assert!(st.find_and_hold(Some(&reader), b"k").is_none());
    }

    #[test]
    fn a_restored_hold_needs_its_key_at_its_page_with_its_registration() {
        let (st, _rm, (_op, owner, r)) = state_with_owner("owner");
        let (_op2, other, r2) = client_with_region(&st, "other");
        let (_rp, reader, _) = client(&st, "reader");
        let id = r.info.handle.region_id;
        assert!(st.register(&owner, &reg(b"k", &r, 4096, 10)).unwrap());
        assert!(st.register(&other, &reg(b"o", &r2, 0, 10)).unwrap());
        let generation = st.find_and_hold(None, b"k").unwrap().generation;
        let page = PageRef {
            region_id: id,
            offset: 4096,
        };
        let claim = |key: &[u8], page: PageRef, generation: u64, count: u32| {
            (
                key.to_vec(),
                Claim {
                    page,
                    generation,
                    count,
                },
            )
        };
        let claims = [
            claim(b"k", page, generation, 3),
            claim(b"missing", page, generation, 1),
            claim(b"k", page, generation + 1, 1),
            claim(b"k", PageRef { offset: 0, ..page }, generation, 1),
            // Another key's page, claimed under a key the session names.
            claim(
                b"k",
                PageRef {
                    region_id: r2.info.handle.region_id,
                    offset: 0,
                },
                generation,
                1,
            ),
            claim(b"k", page, generation, u32::MAX),
        ];
        assert_eq!(st.restore_holds(&reader, &claims), [1, 2, 3, 4, 5]);
        assert_eq!(lock(&reader.holds).holds(), 3);
        // The granted holds keep the page past its key's delete, until the third release.
        assert_eq!(st.delete(b"k"), DeleteStatus::Deleted);
        st.release_holds(&reader, &[page, page]);
        assert!(queued(&owner).is_empty(), "one hold left");
        st.release_holds(&reader, &[page]);
        assert_eq!(queued(&owner), [page]);
        // A claim on a page whose key is gone is refused and changes nothing.
        assert_eq!(st.restore_holds(&reader, &claims[..1]), [0]);
        assert_eq!(lock(&reader.holds).holds(), 0);
    }
}
