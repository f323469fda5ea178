//! 64 concurrent clients — 32 threads of this process on the Unix socket, 4 child processes
//! of 8 threads each over TCP, every one its own `MaruHandler` — run the mixed workload of
//! `maru_faults::load` (store, batch_store, retrieve, batch_retrieve, exists, batch_exists,
//! delete, batch_delete; every value read is checked) against the real daemons for a bounded
//! time (10 s; 60 s with MARU_LONG_TESTS=1). No error is allowed, and once every client has
//! deleted its keys and closed, the resource manager is back to its baseline: no region leaked.

use std::time::{Duration, Instant};

use maru_faults::child::ChildProc;
use maru_faults::lat::LatHist;
use maru_faults::load::{self, LoadCfg, Report};
use maru_faults::{long_tests, wait_until, KIB, MIB};
use maru_testkit::{BinaryCluster, ClusterOpts};

const PROCESSES: usize = 4;
const THREADS_PER_PROCESS: usize = 8;
const LOCAL_THREADS: usize = 32;
const CLIENTS: usize = LOCAL_THREADS + PROCESSES * THREADS_PER_PROCESS;

#[test]
fn child_role() {
    maru_faults::child::run_if_child();
}

fn line(name: &str, h: &LatHist) -> String {
    format!(
        "{name:<15} {:>9} ops  p50 {:>6} µs  p99 {:>6} µs",
        h.count(),
        h.quantile_us(0.5),
        h.quantile_us(0.99)
    )
}

#[test]
fn sixty_four_clients_mixed_load_no_errors_no_leaks() {
    let secs = if long_tests() { 60.0 } else { 10.0 };
    let c = BinaryCluster::start(ClusterOpts {
        pool_bytes: 1024 * MIB,
        ..ClusterOpts::default()
    });
    let baseline = c.rm_stats().allocations;
    let cfg = |url: String| LoadCfg {
        url,
        clients: CLIENTS,
        stable: 16,
        chunk: 16 * KIB,
        pool_size: 2 * MIB,
        timeout_ms: 5000,
    };
    let local_cfg = cfg(c.unix_url());
    let tcp_cfg = cfg(c.server_url());
    let wait = Duration::from_secs_f64(secs + 60.0);

    // Start: every worker connects and stores its stable keys before anyone reads them.
    let mut children: Vec<ChildProc> = (0..PROCESSES)
        .map(|i| {
            let mut p = ChildProc::spawn(&format!("load-{i}"));
            let first = LOCAL_THREADS + i * THREADS_PER_PROCESS;
            p.send(&format!(
                "load_start {first} {THREADS_PER_PROCESS} {}",
                tcp_cfg.encode()
            ));
            p
        })
        .collect();
    let mut local = load::start_workers(&local_cfg, 0..LOCAL_THREADS).expect("local workers");
    for p in &mut children {
        let a = p.answer("load_start", wait);
        assert_eq!(a, "ok", "{}: {a}", p.name);
    }
    let stats = c.server_stats();
    assert_eq!(stats.keys, (CLIENTS * 16) as u64);

    // Run.
    let started = Instant::now();
    for p in &mut children {
        p.send(&format!("load_run {secs}"));
    }
    let mut all = load::run_workers(&mut local, secs);
    for p in &mut children {
        let a = p.answer("load_run", wait);
        let r = a
            .strip_prefix("ok ")
            .and_then(Report::decode)
            .unwrap_or_else(|| panic!("{}: {a}", p.name));
        all.merge(&r);
    }
    let elapsed = started.elapsed().as_secs_f64();

    // Finish: every worker checks and deletes its keys, then closes.
    for p in &mut children {
        p.send("load_finish");
    }
    let mut finish_errors = load::finish_workers(local);
    for p in &mut children {
        let a = p.answer("load_finish", wait);
        if a != "ok" {
            finish_errors.push(format!("{}: {a}", p.name));
        }
    }

    println!(
        "load: {CLIENTS} clients ({LOCAL_THREADS} threads on the Unix socket, {PROCESSES} \
         processes x {THREADS_PER_PROCESS} threads over TCP), {secs} s"
    );
    println!(
        "load: {} operations, {:.0} ops/s, {} errors",
        all.ops,
        all.ops as f64 / elapsed,
        all.errors.len()
    );
    for (op, h) in &all.hists {
        println!("load: {}", line(op, h));
    }
    println!("load: {}", line("all", &all.overall()));
    assert!(
        all.errors.is_empty(),
        "{} errors, first: {:?}",
        all.errors.len(),
        &all.errors[..all.errors.len().min(5)]
    );
    assert!(finish_errors.is_empty(), "{finish_errors:?}");

    // Nothing leaked: no key, no region at the server, the resource manager at baseline.
    let ok = wait_until(Duration::from_secs(10), || {
        let s = c.server_stats();
        s.keys == 0 && s.regions == 0 && c.rm_stats().allocations == baseline
    });
    assert!(
        ok,
        "leak after the load: server {:?}, resource manager {:?}",
        c.server_stats(),
        c.rm_list()
    );
    println!("load: resource manager back to {baseline} allocations; server: 0 keys, 0 regions");
}
