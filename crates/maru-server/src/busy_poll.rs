//! Busy-polling between requests: after answering, a connection thread polls its socket for a
//! short while instead of going to sleep in `read`.
//!
//! Why: on a virtual machine a client's `send` to a sleeping thread costs ~8 µs in the sender
//! (the wake-up crosses the hypervisor) against ~1 µs when the receiving thread is running
//! (a socket pair, a 45 µs gap between sends, reader blocking vs spinning). A client that
//! stores a stream of chunks (write-behind) or issues calls back to back would otherwise pay
//! most of its round trip in the server's wake-up. Spinning costs CPU, so it is bounded
//! three ways: at most the configured window per gap; only the connection that had the
//! server's latest request spins — so one thread at a time — and it stops as soon as another
//! connection gets a request (that thread needs the CPU more: with 4–32 clients, spinners that
//! did not give way took p99 from ~1–2 ms to 5–10 ms); and a connection whose next request
//! keeps not coming within the window, or whose thread is preempted while it spins (more
//! threads want the CPUs than there are), backs off to sleeping (8…1024 requests), so sparse
//! traffic costs no CPU and a crowded machine's CPUs go to the threads with work.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use maru_transport::busy::{spin_readable, Backoff};

/// Requests read by all connection threads so far. A connection spins only when no other
/// connection has had a request since its own last one, and stops as soon as another does:
/// that thread, woken or about to be, needs the CPU more than a spinner does.
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Counts a request read by a connection thread; returns the count after it.
pub(crate) fn count_request() -> u64 {
    REQUESTS.fetch_add(1, Ordering::AcqRel) + 1
}

/// Polls `fd` for up to `window` for a connection's next request — if the connection's
/// back-off allows (or the client said a request follows: `asked`, an `Ahead`) and no other
/// connection has had a request since `last` (this connection's latest [`count_request`]);
/// returns early once it is readable. A zero window never spins.
pub(crate) fn wait_for_next(
    backoff: &mut Backoff,
    fd: RawFd,
    window: Duration,
    last: u64,
    asked: bool,
) {
    if window.is_zero() || REQUESTS.load(Ordering::Acquire) != last {
        return;
    }
    // A client that said its request follows is worth a spin whatever its gaps were before
    // (a store of a large chunk leaves a long one after each reply).
    if !backoff.try_spin() && !asked {
        return;
    }
    let spun = spin_readable(fd, window, || REQUESTS.load(Ordering::Acquire) != last);
    // A failed poll is a connection about to fail its next read: nothing to book.
    if let Ok(spun) = spun {
        backoff.record(spun);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::time::Instant;

    #[test]
    fn a_connection_that_is_not_alone_does_not_spin() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut b = Backoff::default();
        // `last` older than the server's latest request: another connection is active. Were
        // it to spin, it would take the whole 10 s window (nothing is ever sent) and book a
        // miss.
        let stale = REQUESTS.load(Ordering::Acquire).wrapping_add(1);
        let t = Instant::now();
        wait_for_next(&mut b, a.as_raw_fd(), Duration::from_secs(10), stale, false);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(b.skipping(), 0);
    }

    #[test]
    fn a_lone_connection_spins_until_its_next_request() {
        let (a, mut w) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            w.write_all(b"x").unwrap();
            w
        });
        let mut b = Backoff::default();
        let t = Instant::now();
        let last = REQUESTS.load(Ordering::Acquire);
        wait_for_next(&mut b, a.as_raw_fd(), Duration::from_secs(10), last, false);
        // It returned because the request is there, or because another test's server counted
        // a request meanwhile and it gave way; never after the whole window, never a miss.
        // Or it was preempted while spinning, and backed off.
        assert!(
            maru_transport::busy::readable_now(a.as_raw_fd()).unwrap()
                || REQUESTS.load(Ordering::Acquire) != last
                || b.skipping() == Backoff::MIN,
            "returned before the request came, without a reason to give way"
        );
        let _w = writer.join().unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        // No miss; a preempted spinner (a loaded machine) backs off once.
        assert!(b.skipping() <= Backoff::MIN);
    }
}
