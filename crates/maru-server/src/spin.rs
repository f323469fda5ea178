//! Busy-polling between requests: after answering, a connection thread polls its socket for a
//! short while instead of going to sleep in `read`.
//!
//! Why: on this kind of VM a client's `send` to a sleeping thread costs ~8 µs in the sender
//! (the wake-up crosses the hypervisor) against ~1 µs when the receiving thread is running —
//! measured with a socket pair, a 45 µs gap between sends, reader blocking vs spinning. A
//! client that stores a stream of chunks (write-behind) or issues calls back to back therefore
//! pays most of its round trip in the server's wake-up. Spinning costs CPU, so it is bounded
//! four ways: at most the configured window per gap; at most one spinning connection thread
//! per two CPUs; only a connection that is the server's only active one spins, and it stops as
//! soon as another connection gets a request (that thread needs the CPU more: with 4–32
//! clients, spinners that did not give way took p99 from ~1–2 ms to 5–10 ms); and a connection
//! whose next request keeps not coming within the window backs off to sleeping (8…1024
//! requests), so sparse traffic costs no CPU.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Connection threads spinning now.
static SPINNING: AtomicUsize = AtomicUsize::new(0);

/// Requests read by all connection threads so far. A connection spins only when no other
/// connection has had a request since its own last one, and stops as soon as another does:
/// that thread, woken or about to be, needs the CPU more than a spinner does.
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Counts a request read by a connection thread; returns the count after it.
pub(crate) fn count_request() -> u64 {
    REQUESTS.fetch_add(1, Ordering::AcqRel) + 1
}

/// How a spin ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spun {
    /// The next request arrived.
    Came,
    /// The window passed without one.
    Missed,
    /// Another connection thread got work: the CPU is theirs.
    GaveWay,
}

fn max_spinners() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| (n.get() / 2).max(1))
            .unwrap_or(1)
    })
}

/// Per-connection state: whether to spin after the next reply.
#[derive(Debug, Default)]
pub(crate) struct SpinBudget {
    backoff: u16,
    skip: u16,
}

impl SpinBudget {
    const MIN_BACKOFF: u16 = 8;
    const MAX_BACKOFF: u16 = 1024;

    /// Polls `fd` for up to `window` for the next request (if this connection's budget and
    /// the process's spinner slots allow, and no other connection has had a request since
    /// `last`, this connection's latest [`count_request`]); returns early once it is readable.
    /// A zero window never spins.
    pub fn wait_for_next(&mut self, fd: RawFd, window: Duration, last: u64) {
        if window.is_zero() || REQUESTS.load(Ordering::Acquire) != last {
            return;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return;
        }
        let max = max_spinners();
        if SPINNING
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return;
        }
        let spun = spin_readable(fd, window, last);
        SPINNING.fetch_sub(1, Ordering::AcqRel);
        self.record(spun);
    }

    fn record(&mut self, spun: Spun) {
        if spun == Spun::Came {
            self.backoff /= 2;
        } else if spun == Spun::Missed {
            self.backoff =
                (self.backoff.saturating_mul(2)).clamp(Self::MIN_BACKOFF, Self::MAX_BACKOFF);
            self.skip = self.backoff;
        }
    }
}

fn spin_readable(fd: RawFd, window: Duration, last: u64) -> Spun {
    let end = Instant::now() + window;
    loop {
        if REQUESTS.load(Ordering::Acquire) != last {
            return Spun::GaveWay;
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call, zero timeout.
        if unsafe { libc::poll(&mut pfd, 1, 0) } > 0 {
            return Spun::Came;
        }
        if Instant::now() >= end {
            return Spun::Missed;
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn misses_back_off_and_hits_recover() {
        let mut s = SpinBudget::default();
        s.record(Spun::Missed);
        assert_eq!((s.backoff, s.skip), (SpinBudget::MIN_BACKOFF, 8));
        s.skip = 0;
        s.record(Spun::Missed);
        assert_eq!(s.skip, 16);
        // Giving way says nothing about this connection's traffic.
        s.skip = 0;
        s.record(Spun::GaveWay);
        assert_eq!((s.backoff, s.skip), (16, 0));
        for _ in 0..5 {
            s.record(Spun::Came);
        }
        assert_eq!(s.backoff, 0);
    }

    #[test]
    fn a_connection_that_is_not_alone_does_not_spin() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut s = SpinBudget::default();
        // `last` older than the server's latest request: another connection is active. Were
        // it to spin, it would take the whole 10 s window (nothing is ever sent) and book a
        // miss.
        let stale = REQUESTS.load(Ordering::Acquire).wrapping_add(1);
        let t = Instant::now();
        s.wait_for_next(a.as_raw_fd(), Duration::from_secs(10), stale);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!((s.backoff, s.skip), (0, 0));
    }

    #[test]
    fn a_request_that_comes_during_the_window_ends_the_spin() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            b.write_all(b"x").unwrap();
            b
        });
        let t = Instant::now();
        let last = REQUESTS.load(Ordering::Acquire);
        let spun = spin_readable(a.as_raw_fd(), Duration::from_secs(10), last);
        let _b = writer.join().unwrap();
        // Either it saw the request, or another test's server counted a request meanwhile and
        // it gave way; never the whole window.
        assert!(matches!(spun, Spun::Came | Spun::GaveWay), "{spun:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
