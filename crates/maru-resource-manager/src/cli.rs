//! The `maru-resource-manager` command line. `src/main.rs` and the Python package's console
//! script both call [`main`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use maru_shm::PoolSpec;
use maru_telemetry::process::write_ready_file;

use crate::{RmConfig, DEFAULT_PORT};

/// Maru resource manager: owns shared-memory pools and hands out regions.
#[derive(Debug, Parser)]
#[command(name = "maru-resource-manager", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// TCP port (0: any free port; see --ready-file).
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    /// Directory of the write-ahead log, checkpoint, secret and lock
    /// [default: $XDG_STATE_HOME/maru or ~/.local/state/maru].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Log level (error, warn, info, debug, trace); MARU_LOG overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Seconds a remote owner may stay disconnected before its regions are reclaimed.
    #[arg(long, default_value_t = 30.0)]
    grace_period: f64,
    /// Seconds the regions of a dead metadata server (one with a lasting key index) wait
    /// for its successor to adopt them before they are reclaimed.
    #[arg(long, default_value_t = crate::DEFAULT_SERVER_GRACE.as_secs_f64())]
    server_grace_secs: f64,
    /// Connections served at once.
    #[arg(long, default_value_t = 256)]
    max_clients: usize,
    /// A pool: shm:PATH:SIZE (e.g. shm:/dev/shm/maru/pool0:8G), fs-dax:DIR or
    /// dev-dax:/dev/daxX.Y. Repeatable. Without it DAX devices and mounts are discovered
    /// (SIGHUP rescans).
    #[arg(long = "pool", value_name = "SPEC")]
    pools: Vec<PoolSpec>,
    /// Unix socket for this host's processes (the metadata server: `--rm-address
    /// unix://PATH`), whose callers the kernel identifies [default: STATE_DIR/rm.sock].
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// No Unix socket (TCP only).
    #[arg(long, conflicts_with = "unix")]
    no_unix: bool,
    /// Once listening, write {"tcp":ADDR,"unix":PATH|null,"metrics":ADDR|null,"pid":N} here
    /// (atomically).
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Serve Prometheus metrics on this port (same host), at /metrics.
    #[arg(long)]
    metrics_port: Option<u16>,
    #[command(flatten)]
    tcp: maru_transport::flags::TcpFlags,
}

/// Runs the daemon with `args` (`args[0]` is the program name) until SIGINT or SIGTERM.
/// Returns the process exit code.
pub fn main(args: Vec<String>) -> i32 {
    daemon_main(
        "maru-resource-manager",
        args,
        |a: &Args| &a.log_level,
        run,
        |_| 1,
    )
}

/// What a daemon's `main` does: parses `args` (a usage error exits 2, `--help` 0), starts
/// logging at the level they give, runs, and on failure prints `program: error: cause`
/// (each cause once) and exits 1.
pub fn daemon_main<A: Parser>(
    program: &str,
    args: Vec<String>,
    log_level: fn(&A) -> &String,
    run: fn(A) -> anyhow::Result<()>,
    exit_code: fn(&anyhow::Error) -> i32,
) -> i32 {
    let args = match A::try_parse_from(&args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    maru_telemetry::init_logging(log_level(&args));
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{program}: {}", describe(&e));
            exit_code(&e)
        }
    }
}

/// The error and its causes on one line, each cause once: an [`crate::RmError`] already
/// names its cause in its message, which `{:#}` would repeat ("…: Read-only file system
/// (os error 30): Read-only file system (os error 30)").
pub(crate) fn describe(e: &anyhow::Error) -> String {
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

fn run(args: Args) -> anyhow::Result<()> {
    if !args.grace_period.is_finite() || args.grace_period < 0.0 {
        anyhow::bail!("--grace-period must be a non-negative number of seconds");
    }
    if !args.server_grace_secs.is_finite() || args.server_grace_secs < 0.0 {
        anyhow::bail!("--server-grace-secs must be a non-negative number of seconds");
    }
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| maru_shm::naming::Naming::default().default_state_dir());
    let mut cfg = RmConfig::new(state_dir, args.pools.clone());
    cfg.listen = SocketAddr::new(args.host, args.port);
    cfg.unix = match (&args.unix, args.no_unix) {
        (_, true) => None,
        (Some(p), false) => Some(p.clone()),
        (None, false) => Some(cfg.state_dir.join("rm.sock")),
    };
    cfg.grace_period = Duration::from_secs_f64(args.grace_period);
    cfg.server_grace = Duration::from_secs_f64(args.server_grace_secs);
    cfg.max_clients = args.max_clients;
    cfg.dead_peer_after = args.tcp.dead_peer_after();
    cfg.tcp_auth = args.tcp.auth()?;
    cfg.metrics = args.metrics_port.map(|p| SocketAddr::new(args.host, p));

    let stop = Arc::new(AtomicBool::new(false));
    let rescan = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, rescan.clone())
        .context("cannot install signal handlers")?;

    let rm = crate::start(cfg)?;
    if let Some(path) = &args.ready_file {
        let ready = serde_json::json!({
            "tcp": rm.addr().to_string(),
            "unix": rm.unix_url().map(|u| match u {
                maru_proto::ServerUrl::Unix(p) => p.display().to_string(),
                other => other.to_string(),
            }),
            "metrics": rm.metrics_addr().map(|a| a.to_string()),
            "pid": std::process::id(),
        });
        write_ready_file(path, &ready)
            .with_context(|| format!("cannot write ready file {}", path.display()))?;
    }
    while !stop.load(Ordering::SeqCst) {
        if rescan.swap(false, Ordering::SeqCst) {
            let added = rm.rescan_pools();
            tracing::info!("SIGHUP: pool rescan added {added} pools");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::info!("stopping");
    rm.shutdown();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::describe;
    use crate::RmError;

    #[test]
    fn a_start_up_error_names_its_cause_once() {
        let io = std::io::Error::from_raw_os_error(libc::EROFS);
        let e = anyhow::Error::from(RmError::StateDir {
            path: "/var/lib/maru".into(),
            source: io,
        });
        let text = describe(&e);
        assert_eq!(text.matches("os error 30").count(), 1, "{text}");
        assert!(
            text.starts_with("state directory /var/lib/maru: "),
            "{text}"
        );
        // A context that does not repeat its cause still shows it.
        let e = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::ENOSPC))
            .context("cannot write ready file /x");
        let text = describe(&e);
        assert!(text.starts_with("cannot write ready file /x: "), "{text}");
        assert_eq!(text.matches("os error 28").count(), 1, "{text}");
    }
}
