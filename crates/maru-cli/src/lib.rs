//! The `maru` command as a library, so the Python package's console scripts run the same code
//! as the Rust binaries.
//!
//! - `maru up`: resource manager + metadata server in one process on a shm pool it creates;
//! - `maru stats`: what a running server holds, as tables or JSON;
//! - `maru top`: a live full-screen monitor;
//! - `maru bench`: latency and throughput against the machine's floors and Redis.

use clap::{Parser, Subcommand};

pub mod bench;
mod format;
pub mod stats;
pub mod top;
pub mod up;

#[derive(Parser, Debug)]
#[command(
    name = "maru",
    version,
    about = "Maru: KV-cache chunks shared in memory, zero copy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a resource manager and a metadata server in this process on a local shm pool.
    Up(up::UpArgs),
    /// Show pools, clients, keys and operation latency of a running server.
    Stats(stats::StatsArgs),
    /// Live monitor of a running server (q quits).
    Top(top::TopArgs),
    /// Measure latency and throughput against raw floors and Redis, in one run.
    Bench(bench::BenchArgs),
}

/// Runs the command line `args` (`args[0]` is the program name; a name ending in
/// `maru-server` or `maru-resource-manager` runs that daemon) and returns the exit code.
pub fn run(args: Vec<String>) -> i32 {
    let program = args
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a))
        .unwrap_or("maru");
    if program.starts_with("maru-server") {
        return maru_server::cli::main(args);
    }
    if program.starts_with("maru-resource-manager") {
        return maru_resource_manager::cli::main(args);
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let result = match cli.command {
        Command::Up(a) => up::run(a),
        Command::Stats(a) => stats::run(a),
        Command::Top(a) => top::run(a),
        Command::Bench(a) => bench::run(a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("maru: {e:#}");
            1
        }
    }
}
