//! The `maru-server` command line.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::Parser;
use maru_proto::ServerUrl;
use maru_telemetry::process::{write_ready_file, StopSignals};

use crate::{ServerConfig, ServerHandle};

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
    /// Most connections served at once; more are refused with "too many clients".
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
}

/// Runs the server until SIGINT or SIGTERM; returns the process exit code.
pub fn main(args: Vec<String>) -> i32 {
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    maru_telemetry::init_logging(&args.log_level);
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("maru-server: {}", describe(&e));
            1
        }
    }
}

/// The error and its causes on one line, each cause once (a [`crate::ServerError`] already
/// names its cause in its message, which `{:#}` would repeat).
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
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
    let cfg = ServerConfig {
        tcp: Some(tcp),
        unix: args.unix,
        rm_url,
        pools: args.pools,
        max_clients: args.max_clients,
        hostname: args.hostname,
        metrics,
        busy_poll: std::time::Duration::from_micros(args.busy_poll_us),
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
