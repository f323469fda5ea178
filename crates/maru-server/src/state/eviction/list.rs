//! The storage every policy shares: a doubly linked list of keys over a slab, with a hash
//! index from key bytes to slab slot. Every operation is O(1): find, push at either end or
//! before a node, unlink.
//!
//! Memory per key: the key's own bytes in a byte arena (the registry's, `registry::arena`:
//! no allocation and no pointer per key), a 24-byte node (the key's 8-byte place in the
//! arena, links and flags) and a 4-byte index slot (plus hashbrown's control byte). Nodes of
//! removed keys are reused through a free list, so the slab never grows past the most keys the
//! policy held at once. Why an arena rather than a box per key: a rebuild at start fills the
//! policy with every key at once, and a million small allocations (and the fresh pages under
//! them) were most of its time.
//!
//! Removed keys leave their bytes in the arena as garbage; the arena is compacted (live keys
//! copied into a fresh one, in arena order) once garbage is more than half of it and at least
//! [`COMPACT_MIN`] bytes and one byte per index slot, the rule the registry's shards follow
//! (see `registry::sharded`): the arena stays within about twice its live keys, and each
//! compaction is paid for by as many removed bytes as it copies.

use std::hash::BuildHasher;

use hashbrown::hash_table::{Entry as Slot, HashTable};

use crate::registry::arena::{Arena, KeyRef};

/// "No node": the end of the list, or no hand yet.
pub(super) const NIL: u32 = u32::MAX;

/// Compaction never runs for less garbage than this.
const COMPACT_MIN: usize = 64 * 1024;

struct Node {
    /// `KeyRef::EMPTY` while the node is free.
    key: KeyRef,
    prev: u32,
    next: u32,
    /// The policy's one bit of history (CLOCK's reference bit, SIEVE's visited bit).
    mark: bool,
}

const _: () = assert!(std::mem::size_of::<Node>() == 24);

/// Keys in order, `head` first.
pub(super) struct KeyList {
    nodes: Vec<Node>,
    free: Vec<u32>,
    keys: Arena,
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    pub(super) head: u32,
    pub(super) tail: u32,
    len: usize,
}

impl Default for KeyList {
    fn default() -> Self {
        KeyList {
            nodes: Vec::new(),
            free: Vec::new(),
            keys: Arena::default(),
            index: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }
}

impl KeyList {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn reserve(&mut self, additional: usize) {
        let (nodes, keys, hasher) = (&self.nodes, &self.keys, &self.hasher);
        self.index.reserve(additional, |&i| {
            hasher.hash_one(keys.get(nodes[i as usize].key))
        });
        self.nodes
            .reserve(additional.saturating_sub(self.free.len()));
    }

    pub fn find(&self, key: &[u8]) -> Option<u32> {
        let hash = self.hasher.hash_one(key);
        self.index.find(hash, |&i| self.key(i) == key).copied()
    }

    pub fn key(&self, i: u32) -> &[u8] {
        self.keys.get(self.nodes[i as usize].key)
    }

    pub fn next(&self, i: u32) -> u32 {
        self.nodes[i as usize].next
    }

    pub fn prev(&self, i: u32) -> u32 {
        self.nodes[i as usize].prev
    }

    pub fn mark(&self, i: u32) -> bool {
        self.nodes[i as usize].mark
    }

    pub fn set_mark(&mut self, i: u32, mark: bool) {
        self.nodes[i as usize].mark = mark;
    }

    /// Adds `key` (absent) unlinked, indexed; returns its node.
    fn alloc(&mut self, key: &[u8]) -> Option<u32> {
        let hash = self.hasher.hash_one(key);
        let (nodes, keys, hasher) = (&self.nodes, &self.keys, &self.hasher);
        let slot = self.index.entry(
            hash,
            |&i| keys.get(nodes[i as usize].key) == key,
            |&i| hasher.hash_one(keys.get(nodes[i as usize].key)),
        );
        let Slot::Vacant(vacant) = slot else {
            return None;
        };
        let node = Node {
            // Keys come from the registry, whose keys the arena holds too (see
            // `registry::arena`): the push does not fail.
            key: self.keys.push(key),
            prev: NIL,
            next: NIL,
            mark: false,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                // A policy holds at most as many keys as the registry, far below 2^32.
                (self.nodes.len() - 1) as u32
            }
        };
        vacant.insert(i);
        self.len += 1;
        Some(i)
    }

    /// Inserts `key` before node `at` (`NIL`: at the tail). None when the key is present.
    pub fn insert_before(&mut self, at: u32, key: &[u8]) -> Option<u32> {
        let i = self.alloc(key)?;
        self.link_before(at, i);
        Some(i)
    }

    pub fn push_front(&mut self, key: &[u8]) -> Option<u32> {
        let head = self.head;
        self.insert_before(head, key)
    }

    /// Makes `next` follow `prev`; `NIL` on either side is that end of the list.
    fn join(&mut self, prev: u32, next: u32) {
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    fn link_before(&mut self, at: u32, i: u32) {
        let prev = if at == NIL {
            self.tail
        } else {
            self.nodes[at as usize].prev
        };
        self.join(prev, i);
        self.join(i, at);
    }

    fn unlink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.nodes[i as usize];
        self.join(prev, next);
    }

    /// Moves node `i` to the front.
    pub fn move_to_front(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            let head = self.head;
            self.link_before(head, i);
        }
    }

    /// Removes node `i`; returns its key.
    pub fn remove(&mut self, i: u32) -> Box<[u8]> {
        self.unlink(i);
        let r = std::mem::replace(&mut self.nodes[i as usize].key, KeyRef::EMPTY);
        let key: Box<[u8]> = self.keys.get(r).into();
        let hash = self.hasher.hash_one(&key);
        if let Ok(slot) = self.index.find_entry(hash, |&j| j == i) {
            slot.remove();
        }
        self.free.push(i);
        self.len -= 1;
        if self.len == 0 {
            // Nothing live: give the slab's and the arena's memory back.
            *self = KeyList {
                hasher: self.hasher.clone(),
                ..KeyList::default()
            };
            return key;
        }
        self.keys.remove(r);
        let dead = self.keys.dead();
        if dead > self.keys.used() / 2 && dead >= COMPACT_MIN.max(self.index.capacity()) {
            // Free nodes hold the empty key, which compaction leaves as it is.
            self.keys.compact(self.nodes.iter_mut().map(|n| &mut n.key));
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(l: &KeyList) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = l.head;
        while i != NIL {
            out.push(l.key(i).to_vec());
            i = l.next(i);
        }
        out
    }

    #[test]
    fn links_stay_consistent_through_inserts_moves_and_removals() {
        let mut l = KeyList::default();
        let a = l.push_front(b"a").unwrap();
        let b = l.push_front(b"b").unwrap();
        assert!(l.push_front(b"a").is_none(), "a key is held once");
        let c = l.insert_before(NIL, b"c").unwrap();
        assert_eq!(order(&l), [b"b".to_vec(), b"a".to_vec(), b"c".to_vec()]);
        l.move_to_front(c);
        assert_eq!(order(&l), [b"c".to_vec(), b"b".to_vec(), b"a".to_vec()]);
        assert_eq!(&*l.remove(b), b"b");
        assert_eq!(l.find(b"b"), None);
        assert_eq!(l.find(b"a"), Some(a));
        assert_eq!((l.prev(a), l.next(c)), (c, a));
        // The freed node is reused.
        assert_eq!(l.push_front(b"d"), Some(b));
        l.remove(a);
        l.remove(b);
        l.remove(c);
        assert_eq!((l.len(), l.head, l.tail, l.nodes.len()), (0, NIL, NIL, 0));
    }

    /// A sliding window of keys (insert the newest, remove the oldest) keeps the arena
    /// within about twice its live keys, and compaction keeps every live key findable, in
    /// order, with its mark.
    #[test]
    fn churn_keeps_the_arena_bounded_and_the_keys_findable() {
        let mut l = KeyList::default();
        let key = |i: u64| format!("key {i} {}", "x".repeat((i % 40) as usize)).into_bytes();
        const WINDOW: u64 = 2_000;
        let mut worst = 0;
        for i in 0..200_000u64 {
            let n = l.push_front(&key(i)).unwrap();
            l.set_mark(n, i % 3 == 0);
            if i >= WINDOW {
                let old = l.find(&key(i - WINDOW)).unwrap();
                assert_eq!(&*l.remove(old), &key(i - WINDOW)[..]);
            }
            worst = worst.max(l.keys.used());
        }
        let live: usize = (200_000 - WINDOW..200_000).map(|i| key(i).len()).sum();
        assert!(
            worst <= 2 * live + COMPACT_MIN.max(l.index.capacity()) + 64,
            "arena reached {worst} bytes for {live} live"
        );
        let want: Vec<Vec<u8>> = (200_000 - WINDOW..200_000).rev().map(key).collect();
        assert_eq!(order(&l), want);
        for i in 200_000 - WINDOW..200_000 {
            assert_eq!(l.mark(l.find(&key(i)).unwrap()), i % 3 == 0);
        }
    }
}
