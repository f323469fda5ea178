//! The in-process registry: 64 shards, each a reader-writer lock over an open-addressing hash
//! table of `(key, Entry)` pairs.
//!
//! Why this shape: lookups and exists (the hot path) take one shard's read lock for the time of
//! one probe, so readers on different keys rarely meet and readers never wait on a writer of
//! another shard. The key is hashed once (a seeded foldhash, fast and not predictable by a
//! client) and that hash picks the shard and probes the table. A slot costs 32 bytes (a boxed
//! key pointer + length, and the 16-byte [`Entry`]) plus one control byte, and the key bytes
//! live in their own allocation of exactly the key's length.

use std::hash::BuildHasher;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use hashbrown::hash_table::{Entry as Slot, HashTable};

use super::{Entry, KeyRegistry, RegionSlot, RegistryCounts, Removal};

const SHARDS: usize = 64;

#[derive(Default)]
struct Shard {
    table: HashTable<(Box<[u8]>, Entry)>,
    bytes: u64,
    pinned: u64,
}

/// One shard per cache line, so two cores working on neighbouring shards do not fight over
/// the line that holds both locks.
#[repr(align(64))]
#[derive(Default)]
struct Padded(RwLock<Shard>);

pub struct ShardedRegistry {
    shards: Box<[Padded]>,
    hasher: foldhash::fast::RandomState,
}

impl Default for ShardedRegistry {
    fn default() -> Self {
        Self::new()
    }
}

// A panic while holding a shard lock cannot leave a shard half-updated (every update is one
// table operation followed by counter updates that cannot panic), so a poisoned lock is safe
// to keep using; refusing would turn one bug into a dead server.
fn read(l: &RwLock<Shard>) -> RwLockReadGuard<'_, Shard> {
    l.read().unwrap_or_else(|e| e.into_inner())
}
fn write(l: &RwLock<Shard>) -> RwLockWriteGuard<'_, Shard> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl ShardedRegistry {
    pub fn new() -> Self {
        ShardedRegistry {
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn locate(&self, key: &[u8]) -> (u64, &RwLock<Shard>) {
        let hash = self.hasher.hash_one(key);
        // The table probes with the low bits and tags slots with the top seven, so the shard
        // comes from bits in between: keys of one shard still spread over the whole table.
        let shard = (hash >> 32) as usize % SHARDS;
        (hash, &self.shards[shard].0)
    }

    fn rehash(&self) -> impl Fn(&(Box<[u8]>, Entry)) -> u64 + '_ {
        move |(k, _)| self.hasher.hash_one(&**k)
    }
}

impl KeyRegistry for ShardedRegistry {
    fn insert_if_absent(&self, key: &[u8], entry: Entry) -> bool {
        let (hash, lock) = self.locate(key);
        let mut shard = write(lock);
        let shard = &mut *shard;
        match shard.table.entry(hash, |(k, _)| **k == *key, self.rehash()) {
            Slot::Occupied(_) => false,
            Slot::Vacant(v) => {
                v.insert((key.into(), entry));
                shard.bytes += entry.len();
                shard.pinned += (entry.pins > 0) as u64;
                true
            }
        }
    }

    fn lookup(&self, key: &[u8]) -> Option<Entry> {
        let (hash, lock) = self.locate(key);
        let shard = read(lock);
        shard
            .table
            .find(hash, |(k, _)| **k == *key)
            .map(|(_, e)| *e)
    }

    fn remove_if_unpinned(&self, key: &[u8], region: RegionSlot) -> Removal {
        let (hash, lock) = self.locate(key);
        let mut shard = write(lock);
        let shard = &mut *shard;
        match shard.table.find_entry(hash, |(k, _)| **k == *key) {
            Err(_) => Removal::NotFound,
            Ok(occupied) => {
                let entry = occupied.get().1;
                if entry.region != region {
                    Removal::Elsewhere(entry)
                } else if entry.pins > 0 {
                    Removal::Pinned
                } else {
                    occupied.remove();
                    shard.bytes -= entry.len();
                    Removal::Removed(entry)
                }
            }
        }
    }

    fn pin(&self, key: &[u8]) -> bool {
        let (hash, lock) = self.locate(key);
        let mut shard = write(lock);
        let shard = &mut *shard;
        match shard.table.find_mut(hash, |(k, _)| **k == *key) {
            None => false,
            Some((_, e)) => {
                if e.pins == 0 {
                    shard.pinned += 1;
                }
                // Saturating: a key pinned four billion times stays pinned, which is the
                // safe direction.
                e.pins = e.pins.saturating_add(1);
                true
            }
        }
    }

    fn unpin(&self, key: &[u8]) -> bool {
        let (hash, lock) = self.locate(key);
        let mut shard = write(lock);
        let shard = &mut *shard;
        match shard.table.find_mut(hash, |(k, _)| **k == *key) {
            Some((_, e)) if e.pins > 0 => {
                e.pins -= 1;
                if e.pins == 0 {
                    shard.pinned -= 1;
                }
                true
            }
            _ => false,
        }
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
            for (k, e) in shard.table.iter() {
                f(k, *e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(region: u32, page: u64, len: u64) -> Entry {
        Entry::new(RegionSlot(region), page * super::super::PAGE_ALIGN, len).unwrap()
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
    }
}
