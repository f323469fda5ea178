//! What the resource manager's integration tests share: the resource manager in-process on
//! 127.0.0.1:0 with a shm pool in a temp dir under /dev/shm, a client of it, and the real
//! binary started on a test's state directory.

#![allow(dead_code)] // each test file uses part of this module

use std::path::{Path, PathBuf};
use std::time::Duration;

use maru_proto::Role;
use maru_resource_manager::{RmClient, RmHandle};

// Not every test file uses every item.
#[allow(unused_imports)]
pub use maru_testkit::in_process::rm_config;
#[allow(unused_imports)]
pub use maru_testkit::{pool_path, shm_pool, temp_dir, wait_until, Daemon, MIB, TIMEOUT};

/// A resource manager with one 64 MiB pool `p0`.
pub fn start_default(dir: &Path) -> RmHandle {
    maru_resource_manager::start(rm_config(dir, vec![shm_pool(dir, "p0", 64 * MIB)]))
        .expect("rm starts")
}

pub fn client(rm: &RmHandle) -> RmClient {
    connect(&rm.url())
}

/// A client (in the server's role) of the resource manager at `url`.
pub fn connect(url: &maru_proto::ServerUrl) -> RmClient {
    RmClient::connect(url, Role::Server, TIMEOUT).expect("client connects")
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

/// The `--pool` argument of one 64 MiB pool `p0` in `dir`.
pub fn pool_args(dir: &Path) -> Vec<String> {
    vec![maru_testkit::shm_pool_arg(dir, "p0", 64 * MIB)]
}

/// How the tests start the binary: on `dir`'s state directory, an ephemeral port, logging
/// at info (tests read what it logs).
fn rm_spec(dir: &Path, pools: &[String]) -> maru_testkit::RmSpec {
    maru_testkit::RmSpec {
        log_level: "info".into(),
        ..maru_testkit::RmSpec::new(dir, pools.to_vec())
    }
}

/// The binary's command line, for runs that must fail at start-up.
pub fn rm_command(dir: &Path, pools: &[String]) -> std::process::Command {
    rm_spec(dir, pools).command()
}

/// Runs the binary to a start-up failure: its exit code and what it printed on stderr.
pub fn failed_start(dir: &Path, pools: &[String]) -> (Option<i32>, String) {
    let out = rm_command(dir, pools).output().expect("the binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh directory, the `--pool` arguments of [`pool_args`] and the binary started on them.
pub fn spawn_default() -> (tempfile::TempDir, Vec<String>, Daemon) {
    let dir = temp_dir();
    let pools = pool_args(dir.path());
    let rm = spawn_rm(dir.path(), &pools, &[]);
    (dir, pools, rm)
}

/// Starts the binary on `dir`'s state directory and waits for its ready file.
pub fn spawn_rm(dir: &Path, pools: &[String], extra: &[&str]) -> Daemon {
    let spec = maru_testkit::RmSpec {
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..rm_spec(dir, pools)
    };
    spec.spawn(dir).unwrap_or_else(|e| panic!("{e}"))
}

/// A fresh directory with a resource manager of [`start_default`] in it, and a client.
/// Bound in this order, they drop in reverse: client, daemon, directory.
pub fn default_rm() -> (tempfile::TempDir, RmHandle, RmClient) {
    let dir = temp_dir();
    let rm = start_default(dir.path());
    let c = client(&rm);
    (dir, rm, c)
}
