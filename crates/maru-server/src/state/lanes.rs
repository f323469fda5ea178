//! Holds without a round trip (docs/ARCHITECTURE.md §10, *Holds without a round trip*).
//!
//! Beside the key index the server keeps a *lanes* file ([`LaneFile`]): one lane per session
//! that a local client maps read-write and writes the pages its views hold into. A client that
//! finds a key in the index claims the key's page in its lane, fences, and rechecks the key's
//! generation in the index; the server, before it returns a page whose last key left the index
//! (and that no hold of its own books keeps), fences and scans the lanes for it
//! ([`ServerState::lane_keeps`], called from `holds::free_if_unused`). One of the two sees the
//! other: the client gives its claim up and asks the server, or the server keeps the page.
//!
//! A page a lane keeps is counted as one hold at its page, so everything that waits for holds
//! (the page's return, its region's) waits for it too, and it waits in `waiting` until a scan
//! finds no lane naming it any more ([`ServerState::recheck_lanes`]: every evictor tick, when
//! a session ends and its lane is emptied, and before an owner's `Watch` or `MakeRoom` — what
//! an alloc that finds no free page asks). Releasing a claim costs the client one store and
//! tells the server nothing: a page whose key is gone comes back within a tick of its last
//! view's end, or as soon as its owner runs out of pages.
//!
//! Lanes are given to sessions at their start and emptied at their end. A lane's tag changes
//! at every assignment, so a client of an ended session that still runs (its views alive after
//! `close`) can neither clear a claim of the lane's next session nor match one: its own claims
//! at most keep pages longer, until that session ends too.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use maru_index::LaneFile;
use maru_proto::LaneInfo;

use super::notices::Returned;
use super::regions::{RegionState, TableRegion};
use super::{lock, ServerState};
use crate::registry::{Entry, PAGE_ALIGN};

/// The lanes file and who has which lane.
pub(crate) struct Lanes {
    file: LaneFile,
    /// The file goes with the server (its index is ephemeral).
    ephemeral: bool,
    /// Lanes no live session has, the longest free first (a lane given back is reused last).
    free: std::sync::Mutex<VecDeque<u32>>,
    /// Pages kept for a lane, by (region slot, page): each counts as one hold at its page.
    waiting: std::sync::Mutex<Vec<(u32, u32)>>,
}

impl Lanes {
    pub fn new(file: LaneFile, ephemeral: bool) -> Lanes {
        Lanes {
            ephemeral,
            free: std::sync::Mutex::new((0..file.lanes()).collect()),
            waiting: std::sync::Mutex::new(Vec::new()),
            file,
        }
    }

    /// Where the lanes file is, for a hello.
    fn info(&self, lane: u32, tag: u8) -> LaneInfo {
        LaneInfo {
            path: self.file.path().display().to_string(),
            lane,
            tag,
        }
    }
}

/// The lane number pages of `region` are claimed under: the region's id as the key index
/// stores it (None for a region the index cannot name, whose pages no lane can claim).
fn lane_region(region: &TableRegion) -> Option<u32> {
    u32::try_from(region.info.handle.region_id).ok()
}

impl ServerState {
    /// Keeps holds of local clients in `file` from now on (removed at shutdown when
    /// `ephemeral`). A restarted server makes a fresh file: the holds of the sessions that
    /// resume come back with their resume, as booked holds.
    pub fn with_lanes(mut self, file: LaneFile, ephemeral: bool) -> ServerState {
        self.lanes = Some(Lanes::new(file, ephemeral));
        self
    }

    /// At shutdown: an ephemeral lanes file goes.
    pub(super) fn close_lanes(&self) {
        if let Some(l) = self.lanes.as_ref().filter(|l| l.ephemeral) {
            let _ = std::fs::remove_file(l.file.path());
        }
    }

    /// A lane for a new session, and the tag it writes with (None: no lanes, or all taken; the
    /// session's holds then take a round trip).
    pub(super) fn take_lane(&self) -> Option<(u32, u8)> {
        let lanes = self.lanes.as_ref()?;
        let lane = lock(&lanes.free).pop_front()?;
        Some((lane, lanes.file.assign(lane)))
    }

    /// The hello's lane fields for a session with `lane`.
    pub(super) fn lane_info(&self, lane: Option<(u32, u8)>) -> Option<LaneInfo> {
        let (lane, tag) = lane?;
        Some(self.lanes.as_ref()?.info(lane, tag))
    }

    /// A session with `lane` ended: its claims end with it, and the pages only they kept go
    /// back.
    pub(super) fn give_lane_back(&self, lane: Option<(u32, u8)>) {
        let (Some((lane, _)), Some(lanes)) = (lane, self.lanes.as_ref()) else {
            return;
        };
        lanes.file.reset(lane);
        lock(&lanes.free).push_back(lane);
        self.recheck_lanes();
    }

    /// Under `region`'s mutex, for a page no key points at and no booked hold is on: whether a
    /// lane names it. If one does, the page is kept for it — counted as a hold, ended by
    /// [`ServerState::recheck_lanes`] once no lane names it.
    pub(super) fn lane_keeps(&self, region: &TableRegion, st: &mut RegionState, page: u32) -> bool {
        let (Some(lanes), Some(number)) = (self.lanes.as_ref(), lane_region(region)) else {
            return false;
        };
        // The key's removal from the index came before this (`detach_key`'s callers unindex
        // first); `is_held` fences, so a client's claim is either seen here or sees the
        // removal at its recheck.
        if !lanes.file.is_held(number, page) {
            return false;
        }
        if let Some(rec) = st.pages.get_mut(&page) {
            rec.holds += 1;
            st.held += 1;
            lock(&lanes.waiting).push((region.slot.0, page));
        }
        true
    }

    /// Ends the hold of every kept page no lane names any more; the pages go back as a
    /// released hold's do.
    pub fn recheck_lanes(&self) {
        let Some(lanes) = self.lanes.as_ref() else {
            return;
        };
        let waiting = std::mem::take(&mut *lock(&lanes.waiting));
        if waiting.is_empty() {
            return;
        }
        let mut held = HashSet::new();
        lanes.file.held_pages(&mut held);
        let mut still = Vec::new();
        let mut done: Vec<(Arc<TableRegion>, u32)> = Vec::new();
        for (slot, page) in waiting {
            let Some(region) = self.table().by_slot.get(&slot).cloned() else {
                continue;
            };
            match lane_region(&region) {
                Some(number) if held.contains(&(number, page)) => still.push((slot, page)),
                _ => done.push((region, page)),
            }
        }
        lock(&lanes.waiting).extend(still);
        let mut returned = Returned::default();
        for (region, page) in done {
            // The release's own check of the lanes may keep the page again (a claim taken
            // since the scan above); it then waits once more.
            self.release_page_holds(&region, page, 1, &mut returned);
        }
        self.send_returns(returned);
    }

    /// The pages some lane names now, for an eviction round to pass over (evicting a key whose
    /// page a view holds frees nothing now). Empty without lanes.
    pub(super) fn lane_snapshot(&self) -> LaneSnapshot {
        let mut held = HashSet::new();
        if let Some(lanes) = &self.lanes {
            lanes.file.held_pages(&mut held);
        }
        LaneSnapshot { held }
    }

    /// Pages kept for lanes now.
    pub fn lane_kept(&self) -> usize {
        self.lanes.as_ref().map_or(0, |l| lock(&l.waiting).len())
    }
}

/// The pages the lanes named at one moment (see [`ServerState::lane_snapshot`]).
pub(super) struct LaneSnapshot {
    held: HashSet<(u32, u32)>,
}

impl LaneSnapshot {
    /// Whether a lane named `entry`'s page.
    pub fn holds(&self, region: &TableRegion, entry: &Entry) -> bool {
        !self.held.is_empty()
            && lane_region(region).is_some_and(|number| {
                self.held
                    .contains(&(number, (entry.offset() / PAGE_ALIGN) as u32))
            })
    }
}

#[cfg(test)]
mod tests {
    use maru_index::{IndexReader, LaneFile, LaneWriter};
    use maru_proto::{DeleteStatus, PageRef};

    use super::*;
    use crate::state::fixtures::*;
    use crate::state::sessions::Session;

    fn queued(s: &Session) -> Vec<PageRef> {
        lock(&s.notices).queued()
    }

    /// An indexed state with 4 lanes of 16 slots, its index reader and its lanes' path.
    fn laned(dir: &tempfile::TempDir) -> (ServerState, IndexReader, std::path::PathBuf) {
        let cfg = index_config(dir, 1000, 64 << 10);
        let (st, _rm) = indexed_state(&cfg);
        let path = cfg.lanes_path();
        let st = st.with_lanes(LaneFile::create(&path, 4, 16).unwrap(), false);
        (st, IndexReader::open(&cfg.path).unwrap(), path)
    }

    #[test]
    fn a_page_a_lane_names_goes_back_only_once_no_lane_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let (st, ix, path) = laned(&dir);
        let (_op, owner, r) = client_with_region(&st, "owner");
        let (_rp, reader, _) = client(&st, "reader");
        let (lane, tag) = reader.lane.expect("a lane for the reader");
        let info = st.lane_info(reader.lane).unwrap();
        assert_eq!(
            (info.lane, info.tag, info.path),
            (lane, tag, path.display().to_string())
        );
        let k = key_in(b"", b"k");
        assert!(st.register(&owner, &reg(&k, &r, 4096, 10)).unwrap());
        let w = LaneWriter::open(&path, lane, tag).unwrap();
        let found = ix.lookup(0, b"k").unwrap();
        let number = found.location.region;
        assert!(w.claim(0, number, 1));
        w.fence();
        assert!(ix.is_current(&found));
        assert_eq!(st.delete(&k), DeleteStatus::Deleted);
        assert!(queued(&owner).is_empty(), "a lane names the page: kept");
        assert_eq!(st.lane_kept(), 1);
        st.recheck_lanes();
        assert!(queued(&owner).is_empty(), "still named: still kept");
        w.release(0, number, 1);
        st.recheck_lanes();
        let page = |offset| PageRef {
            region_id: r.info.handle.region_id,
            offset,
        };
        assert_eq!(queued(&owner), [page(4096)], "back once no lane names it");
        assert_eq!(st.lane_kept(), 0);
        // The control: with no claim, a delete returns the page at once.
        let k2 = key_in(b"", b"k2");
        assert!(st.register(&owner, &reg(&k2, &r, 8192, 10)).unwrap());
        assert_eq!(st.delete(&k2), DeleteStatus::Deleted);
        assert_eq!(queued(&owner), [page(4096), page(8192)]);
    }

    #[test]
    fn a_sessions_end_ends_its_claims_and_its_lane_comes_back_with_another_tag() {
        let dir = tempfile::tempdir().unwrap();
        let (st, _ix, path) = laned(&dir);
        let (_op, owner, r) = client_with_region(&st, "owner");
        let (mut rp, reader, _) = client(&st, "reader");
        let (lane, tag) = reader.lane.unwrap();
        let k = key_in(b"", b"k");
        assert!(st.register(&owner, &reg(&k, &r, 4096, 10)).unwrap());
        let old = LaneWriter::open(&path, lane, tag).unwrap();
        let number = r.info.handle.region_id as u32;
        assert!(old.claim(3, number, 1));
        assert_eq!(st.delete(&k), DeleteStatus::Deleted);
        assert!(queued(&owner).is_empty());
        st.goodbye(&mut rp);
        assert_eq!(
            queued(&owner).len(),
            1,
            "the lane's claims ended with its session"
        );
        // Every lane taken: the ended session's comes last, with a new tag.
        let others: Vec<_> = (0..3).map(|i| client(&st, &format!("c{i}"))).collect();
        let lanes: Vec<u32> = others.iter().map(|(_, s, _)| s.lane.unwrap().0).collect();
        assert_eq!(lanes.last(), Some(&lane));
        let (l, new_tag) = others[2].1.lane.unwrap();
        assert_eq!(l, lane);
        assert_ne!(new_tag, tag);
        let (_p, none, _) = client(&st, "no lane left");
        assert!(none.lane.is_none(), "no lane free: holds take a round trip");
        // The old client cannot take a claim of the new session out.
        let new = LaneWriter::open(&path, lane, new_tag).unwrap();
        assert!(new.claim(3, number, 2));
        old.release(3, number, 2);
        assert!(st.lanes.as_ref().unwrap().file.is_held(number, 2));
    }
}
