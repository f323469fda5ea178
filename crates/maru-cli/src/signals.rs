//! Waiting for Ctrl-C / SIGTERM without a signal handler: the signals are blocked before any
//! daemon thread starts (threads inherit the mask), then one thread collects them with
//! `sigwait`. No async-signal-safety concerns, no polling.

/// The signals that stop `maru up`.
pub struct StopSignals {
    set: libc::sigset_t,
}

impl StopSignals {
    /// Blocks SIGINT and SIGTERM in the calling thread (and so in every thread it spawns
    /// afterwards).
    pub fn block() -> std::io::Result<StopSignals> {
        // SAFETY: sigemptyset/sigaddset initialise and fill a sigset_t we own; pthread_sigmask
        // only changes this thread's mask.
        unsafe {
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            Ok(StopSignals { set })
        }
    }

    /// Waits until one of the signals arrives and returns its number.
    pub fn wait(&self) -> i32 {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised sigset and `sig` a valid out-pointer.
        unsafe { libc::sigwait(&self.set, &mut sig) };
        sig
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask this thread had for these signals; pending ones were
        // consumed by `wait`.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &self.set, std::ptr::null_mut()) };
    }
}
