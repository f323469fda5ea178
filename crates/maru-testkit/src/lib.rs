//! Test support shared by the crates' integration tests and the fault suite, so that every
//! test makes its temp pools, waits, child processes and clusters the same way.
//!
//! Owns: temporary directories and shm pool specs under `/dev/shm`; the bounded wait
//! ([`wait_until`]) that tests use instead of sleeping; child processes ([`process`]): a
//! daemon binary started and waited for through its ready file ([`spawn_ready`]), stopped
//! with SIGTERM, a bounded wait and SIGKILL ([`terminate`]), this test binary re-executed in
//! a child role ([`rerun_test`]); the two clusters tests run against, one resource manager
//! and one metadata server on a shm pool in a temp dir, either started in-process on
//! ephemeral ports ([`InProcessCluster`]) or as the real binaries on fixed ports so they can
//! be killed and restarted on the same address ([`BinaryCluster`], [`Daemon`]); and the
//! hand-made frames and raw exchanges of the bad-input tests ([`wire`]); several hosts on one
//! pool, as network namespaces on a bridge ([`hosts`]).
//!
//! May not touch: any daemon's or the client's internals. It starts the daemons through
//! their public entry points (`maru_resource_manager::start`, `maru_server::start`) or their
//! command lines and ready files, and speaks to them over the wire protocol only. Nothing
//! here ships: it is a dev-dependency of the crates it tests (and a dependency of the
//! test-only `maru-faults`), never a normal dependency of a product crate. It depends on the
//! resource manager's and the metadata server's libraries, so their integration tests link
//! the very library they test (a dev-dependency cycle cargo allows) and types agree; unit
//! tests inside those crates' `src/` cannot use it.

pub mod binary_cluster;
pub mod daemon;
pub mod hosts;
pub mod in_process;
pub mod process;
pub mod wire;

use std::path::Path;
use std::time::{Duration, Instant};

use maru_shm::PoolSpec;

pub use binary_cluster::{BinaryCluster, ClusterOpts};
pub use daemon::{Daemon, RmSpec, ServerSpec};
pub use in_process::InProcessCluster;
pub use process::{binary, free_port, json_output, rerun_test, spawn_ready, terminate, Started};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// Bound of every call a fixture makes to a daemon (admin reads, raw connections).
pub const TIMEOUT: Duration = Duration::from_secs(5);

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

/// The `--pool` argument of the shm pool `name` inside `dir`.
pub fn shm_pool_arg(dir: &Path, name: &str, size: u64) -> String {
    format!("shm:{}:{size}", pool_path(dir, name))
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
