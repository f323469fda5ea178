//! A connected handler in a child made by `fork()`.
//!
//! `fork()` copies the handler's memory and its socket descriptors into the child, but not
//! its threads. The child's copies of the sockets are the *same* connections as the parent's
//! (one open file description each): a request the child sends is answered to whichever
//! process reads first, a goodbye ends the parent's session, and `shutdown(2)` cuts the
//! parent's connection too. So a child must never use, shut down or say goodbye on them.
//!
//! Each process counts the forks it came out of ([`generation`], bumped in the child by a
//! `pthread_atfork` handler), and each session records the count it was opened under
//! ([`Birth`]). A session whose birth is not the current generation belongs to an ancestor:
//! the handler refuses every call with [`ErrorKind::Forked`](crate::ErrorKind::Forked), or,
//! with [`MaruConfig::reconnect_after_fork`](crate::MaruConfig::reconnect_after_fork),
//! opens a session of its own. The inherited session is [`abandon`]ed: its descriptors are
//! closed in the child (a close removes only the child's reference; the parent's connection
//! stays open) and nothing else of it is dropped, since its destructors would shut sockets
//! down, say goodbye or join threads that do not exist in the child.
//!
//! Checking costs one atomic load per call (the count lives in this process's memory; no
//! `getpid` system call). A fork taken while another thread of the parent is inside a call
//! copies that call's locks held: the child's calls may then wait on them (as with any
//! library that takes locks), so fork from a thread that is not mid-call, as
//! multiprocessing and engine launchers do.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

/// Forks this process's memory came through since the first session was opened.
static GENERATION: AtomicU64 = AtomicU64::new(0);
static REGISTER: Once = Once::new();

extern "C" fn after_fork_in_child() {
    // Async-signal-safe: one atomic add, no allocation, no lock.
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// How many forks separate this process from the one that first opened a session.
fn generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

/// The process generation a session was opened in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Birth(u64);

impl Birth {
    /// Now, in this process. Installs the fork handler the first time.
    pub fn now() -> Birth {
        REGISTER.call_once(|| {
            // SAFETY: the handler is a plain `extern "C"` function that only does an atomic
            // add, which is allowed in a child after fork; the other two slots are null.
            let rc = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
            if rc != 0 {
                tracing::warn!(
                    "pthread_atfork failed ({rc}): a forked child's handler cannot tell it was \
                     forked"
                );
            }
        });
        Birth(generation())
    }

    /// Whether this session was opened in an ancestor of the current process.
    pub fn inherited(self) -> bool {
        self.0 != generation()
    }
}

/// Gives up an inherited session in the child: closes the child's copies of its sockets
/// (`fds`) and leaks `state` without running any destructor of it.
pub(crate) fn abandon<T>(state: T, fds: Vec<RawFd>) {
    std::mem::forget(state);
    for fd in fds {
        // SAFETY: every fd is a socket of the forgotten session, whose owning objects are
        // leaked above and never used again in this process, so this is its only close.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_birth_is_inherited_only_across_a_fork() {
        let birth = Birth::now();
        assert!(!birth.inherited());
        // SAFETY: the child only reads an atomic and calls `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = if birth.inherited() && !Birth::now().inherited() {
                0
            } else {
                1
            };
            // SAFETY: leaving the child without running the test harness's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for the child made above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert!(
            !birth.inherited(),
            "the parent is still the session's process"
        );
    }
}
