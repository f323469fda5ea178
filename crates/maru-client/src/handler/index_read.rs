//! Reads without a round trip, from the metadata server's key index in shared memory
//! (docs/ARCHITECTURE.md §10): existence checks, prefix counts and copy-out reads.
//!
//! The server's hello names the index file and the session's namespace number in it. A
//! handler that can open the file (same host, or a host that sees the same path) maps it
//! read-only and answers `exists`, `batch_exists` and `prefix_len` from it; otherwise, and
//! once the server is lost (the index then describes a past the server no longer keeps), every
//! read takes the RPC path.
//!
//! `retrieve_into` copies a key's bytes out of its page with atomic loads and then rechecks
//! the key's generation: a page goes back to its owner only after its key is gone, so an
//! unchanged generation means the copy is the key's bytes. A key that changes during every
//! attempt is a miss. A page of a region not mapped here yet is read once through the RPC
//! path (`retrieve`, which maps the region); later reads of that region need no round trip.
//! Unlike `retrieve`, a copy takes no hold: nothing stays borrowed after it returns.

use std::cell::RefCell;
use std::io;
use std::sync::Arc;

#[cfg(not(target_arch = "x86_64"))]
use maru_index::copy_atomic;
use maru_index::{Found, IndexReader, Location, PageSource};
use maru_proto::IndexInfo;

use super::connected::Connected;
use super::mapped::MappedRegion;
use super::{check_key, check_keys, during, read, Hooked};
use crate::error::{Error, Result};

/// How often a copy-out read looks a key up again after it changed during the copy.
const READ_ATTEMPTS: usize = 4;

/// The server's index, mapped read-only, and this session's namespace in it.
pub(super) struct ClientIndex {
    pub(super) reader: IndexReader,
    pub(super) ns: u32,
}

impl ClientIndex {
    /// Maps the index the hello named, if this host can open it.
    pub fn open(info: &IndexInfo) -> Option<ClientIndex> {
        match IndexReader::open(std::path::Path::new(&info.path)) {
            Ok(reader) => Some(ClientIndex {
                reader,
                ns: info.namespace,
            }),
            Err(e) => {
                tracing::debug!("reads take the RPC path: {e}");
                None
            }
        }
    }
}

/// The pages of the regions this handler has mapped, with the region of the last copy kept
/// at hand: a batch's pages are mostly in a few regions, and looking the region up under the
/// lock for every page costs about as much as copying a 4 KiB page. A region kept here stays
/// mapped (the `Arc`) until the call ends, as one looked up for the copy would.
struct Mapped<'a> {
    c: &'a Connected,
    last: RefCell<Option<(u32, Arc<MappedRegion>)>>,
}

impl<'a> Mapped<'a> {
    fn new(c: &'a Connected) -> Self {
        Mapped {
            c,
            last: RefCell::new(None),
        }
    }
}

/// A page whose region is not mapped here (yet).
fn unmapped() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "region not mapped")
}

impl PageSource for Mapped<'_> {
    fn copy_out(&self, at: Location, dst: &mut [u8]) -> io::Result<()> {
        let mut last = self.last.borrow_mut();
        let region = match &*last {
            Some((id, region)) if *id == at.region => region,
            _ => {
                let region = read(&self.c.mapped)
                    .get(&u64::from(at.region))
                    .cloned()
                    .ok_or_else(unmapped)?;
                &last.insert((at.region, region)).1
            }
        };
        let end = at.offset.checked_add(dst.len() as u64);
        if end.is_none_or(|e| e > region.mapping.len() as u64) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}+{} lies outside region {}",
                    at.offset,
                    dst.len(),
                    at.region
                ),
            ));
        }
        // SAFETY: the mapping is alive (`region` holds its Arc) and the range is inside it
        // (checked above); `dst` is caller memory, not the mapping, so they do not overlap.
        unsafe { copy_racy(region.mapping.as_ptr().add(at.offset as usize), dst) };
        Ok(())
    }
}

/// Copies `dst.len()` bytes from a page another process may be rewriting (a reused page):
/// the copy may be torn, and the generation recheck that follows discards it then. On x86-64
/// [`maru_shm::copy_from_shared`]: loads outside Rust's memory model at memcpy speed
/// ([`maru_index::copy_atomic`]'s word loads reach a fraction of it), streaming stores for
/// large pages, completed before the recheck's loads.
///
/// # Safety
/// `src` must be valid for reads of `dst.len()` bytes (a live mapping) and must not overlap
/// `dst`.
#[cfg(target_arch = "x86_64")]
unsafe fn copy_racy(src: *const u8, dst: &mut [u8]) {
    // SAFETY: the caller's guarantees are `copy_from_shared`'s; `dst` is writable for its
    // length.
    unsafe { maru_shm::copy_from_shared(dst.as_mut_ptr(), src, dst.len()) }
}

/// See the x86-64 version; elsewhere, atomic word loads.
///
/// # Safety
/// As for the x86-64 version.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn copy_racy(src: *const u8, dst: &mut [u8]) {
    // SAFETY: the caller's guarantees are `copy_atomic`'s.
    unsafe { copy_atomic(src, dst) }
}

/// What one copy-out attempt sequence came to.
enum Copy {
    Done(usize),
    Miss,
    /// The region is not mapped here: take the RPC path.
    Unmapped,
}

impl Connected {
    /// The index, while the session is live.
    pub(super) fn live_index(&self) -> Option<&ClientIndex> {
        self.index
            .as_ref()
            .filter(|_| !self.fence.is_lost() && self.check_open().is_ok())
    }

    fn copy_from_index(
        &self,
        ix: &ClientIndex,
        key: &[u8],
        buf: &mut [u8],
        src: &Mapped<'_>,
    ) -> Result<Copy> {
        for _ in 0..READ_ATTEMPTS {
            let Some(found) = ix.reader.lookup(ix.ns, key) else {
                return Ok(Copy::Miss);
            };
            let len = fits(&found, buf)?;
            match ix.reader.read_found_into(&found, src, buf) {
                Ok(true) => return Ok(Copy::Done(len)),
                Ok(false) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Copy::Unmapped),
                Err(e) => return Err(unusable_location(e)),
            }
        }
        Ok(Copy::Miss)
    }

    /// `copy_from_index` of every key, `bufs[i]` for `keys[i]`, into `out`; the keys whose
    /// region is not mapped here go to `unmapped`. All lookups come first (independent reads
    /// of the index, which overlap one another), then all copies, then all generation
    /// rechecks: a recheck later than right after its copy still proves the copy good (the
    /// generation was the same at the lookup and at the recheck, so the page was the key's
    /// throughout), and the rare key that changed is read again on its own.
    fn batch_copy_from_index(
        &self,
        ix: &ClientIndex,
        keys: &[&[u8]],
        bufs: &mut [&mut [u8]],
        out: &mut [Option<usize>],
        unmapped: &mut Vec<usize>,
    ) -> Result<()> {
        let mut found = Vec::with_capacity(keys.len());
        ix.reader.batch_lookup(ix.ns, keys, &mut found);
        let src = Mapped::new(self);
        for (i, (f, buf)) in found.iter().zip(bufs.iter_mut()).enumerate() {
            let Some(f) = f else { continue };
            let len = fits(f, buf)?;
            match src.copy_out(f.location, &mut buf[..len]) {
                Ok(()) => out[i] = Some(len),
                Err(e) if e.kind() == io::ErrorKind::NotFound => unmapped.push(i),
                Err(e) => return Err(unusable_location(e)),
            }
        }
        for (i, f) in found.iter().enumerate() {
            let Some(f) = f.filter(|_| out[i].is_some()) else {
                continue;
            };
            if ix.reader.is_current(&f) {
                continue;
            }
            out[i] = match self.copy_from_index(ix, keys[i], bufs[i], &src)? {
                Copy::Done(n) => Some(n),
                Copy::Miss => None,
                Copy::Unmapped => {
                    unmapped.push(i);
                    None
                }
            };
        }
        Ok(())
    }
}

fn unusable_location(e: io::Error) -> Error {
    Error::protocol(
        "retrieve_into",
        format!("the key index names an unusable location: {e}"),
    )
}

fn fits(found: &Found, buf: &[u8]) -> Result<usize> {
    let len = found.location.len as usize;
    if buf.len() < len {
        return Err(Error::invalid(
            "retrieve_into",
            format!("the buffer has {} bytes, the value {len}", buf.len()),
        ));
    }
    Ok(len)
}

impl Hooked<'_> {
    pub fn reads_index(&self) -> bool {
        self.h
            .connected(self.hook)
            .is_ok_and(|c| c.live_index().is_some())
    }

    /// `f` of the index while the session is live (after this handler's own write-behind
    /// registrations settled), or `None` when the RPC path must answer.
    fn with_index<T>(&self, f: impl FnOnce(&ClientIndex) -> T) -> Result<Option<T>> {
        let c = self.h.connected(self.hook)?;
        let Some(ix) = c.live_index() else {
            return Ok(None);
        };
        c.settle_for_read(self.hook);
        Ok(Some(f(ix)))
    }

    /// `exists` from the index, or `None` when the RPC path must answer.
    pub(super) fn index_exists(&self, key: &[u8]) -> Result<Option<bool>> {
        check_key(key)?;
        self.with_index(|ix| ix.reader.exists(ix.ns, key))
    }

    /// `batch_exists` from the index, or `None` when the RPC path must answer.
    pub(super) fn index_batch_exists(&self, keys: &[&[u8]]) -> Result<Option<Vec<bool>>> {
        check_keys(keys)?;
        self.with_index(|ix| {
            let mut found = Vec::new();
            ix.reader.batch_exists(ix.ns, keys, &mut found);
            found
        })
    }

    pub fn prefix_len(&self, keys: &[&[u8]]) -> Result<usize> {
        during("prefix_len", || {
            if let Some(v) = self.index_prefix_len(keys)? {
                return Ok(v);
            }
            let found = self.batch_exists(keys)?;
            Ok(found.iter().take_while(|b| **b).count())
        })
    }

    fn index_prefix_len(&self, keys: &[&[u8]]) -> Result<Option<usize>> {
        check_keys(keys)?;
        self.with_index(|ix| ix.reader.prefix_len(ix.ns, keys))
    }

    /// Copies `key`'s value into `buf` (at least the value's length): the length, or `None`
    /// for a missing key (or one that changed during every attempt). From the key index when
    /// this host maps it and the region is mapped here; otherwise one `retrieve` whose view is
    /// copied and dropped at once.
    pub fn retrieve_into(&self, key: &[u8], buf: &mut [u8]) -> Result<Option<usize>> {
        during("retrieve_into", || {
            check_key(key)?;
            let c = self.h.connected(self.hook)?;
            if let Some(ix) = c.live_index() {
                c.settle_for_read(self.hook);
                match c.copy_from_index(ix, key, buf, &Mapped::new(&c))? {
                    Copy::Done(n) => {
                        c.conns.releases.uses.used([key]);
                        return Ok(Some(n));
                    }
                    Copy::Miss => return Ok(None),
                    Copy::Unmapped => {}
                }
            }
            self.retrieve_copy(key, buf)
        })
    }

    /// The RPC path of `retrieve_into`.
    fn retrieve_copy(&self, key: &[u8], buf: &mut [u8]) -> Result<Option<usize>> {
        let Some(view) = self.retrieve(key)? else {
            return Ok(None);
        };
        copy_view(&view, buf).map(Some)
    }

    /// `retrieve_into` for many keys, `bufs[i]` for `keys[i]`; keys the index cannot serve
    /// here go through one `batch_retrieve`.
    pub fn batch_retrieve_into(
        &self,
        keys: &[&[u8]],
        bufs: &mut [&mut [u8]],
    ) -> Result<Vec<Option<usize>>> {
        during("batch_retrieve_into", || {
            check_keys(keys)?;
            if keys.len() != bufs.len() {
                return Err(Error::invalid(
                    "batch_retrieve_into",
                    format!("{} keys but {} buffers", keys.len(), bufs.len()),
                ));
            }
            let c = self.h.connected(self.hook)?;
            let mut out = vec![None; keys.len()];
            let mut rest: Vec<usize> = Vec::new();
            match c.live_index() {
                Some(ix) => {
                    c.settle_for_read(self.hook);
                    c.batch_copy_from_index(ix, keys, bufs, &mut out, &mut rest)?;
                    let read = keys.iter().zip(&out).filter(|(_, n)| n.is_some());
                    c.conns.releases.uses.used(read.map(|(k, _)| *k));
                }
                None => rest.extend(0..keys.len()),
            }
            if rest.is_empty() {
                return Ok(out);
            }
            let asked: Vec<&[u8]> = rest.iter().map(|&i| keys[i]).collect();
            let views = self.batch_retrieve(&asked)?;
            for (i, view) in rest.into_iter().zip(views) {
                if let Some(view) = view {
                    out[i] = Some(copy_view(&view, bufs[i])?);
                }
            }
            Ok(out)
        })
    }
}

/// Copies a held view's bytes into `buf` (the view holds its page, so they are stable).
fn copy_view(view: &crate::View, buf: &mut [u8]) -> Result<usize> {
    let len = view.len();
    let Some(dst) = buf.get_mut(..len) else {
        return Err(Error::invalid(
            "retrieve_into",
            format!("the buffer has {} bytes, the value {len}", buf.len()),
        ));
    };
    // SAFETY: the view keeps its mapping alive and its page held, so its `len` bytes at
    // `as_ptr()` are readable and nobody rewrites them while it lives; `dst` is caller
    // memory, which does not overlap the mapping.
    unsafe { std::ptr::copy_nonoverlapping(view.as_ptr(), dst.as_mut_ptr(), len) };
    Ok(len)
}
