//! SIEVE (Zhang et al., NSDI 2024): a FIFO queue, newest at the head, with a visited bit per
//! key and a hand that moves from the tail (oldest) towards the head. A use sets the bit; the
//! hand clears set bits and takes the first key whose bit is clear, then rests there. Keys it
//! keeps are never moved, so survivors gather behind the hand while new keys enter at the
//! head: a key used once is reached soon after it ages, a popular key keeps its place.

use super::list::NIL;
use super::sweep::{Sweep, Swept};

/// SIEVE over the shared sweep. A hand that passes the head (`NIL`) starts again from the
/// tail.
pub type Sieve = Swept<SieveHand>;

pub struct SieveHand;

impl Sweep for SieveHand {
    const NAME: &'static str = "sieve";

    fn start(sieve: &Sieve) -> u32 {
        sieve.list.tail
    }

    fn step(sieve: &Sieve, i: u32) -> u32 {
        sieve.list.prev(i)
    }

    fn insert(sieve: &mut Sieve, key: &[u8]) {
        if sieve.list.len() == 0 {
            sieve.hand = NIL;
        }
        sieve.list.push_front(key);
    }
}
