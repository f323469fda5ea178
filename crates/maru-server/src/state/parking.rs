//! Parked pages: what keeps a view of a session that has not resumed yet from lying.
//!
//! A restarted server knows nothing of the holds of the previous process until their
//! sessions resume. While its reconnect grace runs and some session listed in
//! `INDEX.sessions` has not come back, a page that loses its last key and has no hold is not
//! returned to its owner if its registration is from before the restart (an absent session
//! may have a view of it): it is *parked*, kept as if held by the absent sessions. A resume
//! may claim a hold on a parked page when the claim names the registration that was freed
//! there ([`ServerState::hold_parked`]). When every listed session has resumed, or the grace
//! ends and the rest are forgotten, the parked pages are freed as usual
//! ([`ServerState::end_parking`]): those a resumed view holds stay until its release.
//!
//! Registrations made after the restart are never parked: no absent session can have seen
//! them. So are they the only ones eviction may take during the grace to make room; evicting
//! an older key would free nothing now (its page would park), as evicting a held one would
//! not (`eviction::capacity`).
//!
//! Lock order: the park book's mutex is taken under a region's mutex, and after the resume
//! book's; nothing is locked under it.

use std::sync::atomic::Ordering;

use super::holds::{Claim, Holds};
use super::notices::Returned;
use super::regions::RegionState;
use super::sessions::Session;
use super::{lock, ServerState};
use crate::registry::PAGE_ALIGN;

/// The pages parked while the previous process's sessions may still resume. Registrations
/// older than `ServerState::park_below` park when freed (0: nothing parks); that generation
/// changes only under this book's mutex, so a page parked under it is freed by
/// [`ServerState::end_parking`].
#[derive(Default)]
pub(super) struct ParkBook {
    /// Parked pages, by (region slot, page); each once.
    pages: Vec<(u32, u32)>,
}

impl ServerState {
    /// Called at the end of the rebuild, with the first generation of this process: while
    /// the reconnect grace runs and listed sessions are missing, freed pages of older
    /// registrations park. Does nothing if the grace is over already.
    pub(super) fn start_parking(&self, first_generation: u64) {
        if !self.resume_pending() {
            return;
        }
        let _book = lock(&self.parked);
        self.park_below.store(first_generation, Ordering::Release);
    }

    /// The generation below which a freed page would park now (0: none parks). Read without
    /// a lock by victim picking, as a hint: the decision is [`ServerState::park`]'s.
    pub(super) fn park_below(&self) -> u64 {
        self.park_below.load(Ordering::Acquire)
    }

    /// Under `st`'s region mutex: parks `page` of the region in `slot` if its registration
    /// (`generation`) is from before the restart and parking is on. True when parked.
    pub(super) fn park(&self, slot: u32, st: &mut RegionState, page: u32, generation: u64) -> bool {
        let mut book = lock(&self.parked);
        if generation >= self.park_below() {
            return false;
        }
        let Some(rec) = st.pages.get_mut(&page) else {
            return false;
        };
        rec.parked = true;
        st.parked += 1;
        book.pages.push((slot, page));
        true
    }

    /// Pages parked now.
    pub(super) fn pages_parked(&self) -> u64 {
        lock(&self.parked).pages.len() as u64
    }

    /// Parking ends (every listed session resumed, or the grace is over): every parked page
    /// is freed as it would have been — returned to its owner unless a resumed view holds
    /// it, and its region freed if that was all that kept it.
    pub(super) fn end_parking(&self) {
        let pages = {
            let mut book = lock(&self.parked);
            self.park_below.store(0, Ordering::Release);
            std::mem::take(&mut book.pages)
        };
        if pages.is_empty() {
            return;
        }
        tracing::info!(pages = pages.len(), "parked pages are freed");
        let mut returned = Returned::default();
        for (slot, page) in pages {
            let Some(region) = self.table().by_slot.get(&slot).cloned() else {
                continue;
            };
            let (back, to_free) = {
                let mut st = lock(&region.state);
                match st.pages.get_mut(&page) {
                    Some(rec) if rec.parked => rec.parked = false,
                    _ => continue,
                }
                st.parked -= 1;
                let back = self.free_if_unused(&region, &mut st, page);
                (back, self.take_if_unreferenced(&region, &mut st))
            };
            if let Some(p) = back {
                returned.add(&region, p);
            }
            if let Some(h) = to_free {
                self.free_at_rm(h);
            }
        }
        self.send_returns(returned);
    }

    /// A resumed session claims a hold on a page whose key is gone: granted when the page is
    /// parked and was freed from the registration the claim names, so the view still shows
    /// that registration's bytes. The page then stays until the hold's release, like any
    /// held page of a deleted key.
    pub(super) fn hold_parked(&self, session: &Session, claim: &Claim) -> bool {
        let Some(region) = self.region_by_id(claim.page.region_id) else {
            return false;
        };
        if !claim.page.offset.is_multiple_of(PAGE_ALIGN) {
            return false;
        }
        let page = (claim.page.offset / PAGE_ALIGN) as u32;
        {
            let mut st = lock(&region.state);
            if st.freed {
                return false;
            }
            let Some(rec) = st.pages.get_mut(&page) else {
                return false;
            };
            if !rec.parked || rec.keys > 0 || rec.generation != claim.generation {
                return false;
            }
            let Some(n) = rec.holds.checked_add(claim.count) else {
                return false;
            };
            rec.holds = n;
            st.held += u64::from(claim.count);
        }
        let mut holds = Holds::default();
        holds.add(&region, page, claim.count);
        self.book_holds(session, &mut holds)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use maru_proto::{DeleteStatus, PageRef, ResumeHold};

    use super::*;
    use crate::state::fixtures::*;
    use crate::state::resume::ResumeClaim;
    use crate::state::sessions::Peer;

    const ABSENT: [u8; 16] = [7; 16];
    const GRACE: Duration = Duration::from_secs(60);

    fn queued(s: &Session) -> Vec<PageRef> {
        lock(&s.notices).queued()
    }

    fn page(region_id: u64, n: u64) -> PageRef {
        PageRef {
            region_id,
            offset: n * PAGE_ALIGN,
        }
    }

    /// The absent session comes back claiming `holds`; returns the refused positions.
    fn resume_absent(st: &ServerState, holds: &[ResumeHold]) -> (Peer, Vec<u32>) {
        let mut peer = Peer::New;
        let claim = ResumeClaim {
            regions: &[],
            pins: &[],
            holds,
        };
        let done = st
            .resume(&mut peer, &hello("absent", Some(ABSENT)), &claim)
            .unwrap();
        (peer, done.refused_holds)
    }

    #[test]
    fn pages_of_older_registrations_park_until_the_absent_session_resumes() {
        let (st, _rm, (_op, owner, r)) = state_with_owner("owner");
        let id = r.info.handle.region_id;
        for (n, k) in [b"k0", b"k1"].iter().enumerate() {
            let n = n as u64;
            assert!(st
                .register(&owner, &reg(*k, &r, n * PAGE_ALIGN, 10))
                .unwrap());
        }
        let g0 = st.find_and_hold(None, b"k0").unwrap().generation;
        st.expect_resume(&[ABSENT], GRACE);
        // A registration made after the restart: no absent view can show it.
        assert!(st
            .register(&owner, &reg(b"new", &r, 2 * PAGE_ALIGN, 10))
            .unwrap());

        assert_eq!(st.delete(b"k0"), DeleteStatus::Deleted);
        assert_eq!(st.delete(b"new"), DeleteStatus::Deleted);
        assert_eq!(queued(&owner), [page(id, 2)], "only the new page goes back");
        assert_eq!(st.stats().pages_parked, 1);

        // Making room evicts the new keys only: an older one would free nothing now.
        assert!(st
            .register(&owner, &reg(b"new2", &r, 3 * PAGE_ALIGN, 10))
            .unwrap());
        assert_eq!(st.make_room(&owner, 4), [page(id, 3)]);
        assert!(st.exists(b"k1"), "an older key was evicted for nothing");

        // The resume claims the parked page: granted for the freed registration only.
        let hold = |generation| ResumeHold {
            key: b"k0",
            page: page(id, 0),
            generation,
            count: 2,
        };
        let (peer, refused) = resume_absent(&st, &[hold(g0 + 100), hold(g0)]);
        assert_eq!(refused, [0]);
        let s = st.stats();
        assert_eq!(s.pages_parked, 0, "every listed session is back");
        let absent = s
            .clients
            .iter()
            .find(|c| c.instance_id == "absent")
            .unwrap();
        assert_eq!(absent.holds, 2);
        let Peer::Client(session) = &peer else {
            panic!("not resumed")
        };
        // Held, the page stays until the last release, then goes back as usual.
        st.release_holds(session, &[page(id, 0)]);
        assert_eq!(queued(&owner), [page(id, 2)]);
        st.release_holds(session, &[page(id, 0)]);
        assert_eq!(queued(&owner), [page(id, 2), page(id, 0)]);
        // Parking is over: an older key's page goes back at its delete.
        assert_eq!(st.delete(b"k1"), DeleteStatus::Deleted);
        assert_eq!(queued(&owner), [page(id, 2), page(id, 0), page(id, 1)]);
    }

    /// A full pool during parking: another owner's region of older keys is not emptied for
    /// a region it could not give back; once parking is over it is.
    #[test]
    fn taking_a_region_back_during_parking_evicts_no_older_key() {
        let (st, rm, (_op, owner, r)) = state_with_owner("owner");
        assert!(st.register(&owner, &reg(b"old", &r, 0, 10)).unwrap());
        st.expect_resume(&[ABSENT], GRACE);
        let (_cp, caller, _) = client(&st, "caller");
        rm.room.lock().unwrap().insert("/dev/shm/default".into(), 0);
        let e = st.request_region(&caller, MIB).unwrap_err();
        assert_eq!(e.code, maru_proto::ErrorCode::PoolExhausted, "{e:?}");
        assert!(
            st.exists(b"old"),
            "a key was evicted for a region it cannot free"
        );
        assert_eq!(st.stats().eviction.evictions, 0);

        st.end_reconnect_grace_if_due(Instant::now() + GRACE);
        // The owner does not answer the request here, so the caller still finds no room;
        // but the region was emptied and asked back.
        let e = st.request_region(&caller, MIB).unwrap_err();
        assert_eq!(e.code, maru_proto::ErrorCode::PoolExhausted, "{e:?}");
        assert!(!st.exists(b"old"));
    }

    #[test]
    fn parked_pages_go_back_when_the_grace_ends_without_their_session() {
        let (st, rm, (mut op, owner, r)) = state_with_owner("owner");
        let id = r.info.handle.region_id;
        assert!(st.register(&owner, &reg(b"k", &r, 0, 10)).unwrap());
        assert!(st.register(&owner, &reg(b"j", &r, PAGE_ALIGN, 10)).unwrap());
        st.expect_resume(&[ABSENT], GRACE);
        assert_eq!(st.delete(b"k"), DeleteStatus::Deleted);
        assert!(queued(&owner).is_empty());
        // A parked page keeps its region past its owner's end, as a hold does.
        st.goodbye(&mut op);
        assert_eq!(st.delete(b"j"), DeleteStatus::Deleted);
        assert_eq!(st.stats().pages_parked, 2);
        assert_eq!(rm.live().len(), 1);

        st.end_reconnect_grace_if_due(Instant::now());
        assert_eq!(st.stats().pages_parked, 2, "the grace is not over yet");
        st.end_reconnect_grace_if_due(Instant::now() + GRACE);
        assert_eq!(st.stats().pages_parked, 0);
        assert!(
            rm.live().is_empty(),
            "the region went with its parked pages"
        );
        assert!(st.get_region(id).is_err());
        // The forgotten session cannot come back to claim anything.
        let mut peer = Peer::New;
        let claim = ResumeClaim {
            regions: &[],
            pins: &[],
            holds: &[],
        };
        let e = st
            .resume(&mut peer, &hello("absent", Some(ABSENT)), &claim)
            .unwrap_err();
        assert_eq!(e.code, maru_proto::ErrorCode::SessionConflict);
    }
}
