//! The `maru` command line: the operator subcommands of this crate plus those a front end
//! adds, and the program-name dispatch the console scripts rely on (`maru-server` and
//! `maru-resource-manager` run those daemons' own command lines).

use clap::{Parser, Subcommand};

use crate::{stats, top, up};

/// The operator subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a resource manager and a metadata server in this process on a local shm pool.
    Up(up::UpArgs),
    /// Show pools, clients, keys and operation latency of a running server.
    Stats(stats::StatsArgs),
    /// Live monitor of a running server (q quits).
    Top(top::TopArgs),
}

impl Command {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Up(a) => up::run(a),
            Command::Stats(a) => stats::run(a),
            Command::Top(a) => top::run(a),
        }
    }
}

#[derive(Parser)]
#[command(
    name = "maru",
    version,
    about = "Maru: KV-cache chunks shared in memory, zero copy"
)]
struct Cli<X: Subcommand> {
    #[command(subcommand)]
    command: Commands<X>,
}

// Parsed once per process: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Commands<X: Subcommand> {
    #[command(flatten)]
    Operator(Command),
    #[command(flatten)]
    FrontEnd(X),
}

/// Which program a command line is for, by its name (`args[0]`, any directory stripped).
#[derive(Debug, PartialEq, Eq)]
enum Program {
    Server,
    ResourceManager,
    Maru,
}

fn program_of(args: &[String]) -> Program {
    let name = args
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a))
        .unwrap_or("maru");
    if name.starts_with("maru-server") {
        Program::Server
    } else if name.starts_with("maru-resource-manager") {
        Program::ResourceManager
    } else {
        Program::Maru
    }
}

/// Runs the command line `args` and returns the exit code: 0 on success, 1 when the command
/// failed (the error goes to standard error), 2 for bad arguments.
///
/// `args[0]` is the program name: a name starting with `maru-server` or
/// `maru-resource-manager` runs that daemon's command line; any other runs `maru`, whose
/// subcommands are [`Command`]'s plus the front end's `X`, run by `run_front_end`.
pub fn main<X: Subcommand>(
    args: Vec<String>,
    run_front_end: impl FnOnce(X) -> anyhow::Result<()>,
) -> i32 {
    match program_of(&args) {
        Program::Server => return maru_server::cli::main(args),
        Program::ResourceManager => return maru_resource_manager::cli::main(args),
        Program::Maru => {}
    }
    let cli = match Cli::<X>::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let result = match cli.command {
        Commands::Operator(c) => c.run(),
        Commands::FrontEnd(x) => run_front_end(x),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("maru: {e:#}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Subcommand, Debug, PartialEq)]
    enum Extra {
        /// A front end's own subcommand.
        Probe {
            #[arg(long)]
            fail: bool,
        },
    }

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn front_end_subcommands_run_beside_the_operator_ones() {
        let mut seen = None;
        let code = main(strings(&["maru", "probe"]), |x: Extra| {
            seen = Some(x);
            Ok(())
        });
        assert_eq!((code, seen), (0, Some(Extra::Probe { fail: false })));
        let code = main(
            strings(&["/usr/bin/maru", "probe", "--fail"]),
            |x: Extra| {
                assert_eq!(x, Extra::Probe { fail: true });
                anyhow::bail!("asked to fail")
            },
        );
        assert_eq!(code, 1);
    }

    #[test]
    fn one_parser_knows_both_kinds_of_subcommand() {
        let parse = |args: &[&str]| Cli::<Extra>::try_parse_from(strings(args));
        assert!(matches!(
            parse(&["maru", "stats", "--json"]).map(|c| c.command),
            Ok(Commands::Operator(Command::Stats(_)))
        ));
        assert!(matches!(
            parse(&["maru", "probe"]).map(|c| c.command),
            Ok(Commands::FrontEnd(Extra::Probe { fail: false }))
        ));
        for bad in [
            &["maru"][..],
            &["maru", "no-such-command"],
            &["maru", "stats", "--no-such-flag"],
        ] {
            let e = parse(bad).err().expect("a parse error");
            assert!(e.use_stderr(), "{bad:?} is an error, not help");
        }
    }

    #[test]
    fn daemon_program_names_select_the_daemons() {
        let of = |name: &str| program_of(&strings(&[name]));
        assert_eq!(of("maru-server"), Program::Server);
        assert_eq!(
            of("/venv/bin/maru-resource-manager"),
            Program::ResourceManager
        );
        assert_eq!(of("maru"), Program::Maru);
        assert_eq!(program_of(&[]), Program::Maru);
    }
}
