//! Exact LRU: the list is in recency order (head = most recent); every use moves its key to
//! the head, and victims are taken from the tail. A key the predicate refuses is in use
//! (pinned or viewed), so it moves to the head too: otherwise a few pinned keys at the tail
//! would use up every scan's budget.

use super::list::{KeyList, NIL};
use super::EvictionPolicy;

#[derive(Default)]
pub struct Lru {
    list: KeyList,
}

impl EvictionPolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn insert(&mut self, key: &[u8]) {
        self.list.push_front(key);
    }

    fn reserve(&mut self, additional: usize) {
        self.list.reserve(additional);
    }

    fn touch(&mut self, key: &[u8]) {
        if let Some(i) = self.list.find(key) {
            self.list.move_to_front(i);
        }
    }

    fn remove(&mut self, key: &[u8]) -> bool {
        let found = self.list.find(key);
        found.map(|i| self.list.remove(i)).is_some()
    }

    fn pick_victims(
        &mut self,
        n: usize,
        budget: usize,
        evictable: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Vec<Box<[u8]>> {
        let mut out = Vec::new();
        let mut i = self.list.tail;
        let mut examined = 0;
        // The first key moved to the head: reaching it again means every key was examined.
        let mut first_moved = NIL;
        while i != NIL && i != first_moved && out.len() < n && examined < budget {
            examined += 1;
            let prev = self.list.prev(i);
            if evictable(self.list.key(i)) {
                out.push(self.list.remove(i));
            } else {
                if first_moved == NIL {
                    first_moved = i;
                }
                self.list.move_to_front(i);
            }
            i = prev;
        }
        out
    }

    fn len(&self) -> usize {
        self.list.len()
    }
}
