//! Reads from the server's key index in shared memory: existence checks, prefix counts and
//! copy-out reads without a round trip, per namespace; a full index refusing a registration
//! with a typed error; a restarted server re-attaching the index with every acknowledged key;
//! reader processes checking a churning writer's keys with zero wrong answers.

mod common;

use std::time::{Duration, Instant};

use common::*;
use maru_client::{DeleteStatus, ErrorKind, MaruConfig, MaruHandler, StoreOutcome};
use maru_proto::ErrorCode;
use maru_server::IndexConfig;
use maru_testkit::InProcessCluster;

const CHUNK: usize = 4096;

/// A cluster whose server writes through to an index of `capacity` keys in its temp dir.
fn indexed(capacity: u64) -> InProcessCluster {
    InProcessCluster::with(
        |dir, rm| rm.pools = vec![maru_testkit::shm_pool(dir, "p0", 64 * MIB)],
        |dir, s| {
            s.index = Some(IndexConfig {
                capacity,
                key_area_bytes: capacity * 64,
                ..IndexConfig::at(dir.join("keys.index"))
            })
        },
    )
}

const MIB: u64 = 1 << 20;

fn small_pages(c: &InProcessCluster) -> MaruConfig {
    MaruConfig {
        chunk_size_bytes: CHUNK as u64,
        ..c.config()
    }
}

/// A value that names its key and version in every 16 bytes, so a torn or foreign copy is
/// recognisable.
fn value(key: &[u8], version: u64) -> Vec<u8> {
    let mut tag = [0u8; 16];
    let h = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    tag[..8].copy_from_slice(&h.to_le_bytes());
    tag[8..].copy_from_slice(&version.to_le_bytes());
    tag.iter().copied().cycle().take(CHUNK).collect()
}

/// Whether `bytes` is `value(key, v)` for some v.
fn is_value_of(key: &[u8], bytes: &[u8]) -> bool {
    bytes.len() == CHUNK && {
        let v = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        bytes == value(key, v).as_slice()
    }
}

fn ops(c: &InProcessCluster, name: &str) -> u64 {
    c.stats().ops.get(name).map_or(0, |o| o.count)
}

#[test]
fn exists_prefix_and_retrieve_into_come_from_the_index_without_a_round_trip() {
    let c = indexed(10_000);
    let w = c.handler(small_pages(&c));
    let r = c.handler(small_pages(&c));
    assert!(r.reads_index(), "same host: the index is mapped");
    let keys: Vec<Vec<u8>> = (0..8).map(|i| format!("chunk-{i}").into_bytes()).collect();
    for k in &keys[..5] {
        assert_eq!(
            w.store_bytes(k, b"", &value(k, 1)).unwrap(),
            StoreOutcome::Stored
        );
    }
    let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    // Map the writer's region in the reader once (a retrieve), so copies need no RPC.
    drop(r.retrieve(&keys[0]).unwrap().unwrap());
    let before = (
        ops(&c, "exists"),
        ops(&c, "batch_exists"),
        ops(&c, "lookup"),
        ops(&c, "batch_lookup"),
    );
    assert!(r.exists(&keys[0]).unwrap());
    assert!(!r.exists(&keys[7]).unwrap(), "negative control");
    assert_eq!(
        r.batch_exists(&refs).unwrap(),
        [true, true, true, true, true, false, false, false]
    );
    assert_eq!(r.prefix_len(&refs).unwrap(), 5);
    let mut buf = vec![0u8; CHUNK];
    for k in &keys[..5] {
        assert_eq!(r.retrieve_into(k, &mut buf).unwrap(), Some(CHUNK));
        assert!(is_value_of(k, &buf));
        assert!(!is_value_of(&keys[7], &buf), "negative control");
    }
    assert_eq!(r.retrieve_into(&keys[6], &mut buf).unwrap(), None);
    let mut bufs: Vec<Vec<u8>> = vec![vec![0u8; CHUNK]; 8];
    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    let got = r.batch_retrieve_into(&refs, &mut slices).unwrap();
    assert_eq!(got[..5], [Some(CHUNK); 5]);
    assert_eq!(got[5..], [None; 3]);
    for (k, b) in keys.iter().zip(&bufs).take(5) {
        assert!(is_value_of(k, b));
    }
    let after = (
        ops(&c, "exists"),
        ops(&c, "batch_exists"),
        ops(&c, "lookup"),
        ops(&c, "batch_lookup"),
    );
    assert_eq!(before, after, "none of these reads reached the server");

    // A buffer too small is the caller's error; a deleted key is gone from the index.
    let e = r.retrieve_into(&keys[0], &mut [0u8; 10]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_eq!(w.delete(&keys[0]).unwrap(), DeleteStatus::Deleted);
    assert!(!r.exists(&keys[0]).unwrap());
    assert_eq!(r.retrieve_into(&keys[0], &mut buf).unwrap(), None);
    assert_eq!(r.prefix_len(&refs).unwrap(), 0);

    // Another namespace sees none of these keys, in the index as on the server.
    let other = c.handler(MaruConfig {
        namespace: "tenant-b".into(),
        ..small_pages(&c)
    });
    assert!(other.reads_index());
    assert!(!other.exists(&keys[1]).unwrap());
    assert_eq!(other.retrieve_into(&keys[1], &mut buf).unwrap(), None);
    other.store_bytes(&keys[1], b"", &value(b"b", 9)).unwrap();
    assert!(other.exists(&keys[1]).unwrap());
    assert_eq!(r.retrieve_into(&keys[1], &mut buf).unwrap(), Some(CHUNK));
    assert!(
        is_value_of(&keys[1], &buf),
        "each namespace keeps its own value"
    );
}

#[test]
fn a_first_copy_from_an_unmapped_region_takes_the_rpc_path_once() {
    let c = indexed(1000);
    let w = c.handler(small_pages(&c));
    let r = c.handler(small_pages(&c));
    w.store_bytes(b"k", b"", &value(b"k", 3)).unwrap();
    let lookups = ops(&c, "lookup");
    let mut buf = vec![0u8; CHUNK];
    assert_eq!(r.retrieve_into(b"k", &mut buf).unwrap(), Some(CHUNK));
    assert!(is_value_of(b"k", &buf));
    assert_eq!(ops(&c, "lookup"), lookups + 1, "one lookup maps the region");
    assert_eq!(r.retrieve_into(b"k", &mut buf).unwrap(), Some(CHUNK));
    assert_eq!(ops(&c, "lookup"), lookups + 1, "then none");
}

#[test]
fn a_full_index_refuses_the_registration_with_a_typed_error() {
    let c = indexed(16);
    let w = c.handler(small_pages(&c));
    let mut stored = Vec::new();
    let refused = loop {
        let k = format!("key-{}", stored.len()).into_bytes();
        match w.store_bytes(&k, b"", &value(&k, 1)) {
            Ok(StoreOutcome::Stored) => stored.push(k),
            Ok(o) => panic!("unexpected {o:?}"),
            Err(e) => break (k, e),
        }
        assert!(stored.len() < 64, "the index never filled");
    };
    let (k, e) = refused;
    assert_eq!(e.kind(), ErrorKind::Remote(ErrorCode::IndexFull), "{e}");
    assert!(e.to_string().contains("index"), "{e}");
    assert!(!w.exists(&k).unwrap(), "the refused key is not stored");
    assert_eq!(c.stats().keys, stored.len() as u64);
    // Room again after a delete.
    assert_eq!(w.delete(&stored[0]).unwrap(), DeleteStatus::Deleted);
    assert_eq!(
        w.store_bytes(&k, b"", &value(&k, 1)).unwrap(),
        StoreOutcome::Stored
    );
    assert!(w.exists(&k).unwrap());
}

#[test]
fn a_restarted_server_reattaches_the_index_with_every_acknowledged_key() {
    let mut c = indexed(10_000);
    let keys: Vec<Vec<u8>> = (0..300).map(|i| format!("kept-{i}").into_bytes()).collect();
    {
        let w = c.handler(small_pages(&c));
        let other = c.handler(MaruConfig {
            namespace: "tenant-b".into(),
            ..small_pages(&c)
        });
        for k in &keys {
            w.store_bytes(k, b"", &value(k, 7)).unwrap();
        }
        other.store_bytes(b"kept-0", b"", &value(b"b", 1)).unwrap();
        // A deleted key stays deleted.
        assert_eq!(w.delete(&keys[299]).unwrap(), DeleteStatus::Deleted);
        c.server.take().unwrap().shutdown();
        assert!(
            !c.rm_region_ids().is_empty(),
            "the regions the index names stay allocated"
        );
        drop((w, other));
    }
    let restarted = maru_server::start(maru_server::ServerConfig {
        tcp: Some("127.0.0.1:0".parse().unwrap()),
        rm_url: c.rm().url(),
        index: Some(IndexConfig::at(c.dir.path().join("keys.index"))),
        ..maru_server::ServerConfig::default()
    })
    .expect("the server re-attaches its index");
    c.server = Some(restarted);
    assert_eq!(c.stats().keys, 300, "299 kept keys and one of tenant-b");
    let r = c.handler(small_pages(&c));
    let mut buf = vec![0u8; CHUNK];
    for k in &keys[..299] {
        assert_eq!(r.retrieve_into(k, &mut buf).unwrap(), Some(CHUNK), "{k:?}");
        assert!(is_value_of(k, &buf));
        assert!(r.retrieve(k).unwrap().is_some());
    }
    assert!(!r.exists(&keys[299]).unwrap());
    let b = c.handler(MaruConfig {
        namespace: "tenant-b".into(),
        ..small_pages(&c)
    });
    assert_eq!(b.retrieve_into(b"kept-0", &mut buf).unwrap(), Some(CHUNK));
    assert!(is_value_of(b"b", &buf));
    // The restored keys count in their regions: deleting them all gives the regions back.
    let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    r.batch_delete(&refs).unwrap();
    b.delete(b"kept-0").unwrap();
    wait_until(
        "the restored regions to go back",
        Duration::from_secs(10),
        || c.rm_region_ids().is_empty(),
    );
}

/// The environment variable that makes a rerun of this binary a reader process.
const READER_ENV: &str = "MARU_INDEX_READER_URL";

#[test]
fn reader_processes_get_zero_wrong_answers_from_a_churning_writer() {
    let c = indexed(100_000);
    let w = c.handler(MaruConfig {
        pool_size: 2 * MIB,
        ..small_pages(&c)
    });
    // Keys that never go (always present) and keys that are never stored (never present).
    for i in 0..16 {
        let k = format!("stable-{i}").into_bytes();
        w.store_bytes(&k, b"", &value(&k, 0)).unwrap();
    }
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let mut cmd = maru_testkit::process::rerun_test("reader_process");
            cmd.env(READER_ENV, c.url().to_string())
                .stdout(std::process::Stdio::piped());
            maru_testkit::process::die_with_parent(&mut cmd);
            cmd.spawn().expect("reader starts")
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(3);
    let mut version = 1u64;
    while Instant::now() < until {
        for i in 0..32u64 {
            let k = format!("churn-{i}").into_bytes();
            let _ = w.delete(&k);
            w.store_bytes(&k, b"", &value(&k, version)).unwrap();
        }
        version += 1;
    }
    for r in readers {
        let out = r.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "a reader failed: {text}");
        let line = text
            .lines()
            .find_map(|l| l.find("reads=").map(|at| &l[at..]))
            .unwrap_or_else(|| panic!("no report: {text}"));
        let reads: u64 = line["reads=".len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(reads > 100, "{line}");
        assert!(line.contains("wrong=0"), "{line}");
    }
    assert!(version > 2, "the writer churned");
}

#[test]
fn reads_through_the_index_reach_the_server_later_as_uses() {
    let c = indexed(10_000);
    let w = c.handler(small_pages(&c));
    let r = c.handler(small_pages(&c));
    let keys: Vec<Vec<u8>> = (0..4).map(|i| format!("used-{i}").into_bytes()).collect();
    for k in &keys {
        w.store_bytes(k, b"", &value(k, 1)).unwrap();
    }
    // Map the writer's region in the reader (a retrieve), so the copies below need no RPC.
    drop(r.retrieve(&keys[0]).unwrap().unwrap());
    let touched = || ops(&c, "touch");
    wait_until(
        "the retrieve's own traffic to settle",
        Duration::from_secs(5),
        || touched() == 0,
    );
    let mut bufs: Vec<Vec<u8>> = vec![vec![0u8; CHUNK]; 3];
    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    let refs: Vec<&[u8]> = keys[..3].iter().map(|k| k.as_slice()).collect();
    assert_eq!(
        r.batch_retrieve_into(&refs, &mut slices).unwrap(),
        [Some(CHUNK); 3]
    );
    // Told with the reader's next request, or by its watcher within a round (50 ms).
    wait_until("the reads to be told", Duration::from_secs(5), || {
        touched() >= 1
    });
    // An existence check is no use: nothing more is told for it, neither in front of the
    // reader's next request (a pin, answered after anything sent before it) nor later.
    assert!(r.exists(&keys[3]).unwrap());
    assert!(r.pin(&keys[3]).unwrap());
    assert_eq!(touched(), 1, "only the copies were told");
}

/// A reader process (see above): exists, batch_exists, retrieve_into and batch_retrieve_into
/// for 3 s, checking every answer it can; prints `reads=N copies=M wrong=W`.
#[test]
fn reader_process() {
    let Ok(url) = std::env::var(READER_ENV) else {
        return;
    };
    let h = MaruHandler::new(MaruConfig {
        server_url: url,
        chunk_size_bytes: CHUNK as u64,
        timeout_ms: 5000,
        ..MaruConfig::default()
    })
    .unwrap();
    h.connect().unwrap();
    assert!(h.reads_index());
    let stable: Vec<Vec<u8>> = (0..16)
        .map(|i| format!("stable-{i}").into_bytes())
        .collect();
    let never: Vec<Vec<u8>> = (0..16).map(|i| format!("never-{i}").into_bytes()).collect();
    let churn: Vec<Vec<u8>> = (0..32).map(|i| format!("churn-{i}").into_bytes()).collect();
    let all: Vec<&[u8]> = stable.iter().chain(&never).map(|k| k.as_slice()).collect();
    let (mut reads, mut copies, mut wrong) = (0u64, 0u64, 0u64);
    let mut buf = vec![0u8; CHUNK];
    // The batch copies all keys' pages before it rechecks any generation: a page reused in
    // between must still be caught.
    let batch: Vec<&[u8]> = churn
        .iter()
        .chain(&stable[..4])
        .chain(&never[..2])
        .map(|k| k.as_slice())
        .collect();
    let mut bufs = vec![vec![0u8; CHUNK]; batch.len()];
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let found = h.batch_exists(&all).unwrap();
        wrong += found[..16].iter().filter(|b| !**b).count() as u64;
        wrong += found[16..].iter().filter(|b| **b).count() as u64;
        wrong +=
            u64::from(!h.exists(&stable[0]).unwrap()) + u64::from(h.exists(&never[0]).unwrap());
        for k in churn.iter().chain(&stable[..2]) {
            if let Some(n) = h.retrieve_into(k, &mut buf).unwrap() {
                copies += 1;
                if n != CHUNK || !is_value_of(k, &buf) {
                    wrong += 1;
                }
            }
        }
        let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        let got = h.batch_retrieve_into(&batch, &mut slices).unwrap();
        for ((k, n), b) in batch.iter().zip(&got).zip(&bufs) {
            if let Some(n) = n {
                copies += 1;
                if *n != CHUNK || !is_value_of(k, b) {
                    wrong += 1;
                }
            }
        }
        let (stable_got, never_got) = (&got[churn.len()..churn.len() + 4], &got[churn.len() + 4..]);
        wrong += stable_got.iter().filter(|n| n.is_none()).count() as u64;
        wrong += never_got.iter().filter(|n| n.is_some()).count() as u64;
        reads += all.len() as u64 + 2 + churn.len() as u64 + 2 + batch.len() as u64;
    }
    println!("reads={reads} copies={copies} wrong={wrong}");
}
