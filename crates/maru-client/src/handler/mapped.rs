//! Mapped regions: this handler's own (read-write, populated) and other instances' (mapped
//! read-only on first use, never populated), and the views handed out into them.

use std::sync::Arc;

use maru_proto::{PageRef, RegionInfo};
use maru_shm::{MapMode, Mapping};

use super::connected::Connected;
use super::{read, write, Hooked};
use crate::claims::Hold;
use crate::error::{Error, ErrorKind, Result};
use crate::view::View;
use crate::wait::WaitHook;

/// A mapped region: one of ours (read-write, populated) or another instance's (read-only).
pub(super) struct MappedRegion {
    pub info: RegionInfo,
    pub mapping: Arc<Mapping>,
    pub owned: bool,
}

fn unusable_location(why: String) -> Error {
    Error::protocol(
        "lookup",
        format!("the server returned an unusable location: {why}"),
    )
}

impl MappedRegion {
    fn id(&self) -> u64 {
        self.info.handle.region_id
    }

    /// A view of `len` bytes at `offset`, if the region holds them; `stride` is the page
    /// size that numbers the pages.
    pub fn view(&self, offset: u64, len: u64, stride: u64) -> Result<View> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.mapping.len() as u64) {
            return Err(unusable_location(format!(
                "{offset}+{len} lies outside region {} of {} bytes",
                self.id(),
                self.mapping.len()
            )));
        }
        Ok(View {
            mapping: self.mapping.clone(),
            offset: offset as usize,
            len: len as usize,
            writable: self.owned,
            region_id: self.id(),
            page_index: offset / stride,
            generation: 0,
            hold: None,
        })
    }
}

impl Connected {
    /// Books the holds a lookup took for this session on the pages of `found` — (key, region
    /// id, offset, generation) each — under one lock: a hold's release is queued when its
    /// last owner (a view's last clone) goes. Booked before any region is mapped, so a lookup
    /// whose region then fails to map still releases every hold it took.
    pub fn book_holds<'k>(
        &self,
        found: impl IntoIterator<Item = (&'k [u8], u64, u64, u64)>,
    ) -> Vec<Arc<Hold>> {
        self.conns.releases.hold_all(found.into_iter().map(
            |(key, region_id, offset, generation)| (key, PageRef { region_id, offset }, generation),
        ))
    }

    /// A view of a key's value whose page the server holds for this session (`hold`, from
    /// [`Connected::book_holds`]).
    pub fn held_view(
        &self,
        region: &MappedRegion,
        offset: u64,
        len: u64,
        generation: u64,
        hold: Arc<Hold>,
    ) -> Result<View> {
        // A view refused here drops `hold`, which releases it.
        let mut view = region.view(offset, len, self.stride)?;
        view.generation = generation;
        view.hold = Some(hold);
        Ok(view)
    }

    /// The mapping of `info`'s region: cached, or mapped read-only now (never populated:
    /// mapping is microseconds whatever the size).
    pub fn region_for(&self, info: &RegionInfo, hook: &dyn WaitHook) -> Result<Arc<MappedRegion>> {
        let id = info.handle.region_id;
        let redescribed = || {
            unusable_location(format!(
                "region {id} is ours but the server describes it differently"
            ))
        };
        if let Some(r) = read(&self.mapped).get(&id) {
            if r.info.access == info.access {
                return Ok(r.clone());
            }
            if r.owned {
                return Err(redescribed());
            }
        }
        let source = self.region_source(info, false, "lookup", hook)?;
        let mapping = source.map(info, MapMode::ReadOnly, false).map_err(|e| {
            let message = format!("cannot map region {id}: {e}");
            Error::shm(ErrorKind::Map, "lookup", message, e)
        })?;
        let fresh = Arc::new(MappedRegion {
            info: info.clone(),
            mapping: Arc::new(mapping),
            owned: false,
        });
        let mut map = write(&self.mapped);
        match map.get(&id) {
            // Another thread mapped it meanwhile: use theirs, drop ours.
            Some(r) if r.info.access == info.access => Ok(r.clone()),
            Some(r) if r.owned => Err(redescribed()),
            _ => {
                map.insert(id, fresh.clone());
                Ok(fresh)
            }
        }
    }
}

impl Hooked<'_> {
    pub fn buffer(&self, region_id: u64, offset: u64, len: u64) -> Option<View> {
        let c = self.h.connected(self.hook).ok()?;
        let region = read(&c.mapped).get(&region_id)?.clone();
        region.view(offset, len, c.stride).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::super::owned::tests::owned_region;

    #[test]
    fn a_view_lies_inside_its_region_or_is_refused() {
        let (_dir, owned) = owned_region(3, 4);
        let r = owned.region;
        let v = r.view(8192, 100, 4096).unwrap();
        assert_eq!((v.region_id(), v.page_index(), v.len()), (3, 2, 100));
        assert!(v.is_writable(), "a page of an owned region is writable");
        r.view(0, 4 * 4096, 4096).unwrap();
        for (offset, len) in [(0, 4 * 4096 + 1), (4 * 4096, 1), (u64::MAX, 2)] {
            let e = r.view(offset, len, 4096).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Protocol);
            assert!(e.to_string().contains("lies outside region 3"), "{e}");
        }
    }
}
