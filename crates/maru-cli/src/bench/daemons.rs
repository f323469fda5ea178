//! The daemons a benchmark runs against: embedded in this process (a resource manager and a
//! metadata server on a temporary shm pool, like `maru up`, on ports the OS picks), or a
//! server the user names. Also the clean-up that must happen however the run ends: no pool
//! file, socket or child process is left behind, even on Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use maru_shm::HUGE_PAGE_SIZE;

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

/// The daemons a run measures: a resource manager and a metadata server on a temporary pool,
/// in this process (like `maru up`, the default), or in a `maru up` child process (what a
/// deployment looks like: the client and the server are different processes).
pub struct Embedded {
    rm: Option<maru_resource_manager::RmHandle>,
    server: Option<maru_server::ServerHandle>,
    child: Option<std::process::Child>,
    pub tcp_url: String,
    pub unix_url: String,
    /// The process the server runs in (for its memory).
    pub pid: u32,
    // Last: removed after both daemons stopped.
    _dir: Scratch,
}

impl Embedded {
    /// Starts both daemons in this process on a `pool_bytes` pool under `pool_dir` (sparse:
    /// only regions that are populated take memory).
    pub fn start(pool_dir: &Path, pool_bytes: u64, tag: &str) -> anyhow::Result<Embedded> {
        let dir = Scratch::new(pool_dir, tag)?;
        let pool_bytes = pool_bytes.div_ceil(HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE;
        let pool_path = dir.path.join("bench.pool");
        let state = dir.path.join("state");
        std::fs::create_dir_all(&state)?;
        let spec = format!("shm:{}:{}", pool_path.display(), pool_bytes);
        let mut rm_cfg = maru_resource_manager::RmConfig::new(
            state,
            vec![spec.parse().map_err(|e| anyhow::anyhow!("{e}"))?],
        );
        rm_cfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let rm =
            maru_resource_manager::start(rm_cfg).context("resource manager failed to start")?;
        let sock = dir.path.join("server.sock");
        let server = maru_server::start(maru_server::ServerConfig {
            tcp: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            unix: Some(sock.clone()),
            rm_url: rm.url(),
            max_clients: 1024,
            ..Default::default()
        });
        let server = match server {
            Ok(s) => s,
            Err(e) => {
                rm.shutdown();
                return Err(e).context("metadata server failed to start");
            }
        };
        let tcp = server
            .tcp_addr()
            .context("the embedded server has no TCP address")?;
        Ok(Embedded {
            tcp_url: format!("tcp://{tcp}"),
            unix_url: format!("unix://{}", sock.display()),
            rm: Some(rm),
            server: Some(server),
            child: None,
            pid: std::process::id(),
            _dir: dir,
        })
    }

    /// Starts `maru up` (this executable) as a child process on a temporary pool; the child
    /// inherits the calling thread's CPU placement.
    pub fn start_process(pool_dir: &Path, pool_bytes: u64, tag: &str) -> anyhow::Result<Embedded> {
        let dir = Scratch::new(pool_dir, tag)?;
        let ready = dir.path.join("ready.json");
        let exe = std::env::current_exe().context("cannot find the maru executable")?;
        let mut child = std::process::Command::new(exe)
            .args(["up", "--port", "0", "--rm-port", "0", "--log-level", "warn"])
            .arg("--pool-size")
            .arg(pool_bytes.to_string())
            .arg("--pool-dir")
            .arg(&dir.path)
            .arg("--state-dir")
            .arg(dir.path.join("state"))
            .arg("--ready-file")
            .arg(&ready)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("cannot start maru up")?;
        track_child(child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&ready) {
                break t;
            }
            if let Ok(Some(status)) = child.try_wait() {
                untrack_child(child.id());
                anyhow::bail!("maru up exited at start: {status}");
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                untrack_child(child.id());
                anyhow::bail!("maru up was not ready within 30 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let url = |k: &str| {
            v[k].as_str()
                .map(str::to_owned)
                .with_context(|| format!("maru up's ready file has no {k}"))
        };
        Ok(Embedded {
            tcp_url: url("tcp")?,
            unix_url: url("unix")?,
            pid: child.id(),
            rm: None,
            server: None,
            child: Some(child),
            _dir: dir,
        })
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
        if let Some(r) = self.rm.take() {
            r.shutdown();
        }
        if let Some(mut c) = self.child.take() {
            // SIGTERM: `maru up` says goodbye to its clients and removes its pool file.
            // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while matches!(c.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
            untrack_child(c.id());
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
