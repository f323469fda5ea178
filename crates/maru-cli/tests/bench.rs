//! `maru bench` is the benchmark of maru-bench behind the `maru` binary: the subcommand runs
//! it, and its worker processes are `maru bench --worker` (the cross-process rows need one).
//! The report's full shape is checked by maru-bench's own smoke test.

use std::process::Command;

#[test]
fn maru_bench_runs_the_benchmark_and_its_workers() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_maru"));
    cmd.args(["bench", "--smoke", "--only", "floor,cross", "--no-python"])
        .args(["--let-cpus-idle", "--json", "-"]);
    let report = maru_testkit::json_output(cmd, "maru bench");
    assert!(report["floor"]["uds_rtt_us"].as_f64().unwrap_or(0.0) > 0.0);
    let rows = report["results"].as_array().expect("results");
    for t in ["tcp", "unix"] {
        assert!(
            rows.iter().any(|r| r["op"] == "first_retrieve_1gib"
                && r["transport"] == t
                && r["p50_us"].as_f64().unwrap_or(0.0) > 0.0),
            "no cross-process row over {t}: {rows:?}"
        );
    }
}

#[test]
fn help_lists_the_operator_commands_and_bench() {
    let out = Command::new(env!("CARGO_BIN_EXE_maru"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["up", "stats", "top", "bench"] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(cmd)),
            "{cmd} missing from:\n{text}"
        );
    }
}
