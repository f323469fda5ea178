//! The real daemons as child processes, and a [`Cluster`] of one resource manager and one
//! metadata server on a shm pool in a temp dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use maru_proto::stats::{RmStats, ServerStats};
use maru_proto::{RegionRecord, Request, Response, RmAllocation, Role, ServerUrl};
use maru_resource_manager::RmClient;
use maru_transport::BlockingConn;

use crate::{binary, free_port, temp_dir, wait_until, MIB};

/// How long a daemon may take to write its ready file.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// Bound of every admin call the harness makes.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A daemon process, started with `--ready-file` and considered up once that file parses.
/// Dropping it kills it (a test that panics leaves nothing running).
pub struct Daemon {
    pub name: String,
    child: Child,
    pub ready: serde_json::Value,
    pub stderr: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` (stdout discarded, stderr to `dir/<name>.<n>.stderr`) with
    /// `--ready-file` and waits for the file. `Err` carries the daemon's stderr when it exits
    /// before being ready.
    pub fn spawn(mut cmd: Command, dir: &Path, name: &str) -> Result<Daemon, String> {
        crate::die_with_parent(&mut cmd);
        cmd.stdout(Stdio::null());
        let started = maru_testkit::spawn_ready(cmd, dir, name, READY_WITHIN)?;
        Ok(Daemon {
            name: name.to_owned(),
            child: started.child,
            ready: started.ready,
            stderr: started.stderr,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `host:port` of the TCP listener, from the ready file.
    pub fn tcp(&self) -> String {
        self.ready["tcp"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no tcp address in {}", self.name, self.ready))
            .to_owned()
    }

    pub fn url(&self) -> ServerUrl {
        ServerUrl::Tcp(self.tcp())
    }

    /// Still running (not exited, not killed)?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How it ended, if it did.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL: a crash; nothing is flushed, checkpointed or said goodbye to.
    pub fn kill(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        // SAFETY: kill(2) on a child we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM {}", self.name);
        let mut status = None;
        let stopped = wait_until(Duration::from_secs(15), || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        if !stopped {
            self.kill();
            panic!("{} did not stop within 15 s of SIGTERM", self.name);
        }
        status.expect("exit status")
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How to start a resource manager.
#[derive(Debug, Clone)]
pub struct RmSpec {
    pub port: u16,
    pub state_dir: PathBuf,
    /// `--pool` values.
    pub pools: Vec<String>,
    pub extra: Vec<String>,
    /// Run it inside this process's mount namespace (see [`crate::ns`]).
    pub mntns_holder: Option<u32>,
}

impl RmSpec {
    pub fn command(&self) -> Command {
        let bin = binary("maru-resource-manager");
        let mut cmd = match self.mntns_holder {
            Some(pid) => {
                let mut c = Command::new("nsenter");
                c.arg("-t")
                    .arg(pid.to_string())
                    .arg("-m")
                    .arg("--")
                    .arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(["--log-level", "warn", "--port"])
            .arg(self.port.to_string())
            .arg("--state-dir")
            .arg(&self.state_dir);
        for p in &self.pools {
            cmd.arg("--pool").arg(p);
        }
        cmd.args(&self.extra);
        cmd
    }
}

/// How to start a metadata server.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub port: u16,
    pub unix: Option<PathBuf>,
    pub rm_address: String,
    pub extra: Vec<String>,
}

impl ServerSpec {
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(binary("maru-server"));
        cmd.args(["--log-level", "warn", "--port"])
            .arg(self.port.to_string())
            .arg("--rm-address")
            .arg(&self.rm_address);
        if let Some(u) = &self.unix {
            cmd.arg("--unix").arg(u);
        }
        cmd.args(&self.extra);
        cmd
    }
}

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
/// be restarted on the same address after a crash) with one shm pool.
pub struct Cluster {
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

/// Options of [`Cluster::start`].
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

impl Cluster {
    pub fn start(opts: ClusterOpts) -> Cluster {
        let dir = temp_dir();
        let pool = dir.path().join("pools").join("p0");
        let rm_spec = RmSpec {
            port: free_port(),
            state_dir: dir.path().join("state"),
            pools: vec![format!("shm:{}:{}", pool.display(), opts.pool_bytes)],
            extra: opts.rm_extra,
            mntns_holder: None,
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
        let server_spec = ServerSpec {
            port: free_port(),
            unix: Some(sock.clone()),
            rm_address: format!("127.0.0.1:{rm_port}"),
            extra: opts.server_extra,
        };
        let mut s2 = server_spec.clone();
        let (server, sport) =
            spawn_on_fixed_port(dir.path(), "server", server_spec.port, false, |p| {
                s2.port = p;
                s2.command()
            });
        Cluster {
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

    /// `tcp://` URL of the metadata server (stable across restarts).
    pub fn server_url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.server_spec.port)
    }

    /// `unix://` URL of the metadata server.
    pub fn unix_url(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    pub fn rm_url(&self) -> ServerUrl {
        ServerUrl::Tcp(format!("127.0.0.1:{}", self.rm_spec.port))
    }

    /// An operator connection to the resource manager (reads only).
    pub fn rm_admin(&self) -> RmClient {
        RmClient::connect(&self.rm_url(), Role::Admin, ADMIN_TIMEOUT)
            .unwrap_or_else(|e| panic!("admin connection to the resource manager: {e}"))
    }

    pub fn rm_stats(&self) -> RmStats {
        self.rm_admin().stats().expect("rm stats")
    }

    pub fn rm_list(&self) -> Vec<RmAllocation> {
        let mut v = self.rm_admin().list().expect("rm list");
        v.sort_by_key(|a| a.handle.region_id);
        v
    }

    /// Region ids the resource manager has out, sorted.
    pub fn rm_region_ids(&self) -> Vec<u64> {
        self.rm_list().iter().map(|a| a.handle.region_id).collect()
    }

    /// An operator connection to the metadata server.
    pub fn server_admin(&self) -> BlockingConn {
        admin_conn(&ServerUrl::Tcp(format!(
            "127.0.0.1:{}",
            self.server_spec.port
        )))
    }

    pub fn server_stats(&self) -> ServerStats {
        server_stats(&mut self.server_admin())
    }

    /// The metadata server's region table, sorted by region id.
    pub fn server_regions(&self) -> Vec<RegionRecord> {
        server_regions(&mut self.server_admin())
    }
}

/// An admin (read-only) connection to a metadata server.
pub fn admin_conn(url: &ServerUrl) -> BlockingConn {
    BlockingConn::connect_admin(url, ADMIN_TIMEOUT)
        .unwrap_or_else(|e| panic!("admin connection to {url}: {e}"))
}

pub fn server_stats(c: &mut BlockingConn) -> ServerStats {
    match c.call(&Request::Stats).expect("server stats") {
        Response::Stats(json) => serde_json::from_str(&json).expect("stats JSON"),
        other => panic!("stats answered {other:?}"),
    }
}

pub fn server_regions(c: &mut BlockingConn) -> Vec<RegionRecord> {
    match c.call(&Request::ListAllocations).expect("list allocations") {
        Response::Allocations(mut v) => {
            v.sort_by_key(|r| r.handle.region_id);
            v
        }
        other => panic!("list allocations answered {other:?}"),
    }
}
