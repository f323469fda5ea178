//! `--daemons process`: the embedded daemons run in a worker process of their own (the client
//! and the server are different processes, as deployed), and the run still measures and
//! cleans up after itself.

mod common;

#[test]
fn daemons_in_a_worker_process_serve_the_rows_and_stop() {
    let report = common::report(&[
        "--smoke",
        "--daemons",
        "process",
        "--only",
        "cross,registry",
        "--no-python",
        "--let-cpus-idle",
    ]);
    let rows = report["results"].as_array().expect("results");
    assert!(
        rows.iter()
            .any(|r| r["op"] == "retrieve_1gib" && r["p50_us"].as_f64().unwrap_or(0.0) > 0.0),
        "no steady cross-process row: {rows:?}"
    );
    // The server ran in the worker: its memory is read from the worker's /proc entry.
    let reg = &report["registration"];
    assert!(
        reg["register_keys_per_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{reg}"
    );
    assert_ne!(
        reg["rss_before"], 0,
        "the worker's memory was not read: {reg}"
    );
    let pid = report["machine"]["pid"].as_u64().expect("pid");
    let left: Vec<String> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("maru-bench-{pid}-")))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
