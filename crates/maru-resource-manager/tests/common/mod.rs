//! Helpers shared by the integration tests: a resource manager in-process on 127.0.0.1:0
//! with a shm pool in a temp dir under /dev/shm, clients, and bounded waits.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use maru_proto::Role;
use maru_resource_manager::{RmClient, RmConfig, RmHandle};
use maru_shm::PoolSpec;

// Not every test file uses every helper.
#[allow(unused_imports)]
pub use maru_testkit::{pool_path, shm_pool, temp_dir, wait_until};

pub const MIB: u64 = 1 << 20;
pub const TIMEOUT: Duration = Duration::from_secs(5);

pub fn config(dir: &Path, pools: Vec<PoolSpec>) -> RmConfig {
    let mut cfg = RmConfig::new(dir.join("state"), pools);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg
}

/// A resource manager with one 64 MiB pool `p0`.
pub fn start_default(dir: &Path) -> RmHandle {
    maru_resource_manager::start(config(dir, vec![shm_pool(dir, "p0", 64 * MIB)]))
        .expect("rm starts")
}

pub fn client(rm: &RmHandle) -> RmClient {
    RmClient::connect(&rm.url(), Role::Server, TIMEOUT).expect("client connects")
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

/// The real `maru-resource-manager` binary, running.
pub struct RmProcess {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
    pub ready: serde_json::Value,
    pub stderr: PathBuf,
}

impl RmProcess {
    pub fn url(&self) -> maru_proto::ServerUrl {
        maru_proto::ServerUrl::Tcp(self.addr.to_string())
    }

    /// SIGKILL: a crash, nothing flushed or checkpointed.
    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet waited for).
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let mut status = None;
        maru_testkit::wait_until(Duration::from_secs(10), || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        status.unwrap_or_else(|| {
            let _ = self.child.kill();
            panic!("resource manager did not stop on SIGTERM")
        })
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

pub fn rm_command(dir: &Path, pools: &[String]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_maru-resource-manager"));
    cmd.arg("--port")
        .arg("0")
        .arg("--state-dir")
        .arg(state_dir(dir))
        .arg("--log-level")
        .arg("info")
        .env_remove("MARU_LOG");
    for p in pools {
        cmd.arg("--pool").arg(p);
    }
    cmd
}

/// Starts the binary on `dir`'s state directory and waits for its ready file.
pub fn spawn_rm(dir: &Path, pools: &[String], extra: &[&str]) -> RmProcess {
    let mut cmd = rm_command(dir, pools);
    cmd.args(extra).stdout(std::process::Stdio::null());
    let maru_testkit::Started {
        child,
        ready,
        stderr,
    } = maru_testkit::spawn_ready(cmd, dir, "rm", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = ready["tcp"].as_str().expect("tcp address").parse().unwrap();
    RmProcess {
        child,
        addr,
        ready,
        stderr,
    }
}
