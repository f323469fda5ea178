//! Starting `maru up` from tests: the real binary on a fresh pool in a temp dir, waited for
//! through its ready file, and killed if the test fails before stopping it.

#![allow(dead_code)] // each test file uses part of this module

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let mut got = None;
    let ok = maru_testkit::wait_until(timeout, || {
        got = f();
        got.is_some()
    });
    match got {
        Some(v) if ok => v,
        _ => panic!("timed out waiting for {what}"),
    }
}

/// A running `maru up`. Dropping it kills the process, so a failing assertion never leaves a
/// daemon (and its pool file) behind.
pub struct Up {
    child: Option<Child>,
    pub ready: serde_json::Value,
}

impl Up {
    pub fn start(dir: &Path, extra: &[&str]) -> Up {
        Up::start_on(&dir.join("pool"), dir, extra)
    }

    /// `maru up` with its pool in `pool_dir` and its state (and start-up files) in `dir`.
    #[allow(dead_code)] // not every test binary that shares this module uses it
    pub fn start_on(pool_dir: &Path, dir: &Path, extra: &[&str]) -> Up {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_maru"));
        cmd.args(["up", "--port", "0", "--rm-port", "0", "--pool-size", "64M"])
            .arg("--pool-dir")
            .arg(pool_dir)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .stdout(Stdio::piped());
        let started = maru_testkit::spawn_ready(cmd, dir, "maru-up", Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}"));
        Up {
            child: Some(started.child),
            ready: started.ready,
        }
    }

    pub fn url(&self, transport: &str) -> String {
        self.ready[transport]
            .as_str()
            .unwrap_or_else(|| panic!("no {transport} url"))
            .to_owned()
    }

    /// SIGTERM, wait for a clean exit, return what it printed.
    pub fn stop(mut self) -> String {
        use std::io::Read;
        let mut child = self.child.take().expect("running");
        let status = maru_testkit::terminate(&mut child, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("maru up: {e}"));
        assert!(status.success(), "maru up exited with {status}");
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        out
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
