//! Running the `maru-bench` binary from tests: its JSON report on stdout, or a failure that
//! shows what it printed.

use std::process::Command;

use serde_json::Value;

/// Runs `maru-bench ARGS --json -` and returns its report.
pub fn report(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_maru-bench"))
        .args(args)
        .args(["--json", "-"])
        .output()
        .expect("run maru-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "maru-bench failed: {}\n{stderr}",
        out.status
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON report ({e}); stderr:\n{stderr}"))
}
