//! Running the `maru-bench` binary from tests: its JSON report on stdout, or a failure that
//! shows what it printed.

use std::process::Command;

use serde_json::Value;

/// Runs `maru-bench ARGS --json -` and returns its report.
pub fn report(args: &[&str]) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_maru-bench"));
    cmd.args(args).args(["--json", "-"]);
    maru_testkit::json_output(cmd, "maru-bench")
}
