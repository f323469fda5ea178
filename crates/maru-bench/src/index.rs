//! The key index in shared memory (`--only index`): reads without a round trip from Python
//! (`benchmarks/index_bench.py`: `exists`, `batch_exists(512)`, `batch_retrieve_into` of
//! 4 KiB chunks against a plain copy of the same bytes in the same process, and against this
//! run's floor, memcpy out of a shm region), and a restart:
//! a server with N keys (1M in the quick and full runs) shut down and started again on its
//! index, timed from the start call until a lookup of a restored key is answered.
//!
//! These daemons are this section's own (the index is on), in this process.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use maru_proto::{Request, Response, ServerUrl};
use serde::Serialize;

use crate::daemons::Scratch;
use crate::plan::{key_of, next_key_ids, KEY_LEN};
use crate::registry::{connect, register_keys};
use crate::table::Out;

#[derive(Debug, Clone, Serialize)]
pub struct IndexReport {
    pub keys: u64,
    /// From `maru_server::start` on the re-attached index to the first answered lookup.
    pub restart_s: f64,
    /// CPU time of this process while `maru_server::start` ran (the re-attach and the
    /// rebuild, on the starting thread and the rebuild's helper, and the in-process resource
    /// manager's answers): on a loaded machine the wall time is mostly waiting for a CPU.
    pub restart_cpu_s: f64,
    /// Keys the restarted server serves.
    pub restored_keys: u64,
    /// What `benchmarks/index_bench.py` measured (absent without the project's `.venv`).
    pub python: Option<serde_json::Value>,
    pub note: String,
}

fn server_cfg(dir: &Path, rm_url: ServerUrl, keys: u64) -> maru_server::ServerConfig {
    maru_server::ServerConfig {
        tcp: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        unix: Some(dir.join("server.sock")),
        rm_url,
        index: Some(maru_server::IndexConfig {
            capacity: keys + 100_000,
            key_area_bytes: (keys + 100_000) * KEY_LEN.div_ceil(8) as u64 * 8,
            ..maru_server::IndexConfig::at(dir.join("keys.index"))
        }),
        ..Default::default()
    }
}

/// Registers `n` keys into one 2 MiB region, one byte each (the keys' bytes stay far below
/// the eviction watermarks); returns the first key's id.
fn fill(url: &ServerUrl, n: usize) -> anyhow::Result<u64> {
    let mut c = connect(url, "bench-index-fill")?;
    let region = match c.call(&Request::RequestRegion { size: 2 << 20 })? {
        Response::Region(r) => r,
        other => bail!("request_region answered {other:?}"),
    };
    let first = next_key_ids(n as u64);
    register_keys(&mut c, &region.handle, first, n, 1)?;
    let _ = c.call(&Request::Goodbye);
    Ok(first)
}

/// CPU time of this process, every thread (those gone included) but the bench's idle
/// spinners (`cpu::Spinners`, which fill idle time and would count it as work): the process
/// clock less the spinners' time on a CPU (their `schedstat`).
fn process_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is writable storage of the right type; the clock id is a kernel constant.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    let all = ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
    let mut spinning_ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = task.path();
        let idle = std::fs::read_to_string(p.join("comm"))
            .is_ok_and(|c| c.starts_with(crate::cpu::SPINNER_NAME));
        if idle {
            let stat = std::fs::read_to_string(p.join("schedstat")).unwrap_or_default();
            spinning_ns += stat
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    all - spinning_ns as f64 * 1e-9
}

pub fn run(
    pool_dir: &Path,
    keys: usize,
    py: Option<(&Path, &Path)>,
    quick: bool,
    memcpy_out_gbps: f64,
    out: &mut Out,
) -> anyhow::Result<IndexReport> {
    let scratch = Scratch::new(pool_dir, "index")?;
    let dir = &scratch.path;
    let spec = format!("shm:{}:{}", dir.join("index.pool").display(), 256u64 << 20);
    let mut rm_cfg = maru_resource_manager::RmConfig::new(
        dir.join("state"),
        vec![spec.parse().map_err(|e| anyhow::anyhow!("{e}"))?],
    );
    rm_cfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let rm = maru_resource_manager::start(rm_cfg).context("resource manager failed to start")?;
    let server = maru_server::start(server_cfg(dir, rm.url(), keys as u64))
        .context("metadata server failed to start")?;
    let unix = format!("unix://{}", dir.join("server.sock").display());
    let python = match py {
        Some((py, script)) => {
            let script = script.with_file_name("index_bench.py");
            let quick = quick.then_some("--quick");
            match crate::python::run_json_script(py, &script, &["--server", &unix], quick) {
                Ok(mut v) => {
                    // Against this run's floor: memcpy of 4 MiB out of a shm region.
                    for b in [32, 512] {
                        let gbps = v[format!("batch_retrieve_into_{b}_gbps")].as_f64();
                        if let (Some(g), Some(o)) = (gbps, v.as_object_mut()) {
                            o.insert(
                                format!("batch_retrieve_into_{b}_vs_memcpy_out_floor"),
                                ((g / memcpy_out_gbps * 1000.0).round() / 1000.0).into(),
                            );
                        }
                    }
                    let _ = writeln!(out, "python: {v}");
                    Some(v)
                }
                Err(e) => {
                    let _ = writeln!(out, "python rows not measured: {e:#}");
                    None
                }
            }
        }
        None => None,
    };
    let url = server.url();
    let first = fill(&url, keys)?;
    server.shutdown();

    let t0 = Instant::now();
    let cpu0 = process_cpu_s();
    let server = maru_server::start(server_cfg(dir, rm.url(), keys as u64))
        .context("the restarted server")?;
    let cpu = process_cpu_s() - cpu0;
    let mut c = connect(&server.url(), "bench-index-restart")?;
    let key = key_of(first + keys as u64 - 1);
    match c.call(&Request::Lookup { key: &key })? {
        Response::Lookup(Some(_)) => {}
        other => bail!(
            "a restored key's lookup answered {other:?} ({} keys restored)",
            server.stats().keys
        ),
    }
    let restart = t0.elapsed();
    let restored = server.stats().keys;
    let _ = c.call(&Request::Goodbye);
    drop(c);
    server.shutdown();
    rm.shutdown();
    let _ = writeln!(
        out,
        "restart with {keys} keys: serving again after {:.3} s, {cpu:.3} s of CPU to start \
         ({restored} keys restored)",
        restart.as_secs_f64()
    );
    Ok(IndexReport {
        keys: keys as u64,
        restart_s: (restart.as_secs_f64() * 1000.0).round() / 1000.0,
        restart_cpu_s: (cpu * 1000.0).round() / 1000.0,
        restored_keys: restored,
        python,
        note: "restart: in-process server, its resource manager kept running".into(),
    })
}
