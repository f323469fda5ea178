//! Connection threads ask the scheduler for a short slice (EEVDF's custom slice, Linux 6.12
//! and later): a thread that wakes with a request gets an early deadline, so it runs before a
//! CPU-bound neighbour's slice ends instead of after it. On a 2-vCPU machine with a busy loop
//! on each CPU, a Python `store` of 4 KiB with another Python thread busy had its p99 go from
//! 313–365 round trips (the server thread waited out the neighbour's slice, the caller gave the
//! GIL away and waited a switch interval for it) to 1.5–2.2. A thread asking for a short slice
//! keeps its fair share of CPU time; it only gets it in shorter turns.

//!
//! They also ask for timers without slack: a thread told when its next request comes
//! (`Ahead`, busy_poll.rs) sleeps on a timer until shortly before, and the kernel's default
//! slack (50 µs for a normal thread) would let it wake after the request came.

/// The slice a connection thread asks for: about one request's work.
const SLICE_NS: u64 = 100_000;

/// `struct sched_attr` of sched_setattr(2), version 1 (the fields up to `sched_period`).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

/// Asks for [`SLICE_NS`] as this thread's slice, keeping its policy (SCHED_OTHER) and nice
/// value; whether the kernel took it (older kernels refuse a runtime for SCHED_OTHER, and
/// nothing changes then).
pub(crate) fn ask_short_slice() -> bool {
    // SAFETY: getpriority only reads the calling thread's nice value.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_nice: nice,
        sched_runtime: SLICE_NS,
        ..SchedAttr::default()
    };
    // SAFETY: `attr` is a valid, initialised sched_attr of the size it states; pid 0 is this
    // thread; the kernel only reads it.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    rc == 0
}

/// The timer slack connection threads ask for.
const TIMER_SLACK_NS: u64 = 1_000;

/// Asks for [`TIMER_SLACK_NS`] of slack on this thread's timers; whether the kernel took it.
pub(crate) fn ask_exact_timers() -> bool {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and changes only the calling thread.
    unsafe {
        libc::prctl(
            libc::PR_SET_TIMERSLACK,
            TIMER_SLACK_NS as libc::c_ulong,
            0,
            0,
            0,
        ) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's sched_attr, as sched_getattr(2) reads it.
    fn current() -> SchedAttr {
        let mut attr = SchedAttr::default();
        let size = std::mem::size_of::<SchedAttr>() as u32;
        // SAFETY: `attr` is writable storage of `size` bytes; pid 0 is this thread.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                0,
                &mut attr as *mut SchedAttr,
                size,
                0,
            )
        };
        assert_eq!(rc, 0, "sched_getattr: {}", std::io::Error::last_os_error());
        attr
    }

    #[test]
    fn a_short_slice_keeps_the_policy_and_nice_value() {
        std::thread::spawn(|| {
            let before = current();
            let taken = ask_short_slice();
            let after = current();
            assert_eq!(after.sched_policy, libc::SCHED_OTHER as u32);
            assert_eq!(after.sched_nice, before.sched_nice);
            if taken {
                assert_eq!(after.sched_runtime, SLICE_NS, "the slice asked for");
            } else {
                assert_eq!(after.sched_runtime, before.sched_runtime, "nothing changed");
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn exact_timers_are_the_calling_threads_own() {
        // SAFETY: PR_GET_TIMERSLACK only reads the calling thread's slack.
        let slack = || unsafe { libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0) };
        let here = slack();
        let there = std::thread::spawn(move || {
            assert!(ask_exact_timers());
            slack()
        })
        .join()
        .unwrap();
        assert_eq!(there, TIMER_SLACK_NS as libc::c_int);
        assert_eq!(slack(), here, "another thread's slack changed");
    }
}
