//! What the handler hands out: [`View`]s over mapped pages and [`AllocHandle`]s for pages to
//! be written. Both hold an `Arc<Mapping>`, so the memory they describe stays mapped for as
//! long as they live, even after the handler is closed.
//!
//! A view from `retrieve` also holds its page at the server (docs/ARCHITECTURE.md §8): the
//! page's bytes are not reused while the view or any clone of it lives. The last clone's drop
//! queues the release in the session's `ReleaseQueue` (`claims`), which the next request of
//! the session carries (or the watcher within 50 ms).

use std::sync::Arc;

use maru_shm::Mapping;

use crate::claims::Hold;
use crate::error::{Error, ErrorKind, Result};

/// A page of an owned region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageId {
    pub region_id: u64,
    pub page_index: u64,
}

/// A byte range of a mapped region: where a key's value is (retrieve), or a page being
/// written (alloc). Cloning is cheap (`Arc`s); a retrieved view's page is held at the server
/// until its last clone is dropped.
#[derive(Debug, Clone)]
pub struct View {
    pub(crate) mapping: Arc<Mapping>,
    pub(crate) offset: usize,
    pub(crate) len: usize,
    pub(crate) writable: bool,
    pub(crate) region_id: u64,
    pub(crate) page_index: u64,
    /// The registration's generation (0 for pages from alloc and raw buffers).
    pub(crate) generation: u64,
    pub(crate) hold: Option<Arc<Hold>>,
}

impl View {
    /// The generation of the registration this view was retrieved for (0 when the view did
    /// not come from a lookup): see [`crate::MaruHandler::page_current`].
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// Whether the view holds its page at the server (views from `retrieve` do, unless a
    /// restarted server did not take the hold back at the session's resume).
    pub fn holds_page(&self) -> bool {
        self.hold.as_ref().is_some_and(|h| h.is_live())
    }

    /// The mapping the view points into; holding it keeps the memory mapped.
    pub fn mapping(&self) -> &Arc<Mapping> {
        &self.mapping
    }
    /// Offset of the view inside its region (and its mapping).
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// True for pages of this handler's own regions (mapped read-write); views of other
    /// instances' regions are read-only.
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    pub fn region_id(&self) -> u64 {
        self.region_id
    }
    /// Index of the page the view starts in (offset / page stride).
    pub fn page_index(&self) -> u64 {
        self.page_index
    }
    /// Address of the first byte. Valid while this view (or any clone of its mapping) lives.
    /// A view from `retrieve` holds its page: the bytes stay those of the value it was
    /// retrieved for while the view lives. Kept past the view, the address may show a page
    /// reused for another value (check [`View::generation`] with `page_current`).
    pub fn as_ptr(&self) -> *const u8 {
        self.mapping.as_ptr().wrapping_add(self.offset)
    }
    /// Mutable address of the first byte, for writable views only.
    pub fn as_mut_ptr(&self) -> Option<*mut u8> {
        self.writable
            .then(|| self.mapping.as_ptr().wrapping_add(self.offset))
    }
    /// Copies the view's bytes out.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0; self.len];
        // In bounds by construction: the handler checked offset + len against the mapping.
        let _ = self.mapping.read_at(self.offset, &mut out);
        out
    }
    /// Copies `src` into the view at `at`. A read-only view, or a range outside the view, is
    /// an [`ErrorKind::InvalidArgument`].
    pub fn write_at(&self, at: usize, src: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(Error::invalid(
                "write_at",
                "invalid mapping request: write to a read-only view",
            ));
        }
        if at.checked_add(src.len()).is_none_or(|end| end > self.len) {
            return Err(Error::invalid(
                "write_at",
                format!(
                    "invalid mapping request: range {at}+{} outside a view of {} bytes",
                    src.len(),
                    self.len
                ),
            ));
        }
        self.mapping
            .write_at(self.offset + at, src)
            .map_err(|e| Error::shm(ErrorKind::InvalidArgument, "write_at", e.to_string(), e))
    }
}

/// A page obtained with `alloc`: write the value through [`AllocHandle::view`], then
/// register it with `store_handle` (zero copy: only metadata goes to the server).
#[derive(Debug, Clone)]
pub struct AllocHandle {
    pub(crate) view: View,
}

impl AllocHandle {
    pub fn page(&self) -> PageId {
        PageId {
            region_id: self.view.region_id,
            page_index: self.view.page_index,
        }
    }
    pub fn region_id(&self) -> u64 {
        self.view.region_id
    }
    pub fn page_index(&self) -> u64 {
        self.view.page_index
    }
    /// The size asked for at alloc (the view's length).
    pub fn size(&self) -> u64 {
        self.view.len as u64
    }
    /// The writable view of the requested size.
    pub fn view(&self) -> &View {
        &self.view
    }
    pub fn write_at(&self, at: usize, src: &[u8]) -> Result<()> {
        self.view.write_at(at, src)
    }
}
