//! Listeners, connection threads, the maintenance thread, and orderly shutdown.
//!
//! I/O model: blocking sockets and one thread per connection (measured in FACTS.md: 0.3–0.9 µs
//! over a raw echo, against 1.1–3 µs for tokio). A metadata server serves tens of inference
//! processes, not thousands, and `max_clients` bounds the threads.

use std::collections::HashMap;
use std::fs::Permissions;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use maru_proto::stats::ServerStats;
use maru_proto::ServerUrl;
use maru_telemetry::MetricsServer;
use maru_transport::Stream;

use crate::conn::{self, READ_TICK, WRITE_TIMEOUT};
use crate::rm::{RegionSource, RemoteRm};
use crate::state::ServerState;

/// How long one resource-manager call may take before the server calls it unreachable.
const RM_TIMEOUT: Duration = Duration::from_secs(5);
/// How often frees that failed (resource manager down) are retried.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How often an idle server checks that the resource manager is still there.
const PING_EVERY: Duration = Duration::from_secs(5);
/// How often the resource manager's list of this server's regions is compared with the
/// region table (and regions the table does not know are freed), besides right after an
/// allocation whose outcome is unknown.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);
/// How long a new connection may take to complete its Hello before it is closed and its
/// slot freed: without a bound, `max_clients` connections that never speak lock every real
/// client out. Handshaken connections may stay idle (clients keep pooled connections).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Mode of the Unix socket whatever the umask: owner and group may connect (like the pool
/// file), others may not.
const UNIX_SOCKET_MODE: u32 = 0o660;
/// Connections over the client limit that may be waiting for their refusal at once; more are
/// closed without a word.
const MAX_REFUSING: usize = 8;

/// How to run a metadata server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// TCP listener (`--host`/`--port`); `None` for a Unix-socket-only server.
    pub tcp: Option<SocketAddr>,
    /// Additional Unix-socket listener (same-host clients get lower latency on it).
    pub unix: Option<PathBuf>,
    /// The resource manager regions come from.
    pub rm_url: ServerUrl,
    /// Pools to allocate regions from, in order of preference: the next pool is tried only
    /// when the previous one has no room. Empty: the resource manager chooses.
    pub pools: Vec<String>,
    /// Most connections served at once (all roles).
    pub max_clients: usize,
    /// Name reported to clients in the handshake (default: this machine's hostname).
    pub hostname: Option<String>,
    /// Prometheus endpoint (`GET /metrics`), if any.
    pub metrics: Option<SocketAddr>,
    /// How long a new connection may take to complete its Hello before it is closed
    /// (default [`HANDSHAKE_TIMEOUT`]).
    pub handshake_timeout: Duration,
    /// After answering, how long a connection thread polls for the next request before it
    /// sleeps (see `spin.rs`; default [`BUSY_POLL`]). Zero: never spin.
    pub busy_poll: Duration,
}

/// Default of [`ServerConfig::busy_poll`]: a 1 MiB copy plus a store call fits in it.
pub const BUSY_POLL: Duration = Duration::from_micros(50);

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tcp: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5555)),
            unix: None,
            rm_url: ServerUrl::Tcp("127.0.0.1:9850".into()),
            pools: Vec::new(),
            max_clients: 256,
            hostname: None,
            metrics: None,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            busy_poll: BUSY_POLL,
        }
    }
}

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
}

/// What every thread of a server shares.
pub(crate) struct Shared {
    pub state: ServerState,
    shutting_down: AtomicBool,
    max_clients: usize,
    /// How long a connection may stay without a completed Hello.
    pub handshake_timeout: Duration,
    /// See [`ServerConfig::busy_poll`].
    pub busy_poll: Duration,
    conns: Mutex<Conns>,
    /// Wakes the maintenance thread early at shutdown.
    maintenance: (Mutex<bool>, Condvar),
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    /// Served connections (a clone of each stream, so shutdown can unblock its thread).
    open: HashMap<u64, Stream>,
    refusing: usize,
    threads: Vec<JoinHandle<()>>,
}

impl Shared {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a freshly accepted connection: serve it, or refuse it when the server is full.
    fn admit(self: &Arc<Self>, stream: Stream) {
        // Socket options first: every connection thread must wake up regularly (to notice
        // shutdown) and must not block forever on a peer that stops reading.
        if stream.set_read_timeout(Some(READ_TICK)).is_err()
            || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
        {
            return;
        }
        let mut conns = self.conns();
        conns.threads.retain(|t| !t.is_finished());
        let full = conns.open.len() >= self.max_clients;
        if full && conns.refusing >= MAX_REFUSING {
            return;
        }
        let id = conns.next_id;
        conns.next_id += 1;
        let Ok(clone) = stream.try_clone() else {
            return;
        };
        let shared = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("maru-conn-{id}"))
            .spawn(move || {
                if full {
                    conn::refuse(stream, shared.max_clients);
                    shared.conns().refusing -= 1;
                } else {
                    conn::serve(&shared, stream);
                    shared.conns().open.remove(&id);
                }
            });
        match spawned {
            Ok(t) => {
                if full {
                    conns.refusing += 1;
                } else {
                    conns.open.insert(id, clone);
                }
                conns.threads.push(t);
            }
            Err(e) => tracing::warn!("cannot start a connection thread: {e}"),
        }
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
    let rm = RemoteRm::new(cfg.rm_url.clone(), RM_TIMEOUT);
    start_with(cfg, Box::new(rm))
}

pub(crate) fn start_with(
    cfg: ServerConfig,
    rm: Box<dyn RegionSource>,
) -> Result<ServerHandle, ServerError> {
    if cfg.tcp.is_none() && cfg.unix.is_none() {
        return Err(ServerError::NoListener);
    }
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
    let unix = match &cfg.unix {
        Some(path) => Some(bind_unix(path)?),
        None => None,
    };
    let hostname = cfg
        .hostname
        .clone()
        .unwrap_or_else(|| maru_transport::local_identity().0);
    let shared = Arc::new(Shared {
        state: ServerState::new(rm, cfg.pools.clone(), hostname),
        shutting_down: AtomicBool::new(false),
        max_clients: cfg.max_clients.max(1),
        handshake_timeout: cfg.handshake_timeout,
        busy_poll: cfg.busy_poll,
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
        handle.spawn("maru-accept-tcp", move || {
            accept_loop(&s, || {
                let (stream, _) = listener.accept()?;
                stream.set_nodelay(true)?;
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

/// Binds a Unix socket, replacing a stale socket file left by a dead server but never one a
/// live server still answers on.
fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    let bind_err = |source| ServerError::BindUnix {
        path: path.to_owned(),
        source,
    };
    match listen_unix(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::UnixInUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(bind_err)?;
            listen_unix(path).map_err(bind_err)
        }
        Err(e) => Err(bind_err(e)),
    }
}

/// `UnixListener::bind` in three steps — socket and bind, chmod to [`UNIX_SOCKET_MODE`],
/// listen — so the socket file has its mode before anyone can connect (a connect before
/// `listen` is refused), whatever the umask leaves at bind time.
fn listen_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data, for which all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a Unix socket path must be shorter than {} bytes, without NUL",
                addr.sun_path.len()
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len =
        (std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns; OwnedFd closes it on every path.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised sockaddr_un and `len` (path plus its NUL, checked
    // above to fit) does not exceed its size; the kernel only reads it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let listening = std::fs::set_permissions(path, Permissions::from_mode(UNIX_SOCKET_MODE))
        .and_then(|()| {
            // SAFETY: listen(2) on the bound socket this function owns.
            match unsafe { libc::listen(fd.as_raw_fd(), libc::SOMAXCONN) } {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            }
        });
    if let Err(e) = listening {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

fn accept_loop(shared: &Arc<Shared>, mut accept: impl FnMut() -> io::Result<Stream>) {
    loop {
        let accepted = accept();
        if shared.is_shutting_down() {
            break;
        }
        match accepted {
            Ok(stream) => shared.admit(stream),
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Retries failed frees, pings the resource manager now and then so a lost connection is
/// noticed (and logged) before a client's request needs it, and reconciles the resource
/// manager's list of this server's regions with the region table (right after an allocation
/// whose outcome is unknown, and every [`RECONCILE_EVERY`]).
fn maintenance_loop(shared: &Shared) {
    let (lock, cvar) = &shared.maintenance;
    let mut rm_up = shared.state.ping_rm(true);
    let mut last_ping = Instant::now();
    let mut last_reconcile = Instant::now();
    let mut stop = lock.lock().unwrap_or_else(|e| e.into_inner());
    while !*stop {
        let (guard, _) = cvar
            .wait_timeout(stop, RETRY_EVERY)
            .unwrap_or_else(|e| e.into_inner());
        stop = guard;
        if *stop {
            break;
        }
        drop(stop);
        shared.state.retry_pending_frees();
        if last_ping.elapsed() >= PING_EVERY {
            rm_up = shared.state.ping_rm(rm_up);
            last_ping = Instant::now();
        }
        if shared.state.reconcile_due() || last_reconcile.elapsed() >= RECONCILE_EVERY {
            last_reconcile = Instant::now();
            if let Err(e) = shared.state.reconcile() {
                tracing::debug!("cannot reconcile regions with the resource manager now: {e}");
            }
        }
        stop = lock.lock().unwrap_or_else(|e| e.into_inner());
    }
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
    /// every region to the resource manager, removes the Unix socket file, joins all threads.
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
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // No new connections now. Unblock the open ones and wait for them.
        let threads = {
            let mut conns = shared.conns();
            for stream in conns.open.values() {
                let _ = stream.shutdown();
            }
            std::mem::take(&mut conns.threads)
        };
        for t in threads {
            let _ = t.join();
        }
        shared.state.free_everything();
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

/// An address a local client can connect to: a wildcard listener is reached on loopback.
fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}
