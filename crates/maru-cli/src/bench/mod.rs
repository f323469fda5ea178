//! `maru bench`: how fast Maru is on this machine, next to what the hardware allows and next
//! to Redis, measured in one run.
//!
//! Every row is compared with a floor measured in the same run (see [`floor`]): a raw socket
//! ping-pong of the row's exact request and reply sizes, plus a raw memcpy of the chunk into or
//! out of a shared mapping for rows that copy one. Numbers drift between runs on a shared VM;
//! ratios measured together do not.
//!
//! Sections: Rust client rows per transport ([`rows`]), Python rows through the `maru`
//! package ([`python`], `benchmarks/bench.py`), cross-process lazy mapping ([`cross`]),
//! concurrency ([`concurrency`]), connect time ([`connect`]), Redis side by side ([`redis`]),
//! and the server's memory per key and registration rate ([`registry`]).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use maru_proto::RegionInfo;
use serde::Serialize;

mod concurrency;
mod connect;
mod cpu;
mod cross;
mod daemons;
mod floor;
mod python;
mod redis;
mod registry;
mod rows;
mod stats;
mod wire;
mod worker;

use daemons::{Embedded, Scratch};
use floor::{CopyFloor, Floors, MapFloor, Probe, RttFloor, Transport};
use stats::{round3, Row};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

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
    #[arg(long, value_delimiter = ',', value_parser = crate::format::parse_size)]
    pub sizes: Vec<u64>,
    /// Directory for the temporary pool, sockets and scratch files (tmpfs).
    #[arg(long, default_value = "/dev/shm")]
    pub pool_dir: PathBuf,
    /// Let idle CPUs halt instead of filling idle time with a SCHED_IDLE spinner per CPU. On
    /// a VM, waking a halted vCPU costs tens of microseconds per round trip, so rows become
    /// bimodal; the spinners yield at once to any real work.
    #[arg(long)]
    pub let_cpus_idle: bool,
    /// Where the client and the daemons run (see `maru bench --help`): `spread` pins the
    /// calling threads to the first CPU and the daemons (and the floors' echo threads, and
    /// Redis) to the second, so every round trip crosses cores the same way.
    #[arg(long, value_enum, default_value_t = cpu::Placement::Spread)]
    pub placement: cpu::Placement,
    /// Run the embedded daemons in this process (default, like `maru up`) or in a `maru up`
    /// child process (client and server in different processes, as deployed).
    #[arg(long, value_enum, default_value_t = DaemonsArg::InProcess)]
    pub daemons: DaemonsArg,
    /// Internal: run as a worker process of another `maru bench`.
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
}

/// How many samples each kind of row takes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: &'static str,
    /// Calls per single-key row.
    pub iters: usize,
    /// Calls per batch row.
    pub batch_iters: usize,
    pub sizes: Vec<u64>,
    /// Owned region of the handlers of the single-client rows.
    pub region: u64,
    pub clients: Vec<u32>,
    /// Calls per client in the concurrency rows.
    pub conc_iters: usize,
    pub connect_pools: Vec<u64>,
    pub connect_samples: usize,
    pub cross_samples: usize,
    pub registry_keys: usize,
    pub floor_iters: usize,
    pub map_samples: usize,
}

impl Plan {
    fn new(mode: &'static str) -> Plan {
        let (iters, batch_iters, conc_iters, connect_samples, cross_samples, registry_keys) =
            match mode {
                "smoke" => (100, 10, 30, 1, 2, 20_000),
                "quick" => (2_000, 200, 500, 3, 5, 1_000_000),
                _ => (20_000, 2_000, 5_000, 10, 20, 1_000_000),
            };
        Plan {
            mode,
            iters,
            batch_iters,
            sizes: vec![4 * KIB, 64 * KIB, MIB, 4 * MIB],
            region: 64 * MIB,
            clients: vec![1, 4, 32],
            conc_iters,
            connect_pools: vec![100 * MIB, GIB],
            connect_samples,
            cross_samples,
            registry_keys,
            floor_iters: iters,
            map_samples: match mode {
                "full" => 5,
                "quick" => 2,
                _ => 1,
            },
        }
    }
}

/// Keys look like LMCache's (`<fmt>@<model>@<world>@<worker>@<hash>`), 40 bytes each, unique
/// within a run.
pub const KEY_LEN: usize = 40;
static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

pub fn key_of(id: u64) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    let s = format!("lmcache@llama3-8b@tp1@0@{id:016x}");
    k.copy_from_slice(s.as_bytes());
    k
}

/// Reserves `n` key ids; returns the first.
pub fn next_key_ids(n: u64) -> u64 {
    NEXT_KEY.fetch_add(n, Ordering::Relaxed)
}

/// `n` fresh keys.
pub fn keys(n: usize) -> Vec<Vec<u8>> {
    let first = next_key_ids(n as u64);
    (0..n as u64).map(|i| key_of(first + i).to_vec()).collect()
}

/// The benchmark run: plan, floors and the rows measured so far.
pub struct Bench {
    pub plan: Plan,
    floors: Floors,
    /// A region description as the server sends it, for the wire sizes of lookups.
    region: RegionInfo,
    rows: Vec<Row>,
    redis: Vec<Row>,
    /// Where the live table goes (stderr when the JSON report goes to stdout).
    out: Box<dyn Write>,
    /// Set while diagnostic rows are measured: their `api` (e.g. `raw`).
    api: Option<&'static str>,
}

impl Bench {
    /// An echo connection with the wire sizes of `op` over `batch` keys, to alternate floor
    /// samples with the row's calls.
    pub fn probe(&self, t: Transport, op: &str, batch: u32) -> anyhow::Result<Probe> {
        let w = wire::wire_of(op, batch as usize, &key_of(0), &self.region)
            .with_context(|| format!("no wire shape for {op}"))?;
        self.floors.probe(t, w.req, w.resp)
    }

    /// [`Bench::probe`] for a row of `chunk`-byte chunks: a row that copies data also samples
    /// a copy of one chunk with every round trip.
    pub fn probe_row(
        &self,
        t: Transport,
        op: &str,
        chunk: u64,
        batch: u32,
    ) -> anyhow::Result<Probe> {
        let mut p = self.probe(t, op, batch)?;
        if let Some(dir) = copy_direction(op) {
            p.attach_copy(self.floors.copy_probe(dir, chunk, self.plan.region)?);
        }
        Ok(p)
    }

    /// Attaches the floor measured by `probe` (alternating with the row) and prints the row.
    pub fn push_probed(&mut self, t: Transport, row: Row, probe: Probe) {
        self.push_with(t, row, Some(probe))
    }

    /// Attaches a floor measured now and prints the row.
    pub fn push(&mut self, t: Transport, row: Row) {
        self.push_with(t, row, None)
    }

    fn push_with(&mut self, t: Transport, mut row: Row, probe: Option<Probe>) {
        if let Some(api) = self.api {
            row.api = api.into();
        }
        let row = match self.with_floor(t, row.clone(), probe) {
            Ok(r) => r,
            Err(e) => row.note(format!("floor not measured: {e:#}")),
        };
        print_row(&mut self.out, &row);
        self.rows.push(row);
    }

    fn push_redis(&mut self, row: Row) {
        let mut row = row;
        row.api = "redis".into();
        print_row(&mut self.out, &row);
        self.redis.push(row);
    }

    fn section(&mut self, title: &str) {
        let _ = writeln!(self.out, "\n== {title}");
        let _ =
            writeln!(
            self.out,
            "{:<20} {:<6} {:<5} {:>6} {:>5} {:>4} {:>10} {:>10} {:>12} {:>7} {:>10} {:>6}  note",
            "op", "api", "trans", "chunk", "batch", "cli", "p50 us", "p99 us", "ops/s", "GB/s",
            "floor us", "ratio"
        );
        let _ = self.out.flush();
    }

    /// The row's floor: a ping-pong of its exact message sizes (times its round trips), plus
    /// a raw memcpy of every chunk it copies; for `connect`, populating the pool; for a first
    /// retrieve, a round trip plus mapping the region.
    fn with_floor(&self, t: Transport, mut row: Row, probe: Option<Probe>) -> anyhow::Result<Row> {
        if row.is_skipped() {
            return Ok(row);
        }
        let key = key_of(0);
        let op = row.op.as_str();
        let (floor_us, what, gbps) = match op {
            "connect" => {
                let p = self.floors.map("populate", row.chunk_bytes)?;
                (
                    p.p50_us,
                    format!("mmap+populate {}", size(row.chunk_bytes)),
                    None,
                )
            }
            _ => {
                let w = wire::wire_of(op, row.batch as usize, &key, &self.region)
                    .with_context(|| format!("no wire shape for {op}"))?;
                let why = format!(
                    "{} {} {} x{} {}",
                    row.api,
                    op,
                    size(row.chunk_bytes),
                    row.batch,
                    t.name()
                );
                let mut copy_samples = None;
                let (rtt, how) = match probe {
                    Some(p) if p.samples.summary().n > 0 && p.sizes() == (w.req, w.resp) => {
                        copy_samples = p.copy.as_ref().map(|c| c.samples.clone());
                        (
                            self.floors.record(t, w.req, w.resp, &p.samples, &why),
                            "alternating",
                        )
                    }
                    _ => (self.floors.rtt(t, w.req, w.resp, &why)?, "after"),
                };
                let mut us = rtt.p50_us * w.trips as f64;
                let mut what = format!("rtt {}B/{}B ({how})", w.req, w.resp);
                let mut gbps = None;
                if let Some(dir) = copy_direction(op) {
                    // The copies sampled alternating with the row; else one measured now.
                    let alternating = copy_samples
                        .map(|s| s.summary())
                        .filter(|m| m.n > 0 && m.p50_us > 0.0);
                    let (copy_us, copy_gbps, how) = match alternating {
                        Some(m) => (
                            m.p50_us,
                            round3(row.chunk_bytes as f64 / (m.p50_us * 1e3)),
                            "alternating",
                        ),
                        None => {
                            let c = self.floors.copy(dir, row.chunk_bytes, self.plan.region)?;
                            (c.p50_us, c.gbps, "measured once")
                        }
                    };
                    let n = row.batch.max(1) as f64;
                    us += copy_us * n;
                    what.push_str(&format!(
                        " + {}x memcpy {dir} {} ({how})",
                        n,
                        size(row.chunk_bytes)
                    ));
                    gbps = Some(copy_gbps);
                }
                if op == "first_retrieve_1gib" {
                    let m = self.floors.map("map", GIB)?;
                    us += m.p50_us;
                    what.push_str(" + mmap 1G");
                }
                (us, what, gbps)
            }
        };
        row.floor_us = Some(round3(floor_us));
        row.floor_gbps = gbps;
        row.floor = what;
        if floor_us > 0.0 {
            row.ratio = Some(round3(row.p50_us / floor_us));
        }
        Ok(row)
    }
}

/// Which way a row's chunks are copied, if it copies any: into shared memory (stores) or out
/// of it (`retrieve_copy`).
fn copy_direction(op: &str) -> Option<&'static str> {
    match op {
        "store" | "store_existing" | "batch_store" => Some("into"),
        "retrieve_copy" => Some("out"),
        _ => None,
    }
}

fn size(n: u64) -> String {
    match n {
        0 => "-".into(),
        n if n >= GIB && n % GIB == 0 => format!("{}G", n / GIB),
        n if n >= MIB && n % MIB == 0 => format!("{}M", n / MIB),
        n if n >= KIB && n % KIB == 0 => format!("{}K", n / KIB),
        n => format!("{n}B"),
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|v| format!("{v:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

fn print_row(out: &mut Box<dyn Write>, r: &Row) {
    let who = if r.processes {
        format!("{}p", r.clients)
    } else {
        r.clients.to_string()
    };
    let op = if r.contended {
        format!("{}*", r.op)
    } else {
        r.op.clone()
    };
    let _ = writeln!(
        out,
        "{:<20} {:<6} {:<5} {:>6} {:>5} {:>4} {:>10.2} {:>10.2} {:>12.0} {:>7} {:>10} {:>6}  {}",
        op,
        r.api,
        r.transport,
        size(r.chunk_bytes),
        r.batch,
        who,
        r.p50_us,
        r.p99_us,
        r.ops_per_s,
        opt(r.gbps, 2),
        opt(r.floor_us, 2),
        opt(r.ratio, 2),
        r.note.as_deref().unwrap_or(""),
    );
    let _ = out.flush();
}

#[derive(Debug, Serialize)]
struct Machine {
    cpus: usize,
    cpu_model: String,
    kernel: String,
    /// 1-minute load average when the run started and ended (other work on the machine).
    load_start: f64,
    load_end: f64,
    unix_time: u64,
    pid: u32,
    /// Where client and daemons ran (`--placement`).
    placement: String,
    /// Whether idle CPUs were kept out of halt (see `--let-cpus-idle`).
    spinners: bool,
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn machine(load_start: f64, placement: String, spinners: bool) -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    Machine {
        cpus: cpu::cpu_count(),
        cpu_model,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        load_start,
        load_end: loadavg(),
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        pid: std::process::id(),
        placement,
        spinners,
    }
}

#[derive(Debug, Serialize)]
struct FloorReport {
    /// Ping-pong p50 of a 64-byte request and a 64-byte reply.
    tcp_rtt_us: f64,
    uds_rtt_us: f64,
    /// memcpy of a 4 MiB chunk into a populated shared mapping, GB/s at p50.
    memcpy_gbps: f64,
    /// The same out of the mapping.
    memcpy_out_gbps: f64,
    rtt: Vec<RttFloor>,
    memcpy: Vec<CopyFloor>,
    map: Vec<MapFloor>,
}

/// A target from the issue, checked against this run.
#[derive(Debug, Serialize)]
struct Target {
    target: String,
    api: String,
    transport: String,
    value: f64,
    limit: f64,
    met: bool,
    detail: String,
}

#[derive(Debug, Serialize)]
struct Report {
    version: &'static str,
    mode: &'static str,
    machine: Machine,
    floor: FloorReport,
    results: Vec<Row>,
    bytes_per_key: Option<f64>,
    register_keys_per_s: Option<f64>,
    registration: Option<registry::Registration>,
    redis: Vec<Row>,
    notes: Vec<String>,
    targets: Vec<Target>,
    elapsed_s: f64,
}

fn transport_of(url: &str) -> Transport {
    if url.starts_with("unix://") {
        Transport::Unix
    } else {
        Transport::Tcp
    }
}

/// Reads the description of the region a freshly stored key lives in, as the server sends it
/// in lookups (its pool path and owner string set the size of every lookup reply).
fn probe_region(url: &str) -> anyhow::Result<RegionInfo> {
    let h = rows::handler(url, 4 * KIB, 2 * MIB, false)?;
    let k = keys(1).remove(0);
    h.store_bytes(&k, &[], &[1u8; 64])?;
    let parsed: maru_proto::ServerUrl = url.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut c =
        maru_transport::BlockingConn::connect_admin(&parsed, std::time::Duration::from_secs(10))?;
    let r = match c.call(&maru_proto::Request::Lookup { key: &k })? {
        maru_proto::Response::Lookup(Some(loc)) => loc.region,
        other => bail!("lookup answered {other:?}"),
    };
    let _ = c.call(&maru_proto::Request::Goodbye);
    h.delete(&k)?;
    h.close();
    Ok(r)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(spec) = &args.worker {
        return worker::run(spec);
    }
    let started = Instant::now();
    let load_start = loadavg();
    daemons::install_interrupt_cleanup()?;
    let mode = if args.smoke {
        "smoke"
    } else if args.quick {
        "quick"
    } else {
        "full"
    };
    let mut plan = Plan::new(mode);
    if !args.sizes.is_empty() {
        plan.sizes = args.sizes.clone();
    }
    let on = |s: Section| args.only.is_empty() || args.only.contains(&s);
    let to_stdout = args.json.as_deref() == Some("-");
    let out: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    let spinners = (!args.let_cpus_idle).then(cpu::Spinners::start);
    let placement = cpu::place(args.placement);
    let scratch = Scratch::new(&args.pool_dir, "scratch")?;
    let floors = Floors::new(&scratch.path, plan.floor_iters, plan.map_samples);
    let mut notes = Vec::new();

    // The daemons: embedded unless a server was named.
    let floors_only = !args.only.is_empty() && args.only.iter().all(|s| *s == Section::Floor);
    let embedded = if args.server.is_empty() && !floors_only {
        // Room for the largest connect pool, the 1 GiB cross-process region and the rows'
        // own regions at once; sparse, so only what is populated takes memory.
        Some(cpu::on_server_side(|| match args.daemons {
            DaemonsArg::InProcess => Embedded::start(&args.pool_dir, 4 * GIB, "pool"),
            DaemonsArg::Process => Embedded::start_process(&args.pool_dir, 4 * GIB, "pool"),
        })?)
    } else {
        None
    };
    let mut urls: Vec<String> = match &embedded {
        Some(e) => vec![e.tcp_url.clone(), e.unix_url.clone()],
        None => args.server.clone(),
    };
    urls.retain(|u| match args.transport {
        TransportArg::Tcp => transport_of(u) == Transport::Tcp,
        TransportArg::Unix => transport_of(u) == Transport::Unix,
        TransportArg::Both => true,
    });
    let transports: Vec<Transport> = urls.iter().map(|u| transport_of(u)).collect();

    let region = match urls.first() {
        Some(u) => probe_region(u).unwrap_or_else(|e| {
            notes.push(format!(
                "region probe failed ({e:#}); lookup sizes are estimated"
            ));
            wire::synthetic_region("/dev/shm/maru/maru-5555.pool")
        }),
        None => wire::synthetic_region("/dev/shm/maru/maru-5555.pool"),
    };
    let mut b = Bench {
        plan,
        floors,
        region,
        rows: Vec::new(),
        redis: Vec::new(),
        out,
        api: None,
    };
    let _ = writeln!(
        b.out,
        "maru bench ({mode}): {} CPUs{}, {placement}, load {load_start:.2}; servers: {}",
        cpu::cpu_count(),
        if args.let_cpus_idle {
            ""
        } else {
            " kept out of halt by SCHED_IDLE spinners"
        },
        if urls.is_empty() {
            "none".into()
        } else {
            urls.join(", ")
        }
    );

    // Headline floors first (64-byte ping-pong, 4 MiB memcpy), so even a floor-only run has
    // them.
    let tcp_rtt = b.floors.rtt(Transport::Tcp, 64, 64, "headline")?.p50_us;
    let uds_rtt = b.floors.rtt(Transport::Unix, 64, 64, "headline")?.p50_us;
    let memcpy_in = b.floors.copy("into", 4 * MIB, b.plan.region)?.gbps;
    let memcpy_out = b.floors.copy("out", 4 * MIB, b.plan.region)?.gbps;
    let _ = writeln!(
        b.out,
        "floors: tcp rtt {tcp_rtt:.2} us, uds rtt {uds_rtt:.2} us (64 B ping-pong p50); \
         memcpy 4 MiB into shm {memcpy_in:.2} GB/s, out {memcpy_out:.2} GB/s"
    );

    if on(Section::Rust) {
        for (u, &t) in urls.iter().zip(&transports) {
            b.section(&format!("Rust client, one client, {}", t.name()));
            rows::run(&mut b, t, u).with_context(|| format!("rust rows over {u}"))?;
        }
    }
    if on(Section::Python) && !urls.is_empty() {
        b.section("Python package, one client (* = another Python thread burning CPU)");
        let located = if args.no_python {
            Err("--no-python".to_owned())
        } else {
            python::locate(args.python.as_deref())
        };
        match located {
            Ok((py, script)) => {
                if let Err(e) = python::run(&mut b, &py, &script, &urls, mode) {
                    let _ = writeln!(b.out, "python rows failed: {e:#}");
                    notes.push(format!("python rows failed: {e:#}"));
                }
            }
            Err(why) => {
                let _ = writeln!(b.out, "python rows skipped: {why}");
                notes.push(format!("python rows skipped: {why}"));
            }
        }
    }
    if on(Section::Cross) {
        for (u, &t) in urls.iter().zip(&transports) {
            b.section(&format!("Across processes, {}", t.name()));
            cross::run(&mut b, t, u).with_context(|| format!("cross-process rows over {u}"))?;
        }
    }
    if on(Section::Concurrency) {
        // Many clients use every CPU (the daemons stay where they are).
        cpu::unpin_current();
        for (u, &t) in urls.iter().zip(&transports) {
            b.section(&format!("Concurrency (retrieve 4 KiB), {}", t.name()));
            concurrency::run(&mut b, t, u).with_context(|| format!("concurrency over {u}"))?;
        }
        cpu::enter_client_side();
    }
    if on(Section::Connect) {
        for (u, &t) in urls.iter().zip(&transports) {
            b.section(&format!("Connect, {}", t.name()));
            connect::run(&mut b, t, u).with_context(|| format!("connect over {u}"))?;
        }
        if !transports.is_empty() {
            b.section("Connect on 2 MiB pages");
            if let Err(e) = connect::run_huge(&mut b, &transports) {
                notes.push(format!("2 MiB-page connect rows failed: {e:#}"));
            }
        }
    }
    if on(Section::Redis) && !transports.is_empty() {
        if args.no_redis {
            notes.push("redis skipped: --no-redis".into());
        } else if !redis::available() {
            let msg = "redis skipped: redis-server is not on PATH (Debian: apt-get install \
                       redis-server)";
            let _ = writeln!(b.out, "\n{msg}");
            notes.push(msg.into());
        } else {
            b.section("Redis side by side (same client style, persistence off)");
            let r = cpu::on_server_side(|| redis::Redis::start(&scratch.path))?;
            redis::run(&mut b, &r, &transports, &urls)?;
            drop(r);
        }
    }
    let mut registration = None;
    if on(Section::Registry) && !urls.is_empty() {
        let _ = writeln!(b.out, "\n== Server memory per key and batched registration");
        let n = b.plan.registry_keys;
        let reg = registry::run(&urls[0], n, embedded.as_ref().map(|e| e.pid))
            .context("registration benchmark")?;
        let _ = writeln!(
            b.out,
            "{} keys of {} bytes: {} bytes/key, {:.0} keys/s registered (batches of {}), {:.0} keys/s deleted",
            reg.keys,
            reg.key_bytes,
            opt(reg.bytes_per_key, 1),
            reg.register_keys_per_s,
            reg.batch,
            reg.delete_keys_per_s
        );
        registration = Some(reg);
    }
    drop(embedded);

    let redis_rows = compare_redis(&b.rows, std::mem::take(&mut b.redis));
    if !redis_rows.is_empty() {
        let _ = writeln!(b.out, "\n== Maru / Redis (p50; below 1.00 Maru is faster)");
        for r in &redis_rows {
            let _ = writeln!(
                b.out,
                "{:<7} {:<5} {:>5} x{:<4} redis {:>9.2} us   vs {:<36} ratio {}",
                r.op,
                r.transport,
                size(r.chunk_bytes),
                r.batch,
                r.p50_us,
                r.floor,
                opt(r.ratio, 2)
            );
        }
    }
    let floor = FloorReport {
        tcp_rtt_us: tcp_rtt,
        uds_rtt_us: uds_rtt,
        memcpy_gbps: memcpy_in,
        memcpy_out_gbps: memcpy_out,
        rtt: b.floors.all_rtt(),
        memcpy: b.floors.all_copies(),
        map: b.floors.all_maps(),
    };
    let targets = check_targets(&b.rows, &redis_rows, &floor, registration.as_ref());
    if !targets.is_empty() {
        let _ = writeln!(b.out, "\n== Targets (issue 6)");
        for t in &targets {
            let _ = writeln!(
                b.out,
                "{} {:<58} {:<6} {:<5} {:>10.3} (limit {:>8.3})  {}",
                if t.met { "MET   " } else { "MISSED" },
                t.target,
                t.api,
                t.transport,
                t.value,
                t.limit,
                t.detail
            );
        }
    }
    for n in &notes {
        let _ = writeln!(b.out, "note: {n}");
    }
    let report = Report {
        version: env!("CARGO_PKG_VERSION"),
        mode,
        machine: machine(load_start, placement, !args.let_cpus_idle),
        floor,
        results: std::mem::take(&mut b.rows),
        bytes_per_key: registration.as_ref().and_then(|r| r.bytes_per_key),
        register_keys_per_s: registration.as_ref().map(|r| r.register_keys_per_s),
        registration,
        redis: redis_rows,
        notes,
        targets,
        elapsed_s: round3(started.elapsed().as_secs_f64()),
    };
    let _ = writeln!(
        b.out,
        "\nmaru bench: done in {:.1} s (load {:.2} -> {:.2})",
        report.elapsed_s, report.machine.load_start, report.machine.load_end
    );
    match args.json.as_deref() {
        Some("-") => {
            let mut so = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut so, &report)?;
            writeln!(so)?;
        }
        Some(path) => {
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("cannot write {path}"))?;
        }
        None => {}
    }
    drop(scratch);
    drop(spinners);
    Ok(())
}

/// Redis rows carry their alternating Maru measurement (see `redis::paired`); rows without
/// one get the matching Maru row of this run (Rust client, same transport).
fn compare_redis(maru: &[Row], redis: Vec<Row>) -> Vec<Row> {
    redis
        .into_iter()
        .map(|mut r| {
            if r.ratio.is_some() {
                return r;
            }
            let Some((op, chunk, batch)) = redis::maru_match(&r) else {
                return r;
            };
            let m = maru.iter().find(|m| {
                m.api == "rust"
                    && m.op == op
                    && m.chunk_bytes == chunk
                    && m.batch == batch
                    && m.transport == r.transport
                    && m.clients == 1
                    && !m.is_skipped()
            });
            r.floor = format!("maru {op} {} x{batch}", size(chunk));
            if let Some(m) = m {
                r.floor_us = Some(m.p50_us);
                r.floor.push_str(&format!(" {:.2} us", m.p50_us));
                if r.p50_us > 0.0 {
                    r.ratio = Some(round3(m.p50_us / r.p50_us));
                }
            }
            r
        })
        .collect()
}

fn check_targets(
    rows: &[Row],
    redis: &[Row],
    floor: &FloorReport,
    reg: Option<&registry::Registration>,
) -> Vec<Target> {
    let mut out = Vec::new();
    // The targets are for the Python API; without Python rows, the Rust rows stand in.
    let api = if rows.iter().any(|r| r.api == "python") {
        "python"
    } else {
        "rust"
    };
    // Rows with a note are variants (e.g. `store` with write-behind); the targets are judged
    // on the plain rows, and on the write-behind store separately below.
    let find_note =
        |op: &str, chunk: u64, batch: u32, transport: &str, contended: bool, note: Option<&str>| {
            rows.iter().find(|r| {
                r.api == api
                    && r.note.as_deref() == note
                    && r.op == op
                    && r.chunk_bytes == chunk
                    && r.batch == batch
                    && r.transport == transport
                    && r.contended == contended
                    && r.clients == 1
                    && !r.processes
                    && !r.is_skipped()
            })
        };
    let find = |op: &str, chunk: u64, batch: u32, transport: &str, contended: bool| {
        find_note(op, chunk, batch, transport, contended, None)
    };
    for transport in ["tcp", "unix"] {
        let raw = if transport == "tcp" {
            floor.tcp_rtt_us
        } else {
            floor.uds_rtt_us
        };
        for (op, limit) in [("retrieve", 1.25), ("exists", 1.25), ("store", 1.5)] {
            if let Some(r) = find(op, 4 * KIB, 1, transport, false) {
                if let Some(ratio) = r.ratio {
                    out.push(Target {
                        target: format!("{op} 4K p50 <= {limit}x floor"),
                        api: api.into(),
                        transport: transport.into(),
                        value: ratio,
                        limit,
                        met: ratio <= limit,
                        detail: format!("p50 {:.2} us vs floor {}", r.p50_us, opt(r.floor_us, 2)),
                    });
                }
            }
            if let Some(r) = find(op, 4 * KIB, 1, transport, true) {
                if let Some(f) = r.floor_us {
                    let v = round3(r.p99_us / f);
                    out.push(Target {
                        target: format!("{op} 4K contended p99 <= 3x floor"),
                        api: api.into(),
                        transport: transport.into(),
                        value: v,
                        limit: 3.0,
                        met: v <= 3.0,
                        detail: format!("p99 {:.2} us vs floor {f:.2}", r.p99_us),
                    });
                }
            }
        }
        for op in ["batch_exists", "batch_retrieve"] {
            if let Some(r) = find(op, 4 * KIB, 256, transport, false) {
                let v = round3(r.p50_us / raw);
                out.push(Target {
                    target: format!("{op}(256) p50 <= 4x one 64 B round trip"),
                    api: api.into(),
                    transport: transport.into(),
                    value: v,
                    limit: 4.0,
                    met: v <= 4.0,
                    detail: format!("p50 {:.2} us vs rtt {raw:.2}", r.p50_us),
                });
            }
        }
        for (chunk, note) in [
            (MIB, None),
            (4 * MIB, None),
            (MIB, Some("write_behind")),
            (4 * MIB, Some("write_behind")),
        ] {
            if let Some(r) = find_note("store", chunk, 1, transport, false, note) {
                if let (Some(g), Some(f)) = (r.gbps, r.floor_gbps) {
                    let v = round3(g / f);
                    let how = note.map(|n| format!(" ({n})")).unwrap_or_default();
                    out.push(Target {
                        target: format!("store {}{how} >= 85% of memcpy bandwidth", size(chunk)),
                        api: api.into(),
                        transport: transport.into(),
                        value: v,
                        limit: 0.85,
                        met: v >= 0.85,
                        detail: format!("{g:.2} GB/s vs memcpy {f:.2}"),
                    });
                }
            }
        }
        if let Some(r) = rows
            .iter()
            .find(|r| r.op == "first_retrieve_1gib" && r.transport == transport && !r.is_skipped())
        {
            out.push(Target {
                target: "first retrieve from an unmapped 1 GiB region <= 1 ms".into(),
                api: r.api.clone(),
                transport: transport.into(),
                value: r.p50_us / 1e3,
                limit: 1.0,
                met: r.p50_us <= 1e3,
                detail: format!("p50 {:.1} us, p99 {:.1} us", r.p50_us, r.p99_us),
            });
        }
    }
    if let Some(reg) = reg {
        if let Some(bpk) = reg.bytes_per_key {
            // The target is the server's overhead beyond the key's own bytes (issue 3's
            // definition); the measurement includes them, so they are taken off here.
            let overhead = bpk - reg.key_bytes as f64;
            out.push(Target {
                target: "server overhead per key (beyond the key bytes) <= 100".into(),
                api: "server".into(),
                transport: "-".into(),
                value: round3(overhead),
                limit: 100.0,
                met: overhead <= 100.0,
                detail: format!(
                    "{} keys of {} bytes: {:.1} bytes per key in all",
                    reg.keys, reg.key_bytes, bpk
                ),
            });
        }
        out.push(Target {
            target: "batched registration >= 1M keys/s".into(),
            api: "server".into(),
            transport: "-".into(),
            value: reg.register_keys_per_s,
            limit: 1e6,
            met: reg.register_keys_per_s >= 1e6,
            detail: format!("batches of {}", reg.batch),
        });
    }
    for r in redis.iter().filter(|r| r.chunk_bytes == 64) {
        if let Some(ratio) = r.ratio {
            out.push(Target {
                target: format!("faster than Redis {} x{} (metadata)", r.op, r.batch),
                api: "rust".into(),
                transport: r.transport.clone(),
                value: ratio,
                limit: 1.0,
                met: ratio < 1.0,
                detail: format!("redis {:.2} us vs {}", r.p50_us, r.floor),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fixed_length_and_unique() {
        let ks = keys(3);
        assert!(ks.iter().all(|k| k.len() == KEY_LEN));
        assert_ne!(ks[0], ks[1]);
        assert_eq!(size(4096), "4K");
        assert_eq!(size(GIB), "1G");
        assert_eq!(size(64), "64B");
    }
}
