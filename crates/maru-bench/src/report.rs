//! The JSON report of a run (`--json`; its shape is in benchmarks/README.md) and the facts
//! about the machine it carries.

use std::io::Write;

use anyhow::Context;
use serde::Serialize;

use crate::cpu;
use crate::eviction::EvictionReport;
use crate::floor::{CopyFloor, MapFloor, RttFloor};
use crate::registry::Registration;
use crate::stats::Row;
use crate::targets::Target;

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    /// 1-minute load average when the run started and ended (other work on the machine).
    pub load_start: f64,
    pub load_end: f64,
    pub unix_time: u64,
    pub pid: u32,
    /// Where client and daemons ran (`--placement`).
    pub placement: String,
    /// Whether idle CPUs were kept out of halt (see `--let-cpus-idle`).
    pub spinners: bool,
}

impl Machine {
    /// This machine now; `load_start` is the load average read when the run started.
    pub fn now(load_start: f64, placement: String, spinners: bool) -> Machine {
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
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

#[derive(Debug, Serialize)]
pub struct FloorReport {
    /// Ping-pong p50 of a 64-byte request and a 64-byte reply.
    pub tcp_rtt_us: f64,
    pub uds_rtt_us: f64,
    /// memcpy of a 4 MiB chunk into a populated shared mapping, GB/s at p50.
    pub memcpy_gbps: f64,
    /// The same out of the mapping.
    pub memcpy_out_gbps: f64,
    pub rtt: Vec<RttFloor>,
    pub memcpy: Vec<CopyFloor>,
    pub map: Vec<MapFloor>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub version: &'static str,
    pub mode: &'static str,
    pub machine: Machine,
    pub floor: FloorReport,
    pub results: Vec<Row>,
    pub bytes_per_key: Option<f64>,
    pub register_keys_per_s: Option<f64>,
    pub registration: Option<Registration>,
    /// Hit ratios of the eviction policies against exact LRU (`--only eviction`).
    pub eviction: Option<EvictionReport>,
    /// The key index's reads and restart (`--only index`).
    pub index: Option<crate::index::IndexReport>,
    /// What `benchmarks/lmcache_workload.py` measured (`--only lmcache`).
    pub lmcache: Option<serde_json::Value>,
    pub redis: Vec<Row>,
    pub notes: Vec<String>,
    pub targets: Vec<Target>,
    pub elapsed_s: f64,
}

impl Report {
    /// Writes the report to `path` (`-`: standard output).
    pub fn write(&self, path: &str) -> anyhow::Result<()> {
        if path == "-" {
            let mut so = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut so, self)?;
            writeln!(so)?;
            return Ok(());
        }
        std::fs::write(path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {path}"))
    }
}
