//! A full pool makes room instead of failing. Real `maru-resource-manager` and `maru-server`
//! processes, real client processes (this binary in its child role):
//!
//! * a writer fills the pool and is SIGKILLed while a reader pins some of its keys; a second
//!   writer then gets room by the server evicting the dead writer's unpinned keys (its regions
//!   go back with their last key), while an existence storm on those keys runs. The pinned
//!   keys survive with their bytes; once the reader is SIGKILLed too, its pins end and the
//!   rest goes the same way, and no region is left behind;
//! * three live writers write ten times the pool with Zipf-skewed keys while readers pin, read
//!   and check every value: no store fails, no pinned key goes, every read is intact, and
//!   nothing is left at the resource manager at the end;
//! * an owner that stops reading (SIGSTOP) slows nobody's deletes, and gets every page back
//!   once it runs again;
//! * a new handler on a pool full of live, idle writers' regions gets room: the server takes
//!   regions back from their owners (their unpinned keys go, pinned ones stay); when every
//!   live region holds only pinned keys it is refused at once, and a stopped owner or one with
//!   a page allocated and not stored in the region asked back costs it at most the deadline,
//!   never a page someone may still write.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use maru_client::{MaruConfig, MaruHandler};
use maru_faults::child::{field, ids, num, ChildProc};
use maru_faults::{wait_until, KIB, MIB};
use maru_testkit::binary_cluster::server_stats;
use maru_testkit::{BinaryCluster, ClusterOpts};

const T: Duration = Duration::from_secs(60);
const REGION: u64 = 2 * MIB;
const CHUNK: u64 = 64 * KIB;
/// Keys per region.
const PER_REGION: u64 = REGION / CHUNK;

#[test]
fn child_role() {
    if std::env::var_os(ZIPF_ROLE).is_some() {
        zipf::run();
    }
    maru_faults::child::run_if_child();
}

fn connect(c: &BinaryCluster, name: &str) -> ChildProc {
    ChildProc::spawn_connected(name, &c.unix_url(), REGION, CHUNK, 5000, T)
}

/// Keys of a pool's worth.
const FULL: u64 = 16 * MIB / CHUNK;

/// The daemons on a 16 MiB pool, which [`FULL`] keys fill.
fn full_pool_cluster() -> BinaryCluster {
    BinaryCluster::start(ClusterOpts {
        pool_bytes: 16 * MIB,
        ..ClusterOpts::default()
    })
}

#[test]
fn a_full_pool_evicts_a_dead_writers_unpinned_keys_and_never_a_pinned_one() {
    let c = full_pool_cluster();
    // A pool's worth of keys: the pool is then full of a's regions (a live writer evicts its
    // own oldest keys rather than fail, if fewer fit).
    let mut a = connect(&c, "writer-a");
    assert_eq!(num(&a.ok(&format!("store a 0 {FULL}"), T), "stored"), FULL);
    let stored_a = FULL;
    let a_regions = ids(&a.ok("regions", T));
    assert!(a_regions.len() >= 4, "only {a_regions:?}");

    // The reader pins a's last ten keys and reads them.
    let mut r = connect(&c, "reader");
    assert_eq!(
        num(&r.ok(&format!("pin a {} 10", FULL - 10), T), "pinned"),
        10
    );
    a.kill();

    // An existence storm on a's keys from another process: existence checks are no uses,
    // so they keep nothing alive.
    let stop = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicU64::new(0));
    let storm = {
        let (url, stop, checks) = (c.unix_url(), stop.clone(), checks.clone());
        std::thread::spawn(move || {
            let h = MaruHandler::new(MaruConfig {
                server_url: url,
                ..MaruConfig::default()
            })
            .unwrap();
            h.connect().unwrap();
            let keys: Vec<Vec<u8>> = (0..stored_a)
                .map(|i| format!("a-{i}").into_bytes())
                .collect();
            let refs: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
            while !stop.load(Ordering::SeqCst) {
                for chunk in refs.chunks(256) {
                    h.batch_exists(chunk).unwrap();
                    checks.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
        })
    };
    assert!(wait_until(T, || checks.load(Ordering::Relaxed) > 0));

    // No region is free: b's stores get room from a's keys (two regions' worth).
    let mut b = connect(&c, "writer-b");
    let stored = num(&b.ok(&format!("store b 0 {}", 2 * PER_REGION), T), "stored");
    assert_eq!(stored, 2 * PER_REGION);
    stop.store(true, Ordering::SeqCst);
    storm.join().unwrap();
    let s = c.server_stats();
    assert!(s.eviction.evictions > 0, "{:?}", s.eviction);
    let writer = s
        .clients
        .iter()
        .find(|x| x.instance_id.contains("writer-a"));
    assert!(
        writer.is_none_or(|w| w.evictions == s.eviction.evictions),
        "only the dead writer's keys went: {:?}",
        s.clients
    );
    assert_eq!(
        r.ok(&format!("verify a {} 10", FULL - 10), T),
        "found=10 missing=0 zeros=0 corrupt=0",
        "pinned keys survive with their bytes"
    );

    // The reader dies: its pins end with its session, and a's last region can go too.
    r.kill();
    assert!(wait_until(T, || c
        .server_stats()
        .namespaces
        .iter()
        .all(|n| n.pins == 0)));
    // Another pool's worth: b takes every region a left (they go with their last key).
    assert_eq!(
        num(&b.ok(&format!("store b-more 0 {FULL}"), T), "stored"),
        FULL
    );
    let b_regions = ids(&b.ok("regions", T));
    let rm: BTreeSet<u64> = c.rm_region_ids().into_iter().collect();
    assert!(
        rm.is_disjoint(&a_regions),
        "every region of the dead writer went back: rm {rm:?}, a {a_regions:?}"
    );
    assert_eq!(
        rm, b_regions,
        "the resource manager holds exactly b's regions"
    );
    let s = server_stats(&mut c.server_admin());
    assert_eq!(s.regions, b_regions.len() as u64);
}

/// Set in the environment of the children that run [`zipf`]'s commands.
const ZIPF_ROLE: &str = "MARU_EVICTION_ZIPF";

/// The Zipf workload's children: writers storing self-checking values (derived from the key,
/// so any reader can check them) of keys drawn with Zipf-skewed popularity, and readers that
/// pin keys, read them, keep them a while under the writers' churn and check them again.
mod zipf {
    use std::collections::VecDeque;
    use std::io::{BufRead, Write};
    use std::time::{Duration, Instant};

    use maru_client::{MaruConfig, MaruHandler, StoreOutcome};
    use maru_faults::payload::{check, payload, Check};

    /// Keys the workload draws from.
    pub const KEYS: usize = 4000;

    /// Zipf (s = 1) over `KEYS` keys by inverse CDF, with a xorshift generator.
    pub struct Zipf {
        cdf: Vec<f64>,
        state: u64,
    }

    impl Zipf {
        pub fn new(seed: u64) -> Zipf {
            let mut cdf = Vec::with_capacity(KEYS);
            let mut sum = 0.0;
            for i in 0..KEYS {
                sum += 1.0 / (i + 1) as f64;
                cdf.push(sum);
            }
            for c in &mut cdf {
                *c /= sum;
            }
            Zipf {
                cdf,
                state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            }
        }

        pub fn next(&mut self) -> usize {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let u = (self.state >> 11) as f64 / (1u64 << 53) as f64;
            self.cdf.partition_point(|c| *c < u).min(KEYS - 1)
        }
    }

    pub fn key(i: usize) -> Vec<u8> {
        format!("z-{i}").into_bytes()
    }

    fn handler(url: &str, chunk: u64) -> Result<MaruHandler, String> {
        let h = MaruHandler::new(MaruConfig {
            server_url: url.to_owned(),
            pool_size: super::REGION,
            chunk_size_bytes: chunk,
            timeout_ms: 20_000,
            ..MaruConfig::default()
        })
        .map_err(|e| format!("config: {e}"))?;
        h.connect().map_err(|e| format!("connect: {e}"))?;
        Ok(h)
    }

    /// `write URL SEED BYTES SECS`: stores until BYTES were newly stored (or SECS passed).
    /// The first store happens before the answer `ready`, so every writer owns a region
    /// before any fills the pool; `go` on stdin starts the rest.
    fn write(w: &[&str], lines: &mut dyn Iterator<Item = String>) -> Result<String, String> {
        let (url, seed, bytes, secs) = (w[1], num(w[2])?, num(w[3])?, num(w[4])?);
        let chunk = super::CHUNK;
        let h = handler(url, chunk)?;
        let mut z = Zipf::new(seed);
        let store = |i: usize| -> Result<bool, String> {
            let k = key(i);
            match h.store_bytes(&k, b"", &payload(&k, chunk as usize)) {
                Ok(StoreOutcome::Deduplicated) => Ok(false),
                Ok(_) => Ok(true),
                Err(e) => Err(format!("kind={:?} msg={e}", e.kind())),
            }
        };
        store(z.next())?;
        say("ready");
        if lines.next().as_deref() != Some("go") {
            return Err("no go".into());
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        let (mut stored, mut dedup, mut ops) = (0u64, 0u64, 0u64);
        while stored * chunk < bytes && Instant::now() < deadline {
            ops += 1;
            match store(z.next()) {
                Ok(true) => stored += 1,
                Ok(false) => dedup += 1,
                Err(e) => return Err(format!("store failed at op {ops}: {e}")),
            }
        }
        h.close();
        Ok(format!("stored={stored} dedup={dedup}"))
    }

    /// `read URL SEED SECS`: pins Zipf keys (up to 16 at once), reads each when pinned and
    /// again before unpinning it a few hundred milliseconds later; any read of a key checks
    /// its value.
    fn read(w: &[&str]) -> Result<String, String> {
        let (url, seed, secs) = (w[1], num(w[2])?, num(w[3])?);
        let h = handler(url, super::CHUNK)?;
        let mut z = Zipf::new(seed);
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut pinned: VecDeque<(Vec<u8>, Instant)> = VecDeque::new();
        let (mut pins, mut reads, mut lost, mut bad) = (0u64, 0u64, 0u64, 0u64);
        let mut verify = |k: &[u8], must: bool, lost: &mut u64| -> Result<(), String> {
            match h.retrieve(k).map_err(|e| format!("retrieve: {e}"))? {
                Some(v) => {
                    reads += 1;
                    if check(k, &v.to_vec()) != Check::Intact {
                        bad += 1;
                    }
                }
                None if must => *lost += 1,
                None => {}
            }
            Ok(())
        };
        while Instant::now() < deadline {
            let k = key(z.next());
            if pinned.len() < 16 && !pinned.iter().any(|(p, _)| *p == k) {
                if h.batch_pin(&[&k[..]]).map_err(|e| format!("pin: {e}"))?[0] {
                    pins += 1;
                    verify(&k, true, &mut lost)?;
                    pinned.push_back((k, Instant::now()));
                }
            } else {
                verify(&k, false, &mut lost)?;
            }
            while pinned
                .front()
                .is_some_and(|(_, at)| at.elapsed() > Duration::from_millis(300))
            {
                let Some((k, _)) = pinned.pop_front() else {
                    break;
                };
                verify(&k, true, &mut lost)?;
                h.unpin(&k).map_err(|e| format!("unpin: {e}"))?;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for (k, _) in pinned.drain(..) {
            verify(&k, true, &mut lost)?;
        }
        h.close();
        Ok(format!(
            "pins={pins} reads={reads} lost={lost} corrupt={bad}"
        ))
    }

    fn num(s: &str) -> Result<u64, String> {
        s.parse().map_err(|_| format!("bad number {s:?}"))
    }

    fn say(line: &str) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "@@ {line}");
        let _ = o.flush();
    }

    /// The child's loop: one command, its answer, exit.
    pub fn run() {
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines().map_while(Result::ok);
        while let Some(line) = lines.next() {
            let w: Vec<&str> = line.split_whitespace().collect();
            let r = match w.first().copied() {
                Some("write") if w.len() == 5 => write(&w, &mut lines),
                Some("read") if w.len() == 4 => read(&w),
                _ => Err(format!("unknown command {line:?}")),
            };
            match r {
                Ok(a) => say(&format!("ok {a}")),
                Err(e) => say(&format!("err {}", e.replace('\n', " "))),
            }
        }
        std::process::exit(0);
    }
}

fn zipf_child(name: &str) -> ChildProc {
    let mut env = std::process::Command::new("env");
    env.arg(format!("{ZIPF_ROLE}=1"));
    ChildProc::spawn_via(name, env)
}

#[test]
fn live_writers_write_ten_pools_and_pinned_keys_stay_intact() {
    const POOL: u64 = 32 * MIB;
    let c = BinaryCluster::start(ClusterOpts {
        pool_bytes: POOL,
        ..ClusterOpts::default()
    });
    let url = c.unix_url();
    let per_writer = 10 * POOL / 3 + 1;
    let mut writers: Vec<ChildProc> = (0..3u64)
        .map(|i| {
            let mut w = zipf_child(&format!("writer-{i}"));
            w.send(&format!("write {url} {} {per_writer} 50", i + 1));
            assert_eq!(w.line(T).as_deref(), Some("ready"), "writer-{i}");
            w
        })
        .collect();
    let mut readers: Vec<ChildProc> = (0..2u64)
        .map(|i| {
            let mut r = zipf_child(&format!("reader-{i}"));
            r.send(&format!("read {url} {} 12", 100 + i));
            r
        })
        .collect();
    for w in &mut writers {
        w.send("go");
    }
    let mut stored = 0;
    for w in &mut writers {
        let a = w.answer("write", Duration::from_secs(90));
        assert!(a.starts_with("ok"), "{}: {a}", w.name);
        stored += num(&a, "stored");
    }
    assert!(
        stored * CHUNK >= 10 * POOL,
        "the writers stored {stored} values, less than ten pools"
    );
    for r in &mut readers {
        let a = r.answer("read", Duration::from_secs(60));
        assert!(a.starts_with("ok"), "{}: {a}", r.name);
        assert!(
            num(&a, "pins") > 0 && num(&a, "reads") > 0,
            "{}: {a}",
            r.name
        );
        assert_eq!(num(&a, "lost"), 0, "{}: a pinned key went: {a}", r.name);
        assert_eq!(
            num(&a, "corrupt"),
            0,
            "{}: a read was not intact: {a}",
            r.name
        );
    }
    let s = c.server_stats();
    assert!(s.eviction.evictions > 0, "{:?}", s.eviction);
    // Some stores found the pool full before the evictor came: their room was made on the
    // spot, in the writer's own regions.
    let room = s.ops.get("make_room").cloned().unwrap_or_default();
    assert!(room.count > 0 && room.errors == 0, "make_room: {room:?}");
    // Everyone left: the regions still at the resource manager are exactly the server's, each
    // kept by keys; deleting every key sends them all back.
    assert!(wait_until(T, || c
        .server_regions()
        .iter()
        .all(|r| !r.owner_connected)));
    let server: BTreeSet<u64> = c
        .server_regions()
        .iter()
        .inspect(|r| assert!(r.ref_count > 0, "{r:?} is kept by nothing"))
        .map(|r| r.handle.region_id)
        .collect();
    assert_eq!(server, c.rm_region_ids().into_iter().collect());
    let h = maru_faults::small_handler(&url);
    h.connect().unwrap();
    let keys: Vec<Vec<u8>> = (0..zipf::KEYS).map(zipf::key).collect();
    for chunk in keys.chunks(256) {
        h.batch_delete(&maru_faults::key_refs(chunk)).unwrap();
    }
    h.close();
    assert!(
        wait_until(T, || c.rm_region_ids().is_empty()),
        "regions left: {:?}",
        c.rm_list()
    );
    assert!(c.server_regions().is_empty());
}

#[test]
fn a_stopped_owner_slows_no_deleter_and_gets_its_pages_back_when_it_runs() {
    const SMALL: u64 = 4 * KIB;
    const N: u64 = 3000;
    let c = BinaryCluster::start(ClusterOpts {
        pool_bytes: 64 * MIB,
        ..ClusterOpts::default()
    });
    let mut owner = ChildProc::spawn("owner");
    owner.ok(
        &format!("connect {} {} {SMALL} 20000", c.unix_url(), 16 * MIB),
        T,
    );
    assert_eq!(num(&owner.ok(&format!("store o 0 {N}"), T), "stored"), N);
    let regions = ids(&owner.ok("regions", T));
    // The owner stops reading anything, its watch connection included.
    // SAFETY: kill(2) on our own child's pid; it changes no memory of ours.
    assert_eq!(unsafe { libc::kill(owner.pid() as i32, libc::SIGSTOP) }, 0);
    let deleter = maru_faults::small_handler(&c.unix_url());
    deleter.connect().unwrap();
    let mut worst = Duration::ZERO;
    for i in 0..N {
        let t = std::time::Instant::now();
        let st = deleter.delete(format!("o-{i}").as_bytes()).unwrap();
        worst = worst.max(t.elapsed());
        assert_eq!(st, maru_client::DeleteStatus::Deleted);
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(owner.pid() as i32, libc::SIGCONT) }, 0);
    assert!(
        worst < Duration::from_secs(2),
        "a delete waited {worst:?} for a stopped owner"
    );
    // Every page came back: N new values fit without a new region.
    assert_eq!(num(&owner.ok(&format!("store p 0 {N}"), T), "stored"), N);
    assert_eq!(ids(&owner.ok("regions", T)), regions, "no region was added");
    deleter.close();
}

/// A live writer that stores `n` keys of `prefix` (in regions of its own) and stays connected.
fn writer(c: &BinaryCluster, prefix: &str, n: u64) -> ChildProc {
    let mut w = connect(c, &format!("writer-{prefix}"));
    assert_eq!(num(&w.ok(&format!("store {prefix} 0 {n}"), T), "stored"), n);
    w
}

/// Every region at the resource manager is owned by one of `owners` (no region leaked, none
/// owned twice).
fn regions_are_exactly_those_of(c: &BinaryCluster, owners: &mut [&mut ChildProc]) {
    let mut owned = BTreeSet::new();
    for o in owners.iter_mut() {
        for id in ids(&o.ok("regions", T)) {
            assert!(owned.insert(id), "region {id} owned twice");
        }
    }
    let rm: BTreeSet<u64> = c.rm_region_ids().into_iter().collect();
    assert_eq!(
        rm, owned,
        "the resource manager holds exactly the owners' regions"
    );
}

/// The `err ...` answer of `once PREFIX I` (a store that must fail), and how long it took.
fn failed_store(h: &mut ChildProc, prefix: &str, i: u64) -> (String, u64) {
    let a = h.call(&format!("once {prefix} {i}"), T);
    assert!(a.starts_with("err kind=Exhausted"), "{}: {a}", h.name);
    let ms = num(&a, "elapsed_ms");
    (a, ms)
}

/// A cluster whose pool is filled by two live writers, `a` and `b`, with half a pool's worth
/// of keys each (`HALF`); both stay connected.
fn pool_of_two_writers() -> (BinaryCluster, ChildProc, ChildProc) {
    let c = full_pool_cluster();
    let a = writer(&c, "a", HALF);
    let b = writer(&c, "b", HALF);
    (c, a, b)
}

const HALF: u64 = FULL / 2;

#[test]
fn a_new_handler_gets_room_in_a_pool_full_of_live_idle_writers_regions() {
    // Two live writers fill the pool with their regions and stay connected, idle; each pins
    // its last ten keys (in its newest region).
    let (c, mut a, mut b) = pool_of_two_writers();
    for (w, p) in [(&mut a, "a"), (&mut b, "b")] {
        assert_eq!(
            num(&w.ok(&format!("pin {p} {} 10", HALF - 10), T), "pinned"),
            10
        );
    }
    let before = ids(&a.ok("regions", T)).len() + ids(&b.ok("regions", T)).len();

    // A new handler in another process stores two regions' worth: every store succeeds.
    let mut n = connect(&c, "newcomer");
    let stored = num(&n.ok(&format!("store n 0 {}", 2 * PER_REGION), T), "stored");
    assert_eq!(stored, 2 * PER_REGION);
    assert_eq!(
        n.ok(&format!("verify n 0 {}", 2 * PER_REGION), T),
        format!("found={} missing=0 zeros=0 corrupt=0", 2 * PER_REGION),
        "the new handler's bytes read back right"
    );
    for (w, p) in [(&mut a, "a"), (&mut b, "b")] {
        assert_eq!(
            w.ok(&format!("verify {p} {} 10", HALF - 10), T),
            "found=10 missing=0 zeros=0 corrupt=0",
            "{p}'s pinned keys stay with their bytes"
        );
    }
    let s = c.server_stats();
    let given = s.ops.get("give_back").cloned().unwrap_or_default();
    assert!(
        given.count >= 2 && given.errors == 0,
        "give_back: {given:?}"
    );
    let after = ids(&a.ok("regions", T)).len() + ids(&b.ok("regions", T)).len();
    assert!(
        after + 2 <= before,
        "the writers gave regions back: {before} -> {after}"
    );
    regions_are_exactly_those_of(&c, &mut [&mut a, &mut b, &mut n]);

    // The writers go on: a store of theirs gets room too (from their own keys or regions).
    assert_eq!(num(&a.ok("store a-more 0 8", T), "stored"), 8);
    regions_are_exactly_those_of(&c, &mut [&mut a, &mut b, &mut n]);
    for w in [&mut a, &mut b, &mut n] {
        w.ok("close", T);
    }
}

#[test]
fn a_pool_whose_live_regions_hold_only_pinned_keys_refuses_a_new_handler_quickly() {
    let (c, mut a, mut b) = pool_of_two_writers();
    // Every key each writer still has is pinned.
    let pinned: Vec<u64> = [(&mut a, "a"), (&mut b, "b")]
        .into_iter()
        .map(|(w, p)| num(&w.ok(&format!("pin {p} 0 {HALF}"), T), "pinned"))
        .collect();
    let mut n = connect(&c, "newcomer");
    let (answer, ms) = failed_store(&mut n, "n", 0);
    assert!(answer.contains("pinned keys"), "{answer}");
    assert!(ms < 1000, "the refusal took {ms} ms");
    for ((w, p), kept) in [(&mut a, "a"), (&mut b, "b")].into_iter().zip(pinned) {
        let v = w.ok(&format!("verify {p} 0 {HALF}"), T);
        assert_eq!(num(&v, "found"), kept, "{p}: nothing pinned is lost: {v}");
        assert_eq!((num(&v, "zeros"), num(&v, "corrupt")), (0, 0), "{p}: {v}");
    }
    regions_are_exactly_those_of(&c, &mut [&mut a, &mut b, &mut n]);
}

#[test]
fn a_stopped_owner_delays_a_new_handler_by_the_deadline_only_and_gives_back_when_it_runs() {
    let (c, mut a, mut b) = pool_of_two_writers();
    num(&b.ok(&format!("pin b 0 {HALF}"), T), "pinned");
    let a_regions = ids(&a.ok("regions", T));
    // SAFETY: kill(2) on our own child's pid; it changes no memory of ours.
    assert_eq!(unsafe { libc::kill(a.pid() as i32, libc::SIGSTOP) }, 0);
    let mut n = connect(&c, "newcomer");
    let (answer, ms) = failed_store(&mut n, "n", 0);
    assert!(answer.contains("did not"), "{answer}");
    assert!(ms < 1000, "a stopped owner held the store {ms} ms");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(a.pid() as i32, libc::SIGCONT) }, 0);
    // Running again, a gives back what it was asked for; the next store has room.
    assert!(wait_until(T, || ids(&a.ok("regions", T)).len() < a_regions.len()));
    n.ok("once n 1", T);
    assert_eq!(
        n.ok("verify n 1 1", T),
        "found=1 missing=0 zeros=0 corrupt=0"
    );
    regions_are_exactly_those_of(&c, &mut [&mut a, &mut b, &mut n]);
}

#[test]
fn an_owner_with_a_handle_out_in_the_region_asked_back_keeps_its_page() {
    let c = full_pool_cluster();
    // a's first page is a handle written with p-0's value and not stored; the rest of its
    // first region and its other regions get keys; only the first region's keys are unpinned.
    let mut a = connect(&c, "writer-a");
    let first = a.ok("alloc_write p-0", T);
    let region: u64 = field(&first, "region").unwrap().parse().unwrap();
    assert_eq!(num(&a.ok(&format!("store a 0 {HALF}"), T), "stored"), HALF);
    a.ok(
        &format!("pin a {} {}", PER_REGION - 1, HALF - (PER_REGION - 1)),
        T,
    );
    let mut b = writer(&c, "b", HALF);
    num(&b.ok(&format!("pin b 0 {HALF}"), T), "pinned");

    // The only region that may be taken is a's first, where a still has a handle out: a
    // does not give it back while it is out, so the new handler gets no page of it.
    let mut n = connect(&c, "newcomer");
    let (answer, _) = failed_store(&mut n, "n", 0);
    assert!(
        answer.contains("did not") && answer.contains(&region.to_string()),
        "{answer}"
    );
    assert!(ids(&a.ok("regions", T)).contains(&region));
    // The handle's bytes are still its own, and its store succeeds.
    assert_eq!(
        a.ok("store_pending", T),
        "stored=1 intact=1 zeros=0 corrupt=0"
    );
    // (Read by the new handler: its view's hold is released in front of its next request.)
    assert_eq!(
        n.ok("verify p 0 1", T),
        "found=1 missing=0 zeros=0 corrupt=0"
    );
    // With nothing of a's out any more, the next request gets the region (p-0 is an unpinned
    // key like any other, and goes with it).
    n.ok("once n 1", T);
    assert!(!ids(&a.ok("regions", T)).contains(&region));
    assert_eq!(
        n.ok("verify n 1 1", T),
        "found=1 missing=0 zeros=0 corrupt=0"
    );
    regions_are_exactly_those_of(&c, &mut [&mut a, &mut b, &mut n]);
}
