//! Torn reads across processes: a writer process churns keys (insert, remove, update, with
//! each freed page reused at once for other bytes) while reader processes look keys up and
//! copy their pages out. Every answer is checked; the count of wrong ones must be zero.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use maru_index::{CreateOptions, IndexReader, IndexWriter, Inserted, ReadOutcome};
use maru_shm::MapMode;

/// Keys that never change (ids below this): they must be found, always, at their page.
const STABLE: u64 = 200;
/// Keys the writer churns (ids STABLE..STABLE + CHURN).
const CHURN: u64 = 400;
/// Pages: one per stable key, then a pool the churn takes from and gives back to.
const PAGES: u64 = STABLE + CHURN + 64;
const READERS: usize = 2;
const TEST: &str = "child_process";

#[test]
fn readers_in_other_processes_never_see_a_wrong_answer() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("pool.index");
    let pool_path = dir.path().join("pool");
    create_pool(&pool_path, PAGES as usize);
    {
        let pool = Pool::open(&pool_path, MapMode::ReadWrite);
        let mut w = IndexWriter::create(
            &index,
            CreateOptions {
                capacity: 1000,
                key_area_bytes: 64 << 10,
            },
        )
        .unwrap();
        for id in 0..STABLE {
            pool.write_page(id, &page_contents(id, 0));
            w.insert_if_absent(0, &key(id), page_location(id)).unwrap();
        }
    }
    let seconds = std::env::var("MARU_INDEX_STRESS_SECONDS").unwrap_or_else(|_| "2".into());
    let vars = [
        ("INDEX", index.display().to_string()),
        ("POOL", pool_path.display().to_string()),
        ("SECONDS", seconds.clone()),
    ];
    let mut children: Vec<_> = std::iter::once("writer")
        .chain(std::iter::repeat_n("reader", READERS))
        .enumerate()
        .map(|(i, role)| {
            let mut vars = vars.to_vec();
            vars.push(("SEED", (i as u64 * 7919 + 1).to_string()));
            child(TEST, role, &vars).spawn().unwrap()
        })
        .collect();
    let limit = Duration::from_secs(seconds.parse::<u64>().unwrap() + 60);
    let mut stats = Vec::new();
    for c in &mut children {
        let out = BufReader::new(c.stdout.take().unwrap());
        // The child's line follows libtest's "test child_process ... " on the same line.
        let lines: Vec<String> = out.lines().map_while(Result::ok).collect();
        let line = lines
            .iter()
            .find_map(|l| l.find("STATS ").map(|at| l[at..].to_string()))
            .unwrap_or_else(|| lines.join(" | "));
        assert!(wait_exit(c, limit).success(), "a child failed: {line}");
        stats.push(line);
    }
    eprintln!("{stats:#?}");
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    assert!(
        field(&stats[0], "ops") > 1000,
        "the writer churned: {}",
        stats[0]
    );
    for line in &stats[1..] {
        assert_eq!(field(line, "wrong"), 0, "{line}");
        assert!(field(line, "copied") > 1000, "{line}");
        assert!(
            field(line, "churn_copied") > 0,
            "churning keys were read: {line}"
        );
    }
}

#[test]
#[ignore = "a child process of the other tests in this file"]
fn child_process() {
    let index = PathBuf::from(var("INDEX"));
    let pool = PathBuf::from(var("POOL"));
    let deadline = Instant::now() + Duration::from_secs(var("SECONDS").parse().unwrap());
    let mut rng = Rng(var("SEED").parse().unwrap());
    match var(ROLE).as_str() {
        "writer" => writer(&index, &pool, deadline, &mut rng),
        "reader" => reader(&index, &pool, deadline, &mut rng),
        other => panic!("unknown role {other}"),
    }
}

fn writer(index: &std::path::Path, pool: &std::path::Path, deadline: Instant, rng: &mut Rng) {
    let pool = Pool::open(pool, MapMode::ReadWrite);
    let (mut w, report) = IndexWriter::open(index).unwrap();
    assert_eq!(report.keys, STABLE);
    // Free pages, reused last-freed first so a page is rewritten right after its key goes.
    let mut free: Vec<u64> = (STABLE..PAGES).collect();
    let mut page_of = vec![None; CHURN as usize];
    let (mut ops, mut stamp) = (0u64, 0u64);
    while Instant::now() < deadline {
        for _ in 0..256 {
            let c = rng.below(CHURN);
            let id = STABLE + c;
            stamp += 1;
            match page_of[c as usize] {
                None => {
                    let page = free.pop().unwrap();
                    pool.write_page(page, &page_contents(id, stamp));
                    let r = w
                        .insert_if_absent(0, &key(id), page_location(page))
                        .unwrap();
                    assert!(matches!(r, Inserted::New(_)));
                    page_of[c as usize] = Some(page);
                }
                Some(old) if rng.below(3) == 0 => {
                    let page = free.pop().unwrap();
                    pool.write_page(page, &page_contents(id, stamp));
                    w.update(0, &key(id), page_location(page)).unwrap().unwrap();
                    free.push(old);
                    page_of[c as usize] = Some(page);
                }
                Some(old) => {
                    w.remove(0, &key(id)).unwrap();
                    free.push(old);
                    page_of[c as usize] = None;
                }
            }
            ops += 1;
        }
    }
    println!("STATS ops={ops} keys={}", w.len());
}

fn reader(index: &std::path::Path, pool: &std::path::Path, deadline: Instant, rng: &mut Rng) {
    let pool = Pool::open(pool, MapMode::ReadOnly);
    let r = IndexReader::open(index).unwrap();
    let mut dst = vec![0u8; PAGE];
    let (mut reads, mut copied, mut churn_copied, mut misses, mut wrong) = (0u64, 0, 0, 0, 0);
    let keys: Vec<Vec<u8>> = (0..STABLE + CHURN).map(key).collect();
    let mut ids = Vec::new();
    let mut batch = Vec::new();
    let mut answers = Vec::new();
    while Instant::now() < deadline {
        for _ in 0..256 {
            let id = rng.below(STABLE + CHURN);
            reads += 1;
            match r.read_into(0, &keys[id as usize], &pool, &mut dst).unwrap() {
                ReadOutcome::Copied(f) => {
                    copied += 1;
                    if !page_is_of(&dst, id) {
                        wrong += 1;
                        eprintln!("key {id}: copied bytes are not its page ({f:?})");
                    }
                    if id < STABLE && f.location != page_location(id) {
                        wrong += 1;
                        eprintln!("stable key {id} found at {f:?}");
                    }
                    churn_copied += (id >= STABLE) as u64;
                }
                ReadOutcome::Miss if id < STABLE => {
                    wrong += 1;
                    eprintln!("stable key {id} missed");
                }
                ReadOutcome::Miss => misses += 1,
            }
        }
        // A batch of stable keys, looked up while their neighbours churn.
        ids.clear();
        ids.extend((0..64).map(|_| rng.below(STABLE)));
        batch.clear();
        batch.extend(ids.iter().map(|&id| keys[id as usize].as_slice()));
        r.batch_lookup(0, &batch, &mut answers);
        for (&id, a) in ids.iter().zip(&answers) {
            if a.map(|f| f.location) != Some(page_location(id)) {
                wrong += 1;
                eprintln!("batch: stable key {id} answered {a:?}");
            }
        }
    }
    println!(
        "STATS reads={reads} copied={copied} churn_copied={churn_copied} misses={misses} wrong={wrong}"
    );
}
