//! Test support shared by the crates' integration tests and the fault suite, so that every
//! test makes its temp pools, waits and daemons the same way.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use maru_shm::PoolSpec;

/// A fresh directory under /dev/shm (tmpfs, like production pools), removed on drop.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("maru-test-")
        .tempdir_in("/dev/shm")
        .expect("temp dir in /dev/shm")
}

/// Path of the shm pool `name` inside a test's `dir`.
pub fn pool_path(dir: &Path, name: &str) -> String {
    dir.join("pools").join(name).to_string_lossy().into_owned()
}

/// A shm pool spec for `name` inside `dir`.
pub fn shm_pool(dir: &Path, name: &str, size: u64) -> PoolSpec {
    PoolSpec::Shm {
        path: dir.join("pools").join(name),
        size,
    }
}

/// Polls `cond` every 5 ms for at most `limit`. Returns whether it became true.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A daemon binary that has written its `--ready-file`.
pub struct Started {
    pub child: Child,
    /// The ready file's JSON (bound addresses, pid, ...).
    pub ready: serde_json::Value,
    /// Where the daemon's stderr goes.
    pub stderr: PathBuf,
}

/// Spawns `cmd` with `--ready-file dir/<name>.ready`, stdin closed, stderr to a fresh
/// `dir/<name>.<n>.stderr` and `MARU_LOG` unset (stdout is the caller's choice), and waits up
/// to `within` for the file to parse. `Err` carries the daemon's stderr when it exits first
/// or never becomes ready (it is killed then).
pub fn spawn_ready(
    mut cmd: Command,
    dir: &Path,
    name: &str,
    within: Duration,
) -> Result<Started, String> {
    let ready_path = dir.join(format!("{name}.ready"));
    let _ = std::fs::remove_file(&ready_path);
    let n = std::fs::read_dir(dir).map(|r| r.count()).unwrap_or(0);
    let stderr = dir.join(format!("{name}.{n}.stderr"));
    let mut child = cmd
        .arg("--ready-file")
        .arg(&ready_path)
        .env_remove("MARU_LOG")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&stderr).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("spawn {name}: {e}"))?;
    let mut ready = None;
    let mut exited = None;
    let ok = wait_until(within, || {
        if let Ok(Some(status)) = child.try_wait() {
            exited = Some(status);
            return true;
        }
        ready = std::fs::read_to_string(&ready_path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        ready.is_some()
    });
    let text = || std::fs::read_to_string(&stderr).unwrap_or_default();
    if let Some(status) = exited {
        return Err(format!("{name} exited with {status}: {}", text()));
    }
    match ready {
        Some(ready) if ok => Ok(Started {
            child,
            ready,
            stderr,
        }),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("{name} not ready within {within:?}: {}", text()))
        }
    }
}
