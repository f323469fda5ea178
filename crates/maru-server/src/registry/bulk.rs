//! Loading many keys at once (the rebuild at start, docs/ARCHITECTURE.md §8 *Restart*): keys
//! are hashed once and gathered per shard as they are read ([`Staged`]), then each shard's
//! table is reserved and filled in one go, under one lock ([`ShardedRegistry::load`]).
//!
//! Why: inserted one by one, a million keys go to the 64 shards at random, so every insert
//! takes a lock and lands on table and arena lines that no recent insert touched (tens of MB
//! of both). Filled a shard at a time, one shard's table and arena (a few hundred KB at 1M
//! keys) stay in cache while it fills, the staged keys are read in order, and every key is
//! hashed once (the hash that picked its shard is the one its table stores it under).

use super::arena::{Arena, KeyRef};
use super::sharded::{write, Shard, ShardedRegistry, SHARDS};
use super::Entry;

use hashbrown::hash_table::Entry as Slot;

/// Keys waiting for [`ShardedRegistry::load`], with their entries and what the caller keeps
/// about each (`T`), split by the shard they go to. Only meaningful to the registry that
/// staged them (the split and the hashes are its own).
pub struct Staged<T> {
    shards: Vec<StagedShard<T>>,
    len: usize,
}

struct StagedShard<T> {
    keys: Arena,
    items: Vec<Item<T>>,
}

struct Item<T> {
    hash: u64,
    key: KeyRef,
    entry: Entry,
    extra: T,
}

impl<T> Staged<T> {
    /// Keys staged.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every staged key, shard by shard (a key staged twice comes twice).
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.shards
            .iter()
            .flat_map(|s| s.items.iter().map(|it| s.keys.get(it.key)))
    }
}

impl ShardedRegistry {
    /// An empty staging area for [`ShardedRegistry::load`], with room for about `expected`
    /// keys (the hash spreads them evenly over the shards; a shard that gets more grows).
    pub fn staging<T>(&self, expected: usize) -> Staged<T> {
        let per_shard = expected / SHARDS;
        Staged {
            shards: (0..SHARDS)
                .map(|_| StagedShard {
                    keys: Arena::default(),
                    items: Vec::with_capacity(per_shard + per_shard / 8 + 16),
                })
                .collect(),
            len: 0,
        }
    }

    /// Adds `key` with `entry` (and the caller's `extra`) to `staged`.
    ///
    /// Keys are at most [`maru_proto::MAX_KEY_LEN`] bytes; a longer one panics, as in
    /// [`super::KeyRegistry::insert_if_absent`].
    pub fn stage<T>(&self, staged: &mut Staged<T>, key: &[u8], entry: Entry, extra: T) {
        let (hash, shard) = self.shard_of(key);
        let s = &mut staged.shards[shard];
        let key = s.keys.push(key);
        s.items.push(Item {
            hash,
            key,
            entry,
            extra,
        });
        staged.len += 1;
    }

    /// Stores every staged key that is not in the registry yet (write-once, as
    /// [`super::KeyRegistry::insert_if_absent`]: of a key staged twice the first is stored),
    /// shard by shard, and calls `f(key, entry, extra, stored)` for each, in shard order.
    pub fn load<T>(&self, staged: &Staged<T>, mut f: impl FnMut(&[u8], &Entry, &T, bool)) {
        for (padded, from) in self.shards.iter().zip(&staged.shards) {
            if from.items.is_empty() {
                continue;
            }
            let mut shard = write(&padded.0);
            let Shard {
                table,
                arena,
                bytes,
                pinned,
            } = &mut *shard;
            table.reserve(from.items.len(), |(r, _)| self.hash(arena.get(*r)));

            for it in &from.items {
                let key = from.keys.get(it.key);
                let eq = |(r, _): &(KeyRef, Entry)| arena.get(*r) == key;
                let rehash = |(r, _): &(KeyRef, Entry)| self.hash(arena.get(*r));
                let stored = match table.entry(it.hash, eq, rehash) {
                    Slot::Occupied(_) => false,
                    Slot::Vacant(v) => {
                        v.insert((arena.push(key), it.entry));
                        *bytes += it.entry.len();
                        *pinned += (it.entry.pins > 0) as u64;
                        true
                    }
                };
                f(key, &it.entry, &it.extra, stored);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{KeyRegistry, RegionSlot, PAGE_ALIGN};
    use super::*;

    fn at(page: u64) -> Entry {
        Entry::new(RegionSlot(1), page * PAGE_ALIGN, 1).unwrap()
    }

    /// A load stores what inserts would: every key findable with its entry, a key staged
    /// twice or already present stored once (and reported so), counts and arenas as after
    /// inserts.
    #[test]
    fn a_load_stores_what_inserts_would() {
        let r = ShardedRegistry::new();
        assert!(r.insert_if_absent(b"there before", at(0)));
        let mut staged = r.staging::<u64>(10_000);
        assert!(staged.is_empty());
        for i in 0..10_000u64 {
            r.stage(&mut staged, format!("key-{i}").as_bytes(), at(i), i);
        }
        r.stage(&mut staged, b"key-7", at(99), 7_000);
        r.stage(&mut staged, b"there before", at(5), 8_000);
        r.stage(&mut staged, b"", at(6), 9_000);
        assert_eq!(staged.len(), 10_003);
        let mut keys: Vec<Vec<u8>> = staged.keys().map(|k| k.to_vec()).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 10_002);
        let mut refused = Vec::new();
        let mut stored = 0;
        r.load(&staged, |key, entry, extra, ok| {
            if ok {
                stored += 1;
            } else {
                refused.push((key.to_vec(), *entry, *extra));
            }
        });
        assert_eq!(stored, 10_001);
        refused.sort_by_key(|r| r.2);
        assert_eq!(
            refused,
            [
                (b"key-7".to_vec(), at(99), 7_000),
                (b"there before".to_vec(), at(5), 8_000)
            ]
        );
        for i in 0..10_000u64 {
            assert_eq!(r.lookup(format!("key-{i}").as_bytes()), Some(at(i)));
        }
        assert_eq!(r.lookup(b"there before"), Some(at(0)));
        assert_eq!(r.lookup(b""), Some(at(6)));
        let c = r.counts();
        assert_eq!((c.keys, c.bytes, c.pinned_keys), (10_002, 10_002, 0));
        // Loaded keys leave like inserted ones.
        assert!(matches!(
            r.remove_if_unpinned(b"key-3", RegionSlot(1)),
            super::super::Removal::Removed(_)
        ));
        assert_eq!(r.lookup(b"key-3"), None);
        assert!(r.insert_if_absent(b"key-3", at(3)));
    }
}
