//! `maru._maru`: the native half of the Python package `maru` (the pure-Python half is in
//! `python/maru`). It exposes `MaruHandler`, `AllocHandle`, `MemoryInfo`, the compat
//! introspection classes, `MaruError`, the console scripts' entry (`run_cli`) and two
//! operator helpers (`server_stats`, `rm_stats`).
//!
//! It owns the conversion between Python and Rust: argument parsing in the original API's
//! shapes, the buffer protocol over pages, the GIL around waits, Python exceptions for error
//! kinds. It may not touch what the handler does (that is `maru-client`'s) and may not depend
//! on the benchmark or the `maru` binary (maru-bench, maru-cli): the console scripts run
//! maru-ops, so importing `maru._maru` carries only the client and the operator commands.

use std::time::Duration;

use maru_client::WaitHook;
use maru_proto::{Request, Response, ServerUrl};
use maru_transport::BlockingConn;
use pyo3::prelude::*;

mod args;
mod buffer;
mod errors;
mod handler;
mod types;

/// The wait hook of calls made with the GIL held: the slow part of a wait runs with the GIL
/// released, so other Python threads run while this one sleeps in the kernel.
pub(crate) struct PyHook<'py>(pub Python<'py>);

impl WaitHook for PyHook<'_> {
    fn block(&self, f: &mut (dyn FnMut() + Send)) {
        self.0.detach(f)
    }
}

/// What the package's `maru` command adds to the operator commands of maru-ops: `bench` only
/// says where the benchmark is. It ships with the Rust `maru` binary, because its worker
/// processes are that binary again and its code has no place in every import of `maru`.
#[derive(clap::Subcommand)]
enum PackageCommand {
    /// Benchmarks ship with the Rust `maru` binary, not with this package.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
}

const BENCH_ELSEWHERE: &str = "the benchmark ships with the Rust `maru` binary, not with the \
    Python package; from a checkout of the repository run: cargo build --release -p maru-cli \
    && target/release/maru bench --quick (benchmarks/README.md has the options)";

/// Runs a console script's command line (`args[0]` picks the program: `maru`, `maru-server` or
/// `maru-resource-manager`) with the GIL released; returns its exit code.
#[pyfunction]
fn run_cli(py: Python<'_>, args: Vec<String>) -> i32 {
    py.detach(|| {
        maru_ops::main(args, |c: PackageCommand| match c {
            PackageCommand::Bench { .. } => Err(anyhow::anyhow!("bench: {BENCH_ELSEWHERE}")),
        })
    })
}

/// The statistics document (JSON text) a `Stats` or `RmStats` request answers, over an admin
/// connection of its own.
fn stats_document(
    py: Python<'_>,
    url: &str,
    req: Request<'static>,
    timeout_ms: u64,
) -> PyResult<String> {
    let url = ServerUrl::parse(url).map_err(|e| errors::invalid(format!("url: {e}")))?;
    let reply = py.detach(|| {
        let mut conn = BlockingConn::connect_admin(&url, Duration::from_millis(timeout_ms))?;
        conn.call(&req)
    });
    match reply.map_err(|e| errors::helper_err(py, e))? {
        Response::Stats(json) | Response::RmStats(json) => Ok(json),
        other => Err(errors::helper_err(
            py,
            format!("unexpected reply {other:?}"),
        )),
    }
}

/// The metadata server's statistics document (JSON text).
#[pyfunction]
#[pyo3(signature = (url, timeout_ms=2000))]
fn server_stats(py: Python<'_>, url: &str, timeout_ms: u64) -> PyResult<String> {
    stats_document(py, url, Request::Stats, timeout_ms)
}

/// The resource manager's statistics document (JSON text).
#[pyfunction]
#[pyo3(signature = (url, timeout_ms=2000))]
fn rm_stats(py: Python<'_>, url: &str, timeout_ms: u64) -> PyResult<String> {
    stats_document(py, url, Request::RmStats, timeout_ms)
}

#[pymodule]
fn _maru(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DETACH_COPY_BYTES", handler::DETACH_COPY_BYTES)?;
    m.add_class::<handler::PyMaruHandler>()?;
    m.add_class::<types::AllocHandle>()?;
    m.add_class::<types::MemoryInfo>()?;
    m.add_class::<types::MaruHandle>()?;
    m.add_class::<types::PagedMemoryAllocator>()?;
    m.add_class::<types::OwnedRegionManager>()?;
    m.add_class::<buffer::ShmBuffer>()?;
    m.add_function(wrap_pyfunction!(run_cli, m)?)?;
    m.add_function(wrap_pyfunction!(server_stats, m)?)?;
    m.add_function(wrap_pyfunction!(rm_stats, m)?)?;
    Ok(())
}
