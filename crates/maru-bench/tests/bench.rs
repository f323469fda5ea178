//! `maru-bench --smoke --json -` (the same run as `maru bench`) works on a clean checkout,
//! and its report has every row kind benchmarks/README.md documents, with the floors, in the
//! documented shape. Numbers are not checked: the machine is shared and the build may be a
//! debug one.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

fn num(v: &Value, field: &str) -> f64 {
    v.get(field)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{field} missing or not a number in {v}"))
}

#[test]
fn smoke_report_has_every_row_kind() {
    let started = Instant::now();
    let report = common::report(&["--smoke"]);

    // Floors.
    let floor = &report["floor"];
    for f in ["tcp_rtt_us", "uds_rtt_us", "memcpy_gbps"] {
        assert!(num(floor, f) > 0.0, "floor.{f} = {}", floor[f]);
    }

    // Every row has the documented fields.
    let results = report["results"].as_array().expect("results array");
    for r in results {
        for f in [
            "op",
            "transport",
            "chunk_bytes",
            "batch",
            "clients",
            "contended",
        ] {
            assert!(r.get(f).is_some(), "row without {f}: {r}");
        }
        for f in ["p50_us", "p99_us", "ops_per_s", "gbps", "ratio"] {
            assert!(r.get(f).is_some(), "row without {f}: {r}");
        }
    }
    let measured = |op: &str, transport: &str, chunk: u64, batch: u64| {
        results.iter().any(|r| {
            r["op"] == op
                && r["transport"] == transport
                && r["chunk_bytes"] == chunk
                && r["batch"] == batch
                && r["api"] == "rust"
                && r["clients"] == 1
                && num(r, "p50_us") > 0.0
                && num(r, "ratio") > 0.0
        })
    };
    let (k4, m1) = (4096u64, 1u64 << 20);
    for t in ["tcp", "unix"] {
        for chunk in [k4, 64 * 1024, m1, 4 * m1] {
            for op in ["store", "store_existing", "retrieve", "retrieve_copy"] {
                assert!(measured(op, t, chunk, 1), "no {op} {chunk} over {t}");
            }
        }
        for op in ["exists", "exists_miss", "delete", "pin", "unpin"] {
            assert!(measured(op, t, k4, 1), "no {op} over {t}");
        }
        for op in ["batch_store", "batch_retrieve", "batch_exists"] {
            for n in [32, 256] {
                assert!(measured(op, t, k4, n), "no {op}({n}) over {t}");
            }
        }
        assert!(
            measured("first_retrieve_1gib", t, k4, 1),
            "no first retrieve over {t}"
        );
        assert!(
            measured("retrieve_1gib", t, k4, 1),
            "no steady retrieve over {t}"
        );
        let clients: BTreeSet<(u64, bool)> = results
            .iter()
            .filter(|r| r["op"] == "retrieve" && r["transport"] == t && r["note"].is_string())
            .filter(|r| num(r, "ops_per_s") > 0.0)
            .map(|r| (r["clients"].as_u64().unwrap(), r["processes"] == true))
            .collect();
        for n in [1, 4, 32] {
            for procs in [false, true] {
                assert!(
                    clients.contains(&(n, procs)),
                    "no concurrency row {n} clients (processes: {procs}) over {t}"
                );
            }
        }
        for (op, pool) in ["connect", "first_alloc"]
            .into_iter()
            .flat_map(|op| [(op, 100u64 << 20), (op, 1 << 30)])
        {
            let rows: Vec<&Value> = results
                .iter()
                .filter(|r| r["op"] == op && r["transport"] == t && r["chunk_bytes"] == pool)
                .collect();
            assert!(
                rows.iter().any(|r| num(r, "p50_us") > 0.0),
                "no {op} time with a {pool}-byte pool over {t}"
            );
            // 2 MiB pages: measured where hugetlbfs is mounted, else a row saying why not.
            assert!(
                rows.len() >= 2,
                "no 2 MiB-page {op} row (or skip note) over {t}"
            );
            // As root the run reserves and mounts its own hugetlbfs, so the rows are measured.
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                assert!(
                    rows.iter().any(|r| num(r, "p50_us") > 0.0
                        && r["note"].as_str().is_some_and(|n| n.contains("2 MiB"))),
                    "root, yet no 2 MiB-page {op} measured over {t}: {rows:?}"
                );
            }
        }
        // The first alloc is measured against populating a region of its size.
        assert!(
            results
                .iter()
                .filter(|r| r["op"] == "first_alloc" && r["transport"] == t)
                .any(|r| r
                    .get("floor_us")
                    .and_then(Value::as_f64)
                    .is_some_and(|f| f > 0.0)),
            "no first_alloc row with its populate floor over {t}"
        );
    }

    // Server memory per key and registration rate.
    assert!(num(&report, "bytes_per_key") > 0.0);
    assert!(num(&report, "register_keys_per_s") > 0.0);

    // The LMCache-shaped load, wherever the project's Python environment exists: every reader
    // count served requests, hit and missed chunks, saw no wrong byte, and the writer stored.
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    if venv.is_file() {
        let rows = report["lmcache"]["rows"]
            .as_array()
            .unwrap_or_else(|| panic!("no LMCache-shaped rows: {}", report["notes"]));
        let readers: Vec<u64> = rows
            .iter()
            .map(|r| r["processes"].as_u64().unwrap())
            .collect();
        assert_eq!(readers, [1, 2]);
        for r in rows {
            for f in [
                "requests",
                "chunks_hit",
                "chunks_missed",
                "stores",
                "p99_vs_floor",
            ] {
                assert!(num(r, f) > 0.0, "{f} in {r}");
            }
            assert_eq!(num(r, "wrong"), 0.0, "wrong answers: {r}");
        }
    } else {
        assert!(report["notes"]
            .to_string()
            .contains("LMCache-shaped load skipped"));
    }

    // Redis rows when redis-server is installed, each compared with a Maru row.
    let redis = report["redis"]
        .as_array()
        .expect("redis array (empty when skipped)");
    if redis.is_empty() {
        let notes = report["notes"].to_string();
        assert!(
            notes.contains("redis"),
            "redis neither ran nor was reported skipped"
        );
    } else {
        for op in ["GET", "SET", "MGET"] {
            assert!(redis.iter().any(|r| r["op"] == op), "no redis {op} row");
        }
        assert!(
            redis.iter().all(|r| num(r, "ratio") > 0.0),
            "redis row without ratio"
        );
    }

    // Targets are evaluated, and nothing was left behind.
    assert!(!report["targets"].as_array().unwrap().is_empty());
    let pid_dirs: Vec<_> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("maru-bench-"))
        .collect();
    assert!(
        pid_dirs
            .iter()
            .all(|n| !n.contains(&format!("-{}-", report["machine"]["pid"]))),
        "left behind: {pid_dirs:?}"
    );
    eprintln!("maru-bench --smoke took {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(240));
}
