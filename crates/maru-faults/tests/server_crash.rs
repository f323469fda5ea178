//! The metadata server SIGKILLed under load, then restarted on the same address.
//!
//! What holds: clients get a clear error within their `timeout_ms` (no hang); a new
//! connection attempt while it is down fails at once. The server owns its regions at the
//! resource manager under a durable identity (beside its key index), so the resource
//! manager keeps a dead server's regions for its server grace; the restarted server adopts
//! them and serves every acknowledged key again with its bytes, and views held across the
//! restart keep reading them. A server that stays dead past the grace loses its regions
//! (and so its keys) to the reaper; a process that cannot prove it may act for the server
//! adopts nothing (docs/RELIABILITY.md).

use std::time::{Duration, Instant};

use maru_faults::child::{field, num, ChildProc};
use maru_faults::{wait_until, KIB, MIB};
use maru_proto::{ErrorCode, RmAllocation, ServerUrl};
use maru_resource_manager::RmClient;
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

/// A cluster whose resource manager keeps a dead server's regions for `grace_secs`, and
/// whose server, restarted, lets no session resume (the handlers of the old process are
/// over; `server_resume.rs` has the sessions that come back).
fn cluster(grace_secs: f64) -> BinaryCluster {
    BinaryCluster::start(ClusterOpts {
        rm_extra: vec!["--server-grace-secs".into(), grace_secs.to_string()],
        server_extra: vec!["--reconnect-grace-secs".into(), "0".into()],
        ..ClusterOpts::default()
    })
}

/// The resource manager's table as (region, owner pid), to compare before and after.
fn table(list: &[RmAllocation]) -> Vec<(u64, u32)> {
    let mut t: Vec<(u64, u32)> = list
        .iter()
        .map(|a| (a.handle.region_id, a.owner_pid))
        .collect();
    t.sort();
    t
}

/// The durable identity the cluster's server presents (the file beside its key index).
fn server_id(c: &BinaryCluster) -> [u8; 16] {
    let text = std::fs::read_to_string(c.dir.path().join("server.index.server-id")).unwrap();
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap();
    }
    id
}

#[test]
fn server_killed_under_load_gives_clear_errors_and_a_restart_keeps_every_key() {
    let mut c = cluster(30.0);
    // One client per transport, both writing in a loop; one process holding views.
    let mut tcp = connect("tcp-writer", &c.server_url());
    let mut uds = connect("uds-writer", &c.unix_url());
    assert_eq!(num(&tcp.ok("store k 0 16", T), "stored"), 16);
    let mut holder = connect("holder", &c.unix_url());
    assert_eq!(num(&holder.ok("hold k 0 16", T), "held"), 16);
    // A region of its own with one page written and never stored: no key names it.
    let mut pending = connect("pending", &c.unix_url());
    pending.ok("alloc_write pending-0", T);
    for p in [&mut tcp, &mut uds] {
        p.send("until_error loop 60");
        assert_eq!(p.line(T).as_deref(), Some("looping"));
    }
    let ok = wait_until(T, || c.server_stats().keys > 200);
    assert!(ok, "no load before the crash");

    let server_pid = c.server.pid();
    c.server.kill();
    let killed = Instant::now();
    let before = table(&c.rm_list());
    // Both writers loop over the same keys; keys 0 .. ops-1 of each were acknowledged (the
    // failing call's key may or may not have been stored).
    let mut acked = 0;
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
        acked = acked.max(num(&a, "ops") - 1);
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

    // The resource manager keeps the dead server's regions for its successor: they are
    // still there after several reaper passes.
    let kept = wait_until(Duration::from_secs(3), || {
        c.rm_list().iter().any(|a| a.owner_pid != server_pid)
    });
    assert!(
        !kept,
        "regions of the dead server changed hands: {:?}",
        c.rm_list()
    );
    assert_eq!(
        table(&c.rm_list()),
        before,
        "regions reclaimed within the grace"
    );
    let held = holder.ok("check_held", T);
    println!("views held across the server's death: {held}");
    assert_eq!(
        (num(&held, "intact"), num(&held, "corrupt")),
        (16, 0),
        "{held}"
    );

    let t = Instant::now();
    c.restart_server();
    println!("server restarted in {:?}", t.elapsed());
    // The new process adopted every region: same ids, now its own.
    let adopted = c.rm_list();
    assert_eq!(
        table(&adopted).iter().map(|r| r.0).collect::<Vec<_>>(),
        before.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert!(
        adopted.iter().all(|a| a.owner_pid == c.server.pid()),
        "{adopted:?}"
    );
    // Regions no key names (the writers' regions with pages not yet stored) go back: their
    // sessions ended with the old process.
    let ok = wait_until(Duration::from_secs(10), || {
        c.rm_stats().allocations == c.server_regions().len() as u64
    });
    assert!(
        ok,
        "adopted regions no key names were kept: {:?}",
        c.rm_list()
    );
    assert!(
        c.server_regions().len() < adopted.len(),
        "the pending page's region was kept"
    );
    println!(
        "adopted {} regions, kept the {} the index names",
        adopted.len(),
        c.server_regions().len()
    );

    // An old handler: its session ended with the server: a clear refusal, fast, never a
    // hang.
    let t = Instant::now();
    let a = tcp.call("once after 0", T);
    println!("old handler after the restart: {a} ({:?})", t.elapsed());
    assert!(a.starts_with("err"), "{a}");
    assert!(
        a.contains("no live session") || a.contains("session"),
        "not a clear error: {a}"
    );
    assert!(t.elapsed() < Duration::from_millis(CLIENT_TIMEOUT_MS + 500));

    // A new handler works and reads every acknowledged key with its bytes.
    for p in [&mut tcp, &mut uds] {
        p.ok("close", T);
    }
    let mut fresh = connect("fresh", &c.unix_url());
    fresh.ok("once after 0", T);
    let got = fresh.ok("verify k 0 16", T);
    assert_eq!((num(&got, "found"), num(&got, "corrupt")), (16, 0), "{got}");
    let got = fresh.ok(&format!("verify loop 0 {acked}"), T);
    println!("{acked} keys acknowledged under load, after the restart: {got}");
    assert_eq!(
        (num(&got, "found"), num(&got, "zeros"), num(&got, "corrupt")),
        (acked, 0, 0),
        "{got}"
    );
    // Other clients churn the pool; the views held across the restart still read their
    // bytes.
    let mut again = connect("reconnected", &c.server_url());
    again.ok("once after 1", T);
    assert_eq!(num(&again.ok("store churn 0 64", T), "stored"), 64);
    let held = holder.ok("check_held", T);
    println!("views held across the restart, after churn: {held}");
    assert_eq!(
        (num(&held, "intact"), num(&held, "corrupt")),
        (16, 0),
        "{held}"
    );
    fresh.ok("close", T);
    again.ok("close", T);
    holder.ok("close", T);
    pending.ok("close", T);
}

/// A server that stays dead longer than the resource manager's server grace loses its
/// regions to the reaper, and with them its keys: the restarted server drops the index's
/// entries whose regions are gone.
#[test]
fn a_server_dead_past_the_grace_has_its_regions_reclaimed() {
    let mut c = cluster(1.5);
    let mut w = connect("writer", &c.unix_url());
    assert_eq!(num(&w.ok("store k 0 16", T), "stored"), 16);
    assert!(c.rm_stats().allocations > 0);
    c.server.kill();
    let killed = Instant::now();
    let ok = wait_until(Duration::from_secs(15), || c.rm_stats().allocations == 0);
    let took = killed.elapsed();
    println!("regions of a server dead past the grace (1.5 s) reclaimed after {took:?}");
    assert!(ok, "not reclaimed: {:?}", c.rm_list());
    assert!(
        took >= Duration::from_millis(1400),
        "reclaimed within the grace: {took:?}"
    );
    w.ok("close", T);
    c.restart_server();
    let mut fresh = connect("fresh", &c.unix_url());
    let got = fresh.ok("verify k 0 16", T);
    assert_eq!(
        num(&got, "missing"),
        16,
        "keys of reclaimed regions served: {got}"
    );
    fresh.ok("close", T);
}

/// The binding of a server to its identity and the adoption are in the resource manager's
/// log: a resource manager SIGKILLed while the server is dead, and again after the
/// adoption, keeps both.
#[test]
fn a_resource_manager_restarted_around_the_adoption_keeps_it() {
    let mut c = cluster(30.0);
    let mut w = connect("writer", &c.unix_url());
    assert_eq!(num(&w.ok("store k 0 16", T), "stored"), 16);
    w.ok("close", T);
    c.server.kill();
    let before = table(&c.rm_list());
    assert!(!before.is_empty());
    c.restart_rm();
    assert_eq!(
        table(&c.rm_list()),
        before,
        "a restart during the grace lost regions"
    );
    c.restart_server();
    let pid = c.server.pid();
    let adopted: Vec<(u64, u32)> = before.iter().map(|&(r, _)| (r, pid)).collect();
    assert_eq!(table(&c.rm_list()), adopted);
    c.restart_rm();
    assert_eq!(table(&c.rm_list()), adopted, "the adoption was not logged");
    let mut fresh = connect("fresh", &c.unix_url());
    let got = fresh.ok("verify k 0 16", T);
    assert_eq!((num(&got, "found"), num(&got, "corrupt")), (16, 0), "{got}");
    fresh.ok("close", T);
}

/// Adopting a dead server's regions needs its identity and the proof that the caller may
/// act for it. A process presenting another identity adopts nothing; one presenting the
/// right identity over TCP without the cluster secret is refused. Neither changes the
/// resource manager's table, and the real successor then adopts everything.
#[test]
fn a_forged_adoption_is_refused_and_changes_nothing() {
    let mut c = cluster(60.0);
    let mut w = connect("writer", &c.unix_url());
    assert_eq!(num(&w.ok("store k 0 16", T), "stored"), 16);
    let id = server_id(&c);
    c.server.kill();
    w.ok("close", T);
    let before = table(&c.rm_list());
    assert!(!before.is_empty());

    let unix = ServerUrl::Unix(c.rm_spec.unix_socket());
    let other = [0x5a; 16];
    assert_ne!(other, id);
    let mut stranger = RmClient::connect_server(&unix, &other, T, None).unwrap();
    assert_eq!(
        table(&stranger.list().unwrap()),
        before,
        "another identity adopted"
    );
    drop(stranger);

    let e = RmClient::connect_server(&c.rm_url(), &id, T, None)
        .err()
        .expect("an adoption over TCP without the cluster secret was accepted");
    println!("the right identity over TCP without the secret: {e}");
    assert_eq!(
        e.remote().map(|w| w.code),
        Some(ErrorCode::Unauthenticated),
        "{e}"
    );
    assert_eq!(
        table(&c.rm_list()),
        before,
        "a refused adoption changed the table"
    );

    c.restart_server();
    let adopted = c.rm_list();
    assert!(
        adopted.iter().all(|a| a.owner_pid == c.server.pid()),
        "{adopted:?}"
    );
    let mut fresh = connect("fresh", &c.unix_url());
    let got = fresh.ok("verify k 0 16", T);
    assert_eq!((num(&got, "found"), num(&got, "corrupt")), (16, 0), "{got}");
    fresh.ok("close", T);
}

/// After a server crash and its grace the resource manager reclaims the dead server's
/// regions and hands the same extents to the next instances. A client process of the old server that still
/// holds a writable page (allocated, not yet stored) keeps its mapping of that memory.
#[test]
fn stale_writer_of_a_dead_server_cannot_touch_a_new_instances_data() {
    let mut c = cluster(0.5);
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
