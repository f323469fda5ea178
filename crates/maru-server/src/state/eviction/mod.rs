//! Which keys to evict: a recency policy behind one trait, one file per policy.
//!
//! A policy only orders keys. The server tells it about every key that is registered
//! ([`EvictionPolicy::insert`], in batch order), used ([`EvictionPolicy::touch`]: `retrieve`,
//! `batch_retrieve`, `pin` — never `exists`, so a storm of existence checks cannot keep
//! anything alive) and removed ([`EvictionPolicy::remove`]); when room is needed it asks for
//! victims, with a predicate from the server saying which keys may go *now* (no pins, no
//! holds). A key the predicate refuses stays where it is.
//!
//! Keys registered together (one batch: the chunks of one prefix) enter in reverse order, so
//! among keys of equal recency the later chunks of a prefix go first: a prefix lookup counts
//! leading chunks, and losing an early chunk would strand every later one.
//!
//! Policies:
//!
//! * [`Lru`] (`lru`): exact least-recently-used, a list with move-to-front on every use. The
//!   reference the others are measured against.
//! * [`Clock`] (`clock`): approximate LRU, a reference bit per key and a hand sweeping a ring.
//!   A use sets one bit instead of moving a node.
//! * [`Sieve`] (`sieve`, the default): a FIFO queue with a visited bit and a hand that moves
//!   from the oldest key towards the newest and never moves keys it keeps. Uses cost one bit,
//!   like CLOCK; unlike CLOCK, new keys enter at the head, far from the hand's next stop, while
//!   kept keys stay behind it, so one-off keys (a prefix read once) are demoted quickly and
//!   popular keys survive without being moved. On skewed (Zipf) popularity it keeps more hits
//!   than exact LRU; `maru bench --only eviction` measures all three on the same trace.
//!
//! Every operation is O(1) but victim picking, which is bounded by a scan budget the caller
//! gives (keys examined), so a pool where everything is pinned costs a bounded scan, not a
//! walk over every key.

mod capacity;
mod clock;
mod config;
mod list;
mod lru;
mod room;
mod sieve;
mod sweep;
mod usage;

#[cfg(test)]
mod give_back_tests;
#[cfg(test)]
mod state_tests;
#[cfg(test)]
mod tests;

pub(crate) use capacity::Capacity;
pub use clock::Clock;
pub use config::{parse_quota, ConfigError, EvictionConfig, EVICT_HIGH, EVICT_LOW};
pub use lru::Lru;
pub use sieve::Sieve;
pub(crate) use usage::{namespace_of, usage_counts, usage_hit, RegionUsage};

/// The names `--evict-policy` accepts.
pub const POLICY_NAMES: &[&str] = &["sieve", "clock", "lru"];

/// The default policy.
pub const DEFAULT_POLICY: &str = "sieve";

/// A recency policy over byte keys.
pub trait EvictionPolicy: Send {
    /// The name `--evict-policy` knows it by.
    fn name(&self) -> &'static str;

    /// Adds a key that was just registered, as the most recent one. A key already present
    /// keeps its place (registration is write-once: a second one changes nothing).
    fn insert(&mut self, key: &[u8]);

    /// Makes room for `additional` more keys at once (a bulk load: the rebuild at start).
    fn reserve(&mut self, _additional: usize) {}

    /// Adds keys registered together: in reverse order, so the first key of the batch is the
    /// most recent and the last one goes first among equals.
    fn insert_batch(&mut self, keys: &[&[u8]]) {
        for k in keys.iter().rev() {
            self.insert(k);
        }
    }

    /// A use of `key` (a read that returned it, or a pin). Unknown keys are ignored.
    fn touch(&mut self, key: &[u8]);

    /// Forgets `key` (deleted). False when it was not held.
    fn remove(&mut self, key: &[u8]) -> bool;

    /// Removes and returns up to `n` victims, best first, among keys `evictable` accepts,
    /// examining at most `budget` keys. Keys refused stay (their recency unchanged, as far as
    /// the policy can keep it).
    fn pick_victims(
        &mut self,
        n: usize,
        budget: usize,
        evictable: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Vec<Box<[u8]>>;

    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a policy name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown eviction policy {0:?} (known: {known})", known = POLICY_NAMES.join(", "))]
pub struct UnknownPolicy(pub String);

/// The policy called `name`.
pub fn policy(name: &str) -> Result<Box<dyn EvictionPolicy>, UnknownPolicy> {
    match name {
        "sieve" => Ok(Box::new(Sieve::default())),
        "clock" => Ok(Box::new(Clock::default())),
        "lru" => Ok(Box::new(Lru::default())),
        other => Err(UnknownPolicy(other.to_owned())),
    }
}
