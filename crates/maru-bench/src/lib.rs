//! `maru bench`: how fast Maru is on this machine, next to what the hardware allows and next
//! to Redis, measured in one run.
//!
//! Every row is compared with a floor measured in the same run (module `floor`): a raw socket
//! ping-pong of the row's exact request and reply sizes, plus a raw memcpy of the chunk into or
//! out of a shared mapping for rows that copy one. Numbers drift between runs on a shared
//! machine; ratios measured together do not.
//!
//! Sections: Rust client rows per transport (`rows`), Python rows through the `maru` package
//! (`python`, `benchmarks/bench.py`), cross-process lazy mapping (`cross`), concurrency
//! (`concurrency`), connect time (`connect`), Redis side by side (`redis`), and the server's
//! memory per key and registration rate (`registry`), and the eviction policies' hit ratios
//! against exact LRU on the same Zipf traces (`eviction`, over the simulation in `trace`), and
//! the key index in shared memory (`index`: reads without a round trip, a restart). [`run()`]
//! runs them in that order, then judges the targets (`targets`) and writes the report
//! (`report`).
//!
//! This crate owns the benchmark and everything only the benchmark needs: floors, CPU
//! placement, worker processes, the Redis side. It measures Maru from the outside — through
//! `maru_client`, the wire protocol and the daemons' public start-up — and changes none of
//! them. It is reached through the Rust `maru` binary (`maru bench`) and its own `maru-bench`
//! binary; the Python extension must not depend on it.

mod args;
mod concurrency;
mod connect;
mod context;
mod cpu;
mod cross;
mod daemons;
mod eviction;
mod floor;
mod index;
mod lmcache;
mod plan;
mod python;
mod redis;
mod registry;
mod report;
mod rows;
mod run;
mod stats;
mod table;
mod targets;
mod trace;
mod wire;
mod worker;

pub use args::{BenchArgs, DaemonsArg, Section, TransportArg};
pub use cpu::Placement;
pub use run::run;

/// Runs the `maru-bench` command line (`args[0]` is the program name) and returns the exit
/// code: 0 on success, 1 when the run failed, 2 for bad arguments.
pub fn main(args: Vec<String>) -> i32 {
    use clap::Parser;

    #[derive(Parser)]
    #[command(
        name = "maru-bench",
        version,
        about = "Maru's benchmark against raw floors and Redis (the same as `maru bench`)"
    )]
    struct Standalone {
        #[command(flatten)]
        args: BenchArgs,
    }

    let cli = match Standalone::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(cli.args, &[]) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("maru-bench: {e:#}");
            1
        }
    }
}
