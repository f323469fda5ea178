//! A shard's key bytes: an append-only byte arena addressed by [`KeyRef`]s, 8-byte offset +
//! length pairs that the shard's table stores instead of a pointer to a separately allocated
//! key.
//!
//! Why an arena: a key costs exactly its own bytes, with no allocation (and malloc header) per
//! key, and the reference is 8 bytes where a `Box<[u8]>` is 16. Why offsets rather than
//! pointers: the next home of the registry is an index in shared memory (docs/ARCHITECTURE.md
//! §8), where only offsets mean the same thing in every process.
//!
//! The arena is one logical run of bytes stored in chunks of [`CHUNK`] bytes (a key never
//! spans two chunks, so an offset splits into a chunk number and a position in it). Why chunks
//! and not one `Vec<u8>`: a single vector grows by reallocation, and every buffer it leaves
//! behind becomes a hole in the malloc heap that stays resident; with one such vector per shard
//! that measured 103–105 bytes per key (process RSS at 1M keys of 40 bytes) against 97–99 for
//! chunks, which are never reallocated once full. The waste is the unused end of each chunk,
//! less than one key per 64 KiB, and the rest of the last chunk (reserved, but not resident
//! until written).
//!
//! Removing a key leaves its bytes behind (except the newest key, whose bytes are taken back at
//! once); the arena counts them ([`Arena::dead`]) and the owner decides when to
//! [`Arena::compact`].

use std::ops::Range;

/// Size of a chunk. A chunk position fits in the low 16 bits of an offset.
const CHUNK: usize = 1 << 16;

/// Longest key the arena stores: a [`KeyRef`] keeps the length in 16 bits (and a key must fit
/// in one chunk). The protocol's limit is far below (checked at compile time), so a longer key
/// can only come from a bug in the server.
pub const MAX_KEY: usize = u16::MAX as usize;
const _: () = assert!(maru_proto::MAX_KEY_LEN <= MAX_KEY && MAX_KEY <= CHUNK);

/// Chunks are numbered in 32 bits, so an arena addresses 2^48 bytes (256 TiB). That cannot be
/// reached: the owner compacts an arena before its garbage outgrows its live keys, so one
/// shard would need over 100 TiB of keys resident in this process (and the registry, which
/// spreads keys evenly over its shards by a seeded hash, 64 times that) — more than the
/// 128 TiB user address space of x86-64 with 4-level paging, and than any machine's memory.
/// (A 32-bit byte offset would have made the limit 4 GiB per shard, ~256 GiB of keys in all:
/// merely unlikely, and an insert has no way to report it since `insert_if_absent`'s `false`
/// means "exists".) [`Arena::push`] still checks, so the impossible fails loudly, before
/// anything changes, instead of storing a wrong offset.
const MAX_CHUNKS: u64 = 1 << 32;

/// Capacity of a shard's first chunk when it starts, so that a registry with a handful of keys
/// per shard does not hold 64 KiB per shard; it doubles up to [`CHUNK`] (reallocation of a
/// buffer this small leaves no hole that matters).
const FIRST_CHUNK: usize = 256;

/// Where a key's bytes are in its shard's arena: the offset in the high 48 bits (chunk number,
/// then position in the chunk), the length in the low 16. Eight bytes, so a table slot
/// `(KeyRef, Entry)` is 24, and pointer-free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRef(u64);

impl KeyRef {
    /// The empty key: no bytes, offset 0, valid in any arena.
    pub const EMPTY: KeyRef = KeyRef(0);

    fn new(chunk: usize, pos: usize, len: usize) -> KeyRef {
        debug_assert!((chunk as u64) < MAX_CHUNKS && pos + len <= CHUNK && len <= MAX_KEY);
        KeyRef(((chunk as u64) << 32) | ((pos as u64) << 16) | len as u64)
    }

    pub fn len(self) -> usize {
        (self.0 & 0xffff) as usize
    }

    fn chunk(self) -> usize {
        (self.0 >> 32) as usize
    }

    /// The key's bytes inside its chunk.
    fn range(self) -> Range<usize> {
        let pos = (self.0 >> 16 & 0xffff) as usize;
        pos..pos + self.len()
    }

    /// The key's bytes as offsets in the arena's logical run (for checks).
    #[cfg(test)]
    pub fn span(self) -> Range<u64> {
        let start = self.0 >> 16;
        start..start + self.len() as u64
    }
}

/// Invariants: every chunk holds at least one byte; `used` is the sum of the chunks' lengths;
/// `dead` of those bytes belong to no key; the keys' (non-empty) ranges are disjoint and inside
/// their chunks.
#[derive(Default)]
pub struct Arena {
    chunks: Vec<Vec<u8>>,
    used: usize,
    dead: usize,
}

impl Arena {
    /// Appends `key` and says where it is.
    pub fn push(&mut self, key: &[u8]) -> KeyRef {
        assert!(
            key.len() <= MAX_KEY,
            "a {}-byte key: the registry stores keys of at most {MAX_KEY} bytes",
            key.len()
        );
        if key.is_empty() {
            return KeyRef::EMPTY;
        }
        let fits = self
            .chunks
            .last()
            .is_some_and(|c| c.len() + key.len() <= CHUNK);
        if !fits {
            // See MAX_CHUNKS: cannot happen; checked before anything changes.
            assert!(
                (self.chunks.len() as u64) < MAX_CHUNKS,
                "registry arena beyond 2^48 bytes"
            );
            let capacity = if self.chunks.is_empty() {
                FIRST_CHUNK.max(key.len())
            } else {
                CHUNK
            };
            self.chunks.push(Vec::with_capacity(capacity));
        }
        let n = self.chunks.len() - 1;
        let chunk = &mut self.chunks[n];
        if chunk.capacity() - chunk.len() < key.len() {
            // Only a first chunk is ever short of capacity: double it, never past CHUNK.
            let want = (2 * chunk.capacity()).clamp(chunk.len() + key.len(), CHUNK);
            chunk.reserve_exact(want - chunk.len());
        }
        let r = KeyRef::new(n, chunk.len(), key.len());
        chunk.extend_from_slice(key);
        self.used += key.len();
        r
    }

    /// The bytes of a key of this arena. (A `KeyRef` of another arena may panic or return
    /// other bytes; the shard only ever passes its own.)
    pub fn get(&self, r: KeyRef) -> &[u8] {
        if r.len() == 0 {
            return &[];
        }
        &self.chunks[r.chunk()][r.range()]
    }

    /// Forgets a key: its bytes become garbage, or are taken back at once when it is the
    /// newest (a short-lived key, an insert undone).
    pub fn remove(&mut self, r: KeyRef) {
        if r.len() == 0 {
            return;
        }
        let range = r.range();
        let last = self.chunks.len() - 1;
        if r.chunk() == last && range.end == self.chunks[last].len() {
            self.chunks[last].truncate(range.start);
            self.used -= r.len();
            if self.chunks[last].is_empty() {
                self.chunks.pop();
            }
        } else {
            self.dead += r.len();
        }
    }

    /// Bytes stored, live and dead.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Bytes stored that belong to no key.
    pub fn dead(&self) -> usize {
        self.dead
    }

    /// Moves the keys `refs` point at (which must be all the live keys of this arena) into a
    /// fresh arena, in their current order, and rewrites `refs` to match. Keeping the order
    /// keeps keys registered together next to each other (a client stores and fetches a
    /// prefix's chunks together), so a compacted shard reads like one that never had garbage.
    ///
    /// O(live keys × log) for the sort plus the copy. Cannot panic half-way (the ranges are
    /// inside the old arena, and allocation failure aborts), so no key is left pointing into
    /// the old arena while others point into the new.
    pub fn compact<'a>(&mut self, refs: impl Iterator<Item = &'a mut KeyRef>) {
        let mut refs: Vec<&mut KeyRef> = refs.collect();
        refs.sort_unstable_by_key(|r| r.0);
        let mut fresh = Arena::default();
        for r in refs {
            *r = fresh.push(self.get(*r));
        }
        debug_assert_eq!(fresh.used, self.used - self.dead);
        *self = fresh;
    }

    /// Bytes reserved by the chunks (for tests of bounded growth).
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.chunks.iter().map(|c| c.capacity()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(a: &Arena, live: &[KeyRef]) {
        assert!(a.chunks.iter().all(|c| !c.is_empty()));
        assert_eq!(a.used, a.chunks.iter().map(|c| c.len()).sum::<usize>());
        let mut spans: Vec<Range<u64>> = live.iter().map(|r| r.span()).collect();
        spans.retain(|s| !s.is_empty());
        spans.sort_by_key(|s| s.start);
        for w in spans.windows(2) {
            assert!(w[0].end <= w[1].start, "overlapping keys {w:?}");
        }
        for r in live {
            if r.len() > 0 {
                assert!(r.range().end <= a.chunks[r.chunk()].len());
            }
        }
        let live_bytes: usize = live.iter().map(|r| r.len()).sum();
        assert_eq!(a.used, live_bytes + a.dead);
    }

    #[test]
    fn key_ref_is_eight_bytes_and_round_trips() {
        assert_eq!(std::mem::size_of::<KeyRef>(), 8);
        let last = (MAX_CHUNKS - 1) as usize;
        let r = KeyRef::new(last, 1, MAX_KEY);
        assert_eq!((r.chunk(), r.range(), r.len()), (last, 1..CHUNK, MAX_KEY));
        assert_eq!(KeyRef::EMPTY.len(), 0);
    }

    #[test]
    fn keys_fill_chunks_without_spanning_them() {
        let mut a = Arena::default();
        let keys: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![(i % 251) as u8; (i as usize * 37) % 1025])
            .collect();
        let refs: Vec<KeyRef> = keys.iter().map(|k| a.push(k)).collect();
        for (k, r) in keys.iter().zip(&refs) {
            assert_eq!(a.get(*r), &k[..]);
            assert!(r.len() == 0 || r.range().end <= CHUNK);
        }
        let total: usize = keys.iter().map(|k| k.len()).sum();
        assert_eq!(a.used(), total);
        // Full chunks waste less than one key's length each.
        assert!(a.chunks.len() <= total / (CHUNK - 1024) + 1);
        check(&a, &refs);
        let big = vec![9u8; MAX_KEY];
        let r = a.push(&big);
        assert_eq!(a.get(r), &big[..]);
    }

    #[test]
    fn the_newest_key_is_taken_back_and_others_become_garbage() {
        let mut a = Arena::default();
        let x = a.push(b"xxxx");
        let e = a.push(b"");
        let y = a.push(b"yy");
        a.remove(y);
        assert_eq!((a.used(), a.dead()), (4, 0));
        // The empty key lives nowhere: removing the key before it does not strand it.
        assert_eq!(a.get(e), b"");
        let z = a.push(b"zzz");
        a.remove(x);
        assert_eq!((a.used(), a.dead()), (7, 4));
        assert_eq!(a.get(z), b"zzz");
        a.remove(z);
        assert_eq!((a.used(), a.dead()), (4, 4));
        check(&a, &[e]);
    }

    #[test]
    fn taking_back_a_chunk_s_only_key_drops_the_chunk() {
        let mut a = Arena::default();
        let first = a.push(&vec![1u8; CHUNK - 10]);
        let second = a.push(&[2u8; 20]);
        assert_eq!((second.chunk(), a.chunks.len()), (1, 2));
        a.remove(second);
        assert_eq!(a.chunks.len(), 1);
        // Now `first` is the newest again.
        a.remove(first);
        assert_eq!((a.chunks.len(), a.used(), a.dead()), (0, 0, 0));
        let again = a.push(b"again");
        assert_eq!(a.get(again), b"again");
    }

    #[test]
    fn compaction_keeps_live_keys_in_order_and_drops_the_dead() {
        let mut a = Arena::default();
        let keys: Vec<Vec<u8>> = (0..20_000u32)
            .map(|i| format!("key-{i}-{}", "p".repeat(i as usize % 50)).into_bytes())
            .collect();
        let mut refs: Vec<KeyRef> = keys.iter().map(|k| a.push(k)).collect();
        for r in refs.iter().skip(1).step_by(3) {
            a.remove(*r);
        }
        let mut live: Vec<usize> = (0..keys.len()).filter(|i| i % 3 != 1).collect();
        let live_bytes: usize = live.iter().map(|&i| keys[i].len()).sum();
        assert_eq!(a.used() - a.dead(), live_bytes);
        // Hand the refs over in a scrambled order, as a hash table would.
        live.sort_by_key(|&i| (i * 7919) % keys.len());
        let mut slots: Vec<KeyRef> = live.iter().map(|&i| refs[i]).collect();
        a.compact(slots.iter_mut());
        for (&i, r) in live.iter().zip(&slots) {
            refs[i] = *r;
            assert_eq!(a.get(*r), &keys[i][..]);
        }
        assert_eq!((a.used(), a.dead()), (live_bytes, 0));
        check(&a, &slots);
        // Insertion order survives: offsets increase with the key's number.
        live.sort();
        let offsets: Vec<u64> = live.iter().map(|&i| refs[i].span().start).collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]));
    }
}
