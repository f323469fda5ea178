//! The Python rows: `benchmarks/bench.py` measures the single-client rows through the public
//! `maru` package (how users call it), also with another Python thread burning CPU
//! (`contended`). `maru bench` runs it as a child process against the same daemons, when the
//! project's `.venv` (made by scripts/setup.sh) is there, and gives its rows floors from this
//! run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use serde::Deserialize;

use super::daemons::{track_child, untrack_child};
use super::stats::Row;

/// A row as bench.py prints it (the shape).
#[derive(Debug, Deserialize)]
struct PyRow {
    op: String,
    transport: String,
    chunk_bytes: u64,
    batch: u32,
    clients: u32,
    contended: bool,
    p50_us: f64,
    p99_us: f64,
    ops_per_s: f64,
    gbps: Option<f64>,
    #[serde(default)]
    samples: usize,
    #[serde(default)]
    note: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PyReport {
    results: Vec<PyRow>,
}

/// The repository holding `benchmarks/bench.py`: the current directory or one above it, or
/// above this executable (`target/release/maru`).
fn repo_root() -> Option<PathBuf> {
    let mut starts = vec![std::env::current_dir().ok()?];
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    starts.iter().find_map(|s| {
        s.ancestors()
            .find(|d| d.join("benchmarks/bench.py").is_file())
            .map(Path::to_path_buf)
    })
}

/// The interpreter and script to run, or why the Python rows are skipped.
pub fn locate(python: Option<&Path>) -> Result<(PathBuf, PathBuf), String> {
    let root = repo_root().ok_or("benchmarks/bench.py not found (run from the repository)")?;
    let script = root.join("benchmarks/bench.py");
    let py = match python {
        Some(p) => p.to_owned(),
        None => {
            let venv = root.join(".venv/bin/python");
            if !venv.is_file() {
                return Err(format!(
                    "{} not found (./scripts/setup.sh creates it)",
                    venv.display()
                ));
            }
            venv
        }
    };
    Ok((py, script))
}

/// Runs bench.py against `urls` and returns its rows (api `python`, floors not yet set).
pub fn run(py: &Path, script: &Path, urls: &[String], mode: &str) -> anyhow::Result<Vec<Row>> {
    let mut cmd = Command::new(py);
    cmd.arg(script)
        .args(["--json", "-", "--no-floor", "--quiet"]);
    if mode != "full" {
        cmd.arg(format!("--{mode}"));
    }
    for u in urls {
        cmd.arg("--server").arg(u);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot run {}", py.display()))?;
    track_child(child.id());
    let pid = child.id();
    let out = child.wait_with_output();
    untrack_child(pid);
    let out = out?;
    if !out.status.success() {
        bail!(
            "{} {} failed: {}",
            py.display(),
            script.display(),
            out.status
        );
    }
    let report: PyReport =
        serde_json::from_slice(&out.stdout).context("bench.py printed no JSON report")?;
    Ok(report
        .results
        .into_iter()
        .map(|p| Row {
            op: p.op,
            transport: p.transport,
            chunk_bytes: p.chunk_bytes,
            batch: p.batch,
            clients: p.clients,
            contended: p.contended,
            p50_us: p.p50_us,
            p99_us: p.p99_us,
            ops_per_s: p.ops_per_s,
            gbps: p.gbps,
            ratio: None,
            floor: String::new(),
            floor_us: None,
            floor_gbps: None,
            api: "python".into(),
            processes: false,
            samples: p.samples,
            note: p.note,
        })
        .collect())
}
