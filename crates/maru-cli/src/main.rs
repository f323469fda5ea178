//! The `maru` command: a dispatcher, nothing more. The operator commands (`up`, `stats`, `top`)
//! and their argument parsing are maru-ops'; `bench` is maru-bench's. This binary composes
//! them; it owns no command's substance, and nothing may depend on it (the Python package's
//! console scripts run maru-ops directly, without the benchmark).

use clap::Subcommand;

/// What the Rust binary adds to the operator commands.
#[derive(Subcommand, Debug)]
enum Benchmarks {
    /// Measure latency and throughput against raw floors and Redis, in one run.
    Bench(maru_bench::BenchArgs),
}

fn main() {
    let code = maru_ops::main(std::env::args().collect(), |b: Benchmarks| match b {
        // Worker processes of the benchmark are this executable again, run as `maru bench`.
        Benchmarks::Bench(args) => maru_bench::run(args, &["bench"]),
    });
    std::process::exit(code);
}
