//! The table and the hold lanes over loom's atomics in memory, for tests/loom.rs: the same
//! protocol code as the mapped files, with a trivial allocator (each long key gets fresh key
//! words).

use crate::coherence::Coherent;
use crate::lanes::{LaneGeometry, Lanes};
use crate::layout::*;
use crate::sync::{fence, AtomicU32, AtomicU64, Ordering::Acquire};
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

    /// A reader's recheck of `found`'s generation, as `IndexReader::is_current` makes it.
    pub fn is_current(&self, found: &Found) -> bool {
        fence(Acquire);
        self.table().generation_at(&Coherent, found.slot) == found.generation
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

/// Hold lanes in memory: `lanes` lanes of `slots` slots, the server's and the clients' calls
/// as `LaneFile` and `LaneWriter` make them.
pub struct MemLanes {
    words: Vec<AtomicU64>,
    geometry: LaneGeometry,
}

impl MemLanes {
    pub fn new(lanes: u32, slots: u32) -> MemLanes {
        let geometry = LaneGeometry::new(lanes, slots).expect("a small geometry");
        MemLanes {
            words: (0..geometry.words()).map(|_| AtomicU64::new(0)).collect(),
            geometry,
        }
    }

    fn lanes(&self) -> Lanes<'_> {
        Lanes {
            words: &self.words,
            geometry: self.geometry,
        }
    }

    pub fn assign(&self, lane: u32) -> u8 {
        self.lanes().assign(lane)
    }

    pub fn reset(&self, lane: u32) {
        self.lanes().reset(lane)
    }

    pub fn is_held(&self, region: u32, page: u32) -> bool {
        self.lanes().is_held(region, page)
    }

    pub fn claim(&self, lane: u32, tag: u8, slot: u32, region: u32, page: u32) -> bool {
        self.lanes().claim(lane, tag, slot, region, page)
    }

    pub fn fence(&self) {
        self.lanes().fence()
    }

    pub fn release(&self, lane: u32, tag: u8, slot: u32, region: u32, page: u32) {
        self.lanes().release(lane, tag, slot, region, page)
    }

    /// The (tag, region, page) slot `slot` of `lane` holds, or None when it is empty.
    pub fn slot(&self, lane: u32, slot: u32) -> Option<(u8, u32, u32)> {
        let v = self.lanes().slot_value(lane, slot);
        let (region, page) = crate::lanes::unpack_slot(v);
        (v != 0).then_some(((v >> 56) as u8, region, page))
    }
}
