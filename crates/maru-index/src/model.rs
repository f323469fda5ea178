//! The table over loom's atomics in memory, for tests/loom.rs: the same protocol code as the
//! mapped file, with a trivial allocator (each long key gets fresh key words).

use crate::coherence::Coherent;
use crate::layout::*;
use crate::sync::{AtomicU32, AtomicU64};
use crate::table::{Found, Location, Table};

/// A one-bucket table with room for `key_words` words of long keys.
pub struct MemTable {
    buckets: Vec<AtomicU32>,
    entries: Vec<AtomicU64>,
    keys: Vec<AtomicU64>,
    next_key_word: std::sync::atomic::AtomicU64,
    nbuckets: u64,
}

impl MemTable {
    pub fn new(nbuckets: u64, key_words: usize) -> MemTable {
        MemTable {
            buckets: (0..nbuckets as usize * BUCKET_WORDS)
                .map(|_| AtomicU32::new(0))
                .collect(),
            entries: (0..nbuckets as usize * BUCKET_SLOTS * ENTRY_WORDS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            keys: (0..key_words).map(|_| AtomicU64::new(0)).collect(),
            next_key_word: std::sync::atomic::AtomicU64::new(0),
            nbuckets,
        }
    }

    fn table(&self) -> Table<'_> {
        Table {
            buckets: &self.buckets,
            entries: &self.entries,
            keys: &self.keys,
            nbuckets: self.nbuckets,
            seed: [1, 2],
        }
    }

    /// The writer's insert of an absent key (the caller is the only writer).
    pub fn insert(&self, ns: u32, key: &[u8], loc: Location, generation: u64) -> u64 {
        let t = self.table();
        let hash = t.hash(ns, key);
        let slot = t.free_slot(hash).expect("room");
        let key_at = self.next_key_word.fetch_add(
            key.len().div_ceil(8) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        t.insert_at(&Coherent, slot, hash, ns, key, loc, generation, key_at);
        slot
    }

    pub fn remove(&self, ns: u32, key: &[u8]) -> Option<Found> {
        let t = self.table();
        let hash = t.hash(ns, key);
        let f = t.lookup_hashed(&Coherent, hash, ns, key)?;
        t.remove_at(&Coherent, f.slot, hash);
        Some(f)
    }

    pub fn update(&self, ns: u32, key: &[u8], loc: Location, generation: u64) -> Option<Found> {
        let t = self.table();
        let f = t.lookup(&Coherent, ns, key)?;
        t.update_at(&Coherent, f.slot, loc, generation);
        Some(f)
    }

    pub fn lookup(&self, ns: u32, key: &[u8]) -> Option<Found> {
        self.table().lookup(&Coherent, ns, key)
    }

    /// Inserts `key` at a chosen slot with its bytes at word `key_at` of the key area: lets a
    /// model make a key overflow into the next bucket, or reuse a removed key's slot and words.
    #[allow(clippy::too_many_arguments)]
    pub fn insert_at_slot(
        &self,
        slot: u64,
        ns: u32,
        key: &[u8],
        loc: Location,
        generation: u64,
        key_at: u64,
    ) {
        let t = self.table();
        let hash = t.hash(ns, key);
        t.insert_at(&Coherent, slot, hash, ns, key, loc, generation, key_at);
    }

    /// The home bucket of `(ns, key)` in a table of `nbuckets`, the same for every MemTable
    /// because every MemTable hashes with the same constant key.
    pub fn home_bucket(nbuckets: u64, ns: u32, key: &[u8]) -> u64 {
        crate::table::home_of(crate::hash::key_hash([1, 2], ns, key), nbuckets)
    }
}
