//! Test harness for Maru's fault, load, bad-input and security tests (`tests/`).
//!
//! Everything here is a real part: the daemons are the real `maru-resource-manager` and
//! `maru-server` binaries (maru-testkit's [`BinaryCluster`] and
//! [`Daemon`](maru_testkit::Daemon)), client processes are this test binary re-executed in a
//! "child role" that drives a real `MaruHandler` ([`child`]), crashes are `SIGKILL`, pools
//! are shm files under `/dev/shm`. Payloads check themselves ([`payload`]), so a test can
//! tell intact data from zeros or another key's bytes after any fault.
//!
//! Owns: the harness of those tests on top of maru-testkit's daemons: scripted client
//! processes, self-checking payloads, latency tallies, the load driver and private mount
//! namespaces ([`ns`]) for storage faults.
//!
//! May not touch: the internals of the code under test. It drives the daemons through their
//! binaries, the wire protocol and the public client APIs (`MaruHandler`, the resource
//! manager's `RmClient`) only, so a fault test sees what a user sees; nothing that ships
//! depends on it.

pub mod child;
pub mod lat;
pub mod load;
pub mod ns;
pub mod payload;
pub mod restart;

use std::path::Path;

use maru_client::{MaruConfig, MaruHandler};
use maru_proto::Handle;
use maru_testkit::BinaryCluster;

pub use maru_testkit::{free_port, temp_dir, wait_until, KIB, MIB};

/// Whether the long variants were asked for (`MARU_LONG_TESTS=1`).
pub fn long_tests() -> bool {
    std::env::var("MARU_LONG_TESTS").is_ok_and(|v| v == "1")
}

/// A handler on `url` with a 2 MiB pool of 64 KiB pages, not connected yet: the ordinary
/// client the tests put next to whatever they probe.
pub fn small_handler(url: &str) -> MaruHandler {
    MaruHandler::new(MaruConfig {
        server_url: url.to_owned(),
        pool_size: 2 * MIB,
        chunk_size_bytes: 64 * KIB,
        ..MaruConfig::default()
    })
    .expect("a valid handler configuration")
}

/// What a refused request must not change: the resource manager's table (as handles) and
/// the metadata server's key and region counts.
pub fn observable_state(c: &BinaryCluster) -> (Vec<Handle>, u64, u64) {
    let s = c.server_stats();
    (
        c.rm_list().into_iter().map(|a| a.handle).collect(),
        s.keys,
        s.regions,
    )
}

/// `keys` as the slices the batch calls take.
pub fn key_refs(keys: &[Vec<u8>]) -> Vec<&[u8]> {
    keys.iter().map(|k| k.as_slice()).collect()
}

/// Mode bits of a path (`st_mode & 0o7777`).
pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}
