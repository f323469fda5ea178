//! Crash recovery with the real binary: SIGKILL in the middle of a random alloc/free
//! workload driven by several client processes, restart on the same state directory, and
//! compare the allocation table with the model of acknowledged operations. Also: a torn WAL
//! tail is cut, a corrupt checkpoint is refused, a state directory has one owner.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use maru_proto::{ErrorCode, Role};
use maru_resource_manager::{RmAllocation, RmClient};

const CLIENT_ENV: &str = "MARU_RM_TEST_CRASH_CLIENT";
const MAX_OPS_PER_CLIENT: u64 = 3000;

/// Not a test on its own: the body of a workload client process (this test binary
/// re-executed with `CLIENT_ENV=url,host,seed`). Prints one line per step, flushed, so the
/// parent knows exactly which operations were acknowledged when the server died.
#[test]
fn workload_client_mode() {
    let Ok(spec) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let mut parts = spec.split(',');
    let url = maru_proto::ServerUrl::parse(parts.next().unwrap()).unwrap();
    let host = parts.next().unwrap().to_owned();
    let mut seed: u64 = parts.next().unwrap().parse().unwrap();
    let mut rand = move || {
        // xorshift64*: deterministic per seed, no dependency.
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    // A remote identity (fake host), so that after the restart the reaper leaves this dead
    // client's regions alone for the grace period and the table can be compared.
    let Ok(mut c) = RmClient::connect_as(&url, Role::Server, &host, std::process::id(), 1, TIMEOUT)
    else {
        println!("DEAD connect");
        return;
    };
    let mut live: Vec<maru_proto::Handle> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    for _ in 0..MAX_OPS_PER_CLIENT {
        if Instant::now() > deadline {
            break;
        }
        let free = !live.is_empty() && (live.len() > 8 || rand() % 100 < 40);
        if free {
            let h = live.swap_remove((rand() % live.len() as u64) as usize);
            println!("FREE-SENT {}", h.region_id);
            match c.free(&h) {
                Ok(()) => println!("FREED {}", h.region_id),
                Err(e) if e.code().is_some() => println!("UNEXPECTED {e}"),
                Err(_) => {
                    println!("DEAD");
                    return;
                }
            }
        } else {
            let size = 1 + rand() % (6 * MIB);
            println!("ALLOC-SENT");
            match c.alloc(size, None) {
                Ok(h) => {
                    println!("ALLOC {} {} {} {}", h.region_id, h.pool, h.offset, h.len);
                    live.push(h);
                }
                Err(e) if e.code() == Some(ErrorCode::PoolExhausted) => println!("FULL"),
                Err(e) if e.code().is_some() => println!("UNEXPECTED {e}"),
                Err(_) => {
                    println!("DEAD");
                    return;
                }
            }
        }
    }
    println!("DONE");
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Region {
    pool: String,
    offset: u64,
    len: u64,
    host: String,
}

/// What the acknowledged operations say the table must be.
#[derive(Debug, Default)]
struct Model {
    live: BTreeMap<u64, Region>,
    /// Freed and acknowledged: must be absent for ever.
    freed: BTreeSet<u64>,
}

/// One client process and its output, read as it comes.
struct Client {
    host: String,
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

fn spawn_client(url: &maru_proto::ServerUrl, host: &str, seed: u64) -> Client {
    let mut child = maru_testkit::rerun_test("workload_client_mode")
        .env(CLIENT_ENV, format!("{url},{host},{seed}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let out = BufReader::new(child.stdout.take().unwrap());
    let l2 = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            l2.lock().unwrap().push(line);
        }
    });
    Client {
        host: host.to_owned(),
        child,
        lines,
        reader: Some(reader),
    }
}

fn acked(clients: &[Client]) -> usize {
    clients
        .iter()
        .map(|c| {
            c.lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.starts_with("ALLOC ") || l.starts_with("FREED "))
                .count()
        })
        .sum()
}

/// Waits for the clients to notice the dead server and exit, then folds their logs into the
/// model. Returns, per client host, whether an allocation was in flight (sent, never
/// answered), and the ids of frees in flight.
fn collect(clients: Vec<Client>, model: &mut Model) -> (BTreeMap<String, bool>, BTreeSet<u64>) {
    let mut alloc_in_flight = BTreeMap::new();
    let mut free_in_flight = BTreeSet::new();
    for mut c in clients {
        assert!(
            maru_testkit::wait_until(Duration::from_secs(15), || c
                .child
                .try_wait()
                .unwrap()
                .is_some()),
            "client {} did not exit",
            c.host
        );
        c.reader.take().unwrap().join().unwrap();
        let lines = c.lines.lock().unwrap();
        let mut pending_alloc = false;
        let mut pending_free = None;
        for l in lines.iter() {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.first().copied() {
                Some("ALLOC-SENT") => pending_alloc = true,
                Some("ALLOC") => {
                    pending_alloc = false;
                    let id: u64 = f[1].parse().unwrap();
                    let r = Region {
                        pool: f[2].to_owned(),
                        offset: f[3].parse().unwrap(),
                        len: f[4].parse().unwrap(),
                        host: c.host.clone(),
                    };
                    assert!(
                        !model.freed.contains(&id),
                        "region id {id} handed out twice"
                    );
                    assert!(
                        model.live.insert(id, r).is_none(),
                        "region id {id} handed out twice"
                    );
                }
                Some("FULL") => pending_alloc = false,
                Some("FREE-SENT") => pending_free = Some(f[1].parse::<u64>().unwrap()),
                Some("FREED") => {
                    let id: u64 = f[1].parse().unwrap();
                    pending_free = None;
                    assert!(
                        model.live.remove(&id).is_some(),
                        "freed region {id} unknown to the model"
                    );
                    model.freed.insert(id);
                }
                Some("UNEXPECTED") => panic!("client {} got an unexpected error: {l}", c.host),
                _ => {}
            }
        }
        alloc_in_flight.insert(c.host.clone(), pending_alloc);
        free_in_flight.extend(pending_free);
    }
    (alloc_in_flight, free_in_flight)
}

fn table(url: &maru_proto::ServerUrl) -> Vec<RmAllocation> {
    RmClient::connect(url, Role::Admin, TIMEOUT)
        .unwrap()
        .list()
        .unwrap()
}

/// Compares the recovered table with the model, resolving in-flight operations (each may or
/// may not have happened), and checks that no two regions overlap.
fn check(
    actual: &[RmAllocation],
    model: &mut Model,
    alloc_in_flight: &BTreeMap<String, bool>,
    free_in_flight: &BTreeSet<u64>,
) {
    let by_id: BTreeMap<u64, &RmAllocation> =
        actual.iter().map(|a| (a.handle.region_id, a)).collect();
    assert_eq!(
        by_id.len(),
        actual.len(),
        "duplicate region ids in the table"
    );
    for (id, r) in &model.live {
        match by_id.get(id) {
            Some(a) => {
                assert_eq!(
                    (&a.handle.pool, a.handle.offset, a.handle.len, &a.owner_host),
                    (&r.pool, r.offset, r.len, &r.host),
                    "region {id} changed across the crash"
                );
            }
            None => assert!(
                free_in_flight.contains(id),
                "acknowledged region {id} lost in the crash"
            ),
        }
    }
    for id in &model.freed {
        assert!(
            !by_id.contains_key(id),
            "region {id} freed (acknowledged) but back after the crash"
        );
    }
    let mut unexplained: BTreeMap<&str, u32> = BTreeMap::new();
    for (id, a) in &by_id {
        if model.live.contains_key(id) {
            continue;
        }
        // Allocated but never acknowledged: only possible for an allocation in flight.
        assert!(
            alloc_in_flight.get(&a.owner_host).copied().unwrap_or(false),
            "region {id} of {} in the table but never acknowledged",
            a.owner_host
        );
        let n = unexplained.entry(&a.owner_host).or_default();
        *n += 1;
        assert_eq!(
            *n, 1,
            "more than one unacknowledged allocation for {}",
            a.owner_host
        );
        model.live.insert(
            *id,
            Region {
                pool: a.handle.pool.clone(),
                offset: a.handle.offset,
                len: a.handle.len,
                host: a.owner_host.clone(),
            },
        );
    }
    // Frees in flight that did happen.
    model.live.retain(|id, _| by_id.contains_key(id));
    let mut extents: Vec<(&str, u64, u64)> = actual
        .iter()
        .map(|a| (a.handle.pool.as_str(), a.handle.offset, a.handle.len))
        .collect();
    extents.sort();
    for w in extents.windows(2) {
        assert!(
            w[0].0 != w[1].0 || w[0].1 + w[0].2 <= w[1].1,
            "regions overlap: {w:?}"
        );
    }
}

#[test]
fn sigkill_mid_workload_loses_nothing_and_hands_out_nothing_twice() {
    let d = temp_dir();
    let pools = vec![maru_testkit::shm_pool_arg(d.path(), "p0", 1024 * MIB)];
    let mut model = Model::default();
    let mut max_id_seen = 0;
    // Round 2 runs past the 1000-operation checkpoint interval, so recovery goes through
    // checkpoint + log replay, not only the log.
    for (round, kill_after) in [(0u64, 250usize), (1, 1300), (2, 400)] {
        let mut rm = spawn_rm(d.path(), &pools, &[]);
        check(
            &table(&rm.url()),
            &mut model,
            &BTreeMap::new(),
            &BTreeSet::new(),
        );
        let clients: Vec<Client> = (0..3)
            .map(|i| {
                spawn_client(
                    &rm.url(),
                    &format!("crash-r{round}-c{i}"),
                    1 + round * 10 + i,
                )
            })
            .collect();
        assert!(
            wait_until(Duration::from_secs(30), || acked(&clients) >= kill_after),
            "workload too slow: {} operations acknowledged",
            acked(&clients)
        );
        rm.kill();
        let n = acked(&clients);
        let (alloc_in_flight, free_in_flight) = collect(clients, &mut model);
        eprintln!(
            "round {round}: killed after {n} acknowledged operations; {} live regions; in flight: {} allocs, {} frees",
            model.live.len(),
            alloc_in_flight.values().filter(|v| **v).count(),
            free_in_flight.len()
        );

        let mut rm = spawn_rm(d.path(), &pools, &[]);
        check(
            &table(&rm.url()),
            &mut model,
            &alloc_in_flight,
            &free_in_flight,
        );
        let ids: Vec<u64> = model.live.keys().copied().collect();
        let new = connect(&rm.url()).alloc(MIB, None).unwrap();
        assert!(
            new.region_id > *ids.iter().max().unwrap_or(&0) && new.region_id > max_id_seen,
            "region id reused"
        );
        max_id_seen = new.region_id;
        rm.kill();
        // The probe allocation above belongs to the model too (its owner, this process, is alive).
        model.live.insert(
            new.region_id,
            Region {
                pool: new.pool.clone(),
                offset: new.offset,
                len: new.len,
                host: maru_transport::local_identity().0,
            },
        );
    }
    // A clean stop (final checkpoint) and another start keep the same table.
    let mut rm = spawn_rm(d.path(), &pools, &[]);
    let before = table(&rm.url());
    assert!(rm.terminate().success());
    let mut rm = spawn_rm(d.path(), &pools, &[]);
    assert_eq!(table(&rm.url()), before);
    check(&before, &mut model, &BTreeMap::new(), &BTreeSet::new());
    rm.kill();
}

#[test]
fn torn_wal_tail_is_cut_and_startup_succeeds() {
    let (d, pools, mut rm) = spawn_default();
    let mut c = connect(&rm.url());
    let hs: Vec<_> = (0..5).map(|_| c.alloc(2 * MIB, None).unwrap()).collect();
    drop(c);
    rm.kill();
    let wal = state_dir(d.path()).join("wal");
    let len = std::fs::metadata(&wal).unwrap().len();
    assert!(len > 0, "operations were not logged");
    // Cut the last record in the middle, as a crash during its append would.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .unwrap()
        .set_len(len - 7)
        .unwrap();

    let mut rm = spawn_rm(d.path(), &pools, &[]);
    let ids: Vec<u64> = table(&rm.url())
        .iter()
        .map(|a| a.handle.region_id)
        .collect();
    assert_eq!(ids, hs[..4].iter().map(|h| h.region_id).collect::<Vec<_>>());
    assert!(
        rm.stderr_text().contains("torn tail"),
        "no warning: {}",
        rm.stderr_text()
    );
    // And the daemon works on.
    let mut c = connect(&rm.url());
    c.free(&hs[0]).unwrap();
    c.alloc(2 * MIB, None).unwrap();
    drop(c);
    rm.kill();
}

#[test]
fn corrupt_checkpoint_is_refused_never_reset() {
    let (d, pools, mut rm) = spawn_default();
    connect(&rm.url()).alloc(MIB, None).unwrap();
    assert!(rm.terminate().success());
    let ckpt = state_dir(d.path()).join("checkpoint");
    let mut bytes = std::fs::read(&ckpt).expect("checkpoint written at shutdown");
    let n = bytes.len();
    bytes[n - 2] ^= 0xff;
    std::fs::write(&ckpt, &bytes).unwrap();

    let (code, err) = failed_start(d.path(), &pools);
    assert_ne!(code, Some(0), "started on a corrupt checkpoint");
    assert!(
        err.contains("corrupt") && err.contains("refusing"),
        "unclear error: {err}"
    );
    assert_eq!(
        std::fs::read(&ckpt).unwrap(),
        bytes,
        "the corrupt checkpoint was touched"
    );
}

#[test]
fn one_state_dir_serves_one_resource_manager() {
    let (d, pools, mut rm) = spawn_default();
    let (code, err) = failed_start(d.path(), &pools);
    assert_ne!(code, Some(0));
    assert!(err.contains("in use by another resource manager"), "{err}");
    rm.kill();
}
