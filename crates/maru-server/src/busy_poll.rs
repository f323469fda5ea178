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

use maru_transport::busy::{poll_readable, spin_readable, Backoff, Spun};

/// Requests read by all connection threads so far. A connection spins only when no other
/// connection has had a request since its own last one, and stops as soon as another does:
/// that thread, woken or about to be, needs the CPU more than a spinner does.
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Counts a request read by a connection thread; returns the count after it.
pub(crate) fn count_request() -> u64 {
    REQUESTS.fetch_add(1, Ordering::AcqRel) + 1
}

/// The longest wait for a request a client can announce (`Ahead`); a longer one counts as
/// this long. A request that comes before the wait ends is read at once all the same.
pub(crate) const MAX_AHEAD: Duration = Duration::from_millis(20);

/// How long before a request announced for `wait` from now the thread wakes to poll for it:
/// the lateness of its own timer's wake-up on a VM, plus an eighth of the wait for the error
/// of the client's estimate (its copy's speed varies).
fn lead(wait: Duration) -> Duration {
    Duration::from_micros(20) + wait / 8
}

/// What a connection knows of its next request when it has answered the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Nothing: the back-off decides whether to spin.
    Unknown,
    /// The client said it comes in about this long (`Ahead`).
    In(Duration),
    /// The request just answered was one the client had announced (the registration of a
    /// large store): a client storing large chunks one after another announces the next
    /// within moments, and waking the thread for that `Ahead` would cost the client more than
    /// the store's round trip.
    AfterAnnounced,
}

/// Polls `fd` for up to `window` for a connection's next request — if the connection's
/// back-off allows and no other connection has had a request since `last` (this
/// connection's latest [`count_request`]); returns early once it is readable. A zero window
/// never spins.
///
/// A client that said when its request comes ([`Next::In`], from an `Ahead`) gets a thread
/// awake then, whatever its gaps were before (a store of a large chunk leaves a long one after
/// each reply): it sleeps in `poll` until [`lead`] before that time — its own timer wakes it,
/// so the client's write wakes nobody — and polls from then on for the lead and the window.
/// After the request it announced ([`Next::AfterAnnounced`]) the thread polls for the window
/// whatever its back-off says too. Neither books a miss against the back-off: a request
/// announced but late is the client's estimate missing, and the end of a stream of stores is
/// no sign of sparse traffic.
///
/// Returns whether the next request is known to be there (the caller then reads it without
/// waiting for it first).
pub(crate) fn wait_for_next(
    backoff: &mut Backoff,
    fd: RawFd,
    window: Duration,
    last: u64,
    next: Next,
) -> bool {
    if window.is_zero() {
        return false;
    }
    let (mut last, mut spin) = (last, window);
    if let Next::In(wait) = next {
        let wait = wait.min(MAX_AHEAD);
        let lead = lead(wait);
        if wait > lead {
            match poll_readable(fd, wait - lead) {
                Ok(false) => {}
                Ok(true) => return true,
                // The connection failed: its next read says so.
                Err(_) => return false,
            }
            // What other connections had while this one slept is no reason to give way.
            last = REQUESTS.load(Ordering::Acquire);
        }
        spin += lead;
    } else if next == Next::Unknown
        && (REQUESTS.load(Ordering::Acquire) != last || !backoff.try_spin())
    {
        return false;
    }
    if REQUESTS.load(Ordering::Acquire) != last {
        return false;
    }
    let spun = spin_readable(fd, spin, || REQUESTS.load(Ordering::Acquire) != last);
    // A failed poll is a connection about to fail its next read: nothing to book. Only the
    // back-off's own spins book misses.
    match spun {
        Ok(spun) if next == Next::Unknown || spun == Spun::Came => backoff.record(spun),
        _ => {}
    }
    matches!(spun, Ok(Spun::Came))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::thread::JoinHandle;
    use std::time::Instant;

    #[test]
    fn a_connection_that_is_not_alone_does_not_spin() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut b = Backoff::default();
        // `last` older than the server's latest request: another connection is active. Were
        // it to spin, it would take the whole 10 s window (nothing is ever sent) and book a
        // miss.
        let stale = REQUESTS.load(Ordering::Acquire).wrapping_add(1);
        let t = Instant::now();
        wait_for_next(
            &mut b,
            a.as_raw_fd(),
            Duration::from_secs(10),
            stale,
            Next::Unknown,
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(b.skipping(), 0);
    }

    /// A socket its peer writes a byte to after `after`, and the peer's thread (which returns
    /// the peer and when it wrote).
    fn written_after(after: Duration) -> (UnixStream, JoinHandle<(UnixStream, Instant)>) {
        let (a, mut w) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(after);
            w.write_all(b"x").unwrap();
            (w, Instant::now())
        });
        (a, writer)
    }

    /// [`wait_for_next`] on `a` for a connection whose latest request is the latest counted.
    fn wait_now(b: &mut Backoff, a: &UnixStream, window: Duration, next: Next) -> bool {
        let last = REQUESTS.load(Ordering::Acquire);
        wait_for_next(b, a.as_raw_fd(), window, last, next)
    }

    #[test]
    fn a_lone_connection_spins_until_its_next_request() {
        let (a, writer) = written_after(Duration::from_millis(5));
        let mut b = Backoff::default();
        let t = Instant::now();
        let last = REQUESTS.load(Ordering::Acquire);
        wait_for_next(
            &mut b,
            a.as_raw_fd(),
            Duration::from_secs(10),
            last,
            Next::Unknown,
        );
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

    /// A connection whose back-off would have it sleep, told that a request comes in 15 ms:
    /// it spends the wait asleep (almost no CPU), is awake when the request comes, and books
    /// nothing against its back-off.
    #[test]
    fn an_announced_request_finds_its_thread_awake_after_a_sleep() {
        let mut b = Backoff::default();
        b.record(Spun::Missed);
        let skipping = b.skipping();
        let wait = Duration::from_millis(15);
        let (a, writer) = written_after(wait);
        let (t, cpu) = (Instant::now(), thread_cpu());
        wait_now(&mut b, &a, Duration::from_millis(50), Next::In(wait));
        let (returned, spent) = (Instant::now(), thread_cpu() - cpu);
        let took = returned - t;
        let readable = maru_transport::busy::readable_now(a.as_raw_fd()).unwrap();
        let (_w, written) = writer.join().unwrap();
        // It slept until the lead before the 15 ms (13.1 ms), then polled until the request
        // came. Only a thread preempted while polling, or giving way to another test's
        // server, returns without it (the request is then read by the blocking read), and
        // then before the request was even sent.
        assert!(took >= wait - lead(wait), "it did not sleep: {took:?}");
        assert!(
            readable || returned < written,
            "returned after {took:?} without the request"
        );
        // Its CPU time is what it polled, not the whole wait.
        assert!(
            spent < Duration::from_millis(8),
            "{spent:?} of CPU in a wait of {took:?}"
        );
        assert_eq!(
            b.skipping(),
            skipping,
            "the announced wait touched the back-off"
        );
    }

    /// A request that comes long before the time announced wakes the thread at once.
    #[test]
    fn a_request_earlier_than_announced_is_not_kept_waiting() {
        let (a, mut w) = UnixStream::pair().unwrap();
        w.write_all(b"x").unwrap();
        let mut b = Backoff::default();
        let t = Instant::now();
        wait_now(
            &mut b,
            &a,
            Duration::from_millis(50),
            Next::In(Duration::from_secs(10)),
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "it slept {:?}",
            t.elapsed()
        );
    }

    /// After the request it announced, a connection polls for its window whatever its
    /// back-off (the back-off's sleeps are not used up), and a window that ends without a
    /// request books no miss.
    #[test]
    fn after_an_announced_request_the_back_off_is_left_alone() {
        let (a, _w) = UnixStream::pair().unwrap();
        let mut b = Backoff::default();
        b.record(Spun::Missed);
        let skipping = b.skipping();
        let last = REQUESTS.load(Ordering::Acquire);
        let window = Duration::from_millis(2);
        wait_for_next(&mut b, a.as_raw_fd(), window, last, Next::AfterAnnounced);
        assert_eq!(
            b.skipping(),
            skipping,
            "a skip was used up, or a miss booked"
        );
        // The same wait without the announcement sleeps: it uses up one of the skips (unless
        // another test's server counted a request meanwhile, and it gave way first).
        let last = REQUESTS.load(Ordering::Acquire);
        wait_for_next(&mut b, a.as_raw_fd(), window, last, Next::Unknown);
        assert!(b.skipping() == skipping - 1 || REQUESTS.load(Ordering::Acquire) != last);
    }

    /// CPU time of the calling thread.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is valid writable storage; the clock id is a constant.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }
}
