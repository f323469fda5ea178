//! SIEVE (Zhang et al., NSDI 2024): a FIFO queue, newest at the head, with a visited bit per
//! key and a hand that moves from the tail (oldest) towards the head. A use sets the bit; the
//! hand clears set bits and takes the first key whose bit is clear, then rests there. Keys it
//! keeps are never moved, so survivors gather behind the hand while new keys enter at the
//! head: a key used once is reached soon after it ages, a popular key keeps its place.

use super::sweep::{End, Sweep, Swept};

/// SIEVE over the shared sweep. A hand that passes the head starts again from the tail.
pub type Sieve = Swept<SieveHand>;

pub struct SieveHand;

impl Sweep for SieveHand {
    const NAME: &'static str = "sieve";
    const FROM: End = End::Tail;

    fn insert(sieve: &mut Sieve, key: &[u8]) {
        sieve.list.push_front(key);
    }
}
