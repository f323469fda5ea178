//! Helpers shared by the integration tests: a resource manager in-process on 127.0.0.1:0
//! with a shm pool in a temp dir under /dev/shm, clients, and bounded waits.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use maru_proto::Role;
use maru_rm::{RmClient, RmConfig, RmHandle};
use maru_shm::PoolSpec;

pub const MIB: u64 = 1 << 20;
pub const TIMEOUT: Duration = Duration::from_secs(5);

pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("maru-test-")
        .tempdir_in("/dev/shm")
        .expect("temp dir in /dev/shm")
}

/// A pool spec for `name` inside `dir`.
pub fn shm_pool(dir: &Path, name: &str, size: u64) -> PoolSpec {
    PoolSpec::Shm {
        path: dir.join("pools").join(name),
        size,
    }
}

pub fn pool_path(dir: &Path, name: &str) -> String {
    dir.join("pools").join(name).to_string_lossy().into_owned()
}

pub fn config(dir: &Path, pools: Vec<PoolSpec>) -> RmConfig {
    let mut cfg = RmConfig::new(dir.join("state"), pools);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg
}

/// A resource manager with one 64 MiB pool `p0`.
pub fn start_default(dir: &Path) -> RmHandle {
    maru_rm::start(config(dir, vec![shm_pool(dir, "p0", 64 * MIB)])).expect("rm starts")
}

pub fn client(rm: &RmHandle) -> RmClient {
    RmClient::connect(&rm.url(), Role::Server, TIMEOUT).expect("client connects")
}

/// Waits up to `limit` for `cond`, polling every 5 ms.
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

/// Waits until the reaper has completed `n` more passes.
pub fn wait_reaper_passes(rm: &RmHandle, n: u64) {
    let target = rm.reap_passes() + n;
    assert!(
        wait_until(Duration::from_secs(10), || rm.reap_passes() >= target),
        "reaper did not run"
    );
}

pub fn state_dir(dir: &Path) -> PathBuf {
    dir.join("state")
}
