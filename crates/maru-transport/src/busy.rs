//! Waiting for a socket without sleeping, and when to stop doing it.
//!
//! Both ends of a Maru connection poll for the other's next message for a short while before
//! they sleep in the kernel: on the small virtual machines Maru is measured on, waking a
//! sleeping thread costs the sender ~8 µs and the sleeper a trip through the scheduler, more
//! than everything the server does for a request. Spinning costs CPU, so every spinner also
//! keeps a [`Backoff`]: a window that passes without a message makes the next waits sleep. A
//! spinner that finds it was taken off its CPU stops at once and backs off the same way: more
//! threads want to run than there are CPUs, and spinning then takes a CPU from the very
//! thread that would send the message (a client process per request on a small machine).

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// How a spin ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spun {
    /// The socket became readable.
    Came,
    /// The window passed without anything to read.
    Missed,
    /// The caller's `give_way` said stop (someone else needs the CPU more).
    GaveWay,
    /// The spinning thread was preempted: the CPUs are oversubscribed, so it stopped.
    Crowded,
}

/// A gap this long between two polls of a spin means the thread was off its CPU (a poll takes
/// about a microsecond; a scheduler time slice is hundreds of them).
pub const PREEMPTED_GAP: Duration = Duration::from_micros(20);

/// Waits up to `timeout` for `fd` to become readable (or hung up / failed: a read will not
/// block then either). `Ok(false)` on timeout or signal. `ppoll`, so sub-millisecond timeouts
/// are honoured.
pub fn poll_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `pfd` and `ts` are valid for the duration of the call; one descriptor; no
    // signal mask change (null sigmask).
    let rc = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(rc > 0)
}

/// Whether `fd` can be read without blocking, now (a zero timeout arms no timer).
pub fn readable_now(fd: RawFd) -> io::Result<bool> {
    poll_readable(fd, Duration::ZERO)
}

/// Polls `fd` without sleeping until it is readable, `window` has passed, `give_way`
/// returns true (checked between polls), or the thread finds it was preempted (a gap of
/// [`PREEMPTED_GAP`] between polls: whatever came meanwhile is for the caller's next, sleeping
/// wait to see at once).
pub fn spin_readable(
    fd: RawFd,
    window: Duration,
    mut give_way: impl FnMut() -> bool,
) -> io::Result<Spun> {
    let mut last = Instant::now();
    let end = last + window;
    loop {
        if give_way() {
            return Ok(Spun::GaveWay);
        }
        if readable_now(fd)? {
            return Ok(Spun::Came);
        }
        let now = Instant::now();
        if now >= end {
            return Ok(Spun::Missed);
        }
        if now - last >= PREEMPTED_GAP {
            return Ok(Spun::Crowded);
        }
        last = now;
        std::hint::spin_loop();
    }
}

/// Whether the next wait of one connection may spin. A miss (nothing came within the window:
/// a loaded machine, a slow or idle peer) makes the next `8 … 1024` waits sleep, doubling with
/// every further miss; every message that came while spinning halves the back-off again.
#[derive(Debug, Default, Clone)]
pub struct Backoff {
    backoff: u16,
    skip: u16,
    /// The next wait spins whatever the back-off ([`Backoff::spin_next`]).
    granted: bool,
}

impl Backoff {
    pub const MIN: u16 = 8;
    pub const MAX: u16 = 1024;

    /// Whether this wait may spin (counts a skipped one).
    pub fn try_spin(&mut self) -> bool {
        if std::mem::take(&mut self.granted) {
            return true;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// Books how a spin ended. Giving way says nothing about this connection's traffic; a
    /// crowded machine backs off like a miss.
    pub fn record(&mut self, spun: Spun) {
        match spun {
            Spun::Came => self.backoff /= 2,
            Spun::Missed | Spun::Crowded => {
                self.backoff = self.backoff.saturating_mul(2).clamp(Self::MIN, Self::MAX);
                self.skip = self.backoff;
            }
            Spun::GaveWay => {}
        }
    }

    /// Lets the next wait spin, skipping nothing: its message was announced as coming soon
    /// (a peer that said when its request comes, a reply to a request whose server was told
    /// ahead), so the gaps that made the back-off sleep say nothing about it.
    pub fn spin_next(&mut self) {
        self.granted = true;
    }

    /// Waits this connection will still sleep through before it spins again.
    pub fn skipping(&self) -> u16 {
        self.skip
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn misses_back_off_and_hits_recover() {
        let mut b = Backoff::default();
        assert!(b.try_spin());
        b.record(Spun::Missed);
        for _ in 0..Backoff::MIN {
            assert!(!b.try_spin());
        }
        assert!(b.try_spin());
        b.record(Spun::Missed);
        assert_eq!(b.skipping(), 16);
        for _ in 0..20 {
            b.record(Spun::Missed);
        }
        assert_eq!(b.backoff, Backoff::MAX);
        b.skip = 0;
        b.record(Spun::Crowded);
        assert_eq!(b.skipping(), Backoff::MAX, "crowded backs off like a miss");
        b.skip = 0;
        b.record(Spun::GaveWay);
        assert_eq!((b.backoff, b.skip), (Backoff::MAX, 0));
        for _ in 0..11 {
            b.record(Spun::Came);
        }
        assert_eq!(b.backoff, 0);
        assert!(b.try_spin());
    }

    #[test]
    fn a_granted_spin_skips_nothing_and_is_used_once() {
        let mut b = Backoff::default();
        b.record(Spun::Missed);
        b.spin_next();
        assert!(b.try_spin(), "granted");
        assert_eq!(b.skipping(), Backoff::MIN, "the grant used up no skip");
        assert!(!b.try_spin(), "the grant is gone; the back-off holds again");
        assert_eq!(b.skipping(), Backoff::MIN - 1);
    }

    #[test]
    fn a_spin_ends_when_data_comes_when_told_to_give_way_or_after_the_window() {
        let (a, mut w) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        // On a loaded machine the spinner may be preempted first, and says so.
        let t = Instant::now();
        let spun = spin_readable(fd, Duration::from_millis(2), || false).unwrap();
        match spun {
            Spun::Missed => assert!(t.elapsed() >= Duration::from_millis(2)),
            Spun::Crowded => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(
            spin_readable(fd, Duration::from_secs(10), || true).unwrap(),
            Spun::GaveWay
        );
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            w.write_all(b"x").unwrap();
            w
        });
        let t = Instant::now();
        while spin_readable(fd, Duration::from_secs(10), || false).unwrap() == Spun::Crowded {}
        assert!(readable_now(fd).unwrap());
        assert!(t.elapsed() < Duration::from_secs(5));
        drop(writer.join().unwrap());
        assert!(readable_now(fd).unwrap(), "a buffered byte, then a hang-up");
    }

    #[test]
    fn a_spinner_taken_off_its_cpu_says_the_machine_is_crowded() {
        let (a, _w) = std::os::unix::net::UnixStream::pair().unwrap();
        // The check between polls stands in for a preemption: it keeps the thread away from
        // polling for longer than a poll ever takes.
        let mut first = true;
        let spun = spin_readable(a.as_raw_fd(), Duration::from_secs(10), || {
            if first {
                first = false;
            } else {
                std::thread::sleep(PREEMPTED_GAP * 2);
            }
            false
        })
        .unwrap();
        assert_eq!(spun, Spun::Crowded);
    }
}
