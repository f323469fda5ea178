//! The `maru-server` command line.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::Parser;
use maru_proto::ServerUrl;
use maru_telemetry::process::{write_ready_file, StopSignals};

use crate::eviction::{EvictionConfig, DEFAULT_POLICY, EVICT_HIGH, EVICT_LOW};
use crate::{ServerConfig, ServerHandle};

/// Capacity management flags, shared by `maru-server` and `maru up`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvictionArgs {
    /// Start evicting when the bytes held by keys pass this fraction of the pool.
    #[arg(long, default_value_t = EVICT_HIGH, value_name = "FRACTION")]
    pub evict_high: f64,
    /// Stop evicting once they are below this fraction.
    #[arg(long, default_value_t = EVICT_LOW, value_name = "FRACTION")]
    pub evict_low: f64,
    /// Which keys go first: sieve, clock or lru.
    #[arg(long, default_value = DEFAULT_POLICY, value_name = "NAME")]
    pub evict_policy: String,
    /// Byte quota of a namespace, NAME=SIZE (e.g. tenant-a=8G; an empty NAME is the default
    /// namespace); repeat for more namespaces. A namespace over its quota evicts its own keys.
    #[arg(long = "quota", value_name = "NAME=SIZE")]
    pub quotas: Vec<String>,
}

impl EvictionArgs {
    /// The checked configuration, or a message naming the flag at fault.
    pub fn config(&self) -> Result<EvictionConfig, crate::eviction::ConfigError> {
        let mut c = EvictionConfig {
            high: self.evict_high,
            low: self.evict_low,
            policy: self.evict_policy.clone(),
            ..EvictionConfig::default()
        };
        c.add_quotas(&self.quotas)?;
        c.validate()?;
        Ok(c)
    }
}

/// Maru metadata server: maps keys to locations in shared memory for one application group.
#[derive(Debug, Parser)]
#[command(name = "maru-server", version)]
struct Args {
    /// Address to listen on for TCP clients.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// TCP port (0: let the OS pick; the ready file says which).
    #[arg(long, default_value_t = 5555)]
    port: u16,
    /// Also listen on this Unix socket (lower latency for same-host clients).
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Resource manager to allocate regions from: host:port, tcp://host:port or unix:///path.
    #[arg(long, default_value = "127.0.0.1:9850", value_name = "ADDR")]
    rm_address: String,
    /// Pool to allocate regions from; repeat in order of preference (the next pool is used
    /// when the previous one is full). Default: the resource manager chooses.
    #[arg(long = "pool", value_name = "PATH")]
    pools: Vec<String>,
    /// Log level (error, warn, info, debug, trace); MARU_LOG overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Most clients (handlers: all connections of one count once) served at once; more are
    /// refused with "too many clients". Operator tools (maru stats, maru top) have slots of
    /// their own.
    #[arg(long, default_value_t = 256)]
    max_clients: usize,
    /// Serve Prometheus metrics on this port (same host as --host) at /metrics.
    #[arg(long)]
    metrics_port: Option<u16>,
    /// Name reported to clients (default: this machine's hostname).
    #[arg(long)]
    hostname: Option<String>,
    /// Once every listener is bound, write their addresses as JSON to this file (atomically).
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// After answering, a connection thread polls for the next request this many µs before
    /// it sleeps, so back-to-back calls do not pay for waking it (0: never).
    #[arg(long, default_value_t = 50, value_name = "US")]
    busy_poll_us: u64,
    #[command(flatten)]
    tcp: maru_transport::flags::TcpFlags,
    /// Seconds a pin lives unless its handler renews it (renew_pins); an abandoned pin
    /// expires after this long.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS", value_parser = positive_seconds)]
    pin_ttl: f64,
    /// After a restart on a lasting key index, seconds the previous process's sessions have
    /// to resume (their regions are kept meanwhile); 0: none resumes.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS", value_parser = non_negative_seconds)]
    reconnect_grace_secs: f64,
    #[command(flatten)]
    eviction: EvictionArgs,
    #[command(flatten)]
    index: IndexArgs,
}

/// Key index flags, shared by `maru-server` and `maru up`.
#[derive(Debug, Clone, clap::Args)]
pub struct IndexArgs {
    /// The key index in shared memory (clients read it without a round trip; a restarted
    /// server re-attaches it and keeps its keys). Default: <state dir>/server-<port>.index
    /// (with --port 0, a file of this process that goes with it).
    #[arg(long, value_name = "PATH")]
    pub index: Option<PathBuf>,
    /// Keep keys in the server's memory only: no index file, every lookup a round trip.
    #[arg(long, conflicts_with = "index")]
    pub no_index: bool,
    /// Keys a new index has room for (an existing index keeps its size).
    #[arg(long, default_value_t = crate::INDEX_KEYS, value_name = "N")]
    pub index_keys: u64,
    /// Bytes a new index keeps for keys longer than 16 bytes.
    #[arg(long, default_value_t = crate::INDEX_KEY_BYTES, value_name = "BYTES")]
    pub index_key_bytes: u64,
    /// Sessions that take view holds in shared memory, without a round trip (a lanes file
    /// beside the index, <index>.holds); 0: every hold is a round trip.
    #[arg(long, default_value_t = crate::HOLD_LANES, value_name = "N")]
    pub hold_lanes: u32,
    /// View holds one such session keeps in shared memory; more take a round trip.
    #[arg(long, default_value_t = crate::LANE_SLOTS, value_name = "N")]
    pub lane_slots: u32,
}

impl IndexArgs {
    /// The index configuration; `default_path` (and whether it is ephemeral) applies when no
    /// `--index` is given.
    pub fn config(&self, default_path: (PathBuf, bool)) -> Option<crate::IndexConfig> {
        if self.no_index {
            return None;
        }
        let (path, ephemeral) = match &self.index {
            Some(p) => (p.clone(), false),
            None => default_path,
        };
        Some(crate::IndexConfig {
            path,
            capacity: self.index_keys,
            key_area_bytes: self.index_key_bytes,
            ephemeral,
            hold_lanes: self.hold_lanes,
            lane_slots: self.lane_slots,
        })
    }
}

/// Where a server on `port` keeps its index by default: in the state directory, by port; a
/// server on an OS-chosen port gets a file of its own process that goes with it.
pub fn default_index_path(port: u16) -> (PathBuf, bool) {
    let dir = maru_shm::naming::Naming::default().default_state_dir();
    if port != 0 {
        (dir.join(format!("server-{port}.index")), false)
    } else {
        (
            dir.join(format!("server-pid{}.index", std::process::id())),
            true,
        )
    }
}

fn non_negative_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1e9).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds (0 or more)")),
    }
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e9 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

/// Runs the server until SIGINT or SIGTERM; returns the process exit code.
pub fn main(args: Vec<String>) -> i32 {
    maru_resource_manager::cli::daemon_main(
        "maru-server",
        args,
        |a: &Args| &a.log_level,
        run,
        |e| {
            // A server error knows its own code (a corrupt key index is not a usage error).
            e.downcast_ref::<crate::ServerError>()
                .map_or(1, crate::ServerError::exit_code)
        },
    )
}

fn resolve(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve --host {host}"))?
        .next()
        .ok_or_else(|| anyhow!("--host {host} resolves to no address"))
}

fn run(args: Args) -> anyhow::Result<()> {
    let tcp = resolve(&args.host, args.port)?;
    let metrics = args
        .metrics_port
        .map(|p| resolve(&args.host, p))
        .transpose()?;
    let rm_url = ServerUrl::parse(&args.rm_address).context("--rm-address")?;
    let eviction = args.eviction.config()?;
    let cfg = ServerConfig {
        tcp: Some(tcp),
        unix: args.unix,
        rm_url,
        pools: args.pools,
        max_clients: args.max_clients,
        hostname: args.hostname,
        metrics,
        busy_poll: std::time::Duration::from_micros(args.busy_poll_us),
        pin_ttl: std::time::Duration::from_secs_f64(args.pin_ttl),
        eviction,
        dead_peer_after: args.tcp.dead_peer_after(),
        tcp_auth: args.tcp.auth()?,
        index: args.index.config(default_index_path(args.port)),
        reconnect_grace: std::time::Duration::from_secs_f64(args.reconnect_grace_secs),
        ..ServerConfig::default()
    };
    // Block the termination signals before any thread starts (threads inherit the mask), so
    // that they are delivered to the sigwait below and nowhere else.
    let signals = StopSignals::block()?;
    let server = crate::start(cfg)?;
    if let Some(path) = &args.ready_file {
        write_ready_file(path, &ready_doc(&server))
            .with_context(|| format!("cannot write ready file {}", path.display()))?;
    }
    let sig = signals.wait();
    tracing::info!(signal = sig, "shutting down");
    server.shutdown();
    Ok(())
}

fn ready_doc(server: &ServerHandle) -> serde_json::Value {
    serde_json::json!({
        "tcp": server.tcp_addr().map(|a| a.to_string()),
        "unix": server.unix_path().map(|p| p.display().to_string()),
        "metrics": server.metrics_addr().map(|a| a.to_string()),
        "url": server.url().to_string(),
        "pid": std::process::id(),
    })
}
