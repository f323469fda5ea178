//! A resource manager and a metadata server started in-process, through their libraries
//! ([`InProcessCluster`]).

use std::path::Path;

use maru_proto::stats::ServerStats;
use maru_proto::ServerUrl;
use maru_resource_manager::{RmConfig, RmHandle};
use maru_server::{ServerConfig, ServerHandle};
use maru_shm::PoolSpec;

use crate::{shm_pool, temp_dir, MIB};

/// A resource manager configuration on `dir/state` with `pools`, listening on 127.0.0.1:0.
pub fn rm_config(dir: &Path, pools: Vec<PoolSpec>) -> RmConfig {
    let mut cfg = RmConfig::new(dir.join("state"), pools);
    cfg.listen = "127.0.0.1:0".parse().expect("loopback address");
    cfg
}

/// A resource manager and a metadata server, both in this process, on a shm pool in a temp
/// dir: the resource manager on 127.0.0.1:0, the server on 127.0.0.1:0 and the Unix socket
/// `dir/server.sock`. Dropping it shuts both down, the server first.
pub struct InProcessCluster {
    /// `None` once a test has shut it down (`c.server.take().unwrap().shutdown()`).
    pub server: Option<ServerHandle>,
    pub rm: Option<RmHandle>,
    /// Dropped last: holds the pool, the state and the socket.
    pub dir: tempfile::TempDir,
}

impl InProcessCluster {
    /// One 64 MiB pool `p0`.
    pub fn start() -> InProcessCluster {
        Self::with(|_, _| {}, |_, _| {})
    }

    /// Lets a test adjust both configurations; each closure gets the temp dir too.
    pub fn with(
        rm_cfg: impl FnOnce(&Path, &mut RmConfig),
        server_cfg: impl FnOnce(&Path, &mut ServerConfig),
    ) -> InProcessCluster {
        let dir = temp_dir();
        let mut cfg = rm_config(dir.path(), vec![shm_pool(dir.path(), "p0", 64 * MIB)]);
        rm_cfg(dir.path(), &mut cfg);
        let rm = maru_resource_manager::start(cfg).expect("rm starts");
        let mut scfg = ServerConfig {
            tcp: Some("127.0.0.1:0".parse().expect("loopback address")),
            unix: Some(dir.path().join("server.sock")),
            rm_url: rm.url(),
            ..ServerConfig::default()
        };
        server_cfg(dir.path(), &mut scfg);
        let server = maru_server::start(scfg).expect("server starts");
        InProcessCluster {
            server: Some(server),
            rm: Some(rm),
            dir,
        }
    }

    pub fn server(&self) -> &ServerHandle {
        self.server.as_ref().expect("the server is running")
    }

    pub fn rm(&self) -> &RmHandle {
        self.rm.as_ref().expect("the resource manager is running")
    }

    /// Where clients connect: the server's TCP listener (or its Unix socket without one).
    pub fn url(&self) -> ServerUrl {
        self.server().url()
    }

    /// Region ids the resource manager has handed out and not got back, sorted.
    pub fn rm_region_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .rm()
            .list()
            .into_iter()
            .map(|a| a.handle.region_id)
            .collect();
        ids.sort();
        ids
    }

    pub fn stats(&self) -> ServerStats {
        self.server().stats()
    }
}

impl Drop for InProcessCluster {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
        if let Some(rm) = self.rm.take() {
            rm.shutdown();
        }
    }
}
