//! How to run a metadata server: listeners, the resource manager, limits and timings.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use maru_proto::ServerUrl;

use crate::eviction::EvictionConfig;

/// How long a new connection may take to complete its Hello before it is closed and its
/// pre-hello slot freed (see `admission`). A client says hello microseconds after it
/// connects; the bound leaves room for a loaded machine. Handshaken connections may stay idle
/// (clients keep pooled connections).
/// How long a restarted server waits for the previous sessions to resume.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(30);

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

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
    /// Most clients (sessions: one per handler, whatever its number of connections) served
    /// at once. Operator tools and connections still before their Hello have slots of their
    /// own (see `admission`).
    pub max_clients: usize,
    /// Name reported to clients in the handshake (default: this machine's hostname).
    pub hostname: Option<String>,
    /// Prometheus endpoint (`GET /metrics`), if any.
    pub metrics: Option<SocketAddr>,
    /// How long a new connection may take to complete its Hello before it is closed
    /// (default [`HANDSHAKE_TIMEOUT`]).
    pub handshake_timeout: Duration,
    /// After answering, how long a connection thread polls for the next request before it
    /// sleeps (see `busy_poll`; default [`BUSY_POLL`]). Zero: never spin.
    pub busy_poll: Duration,
    /// How long a pin lives unless its session renews it (`--pin-ttl`; default
    /// [`crate::PIN_TTL`]).
    pub pin_ttl: Duration,
    /// Watermarks, policy and quotas of eviction.
    pub eviction: EvictionConfig,
    /// How long a TCP client's host may stay unreachable before its connections are dropped
    /// and its session ends (default [`maru_transport::DEAD_PEER_AFTER`]).
    pub dead_peer_after: Duration,
    /// What TCP clients must prove ([`maru_transport::auth`]): by default nothing, and only
    /// a loopback address may be bound.
    pub tcp_auth: maru_transport::auth::TcpAuth,
    /// The key index in shared memory the server writes through to and clients read
    /// (`None`: keys live in the server's memory only).
    pub index: Option<IndexConfig>,
    /// After a restart on a lasting key index, how long the regions of the previous
    /// process's sessions are kept for them to resume (`--reconnect-grace-secs`; default
    /// [`RECONNECT_GRACE`]; zero: no session resumes).
    pub reconnect_grace: Duration,
}

/// Where the key index is and how large a new one is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexConfig {
    /// The index file; created when missing, re-attached when present.
    pub path: PathBuf,
    /// Keys a new index has room for (an existing one keeps its size).
    pub capacity: u64,
    /// Bytes a new index keeps for keys longer than 16 bytes.
    pub key_area_bytes: u64,
    /// The index goes with the server: removed at shutdown, and every region goes back to
    /// the resource manager. Otherwise the index and the regions its keys name outlive a
    /// shutdown, for the next start to re-attach.
    pub ephemeral: bool,
    /// Lanes of the hold lanes file beside the index (`<index>.holds`): one per session that
    /// takes view holds without a round trip (0: none; every hold is asked for).
    pub hold_lanes: u32,
    /// Holds one lane has room for; a session's views beyond them take a round trip.
    pub lane_slots: u32,
}

/// Default of [`IndexConfig::hold_lanes`]: one per client of the default `max_clients`.
pub const HOLD_LANES: u32 = 256;
/// Default of [`IndexConfig::lane_slots`].
pub const LANE_SLOTS: u32 = 4096;

/// Default of [`IndexConfig::capacity`]: an 8 GiB pool of 4 KiB pages.
pub const INDEX_KEYS: u64 = 2 << 20;
/// Default of [`IndexConfig::key_area_bytes`]: 64 bytes per key on average.
pub const INDEX_KEY_BYTES: u64 = INDEX_KEYS * 64;

impl IndexConfig {
    /// Where the hold lanes file of this index is.
    pub fn lanes_path(&self) -> PathBuf {
        let mut file = self.path.as_os_str().to_owned();
        file.push(".holds");
        file.into()
    }

    /// An index at `path` of the default size.
    pub fn at(path: impl Into<PathBuf>) -> IndexConfig {
        IndexConfig {
            path: path.into(),
            capacity: INDEX_KEYS,
            key_area_bytes: INDEX_KEY_BYTES,
            ephemeral: false,
            hold_lanes: HOLD_LANES,
            lane_slots: LANE_SLOTS,
        }
    }
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
            pin_ttl: crate::PIN_TTL,
            eviction: EvictionConfig::default(),
            dead_peer_after: maru_transport::DEAD_PEER_AFTER,
            tcp_auth: maru_transport::auth::TcpAuth::default(),
            index: None,
            reconnect_grace: RECONNECT_GRACE,
        }
    }
}
