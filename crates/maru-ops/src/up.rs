//! `maru up`: the embedded default. One process runs a resource manager and a metadata server
//! on a shm pool it creates, for a single host and for development: same code as the separate
//! daemons, no root, no hardware.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use maru_shm::naming::Naming;
use maru_shm::{fs_page_size, HUGE_PAGE_SIZE};

use crate::format::{bytes, parse_size};
use maru_telemetry::process::{write_ready_file, StopSignals};
use maru_transport::auth::{ClusterSecret, TcpAuth};

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Pool size (e.g. 512M, 8G). Default: min(8 GiB, half of what the pool directory's file
    /// system has free).
    #[arg(long, value_parser = parse_size)]
    pub pool_size: Option<u64>,
    /// Directory for the pool file (tmpfs or hugetlbfs).
    #[arg(long, default_value = "/dev/shm/maru")]
    pub pool_dir: PathBuf,
    /// State directory (write-ahead log, checkpoint, secret). Default: the user's state dir.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Address to bind (use 0.0.0.0 to serve other hosts; see the README's security note).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Metadata server port (0: any free port).
    #[arg(long, default_value_t = 5555)]
    pub port: u16,
    /// Resource manager port (0: any free port).
    #[arg(long, default_value_t = 9850)]
    pub rm_port: u16,
    /// Unix socket for same-host clients. Default: <pool-dir>/maru-<port>.sock.
    #[arg(long)]
    pub unix: Option<PathBuf>,
    /// Do not listen on a Unix socket.
    #[arg(long, conflicts_with = "unix")]
    pub no_unix: bool,
    /// Serve Prometheus metrics on this port (off by default).
    #[arg(long)]
    pub metrics_port: Option<u16>,
    /// Keep the pool file on exit.
    #[arg(long)]
    pub keep: bool,
    /// Write the bound addresses as JSON to this file once ready (for scripts and tests).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Log level (overridden by MARU_LOG).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// After answering, a connection thread polls for the next request this many µs before
    /// it sleeps, so back-to-back calls do not pay for waking it (0: never; see
    /// docs/ARCHITECTURE.md §6).
    #[arg(long, default_value_t = 50, value_name = "US")]
    pub busy_poll_us: u64,
    #[command(flatten)]
    pub eviction: Box<maru_server::cli::EvictionArgs>,
    /// The key index: default <pool-dir>/maru-<port>.index, beside the pool and removed
    /// with it unless --keep (on a hugetlbfs pool directory, in /dev/shm or else the state
    /// directory: a hugetlbfs refuses the writes of the index's side files).
    #[command(flatten)]
    pub index: Box<maru_server::cli::IndexArgs>,
    /// Cluster secret for TCP clients. Default: a fresh one written to
    /// <state-dir>/cluster-secret (0600) at every start. Required of TCP clients when --host
    /// is not a loopback address; optional on loopback.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Serve TCP in plaintext without authentication, on any address (no secret written).
    #[arg(long, conflicts_with = "secret_file")]
    pub insecure_tcp: bool,
}

/// Names this embedded instance's files: by port, or by pid when the port is chosen by the OS
/// (so that several `--port 0` instances never share a pool file or socket).
fn instance_tag(port: u16) -> String {
    if port != 0 {
        port.to_string()
    } else {
        format!("pid{}", std::process::id())
    }
}

/// Free bytes of the file system holding `dir`.
fn fs_free_bytes(dir: &Path) -> anyhow::Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is NUL-terminated and `st` is writable storage of the right type.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", dir.display()));
    }
    // SAFETY: statvfs returned 0, so `st` is initialised.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail * st.f_frsize)
}

/// What `maru up` is serving; written to `--ready-file` and printed at start.
#[derive(serde::Serialize)]
struct Ready {
    tcp: Option<String>,
    unix: Option<String>,
    rm: String,
    metrics: Option<String>,
    pool: String,
    pool_bytes: u64,
    huge_pages: bool,
    /// The key index clients read (`None` with --no-index).
    index: Option<String>,
    /// The cluster secret TCP clients prove they hold (`None` with --insecure-tcp).
    secret_file: Option<String>,
    pid: u32,
}

/// The cluster secret of this instance and whether TCP clients must prove it.
fn tcp_auth(args: &UpArgs, state_dir: &Path, loopback: bool) -> anyhow::Result<TcpAuth> {
    if args.insecure_tcp {
        return Ok(TcpAuth::Insecure);
    }
    let secret = match &args.secret_file {
        Some(path) => ClusterSecret::load(path)?,
        None => ClusterSecret::generate(&state_dir.join("cluster-secret"))?,
    };
    Ok(TcpAuth::Secret {
        secret,
        required: !loopback,
    })
}

/// Where the key index goes by default: beside the pool, unless the pool is on a hugetlbfs,
/// which holds mappable files only (it refuses `write`, and the index's namespace table is a
/// log appended with `write`); then on the host's tmpfs, where clients map it as cheaply, or
/// in the state directory on a host without one.
fn index_dir(pool_dir: &Path, huge: bool, state_dir: &Path) -> PathBuf {
    if !huge {
        return pool_dir.to_owned();
    }
    let shm = Path::new("/dev/shm");
    match fs_page_size(shm) {
        Ok(page) if page < HUGE_PAGE_SIZE => shm.to_owned(),
        _ => state_dir.to_owned(),
    }
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    maru_telemetry::init_logging(&args.log_level);
    // Block the stop signals before any daemon thread exists, so they all inherit the mask
    // and the signals reach only our sigwait.
    let signals = StopSignals::block().context("cannot block SIGINT/SIGTERM")?;

    std::fs::create_dir_all(&args.pool_dir)
        .with_context(|| format!("cannot create pool directory {}", args.pool_dir.display()))?;
    let page = fs_page_size(&args.pool_dir).unwrap_or(4096);
    let huge = page >= HUGE_PAGE_SIZE;
    let pool_size = match args.pool_size {
        Some(s) => s,
        None => (8u64 << 30).min(fs_free_bytes(&args.pool_dir)? / 2),
    };
    // Regions are carved in 2 MiB units; a pool smaller than one region is useless.
    let pool_size = pool_size.div_ceil(HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE;
    if pool_size == 0 {
        bail!("no room for a pool in {}", args.pool_dir.display());
    }
    let naming = Naming::default();
    let tag = instance_tag(args.port);
    let pool_path = args
        .pool_dir
        .join(format!("{}-{tag}.pool", naming.prefix()));
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| naming.default_state_dir().join(format!("up-{tag}")));
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;
    let spec = format!("shm:{}:{}", pool_path.display(), pool_size);

    let ip: std::net::IpAddr = args
        .host
        .parse()
        .with_context(|| format!("invalid --host {}", args.host))?;
    let mut rm_cfg = maru_resource_manager::RmConfig::new(
        state_dir.clone(),
        vec![spec.parse().map_err(|e| anyhow::anyhow!("{e}"))?],
    );
    rm_cfg.listen = SocketAddr::new(ip, args.rm_port);
    let auth = tcp_auth(&args, &state_dir, ip.is_loopback())?;
    let secret_file = match &auth {
        TcpAuth::Secret { secret, .. } => Some(secret.path.display().to_string()),
        _ => None,
    };
    rm_cfg.tcp_auth = auth.clone();
    let rm = maru_resource_manager::start(rm_cfg).context("resource manager failed to start")?;

    let unix = if args.no_unix {
        None
    } else {
        Some(args.unix.clone().unwrap_or_else(|| {
            args.pool_dir
                .join(format!("{}-{tag}.sock", naming.prefix()))
        }))
    };
    let server_cfg = maru_server::ServerConfig {
        tcp: Some(SocketAddr::new(ip, args.port)),
        unix: unix.clone(),
        rm_url: rm.url(),
        busy_poll: std::time::Duration::from_micros(args.busy_poll_us),
        eviction: match args.eviction.config() {
            Ok(c) => c,
            Err(e) => {
                rm.shutdown();
                return Err(e.into());
            }
        },
        tcp_auth: auth.clone(),
        index: args.index.config((
            index_dir(&args.pool_dir, huge, &state_dir)
                .join(format!("{}-{tag}.index", naming.prefix())),
            !args.keep,
        )),
        ..Default::default()
    };
    let index = server_cfg
        .index
        .as_ref()
        .map(|i| i.path.display().to_string());
    let server = match maru_server::start(server_cfg) {
        Ok(s) => s,
        Err(e) => {
            rm.shutdown();
            return Err(e).context("metadata server failed to start");
        }
    };

    // The metrics thread shares the handles; it is stopped (dropping its clones) before the
    // handles are unwrapped for shutdown.
    let (rm, server) = (Arc::new(rm), Arc::new(server));
    let metrics = match args.metrics_port {
        Some(port) => {
            let (rm2, server2) = (rm.clone(), server.clone());
            Some(maru_telemetry::serve_metrics(
                SocketAddr::new(ip, port),
                move || {
                    let mut text = server2.render_metrics();
                    text.push_str(&rm2.render_metrics());
                    text
                },
            )?)
        }
        None => None,
    };

    let ready = Ready {
        tcp: server.tcp_addr().map(|a| format!("tcp://{a}")),
        unix: server
            .unix_path()
            .map(|p| format!("unix://{}", p.display())),
        rm: rm.url().to_string(),
        metrics: metrics
            .as_ref()
            .map(|m| format!("http://{}/metrics", m.addr())),
        pool: pool_path.display().to_string(),
        pool_bytes: pool_size,
        huge_pages: huge,
        index,
        secret_file,
        pid: std::process::id(),
    };
    println!("maru up: resource manager + metadata server (embedded)");
    println!("  pool        {} ({}, shm)", ready.pool, bytes(pool_size));
    if huge {
        println!("  huge pages  on (2 MiB pages on hugetlbfs: page faults ~10x cheaper)");
    } else {
        println!(
            "  huge pages  off ({} is not hugetlbfs). To enable: reserve pages as root \
             (sysctl vm.nr_hugepages=N), mount -t hugetlbfs none /mnt/maru-huge, then --pool-dir /mnt/maru-huge",
            args.pool_dir.display()
        );
    }
    if let Some(t) = &ready.tcp {
        println!("  server      {t}");
    }
    if let Some(u) = &ready.unix {
        println!("  server      {u}   (same-host clients: fastest)");
    }
    println!("  rm          {}", ready.rm);
    match &ready.index {
        Some(p) => println!("  index       {p}   (clients read keys here)"),
        None => println!("  index       none (--no-index: every lookup is a round trip)"),
    }
    match (&ready.secret_file, &auth) {
        (Some(path), TcpAuth::Secret { required, .. }) => println!(
            "  secret      {path}   (TCP clients: MaruConfig(secret_file=...) or \
             MARU_SECRET_FILE; {})",
            if *required {
                "required"
            } else {
                "optional on loopback"
            }
        ),
        _ => println!("  secret      none (--insecure-tcp: TCP is plaintext, unauthenticated)"),
    }
    if let Some(m) = &ready.metrics {
        println!("  metrics     {m}");
    }
    println!("  state       {}", state_dir.display());
    println!("Ready. Ctrl-C or SIGTERM stops it.");
    if let Some(path) = &args.ready_file {
        write_ready_file(path, &serde_json::to_value(&ready)?)?;
    }

    let sig = signals.wait();
    println!("maru up: signal {sig}: stopping (telling clients, returning regions)");
    drop(metrics);
    match Arc::try_unwrap(server) {
        Ok(server) => server.shutdown(),
        Err(_) => {
            eprintln!("maru up: metadata server still referenced; exiting without a clean stop")
        }
    }
    match Arc::try_unwrap(rm) {
        Ok(rm) => rm.shutdown(),
        Err(_) => {
            eprintln!("maru up: resource manager still referenced; exiting without a clean stop")
        }
    }
    if args.keep {
        println!("maru up: pool file kept at {}", pool_path.display());
    } else {
        match std::fs::remove_file(&pool_path) {
            Ok(()) => println!("maru up: pool file {} removed", pool_path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("maru up: could not remove {}: {e}", pool_path.display()),
        }
    }
    if let Some(path) = &args.ready_file {
        let _ = std::fs::remove_file(path);
    }
    drop(signals);
    Ok(())
}
