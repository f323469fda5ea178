//! Waiting for a reply in two parts: a short bounded wait in the caller's context (polling
//! the socket without sleeping, or in `ppoll`), then the rest through a [`WaitHook`], which
//! the Python binding uses to release the GIL. How long the first part lasts (the *grace*)
//! follows the reply times this session measures ([`ReplyClock`]).

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use maru_transport::busy::{self, poll_readable, Backoff, Spun};
use maru_transport::TransportError;

pub(crate) use crate::reply_clock::ReplyClock;

/// Runs the slow part of a wait. The default ([`NoHook`]) just runs it; the Python binding
/// releases the GIL around it, so other Python threads run while this one sleeps in the
/// kernel. `f` holds no reference to anything the hook's caller protects (no GIL-bound
/// object), which is why it is `Send`.
pub trait WaitHook {
    fn block(&self, f: &mut (dyn FnMut() + Send));
}

/// The hook that runs the wait in place.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHook;

impl WaitHook for NoHook {
    fn block(&self, f: &mut (dyn FnMut() + Send)) {
        f()
    }
}

/// Takes `m`, waiting through `hook` when another thread holds it: a thread waiting for a
/// lock that a call holds across its round trip (or a connect) must not keep the caller's
/// context, the GIL, from the other threads.
pub(crate) fn lock_hooked<'a, T: Send>(
    m: &'a std::sync::Mutex<T>,
    hook: &dyn WaitHook,
) -> std::sync::MutexGuard<'a, T> {
    loop {
        match m.try_lock() {
            Ok(g) => return g,
            Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => hook.block(&mut || drop(m.lock())),
        }
    }
}

/// The longest grace a measured reply time can ask for. Handing a wait to the hook costs a
/// Python caller up to the interpreter's switch interval (5 ms) when another thread is busy,
/// while holding on keeps that thread out for the grace: a fifth of the switch interval
/// bounds what the other threads lose to a call whose server is slow.
pub const MAX_REPLY_GRACE: Duration = Duration::from_millis(1);

/// Timing of one call.
#[derive(Clone, Copy)]
pub(crate) struct Wait<'a> {
    pub hook: &'a dyn WaitHook,
    /// The least grace: how long to wait in the caller's context before handing over to the
    /// hook while [`Wait::clock`] knows no better.
    pub grace: Duration,
    /// Reply times measured so far, which set the grace of each call.
    pub clock: &'a ReplyClock,
    /// Spend the grace polling without sleeping (see [`crate::MaruConfig::busy_poll`]).
    pub busy_poll: bool,
    pub timeout: Duration,
}

/// Calls of this process waiting for a reply right now. Only a call that waits alone
/// busy-polls: two spinners would hold both CPUs of a small machine while the server's threads
/// that answer them wait for one, and calls that run concurrently already keep each other's
/// CPUs awake (with 4 threads spinning, p99 grows from 0.2–0.7 ms to 1.5–2 ms).
static WAITING: AtomicUsize = AtomicUsize::new(0);

/// Counts one call in [`WAITING`] while it lives.
pub(crate) struct Waiting;

impl Waiting {
    pub fn enter() -> Waiting {
        WAITING.fetch_add(1, Ordering::AcqRel);
        Waiting
    }

    /// No other call of the process is waiting (a wait outside a counted call counts none).
    fn alone() -> bool {
        #[cfg(test)]
        if tests::ALONE.with(|a| a.get()) {
            return true;
        }
        WAITING.load(Ordering::Acquire) <= 1
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits in `poll` until `fd` is readable (`true`) or `deadline` passed (`false`).
pub(crate) fn poll_until(fd: RawFd, deadline: Instant) -> io::Result<bool> {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        if poll_readable(fd, deadline - now)? {
            return Ok(true);
        }
    }
}

/// Waits for `fd` to become readable before `deadline`: first for `grace` in place, then
/// through the hook; returns when it saw the socket readable (before the hook's caller got
/// its context back). The grace is spent polling without sleeping (`maru_transport::busy`)
/// when `w.busy_poll`, the connection's back-off and [`Waiting::alone`] allow — no timer is
/// armed and the thread never leaves the CPU, so a reply inside the grace is seen at once,
/// where a sleeping wait costs a wake-up of 6–15 µs per call — else in `ppoll`.
pub(crate) fn wait_readable(
    fd: RawFd,
    deadline: Instant,
    grace: Duration,
    w: &Wait,
    spin: &mut Backoff,
) -> Result<Instant, TransportError> {
    let now = Instant::now();
    if now >= deadline {
        return Err(TransportError::Timeout);
    }
    let grace = grace.min(deadline - now);
    let ready = if w.busy_poll && Waiting::alone() && spin.try_spin() {
        let spun = busy::spin_readable(fd, grace, || false)?;
        spin.record(spun);
        match spun {
            Spun::Came => true,
            // Preempted: the rest of the grace is spent asleep, still in the caller's context.
            Spun::Crowded => {
                poll_readable(fd, (now + grace).saturating_duration_since(Instant::now()))?
            }
            Spun::Missed | Spun::GaveWay => false,
        }
    } else {
        poll_readable(fd, grace)?
    };
    if ready {
        return Ok(Instant::now());
    }
    let mut outcome = Ok(None);
    w.hook
        .block(&mut || outcome = poll_until(fd, deadline).map(|r| r.then(Instant::now)));
    match outcome {
        Ok(Some(at)) => Ok(at),
        Ok(None) => Err(TransportError::Timeout),
        Err(e) => Err(TransportError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    /// A hook for waits that must end inside the grace, in the caller's context.
    struct Forbidden;
    impl WaitHook for Forbidden {
        fn block(&self, _f: &mut (dyn FnMut() + Send)) {
            panic!("hook called although the reply was there within the grace");
        }
    }

    static CLOCK: ReplyClock = ReplyClock::new();

    thread_local! {
        /// Makes this thread's waits count as alone, whatever other tests of the binary wait
        /// for meanwhile ([`Waiting`] counts the whole process).
        pub(super) static ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn wait(hook: &dyn WaitHook, grace: Duration, busy_poll: bool, timeout: Duration) -> Wait<'_> {
        Wait {
            hook,
            grace,
            clock: &CLOCK,
            busy_poll,
            timeout,
        }
    }

    fn wait_for(fd: RawFd, w: &Wait, spin: &mut Backoff) -> Result<Instant, TransportError> {
        wait_readable(fd, Instant::now() + w.timeout, w.grace, w, spin)
    }

    #[test]
    fn wait_times_out_through_the_hook() {
        struct Counting(AtomicUsize);
        impl WaitHook for Counting {
            fn block(&self, f: &mut (dyn FnMut() + Send)) {
                self.0.fetch_add(1, Ordering::SeqCst);
                f()
            }
        }
        let (a, _b) = UnixStream::pair().unwrap();
        let hook = Counting(Default::default());
        ALONE.with(|a| a.set(true));
        for busy_poll in [false, true] {
            hook.0.store(0, Ordering::SeqCst);
            let w = wait(
                &hook,
                Duration::from_micros(50),
                busy_poll,
                Duration::from_millis(30),
            );
            let started = Instant::now();
            let mut spin = Backoff::default();
            let r = wait_readable(a.as_raw_fd(), started + w.timeout, w.grace, &w, &mut spin);
            assert!(matches!(r, Err(TransportError::Timeout)), "{r:?}");
            assert!(started.elapsed() >= Duration::from_millis(30));
            assert_eq!(hook.0.load(Ordering::SeqCst), 1);
            // A spin that saw no reply makes the next calls sleep instead.
            assert_eq!(spin.skipping(), if busy_poll { Backoff::MIN } else { 0 });
        }
    }

    #[test]
    fn a_ready_reply_never_reaches_the_hook() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"x").unwrap();
        for busy_poll in [false, true] {
            let w = wait(
                &Forbidden,
                Duration::from_micros(50),
                busy_poll,
                Duration::from_secs(1),
            );
            let mut spin = Backoff::default();
            wait_for(a.as_raw_fd(), &w, &mut spin).unwrap();
        }
    }

    #[test]
    fn a_busy_poll_sees_a_reply_that_comes_during_the_grace_without_the_hook() {
        let (a, mut b) = UnixStream::pair().unwrap();
        // The grace is long enough that the writer thread is sure to run inside it, even on a
        // loaded machine.
        let w = wait(
            &Forbidden,
            Duration::from_secs(5),
            true,
            Duration::from_secs(10),
        );
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            b.write_all(b"x").unwrap();
            b
        });
        let mut spin = Backoff::default();
        ALONE.with(|a| a.set(true));
        let t = Instant::now();
        let seen = wait_for(a.as_raw_fd(), &w, &mut spin).unwrap();
        assert!(seen - t >= Duration::from_millis(2), "seen when it came");
        writer.join().unwrap();
        // A spin that came to its end booked no miss (a preempted one backs off, by design).
        assert!(spin.skipping() <= Backoff::MIN);
    }
}
