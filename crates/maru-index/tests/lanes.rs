//! Hold lanes over real files: a broken lanes file is refused with what is wrong, a new file
//! replaces an old one without capturing its clients, and clients in other threads and other
//! processes holding pages against a server that removes their keys and reuses free pages
//! never see a held page change.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use maru_index::{
    CreateOptions, ErrorKind, IndexReader, IndexWriter, LaneFile, LaneWriter, Location, PageSource,
};
use maru_shm::MapMode;

fn lanes_path(dir: &Path) -> PathBuf {
    dir.join("pool.lanes")
}

#[test]
fn a_truncated_or_garbled_file_is_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let path = lanes_path(dir.path());
    let good = || {
        drop(LaneFile::create(&path, 4, 100).unwrap());
    };
    let open = || LaneWriter::open(&path, 0, 1).err().expect("refused").kind;
    let patch = |at: u64, bytes: &[u8]| {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(bytes, at).unwrap();
    };
    let truncate = |len: u64| {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len).unwrap();
    };

    good();
    assert!(LaneWriter::open(&path, 3, 1).is_ok());
    truncate(100);
    assert!(matches!(open(), ErrorKind::Truncated { found: 100, .. }));
    good();
    truncate(4096);
    assert!(matches!(open(), ErrorKind::Truncated { found: 4096, .. }));
    good();
    patch(0, b"NOTLANES");
    assert!(matches!(open(), ErrorKind::BadMagic { .. }));
    good();
    patch(8, &7u32.to_le_bytes());
    assert!(matches!(
        open(),
        ErrorKind::VersionMismatch {
            found: 7,
            expected: 1
        }
    ));
    good();
    patch(16, &5u32.to_le_bytes());
    assert!(matches!(open(), ErrorKind::HeaderChecksum { .. }));

    // Geometry that disagrees with itself, under a valid checksum.
    let rewrite = |at: usize, bytes: &[u8]| {
        good();
        let mut h = [0u8; 44];
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.read_exact_at(&mut h, 0).unwrap();
        h[at..at + bytes.len()].copy_from_slice(bytes);
        let crc = crc32fast::hash(&h[..40]);
        h[40..].copy_from_slice(&crc.to_le_bytes());
        f.write_all_at(&h, 0).unwrap();
    };
    rewrite(16, &0u32.to_le_bytes());
    assert!(matches!(open(), ErrorKind::Geometry(_)));
    rewrite(20, &u32::MAX.to_le_bytes());
    assert!(matches!(open(), ErrorKind::Geometry(_)));
    rewrite(24, &8u64.to_le_bytes());
    assert!(matches!(open(), ErrorKind::Geometry(_)));
    rewrite(32, &(1u64 << 40).to_le_bytes());
    assert!(matches!(open(), ErrorKind::Geometry(_)));
    // More lanes than the file has room for.
    rewrite(16, &400u32.to_le_bytes());
    assert!(matches!(open(), ErrorKind::Geometry(_)));
}

#[test]
fn a_new_file_leaves_the_clients_of_the_old_one_writing_into_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = lanes_path(dir.path());
    let old = LaneFile::create(&path, 2, 4).unwrap();
    let stale = LaneWriter::open(&path, 0, old.assign(0)).unwrap();
    assert!(stale.claim(0, 1, 1));
    stale.fence();
    assert!(old.is_held(1, 1));
    drop(old); // the server dies
    let new = LaneFile::create(&path, 2, 4).unwrap();
    assert!(!new.is_held(1, 1));
    let tag = new.assign(0);
    assert!(stale.claim(1, 2, 2));
    stale.fence();
    assert!(!new.is_held(2, 2));
    let fresh = LaneWriter::open(&path, 0, tag).unwrap();
    assert!(fresh.claim(0, 3, 3));
    assert!(new.is_held(3, 3));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file is left"
    );
}

/// Keys the server churns, and the pages they take.
const KEYS: u64 = 48;
const PAGES: u64 = 80;
/// Holds a client takes at once (one batch of claims, one fence).
const BATCH: u32 = 4;

/// The server: removes keys and returns their pages to a free list once no lane holds them,
/// deferring the held ones; inserts keys on free pages, writing the page first through
/// `write_page(page, id, stamp)`. Runs until `stop` or `deadline`; returns (ops, deferred).
fn serve(
    w: &mut IndexWriter,
    lanes: &LaneFile,
    deadline: Instant,
    stop: &AtomicBool,
    rng: &mut Rng,
    mut write_page: impl FnMut(u64, u64, u64),
) -> (u64, u64) {
    let mut free: Vec<u64> = (0..PAGES).collect();
    let mut page_of = vec![None; KEYS as usize];
    let mut deferred: Vec<u64> = Vec::new();
    let (mut ops, mut defers, mut stamp) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline && !stop.load(Relaxed) {
        let id = rng.below(KEYS);
        match page_of[id as usize] {
            None => {
                if free.is_empty() {
                    deferred.retain(|&p| {
                        let held = lanes.is_held(0, p as u32);
                        if !held {
                            free.push(p);
                        }
                        held
                    });
                }
                let Some(page) = free.pop() else {
                    continue;
                };
                stamp += 1;
                write_page(page, id, stamp);
                w.insert_if_absent(0, &key(id), page_location(page))
                    .unwrap();
                page_of[id as usize] = Some(page);
            }
            Some(page) => {
                w.remove(0, &key(id)).unwrap();
                page_of[id as usize] = None;
                if lanes.is_held(0, page as u32) {
                    deferred.push(page);
                    defers += 1;
                } else {
                    free.push(page);
                }
            }
        }
        ops += 1;
    }
    (ops, defers)
}

/// A client's rounds: look a batch of keys up, claim their pages, fence, recheck, and for each
/// hold kept check the page twice (around a pause) with `page_is(page, id)`; release. Returns
/// (holds kept, holds given up, wrong pages).
fn hold_pages(
    r: &IndexReader,
    lane: &LaneWriter,
    deadline: Instant,
    rng: &mut Rng,
    mut page_is: impl FnMut(Location, u64) -> bool,
) -> (u64, u64, u64) {
    let keys: Vec<Vec<u8>> = (0..KEYS).map(key).collect();
    let (mut kept, mut given_up, mut wrong) = (0u64, 0u64, 0u64);
    let mut claimed = Vec::new();
    while Instant::now() < deadline {
        claimed.clear();
        for slot in 0..BATCH {
            let id = rng.below(KEYS);
            if let Some(f) = r.lookup(0, &keys[id as usize]) {
                let page = (f.location.offset / PAGE as u64) as u32;
                if lane.claim(slot, 0, page) {
                    claimed.push((slot, id, f, page));
                }
            }
        }
        lane.fence();
        for &(slot, id, f, page) in &claimed {
            if r.is_current(&f) {
                kept += 1;
                if !page_is(f.location, id) {
                    wrong += 1;
                }
                std::thread::yield_now();
                if !page_is(f.location, id) {
                    wrong += 1;
                    eprintln!("key {id}: its held page {page} changed");
                }
            } else {
                given_up += 1;
            }
            lane.release(slot, 0, page);
        }
    }
    (kept, given_up, wrong)
}

fn new_index(dir: &Path) -> (PathBuf, IndexWriter) {
    let path = dir.join("pool.index");
    let w = IndexWriter::create(
        &path,
        CreateOptions {
            capacity: 1000,
            key_area_bytes: 64 << 10,
        },
    )
    .unwrap();
    (path, w)
}

#[test]
fn clients_in_other_threads_never_see_a_held_page_change() {
    const CLIENTS: u32 = 3;
    let dir = tempfile::tempdir().unwrap();
    let (index, mut w) = new_index(dir.path());
    let lanes = LaneFile::create(&lanes_path(dir.path()), CLIENTS, BATCH).unwrap();
    // The pages' bytes: the id of the key the page was last written for.
    let pages: Arc<Vec<AtomicU64>> =
        Arc::new((0..PAGES).map(|_| AtomicU64::new(u64::MAX)).collect());
    let deadline = Instant::now() + Duration::from_millis(1500);
    let stop = AtomicBool::new(false);
    let (served, clients) = std::thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|lane| {
                let (tag, index, path) = (lanes.assign(lane), index.clone(), lanes.path());
                let pages = pages.clone();
                s.spawn(move || {
                    let r = IndexReader::open(&index).unwrap();
                    let l = LaneWriter::open(path, lane, tag).unwrap();
                    let mut rng = Rng(lane as u64 * 7919 + 3);
                    hold_pages(&r, &l, deadline, &mut rng, |at, id| {
                        pages[(at.offset / PAGE as u64) as usize].load(Acquire) == id
                    })
                })
            })
            .collect();
        let served = serve(
            &mut w,
            &lanes,
            deadline,
            &stop,
            &mut Rng(1),
            |page, id, _| pages[page as usize].store(id, Release),
        );
        stop.store(true, Relaxed);
        let clients: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        (served, clients)
    });
    eprintln!("server (ops, deferred) {served:?}; clients (kept, given up, wrong) {clients:?}");
    assert!(served.0 > 1000, "the server churned: {served:?}");
    for c in &clients {
        assert_eq!(c.2, 0, "{clients:?}");
        assert!(c.0 > 100, "holds were kept: {clients:?}");
    }
}

const CLIENT_TEST: &str = "child_client";

#[test]
fn clients_in_other_processes_never_see_a_held_page_change() {
    const CLIENTS: u32 = 2;
    let dir = tempfile::tempdir().unwrap();
    let (index, mut w) = new_index(dir.path());
    let lanes = LaneFile::create(&lanes_path(dir.path()), CLIENTS, BATCH).unwrap();
    let pool_path = dir.path().join("pool");
    create_pool(&pool_path, PAGES as usize);
    let pool = Pool::open(&pool_path, MapMode::ReadWrite);
    let seconds = 2u64;
    let mut children: Vec<_> = (0..CLIENTS)
        .map(|lane| {
            let vars = [
                ("INDEX", index.display().to_string()),
                ("LANES", lanes.path().display().to_string()),
                ("POOL", pool_path.display().to_string()),
                ("SECONDS", seconds.to_string()),
                ("LANE", lane.to_string()),
                ("TAG", lanes.assign(lane).to_string()),
            ];
            child(CLIENT_TEST, "client", &vars).spawn().unwrap()
        })
        .collect();
    let stop = AtomicBool::new(false);
    let served = serve(
        &mut w,
        &lanes,
        Instant::now() + Duration::from_secs(seconds),
        &stop,
        &mut Rng(5),
        |page, id, stamp| pool.write_page(page, &page_contents(id, stamp)),
    );
    let mut lines = Vec::new();
    for c in &mut children {
        let out = BufReader::new(c.stdout.take().unwrap());
        let all: Vec<String> = out.lines().map_while(Result::ok).collect();
        let line = all
            .iter()
            .find_map(|l| l.find("STATS ").map(|at| l[at..].to_string()))
            .unwrap_or_else(|| all.join(" | "));
        assert!(
            wait_exit(c, Duration::from_secs(seconds + 60)).success(),
            "a client failed: {line}"
        );
        lines.push(line);
    }
    eprintln!("server (ops, deferred) {served:?}; clients {lines:#?}");
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    assert!(served.0 > 1000, "the server churned: {served:?}");
    for line in &lines {
        assert_eq!(field(line, "wrong"), 0, "{line}");
        assert!(field(line, "kept") > 100, "{line}");
    }
}

#[test]
#[ignore = "a child process of the other tests in this file"]
fn child_client() {
    let r = IndexReader::open(Path::new(&var("INDEX"))).unwrap();
    let lane = LaneWriter::open(
        Path::new(&var("LANES")),
        var("LANE").parse().unwrap(),
        var("TAG").parse().unwrap(),
    )
    .unwrap();
    let pool = Pool::open(Path::new(&var("POOL")), MapMode::ReadOnly);
    let deadline = Instant::now() + Duration::from_secs(var("SECONDS").parse().unwrap());
    let mut rng = Rng(lane.lane() as u64 * 31 + 7);
    let mut page = vec![0u8; PAGE];
    let (kept, given_up, wrong) = hold_pages(&r, &lane, deadline, &mut rng, |at, id| {
        pool.copy_out(at, &mut page).unwrap();
        page_is_of(&page, id)
    });
    println!("STATS kept={kept} given_up={given_up} wrong={wrong}");
}
