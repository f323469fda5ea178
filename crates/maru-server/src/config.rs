//! How to run a metadata server: listeners, the resource manager, limits and timings.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use maru_proto::ServerUrl;

/// How long a new connection may take to complete its Hello before it is closed and its
/// slot freed: without a bound, `max_clients` connections that never speak lock every real
/// client out. Handshaken connections may stay idle (clients keep pooled connections).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// sleeps (see `busy_poll`; default [`BUSY_POLL`]). Zero: never spin.
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
