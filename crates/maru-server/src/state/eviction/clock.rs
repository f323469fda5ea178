//! CLOCK: the keys form a ring with a hand. A use sets the key's reference bit; the hand
//! sweeps forward, clearing set bits (a second chance) and taking the first key whose bit is
//! clear. New keys enter just behind the hand, so they are the last the hand reaches.

use super::list::NIL;
use super::sweep::{End, Sweep, Swept};

/// CLOCK over the shared sweep. Its hand wraps from the tail to the head, so it is `NIL`
/// exactly when the ring is empty.
pub type Clock = Swept<ClockHand>;

pub struct ClockHand;

impl Sweep for ClockHand {
    const NAME: &'static str = "clock";

    fn insert(clock: &mut Clock, key: &[u8]) {
        if let Some(i) = clock.list.insert_before(clock.hand, key) {
            if clock.hand == NIL {
                clock.hand = i;
            }
        }
    }

    const FROM: End = End::Head;
}
