//! A resource manager and a metadata server as real processes ([`BinaryCluster`]), and the
//! admin reads tests make of them.

use std::path::{Path, PathBuf};
use std::process::Command;

use maru_proto::stats::{RmStats, ServerStats};
use maru_proto::{RegionRecord, Request, Response, RmAllocation, Role, ServerUrl};
use maru_resource_manager::RmClient;
use maru_transport::BlockingConn;

use crate::daemon::{Daemon, RmSpec, ServerSpec};
use crate::process::free_port;
use crate::{pool_path, temp_dir, MIB, TIMEOUT};

/// Spawns with a few retries on a fresh port when the chosen one was taken meanwhile (the
/// ports are picked free, then bound by another process: a small race with parallel tests).
fn spawn_on_fixed_port(
    dir: &Path,
    name: &str,
    mut port: u16,
    fixed: bool,
    mut make: impl FnMut(u16) -> Command,
) -> (Daemon, u16) {
    let mut last = String::new();
    for _ in 0..3 {
        match Daemon::spawn(make(port), dir, name) {
            Ok(d) => return (d, port),
            Err(e) if !fixed && e.contains("in use") => {
                last = e;
                port = free_port();
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("{name}: no free port after 3 tries: {last}");
}

/// A resource manager and a metadata server, real processes, on fixed ports (so either can
/// be restarted on the same address after a crash) with one shm pool and a Unix socket.
pub struct BinaryCluster {
    pub rm: Daemon,
    pub server: Daemon,
    pub rm_spec: RmSpec,
    pub server_spec: ServerSpec,
    /// Path of the pool file.
    pub pool: PathBuf,
    pub sock: PathBuf,
    /// Dropped last: holds the pool, state, socket and logs.
    pub dir: tempfile::TempDir,
}

/// Options of [`BinaryCluster::start`].
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    pub pool_bytes: u64,
    pub rm_extra: Vec<String>,
    pub server_extra: Vec<String>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            pool_bytes: 256 * MIB,
            rm_extra: Vec::new(),
            server_extra: Vec::new(),
        }
    }
}

impl BinaryCluster {
    pub fn start(opts: ClusterOpts) -> BinaryCluster {
        let dir = temp_dir();
        let pool = PathBuf::from(pool_path(dir.path(), "p0"));
        let rm_spec = RmSpec {
            port: free_port(),
            extra: opts.rm_extra,
            ..RmSpec::new(
                dir.path(),
                vec![format!("shm:{}:{}", pool.display(), opts.pool_bytes)],
            )
        };
        let mut rm_spec2 = rm_spec.clone();
        let (rm, rm_port) = spawn_on_fixed_port(dir.path(), "rm", rm_spec.port, false, |p| {
            rm_spec2.port = p;
            rm_spec2.command()
        });
        let rm_spec = RmSpec {
            port: rm_port,
            ..rm_spec
        };
        let sock = dir.path().join("server.sock");
        // The metadata server reaches its resource manager over the latter's Unix socket (in
        // the state directory), as on a production host: the kernel vouches for its pid.
        let server_spec = ServerSpec {
            port: free_port(),
            unix: Some(sock.clone()),
            extra: opts.server_extra,
            ..ServerSpec::new(format!("unix://{}", rm_spec.unix_socket().display()))
        }
        .with_index_at(&dir.path().join("server.index"));
        let mut s2 = server_spec.clone();
        let (server, sport) =
            spawn_on_fixed_port(dir.path(), "server", server_spec.port, false, |p| {
                s2.port = p;
                s2.command()
            });
        BinaryCluster {
            rm,
            server,
            rm_spec,
            server_spec: ServerSpec {
                port: sport,
                ..server_spec
            },
            pool,
            sock,
            dir,
        }
    }

    /// Starts the resource manager again on the same port and state directory (after
    /// [`Daemon::kill`] or [`Daemon::terminate`]).
    pub fn restart_rm(&mut self) {
        self.rm.kill();
        let spec = self.rm_spec.clone();
        self.rm = spawn_on_fixed_port(self.dir.path(), "rm", spec.port, true, |_| spec.command()).0;
    }

    /// Starts the metadata server again on the same port and Unix socket.
    pub fn restart_server(&mut self) {
        self.server.kill();
        let spec = self.server_spec.clone();
        self.server = spawn_on_fixed_port(self.dir.path(), "server", spec.port, true, |_| {
            spec.command()
        })
        .0;
    }

    /// `host:port` of the resource manager (stable across restarts).
    pub fn rm_addr(&self) -> String {
        format!("127.0.0.1:{}", self.rm_spec.port)
    }

    /// `host:port` of the metadata server's TCP listener (stable across restarts).
    pub fn server_addr(&self) -> String {
        format!("127.0.0.1:{}", self.server_spec.port)
    }

    /// `tcp://` URL of the metadata server.
    pub fn server_url(&self) -> String {
        format!("tcp://{}", self.server_addr())
    }

    /// `unix://` URL of the metadata server.
    pub fn unix_url(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    pub fn rm_url(&self) -> ServerUrl {
        ServerUrl::Tcp(self.rm_addr())
    }

    /// An operator connection to the resource manager (reads only).
    pub fn rm_admin(&self) -> RmClient {
        rm_admin(&self.rm_url())
    }

    pub fn rm_stats(&self) -> RmStats {
        self.rm_admin().stats().expect("rm stats")
    }

    /// The resource manager's table, sorted by region id.
    pub fn rm_list(&self) -> Vec<RmAllocation> {
        let mut v = self.rm_admin().list().expect("rm list");
        v.sort_by_key(|a| a.handle.region_id);
        v
    }

    /// Region ids the resource manager has out, sorted.
    pub fn rm_region_ids(&self) -> Vec<u64> {
        self.rm_list().iter().map(|a| a.handle.region_id).collect()
    }

    /// An operator connection to the metadata server, over its Unix socket (which needs no
    /// cluster secret, whatever its TCP listener requires).
    pub fn server_admin(&self) -> BlockingConn {
        admin_conn(&ServerUrl::Unix(self.sock.clone()))
    }

    pub fn server_stats(&self) -> ServerStats {
        server_stats(&mut self.server_admin())
    }

    /// The metadata server's region table, sorted by region id.
    pub fn server_regions(&self) -> Vec<RegionRecord> {
        server_regions(&mut self.server_admin())
    }
}

/// An operator (read-only) connection to a resource manager.
pub fn rm_admin(url: &ServerUrl) -> RmClient {
    RmClient::connect(url, Role::Admin, TIMEOUT)
        .unwrap_or_else(|e| panic!("admin connection to the resource manager at {url}: {e}"))
}

/// An admin (read-only) connection to a metadata server.
pub fn admin_conn(url: &ServerUrl) -> BlockingConn {
    BlockingConn::connect_admin(url, TIMEOUT)
        .unwrap_or_else(|e| panic!("admin connection to {url}: {e}"))
}

pub fn server_stats(c: &mut BlockingConn) -> ServerStats {
    match c.call(&Request::Stats).expect("server stats") {
        Response::Stats(json) => serde_json::from_str(&json).expect("stats JSON"),
        other => panic!("stats answered {other:?}"),
    }
}

/// A metadata server's region table, sorted by region id.
pub fn server_regions(c: &mut BlockingConn) -> Vec<RegionRecord> {
    match c.call(&Request::ListAllocations).expect("list allocations") {
        Response::Allocations(mut v) => {
            v.sort_by_key(|r| r.handle.region_id);
            v
        }
        other => panic!("list allocations answered {other:?}"),
    }
}
