//! Waiting for a socket without sleeping, and when to stop doing it.
//!
//! Both ends of a Maru connection poll for the other's next message for a short while before
//! they sleep in the kernel: on the VMs measured (docs/PERFORMANCE.md, finding 1) waking a
//! sleeping thread costs the sender ~8 µs and the sleeper a trip through the scheduler, more
//! than everything the server does for a request. Spinning costs CPU, so every spinner also
//! keeps a [`Backoff`]: a window that passes without a message makes the next waits sleep.

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
}

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

/// Polls `fd` without sleeping until it is readable, `window` has passed, or `give_way`
/// returns true (checked between polls).
pub fn spin_readable(
    fd: RawFd,
    window: Duration,
    mut give_way: impl FnMut() -> bool,
) -> io::Result<Spun> {
    let end = Instant::now() + window;
    loop {
        if give_way() {
            return Ok(Spun::GaveWay);
        }
        if readable_now(fd)? {
            return Ok(Spun::Came);
        }
        if Instant::now() >= end {
            return Ok(Spun::Missed);
        }
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
}

impl Backoff {
    pub const MIN: u16 = 8;
    pub const MAX: u16 = 1024;

    /// Whether this wait may spin (counts a skipped one).
    pub fn try_spin(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// Books how a spin ended. Giving way says nothing about this connection's traffic.
    pub fn record(&mut self, spun: Spun) {
        match spun {
            Spun::Came => self.backoff /= 2,
            Spun::Missed => {
                self.backoff = self.backoff.saturating_mul(2).clamp(Self::MIN, Self::MAX);
                self.skip = self.backoff;
            }
            Spun::GaveWay => {}
        }
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
        b.record(Spun::GaveWay);
        assert_eq!((b.backoff, b.skip), (Backoff::MAX, 0));
        for _ in 0..11 {
            b.record(Spun::Came);
        }
        assert_eq!(b.backoff, 0);
        assert!(b.try_spin());
    }

    #[test]
    fn a_spin_ends_when_data_comes_when_told_to_give_way_or_after_the_window() {
        let (a, mut w) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        assert_eq!(
            spin_readable(fd, Duration::from_millis(2), || false).unwrap(),
            Spun::Missed
        );
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
        assert_eq!(
            spin_readable(fd, Duration::from_secs(10), || false).unwrap(),
            Spun::Came
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        drop(writer.join().unwrap());
        assert!(readable_now(fd).unwrap(), "a buffered byte, then a hang-up");
    }
}
