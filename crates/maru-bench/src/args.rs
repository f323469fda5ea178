//! The benchmark's command line: `maru bench [OPTIONS]`, or `maru-bench [OPTIONS]`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::cpu::Placement;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Benchmark this running server instead of starting embedded daemons (tcp://host:port or
    /// unix:///path; repeat to give both transports of one server).
    #[arg(long)]
    pub server: Vec<String>,
    /// Fewer samples: the whole run takes under a minute on a 2-core machine.
    #[arg(long, conflicts_with = "smoke")]
    pub quick: bool,
    /// The smallest run that still produces every row kind (for CI; numbers are rough).
    #[arg(long)]
    pub smoke: bool,
    /// Write the report as JSON to PATH (`-`: standard output; the table then goes to
    /// standard error).
    #[arg(long, value_name = "PATH|-")]
    pub json: Option<String>,
    /// Which transports to measure.
    #[arg(long, value_enum, default_value_t = TransportArg::Both)]
    pub transport: TransportArg,
    /// Do not run Redis side by side even if redis-server is installed.
    #[arg(long)]
    pub no_redis: bool,
    /// Do not run the Python rows (benchmarks/bench.py).
    #[arg(long)]
    pub no_python: bool,
    /// Python interpreter for the Python rows (default: the repository's .venv/bin/python).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Run only these sections (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Section>,
    /// Chunk sizes of the size-dependent rows (default 4K,64K,1M,4M; the key and batch rows
    /// run with 4K).
    #[arg(long, value_delimiter = ',', value_parser = maru_ops::format::parse_size)]
    pub sizes: Vec<u64>,
    /// Directory for the temporary pool, sockets and scratch files (tmpfs).
    #[arg(long, default_value = "/dev/shm")]
    pub pool_dir: PathBuf,
    /// Let idle CPUs halt instead of filling idle time with a SCHED_IDLE spinner per CPU. On
    /// a VM, waking a halted vCPU costs tens of microseconds per round trip, so rows become
    /// bimodal; the spinners yield at once to any real work.
    #[arg(long)]
    pub let_cpus_idle: bool,
    /// Where the client and the daemons run: `spread` pins the calling threads to the first
    /// CPU and the daemons (and the floors' echo threads, and Redis) to the second, so every
    /// round trip crosses cores the same way.
    #[arg(long, value_enum, default_value_t = Placement::Spread)]
    pub placement: Placement,
    /// Run the embedded daemons in this process (default, like `maru up`) or in a child
    /// process (client and server in different processes, as deployed).
    #[arg(long, value_enum, default_value_t = DaemonsArg::InProcess)]
    pub daemons: DaemonsArg,
    /// Internal: run as a worker process of another benchmark run.
    #[arg(long, hide = true)]
    pub worker: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    Tcp,
    Unix,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DaemonsArg {
    InProcess,
    Process,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Section {
    /// Only the floors (ping-pong, memcpy, mapping).
    Floor,
    /// Single-client rows through the Rust client.
    Rust,
    /// Single-client rows through the Python package.
    Python,
    /// First retrieve from another process's 1 GiB region, then steady state.
    Cross,
    /// 1, 4 and 32 client threads and processes.
    Concurrency,
    /// Connect time with 100 MiB and 1 GiB pools.
    Connect,
    /// Redis side by side.
    Redis,
    /// Server bytes per key and batched registration rate.
    Registry,
    /// Eviction policies' hit ratios against exact LRU on the same Zipf traces.
    Eviction,
    /// The key index in shared memory: Python reads without a round trip, and a restart.
    Index,
    /// An LMCache-shaped load: reader processes pinning, retrieving and copying out chunks
    /// while a writer stores MiB-sized chunks from several threads.
    Lmcache,
}
