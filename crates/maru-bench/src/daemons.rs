//! The daemons a benchmark runs against when no server is named: a resource manager and a
//! metadata server on a temporary shm pool, on ports the OS picks, in this process (like
//! `maru up`) or in a worker process. Also the clean-up that must happen however the run
//! ends: no pool file, socket or child process is left behind, even on Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use maru_shm::HUGE_PAGE_SIZE;

use crate::worker::{Launcher, Serving, Spec, Worker};

/// Directories to remove and child processes to kill if the run is interrupted.
static CLEANUP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static CHILD_PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn track_dir(p: &Path) {
    lock(&CLEANUP_DIRS).push(p.to_owned());
}
pub fn untrack_dir(p: &Path) {
    lock(&CLEANUP_DIRS).retain(|d| d != p);
}
pub fn track_child(pid: u32) {
    lock(&CHILD_PIDS).push(pid);
}
pub fn untrack_child(pid: u32) {
    lock(&CHILD_PIDS).retain(|&p| p != pid);
}

/// On SIGINT/SIGTERM: kill our children, remove our scratch directories, exit. A handler
/// thread (signal-hook's self-pipe) rather than blocked signals, because a blocked mask
/// would be inherited by the children (Redis, Python, workers) and they could not be stopped.
pub fn install_interrupt_cleanup() -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                eprintln!("maru bench: signal {sig}: cleaning up");
                for pid in lock(&CHILD_PIDS).drain(..) {
                    // SAFETY: kill has no memory-safety preconditions; the pids are children we
                    // spawned and have not reaped, so they cannot have been reused.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
                for d in lock(&CLEANUP_DIRS).drain(..) {
                    let _ = std::fs::remove_dir_all(d);
                }
                std::process::exit(128 + sig);
            }
        })?;
    Ok(())
}

/// A scratch directory (on `/dev/shm` by default) removed on drop and on interrupt.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(parent: &Path, tag: &str) -> anyhow::Result<Scratch> {
        let path = parent.join(format!("maru-bench-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        track_dir(&path);
        Ok(Scratch { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        untrack_dir(&self.path);
    }
}

/// A resource manager and a metadata server in this process, on a pool file in a directory
/// someone else removes; both stop on drop.
pub struct InProcess {
    rm: Option<maru_resource_manager::RmHandle>,
    server: Option<maru_server::ServerHandle>,
    pub tcp_url: String,
    pub unix_url: String,
    /// Where the state and the socket live when `dir` is a hugetlbfs (which holds mappable
    /// files only: it refuses `write`).
    _side: Option<Scratch>,
}

impl InProcess {
    /// Starts both daemons on a `pool_bytes` pool in `dir` (sparse: only regions that are
    /// populated take memory), on ports the OS picks and a Unix socket in `dir`.
    pub fn start(dir: &Path, pool_bytes: u64) -> anyhow::Result<InProcess> {
        let pool_bytes = pool_bytes.div_ceil(HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE;
        let pool_path = dir.join("bench.pool");
        let side = match maru_shm::fs_page_size(dir) {
            Ok(HUGE_PAGE_SIZE) => Some(Scratch::new(&std::env::temp_dir(), "state")?),
            _ => None,
        };
        let dir = side.as_ref().map_or(dir, |s| s.path.as_path());
        let state = dir.join("state");
        std::fs::create_dir_all(&state)?;
        let spec = format!("shm:{}:{}", pool_path.display(), pool_bytes);
        let mut rm_cfg = maru_resource_manager::RmConfig::new(
            state,
            vec![spec.parse().map_err(|e| anyhow::anyhow!("{e}"))?],
        );
        rm_cfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let rm =
            maru_resource_manager::start(rm_cfg).context("resource manager failed to start")?;
        let sock = dir.join("server.sock");
        let server = maru_server::start(maru_server::ServerConfig {
            tcp: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            unix: Some(sock.clone()),
            rm_url: rm.url(),
            max_clients: 1024,
            // As `maru up` runs it: with the key index (on tmpfs, beside the state), gone with
            // the run.
            index: Some(maru_server::IndexConfig {
                ephemeral: true,
                ..maru_server::IndexConfig::at(dir.join("server.index"))
            }),
            ..Default::default()
        });
        let server = match server {
            Ok(s) => s,
            Err(e) => {
                rm.shutdown();
                return Err(e).context("metadata server failed to start");
            }
        };
        let Some(tcp) = server.tcp_addr() else {
            server.shutdown();
            rm.shutdown();
            anyhow::bail!("the embedded server has no TCP address");
        };
        Ok(InProcess {
            tcp_url: format!("tcp://{tcp}"),
            unix_url: format!("unix://{}", sock.display()),
            rm: Some(rm),
            server: Some(server),
            _side: side,
        })
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
        if let Some(r) = self.rm.take() {
            r.shutdown();
        }
    }
}

/// Where the embedded daemons of a run live.
enum Host {
    /// In this process, like `maru up` (the default).
    ThisProcess(Box<InProcess>),
    /// In a worker process: the client and the server are different processes, as deployed.
    Worker(Worker),
}

/// The daemons a run measures, on a temporary pool in a scratch directory of their own.
pub struct Embedded {
    host: Option<Host>,
    pub tcp_url: String,
    pub unix_url: String,
    /// The process the server runs in (for its memory).
    pub pid: u32,
    // Last: removed after both daemons stopped.
    _dir: Scratch,
}

impl Embedded {
    /// Starts both daemons in this process on a `pool_bytes` pool under `pool_dir`.
    pub fn start(pool_dir: &Path, pool_bytes: u64, tag: &str) -> anyhow::Result<Embedded> {
        let dir = Scratch::new(pool_dir, tag)?;
        let daemons = InProcess::start(&dir.path, pool_bytes)?;
        Ok(Embedded {
            tcp_url: daemons.tcp_url.clone(),
            unix_url: daemons.unix_url.clone(),
            pid: std::process::id(),
            host: Some(Host::ThisProcess(Box::new(daemons))),
            _dir: dir,
        })
    }

    /// Starts both daemons in a worker process (which inherits the calling thread's CPU
    /// placement); the pool lives in this process's scratch directory, so an interrupted run
    /// removes it as it removes its own files.
    pub fn start_process(
        launcher: &Launcher,
        pool_dir: &Path,
        pool_bytes: u64,
        tag: &str,
    ) -> anyhow::Result<Embedded> {
        let dir = Scratch::new(pool_dir, tag)?;
        let spec = Spec::Serve {
            dir: dir.path.clone(),
            pool_bytes,
        };
        let mut worker = Worker::spawn(launcher, &spec)?;
        let line = worker.line().context("the daemons' worker did not start")?;
        let serving: Serving = serde_json::from_str(&line)
            .with_context(|| format!("the daemons' worker said {line:?}"))?;
        Ok(Embedded {
            tcp_url: serving.tcp,
            unix_url: serving.unix,
            pid: serving.pid,
            host: Some(Host::Worker(worker)),
            _dir: dir,
        })
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        match self.host.take() {
            Some(Host::ThisProcess(daemons)) => drop(daemons),
            // Closing its stdin stops the worker's daemons: they say goodbye to their clients.
            Some(Host::Worker(worker)) => {
                if let Err(e) = worker.finish() {
                    eprintln!("maru bench: the daemons' worker: {e:#}");
                }
            }
            None => {}
        }
    }
}

/// A hugetlbfs mount, if this machine has one (2 MiB pages make populating ~10x cheaper).
pub fn hugetlbfs_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "hugetlbfs").then(|| PathBuf::from(dir))
    })
}

/// Anonymous resident memory of process `pid` (heap, stacks), in bytes: what the server's
/// tables cost, without the shared-memory pages mapped by clients in the same process.
pub fn rss_anon_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
