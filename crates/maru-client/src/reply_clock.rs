//! How long a call waits for its reply in the caller's context (the *grace*, see
//! [`crate::wait`]): the time within which this session's replies have nearly all come,
//! measured per size class of the request frame (a 256-key batch takes longer than a single
//! lookup).
//!
//! Reply times are not bell-shaped. Most replies come while the server's thread still polls
//! (a few microseconds); some find it asleep and wait for the host to wake it (tens of
//! microseconds on a VM); a few wait for a busy CPU. A mean plus a few deviations sits between
//! the modes and misses the slow one: on a host whose quiet 4 KiB stores had a p99 of
//! 52–90 µs, 1 % or more of replies came after such a window, and with another Python thread
//! busy each of those cost the caller the interpreter's 5 ms switch interval, p99 included.
//! So each class keeps a histogram of its reply times (four buckets per doubling) and the
//! grace is the top of the bucket that holds the 99.9th percentile. A class's counts are
//! halved whenever they add up to [`ReplyClock::WINDOW`], so the window follows a machine
//! whose speed changes.
//!
//! A reply later than [`MAX_REPLY_GRACE`] is one no grace waits for: it leaves the histogram
//! as it is, so a stalled server does not keep the window at its cap afterwards, and a server
//! whose replies all come that late leaves callers with the least grace (they give the GIL
//! away after it instead of holding it for nothing). Updates race benignly: a lost count or a
//! halving that overlaps an increment moves a quantile by a sample.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::wait::MAX_REPLY_GRACE;

/// Reply-time histograms of one session, one per size class of the request frame.
pub(crate) struct ReplyClock {
    classes: [Class; ReplyClock::CLASSES],
}

/// Below this many nanoseconds a reply falls in bucket 0; above, four buckets per doubling.
const FIRST_NS: u64 = 1 << 10;
/// Buckets up to the one holding [`MAX_REPLY_GRACE`].
const BUCKETS: usize = bucket(MAX_REPLY_GRACE.as_nanos() as u64) + 1;

/// One size class.
struct Class {
    counts: [AtomicU32; BUCKETS],
    /// Samples counted in `counts`.
    total: AtomicU32,
    /// The grace the counts give, in nanoseconds; zero until the first sample.
    grace_ns: AtomicU64,
}

/// The bucket of a reply that took `ns`.
const fn bucket(ns: u64) -> usize {
    if ns < FIRST_NS {
        return 0;
    }
    // ns lies in [2^(10+o), 2^(11+o)); its two bits below the leading one pick the quarter.
    let octave = 63 - ns.leading_zeros() - FIRST_NS.trailing_zeros();
    let quarter = (ns >> (octave + FIRST_NS.trailing_zeros() - 2)) & 3;
    1 + (octave as usize) * 4 + quarter as usize
}

/// The least time above every reply of bucket `b`.
const fn bucket_top_ns(b: usize) -> u64 {
    if b == 0 {
        return FIRST_NS;
    }
    let (octave, quarter) = ((b - 1) / 4, (b - 1) % 4);
    ((4 + quarter as u64 + 1) << octave) << (FIRST_NS.trailing_zeros() - 2)
}

impl Class {
    /// The top of the bucket holding the [`ReplyClock::QUANTILE`] of the samples counted.
    fn quantile_ns(&self) -> u64 {
        let counts: [u32; BUCKETS] =
            std::array::from_fn(|b| self.counts[b].load(Ordering::Relaxed));
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        let (per, of) = ReplyClock::QUANTILE;
        let need = (total * per).div_ceil(of).max(1);
        let mut seen = 0;
        for (b, &c) in counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= need {
                return bucket_top_ns(b);
            }
        }
        bucket_top_ns(BUCKETS - 1)
    }

    /// Halves every count: the samples so far weigh half against those to come.
    fn age(&self) {
        let mut left = 0;
        for c in &self.counts {
            let half = c.load(Ordering::Relaxed) / 2;
            c.store(half, Ordering::Relaxed);
            left += half;
        }
        self.total.store(left, Ordering::Relaxed);
    }
}

impl ReplyClock {
    /// Frames below 128 bytes, then one class per doubling up to 128 KiB and more.
    const CLASSES: usize = 12;
    /// The share of replies the grace covers: 999 in 1000. A reply after the grace costs a
    /// Python caller up to a 5 ms switch interval when another thread is busy, several
    /// hundred times an ordinary reply; a grace that outlasts a slow reply costs the other
    /// threads only that reply's time.
    const QUANTILE: (u64, u64) = (999, 1000);
    /// The sum of a class's counts at which they are halved.
    const WINDOW: u32 = 2048;
    /// Samples between two computations of a class's grace, after the first
    /// [`ReplyClock::EVERY_SAMPLE`] (each of which computes it).
    const RECOMPUTE_EVERY: u32 = 8;
    /// Samples at the start of a class that each compute its grace: its first calls get a
    /// window from what little is known at once.
    const EVERY_SAMPLE: u32 = 64;

    pub const fn new() -> ReplyClock {
        ReplyClock {
            classes: [const {
                Class {
                    counts: [const { AtomicU32::new(0) }; BUCKETS],
                    total: AtomicU32::new(0),
                    grace_ns: AtomicU64::new(0),
                }
            }; ReplyClock::CLASSES],
        }
    }

    fn class(&self, frame_len: usize) -> &Class {
        let doublings = (usize::BITS - (frame_len >> 7).leading_zeros()) as usize;
        &self.classes[doublings.min(Self::CLASSES - 1)]
    }

    /// The grace for a request of `frame_len` bytes: the time within which 999 in 1000 of
    /// the class's replies came, at least `floor`, at most [`MAX_REPLY_GRACE`] (or `floor`
    /// if larger).
    pub fn grace(&self, frame_len: usize, floor: Duration) -> Duration {
        match self.class(frame_len).grace_ns.load(Ordering::Relaxed) {
            0 => floor,
            ns => Duration::from_nanos(ns).clamp(floor, MAX_REPLY_GRACE.max(floor)),
        }
    }

    /// Books that a request of `frame_len` bytes had its reply after `took`.
    pub fn record(&self, frame_len: usize, took: Duration) {
        let ns = took.as_nanos();
        if ns > MAX_REPLY_GRACE.as_nanos() {
            return;
        }
        let c = self.class(frame_len);
        c.counts[bucket(ns as u64)].fetch_add(1, Ordering::Relaxed);
        let n = c.total.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= Self::WINDOW {
            c.age();
        }
        if n <= Self::EVERY_SAMPLE || n.is_multiple_of(Self::RECOMPUTE_EVERY) {
            c.grace_ns.store(c.quantile_ns(), Ordering::Relaxed);
        }
    }
}

impl Default for ReplyClock {
    fn default() -> ReplyClock {
        ReplyClock::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: Duration = Duration::from_micros(50);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn buckets_are_quarters_of_doublings_and_tops_bound_them() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1023), 0);
        assert_eq!(bucket(1024), 1);
        assert_eq!(bucket(1279), 1);
        assert_eq!(bucket(1280), 2);
        assert_eq!(bucket(2047), 4);
        assert_eq!(bucket(2048), 5);
        for ns in (0..2_000_000u64).step_by(997) {
            let b = bucket(ns);
            assert!(ns < bucket_top_ns(b), "{ns} in bucket {b}");
            assert!(b == 0 || ns >= bucket_top_ns(b - 1), "{ns} in bucket {b}");
            // A top overshoots its samples by at most a quarter of their doubling.
            assert!(b == 0 || bucket_top_ns(b) * 4 <= ns * 5 + 4, "{ns}");
        }
        assert_eq!(BUCKETS - 1, bucket(MAX_REPLY_GRACE.as_nanos() as u64));
    }

    #[test]
    fn the_grace_covers_a_slow_mode_that_a_mean_and_deviations_would_miss() {
        let clock = ReplyClock::new();
        assert_eq!(clock.grace(64, FLOOR), FLOOR, "no sample: the floor");
        // 98.5 % of replies in 8 µs, 1.5 % in 150 µs (a server thread woken from sleep): the
        // mean is ~10 µs and the mean deviation ~4 µs, so the mean plus four deviations is
        // below the floor, which 1.5 % of the replies outlast.
        for i in 0..4000 {
            clock.record(64, us(if i % 200 < 3 { 150 } else { 8 }));
        }
        let g = clock.grace(64, FLOOR);
        assert!(g >= us(150) && g <= us(190), "{g:?}");
        // Other size classes have their own histogram.
        assert_eq!(clock.grace(16 * 1024, FLOOR), FLOOR);
    }

    #[test]
    fn the_grace_follows_a_machine_that_becomes_faster_or_slower() {
        let clock = ReplyClock::new();
        for _ in 0..1000 {
            clock.record(64, us(200));
        }
        let g = clock.grace(64, FLOOR);
        assert!(g >= us(200) && g <= us(250), "{g:?}");
        // Fast replies from now on: the slow ones age out within a few windows.
        for _ in 0..(ReplyClock::WINDOW * 6) {
            clock.record(64, us(5));
        }
        assert_eq!(clock.grace(64, FLOOR), FLOOR);
        // And slower ones widen it again, up to the cap and no further.
        for _ in 0..ReplyClock::WINDOW {
            clock.record(64, us(990));
        }
        assert_eq!(clock.grace(64, FLOOR), MAX_REPLY_GRACE);
    }

    #[test]
    fn replies_later_than_the_cap_leave_the_grace_as_it_was() {
        let clock = ReplyClock::new();
        for _ in 0..100 {
            clock.record(64, us(20));
        }
        let before = clock.grace(64, Duration::ZERO);
        for _ in 0..50 {
            clock.record(64, Duration::from_secs(1));
        }
        assert_eq!(clock.grace(64, Duration::ZERO), before);
        assert!(before >= us(20) && before <= us(25), "{before:?}");
        // A floor above the cap wins (a configured grace is never cut).
        let big = Duration::from_millis(3);
        assert_eq!(clock.grace(64, big), big);
    }
}
