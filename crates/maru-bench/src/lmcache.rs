//! An LMCache-shaped load (`--only lmcache`): `benchmarks/lmcache_workload.py` runs 1 to 32
//! reader processes that each serve requests the way LMCache's Maru backend does (pin a
//! request's chunks, retrieve the hit prefix, copy it out, unpin) while a writer process
//! stores 1 MiB chunks from two threads. It reports requests/s, p50/p99 and wrong answers per
//! reader count, against this run's floors: a request's floor is three round trips plus the
//! copy of its hit chunks at the run's memcpy-out bandwidth.

use std::io::Write;
use std::path::Path;

use crate::table::Out;

/// Runs the workload against `url`, prints its table and returns the script's report.
pub fn run(
    py: &Path,
    bench_script: &Path,
    url: &str,
    mode: &str,
    rtt_us: f64,
    memcpy_out_gbps: f64,
    out: &mut Out,
) -> anyhow::Result<serde_json::Value> {
    let script = bench_script.with_file_name("lmcache_workload.py");
    let (rtt, memcpy) = (rtt_us.to_string(), memcpy_out_gbps.to_string());
    let flag = match mode {
        "smoke" => Some("--smoke"),
        "quick" => Some("--quick"),
        _ => None,
    };
    let args = ["--server", url, "--rtt-us", &rtt, "--memcpy-gbps", &memcpy];
    let v = crate::python::run_json_script(py, &script, &args, flag)?;
    let _ = writeln!(
        out,
        "{} x {} B chunks per request, 2 writer threads storing chunks of the same size",
        v["chunks_per_request"], v["chunk_bytes"]
    );
    let _ = writeln!(
        out,
        "{:>9} {:>10} {:>10} {:>11} {:>12} {:>10} {:>8} {:>10}",
        "readers", "req/s", "vs one", "p50 us", "p99 us", "p99/floor", "wrong", "store GB/s"
    );
    for r in v["rows"].as_array().into_iter().flatten() {
        // A JSON value's Display ignores widths: format each as a string first.
        let cell = |f: &str| r[f].to_string();
        let _ = writeln!(
            out,
            "{:>9} {:>10} {:>10} {:>11} {:>12} {:>10} {:>8} {:>10}",
            cell("processes"),
            cell("requests_per_s"),
            cell("throughput_vs_one"),
            cell("p50_us"),
            cell("p99_us"),
            cell("p99_vs_floor"),
            cell("wrong"),
            cell("store_gbps")
        );
    }
    Ok(v)
}
