//! Process plumbing shared by the daemon binaries (`maru-resource-manager`, `maru-server`,
//! `maru up`): the `--ready-file` they write once listening, and waiting for Ctrl-C / SIGTERM.

use std::io;
use std::path::{Path, PathBuf};

/// Writes `doc` as JSON to `PATH.tmp`, then renames it to `PATH`, so a script or test that
/// waits for the file never reads half of it.
pub fn write_ready_file(path: &Path, doc: &serde_json::Value) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, doc.to_string())?;
    std::fs::rename(&tmp, path)
}

/// SIGINT and SIGTERM, collected without a signal handler: they are blocked before any daemon
/// thread starts (threads inherit the mask), then one thread takes them with `sigwait`. No
/// async-signal-safety concerns, no polling.
pub struct StopSignals {
    set: libc::sigset_t,
}

impl StopSignals {
    /// Blocks SIGINT and SIGTERM in the calling thread, and so in every thread it spawns
    /// afterwards: call it before starting the daemon.
    pub fn block() -> io::Result<StopSignals> {
        // SAFETY: sigset_t is plain data that sigemptyset fully initialises before use; the
        // calls only touch that local set and this thread's signal mask.
        unsafe {
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(StopSignals { set })
        }
    }

    /// Waits until SIGINT or SIGTERM arrives and returns its number.
    pub fn wait(&self) -> i32 {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised signal set and `sig` a valid out-pointer.
        let rc = unsafe { libc::sigwait(&self.set, &mut sig) };
        if rc != 0 {
            tracing::warn!("sigwait failed ({rc}); stopping");
        }
        sig
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        // SAFETY: restores this thread's mask for the two signals; `set` is initialised.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &self.set, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_file_appears_whole_and_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("maru-ready-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ready.json");
        write_ready_file(&path, &serde_json::json!({"tcp": "127.0.0.1:1", "pid": 7})).unwrap();
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back["tcp"], "127.0.0.1:1");
        assert!(!dir.join("ready.json.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_blocked_stop_signal_is_collected_by_wait() {
        let signals = StopSignals::block().unwrap();
        // SAFETY: raising a signal this thread has blocked only makes it pending.
        unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGTERM) };
        assert_eq!(signals.wait(), libc::SIGTERM);
    }
}
