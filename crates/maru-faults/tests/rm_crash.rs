//! The resource manager SIGKILLed under a mixed load, restarted on the same state directory
//! and port: the metadata server reconnects by itself, clients carry on, and the resource
//! manager's allocation table equals what the metadata server was acknowledged (every region
//! it holds, nothing else), once the frees that failed during the outage have been retried.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use maru_client::{ErrorKind, MaruConfig, MaruHandler};
use maru_faults::child::ChildProc;
use maru_faults::payload::{check, len_for, payload, Check};
use maru_faults::{key_refs, long_tests, wait_until, KIB, MIB};
use maru_testkit::{BinaryCluster, ClusterOpts};

const T: Duration = Duration::from_secs(30);

#[test]
fn child_role() {
    maru_faults::child::run_if_child();
}

/// What the churn threads saw.
#[derive(Default)]
struct Seen {
    cycles_ok: u64,
    /// Cycles that completed after the resource manager came back.
    cycles_ok_after_restart: u64,
    /// Error kind + message → count.
    errors: BTreeMap<String, u64>,
    slowest_error: Duration,
    /// Errors that were not a typed answer (a hang, a timeout, a lost connection).
    untyped: Vec<String>,
    /// Keys stored and not deleted (swept at the end).
    live: std::collections::BTreeSet<Vec<u8>>,
}

/// One instance's life, again and again: connect (a region from the resource manager),
/// store, read back, delete, close (the region goes back). `keep` keys per cycle stay behind
/// with their region, so the table also holds regions of instances that are gone.
fn churn(url: &str, id: usize, stop: &AtomicBool, restarted: &AtomicBool, seen: &Mutex<Seen>) {
    let mut cycle = 0u64;
    while !stop.load(Ordering::SeqCst) {
        cycle += 1;
        let keep = cycle.is_multiple_of(7);
        let t = Instant::now();
        let after_restart = restarted.load(Ordering::SeqCst);
        let r = (|| -> Result<(), (ErrorKind, String)> {
            let h = MaruHandler::new(MaruConfig {
                server_url: url.to_owned(),
                pool_size: 2 * MIB,
                chunk_size_bytes: 64 * KIB,
                timeout_ms: 3000,
                eager_map: false,
                ..MaruConfig::default()
            })
            .map_err(|e| (ErrorKind::InvalidArgument, e.to_string()))?;
            h.connect().map_err(|e| (e.kind(), e.to_string()))?;
            for j in 0..4 {
                let k = format!("churn-{id}-{cycle}-{j}").into_bytes();
                h.store_bytes(&k, b"", &payload(&k, len_for(&k, 64 * 1024)))
                    .map_err(|e| (e.kind(), e.to_string()))?;
                seen.lock().unwrap().live.insert(k.clone());
                let v = h.retrieve(&k).map_err(|e| (e.kind(), e.to_string()))?;
                if v.map(|v| check(&k, &v.to_vec())) != Some(Check::Intact) {
                    return Err((ErrorKind::Protocol, format!("key {j} not intact")));
                }
                if !(keep && j == 0) {
                    h.delete(&k).map_err(|e| (e.kind(), e.to_string()))?;
                    seen.lock().unwrap().live.remove(&k);
                }
            }
            h.close();
            Ok(())
        })();
        let mut s = seen.lock().unwrap();
        match r {
            Ok(()) => {
                s.cycles_ok += 1;
                if after_restart {
                    s.cycles_ok_after_restart += 1;
                }
            }
            Err((kind, msg)) => {
                s.slowest_error = s.slowest_error.max(t.elapsed());
                if !matches!(kind, ErrorKind::Remote(_)) {
                    s.untyped.push(format!("{kind:?}: {msg}"));
                }
                // Region ids differ between messages: keep the message's shape only.
                let shape: String = msg.chars().filter(|c| !c.is_ascii_digit()).collect();
                *s.errors.entry(format!("{kind:?}: {shape}")).or_default() += 1;
            }
        }
    }
}

/// Waits until the resource manager's table is exactly the metadata server's regions, all
/// owned by the server process. Returns the last view of both on failure.
fn tables_agree(c: &BinaryCluster, limit: Duration) -> Result<usize, String> {
    let mut last = String::new();
    let mut n = 0;
    let ok = wait_until(limit, || {
        let rm: Vec<_> = c
            .rm_list()
            .into_iter()
            .map(|a| (a.handle.clone(), a.owner_pid))
            .collect();
        let server: Vec<_> = c
            .server_regions()
            .into_iter()
            .map(|r| (r.handle, c.server.pid()))
            .collect();
        n = rm.len();
        last = format!("resource manager: {rm:?}\nmetadata server: {server:?}");
        rm == server
    });
    if ok {
        Ok(n)
    } else {
        Err(last)
    }
}

fn kill_and_restart_cycle(c: &mut BinaryCluster, round: u32) -> Seen {
    let url = c.unix_url();
    let stop = AtomicBool::new(false);
    let restarted = AtomicBool::new(false);
    let seen = Mutex::new(Seen::default());
    // Two processes whose key traffic must not notice the outage at all.
    let mut steady: Vec<ChildProc> = (0..2)
        .map(|i| {
            let mut p = ChildProc::spawn(&format!("steady-{i}"));
            p.ok(&format!("connect {url} {} {} 3000", 4 * MIB, 4 * KIB), T);
            p.send(&format!("steady st{round}-{i} 3.5"));
            p
        })
        .collect();
    std::thread::scope(|s| {
        for id in 0..3 {
            let (url, stop, restarted, seen) = (&url, &stop, &restarted, &seen);
            s.spawn(move || churn(url, id, stop, restarted, seen));
        }
        // Load for a while, crash, an outage, restart, load again.
        let ok = wait_until(T, || seen.lock().unwrap().cycles_ok >= 20);
        assert!(ok, "no load before the crash");
        c.rm.kill();
        let outage = Instant::now();
        let ok = wait_until(Duration::from_secs(5), || {
            !seen.lock().unwrap().errors.is_empty()
        });
        assert!(ok, "no client noticed the resource manager was gone");
        std::thread::sleep(Duration::from_millis(
            500_u64.saturating_sub(outage.elapsed().as_millis() as u64),
        ));
        c.restart_rm();
        restarted.store(true, Ordering::SeqCst);
        let ok = wait_until(Duration::from_secs(15), || {
            seen.lock().unwrap().cycles_ok_after_restart >= 20
        });
        stop.store(true, Ordering::SeqCst);
        assert!(ok, "clients did not carry on after the restart");
    });
    for p in &mut steady {
        let a = p.answer("steady", T);
        assert!(a.starts_with("ok"), "{}: key traffic failed: {a}", p.name);
        println!("{}: {a}", p.name);
        p.ok("close", T);
    }
    seen.into_inner().unwrap()
}

#[test]
fn rm_killed_under_mixed_load_restarts_and_its_table_equals_what_was_acknowledged() {
    let mut c = BinaryCluster::start(ClusterOpts::default());
    let rounds = if long_tests() { 5 } else { 1 };
    let mut live = std::collections::BTreeSet::new();
    for round in 0..rounds {
        let mut seen = kill_and_restart_cycle(&mut c, round);
        live.append(&mut seen.live);
        println!(
            "round {round}: {} cycles ok ({} after the restart); errors during the outage: {:?}; \
             slowest failing cycle {:?}",
            seen.cycles_ok, seen.cycles_ok_after_restart, seen.errors, seen.slowest_error
        );
        assert!(
            seen.untyped.is_empty(),
            "errors that were not a clear refusal: {:?}",
            seen.untyped
        );
        assert!(
            seen.slowest_error < Duration::from_secs(3),
            "a failing call took {:?}",
            seen.slowest_error
        );
        match tables_agree(&c, Duration::from_secs(10)) {
            Ok(n) => println!("round {round}: tables agree on {n} regions"),
            Err(diff) => panic!("after the restart the tables differ:\n{diff}"),
        }
    }
    // Everything left goes back when its keys are deleted.
    let sweeper = MaruHandler::new(MaruConfig {
        server_url: c.unix_url(),
        pool_size: 2 * MIB,
        chunk_size_bytes: 64 * KIB,
        ..MaruConfig::default()
    })
    .unwrap();
    sweeper.connect().unwrap();
    let keys: Vec<Vec<u8>> = live.into_iter().collect();
    let refs = key_refs(&keys);
    let views = sweeper.batch_retrieve(&refs).unwrap();
    for (k, v) in keys.iter().zip(views) {
        let v = v.unwrap_or_else(|| panic!("kept key {} lost", String::from_utf8_lossy(k)));
        assert_eq!(check(k, &v.to_vec()), Check::Intact);
    }
    let st = sweeper.batch_delete(&refs).unwrap();
    assert!(st.iter().all(|s| *s == maru_client::DeleteStatus::Deleted));
    sweeper.close();
    assert_eq!(c.server_stats().keys, 0);
    let ok = wait_until(Duration::from_secs(10), || {
        c.rm_stats().allocations == 0 && c.server_stats().regions == 0
    });
    assert!(
        ok,
        "regions left after every key was deleted: {:?}",
        c.rm_list()
    );
    println!(
        "{} kept keys read back intact and swept; nothing left",
        keys.len()
    );
}

/// A resource manager that hangs instead of dying (SIGSTOP: a stuck disk, a debugger):
/// region requests fail with a timeout within the client's `timeout_ms`, key traffic goes on
/// untouched, and once it resumes everything agrees again.
#[test]
fn rm_frozen_then_resumed_times_out_cleanly_and_recovers() {
    let c = BinaryCluster::start(ClusterOpts::default());
    let url = c.unix_url();
    let mut steady = ChildProc::spawn("steady");
    steady.ok(&format!("connect {url} {} {} 2000", 4 * MIB, 4 * KIB), T);
    // Its first store takes the region its traffic below writes into.
    steady.ok("store warm 0 1", T);
    let signal = |sig| {
        // SAFETY: kill(2) on the daemon process this test started and still owns.
        let rc = unsafe { libc::kill(c.rm.pid() as i32, sig) };
        assert_eq!(rc, 0);
    };
    signal(libc::SIGSTOP);
    steady.send("steady frozen 2.5");
    // Connecting needs no region, so it works; the first store asks for one and times out.
    let mut newcomer = ChildProc::spawn("newcomer");
    newcomer.ok(&format!("connect {url} {} {} 1000", 2 * MIB, 64 * KIB), T);
    let t = Instant::now();
    let a = newcomer.call("store fresh 0 1", T);
    let took = t.elapsed();
    println!("store while the resource manager is stopped: {a} ({took:?})");
    assert!(a.starts_with("err kind=Timeout"), "{a}");
    assert!(took < Duration::from_millis(2 * 1000 + 500), "{took:?}");
    let a = steady.answer("steady", T);
    println!("key traffic while the resource manager is stopped: {a}");
    assert!(a.starts_with("ok"), "{a}");
    signal(libc::SIGCONT);
    match tables_agree(&c, Duration::from_secs(15)) {
        Ok(n) => println!("after SIGCONT: tables agree on {n} regions"),
        Err(diff) => panic!("after SIGCONT the tables differ:\n{diff}"),
    }
    newcomer.ok("store fresh 0 1", T);
    newcomer.ok("delete fresh 0 1", T);
    newcomer.ok("close", T);
    steady.ok("delete warm 0 1", T);
    steady.ok("close", T);
    let ok = wait_until(Duration::from_secs(10), || c.rm_stats().allocations == 0);
    assert!(ok, "{:?}", c.rm_list());
}
