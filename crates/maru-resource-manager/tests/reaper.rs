//! The reaper: dead local owners (pid gone, pid reused) lose their regions within a few
//! passes; live owners never; remote owners only after the grace period without a
//! connection, and not if they reconnect in time.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use maru_proto::Role;
use maru_resource_manager::RmClient;

const CHILD_ENV: &str = "MARU_RM_TEST_REAPER_CHILD";
const SERVER_ID_ENV: &str = "MARU_RM_TEST_REAPER_SERVER_ID";
const SERVER_ID: [u8; 16] = [0x42; 16];

/// Starts the child of `child_client_mode` against `url` and waits until it allocated its
/// two regions.
fn spawn_child(url: &maru_proto::ServerUrl, server: bool) -> std::process::Child {
    let mut cmd = maru_testkit::rerun_test("child_client_mode");
    cmd.env(CHILD_ENV, url.to_string());
    if server {
        cmd.env(SERVER_ID_ENV, "1");
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let ready = out
        .lines()
        .any(|l| l.is_ok_and(|l| l.contains("CHILD-READY")));
    assert!(ready, "child did not allocate");
    child
}

/// A 64 MiB pool whose reaper passes every 50 ms and keeps a dead server's regions a minute.
fn quick_reaper_config(dir: &std::path::Path) -> maru_resource_manager::RmConfig {
    let mut cfg = rm_config(dir, vec![shm_pool(dir, "p0", 64 * MIB)]);
    cfg.reap_interval = Duration::from_millis(50);
    cfg.server_grace = Duration::from_secs(60);
    cfg
}

/// A metadata server's durable identity: while its process lives nobody else may present
/// it; once it is dead its regions wait out the server grace (the reaper passes them by)
/// and a process presenting the identity over the Unix socket adopts every one of them.
#[test]
fn a_dead_servers_regions_wait_for_a_successor_that_adopts_them() {
    let d = temp_dir();
    let mut cfg = quick_reaper_config(d.path());
    cfg.unix = Some(d.path().join("rm.sock"));
    let rm = maru_resource_manager::start(cfg).unwrap();
    let unix = maru_proto::ServerUrl::Unix(d.path().join("rm.sock"));
    let mut child = spawn_child(&unix, true);
    let before: Vec<u64> = rm.list().iter().map(|a| a.handle.region_id).collect();
    assert_eq!(before.len(), 2);

    let e = RmClient::connect_server(&unix, &SERVER_ID, TIMEOUT, None)
        .err()
        .expect("a live server's identity was taken");
    assert_eq!(
        e.remote().map(|w| w.code),
        Some(maru_proto::ErrorCode::SessionConflict),
        "{e}"
    );
    assert!(rm.list().iter().all(|a| a.owner_pid == child.id()));

    child.kill().unwrap();
    child.wait().unwrap();
    wait_reaper_passes(&rm, 10);
    let list = rm.list();
    assert_eq!(list.len(), 2, "reclaimed within the server grace");
    assert_eq!(rm.stats().reclaimed_regions, 0);

    let _successor = RmClient::connect_server(&unix, &SERVER_ID, TIMEOUT, None).unwrap();
    let me = std::process::id();
    let after = rm.list();
    assert!(after.iter().all(|a| a.owner_pid == me), "{after:?}");
    let ids: Vec<u64> = after.iter().map(|a| a.handle.region_id).collect();
    assert_eq!(ids, before);
    wait_reaper_passes(&rm, 3);
    assert_eq!(rm.list().len(), 2, "an adopted region was reclaimed");
    rm.shutdown();
}

/// Without a durable identity a dead server's regions are reclaimed at once, as any local
/// owner's, whatever the server grace.
#[test]
fn a_server_without_an_identity_gets_no_grace() {
    let d = temp_dir();
    let rm = maru_resource_manager::start(quick_reaper_config(d.path())).unwrap();
    let mut child = spawn_child(&rm.url(), false);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || rm.list().is_empty()),
        "{:?}",
        rm.list()
    );
    rm.shutdown();
}

/// Not a test on its own: the body of the child process of
/// `sigkilled_local_client_regions_are_reclaimed_within_3s` (this test binary re-executed
/// with `CHILD_ENV` set to the resource manager's URL).
#[test]
fn child_client_mode() {
    let Ok(url) = std::env::var(CHILD_ENV) else {
        return;
    };
    let url = maru_proto::ServerUrl::parse(&url).unwrap();
    // With SERVER_ID_ENV: a metadata server with that durable identity.
    let mut c = match std::env::var(SERVER_ID_ENV) {
        Ok(_) => RmClient::connect_server(&url, &SERVER_ID, TIMEOUT, None).unwrap(),
        Err(_) => RmClient::connect(&url, Role::Server, TIMEOUT).unwrap(),
    };
    c.alloc(2 * MIB, None).unwrap();
    c.alloc(4 * MIB, None).unwrap();
    println!("CHILD-READY");
    // Stay alive (connected) until killed; bounded so a broken parent leaves nothing behind.
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn sigkilled_local_client_regions_are_reclaimed_within_3s() {
    let d = temp_dir();
    // Default reaper interval (1 s) and grace period (30 s): reclaiming a local owner does
    // not wait for any grace period.
    let rm = start_default(d.path());
    let mut child = maru_testkit::rerun_test("child_client_mode")
        .env(CHILD_ENV, rm.url().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut ready = false;
    for line in out.lines() {
        if line.unwrap().contains("CHILD-READY") {
            ready = true;
            break;
        }
    }
    assert!(ready, "child did not allocate");
    let list = rm.list();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].owner_pid, child.id());
    child.kill().unwrap(); // SIGKILL: no goodbye, no cleanup
    child.wait().unwrap();
    let killed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3), || rm.list().is_empty()),
        "regions of a SIGKILLed client still allocated 3 s later: {:?}",
        rm.list()
    );
    let s = rm.stats();
    assert_eq!(s.reclaimed_regions, 2);
    assert_eq!(s.pools[0].free_bytes, 64 * MIB);
    assert!(rm
        .render_metrics()
        .contains("maru_rm_reclaimed_regions_total 2"));
    eprintln!("reclaimed {:?} after the kill", killed.elapsed());
    rm.shutdown();
}

fn fast_reaper(dir: &std::path::Path, grace: Duration) -> maru_resource_manager::RmHandle {
    let mut cfg = rm_config(dir, vec![shm_pool(dir, "p0", 64 * MIB)]);
    cfg.reap_interval = Duration::from_millis(50);
    cfg.grace_period = grace;
    maru_resource_manager::start(cfg).unwrap()
}

#[test]
fn live_client_regions_are_never_reclaimed() {
    let d = temp_dir();
    let rm = fast_reaper(d.path(), Duration::from_millis(100));
    let mut c = client(&rm);
    let h = c.alloc(MIB, None).unwrap();
    wait_reaper_passes(&rm, 5);
    // Still alive but disconnected: a local owner is judged by its pid, not its connection.
    drop(c);
    wait_reaper_passes(&rm, 5);
    let list = rm.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].handle, h);
    assert!(!list[0].connected);
    assert_eq!(rm.stats().reclaimed_regions, 0);
    rm.shutdown();
}

#[test]
fn a_hello_cannot_record_a_start_time_its_process_does_not_have() {
    // A recorded start time that differs from the pid's means the pid was reused (the
    // reaper's unit tests show it counts as dead). A live process cannot make the resource
    // manager record a wrong one for itself: the Hello is refused.
    let d = temp_dir();
    let rm = fast_reaper(d.path(), Duration::from_secs(30));
    let (host, pid, start) = maru_transport::local_identity();
    assert_ne!(start, 0);
    let reused = RmClient::connect_as(&rm.url(), Role::Server, &host, pid, start + 1000, TIMEOUT);
    assert_eq!(
        reused.err().and_then(|e| e.code()),
        Some(maru_proto::ErrorCode::Unauthenticated)
    );
    let mut real = client(&rm);
    let keep = real.alloc(MIB, None).unwrap();
    assert_eq!(rm.list()[0].handle, keep);
    assert_eq!(rm.list()[0].owner_start_time, start);
    rm.shutdown();
}

#[test]
fn remote_client_reclaimed_only_after_grace_period() {
    let d = temp_dir();
    let grace = Duration::from_secs(1);
    let rm = fast_reaper(d.path(), grace);
    let mut remote =
        RmClient::connect_as(&rm.url(), Role::Server, "far-away-host", 4242, 17, TIMEOUT).unwrap();
    remote.alloc(MIB, None).unwrap();
    remote.alloc(MIB, None).unwrap();
    // Connected: never reclaimed, however long.
    wait_reaper_passes(&rm, 30);
    assert!(rm.list().iter().all(|a| a.connected));
    assert_eq!(rm.list().len(), 2);

    drop(remote);
    let lost = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || rm.list().is_empty()),
        "remote regions never reclaimed"
    );
    let after = lost.elapsed();
    assert!(
        after >= grace,
        "reclaimed after {after:?}, before the {grace:?} grace period"
    );
    assert!(
        after < grace + Duration::from_secs(2),
        "reclaimed only after {after:?}"
    );
    assert_eq!(rm.stats().reclaimed_regions, 2);
    rm.shutdown();
}

#[test]
fn remote_client_reconnecting_in_time_keeps_its_regions() {
    let d = temp_dir();
    let grace = Duration::from_secs(1);
    let rm = fast_reaper(d.path(), grace);
    let connect = || {
        RmClient::connect_as(&rm.url(), Role::Server, "far-away-host", 4243, 18, TIMEOUT).unwrap()
    };
    let mut remote = connect();
    let h = remote.alloc(MIB, None).unwrap();
    drop(remote);
    // The peer's reconnect delay (part of the scenario, not a wait for a condition).
    std::thread::sleep(grace / 3);
    let mut again = connect();
    let back = Instant::now();
    assert!(wait_until(Duration::from_secs(3), || rm
        .list()
        .first()
        .is_some_and(|a| a.connected)));
    // Well past the grace period counted from the first disconnect: still there.
    wait_reaper_passes(&rm, 5);
    assert!(wait_until(grace * 3, || back.elapsed() > grace * 2));
    wait_reaper_passes(&rm, 3);
    assert_eq!(
        rm.list().len(),
        1,
        "reclaimed although the owner reconnected in time"
    );
    // The reconnected owner can free it: it is the same owner.
    again.free(&h).unwrap();
    rm.shutdown();
}
