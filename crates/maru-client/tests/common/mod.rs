//! What the client's integration tests share: a resource manager and a metadata server
//! in-process (maru-testkit's [`InProcessCluster`]) with the handler configuration the tests
//! start from, reads of the pool behind a handler's back, and fake servers that misbehave on
//! purpose ([`fake_server`]).

#![allow(dead_code)] // each test file uses part of this module

pub mod fake_server;

use std::time::Duration;

use maru_client::{AllocHandle, MaruConfig, MaruHandler, MIB};
pub use maru_testkit::InProcessCluster;

/// A cluster on one 256 MiB pool, the server also on a Unix socket.
pub fn cluster() -> InProcessCluster {
    InProcessCluster::with(
        |dir, rm| rm.pools = vec![maru_testkit::shm_pool(dir, "p0", 256 * MIB)],
        |_, _| {},
    )
}

/// What the tests do with a cluster through the client library.
pub trait ClientSide {
    /// A 4 MiB pool of 64 KiB pages on the server's TCP listener, 3 s per call.
    fn config(&self) -> MaruConfig;
    /// A connected handler.
    fn handler(&self, cfg: MaruConfig) -> MaruHandler;
    /// Regions the resource manager has out.
    fn rm_allocations(&self) -> u64;
}

impl ClientSide for InProcessCluster {
    fn config(&self) -> MaruConfig {
        MaruConfig {
            server_url: self.url().to_string(),
            pool_size: 4 * MIB,
            chunk_size_bytes: 64 * 1024,
            timeout_ms: 3000,
            ..MaruConfig::default()
        }
    }

    fn handler(&self, cfg: MaruConfig) -> MaruHandler {
        let h = MaruHandler::new(cfg).unwrap();
        h.connect().unwrap();
        h
    }

    fn rm_allocations(&self) -> u64 {
        self.rm().stats().allocations
    }
}

/// Waits (bounded) for `cond`; fails the test naming `what` when it never holds.
pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    assert!(
        maru_testkit::wait_until(timeout, cond),
        "timed out waiting for {what}"
    );
}

/// A fresh read-only mapping of the pool file under `a`'s page: what everyone else sees.
pub fn pool_view_of(a: &AllocHandle) -> (maru_shm::Mapping, usize) {
    let m = a.view().mapping();
    let page = m.file_offset() as usize + a.view().offset();
    let aligned = page - page % 4096;
    let pool = maru_shm::Mapping::map(
        m.path(),
        aligned as u64,
        4096,
        maru_shm::MapMode::ReadOnly,
        false,
    )
    .unwrap();
    (pool, page - aligned)
}

/// Writes `stamp` through `a` and tells whether the pool saw it.
pub fn write_reaches_pool(
    a: &AllocHandle,
    pool: &(maru_shm::Mapping, usize),
    stamp: &[u8],
) -> bool {
    a.write_at(0, stamp).unwrap();
    let mut seen = vec![0u8; stamp.len()];
    pool.0.read_at(pool.1, &mut seen).unwrap();
    seen == stamp
}
