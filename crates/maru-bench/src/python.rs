//! The Python rows: `benchmarks/bench.py` measures the single-client rows through the public
//! `maru` package (how users call it), also with another Python thread burning CPU
//! (`contended`). `maru bench` runs it as a child process against the same daemons, when the
//! project's `.venv` (made by scripts/setup.sh) is there, and gives its rows floors from this
//! run.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::context::Bench;
use crate::daemons::{track_child, untrack_child};
use crate::floor::{Probe, Transport};
use crate::stats::Row;

/// A row as bench.py prints it (the first fields of [`Row`]).
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

/// The floor probes of the Python rows, one per row: `(transport, op, chunk, batch,
/// contended)`.
/// transport, op, chunk, batch, contended, and the row's note (a variant such as
/// `write_behind`, or empty).
type RowKey = (String, String, u64, u32, bool, String);

/// Runs bench.py against `urls` with `--floor-pipe`: before each block of its calls it asks
/// for a block of floor ping-pongs of the row's wire sizes, which this process runs (so
/// Python rows alternate with their floors like the Rust rows do). Then pushes its rows.
pub fn run(
    b: &mut Bench,
    py: &Path,
    script: &Path,
    urls: &[String],
    mode: &str,
) -> anyhow::Result<()> {
    let mut cmd = Command::new(py);
    cmd.arg(script)
        .args(["--no-floor", "--quiet", "--floor-pipe"]);
    if mode != "full" {
        cmd.arg(format!("--{mode}"));
    }
    for u in urls {
        cmd.arg("--server").arg(u);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot run {}", py.display()))?;
    track_child(child.id());
    let pid = child.id();
    let result = converse(b, &mut child);
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait();
    untrack_child(pid);
    let (report, mut probes) = result?;
    let status = status?;
    if !status.success() {
        bail!("{} {} failed: {status}", py.display(), script.display());
    }
    for p in report.results {
        let key: RowKey = (
            p.transport.clone(),
            p.op.clone(),
            p.chunk_bytes,
            p.batch,
            p.contended,
            p.note.clone().unwrap_or_default(),
        );
        let t = if p.transport == "unix" {
            Transport::Unix
        } else {
            Transport::Tcp
        };
        let row = Row {
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
        };
        match probes.remove(&key) {
            Some(probe) => b.push_probed(t, row, probe),
            None => b.push(t, row),
        }
    }
    Ok(())
}

/// Serves bench.py's floor requests until it prints its report.
fn converse(
    b: &Bench,
    child: &mut std::process::Child,
) -> anyhow::Result<(PyReport, HashMap<RowKey, Probe>)> {
    let mut stdin = child.stdin.take().context("bench.py stdin")?;
    let stdout = BufReader::new(child.stdout.take().context("bench.py stdout")?);
    let mut probes: HashMap<RowKey, Probe> = HashMap::new();
    for line in stdout.lines() {
        let line = line?;
        if let Some(json) = line.strip_prefix("REPORT ") {
            let report: PyReport =
                serde_json::from_str(json).context("bench.py printed a bad report")?;
            return Ok((report, probes));
        }
        let Some(req) = line.strip_prefix("FLOOR ") else {
            continue;
        };
        let f: Vec<&str> = req.split_whitespace().collect();
        let (t, op, chunk, batch, contended, n, note) = match f[..] {
            [t, op, chunk, batch, contended, n] => (t, op, chunk, batch, contended, n, ""),
            [t, op, chunk, batch, contended, n, note] => (t, op, chunk, batch, contended, n, note),
            _ => bail!("bench.py sent a bad floor request: {line}"),
        };
        let key: RowKey = (
            t.to_owned(),
            op.to_owned(),
            chunk.parse()?,
            batch.parse()?,
            contended == "1",
            note.to_owned(),
        );
        let transport = if t == "unix" {
            Transport::Unix
        } else {
            Transport::Tcp
        };
        if !probes.contains_key(&key) {
            probes.insert(key.clone(), b.probe_row(transport, op, key.2, key.3)?);
        }
        if let Some(p) = probes.get_mut(&key) {
            for _ in 0..n.parse::<usize>()? {
                p.tick()?;
            }
        }
        writeln!(stdin, "OK")?;
        stdin.flush()?;
    }
    bail!("bench.py ended without a report")
}

/// Runs a benchmark script of `benchmarks/` with `args` (and `flag`, if any); its last line
/// printed is a JSON document, returned parsed.
pub fn run_json_script(
    py: &Path,
    script: &Path,
    args: &[&str],
    flag: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    let child = Command::new(py)
        .arg(script)
        .args(args)
        .args(flag)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot run {}", py.display()))?;
    let pid = child.id();
    track_child(pid);
    let out = child.wait_with_output();
    untrack_child(pid);
    let out = out?;
    if !out.status.success() {
        bail!("{} failed: {}", script.display(), out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("{} printed {last:?}", script.display()))
}
