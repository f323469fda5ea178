//! The table protocol: how the single writer changes buckets, entries and key bytes, and how
//! readers read them without locks. The same code runs over a mapped file (`segment.rs`) and,
//! under `cfg(loom)`, over loom's atomics in memory (tests/loom.rs).
//!
//! **Why it is sound.** Every word a reader looks at is loaded atomically with acquire
//! ordering, and every word the writer changes is stored atomically, with release ordering for
//! all but the first store of a change (the version going odd, which may be relaxed: every
//! later store of the change is a release that follows it). So if a reader's load sees any
//! value a change wrote, it also sees that change's odd version on its next load of the
//! version word. A read of an entry therefore loads the version (`v1`, must be even), the
//! fields, the key bytes the entry names, then the version again (`v2`), and keeps what it read
//! only if `v2 == v1`: then no store of any change came between its loads (versions only grow,
//! by 2 per change, so equal means unchanged). No reader ever makes a non-atomic load of memory
//! the writer may be storing to, which is what keeps this defined behaviour in Rust's model
//! (a seqlock with plain reads of the data is a data race).
//!
//! A mismatch is answered without the second version load: the fields that identify a key
//! (hash, namespace, length, key bytes) never change while the key is live, so a mismatch on
//! them means the slot holds, or is becoming, another key: the lookup's key was not there at
//! that moment.
//!
//! **Linearisation.** An insert takes effect when its tag is stored (after the entry is
//! complete and the overflow counts on its way are raised); a remove when its version goes odd;
//! an update when its version goes back to even. Overflow counts are raised before a key is
//! published and lowered after it is gone, so at every instant each bucket's count is at least
//! the number of live keys that passed it: a lookup never misses a key that was present for
//! the whole lookup, and keys never move, so nothing can slip past a probe.

use crate::coherence::Coherence;
use crate::hash::{key_hash, key_word};
use crate::layout::*;
use crate::sync::{relax, AtomicU32, AtomicU64, Ordering::*};

/// Where a key's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    /// The server's number for the region.
    pub region: u32,
    /// Byte offset inside the region.
    pub offset: u64,
    /// Byte count (positive).
    pub len: u32,
}

/// A key found in the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Found {
    pub location: Location,
    /// The registration's number: never reused, so a reader that kept it can learn later
    /// whether the key still points at the same bytes.
    pub generation: u64,
    /// The entry that holds it (for rechecking the generation).
    pub slot: u64,
}

/// How long a reader waits for an entry whose version stays odd before it treats the entry as
/// absent: the writer changes an entry in a few stores, so an entry odd for this long was
/// being changed by a writer that died (a restarted writer repairs it).
#[cfg(not(loom))]
const STUCK_TURNS: u32 = 20_000;

#[inline]
pub(crate) fn tag_of(hash: u64) -> u32 {
    ((hash >> 32) as u32) | 1
}

#[inline]
pub(crate) fn home_of(hash: u64, buckets: u64) -> u64 {
    ((hash & 0xffff_ffff) * buckets) >> 32
}

fn addr<T>(s: &[T]) -> *const u8 {
    s.as_ptr() as *const u8
}

/// The words of one entry, as the writer composes them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryWords {
    pub generation: u64,
    pub hash: u64,
    pub ns_keylen: u64,
    pub region_len: u64,
    pub offset: u64,
    pub key0: u64,
    pub key1: u64,
}

pub(crate) fn pack_location(loc: Location) -> (u64, u64) {
    (loc.region as u64 | ((loc.len as u64) << 32), loc.offset)
}

pub(crate) fn unpack_location(region_len: u64, offset: u64) -> Location {
    Location {
        region: region_len as u32,
        offset,
        len: (region_len >> 32) as u32,
    }
}

/// Keys a batch lookup hashes before it probes them.
const HASH_RUN: usize = 128;
/// How many keys ahead of its lookup a batch asks for a key's entry line (its bucket line
/// came as the run was hashed).
const ENTRY_AHEAD: usize = 8;
/// How many keys ahead of its lookup a batch asks for a key's bytes, read from the entry
/// asked for `ENTRY_AHEAD - KEY_AHEAD` keys before.
const KEY_AHEAD: usize = 4;

/// A view of the table's memory.
pub(crate) struct Table<'a> {
    pub buckets: &'a [AtomicU32],
    pub entries: &'a [AtomicU64],
    pub keys: &'a [AtomicU64],
    pub nbuckets: u64,
    pub seed: [u64; 2],
}

/// What one read of an entry found.
enum Probe {
    Match(Found),
    Other,
}

impl<'a> Table<'a> {
    #[inline]
    pub(crate) fn bucket(&self, b: u64) -> &'a [AtomicU32] {
        let i = b as usize * BUCKET_WORDS;
        &self.buckets[i..i + BUCKET_WORDS]
    }

    #[inline]
    pub(crate) fn entry(&self, slot: u64) -> &'a [AtomicU64] {
        let i = slot as usize * ENTRY_WORDS;
        &self.entries[i..i + ENTRY_WORDS]
    }

    #[inline]
    pub(crate) fn slots(&self) -> u64 {
        self.nbuckets * BUCKET_SLOTS as u64
    }

    #[inline]
    fn next_bucket(&self, b: u64) -> u64 {
        if b + 1 == self.nbuckets {
            0
        } else {
            b + 1
        }
    }

    #[inline]
    pub(crate) fn hash(&self, ns: u32, key: &[u8]) -> u64 {
        key_hash(self.seed, ns, key)
    }

    /// The key's entry, or None. Lock-free; any number of readers, concurrently with the writer.
    pub(crate) fn lookup<C: Coherence>(&self, coh: &C, ns: u32, key: &[u8]) -> Option<Found> {
        if key.len() > MAX_KEY_LEN {
            return None;
        }
        let hash = self.hash(ns, key);
        self.lookup_hashed(coh, hash, ns, key)
    }

    /// Looks up every key of `keys` in order; `each` gets every answer and returns false to
    /// stop. Each answer is a separate lookup, with the protocol of [`Table::lookup`].
    ///
    /// The lookups of a run are pipelined with hints to the CPU (prefetches, which read
    /// nothing a caller sees): a key's home bucket line is asked for as its hash is computed,
    /// its entry line [`ENTRY_AHEAD`] keys before its lookup (from that bucket's tags), its key
    /// bytes [`KEY_AHEAD`] keys before (from that entry). On an index larger than the caches a
    /// lookup is three misses in a row (bucket, entry, key bytes); asked for ahead, the misses
    /// of several keys overlap. Measured (`cargo bench -p maru-index --bench index`, 1M keys of
    /// 48 bytes, best of 20 rounds, interleaved runs at the host's faster speed): a batch of
    /// 512 scattered keys takes 45–52 µs with the hints and 125–150 µs without; 512 keys whose
    /// lines are all in cache pay for the hints' instructions, 13.7–14.3 µs against
    /// 11.6–12.4 µs.
    pub(crate) fn batch_lookup<C: Coherence, K: AsRef<[u8]>>(
        &self,
        coh: &C,
        ns: u32,
        keys: &[K],
        mut each: impl FnMut(Option<Found>) -> bool,
    ) {
        // All hashes of a run first, then its probes: the hashing of one key overlaps the
        // memory reads of the next (measured: a batch of 512 a tenth faster than hashing inside
        // each lookup). Runs of HASH_RUN keep the hashes on the stack: no allocation per call.
        let mut hashes = [0u64; HASH_RUN];
        let mut slots = [None; HASH_RUN];
        for run in keys.chunks(HASH_RUN) {
            let (hashes, slots) = (&mut hashes[..run.len()], &mut slots[..run.len()]);
            for (h, k) in hashes.iter_mut().zip(run) {
                *h = self.hash(ns, k.as_ref());
                prefetch(&self.bucket(home_of(*h, self.nbuckets))[0]);
            }
            let hashes = &*hashes;
            for (slot, &h) in slots.iter_mut().zip(hashes).take(ENTRY_AHEAD) {
                *slot = self.prefetch_entry(h);
            }
            for (j, (key, &hash)) in run.iter().zip(hashes).enumerate() {
                if let Some(&h) = hashes.get(j + ENTRY_AHEAD) {
                    slots[j + ENTRY_AHEAD] = self.prefetch_entry(h);
                }
                if let Some(&Some(slot)) = slots.get(j + KEY_AHEAD) {
                    self.prefetch_key(slot);
                }
                let key = key.as_ref();
                let found = if key.len() > MAX_KEY_LEN {
                    None
                } else {
                    self.lookup_hashed(coh, hash, ns, key)
                };
                if !each(found) {
                    return;
                }
            }
        }
    }

    /// Asks the CPU to start loading the entry a lookup of `hash` reads first, that of the
    /// first slot of its home bucket with its tag, and returns the slot. A hint only: the tags
    /// are read without the lookup protocol, and a stale one only points the hint elsewhere
    /// (under loom, which would explore those reads too, there are no hints).
    fn prefetch_entry(&self, hash: u64) -> Option<u64> {
        if cfg!(loom) {
            return None;
        }
        let (tag, b) = (tag_of(hash), home_of(hash, self.nbuckets));
        let line = self.bucket(b);
        let s = line[..BUCKET_SLOTS]
            .iter()
            .position(|t| t.load(Relaxed) == tag)?;
        let slot = b * BUCKET_SLOTS as u64 + s as u64;
        prefetch(&self.entry(slot)[0]);
        Some(slot)
    }

    pub(crate) fn lookup_hashed<C: Coherence>(
        &self,
        coh: &C,
        hash: u64,
        ns: u32,
        key: &[u8],
    ) -> Option<Found> {
        let tag = tag_of(hash);
        let mut b = home_of(hash, self.nbuckets);
        for _ in 0..self.nbuckets {
            let line = self.bucket(b);
            coh.refresh(addr(line), 64);
            for (s, t) in line[..BUCKET_SLOTS].iter().enumerate() {
                if t.load(Acquire) == tag {
                    let slot = b * BUCKET_SLOTS as u64 + s as u64;
                    if let Probe::Match(f) = self.read_entry(coh, slot, hash, ns, key) {
                        return Some(f);
                    }
                }
            }
            if line[OVERFLOW_WORD].load(Acquire) == 0 {
                return None;
            }
            b = self.next_bucket(b);
        }
        None
    }

    /// Reads entry `slot` and says whether it holds `(ns, key)` (see the module comment).
    fn read_entry<C: Coherence>(
        &self,
        coh: &C,
        slot: u64,
        hash: u64,
        ns: u32,
        key: &[u8],
    ) -> Probe {
        let e = self.entry(slot);
        let want_nk = ns as u64 | ((key.len() as u64) << 32);
        let mut turn = 0u32;
        loop {
            coh.refresh(addr(e), 64);
            let v1 = e[W_VERSION].load(Acquire);
            if v1 & 1 == 1 {
                #[cfg(not(loom))]
                if turn >= STUCK_TURNS {
                    return Probe::Other;
                }
                relax(turn);
                turn += 1;
                continue;
            }
            let generation = e[W_GENERATION].load(Acquire);
            if generation == 0
                || e[W_HASH].load(Acquire) != hash
                || e[W_NS_KEYLEN].load(Acquire) != want_nk
            {
                return Probe::Other;
            }
            let k0 = e[W_KEY0].load(Acquire);
            let k1 = e[W_KEY1].load(Acquire);
            if key.len() <= INLINE_KEY_BYTES {
                if k0 != key_word(key, 0) || k1 != key_word(key, 1) {
                    return Probe::Other;
                }
            } else {
                if k1 != key_word(key, 0) {
                    return Probe::Other;
                }
                match self.key_matches(coh, k0, key) {
                    Some(true) => {}
                    Some(false) => return Probe::Other,
                    // Names words outside the area: only a torn read can do that.
                    None => {
                        if e[W_VERSION].load(Acquire) == v1 {
                            return Probe::Other;
                        }
                        continue;
                    }
                }
            }
            let region_len = e[W_REGION_LEN].load(Acquire);
            let offset = e[W_OFFSET].load(Acquire);
            if e[W_VERSION].load(Acquire) == v1 {
                return Probe::Match(Found {
                    location: unpack_location(region_len, offset),
                    generation,
                    slot,
                });
            }
            // Changed under us (an update, or a remove and reuse): read it again.
        }
    }

    /// Compares the stored words at `at` with `key`; None when they are outside the area.
    fn key_matches<C: Coherence>(&self, coh: &C, at: u64, key: &[u8]) -> Option<bool> {
        let words = key.len().div_ceil(8);
        let start = usize::try_from(at).ok()?;
        let stored = self.keys.get(start..start.checked_add(words)?)?;
        coh.refresh(addr(stored), words * 8);
        Some(
            stored
                .iter()
                .enumerate()
                .all(|(i, w)| w.load(Acquire) == key_word(key, i)),
        )
    }

    /// The generation entry `slot` holds now (0 when empty).
    #[inline]
    pub(crate) fn generation_at<C: Coherence>(&self, coh: &C, slot: u64) -> u64 {
        let e = self.entry(slot);
        coh.refresh(addr(e), 64);
        e[W_GENERATION].load(Acquire)
    }

    // ---- the writer's side: one thread of one process calls these ----

    /// A free slot on `hash`'s probe sequence (the writer's own view: it is the only writer).
    pub(crate) fn free_slot(&self, hash: u64) -> Option<u64> {
        let mut b = home_of(hash, self.nbuckets);
        for _ in 0..self.nbuckets {
            let line = self.bucket(b);
            for (s, t) in line[..BUCKET_SLOTS].iter().enumerate() {
                let slot = b * BUCKET_SLOTS as u64 + s as u64;
                if t.load(Relaxed) == 0 && self.entry(slot)[W_GENERATION].load(Relaxed) == 0 {
                    return Some(slot);
                }
            }
            b = self.next_bucket(b);
        }
        None
    }

    /// Adds `delta` to the overflow count of every bucket from `hash`'s home up to (not
    /// including) the bucket of `slot`.
    pub(crate) fn shift_overflow<C: Coherence>(&self, coh: &C, hash: u64, slot: u64, raise: bool) {
        let target = slot / BUCKET_SLOTS as u64;
        let mut b = home_of(hash, self.nbuckets);
        while b != target {
            let line = self.bucket(b);
            let w = &line[OVERFLOW_WORD];
            let v = w.load(Relaxed);
            w.store(if raise { v + 1 } else { v.saturating_sub(1) }, Release);
            coh.publish(addr(line), 64);
            b = self.next_bucket(b);
        }
    }

    /// Stores a long key's words at `at` of the key-bytes area (not yet named by any entry).
    pub(crate) fn write_key<C: Coherence>(&self, coh: &C, at: u64, key: &[u8]) {
        let words = key.len().div_ceil(8);
        let area = &self.keys[at as usize..at as usize + words];
        for (i, w) in area.iter().enumerate() {
            w.store(key_word(key, i), Release);
        }
        coh.publish(addr(area), words * 8);
    }

    /// Writes every field of entry `slot` as one change (version odd, fields, version even).
    pub(crate) fn write_entry<C: Coherence>(&self, coh: &C, slot: u64, w: EntryWords) {
        let e = self.entry(slot);
        let v = e[W_VERSION].load(Relaxed);
        e[W_VERSION].store(v + 1, Relaxed);
        e[W_HASH].store(w.hash, Release);
        e[W_NS_KEYLEN].store(w.ns_keylen, Release);
        e[W_REGION_LEN].store(w.region_len, Release);
        e[W_OFFSET].store(w.offset, Release);
        e[W_KEY0].store(w.key0, Release);
        e[W_KEY1].store(w.key1, Release);
        e[W_GENERATION].store(w.generation, Release);
        e[W_VERSION].store(v + 2, Release);
        coh.publish(addr(e), 64);
    }

    /// Publishes a complete entry by storing its tag: from here lookups find it.
    pub(crate) fn set_tag<C: Coherence>(&self, coh: &C, slot: u64, tag: u32) {
        let line = self.bucket(slot / BUCKET_SLOTS as u64);
        line[(slot % BUCKET_SLOTS as u64) as usize].store(tag, Release);
        coh.publish(addr(line), 64);
    }

    /// The whole insert of a key known to be absent into free `slot`: raise the overflow counts
    /// on its way, write the key bytes (if long) and the entry, then the tag.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn insert_at<C: Coherence>(
        &self,
        coh: &C,
        slot: u64,
        hash: u64,
        ns: u32,
        key: &[u8],
        loc: Location,
        generation: u64,
        key_at: u64,
    ) {
        self.shift_overflow(coh, hash, slot, true);
        let (key0, key1) = if key.len() <= INLINE_KEY_BYTES {
            (key_word(key, 0), key_word(key, 1))
        } else {
            self.write_key(coh, key_at, key);
            (key_at, key_word(key, 0))
        };
        let (region_len, offset) = pack_location(loc);
        self.write_entry(
            coh,
            slot,
            EntryWords {
                generation,
                hash,
                ns_keylen: ns as u64 | ((key.len() as u64) << 32),
                region_len,
                offset,
                key0,
                key1,
            },
        );
        self.set_tag(coh, slot, tag_of(hash));
    }

    /// Removes the key in `slot`: empty the entry (the moment it is gone), clear its tag, then
    /// lower the overflow counts on its way.
    pub(crate) fn remove_at<C: Coherence>(&self, coh: &C, slot: u64, hash: u64) {
        let e = self.entry(slot);
        let v = e[W_VERSION].load(Relaxed);
        e[W_VERSION].store(v + 1, Relaxed);
        e[W_GENERATION].store(0, Release);
        e[W_VERSION].store(v + 2, Release);
        coh.publish(addr(e), 64);
        self.set_tag(coh, slot, 0);
        self.shift_overflow(coh, hash, slot, false);
    }

    /// Points the key in `slot` at a new location under a new generation, as one change.
    pub(crate) fn update_at<C: Coherence>(
        &self,
        coh: &C,
        slot: u64,
        loc: Location,
        generation: u64,
    ) {
        let e = self.entry(slot);
        let (region_len, offset) = pack_location(loc);
        let v = e[W_VERSION].load(Relaxed);
        e[W_VERSION].store(v + 1, Relaxed);
        e[W_REGION_LEN].store(region_len, Release);
        e[W_OFFSET].store(offset, Release);
        e[W_GENERATION].store(generation, Release);
        e[W_VERSION].store(v + 2, Release);
        coh.publish(addr(e), 64);
    }

    /// Asks the CPU to start loading the key bytes of `slot`'s entry, for a read of them a few
    /// steps later (a walk in slot order, a batch of lookups). Entries are in hash order and key bytes in
    /// the order keys came, so each key's bytes are a cache miss of their own; walked one
    /// after another, the misses happen one at a time (measured at 1M keys: half the time of
    /// the walk), issued ahead they overlap. A hint only: it reads nothing a caller sees.
    pub(crate) fn prefetch_key(&self, slot: u64) {
        if slot >= self.slots() {
            return;
        }
        let e = self.entry(slot);
        let len = (e[W_NS_KEYLEN].load(Relaxed) >> 32) as usize;
        if len <= INLINE_KEY_BYTES || len > MAX_KEY_LEN {
            return;
        }
        let Ok(start) = usize::try_from(e[W_KEY0].load(Relaxed)) else {
            return;
        };
        let words = len.div_ceil(8);
        for at in [start, start.saturating_add(words - 1)] {
            if let Some(w) = self.keys.get(at) {
                prefetch(w);
            }
        }
    }

    /// The key bytes of a live entry, read by the writer (or at attach, before anyone writes):
    /// None when the entry names bytes outside the area or a length beyond the maximum.
    pub(crate) fn stored_key(&self, slot: u64, out: &mut Vec<u8>) -> Option<(u32, u64)> {
        let e = self.entry(slot);
        let nk = e[W_NS_KEYLEN].load(Acquire);
        let (ns, len) = (nk as u32, (nk >> 32) as usize);
        if len > MAX_KEY_LEN {
            return None;
        }
        out.clear();
        let k0 = e[W_KEY0].load(Acquire);
        if len <= INLINE_KEY_BYTES {
            out.extend_from_slice(&k0.to_le_bytes());
            out.extend_from_slice(&e[W_KEY1].load(Acquire).to_le_bytes());
        } else {
            let start = usize::try_from(k0).ok()?;
            let words = self.keys.get(start..start.checked_add(len.div_ceil(8))?)?;
            for w in words {
                out.extend_from_slice(&w.load(Acquire).to_le_bytes());
            }
        }
        out.truncate(len);
        Some((ns, k0))
    }
}

/// How far ahead of a walk in slot order [`Table::prefetch_key`] is asked for: enough misses
/// in flight to overlap, few enough that their lines are still in cache when read.
pub(crate) const PREFETCH_AHEAD: u64 = 16;

#[cfg(all(target_arch = "x86_64", not(loom)))]
fn prefetch<T>(w: &T) {
    use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: SSE is part of every x86-64 CPU (the baseline target enables it), and a
    // prefetch reads nothing the program sees: it cannot fault, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>((w as *const T).cast::<i8>()) };
}

#[cfg(any(not(target_arch = "x86_64"), loom))]
fn prefetch<T>(_: &T) {}
