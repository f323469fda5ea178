//! Readers: clients map the index read-only and look keys up with atomic loads alone.

use std::fs::File;
use std::path::Path;

use maru_shm::MapMode;

use crate::coherence::{Coherence, Coherent};
use crate::error::{ErrorKind, IndexError};
use crate::layout::*;
use crate::segment::Segment;
use crate::sync::{fence, Ordering::*};
use crate::table::{Found, Location};

/// Where [`IndexReader::read_into`] copies a key's bytes from: the pool's regions, as the
/// client maps them.
pub trait PageSource {
    /// Copies the `dst.len()` bytes at `at` into `dst`. The bytes may be changing (the page may
    /// have been reused since the lookup): copy with [`copy_atomic`] or another copy that makes
    /// no assumption about them; the caller rechecks the generation afterwards.
    fn copy_out(&self, at: Location, dst: &mut [u8]) -> std::io::Result<()>;
}

/// What a copy-out read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// `dst[..found.location.len]` holds the key's bytes, unchanged during the copy.
    Copied(Found),
    /// No such key (or it kept changing while being read).
    Miss,
}

/// A read-only view of the index, for any number of processes and threads.
pub struct IndexReader<C: Coherence = Coherent> {
    seg: Segment,
    coh: C,
}

/// How often [`IndexReader::read_into`] looks the key up again when the key changed during a
/// copy, before it answers Miss.
const READ_ATTEMPTS: usize = 4;

impl IndexReader<Coherent> {
    /// Maps the index at `path` read-only (lazily: pages fault in as lookups touch them).
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        Self::open_with(path, Coherent)
    }
}

impl<C: Coherence> IndexReader<C> {
    /// As [`IndexReader::open`], with a coherence hook for memory that needs one.
    pub fn open_with(path: &Path, coh: C) -> Result<Self, IndexError> {
        let file = File::open(path)
            .map_err(|source| IndexError::new(path, ErrorKind::Io { op: "open", source }))?;
        let seg = Segment::open(path, &file, MapMode::ReadOnly, false)?;
        Ok(IndexReader { seg, coh })
    }

    /// The key's location and generation, or None.
    #[inline]
    pub fn lookup(&self, ns: u32, key: &[u8]) -> Option<Found> {
        self.seg.table().lookup(&self.coh, ns, key)
    }

    /// Whether the key is present.
    #[inline]
    pub fn exists(&self, ns: u32, key: &[u8]) -> bool {
        self.lookup(ns, key).is_some()
    }

    /// Looks up every key of `keys` in namespace `ns`, answers in `out` (cleared first), in
    /// order. Each answer is a separate lookup: the batch is not a snapshot.
    pub fn batch_lookup<K: AsRef<[u8]>>(&self, ns: u32, keys: &[K], out: &mut Vec<Option<Found>>) {
        out.clear();
        out.reserve(keys.len());
        self.seg.table().batch_lookup(&self.coh, ns, keys, |f| {
            out.push(f);
            true
        });
    }

    /// Whether each key of `keys` is present, in `out` (cleared first), in order; like
    /// [`Reader::batch_lookup`], not a snapshot.
    pub fn batch_exists<K: AsRef<[u8]>>(&self, ns: u32, keys: &[K], out: &mut Vec<bool>) {
        out.clear();
        out.reserve(keys.len());
        self.seg.table().batch_lookup(&self.coh, ns, keys, |f| {
            out.push(f.is_some());
            true
        });
    }

    /// How many leading keys of `keys` are present (a prefix match stops at the first miss).
    pub fn prefix_len<K: AsRef<[u8]>>(&self, ns: u32, keys: &[K]) -> usize {
        let mut n = 0;
        self.seg.table().batch_lookup(&self.coh, ns, keys, |f| {
            n += f.is_some() as usize;
            f.is_some()
        });
        n
    }

    /// Whether `found` still describes the key's bytes: its entry holds the same generation.
    /// A page is handed back to its owner only after the key that names it is gone, so an
    /// unchanged generation means the bytes were not reused.
    pub fn is_current(&self, found: &Found) -> bool {
        fence(Acquire);
        found.slot < self.seg.geometry.slots()
            && self.seg.table().generation_at(&self.coh, found.slot) == found.generation
    }

    /// Copies the bytes `found` names into `dst` (at least `found.location.len` long) and
    /// rechecks the generation afterwards: true when the copy is the key's bytes, false when
    /// the key changed during the copy (`dst` then holds garbage).
    pub fn read_found_into<S: PageSource>(
        &self,
        found: &Found,
        src: &S,
        dst: &mut [u8],
    ) -> std::io::Result<bool> {
        let len = found.location.len as usize;
        let Some(dst) = dst.get_mut(..len) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("destination of {} bytes, the key has {len}", dst.len()),
            ));
        };
        src.copy_out(found.location, dst)?;
        // The copy's loads come before the generation's (an acquire fence keeps earlier loads
        // from moving after later ones).
        Ok(self.is_current(found))
    }

    /// Looks `(ns, key)` up and copies its bytes into `dst`, looking again if the key changed
    /// during the copy; Miss when it is absent (or changed on every attempt).
    pub fn read_into<S: PageSource>(
        &self,
        ns: u32,
        key: &[u8],
        src: &S,
        dst: &mut [u8],
    ) -> std::io::Result<ReadOutcome> {
        for _ in 0..READ_ATTEMPTS {
            let Some(found) = self.lookup(ns, key) else {
                return Ok(ReadOutcome::Miss);
            };
            if self.read_found_into(&found, src, dst)? {
                return Ok(ReadOutcome::Copied(found));
            }
        }
        Ok(ReadOutcome::Miss)
    }

    /// The writer's attachment number: odd while a writer is attached, even after it closed
    /// cleanly; it changes at every attach, so a reader can tell its writer restarted.
    pub fn epoch(&self) -> u64 {
        self.seg.header()[H_EPOCH].load(Acquire)
    }

    /// Keys in the index (as the writer last counted them).
    pub fn len(&self) -> u64 {
        self.seg.header()[H_LIVE].load(Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn geometry(&self) -> Geometry {
        self.seg.geometry
    }
}

/// Copies `dst.len()` bytes from `src` with atomic loads (relaxed; whole words where aligned),
/// for bytes another process may be writing: the copy may be torn, but it is not a data race,
/// and the generation recheck that follows tells whether it is good.
///
/// # Safety
/// `src` must be valid for reads of `dst.len()` bytes for the duration of the call (a live
/// mapping), and must not overlap `dst`.
pub unsafe fn copy_atomic(src: *const u8, dst: &mut [u8]) {
    use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
    let len = dst.len();
    let mut i = 0;
    // Bytes up to the first word boundary, then words, then the tail.
    while i < len && !(src as usize + i).is_multiple_of(8) {
        // SAFETY: src + i is inside the readable range (i < len); AtomicU8 has no alignment
        // requirement, and only loads are made.
        dst[i] = unsafe { AtomicU8::from_ptr(src.add(i) as *mut u8) }.load(Relaxed);
        i += 1;
    }
    while i + 8 <= len {
        // SAFETY: src + i is 8-aligned and the 8 bytes lie inside the readable range; loads
        // only (on a read-only mapping too: a lock-free 8-byte load is a plain read).
        let w = unsafe { AtomicU64::from_ptr(src.add(i) as *mut u64) }.load(Relaxed);
        dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
        i += 8;
    }
    while i < len {
        // SAFETY: as for the head bytes.
        dst[i] = unsafe { AtomicU8::from_ptr(src.add(i) as *mut u8) }.load(Relaxed);
        i += 1;
    }
}
