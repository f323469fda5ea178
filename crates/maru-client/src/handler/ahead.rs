//! Copies that tell the server when their registration comes. A store sends its registration
//! right after its copy; a copy longer than the server's busy-poll window (50 µs: a chunk of
//! about 1 MiB) finds the thread that serves the connection asleep by then, and waking it
//! costs the sender more than the round trip (the wake-up crosses the hypervisor on a VM). So
//! a long copy sends `Ahead` (answered with nothing) as it begins, on the connection its
//! registration takes ([`Via`]), with the time the copy should take: the thread is still awake
//! from its previous reply when a stream of stores sends it, sleeps on a timer of its own
//! meanwhile, and is polling again when the registration comes. What the copy should take
//! comes from the handler's earlier long copies ([`CopyRate`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use maru_shm::{Mapping, ShmError};

use super::connected::Connected;
use crate::connections::PooledConn;

/// Copies of at least this many bytes in one call tell the server ahead; shorter ones end
/// within the window of the server's previous reply.
pub(super) const AHEAD_FROM: usize = 256 * 1024;

/// The connection a call's registration takes, where its `Ahead` goes.
pub(super) enum Via<'c> {
    /// The session's shared connection (a call that waits for its reply).
    Shared,
    /// The write-behind connection (a store that does not wait).
    Behind(&'c mut PooledConn),
    /// One not open yet (the first write-behind store opens it): nothing to tell.
    Unknown,
}

/// The copies of one store call: `left` bytes still to copy, and, once the first copy
/// began, when (for a call that tells ahead).
pub(super) struct CopyAhead<'c> {
    c: &'c Connected,
    via: Via<'c>,
    total: usize,
    left: usize,
    began: Option<Instant>,
}

impl<'c> CopyAhead<'c> {
    /// The copies of a call that copies `total` bytes in all and then sends its registration
    /// on `via`.
    pub fn new(c: &'c Connected, total: usize, via: Via<'c>) -> CopyAhead<'c> {
        CopyAhead {
            c,
            via,
            total,
            left: total,
            began: None,
        }
    }

    /// Copies `bytes` to `at` in `mapping`; the call's first copy tells the server ahead.
    pub fn copy(&mut self, mapping: &Mapping, at: usize, bytes: &[u8]) -> Result<(), ShmError> {
        if self.total >= AHEAD_FROM && self.began.is_none() {
            let wait = self.c.copy_rate.expect(self.total);
            match &mut self.via {
                Via::Shared => self.c.conns.tell_ahead(wait),
                Via::Behind(conn) => conn.tell_ahead(wait),
                Via::Unknown => {}
            }
            self.began = Some(Instant::now());
        }
        mapping.write_at(at, bytes)?;
        self.left = self.left.saturating_sub(bytes.len());
        if self.left == 0 {
            if let Some(began) = self.began.take() {
                self.c.copy_rate.record(self.total, began.elapsed());
            }
        }
        Ok(())
    }
}

/// How fast this handler's long copies go, in ns per MiB: as fast as the fastest recent one.
/// A faster copy sets it at once; a slower one moves it an eighth of the way. An estimate too
/// long costs a wake-up (the thread sleeps past the registration, which then wakes it), one
/// too short only a longer spin, so the estimate leans short: a copy slowed by a preemption
/// or a page fault barely moves it, and copies that really got slower pull it up within a few
/// dozen calls.
#[derive(Debug, Default)]
pub(super) struct CopyRate {
    /// 0 until a copy was measured.
    ns_per_mib: AtomicU64,
}

impl CopyRate {
    /// What a copy is taken to cost before any was measured: 16 GB/s, a streaming copy on a
    /// current server (an early guess only has the server's thread spin for longer).
    const GUESS_NS_PER_MIB: u64 = 65_000;

    /// What copying `bytes` should take.
    pub fn expect(&self, bytes: usize) -> Duration {
        let rate = match self.ns_per_mib.load(Ordering::Relaxed) {
            0 => Self::GUESS_NS_PER_MIB,
            r => r,
        };
        Duration::from_nanos((bytes as u64).saturating_mul(rate) >> 20)
    }

    /// Books a copy of `bytes` that took `took`.
    pub fn record(&self, bytes: usize, took: Duration) {
        if bytes == 0 {
            return;
        }
        let sample = ((took.as_nanos() as u64) << 20) / bytes as u64;
        let old = self.ns_per_mib.load(Ordering::Relaxed);
        let new = match old {
            0 => sample,
            _ if sample <= old => sample,
            _ => old + (sample - old) / 8,
        };
        // Threads storing at once may each overwrite the other's update: either is an
        // estimate from recent copies.
        self.ns_per_mib.store(new.max(1), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_starts_from_a_guess_and_leans_to_the_fastest_copies() {
        let r = CopyRate::default();
        assert_eq!(r.expect(1 << 20), Duration::from_nanos(65_000));
        r.record(4 << 20, Duration::from_micros(400));
        assert_eq!(r.expect(1 << 20), Duration::from_micros(100));
        // A copy ten times slower (a preemption) moves it an eighth: 100 -> 212.5 µs/MiB.
        r.record(1 << 20, Duration::from_millis(1));
        assert_eq!(r.expect(1 << 20), Duration::from_nanos(212_500));
        // A faster one sets it at once.
        r.record(2 << 20, Duration::from_micros(100));
        assert_eq!(r.expect(4 << 20), Duration::from_micros(200));
        // Copies that really got slower pull it up within a few dozen.
        for _ in 0..40 {
            r.record(1 << 20, Duration::from_micros(80));
        }
        let settled = r.expect(1 << 20).as_micros();
        assert!((78..=80).contains(&settled), "{settled} µs/MiB");
        r.record(0, Duration::from_secs(1));
        assert_eq!(
            r.expect(1 << 20).as_micros(),
            settled,
            "an empty copy says nothing"
        );
    }
}
