//! The Maru resource manager: the one process that owns shared-memory pools. It carves
//! regions out of them (first fit over aligned extents), hands out handles carrying a keyed
//! BLAKE3 auth token, logs every change to a write-ahead log before applying it, checkpoints,
//! and takes regions back from owners that died.
//!
//! It owns the pools, the allocation table with its WAL and checkpoints, and the token
//! secret; no other crate writes them. It knows nothing of keys, pages or KV bytes (those
//! are the metadata server's and the clients'): it hands out and takes back whole regions.
//!
//! Run it with [`start`] (in-process: tests, embedded mode) or the `maru-resource-manager`
//! binary ([`cli::main`]); talk to it with [`RmClient`].
//!
//! ```
//! use std::time::Duration;
//! use maru_proto::Role;
//! use maru_shm::PoolSpec;
//!
//! let dir = tempfile::Builder::new().prefix("maru-doc-").tempdir_in("/dev/shm").unwrap();
//! let pools = vec![PoolSpec::Shm { path: dir.path().join("pool0"), size: 64 << 20 }];
//! let mut cfg = maru_resource_manager::RmConfig::new(dir.path().join("state"), pools);
//! cfg.listen = "127.0.0.1:0".parse().unwrap(); // any free port
//! let rm = maru_resource_manager::start(cfg).unwrap();
//!
//! let mut c = maru_resource_manager::RmClient::connect(&rm.url(), Role::Server, Duration::from_secs(5)).unwrap();
//! let h = c.alloc(3 << 20, None).unwrap(); // rounded up to the 2 MiB alignment
//! assert_eq!(h.len, 4 << 20);
//! let access = c.get_access(&h).unwrap(); // mmap(access.path, access.offset, access.len)
//! assert_eq!(access.offset, h.offset);
//! c.free(&h).unwrap();
//! rm.shutdown();
//! ```

mod auth;
pub mod checkpoint;
pub mod cli;
mod client;
mod error;
pub mod extent;
mod health;
mod identity;
mod manager;
mod pool_header;
mod reaper;
mod server;
mod unix_socket;
pub mod wal;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use maru_proto::stats::RmStats;
use maru_proto::ServerUrl;
use maru_shm::PoolSpec;
use maru_telemetry::{gauge, MetricsServer, OpTable, PromWriter};

pub use checkpoint::{decode_checkpoint, encode_checkpoint, Checkpoint, CheckpointError};
pub use client::RmClient;
pub use error::{RmClientError, RmError};
pub use maru_proto::RmAllocation;
pub use wal::{decode_wal, encode_record, Allocation, Owner, WalError, WalOp, WalRecord, WalScan};

use manager::Manager;
use server::{lock, Shared};

/// Default TCP port of the resource manager.
pub const DEFAULT_PORT: u16 = 9850;

/// How long a connection may take to complete its Hello before it is closed (its slot
/// freed): without a bound, `max_clients` connections that never speak would lock every real
/// client out. Handshaken connections may then stay idle as long as they like.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default of [`RmConfig::server_grace`]: long enough for a supervisor to start a killed
/// metadata server again and for it to re-attach its key index.
pub const DEFAULT_SERVER_GRACE: Duration = Duration::from_secs(45);

/// How a resource manager runs.
#[derive(Debug, Clone)]
pub struct RmConfig {
    /// Where to accept connections (port 0: the OS picks, see [`RmHandle::addr`]).
    pub listen: SocketAddr,
    /// A Unix-socket listener besides TCP, for processes of this host: the kernel says who
    /// they are (`SO_PEERCRED`) and only this process's uid and root are served.
    pub unix: Option<PathBuf>,
    /// WAL, checkpoint, secret and lock live here; one resource manager per directory.
    pub state_dir: PathBuf,
    /// Pools to carve from. Empty: discover DEV_DAX devices and FS_DAX mounts.
    pub pools: Vec<PoolSpec>,
    /// How long a remote owner may stay disconnected before its regions are reclaimed.
    pub grace_period: Duration,
    /// How long the regions of a dead metadata server that has a durable identity wait for
    /// a successor presenting that identity to adopt them, before they are reclaimed.
    pub server_grace: Duration,
    /// Connections served at once; the next one is refused with `TooManyClients`.
    pub max_clients: usize,
    /// Operations between checkpoints (0: only at shutdown and after recovery).
    pub checkpoint_every: u64,
    /// How often the reaper looks for dead owners.
    pub reap_interval: Duration,
    /// This host's name as owners' Hellos give it (default: the kernel's hostname). Tests
    /// override it to make local processes look remote.
    pub hostname: Option<String>,
    /// Serve Prometheus metrics on this address.
    pub metrics: Option<SocketAddr>,
    /// How long a peer may take to finish a frame it started (slow-loris guard).
    pub stall_timeout: Duration,
    /// How long a new connection may take to complete its Hello before it is closed
    /// (default [`HANDSHAKE_TIMEOUT`]).
    pub handshake_timeout: Duration,
    /// How long a TCP peer's host may stay unreachable before its connections are dropped
    /// (default [`maru_transport::DEAD_PEER_AFTER`]); a remote owner's grace period starts
    /// then.
    pub dead_peer_after: Duration,
    /// What TCP peers must prove ([`maru_transport::auth`]): by default nothing, and only a
    /// loopback address may be bound.
    pub tcp_auth: maru_transport::auth::TcpAuth,
}

impl RmConfig {
    /// Defaults: `127.0.0.1:9850`, grace period 30 s, 256 clients, a checkpoint every 1000
    /// operations, a reaper pass every second, a stall and a handshake bound of 10 s each.
    pub fn new(state_dir: PathBuf, pools: Vec<PoolSpec>) -> Self {
        RmConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_PORT),
            unix: None,
            state_dir,
            pools,
            grace_period: Duration::from_secs(30),
            server_grace: DEFAULT_SERVER_GRACE,
            max_clients: 256,
            checkpoint_every: 1000,
            reap_interval: Duration::from_secs(1),
            hostname: None,
            metrics: None,
            stall_timeout: Duration::from_secs(10),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            dead_peer_after: maru_transport::DEAD_PEER_AFTER,
            tcp_auth: maru_transport::auth::TcpAuth::default(),
        }
    }
}

/// A running resource manager. [`RmHandle::shutdown`] (or drop) stops it.
pub struct RmHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    unix: Option<PathBuf>,
    accept: Option<JoinHandle<()>>,
    accept_unix: Option<JoinHandle<()>>,
    reaper: Option<JoinHandle<()>>,
    metrics: Option<MetricsServer>,
    stopped: bool,
}

/// Binds, recovers state, opens the pools and starts serving. Returns once connections are
/// accepted.
pub fn start(cfg: RmConfig) -> Result<RmHandle, RmError> {
    let discovered = cfg.pools.is_empty();
    let specs = if discovered {
        maru_shm::discover()
    } else {
        cfg.pools.clone()
    };
    if specs.is_empty() {
        return Err(RmError::NoPool);
    }
    let tcp_auth = cfg.tcp_auth.acceptor(cfg.listen).map_err(RmError::Auth)?;
    let manager = Manager::open(&cfg.state_dir, &specs, cfg.checkpoint_every)?;
    let listener = TcpListener::bind(cfg.listen).map_err(|source| RmError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| RmError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let unix = match &cfg.unix {
        Some(path) => Some(unix_socket::bind(path).map_err(|source| RmError::BindUnix {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    let hostname = cfg
        .hostname
        .clone()
        .unwrap_or_else(|| maru_transport::local_identity().0);
    let shared = Arc::new(Shared {
        manager: Mutex::new(manager),
        hostname,
        uid: maru_transport::effective_uid(),
        grace_period: cfg.grace_period,
        server_grace: cfg.server_grace,
        server_dead_since: Mutex::new(HashMap::new()),
        reap_interval: cfg.reap_interval.max(Duration::from_millis(1)),
        max_clients: cfg.max_clients,
        stall_timeout: cfg.stall_timeout,
        handshake_timeout: cfg.handshake_timeout,
        dead_peer_after: cfg.dead_peer_after,
        tcp_auth,
        discovered,
        ops: OpTable::new(&server::op_names()),
        stop: AtomicBool::new(false),
        started: Instant::now(),
        presence: Mutex::new(HashMap::new()),
        conns: Mutex::new(HashMap::new()),
        threads: Mutex::new(Vec::new()),
        next_conn: AtomicU64::new(1),
        active: AtomicUsize::new(0),
        rejecting: AtomicUsize::new(0),
        reap_passes: AtomicU64::new(0),
        reaper_wake: (Mutex::new(()), Condvar::new()),
    });
    let mut handle = RmHandle {
        shared: shared.clone(),
        addr,
        unix: cfg.unix.clone(),
        accept: None,
        accept_unix: None,
        reaper: None,
        metrics: None,
        stopped: false,
    };
    let s2 = shared.clone();
    handle.accept = Some(thread("maru-rm-accept", move || {
        server::accept_loop(s2, |shared| {
            let (stream, _) = listener.accept()?;
            Ok(Some(server::accepted_tcp(shared, stream)))
        })
    })?);
    if let Some(listener) = unix {
        let s2 = shared.clone();
        handle.accept_unix = Some(thread("maru-rm-accept-unix", move || {
            server::accept_loop(s2, |_| {
                let (stream, _) = listener.accept()?;
                Ok(server::accepted_unix(stream))
            })
        })?);
    }
    let s3 = shared.clone();
    handle.reaper = Some(thread("maru-rm-reaper", move || reaper::run(s3))?);
    if let Some(maddr) = cfg.metrics {
        let s4 = shared.clone();
        handle.metrics = Some(
            maru_telemetry::serve_metrics(maddr, move || render_metrics(&s4)).map_err(
                |source| RmError::Bind {
                    addr: maddr,
                    source,
                },
            )?,
        );
    }
    {
        let m = lock(&shared.manager);
        let pools: Vec<String> = m
            .pool_stats()
            .iter()
            .map(|p| format!("{} ({}, {} bytes)", p.path, p.kind, p.total_bytes))
            .collect();
        tracing::info!(
            "resource manager listening on {addr}; state in {}; pools: {}",
            cfg.state_dir.display(),
            pools.join(", ")
        );
    }
    Ok(handle)
}

impl RmHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `tcp://ADDR` of [`RmHandle::addr`].
    pub fn url(&self) -> ServerUrl {
        ServerUrl::Tcp(self.addr.to_string())
    }

    /// `unix://PATH` of the Unix-socket listener, when there is one.
    pub fn unix_url(&self) -> Option<ServerUrl> {
        self.unix.clone().map(ServerUrl::Unix)
    }

    /// Address of the metrics endpoint, when one was asked for.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.addr())
    }

    pub fn stats(&self) -> RmStats {
        self.shared.stats()
    }

    /// Every allocation, as `RmList` returns it.
    pub fn list(&self) -> Vec<RmAllocation> {
        self.shared.list()
    }

    /// Prometheus text exposition of pools, allocations and operations.
    pub fn render_metrics(&self) -> String {
        render_metrics(&self.shared)
    }

    /// Reaper passes completed so far (tests wait on it instead of sleeping).
    pub fn reap_passes(&self) -> u64 {
        self.shared.reap_passes.load(Ordering::SeqCst)
    }

    /// Looks for DAX pools again and opens new ones (hot-plug; `SIGHUP` in the binary).
    /// Only when the pools came from discovery; returns how many were added.
    pub fn rescan_pools(&self) -> usize {
        if !self.shared.discovered {
            return 0;
        }
        let found = maru_shm::discover();
        lock(&self.shared.manager).add_pools(&found)
    }

    /// Stops accepting, closes every connection, joins the threads and writes a final
    /// checkpoint.
    pub fn shutdown(mut self) {
        self.stop(true);
    }

    /// Stops like a crash would leave the state directory: no final checkpoint, so the next
    /// start replays the log. For recovery tests.
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.stop(false);
    }

    fn stop(&mut self, checkpoint: bool) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let shared = &self.shared;
        shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop with a connection of our own.
        let wake = maru_transport::connectable(self.addr);
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        if let Some(t) = self.accept_unix.take() {
            if let Some(path) = &self.unix {
                let _ = std::os::unix::net::UnixStream::connect(path);
            }
            let _ = t.join();
        }
        {
            let _guard = lock(&shared.reaper_wake.0);
            shared.reaper_wake.1.notify_all();
        }
        if let Some(t) = self.reaper.take() {
            let _ = t.join();
        }
        for s in lock(&shared.conns).values() {
            let _ = s.shutdown();
        }
        let threads = std::mem::take(&mut *lock(&shared.threads));
        for t in threads {
            let _ = t.join();
        }
        self.metrics = None;
        if checkpoint {
            lock(&shared.manager).checkpoint();
        }
        tracing::info!("resource manager on {} stopped", self.addr);
    }
}

impl Drop for RmHandle {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// A named thread of the resource manager.
fn thread(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, RmError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(RmError::Thread)
}

fn render_metrics(shared: &Shared) -> String {
    let stats = shared.stats();
    let mut w = PromWriter::new();
    w.per_rows(
        &stats.pools,
        |p| [("pool", &p.path), ("kind", &p.kind)],
        &[
            gauge("maru_pool_bytes_total", "Bytes a pool can hand out", |p| {
                p.total_bytes as f64
            }),
            gauge(
                "maru_pool_bytes_free",
                "Bytes of a pool not allocated",
                |p| p.free_bytes as f64,
            ),
        ],
    );
    w.per_rows(
        &stats.pools,
        |p| [("pool", &p.path)],
        &[
            gauge(
                "maru_pool_healthy",
                "Whether a pool's file or device is there (0: no new regions come from it)",
                |p| p.problem.is_none() as u8 as f64,
            ),
            gauge("maru_pool_regions", "Regions allocated in a pool", |p| {
                p.regions as f64
            }),
        ],
    );
    w.singles(&[
        (
            "maru_rm_allocations",
            "gauge",
            "Regions allocated in all pools",
            stats.allocations as f64,
        ),
        (
            "maru_rm_reclaimed_regions_total",
            "counter",
            "Regions taken back from dead owners since start",
            stats.reclaimed_regions as f64,
        ),
        (
            "maru_rm_connected_clients",
            "gauge",
            "Open connections",
            stats.connected_clients as f64,
        ),
    ]);
    w.ops(
        &shared.ops,
        shared.ops.names(),
        ("maru_rm_ops_total", "Requests served, by operation"),
        ("maru_rm_op_seconds", "Request latency, by operation"),
    );
    w.finish()
}
