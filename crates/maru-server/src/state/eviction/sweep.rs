//! The scan CLOCK and SIEVE share: keys in a [`KeyList`] with one mark bit each and a hand
//! that sweeps the list, clearing set marks (a second chance) and taking the first key whose
//! mark is clear. A policy says which way the hand moves and where new keys enter
//! ([`Sweep`]); everything else — uses, removals, victim picking — is this one piece.

use std::marker::PhantomData;

use super::list::{KeyList, NIL};
use super::EvictionPolicy;

/// The end of the list a hand starts from; it moves towards the other end, and starts again
/// from this one once past it.
pub enum End {
    /// Head to tail (CLOCK: a ring, the hand wraps from the tail to the head).
    Head,
    /// Tail to head (SIEVE: oldest to newest).
    Tail,
}

/// What makes a hand policy itself.
pub trait Sweep: Sized {
    /// The name `--evict-policy` knows the policy by.
    const NAME: &'static str;
    /// Where the hand starts, and so which way it moves.
    const FROM: End;
    /// Adds a key that was just registered (absent or present: a present key stays put); the
    /// hand is `NIL` when the list is empty.
    fn insert(swept: &mut Swept<Self>, key: &[u8]);
}

/// A hand policy: the keys, and the next key the hand examines.
pub struct Swept<S> {
    pub(super) list: KeyList,
    /// The next key the hand examines; `NIL`: at [`Swept::start`], or the list is empty.
    pub(super) hand: u32,
    policy: PhantomData<S>,
}

impl<S> Default for Swept<S> {
    fn default() -> Self {
        Swept {
            list: KeyList::default(),
            hand: NIL,
            policy: PhantomData,
        }
    }
}

impl<S: Sweep> Swept<S> {
    /// Where the hand starts: the [`Sweep::FROM`] end.
    fn start(&self) -> u32 {
        match S::FROM {
            End::Head => self.list.head,
            End::Tail => self.list.tail,
        }
    }

    /// The node after `i` in the hand's direction, from the start again past the far end.
    fn step(&self, i: u32) -> u32 {
        let next = match S::FROM {
            End::Head => self.list.next(i),
            End::Tail => self.list.prev(i),
        };
        match next {
            NIL => self.start(),
            n => n,
        }
    }

    /// Removes node `i`, moving the hand past it first.
    fn unlink(&mut self, i: u32) -> Box<[u8]> {
        if self.hand == i {
            self.hand = self.step(i);
        }
        let key = self.list.remove(i);
        if self.list.len() == 0 {
            self.hand = NIL;
        }
        key
    }
}

impl<S: Sweep + Send> EvictionPolicy for Swept<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }

    fn insert(&mut self, key: &[u8]) {
        // An empty list has no hand, whatever one rested on before.
        if self.list.len() == 0 {
            self.hand = NIL;
        }
        S::insert(self, key);
    }

    fn reserve(&mut self, additional: usize) {
        self.list.reserve(additional);
    }

    fn touch(&mut self, key: &[u8]) {
        if let Some(i) = self.list.find(key) {
            self.list.set_mark(i, true);
        }
    }

    fn remove(&mut self, key: &[u8]) -> bool {
        let found = self.list.find(key);
        found.map(|i| self.unlink(i)).is_some()
    }

    fn pick_victims(
        &mut self,
        n: usize,
        budget: usize,
        evictable: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Vec<Box<[u8]>> {
        let mut out = Vec::new();
        let mut examined = 0;
        while self.list.len() > 0 && out.len() < n && examined < budget {
            examined += 1;
            let i = match self.hand {
                NIL => self.start(),
                h => h,
            };
            if self.list.mark(i) {
                self.list.set_mark(i, false);
                self.hand = self.step(i);
            } else if evictable(self.list.key(i)) {
                // The hand rests where the victim was: `unlink` moves it one step on.
                self.hand = i;
                out.push(self.unlink(i));
            } else {
                self.hand = self.step(i);
            }
        }
        out
    }

    fn len(&self) -> usize {
        self.list.len()
    }
}
