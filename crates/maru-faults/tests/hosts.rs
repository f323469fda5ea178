//! Several hosts on one pool: the daemons on one host (the root network namespace), client
//! processes on others (network namespaces on a bridge, `maru_testkit::hosts`), every host
//! reaching the same pool file, as hosts behind a CXL switch reach one device. Real daemon
//! binaries, real client processes (this binary in its child role, started with
//! `ip netns exec`), real TCP over veth links that a test can cut.
//!
//! What must hold: chunks written on one host are read on another in place (the bytes are
//! in the pool, not on the wire); a host whose link is cut loses its session once the
//! daemons' dead-peer timeout passes, its unreferenced regions go back to the resource
//! manager and the referenced ones stay; its handler fails with a typed error within its
//! timeout, during the cut and after; a host whose processes all die is reclaimed the same
//! way.
//!
//! Needs root; without it (or without `ip`) each test prints why and passes vacuously.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use maru_client::POOL_PATH_ENV;
use maru_faults::child::{ids, num, ChildProc};
use maru_faults::payload::{len_for, payload};
use maru_faults::{wait_until, KIB, MIB};
use maru_proto::{Request, Response, RmAllocation};
use maru_testkit::hosts::{Host, Hosts};
use maru_testkit::{BinaryCluster, ClusterOpts};
use maru_transport::auth::{ClusterSecret, SECRET_ENV};

const T: Duration = Duration::from_secs(30);
/// The daemons' dead-peer timeout in these tests (25 s in production).
const DEAD_PEER_SECS: u64 = 3;
/// Every client's bound on a wait for the server.
const CLIENT_TIMEOUT_MS: u64 = 2000;

#[test]
fn child_role() {
    maru_faults::child::run_if_child();
}

/// Two client hosts, "b" and "c", and the daemons on the root namespace's host (see
/// [`cluster`]); `None` (after printing why) when this machine cannot make the hosts.
fn two_hosts() -> Option<(Hosts, Cluster, Host, Host)> {
    let hosts = match Hosts::new(2) {
        Ok(h) => h,
        Err(why) => {
            println!("skipped: {why}");
            return None;
        }
    };
    let c = cluster();
    let (b, cc) = (hosts.host("b").clone(), hosts.host("c").clone());
    Some((hosts, c, b, cc))
}

/// The daemons and the cluster secret their TCP clients must hold.
struct Cluster {
    c: BinaryCluster,
    secret: PathBuf,
    /// Holds the secret file (dropped last).
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Cluster {
    type Target = BinaryCluster;
    fn deref(&self) -> &BinaryCluster {
        &self.c
    }
}

/// Daemons on the root namespace's host, the metadata server listening on every address
/// (the bridge's for remote hosts, loopback for the test's own admin reads), requiring the
/// cluster secret of TCP clients.
fn cluster() -> Cluster {
    let dir = maru_testkit::temp_dir();
    let secret = dir.path().join("cluster-secret");
    ClusterSecret::generate(&secret).unwrap();
    let dead = DEAD_PEER_SECS.to_string();
    let c = BinaryCluster::start(ClusterOpts {
        server_extra: vec![
            "--host".into(),
            "0.0.0.0".into(),
            "--dead-peer-secs".into(),
            dead.clone(),
            "--secret-file".into(),
            secret.display().to_string(),
        ],
        rm_extra: vec!["--dead-peer-secs".into(), dead],
        ..ClusterOpts::default()
    });
    Cluster {
        c,
        secret,
        _dir: dir,
    }
}

fn url_of(hosts: &Hosts, c: &Cluster) -> String {
    format!("tcp://{}:{}", hosts.daemon_addr, c.server_spec.port)
}

/// A client process on `host` holding the secret file `secret` (`None`: none).
fn process_on(hosts: &Hosts, host: &Host, name: &str, secret: Option<&Path>) -> ChildProc {
    process_with_pool(hosts, host, name, secret, None)
}

/// Like [`process_on`], with `pool_path` as the host's own path of the pool
/// (`MARU_POOL_PATH`; `None`: the path the server reports).
fn process_with_pool(
    hosts: &Hosts,
    host: &Host,
    name: &str,
    secret: Option<&Path>,
    pool_path: Option<&Path>,
) -> ChildProc {
    let mut launcher = hosts.launcher(host);
    launcher.env_remove(SECRET_ENV).env_remove(POOL_PATH_ENV);
    if let Some(s) = secret {
        launcher.env(SECRET_ENV, s);
    }
    if let Some(p) = pool_path {
        launcher.env(POOL_PATH_ENV, p);
    }
    ChildProc::spawn_via(name, launcher)
}

/// A client process on `host`, connected over TCP to the daemons' host.
fn client_on(hosts: &Hosts, host: &Host, c: &Cluster, name: &str) -> ChildProc {
    let mut p = process_on(hosts, host, name, Some(&c.secret));
    p.connect(&url_of(hosts, c), 2 * MIB, 64 * KIB, CLIENT_TIMEOUT_MS, T);
    p
}

fn rm_ids(c: &Cluster) -> BTreeSet<u64> {
    c.rm_region_ids().into_iter().collect()
}

/// Waits (bounded) until the resource manager's regions are exactly `want`.
fn expect_rm_regions(c: &Cluster, want: &BTreeSet<u64>, within: Duration, what: &str) {
    let mut last = BTreeSet::new();
    let ok = wait_until(within, || {
        last = rm_ids(c);
        last == *want
    });
    assert!(
        ok,
        "{what}: resource manager has {last:?}, expected {want:?}"
    );
}

/// What a refused connection must not change: the server's keys and regions, and the
/// resource manager's allocations.
fn observe(c: &Cluster) -> (u64, u64, Vec<RmAllocation>) {
    let s = c.server_stats();
    (s.keys, s.regions, c.rm_list())
}

/// Where `key`'s bytes are in the pool file: (file offset, length).
fn locate(c: &Cluster, key: &[u8]) -> (u64, u64) {
    match c.server_admin().call(&Request::Lookup { key }) {
        Ok(Response::Lookup(Some(loc))) => (loc.region.access.offset + loc.offset, loc.len),
        other => panic!("lookup {key:?}: {other:?}"),
    }
}

/// A producer on one host fills 32 pages (one 2 MiB region) and then writes one more page it
/// deletes again, so it owns a region full of keys and a region no key references.
/// Returns (referenced region, unreferenced region).
fn produce(p: &mut ChildProc, prefix: &str) -> (u64, u64) {
    assert_eq!(num(&p.ok(&format!("store {prefix} 0 32"), T), "stored"), 32);
    let full = ids(&p.ok("regions", T));
    assert_eq!(num(&p.ok(&format!("store {prefix} 32 1"), T), "stored"), 1);
    let all = ids(&p.ok("regions", T));
    let got = p.ok(&format!("delete {prefix} 32 1"), T);
    assert_eq!(num(&got, "deleted"), 1, "{got}");
    let spare: Vec<u64> = all.difference(&full).copied().collect();
    assert_eq!((full.len(), spare.len()), (1, 1), "{full:?} {all:?}");
    (*full.first().unwrap(), spare[0])
}

/// A producer on the first host that has run [`produce`] with `prefix`, and a reader on the
/// second: (producer, (referenced region, unreferenced region), reader).
fn produced(
    hosts: &Hosts,
    c: &Cluster,
    (on, other): (&Host, &Host),
    prefix: &str,
) -> (ChildProc, (u64, u64), ChildProc) {
    let mut producer = client_on(hosts, on, c, "producer");
    let regions = produce(&mut producer, prefix);
    let reader = client_on(hosts, other, c, "reader");
    (producer, regions, reader)
}

#[test]
fn a_remote_producer_and_a_remote_consumer_share_chunks_in_place() {
    let Some((hosts, c, b, cc)) = two_hosts() else {
        return;
    };
    let mut producer = client_on(&hosts, &b, &c, "producer");
    let mut consumer = client_on(&hosts, &cc, &c, "consumer");
    assert_eq!(num(&producer.ok("store kv 0 24", T), "stored"), 24);

    let got = consumer.ok("verify kv 0 24", T);
    assert_eq!((num(&got, "found"), num(&got, "corrupt")), (24, 0), "{got}");
    let got = consumer.ok("hold kv 0 24", T);
    assert_eq!((num(&got, "held"), num(&got, "corrupt")), (24, 0), "{got}");

    // The bytes are in the pool file itself, where the lookup says (the switch's view).
    let pool = std::fs::File::open(&c.pool).unwrap();
    let key = b"kv-5".to_vec();
    let (at, len) = locate(&c, &key);
    assert_eq!(len as usize, len_for(&key, 64 * KIB as usize));
    let mut bytes = vec![0u8; len as usize];
    pool.read_exact_at(&mut bytes, at).unwrap();
    assert_eq!(bytes, payload(&key, len as usize), "pool bytes of {key:?}");

    // The consumer's views are that memory, not copies: a byte changed in the pool shows
    // through them at once.
    let pool_rw = std::fs::OpenOptions::new()
        .write(true)
        .open(&c.pool)
        .unwrap();
    pool_rw.write_all_at(&[!bytes[0]], at).unwrap();
    let got = consumer.ok("check_held", T);
    assert_eq!(
        (num(&got, "intact"), num(&got, "corrupt")),
        (23, 1),
        "views of another host's chunks are the pool's memory: {got}"
    );
    let stats = c.server_stats();
    assert_eq!(stats.keys, 24);
}

#[test]
fn a_host_cut_off_loses_its_session_and_only_its_unreferenced_regions() {
    let Some((hosts, c, b, cc)) = two_hosts() else {
        return;
    };
    let (mut producer, (full, spare), mut reader) = produced(&hosts, &c, (&b, &cc), "cut");
    let reader_regions = ids(&reader.ok("regions", T));
    let before = rm_ids(&c);
    assert!(
        before.contains(&full) && before.contains(&spare),
        "{before:?}"
    );

    hosts.cut(&b);
    let cut_at = Instant::now();
    // A call during the cut fails with a typed error within the client's timeout.
    let got = producer.call("once during 0", T);
    let ms = num(&got, "elapsed_ms");
    assert!(
        got.starts_with("err kind="),
        "a call across a cut link: {got}"
    );
    assert!(
        ms <= CLIENT_TIMEOUT_MS + 1000,
        "a call across a cut link took {ms} ms (timeout {CLIENT_TIMEOUT_MS} ms): {got}"
    );

    // Once the dead-peer timeout passes, the session is gone: the spare region goes back,
    // the one other hosts' readers still need stays.
    let want: BTreeSet<u64> = before.iter().copied().filter(|r| *r != spare).collect();
    expect_rm_regions(
        &c,
        &want,
        Duration::from_secs(DEAD_PEER_SECS * 5),
        "after host b was cut off",
    );
    assert!(
        cut_at.elapsed() >= Duration::from_secs(DEAD_PEER_SECS - 1),
        "the session ended before the dead-peer timeout ({:?})",
        cut_at.elapsed()
    );
    let got = reader.ok("verify cut 0 32", T);
    assert_eq!((num(&got, "found"), num(&got, "corrupt")), (32, 0), "{got}");
    assert!(c
        .server_regions()
        .iter()
        .filter(|r| r.handle.region_id == full)
        .all(|r| !r.owner_connected && r.ref_count == 32));

    // Link back: the handler either works again or fails cleanly, never hangs.
    hosts.restore(&b);
    for i in 0..3 {
        let got = producer.call(&format!("once after {i}"), T);
        let ms = num(&got, "elapsed_ms");
        println!("after the link came back: {got}");
        assert!(
            got.starts_with("ok") || got.starts_with("err kind="),
            "not a typed outcome: {got}"
        );
        assert!(
            ms <= CLIENT_TIMEOUT_MS + 1000,
            "a call after the link came back took {ms} ms: {got}"
        );
    }
    // Whatever the handler did, the resource manager holds no region for a dead session
    // beyond what keys reference, and the reader's regions are untouched.
    let now = rm_ids(&c);
    assert!(!now.contains(&spare), "{now:?}");
    assert!(reader_regions.is_subset(&now), "{now:?}");
}

#[test]
fn a_host_whose_processes_all_die_is_reclaimed() {
    let Some((hosts, c, b, cc)) = two_hosts() else {
        return;
    };
    let (_producer, (full, spare), mut reader) = produced(&hosts, &c, (&b, &cc), "boot");
    let got = reader.ok("hold boot 0 32", T);
    assert_eq!(num(&got, "held"), 32, "{got}");
    let reader_regions = ids(&reader.ok("regions", T));

    // The host "reboots": every process in it dies at once, nothing says goodbye.
    assert!(hosts.kill_all(&b) >= 1);
    assert!(wait_until(T, || hosts.pids(&b).is_empty()));
    let want: BTreeSet<u64> = reader_regions.iter().copied().chain([full]).collect();
    expect_rm_regions(&c, &want, T, "after host b rebooted");
    assert!(!rm_ids(&c).contains(&spare));
    let got = reader.ok("check_held", T);
    assert_eq!(num(&got, "intact"), 32, "{got}");

    // Its keys are deleted by another host: they go at once, but the reader's views hold
    // their pages, so its last region stays until the reader leaves.
    assert_eq!(num(&reader.ok("delete boot 0 32", T), "deleted"), 32);
    let got = reader.ok("check_held", T);
    assert_eq!(num(&got, "intact"), 32, "{got}");
    assert!(
        rm_ids(&c).contains(&full),
        "a region was freed under live views"
    );
    reader.ok("close", T);
    expect_rm_regions(&c, &BTreeSet::new(), T, "after the reader left");
}

#[test]
fn a_host_without_the_cluster_secret_gets_nothing() {
    let Some((hosts, c, b, cc)) = two_hosts() else {
        return;
    };
    let mut member = client_on(&hosts, &b, &c, "member");
    assert_eq!(num(&member.ok("store m 0 4", T), "stored"), 4);
    let before = observe(&c);

    let other = maru_testkit::temp_dir();
    let wrong = other.path().join("wrong-secret");
    ClusterSecret::generate(&wrong).unwrap();
    for (what, secret) in [
        ("no secret", None),
        ("another secret", Some(wrong.as_path())),
    ] {
        let mut stranger = process_on(&hosts, &cc, "stranger", secret);
        let got = stranger.call(
            &format!(
                "connect {} {} {} {CLIENT_TIMEOUT_MS}",
                url_of(&hosts, &c),
                2 * MIB,
                64 * KIB
            ),
            T,
        );
        println!("{what}: {got}");
        assert!(
            got.starts_with("err"),
            "{what}: a stranger connected: {got}"
        );
        assert!(
            got.contains("secret"),
            "{what}: the refusal does not say why: {got}"
        );
        assert_eq!(
            observe(&c),
            before,
            "{what}: a refused connection changed state"
        );
    }
    let got = member.ok("verify m 0 4", T);
    assert_eq!(num(&got, "found"), 4, "{got}");
}

/// The files a process has mapped (`/proc/PID/maps`).
fn mapped_files(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
}

#[test]
fn each_host_maps_the_pool_under_its_own_path_and_a_wrong_device_is_refused() {
    let Some((hosts, c, b, cc)) = two_hosts() else {
        return;
    };
    // Beside the pool, so that the hosts' names for it are on its file system.
    let dir = c.pool.parent().unwrap().to_owned();
    let path_b = hosts.device_path(&b, &dir, &c.pool, "cxl0");
    let path_c = hosts.device_path(&cc, &dir, &c.pool, "mem1");
    let connect =
        |p: &mut ChildProc| p.connect(&url_of(&hosts, &c), 2 * MIB, 64 * KIB, CLIENT_TIMEOUT_MS, T);
    let mut producer = process_with_pool(&hosts, &b, "producer", Some(&c.secret), Some(&path_b));
    connect(&mut producer);
    let mut consumer = process_with_pool(&hosts, &cc, "consumer", Some(&c.secret), Some(&path_c));
    connect(&mut consumer);
    assert_eq!(num(&producer.ok("store own 0 8", T), "stored"), 8);
    let got = consumer.ok("hold own 0 8", T);
    assert_eq!((num(&got, "held"), num(&got, "corrupt")), (8, 0), "{got}");
    for (p, path) in [(&producer, &path_b), (&consumer, &path_c)] {
        let maps = mapped_files(p.pid());
        assert!(maps.contains(path.to_str().unwrap()), "{maps}");
        assert!(
            !maps.contains(&format!(" {}\n", c.pool.display())),
            "mapped under the server's path: {maps}"
        );
    }

    // Host c names another pool's device (another cluster's pool file): refused, with both
    // identities, and nothing changes at the daemons.
    let before = observe(&c);
    let other = cluster();
    let wrong = hosts.device_path(&cc, other.pool.parent().unwrap(), &other.pool, "mem2");
    let mut stray = process_with_pool(&hosts, &cc, "stray", Some(&c.secret), Some(&wrong));
    connect(&mut stray);
    for cmd in ["store stray 0 1", "hold own 0 1"] {
        let got = stray.call(cmd, T);
        assert!(got.starts_with("err kind=WrongPool"), "{cmd}: {got}");
        assert!(got.contains("is pool UUID"), "{cmd}: {got}");
    }
    drop(stray);
    let mut last = None;
    let same = wait_until(T, || {
        let now = observe(&c);
        let same = now == before;
        last = Some(now);
        same
    });
    assert!(
        same,
        "a refused host changed the daemons: {last:?} vs {before:?}"
    );
    assert!(other.rm_list().is_empty());
}
