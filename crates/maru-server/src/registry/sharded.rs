//! The in-process registry: 64 shards, each a reader-writer lock over an open-addressing hash
//! table of `(KeyRef, Entry)` slots and an append-only arena holding the shard's key bytes.
//!
//! Why this shape: lookups and exists (the hot path) take one shard's read lock for the time of
//! one probe, so readers on different keys rarely meet and readers never wait on a writer of
//! another shard. The key is hashed once (a seeded foldhash, fast and not predictable by a
//! client) and that hash picks the shard and probes the table; when the table grows it rehashes
//! each key read back from the arena, with the same function.
//!
//! Memory: a slot is 24 bytes (an 8-byte [`KeyRef`] — where the key sits in the shard's arena
//! and how long it is — and the 16-byte [`Entry`]) plus one control byte, and a key costs its
//! own bytes in the arena: no allocation, malloc header or pointer per key (see `arena.rs`). At
//! 1M keys of 40 bytes (~15 600 per shard, just past a table doubling, so tables are 48 % full)
//! that is ~52 bytes of table per key + 40 of key ≈ 92 bytes per key in all. Measured (process
//! RSS, `maru bench --only registry`): 97–99, or 94–95 with glibc held to one malloc arena
//! (`MALLOC_ARENA_MAX=1`), against 120–124 with a `Box<[u8]>` per slot (32-byte slots and a
//! 48-byte malloc chunk per key). Every part is pointer-free — offsets and plain integers —
//! which is what the shared-memory index of docs/ARCHITECTURE.md §8 needs.
//!
//! The price: boxed keys sit in memory in the order they were registered, all shards together,
//! so lookups in that order walk memory sequentially; in per-shard arenas consecutive keys are
//! 64 ways apart. At 1M keys (criterion `registry` bench) lookups in random order cost about
//! the same as with boxed keys (275 against 255 ns), in registration order 136 against 95 ns.
//!
//! Removing a key leaves its bytes in the arena as garbage, and the shard compacts its arena
//! (live keys copied into a fresh one, in the order they were registered, and the slots'
//! `KeyRef`s rewritten; no rehash, the hashes are of the bytes, not of where they are) once
//! garbage is more than half of the arena and at least the table's capacity in bytes. The first
//! condition bounds the arena, under any insert/delete churn, to about twice its live keys
//! (plus the larger of [`COMPACT_MIN`] and one byte per slot). The second, with the first,
//! makes each compaction (a walk over every slot, a sort of the live keys by offset and a copy
//! of their bytes) paid for by at least as many removed bytes as there are slots and live
//! bytes, so removal stays amortised O(log n). Compaction runs under the shard's write lock:
//! at 1M keys, one shard's ~15 600 keys take ~0.3 ms, once per ~15 600 removals from it.
//!
//! Why keep registration order: keys registered together (one prefix's chunks) are looked up
//! and deleted together, and a shard whose keys sit in that order reads them sequentially.
//! Compacting in table order instead makes a 1M-key insert/delete churn 40 % slower (460–470 ns
//! against 315–360 ns per insert + delete).

use std::hash::BuildHasher;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use hashbrown::hash_table::{Entry as Slot, HashTable};

use super::arena::{Arena, KeyRef};
use super::{Entry, KeyRegistry, RegionSlot, RegistryCounts, Removal};

pub(super) const SHARDS: usize = 64;

/// Compaction never runs for less garbage than this (per shard), whatever the table's size:
/// a small shard under churn compacts every few thousand removed bytes, not every few.
const COMPACT_MIN: usize = 16 * 1024;

const _: () = assert!(std::mem::size_of::<(KeyRef, Entry)>() == 24);

#[derive(Default)]
pub(super) struct Shard {
    pub(super) table: HashTable<(KeyRef, Entry)>,
    /// The bytes of the keys of `table`'s slots (and garbage). Invariant: the arena's live
    /// keys are exactly those of the slots.
    pub(super) arena: Arena,
    pub(super) bytes: u64,
    pub(super) pinned: u64,
}

impl Shard {
    /// Forgets the bytes of a key just removed from the table, and compacts when garbage has
    /// grown past the threshold (see the module comment).
    fn release(&mut self, r: KeyRef) {
        if self.table.is_empty() {
            // Nothing live: drop the arena outright.
            self.arena = Arena::default();
            return;
        }
        self.arena.remove(r);
        let dead = self.arena.dead();
        if dead > self.arena.used() / 2 && dead >= COMPACT_MIN.max(self.table.capacity()) {
            self.arena.compact(self.table.iter_mut().map(|(r, _)| r));
        }
    }
}

/// Each shard on cache lines of its own, so two cores working on neighbouring shards do not
/// fight over a line that holds both locks.
#[repr(align(64))]
#[derive(Default)]
pub(super) struct Padded(pub(super) RwLock<Shard>);

pub struct ShardedRegistry {
    pub(super) shards: Box<[Padded]>,
    hasher: foldhash::fast::RandomState,
}

impl Default for ShardedRegistry {
    fn default() -> Self {
        Self::new()
    }
}

// A panic while holding a shard lock cannot leave a shard half-updated (every update is one
// table operation, plus arena appends or a compaction, followed by counter updates, none of
// which can panic part-way; the one deliberate panic, on an impossible arena size, comes
// before anything changes), so a poisoned lock is safe to keep using; refusing would turn one
// bug into a dead server.
fn read(l: &RwLock<Shard>) -> RwLockReadGuard<'_, Shard> {
    l.read().unwrap_or_else(|e| e.into_inner())
}
pub(super) fn write(l: &RwLock<Shard>) -> RwLockWriteGuard<'_, Shard> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl ShardedRegistry {
    pub fn new() -> Self {
        ShardedRegistry {
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// The one hash of a key: both a lookup and the table's rehash (of a key read back from
    /// the arena) go through here, so they agree.
    pub(super) fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// `key`'s hash and the number of its shard.
    pub(super) fn shard_of(&self, key: &[u8]) -> (u64, usize) {
        let hash = self.hash(key);
        // The table probes with the low bits and tags slots with the top seven, so the shard
        // comes from bits in between: keys of one shard still spread over the whole table.
        (hash, (hash >> 32) as usize % SHARDS)
    }

    fn locate(&self, key: &[u8]) -> (u64, &RwLock<Shard>) {
        let (hash, shard) = self.shard_of(key);
        (hash, &self.shards[shard].0)
    }

    /// `f` of `key`'s entry and its shard's count of pinned keys, under the shard's write
    /// lock; false when the key is absent.
    fn with_pins(&self, key: &[u8], f: impl FnOnce(&mut u64, &mut Entry) -> bool) -> bool {
        let (hash, lock) = self.locate(key);
        let mut shard = write(lock);
        let shard = &mut *shard;
        let arena = &shard.arena;
        match shard.table.find_mut(hash, |(r, _)| arena.get(*r) == key) {
            Some((_, e)) => f(&mut shard.pinned, e),
            None => false,
        }
    }
}

impl KeyRegistry for ShardedRegistry {
    fn insert_if_absent(&self, key: &[u8], entry: Entry) -> bool {
        let (hash, lock) = self.locate(key);
        let mut shard = write(lock);
        let Shard {
            table,
            arena,
            bytes,
            pinned,
        } = &mut *shard;
        let eq = |(r, _): &(KeyRef, Entry)| arena.get(*r) == key;
        let rehash = |(r, _): &(KeyRef, Entry)| self.hash(arena.get(*r));
        match table.entry(hash, eq, rehash) {
            Slot::Occupied(_) => false,
            Slot::Vacant(v) => {
                // `push` panics on a key the registry cannot hold (longer than any the protocol
                // lets in), before the arena changes and the slot is filled.
                v.insert((arena.push(key), entry));
                *bytes += entry.len();
                *pinned += (entry.pins > 0) as u64;
                true
            }
        }
    }

    fn lookup(&self, key: &[u8]) -> Option<Entry> {
        let (hash, lock) = self.locate(key);
        let shard = read(lock);
        shard
            .table
            .find(hash, |(r, _)| shard.arena.get(*r) == key)
            .map(|(_, e)| *e)
    }

    fn remove_if_unpinned(&self, key: &[u8], region: RegionSlot) -> Removal {
        let (hash, lock) = self.locate(key);
        let mut shard = write(lock);
        let shard = &mut *shard;
        let arena = &shard.arena;
        match shard.table.find_entry(hash, |(r, _)| arena.get(*r) == key) {
            Err(_) => Removal::NotFound,
            Ok(occupied) => {
                let (r, entry) = *occupied.get();
                if entry.region != region {
                    Removal::Elsewhere(entry)
                } else if entry.pins > 0 {
                    Removal::Pinned
                } else {
                    occupied.remove();
                    shard.bytes -= entry.len();
                    shard.release(r);
                    Removal::Removed(entry)
                }
            }
        }
    }

    fn pin_n(&self, key: &[u8], n: u32) -> bool {
        self.with_pins(key, |pinned, e| {
            if e.pins == 0 && n > 0 {
                *pinned += 1;
            }
            // Saturating: a key pinned four billion times stays pinned, which is the
            // safe direction.
            e.pins = e.pins.saturating_add(n);
            true
        })
    }

    fn unpin_n(&self, key: &[u8], n: u32) -> bool {
        self.with_pins(key, |pinned, e| {
            if e.pins == 0 {
                return false;
            }
            e.pins = e.pins.saturating_sub(n);
            if e.pins == 0 {
                *pinned -= 1;
            }
            true
        })
    }

    fn counts(&self) -> RegistryCounts {
        let mut c = RegistryCounts::default();
        for s in self.shards.iter() {
            let shard = read(&s.0);
            c.keys += shard.table.len() as u64;
            c.bytes += shard.bytes;
            c.pinned_keys += shard.pinned;
        }
        c
    }

    fn for_each(&self, f: &mut dyn FnMut(&[u8], Entry)) {
        for s in self.shards.iter() {
            let shard = read(&s.0);
            for (r, e) in shard.table.iter() {
                f(shard.arena.get(*r), *e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::arena::MAX_KEY;
    use super::*;

    fn at(region: u32, page: u64, len: u64) -> Entry {
        Entry::new(RegionSlot(region), page * super::super::PAGE_ALIGN, len).unwrap()
    }

    /// Checks every shard's invariants (live arena bytes are the slots' keys, which do not
    /// overlap, and every slot is found again by its key's hash) and returns the total arena
    /// bytes used and reserved.
    fn check_arenas(r: &ShardedRegistry) -> (usize, usize) {
        let (mut used, mut cap) = (0, 0);
        for s in r.shards.iter() {
            let shard = read(&s.0);
            let live: usize = shard.table.iter().map(|(k, _)| k.len()).sum();
            assert_eq!(shard.arena.used(), live + shard.arena.dead());
            let mut spans: Vec<_> = shard.table.iter().map(|(k, _)| k.span()).collect();
            spans.retain(|s| !s.is_empty());
            spans.sort_by_key(|s| s.start);
            for w in spans.windows(2) {
                assert!(w[0].end <= w[1].start, "overlapping keys {w:?}");
            }
            for (k, _) in shard.table.iter() {
                let key = shard.arena.get(*k);
                let found = shard.table.find(r.hash(key), |(other, _)| other == k);
                assert!(found.is_some(), "a slot not found by its key's hash");
            }
            used += shard.arena.used();
            cap += shard.arena.capacity();
        }
        (used, cap)
    }

    /// A key of 1 to 200 bytes, different for every `i`.
    fn varied_key(i: u64) -> Vec<u8> {
        let mut k = format!("k{i:x}:").into_bytes();
        k.resize(
            k.len() + (i.wrapping_mul(0x9e37_79b9) % 190) as usize,
            b'a' + (i % 26) as u8,
        );
        k
    }

    #[test]
    fn write_once_pins_and_counts() {
        let r = ShardedRegistry::new();
        assert!(r.insert_if_absent(b"a", at(1, 0, 10)));
        assert!(!r.insert_if_absent(b"a", at(2, 5, 99)));
        assert_eq!(r.lookup(b"a"), Some(at(1, 0, 10)));
        assert!(r.pin(b"a") && r.pin(b"a"));
        assert!(!r.pin(b"missing"));
        assert_eq!(r.remove_if_unpinned(b"a", RegionSlot(1)), Removal::Pinned);
        assert!(r.unpin(b"a"));
        assert_eq!(
            r.counts(),
            RegistryCounts {
                keys: 1,
                bytes: 10,
                pinned_keys: 1
            }
        );
        assert!(r.unpin(b"a"));
        assert!(!r.unpin(b"a"));
        assert!(matches!(
            r.remove_if_unpinned(b"a", RegionSlot(7)),
            Removal::Elsewhere(_)
        ));
        assert_eq!(
            r.remove_if_unpinned(b"a", RegionSlot(1)),
            Removal::Removed(at(1, 0, 10))
        );
        assert_eq!(r.remove_if_unpinned(b"a", RegionSlot(1)), Removal::NotFound);
        assert_eq!(r.counts(), RegistryCounts::default());
        assert_eq!(check_arenas(&r).0, 0);
    }

    #[test]
    fn many_keys_spread_and_stay_findable() {
        let r = ShardedRegistry::new();
        for i in 0..20_000u32 {
            assert!(r.insert_if_absent(&i.to_le_bytes(), at(i % 7, i as u64, 1)));
        }
        for i in 0..20_000u32 {
            assert_eq!(r.lookup(&i.to_le_bytes()), Some(at(i % 7, i as u64, 1)));
        }
        assert_eq!(
            r.count_in_region(RegionSlot(3)),
            (0..20_000).filter(|i| i % 7 == 3).count() as u64
        );
        let busiest = r
            .shards
            .iter()
            .map(|s| read(&s.0).table.len())
            .max()
            .unwrap();
        assert!(
            busiest < 20_000 / SHARDS * 2,
            "shards unbalanced: {busiest}"
        );
        // Keys only, back to back: no per-key overhead in the arenas.
        assert_eq!(check_arenas(&r).0, 20_000 * 4);
    }

    #[test]
    fn key_lengths_from_empty_to_the_largest() {
        let r = ShardedRegistry::new();
        let long = vec![7u8; MAX_KEY];
        let mut longer = long.clone();
        longer.push(7);
        assert!(r.insert_if_absent(b"", at(1, 1, 1)));
        assert!(r.insert_if_absent(&long, at(1, 2, 2)));
        assert!(!r.insert_if_absent(b"", at(1, 3, 3)));
        assert_eq!(r.lookup(b""), Some(at(1, 1, 1)));
        assert_eq!(r.lookup(&long), Some(at(1, 2, 2)));
        assert_eq!(r.lookup(&long[1..]), None);
        // Longer than any stored key: simply not there.
        assert_eq!(r.lookup(&longer), None);
        assert_eq!(
            r.remove_if_unpinned(&longer, RegionSlot(1)),
            Removal::NotFound
        );
        let mut seen = Vec::new();
        r.for_each(&mut |k, e| seen.push((k.len(), e)));
        seen.sort_by_key(|s| s.0);
        assert_eq!(seen, vec![(0, at(1, 1, 1)), (MAX_KEY, at(1, 2, 2))]);
        check_arenas(&r);
    }

    #[test]
    #[should_panic(expected = "keys of at most 65535 bytes")]
    fn a_key_too_long_for_a_key_ref_is_refused_loudly() {
        ShardedRegistry::new().insert_if_absent(&vec![0u8; MAX_KEY + 1], at(1, 0, 1));
    }

    #[test]
    fn removing_the_newest_key_takes_its_bytes_back_and_an_empty_shard_starts_over() {
        let r = ShardedRegistry::new();
        // Keys of one shard, so the arena arithmetic is visible.
        let (_, first) = r.locate(b"0");
        let same: Vec<Vec<u8>> = (0u32..)
            .map(|i| format!("key-{i}").into_bytes())
            .filter(|k| std::ptr::eq(r.locate(k).1, first))
            .take(3)
            .collect();
        let arena = || (read(first).arena.used(), read(first).arena.dead());
        for k in &same {
            assert!(r.insert_if_absent(k, at(1, 0, 1)));
        }
        let total: usize = same.iter().map(|k| k.len()).sum();
        assert_eq!(arena(), (total, 0));
        // The newest: truncated, not garbage.
        assert!(matches!(
            r.remove_if_unpinned(&same[2], RegionSlot(1)),
            Removal::Removed(_)
        ));
        assert_eq!(arena(), (total - same[2].len(), 0));
        // An older one: garbage.
        assert!(matches!(
            r.remove_if_unpinned(&same[0], RegionSlot(1)),
            Removal::Removed(_)
        ));
        assert_eq!(arena(), (total - same[2].len(), same[0].len()));
        assert_eq!(r.lookup(&same[1]), Some(at(1, 0, 1)));
        // The last one: the shard's arena is empty again.
        assert!(matches!(
            r.remove_if_unpinned(&same[1], RegionSlot(1)),
            Removal::Removed(_)
        ));
        assert_eq!(arena(), (0, 0));
        assert!(r.insert_if_absent(&same[0], at(2, 0, 1)));
        assert_eq!(r.lookup(&same[0]), Some(at(2, 0, 1)));
        // The empty key after the newest key: removing that one must not strand it.
        let (_, empty_shard) = r.locate(b"");
        let before_empty = (0u32..)
            .map(|i| format!("key-{i}").into_bytes())
            .find(|k| std::ptr::eq(r.locate(k).1, empty_shard) && r.lookup(k).is_none())
            .unwrap();
        assert!(r.insert_if_absent(&before_empty, at(3, 0, 1)));
        assert!(r.insert_if_absent(b"", at(3, 1, 1)));
        assert!(matches!(
            r.remove_if_unpinned(&before_empty, RegionSlot(3)),
            Removal::Removed(_)
        ));
        assert_eq!(r.lookup(b""), Some(at(3, 1, 1)));
        r.for_each(&mut |_, _| {});
        check_arenas(&r);
    }

    #[test]
    fn compaction_keeps_the_live_keys_and_forgets_the_removed() {
        let r = ShardedRegistry::new();
        const N: u64 = 60_000;
        let entry = |i: u64| at((i % 5) as u32, i, i + 1);
        let mut inserted = 0usize;
        for i in 0..N {
            let k = varied_key(i);
            inserted += k.len();
            assert!(r.insert_if_absent(&k, entry(i)));
        }
        // Some pinned keys survive removal (and keep their pins through compaction).
        for i in (0..N).filter(|i| i.is_multiple_of(100)) {
            assert!(r.pin(&varied_key(i)));
        }
        // Remove 9 in 10 (the pinned ones refuse), oldest first, so most removals are not the
        // newest key of their shard and become garbage.
        for i in (0..N).filter(|i| i % 10 != 3) {
            let got = r.remove_if_unpinned(&varied_key(i), RegionSlot((i % 5) as u32));
            if i.is_multiple_of(100) {
                assert_eq!(got, Removal::Pinned);
            } else {
                assert_eq!(got, Removal::Removed(entry(i)));
            }
        }
        let live = |i: &u64| i % 10 == 3 || i.is_multiple_of(100);
        let live_bytes: usize = (0..N).filter(live).map(|i| varied_key(i).len()).sum();
        let (arena, _) = check_arenas(&r);
        assert!(
            arena < live_bytes * 2 + SHARDS * COMPACT_MIN && arena < inserted / 3,
            "arenas hold {arena} bytes for {live_bytes} live of {inserted} inserted"
        );
        for i in 0..N {
            let mut want = live(&i).then(|| entry(i));
            if i.is_multiple_of(100) {
                want = want.map(|mut e| {
                    e.pins = 1;
                    e
                });
            }
            assert_eq!(r.lookup(&varied_key(i)), want, "key {i}");
        }
        let mut seen = HashMap::new();
        r.for_each(&mut |k, e| assert!(seen.insert(k.to_vec(), e).is_none()));
        assert_eq!(seen.len(), (0..N).filter(live).count());
        let c = r.counts();
        assert_eq!(c.keys as usize, seen.len());
        assert_eq!(c.bytes, (0..N).filter(live).map(|i| i + 1).sum::<u64>());
        assert_eq!(c.pinned_keys, N / 100);
        // Compacted shards still take new keys and give them back.
        for i in N..N + 1000 {
            assert!(r.insert_if_absent(&varied_key(i), entry(i)));
            assert_eq!(r.lookup(&varied_key(i)), Some(entry(i)));
        }
        check_arenas(&r);
    }

    #[test]
    fn churn_keeps_the_arenas_bounded() {
        // A sliding window of live keys: insert a new key, remove the oldest, forever. Without
        // compaction the arenas would hold every key ever inserted.
        let r = ShardedRegistry::new();
        const WINDOW: u64 = 5_000;
        const ROUNDS: u64 = 400_000;
        let mut inserted = 0usize;
        let mut live_bytes = 0usize;
        let mut worst = (0usize, 0usize);
        for i in 0..ROUNDS {
            let k = varied_key(i);
            inserted += k.len();
            live_bytes += k.len();
            assert!(r.insert_if_absent(&k, at(1, i, 1)));
            if i >= WINDOW {
                let old = varied_key(i - WINDOW);
                live_bytes -= old.len();
                assert_eq!(
                    r.remove_if_unpinned(&old, RegionSlot(1)),
                    Removal::Removed(at(1, i - WINDOW, 1))
                );
            }
            if i % 10_000 == 9_999 {
                let (len, cap) = check_arenas(&r);
                worst = (worst.0.max(len), worst.1.max(cap));
                // Each shard: garbage at most max(live, COMPACT_MIN, table capacity) before
                // compaction, plus one key.
                let bound = 2 * live_bytes + SHARDS * (COMPACT_MIN + 200);
                assert!(len <= bound, "arenas {len} bytes > {bound} at round {i}");
            }
        }
        assert!(
            worst.0 * 20 < inserted && worst.1 * 10 < inserted,
            "arenas reached {worst:?} (length, capacity) after {inserted} bytes inserted"
        );
        assert_eq!(r.counts().keys, WINDOW);
        for i in ROUNDS - WINDOW..ROUNDS {
            assert_eq!(r.lookup(&varied_key(i)), Some(at(1, i, 1)));
        }
        assert_eq!(r.lookup(&varied_key(ROUNDS - WINDOW - 1)), None);
    }

    #[test]
    fn random_operations_keep_the_arena_invariant() {
        // A small model check with arena invariants (the proptest in tests/registry_model.rs
        // cannot see inside a shard). Few keys, so inserts, removals and compactions of one
        // shard interleave.
        let r = ShardedRegistry::new();
        let mut model: HashMap<Vec<u8>, Entry> = HashMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for step in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // The empty key too: it has no bytes in the arena, which must not matter.
            let k = match x % 3_000 {
                0..30 => Vec::new(),
                n => varied_key(n),
            };
            let e = at(1, step, 1);
            if x >> 60 < 9 {
                let new = !model.contains_key(&k);
                assert_eq!(r.insert_if_absent(&k, e), new);
                model.entry(k.clone()).or_insert(e);
            } else {
                let want = match model.remove(&k) {
                    Some(e) => Removal::Removed(e),
                    None => Removal::NotFound,
                };
                assert_eq!(r.remove_if_unpinned(&k, RegionSlot(1)), want);
            }
            assert_eq!(r.lookup(&k), model.get(&k).copied());
            if step % 20_000 == 0 {
                check_arenas(&r);
            }
        }
        check_arenas(&r);
        let mut n = 0;
        r.for_each(&mut |k, e| {
            n += 1;
            assert_eq!(model.get(k), Some(&e));
        });
        assert_eq!(n, model.len());
    }
}
