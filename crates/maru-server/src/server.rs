//! A server's life: binding its listeners, starting its threads (accept loops, the maintenance
//! thread, metrics), and an orderly shutdown.
//!
//! I/O model: blocking sockets and one thread per connection, because a blocking thread answers
//! a request 0.3–0.9 µs over a raw echo where tokio takes 1.1–3 µs (docs/ARCHITECTURE.md, I/O
//! model). A metadata server serves tens of inference processes, not thousands, and
//! `max_clients` bounds the threads.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use maru_proto::stats::ServerStats;
use maru_proto::ServerUrl;
use maru_telemetry::MetricsServer;
use maru_transport::{connectable, Stream};

use crate::admission::{accept_loop, Conns};
use crate::config::ServerConfig;
use crate::evictor::evictor_loop;
use crate::maintenance::maintenance_loop;
use crate::resource_manager::{RegionSource, RemoteRm};
use crate::state::ServerState;
use crate::unix_socket::bind_unix;

/// How long one resource-manager call may take before the server calls it unreachable.
const RM_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("no listener configured: give a TCP address, a Unix socket path, or both")]
    NoListener,
    #[error("cannot listen on {addr}: {source}")]
    BindTcp { addr: SocketAddr, source: io::Error },
    #[error("cannot listen on {path}: {source}")]
    BindUnix { path: PathBuf, source: io::Error },
    #[error("{path} is in use by a running server")]
    UnixInUse { path: PathBuf },
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics { addr: SocketAddr, source: io::Error },
    #[error("cannot start a thread: {0}")]
    Spawn(io::Error),
    #[error(transparent)]
    Eviction(#[from] crate::eviction::ConfigError),
    #[error("{0}")]
    Auth(String),
    /// The key index exists but is not a valid one: refused, left as it is.
    #[error("refusing to start: {0}")]
    IndexCorrupt(crate::state::IndexOpenError),
    #[error("key index: {0}")]
    Index(String),
}

impl ServerError {
    /// The process exit code for this error: 3 for a key index refused as corrupt (an
    /// operator must look at the file), 1 for anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            ServerError::IndexCorrupt(_) => 3,
            _ => 1,
        }
    }
}

/// What every thread of a server shares.
pub(crate) struct Shared {
    pub state: ServerState,
    pub shutting_down: AtomicBool,
    /// Most connections served at once (see `admission`).
    pub max_clients: usize,
    /// How long a connection may stay without a completed Hello.
    pub handshake_timeout: Duration,
    /// See [`ServerConfig::busy_poll`].
    pub busy_poll: Duration,
    /// What TCP connections must prove before their first frame (`None`: nothing).
    pub tcp_auth: Option<maru_transport::auth::Acceptor>,
    pub conns: Mutex<Conns>,
    /// Wakes the maintenance thread early at shutdown.
    pub maintenance: (Mutex<bool>, Condvar),
}

impl Shared {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// A running metadata server. Dropping it shuts it down like [`ServerHandle::shutdown`].
pub struct ServerHandle {
    shared: Arc<Shared>,
    tcp_addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
    threads: Vec<JoinHandle<()>>,
    /// Duplicates of the listening sockets, to wake the accept loops at shutdown: shutdown(2)
    /// of a listening socket makes a blocked accept return, whatever happened to its address
    /// (a Unix socket file deleted under us cannot be connected to any more).
    listener_wakers: Vec<OwnedFd>,
    metrics: Option<MetricsServer>,
    stopped: bool,
}

/// Starts a server: binds every listener (so an address in use is an error here, not later),
/// then serves on background threads.
pub fn start(cfg: ServerConfig) -> Result<ServerHandle, ServerError> {
    let secret = match &cfg.tcp_auth {
        maru_transport::auth::TcpAuth::Secret { secret, .. } => Some(secret.clone()),
        _ => None,
    };
    // Only a lasting index makes a restart worth waiting for: its keys name the regions.
    let identity = match &cfg.index {
        Some(ix) if !ix.ephemeral => {
            Some(crate::resource_manager::durable_identity(&ix.path).map_err(ServerError::Index)?)
        }
        _ => None,
    };
    let rm = RemoteRm::new(cfg.rm_url.clone(), RM_TIMEOUT)
        .with_secret(secret)
        .with_identity(identity);
    start_with(cfg, Box::new(rm))
}

pub(crate) fn start_with(
    cfg: ServerConfig,
    rm: Box<dyn RegionSource>,
) -> Result<ServerHandle, ServerError> {
    if cfg.tcp.is_none() && cfg.unix.is_none() {
        return Err(ServerError::NoListener);
    }
    cfg.eviction.validate()?;
    let tcp = match cfg.tcp {
        Some(addr) => {
            Some(TcpListener::bind(addr).map_err(|source| ServerError::BindTcp { addr, source })?)
        }
        None => None,
    };
    let tcp_addr = match &tcp {
        Some(l) => Some(l.local_addr().map_err(|source| {
            ServerError::BindTcp {
                addr: cfg
                    .tcp
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                source,
            }
        })?),
        None => None,
    };
    let tcp_auth = match tcp_addr {
        Some(addr) => cfg.tcp_auth.acceptor(addr).map_err(ServerError::Auth)?,
        None => None,
    };
    let unix = match &cfg.unix {
        Some(path) => Some(bind_unix(path)?),
        None => None,
    };
    let hostname = cfg
        .hostname
        .clone()
        .unwrap_or_else(|| maru_transport::local_identity().0);
    let mut state = ServerState::new(rm, cfg.pools.clone(), hostname, cfg.pin_ttl)
        .with_eviction(cfg.eviction.clone());
    if let Some(ix) = &cfg.index {
        let t0 = std::time::Instant::now();
        state = state.with_index(open_index(ix)?);
        if ix.hold_lanes > 0 {
            let path = ix.lanes_path();
            let lanes = maru_index::LaneFile::create(&path, ix.hold_lanes, ix.lane_slots)
                .map_err(|e| ServerError::Index(format!("cannot make the hold lanes: {e}")))?;
            state = state.with_lanes(lanes, ix.ephemeral);
        }
        if !ix.ephemeral {
            let mut file = ix.path.as_os_str().to_owned();
            file.push(".sessions");
            state = state.with_resume(file.into(), cfg.reconnect_grace);
        }
        let attached = t0.elapsed();
        let restored = state.restore_from_index().map_err(ServerError::Index)?;
        if restored != Default::default() {
            tracing::info!(
                keys = restored.keys,
                regions = restored.regions,
                dropped = restored.dropped,
                attach_s = attached.as_secs_f64(),
                rebuild_s = (t0.elapsed() - attached).as_secs_f64(),
                "keys restored from the key index (dropped: their regions are gone)"
            );
        }
    }
    let shared = Arc::new(Shared {
        state,
        shutting_down: AtomicBool::new(false),
        max_clients: cfg.max_clients.max(1),
        handshake_timeout: cfg.handshake_timeout,
        busy_poll: cfg.busy_poll,
        tcp_auth,
        conns: Mutex::new(Conns::default()),
        maintenance: (Mutex::new(false), Condvar::new()),
    });
    let mut handle = ServerHandle {
        shared: shared.clone(),
        tcp_addr,
        unix_path: cfg.unix.clone(),
        threads: Vec::new(),
        listener_wakers: Vec::new(),
        metrics: None,
        stopped: false,
    };
    // From here on, an error drops `handle`, which stops whatever already started.
    if let Some(listener) = tcp {
        handle
            .listener_wakers
            .push(listener.try_clone().map_err(ServerError::Spawn)?.into());
        let s = shared.clone();
        let dead_peer_after = cfg.dead_peer_after;
        handle.spawn("maru-accept-tcp", move || {
            accept_loop(&s, || {
                let (stream, _) = listener.accept()?;
                stream.set_nodelay(true)?;
                if let Err(e) = maru_transport::set_dead_peer_timeout(&stream, dead_peer_after) {
                    tracing::debug!("no dead-peer timeout on a connection: {e}");
                }
                Ok(Stream::Tcp(stream))
            })
        })?;
    }
    if let Some(listener) = unix {
        handle
            .listener_wakers
            .push(listener.try_clone().map_err(ServerError::Spawn)?.into());
        let s = shared.clone();
        handle.spawn("maru-accept-unix", move || {
            accept_loop(&s, || Ok(Stream::Unix(listener.accept()?.0)))
        })?;
    }
    let s = shared.clone();
    handle.spawn("maru-maintenance", move || maintenance_loop(&s))?;
    let s = shared.clone();
    handle.spawn("maru-evictor", move || evictor_loop(&s))?;
    if let Some(addr) = cfg.metrics {
        let s = shared.clone();
        let metrics = maru_telemetry::serve_metrics(addr, move || crate::metrics::render(&s.state))
            .map_err(|source| ServerError::Metrics { addr, source })?;
        handle.metrics = Some(metrics);
    }
    tracing::info!(
        tcp = ?handle.tcp_addr,
        unix = ?handle.unix_path,
        rm = %cfg.rm_url,
        "metadata server listening"
    );
    Ok(handle)
}

fn open_index(cfg: &crate::config::IndexConfig) -> Result<crate::state::KeyIndex, ServerError> {
    use crate::state::IndexOpenError;
    crate::state::KeyIndex::open(cfg).map_err(|e| match e {
        IndexOpenError::Corrupt(_) => ServerError::IndexCorrupt(e),
        IndexOpenError::Unusable(m) => ServerError::Index(m),
    })
}

impl ServerHandle {
    fn spawn(&mut self, name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), ServerError> {
        let t = std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(ServerError::Spawn)?;
        self.threads.push(t);
        Ok(())
    }

    /// The bound TCP address (with the port the OS picked for port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    pub fn unix_path(&self) -> Option<&Path> {
        self.unix_path.as_deref()
    }

    /// Where clients connect: the TCP listener if there is one, else the Unix socket.
    pub fn url(&self) -> ServerUrl {
        match (self.tcp_addr, &self.unix_path) {
            (Some(addr), _) => ServerUrl::Tcp(connectable(addr).to_string()),
            (None, Some(path)) => ServerUrl::Unix(path.clone()),
            (None, None) => ServerUrl::Tcp(String::new()),
        }
    }

    /// The bound metrics address, if metrics are served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.addr())
    }

    /// Statistics, including the resource manager's pools (or why they are missing).
    pub fn stats(&self) -> ServerStats {
        self.shared.state.stats()
    }

    /// The Prometheus exposition document.
    pub fn render_metrics(&self) -> String {
        crate::metrics::render(&self.shared.state)
    }

    /// Stops serving: closes every client connection (their instances are gone), returns
    /// every region to the resource manager (with a key index that outlives the server: every
    /// region no key names), removes the Unix socket file, joins all threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let shared = &self.shared;
        shared.shutting_down.store(true, Ordering::SeqCst);
        // Wake the accept loops: each sees the flag when its accept returns.
        for fd in self.listener_wakers.drain(..) {
            // SAFETY: `fd` is our own duplicate of a listening socket, open until it is
            // dropped at the end of this iteration; shutdown(2) changes the socket's state
            // only (its blocked accept fails with EINVAL), never memory.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
        {
            let (lock, cvar) = &shared.maintenance;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cvar.notify_all();
        }
        shared.state.capacity.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // No new connections now. Unblock the open ones and wait for them.
        for t in shared.close_connections() {
            let _ = t.join();
        }
        shared.state.shut_down_regions();
        self.metrics = None;
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("metadata server stopped");
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
