//! The metadata server SIGKILLed under load, then restarted on the same address.
//!
//! What holds: clients get a clear error within their `timeout_ms` (no hang); a new
//! connection attempt while it is down fails at once; after the restart an old handler gets
//! a clear "session ended" error and a new handler works. What is lost (docs/RELIABILITY.md):
//! every key (the registry lives in the server's memory), and every region, which the
//! resource manager reclaims from the dead server within a reaper pass.

use std::time::{Duration, Instant};

use maru_faults::child::{field, num, ChildProc};
use maru_faults::{wait_until, KIB, MIB};
use maru_testkit::{BinaryCluster, ClusterOpts};

const T: Duration = Duration::from_secs(30);
/// The clients' `timeout_ms`.
const CLIENT_TIMEOUT_MS: u64 = 1000;

#[test]
fn child_role() {
    maru_faults::child::run_if_child();
}

fn connect(name: &str, url: &str) -> ChildProc {
    ChildProc::spawn_connected(name, url, 2 * MIB, 16 * KIB, CLIENT_TIMEOUT_MS, T)
}

#[test]
fn server_killed_under_load_gives_clear_errors_then_new_handlers_work() {
    let mut c = BinaryCluster::start(ClusterOpts::default());
    // One client per transport, both writing in a loop; one process holding views.
    let mut tcp = connect("tcp-writer", &c.server_url());
    let mut uds = connect("uds-writer", &c.unix_url());
    assert_eq!(num(&tcp.ok("store k 0 16", T), "stored"), 16);
    let mut holder = connect("holder", &c.unix_url());
    assert_eq!(num(&holder.ok("hold k 0 16", T), "held"), 16);
    for p in [&mut tcp, &mut uds] {
        p.send("until_error loop 60");
        assert_eq!(p.line(T).as_deref(), Some("looping"));
    }
    let ok = wait_until(T, || c.server_stats().keys > 200);
    assert!(ok, "no load before the crash");

    c.server.kill();
    let killed = Instant::now();
    for p in [&mut tcp, &mut uds] {
        let a = p.answer(
            "until_error",
            Duration::from_millis(CLIENT_TIMEOUT_MS + 2000),
        );
        let waited = killed.elapsed();
        println!("{}: {a} (answered {waited:?} after the kill)", p.name);
        assert!(a.starts_with("err"), "{a}");
        let kind = field(&a, "kind").unwrap();
        assert!(
            kind == "Transport" || kind == "Timeout",
            "{}: unexpected error kind: {a}",
            p.name
        );
        assert!(num(&a, "elapsed_ms") <= CLIENT_TIMEOUT_MS + 200, "{a}");
    }

    // While it is down, connecting fails at once with a clear error.
    let mut newcomer = ChildProc::spawn("newcomer");
    let t = Instant::now();
    let a = newcomer.call(
        &format!(
            "connect {} {} {} {CLIENT_TIMEOUT_MS}",
            c.unix_url(),
            2 * MIB,
            16 * KIB
        ),
        T,
    );
    println!("connect while down: {a} ({:?})", t.elapsed());
    assert!(a.starts_with("err") && a.contains("cannot connect"), "{a}");
    assert!(t.elapsed() < Duration::from_millis(CLIENT_TIMEOUT_MS + 500));

    // The resource manager takes every region back from the dead server.
    let ok = wait_until(Duration::from_secs(10), || c.rm_stats().allocations == 0);
    assert!(
        ok,
        "regions of the dead server not reclaimed: {:?}",
        c.rm_list()
    );
    let held = holder.ok("check_held", T);
    println!("views held across the server's death, after the reclaim: {held}");
    assert_eq!(num(&held, "corrupt"), 0, "{held}");

    c.restart_server();

    // An old handler: a clear refusal, fast, never a hang.
    let t = Instant::now();
    let a = tcp.call("once after 0", T);
    println!("old handler after the restart: {a} ({:?})", t.elapsed());
    assert!(a.starts_with("err"), "{a}");
    assert!(
        a.contains("no live session") || a.contains("session"),
        "not a clear error: {a}"
    );
    assert!(t.elapsed() < Duration::from_millis(CLIENT_TIMEOUT_MS + 500));

    // A new handler (a closed and reconnected one, or a new process) works; keys are gone.
    for p in [&mut tcp, &mut uds] {
        p.ok("close", T);
    }
    let mut fresh = connect("fresh", &c.unix_url());
    fresh.ok("once after 0", T);
    let got = fresh.ok("verify k 0 16", T);
    assert_eq!(num(&got, "missing"), 16, "keys survived?! {got}");
    let mut again = connect("reconnected", &c.server_url());
    again.ok("once after 1", T);
    println!("after the restart: new handlers work; the 16 keys stored before are gone");
    fresh.ok("close", T);
    again.ok("close", T);
    holder.ok("close", T);
}

/// After a server crash the resource manager reclaims the dead server's regions and hands
/// the same extents to the next instances. A client process of the old server that still
/// holds a writable page (allocated, not yet stored) keeps its mapping of that memory.
#[test]
fn stale_writer_of_a_dead_server_cannot_touch_a_new_instances_data() {
    let mut c = BinaryCluster::start(ClusterOpts::default());
    let mut old = connect("old-writer", &c.unix_url());
    old.ok("alloc_write pending-0", T);
    c.server.kill();
    let ok = wait_until(Duration::from_secs(10), || c.rm_stats().allocations == 0);
    assert!(ok, "not reclaimed");
    c.restart_server();
    let mut new = connect("new-writer", &c.unix_url());
    assert_eq!(num(&new.ok("store b 0 8", T), "stored"), 8);
    // The old process, unaware, finishes writing its page.
    old.ok("write_pending 255", T);
    let got = new.ok("verify b 0 8", T);
    assert_eq!(
        (num(&got, "found"), num(&got, "corrupt")),
        (8, 0),
        "another process's stale mapping changed this instance's values: {got}"
    );
}
