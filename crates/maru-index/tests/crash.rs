//! A writer killed with SIGKILL mid-churn, then re-attached: every call it acknowledged is in
//! the index as acknowledged, nothing else differs except the one call in flight, and a
//! half-written entry is reported and emptied. Several rounds, each resuming the last.
//!
//! The writer acknowledges each call in a shared-memory log (two stores, no system call), so
//! most of its time is spent inside index calls and the kill lands inside one as often as not.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use maru_index::{CreateOptions, IndexWriter, Inserted, Location};
use maru_shm::{MapMode, Mapping};

const KEYS: u64 = 3000;
const ROUNDS: u64 = 16;
const TEST: &str = "child_process";
/// Acknowledgement records the log holds; the writer stops churning when it is full.
const LOG_RECORDS: u64 = 1 << 19;
const INSERT: u64 = 1;
const UPDATE: u64 = 2;
const REMOVE: u64 = 3;

type Model = HashMap<u64, (Location, u64)>;

/// The log: word 0 = records acknowledged, word 1 = 1 + the key id of the call begun last,
/// then records of four words (kind << 32 | id, region, offset, generation).
struct AckLog(Mapping);

impl AckLog {
    fn open(path: &Path) -> AckLog {
        AckLog(
            Mapping::map(
                path,
                0,
                (LOG_RECORDS * 4 + 2) * 8,
                MapMode::ReadWrite,
                false,
            )
            .unwrap(),
        )
    }
    fn word(&self, i: u64) -> &AtomicU64 {
        assert!(((i + 1) * 8) as usize <= self.0.len());
        // SAFETY: inside the mapping (checked), 8-aligned (page-aligned base), and the mapping
        // lives as long as `&self`; other processes access these words only atomically.
        unsafe { AtomicU64::from_ptr(self.0.as_ptr().add(i as usize * 8) as *mut u64) }
    }
    fn begin(&self, id: u64) {
        self.word(1).store(id + 1, Ordering::Release);
    }
    fn ack(&self, n: u64, kind: u64, id: u64, at: Location, generation: u64) {
        let r = 2 + n * 4;
        self.word(r).store(kind << 32 | id, Ordering::Relaxed);
        self.word(r + 1).store(at.region as u64, Ordering::Relaxed);
        self.word(r + 2).store(at.offset, Ordering::Relaxed);
        self.word(r + 3).store(generation, Ordering::Relaxed);
        self.word(0).store(n + 1, Ordering::Release);
    }
}

#[test]
fn a_killed_writer_loses_nothing_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("pool.index");
    drop(
        IndexWriter::create(
            &index,
            CreateOptions {
                capacity: KEYS,
                key_area_bytes: KEYS * 64,
            },
        )
        .unwrap(),
    );
    let mut model = Model::new();
    let mut max_generation = 0;
    let mut torn_seen = 0;
    for round in 0..ROUNDS {
        let mut vars = vec![
            ("INDEX", index.display().to_string()),
            ("ROUND", round.to_string()),
        ];
        let log_path = dir.path().join(format!("acks.{round}"));
        std::fs::File::create(&log_path)
            .unwrap()
            .set_len((LOG_RECORDS * 4 + 2) * 8)
            .unwrap();
        let log = AckLog::open(&log_path);
        vars.push(("LOG", log_path.display().to_string()));
        let mut c = child(TEST, "writer", &vars).spawn().unwrap();
        // Once it churns, kill it at a moment that differs per round.
        let started = Instant::now();
        while log.word(0).load(Ordering::Acquire) < 1000 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the writer never churned"
            );
            assert!(c.try_wait().unwrap().is_none(), "the writer exited");
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_micros(1000 + round * 2300));
        c.kill().unwrap();
        assert!(!wait_exit(&mut c, Duration::from_secs(10)).success());

        // Apply what was acknowledged; remember the call in flight.
        let acked = log.word(0).load(Ordering::Acquire);
        assert!(acked < LOG_RECORDS, "killed while churning");
        for n in 0..acked {
            let r = 2 + n * 4;
            let (kind_id, region, offset, generation) = (
                log.word(r).load(Ordering::Relaxed),
                log.word(r + 1).load(Ordering::Relaxed),
                log.word(r + 2).load(Ordering::Relaxed),
                log.word(r + 3).load(Ordering::Relaxed),
            );
            let (kind, id) = (kind_id >> 32, kind_id & 0xffff_ffff);
            let at = Location {
                region: region as u32,
                offset,
                len: 4096,
            };
            match kind {
                INSERT | UPDATE => {
                    assert!(
                        generation > max_generation,
                        "generations only grow, across restarts too"
                    );
                    max_generation = generation;
                    model.insert(id, (at, generation));
                }
                REMOVE => {
                    model.remove(&id);
                }
                other => panic!("record {n} has kind {other}"),
            }
        }
        let in_flight = log.word(1).load(Ordering::Acquire).checked_sub(1);

        let (w, report) = IndexWriter::open(&index).unwrap();
        assert!(!report.was_clean, "the killed writer was attached");
        // One call was in flight, so at most one entry is torn. It may name the key in flight,
        // the slot's earlier occupant (an insert cut off before its key words landed) or
        // nothing readable; that no acknowledged key lost its entry is checked key by key below.
        assert!(report.torn.len() <= 1, "torn: {:?}", report.torn);
        assert!(
            report.torn.is_empty() || in_flight.is_some(),
            "a torn entry with no call in flight: {:?}",
            report.torn
        );
        torn_seen += report.torn.len();
        for id in 0..KEYS {
            let got = w.lookup(0, &key(id)).map(|f| (f.location, f.generation));
            if Some(id) == in_flight {
                // Either before or after the call: adopt what is there.
                match got {
                    Some(v) => {
                        max_generation = max_generation.max(v.1);
                        model.insert(id, v);
                    }
                    None => {
                        model.remove(&id);
                    }
                }
                continue;
            }
            assert_eq!(got, model.get(&id).copied(), "round {round}, key {id}");
        }
        assert_eq!(w.len(), model.len() as u64);
        eprintln!(
            "round {round}: {acked} calls, {} keys, in flight {in_flight:?}, {report:?}",
            model.len()
        );
    }
    eprintln!("torn entries seen and repaired: {torn_seen}");
}

#[test]
#[ignore = "a child process of the other tests in this file"]
fn child_process() {
    assert_eq!(var(ROLE), "writer");
    let index = PathBuf::from(var("INDEX"));
    let round: u64 = var("ROUND").parse().unwrap();
    let (mut w, _) = IndexWriter::open(&index).unwrap();
    let log = AckLog::open(Path::new(&var("LOG")));
    let mut rng = Rng(round * 31 + 7);
    for n in 0..LOG_RECORDS {
        let id = rng.below(KEYS);
        let k = key(id);
        let at = Location {
            region: round as u32,
            offset: n * 4096,
            len: 4096,
        };
        log.begin(id);
        match w.lookup(0, &k) {
            None => match w.insert_if_absent(0, &k, at).unwrap() {
                Inserted::New(f) => log.ack(n, INSERT, id, at, f.generation),
                Inserted::Existed(_) => unreachable!("looked up just before"),
            },
            Some(_) if rng.below(2) == 0 => {
                let f = w.update(0, &k, at).unwrap().unwrap();
                log.ack(n, UPDATE, id, at, f.generation);
            }
            Some(_) => {
                w.remove(0, &k).unwrap();
                log.ack(n, REMOVE, id, at, 0);
            }
        }
    }
    // Full: wait to be killed.
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
