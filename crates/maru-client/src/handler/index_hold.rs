//! Views through the key index, held without a round trip (docs/ARCHITECTURE.md §10, *Holds
//! without a round trip*).
//!
//! A session whose server gave it a lane of its hold lanes, on a host that maps the lanes file
//! and the index, answers `retrieve` and `batch_retrieve` of keys in regions it has mapped
//! without asking the server: it looks the keys up in the index, claims each page in its lane
//! (the hold, booked as a round-trip hold is, so a resume carries it), fences, and rechecks
//! each key's generation. An unchanged generation means the key still named the page after
//! the claim was visible, so the server, which scans the lanes before it returns a page whose
//! key has gone, keeps the page for the view. A key that changed meanwhile, one in a region
//! not mapped here, a lane without room and a missing key take the RPC path (which also
//! counts the miss). The views are told to the server later as hits (`Hit`), which count as
//! uses for eviction too.

use std::sync::Arc;

use maru_index::Found;
use maru_proto::PageRef;

use super::connected::Connected;
use super::index_read::ClientIndex;
use super::mapped::MappedRegion;
use super::read;
use crate::claims::LANE_PAGE;
use crate::error::Result;
use crate::view::View;

/// A key the index found in a region mapped here (`regions[region]` of its lookup).
struct Candidate {
    at: usize,
    found: Found,
    region: usize,
}

impl Connected {
    /// Views of the keys of `keys` that the index and the session's lane can serve, into
    /// `out[i]` for `keys[i]`; the positions of the others go to `rest`, for the RPC path.
    /// False when the session has no lane (nothing is served, `rest` is untouched).
    pub(super) fn lane_views(
        &self,
        ix: &ClientIndex,
        keys: &[&[u8]],
        out: &mut [Option<View>],
        rest: &mut Vec<usize>,
    ) -> Result<bool> {
        let mut found = Vec::with_capacity(keys.len());
        ix.reader.batch_lookup(ix.ns, keys, &mut found);
        let mut candidates = Vec::with_capacity(keys.len());
        let mut skipped = Vec::new();
        // The regions the keys are in, each once (a batch's keys are mostly in a few).
        let mut regions: Vec<(u32, Arc<MappedRegion>)> = Vec::new();
        {
            let mapped = read(&self.mapped);
            for (at, f) in found.into_iter().enumerate() {
                let Some(found) = f else {
                    skipped.push(at);
                    continue;
                };
                let id = found.location.region;
                let region = match regions.iter().rposition(|(r, _)| *r == id) {
                    Some(i) => i,
                    None => match mapped.get(&u64::from(id)) {
                        Some(r) => {
                            regions.push((id, r.clone()));
                            regions.len() - 1
                        }
                        None => {
                            skipped.push(at);
                            continue;
                        }
                    },
                };
                candidates.push(Candidate { at, found, region });
            }
        }
        let items = candidates.iter().map(|c| {
            let loc = c.found.location;
            let page = PageRef {
                region_id: u64::from(loc.region),
                offset: loc.offset,
            };
            let lane_page = u32::try_from(loc.offset / LANE_PAGE).unwrap_or(u32::MAX);
            (keys[c.at], page, c.found.generation, loc.region, lane_page)
        });
        let Some(holds) = self.conns.releases.hold_all_in_lane(items) else {
            return Ok(false);
        };
        rest.extend(skipped);
        let mut served = Vec::with_capacity(candidates.len());
        for (c, hold) in candidates.into_iter().zip(holds) {
            // The lane's fence came after every claim: a generation unchanged now was the
            // key's when the claim was visible to the server.
            let Some(hold) = hold.filter(|_| ix.reader.is_current(&c.found)) else {
                rest.push(c.at);
                continue;
            };
            let loc = c.found.location;
            let region = &regions[c.region].1;
            let mut view = region.view(loc.offset, u64::from(loc.len), self.stride)?;
            view.generation = c.found.generation;
            view.hold = Some(hold);
            out[c.at] = Some(view);
            served.push(keys[c.at]);
        }
        self.conns.releases.uses.hit(served);
        rest.sort_unstable();
        Ok(true)
    }
}
