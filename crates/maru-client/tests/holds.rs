//! Views hold their page, and pages return to their owner (docs/ARCHITECTURE.md §8), against
//! real daemons: a retrieved view keeps showing its value after the key is deleted and the
//! owner stores again; `free` of a stored page waits for its readers; deleted pages are
//! reused by their owner once released, on a pool with room for one region; and under 16
//! threads storing, reading and deleting, no view ever shows another value's bytes — with
//! holds taken by the server, and with holds taken in the session's lane of a server that
//! keeps a key index (§10, *Holds without a round trip*).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use maru_client::{DeleteStatus, ErrorKind, MaruConfig, View, MIB};

const CHUNK: u64 = 64 * 1024;

/// A cluster whose pool holds exactly one 2 MiB region (32 pages of 64 KiB).
fn one_region_cluster() -> InProcessCluster {
    InProcessCluster::with(
        |dir, rm| rm.pools = vec![maru_testkit::shm_pool(dir, "p0", 2 * MIB)],
        |_, _| {},
    )
}

/// As [`one_region_cluster`], with a key index and its hold lanes (`lanes` of them).
fn one_region_indexed(lanes: u32) -> InProcessCluster {
    InProcessCluster::with(
        |dir, rm| rm.pools = vec![maru_testkit::shm_pool(dir, "p0", 2 * MIB)],
        move |dir, s| {
            s.index = Some(maru_server::IndexConfig {
                hold_lanes: lanes,
                ..maru_server::IndexConfig::at(dir.join("keys.index"))
            })
        },
    )
}

fn ops(c: &InProcessCluster, name: &str) -> u64 {
    c.stats().ops.get(name).map_or(0, |o| o.count)
}

fn one_region(c: &InProcessCluster, url: String) -> MaruConfig {
    MaruConfig {
        server_url: url,
        pool_size: 2 * MIB,
        chunk_size_bytes: CHUNK,
        auto_expand: false,
        ..c.config()
    }
}

#[test]
fn a_view_keeps_its_bytes_after_delete_and_reuse() {
    let c = one_region_cluster();
    let h = c.handler(one_region(&c, c.url().to_string()));
    h.store_bytes(b"a", b"", b"AAAA").unwrap();
    let view = h.retrieve(b"a").unwrap().unwrap();
    assert!(view.holds_page() && view.generation() > 0);
    assert_eq!(h.delete(b"a").unwrap(), DeleteStatus::Deleted);
    // Fill every other page; the held one is not among them.
    let pages = h.owned_regions()[0].page_count;
    for i in 1..pages {
        h.store_bytes(format!("b{i}").as_bytes(), b"", b"BBBB")
            .unwrap();
    }
    assert_eq!(view.to_vec(), b"AAAA", "a held page was reused");
    // Pinned, the other keys cannot make room either (unpinned, the oldest would go).
    let keys: Vec<Vec<u8>> = (1..pages).map(|i| format!("b{i}").into_bytes()).collect();
    for chunk in keys.chunks(256) {
        let refs: Vec<&[u8]> = chunk.iter().map(|k| &k[..]).collect();
        assert!(h.batch_pin(&refs).unwrap().iter().all(|p| *p));
    }
    let e = h.store_bytes(b"one-too-many", b"", b"BBBB").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Exhausted, "{e}");
    assert!(e.to_string().contains("pinned or viewed"), "{e}");
    // The view goes; its page comes back to the owner, who stores into it again.
    let (region, offset) = (view.region_id(), view.offset() as u64);
    let generation = view.generation();
    drop(view);
    h.store_bytes(b"c", b"", b"CCCC").unwrap();
    let again = h.retrieve(b"c").unwrap().unwrap();
    assert_eq!((again.region_id(), again.offset() as u64), (region, offset));
    assert_eq!(again.to_vec(), b"CCCC");
    // A reader that kept only the address learns that the page changed hands.
    assert!(!h.page_current(region, offset, generation).unwrap());
    assert!(h.page_current(region, offset, again.generation()).unwrap());
}

#[test]
fn free_of_a_stored_page_waits_for_its_readers() {
    let c = one_region_cluster();
    let owner = c.handler(one_region(&c, c.url().to_string()));
    let reader = c.handler(c.config());
    let handle = owner.alloc(4).unwrap();
    handle.write_at(0, b"MINE").unwrap();
    owner.store_handle(b"k", &handle).unwrap();
    let view = reader.retrieve(b"k").unwrap().unwrap();
    owner.free(handle.page()).unwrap();
    assert!(!owner.exists(b"k").unwrap(), "free took the key away");
    let pages = owner.owned_regions()[0].page_count;
    let others: Vec<_> = (1..pages).map(|_| owner.alloc(4).unwrap()).collect();
    assert!(others.iter().all(|o| o.page() != handle.page()));
    assert_eq!(
        owner.alloc(4).unwrap_err().kind(),
        ErrorKind::Exhausted,
        "the freed page is still held by the reader"
    );
    assert_eq!(view.to_vec(), b"MINE");
    drop(view);
    // The release travels with the reader's next request (or its watcher within 50 ms).
    reader.exists(b"k").unwrap();
    assert_eq!(owner.alloc(4).unwrap().page(), handle.page());
}

#[test]
fn store_delete_store_again_reuses_pages_without_leaking() {
    let c = one_region_cluster();
    let h = c.handler(one_region(&c, c.url().to_string()));
    let reader = c.handler(c.config());
    // Ten times the region's pages, through one region: every page is reused many times.
    for i in 0..320u32 {
        let key = format!("k{i}");
        h.store_bytes(key.as_bytes(), b"", &i.to_le_bytes())
            .unwrap();
        let v = reader.retrieve(key.as_bytes()).unwrap().unwrap();
        assert_eq!(v.to_vec(), i.to_le_bytes());
        drop(v);
        assert_eq!(
            reader.delete(key.as_bytes()).unwrap(),
            DeleteStatus::Deleted
        );
    }
    assert_eq!(h.owned_regions().len(), 1);
    assert_eq!(c.rm_allocations(), 1);
    wait_until("every page back", Duration::from_secs(5), || {
        h.owned_regions()[0].allocated_pages == 0
    });
}

/// Writers store values whose every byte names the value; readers (of single views and of
/// batches) check each view twice, with deletes and reuse of pages happening all the while.
/// Returns the wrong bytes seen.
fn churn(url: String, c: &InProcessCluster) -> (u64, u64) {
    let writer = Arc::new(c.handler(one_region(c, url.clone())));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            Arc::new(c.handler(MaruConfig {
                server_url: url.clone(),
                ..c.config()
            }))
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (wrong, checked) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    const KEYS: u32 = 24;
    let key = |k: u32| format!("churn-{k}").into_bytes();
    let mut threads = Vec::new();
    for t in 0..4u32 {
        let (w, stop) = (writer.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut round = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let k = (round * 4 + t) % KEYS;
                let stamp = (round as u8).wrapping_mul(4).wrapping_add(t as u8) | 1;
                // A full pool is expected here; the value is dropped.
                let _ = w.store_bytes(&key(k), b"", &vec![stamp; CHUNK as usize]);
                round += 1;
            }
        }));
    }
    for t in 0..4u32 {
        let (h, stop) = (readers[t as usize % 2].clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                let _ = h.delete(&key(i % KEYS));
                i += 3;
            }
        }));
    }
    for t in 0..8u32 {
        let (h, stop) = (readers[t as usize % 2].clone(), stop.clone());
        let (wrong, checked) = (wrong.clone(), checked.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = t;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                // Half the readers take single views, half batches of six keys in a row.
                let views: Vec<View> = if t % 2 == 0 {
                    h.retrieve(&key(i % KEYS))
                        .ok()
                        .flatten()
                        .into_iter()
                        .collect()
                } else {
                    let keys: Vec<Vec<u8>> = (i..i + 6).map(|k| key(k % KEYS)).collect();
                    let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
                    match h.batch_retrieve(&refs) {
                        Ok(found) => found.into_iter().flatten().collect(),
                        Err(_) => continue,
                    }
                };
                let firsts: Vec<Vec<u8>> = views.iter().map(|v| v.to_vec()).collect();
                std::thread::yield_now();
                for (view, first) in views.iter().zip(&firsts) {
                    let second = view.to_vec();
                    let stamp = first[0];
                    let bad = first.iter().chain(&second).filter(|b| **b != stamp).count();
                    wrong.fetch_add(bad as u64, Ordering::Relaxed);
                    checked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    (
        wrong.load(Ordering::Relaxed),
        checked.load(Ordering::Relaxed),
    )
}

#[test]
fn sixteen_threads_with_deletes_never_see_wrong_bytes() {
    let c = one_region_cluster();
    let sock = c
        .server()
        .unix_path()
        .expect("the cluster listens on a Unix socket");
    let unix = format!("unix://{}", sock.display());
    for url in [c.url().to_string(), unix] {
        let started = Instant::now();
        let (wrong, checked) = churn(url.clone(), &c);
        assert!(checked > 50, "{url}: only {checked} views checked");
        assert_eq!(wrong, 0, "{url}: {wrong} wrong bytes in {checked} views");
        assert!(started.elapsed() < Duration::from_secs(60));
    }
}

#[test]
fn a_view_held_in_the_lane_keeps_its_page_until_it_goes() {
    let c = one_region_indexed(4);
    let owner = c.handler(one_region(&c, c.url().to_string()));
    let reader = c.handler(c.config());
    // The reader maps the owner's region with its first view (a round trip).
    owner.store_bytes(b"first", b"", b"FFFF").unwrap();
    drop(reader.retrieve(b"first").unwrap().unwrap());
    owner.store_bytes(b"a", b"", b"AAAA").unwrap();
    let lookups = ops(&c, "lookup") + ops(&c, "batch_lookup");
    let hits = || c.stats().namespaces.iter().map(|n| n.hits).sum::<u64>();
    let before = hits();
    let view = reader.retrieve(b"a").unwrap().unwrap();
    let batch = reader.batch_retrieve(&[b"a", b"first"]).unwrap();
    assert_eq!(
        ops(&c, "lookup") + ops(&c, "batch_lookup"),
        lookups,
        "the views came from the index and the lane, without asking"
    );
    // They count as hits, told with the reader's next request (or its watcher's round).
    wait_until("the lane's hits told", Duration::from_secs(5), || {
        hits() >= before + 3
    });
    assert!(view.holds_page() && view.generation() > 0);
    assert!(batch
        .iter()
        .all(|v| v.as_ref().is_some_and(|v| v.holds_page())));
    drop(batch);
    assert_eq!(owner.delete(b"a").unwrap(), DeleteStatus::Deleted);
    assert_eq!(owner.delete(b"first").unwrap(), DeleteStatus::Deleted);
    // The first view's page, held by the server, comes back with the release the reader's
    // watcher sends; the page the lane holds stays out.
    wait_until(
        "the page held by the server back",
        Duration::from_secs(5),
        || owner.owned_regions()[0].allocated_pages == 1,
    );
    // Fill the region with pinned keys: the held page is never among their pages.
    let pages = owner.owned_regions()[0].page_count;
    let mut stored = Vec::new();
    for i in 0..pages {
        let key = format!("b{i}").into_bytes();
        match owner.store_bytes(&key, b"", b"BBBB") {
            Ok(_) => {
                assert!(owner.pin(&key).unwrap());
                stored.push(key);
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Exhausted, "{e}");
                break;
            }
        }
    }
    assert_eq!(
        stored.len() as u64,
        pages - 1,
        "all pages but the viewed one"
    );
    assert_eq!(view.to_vec(), b"AAAA", "a page held in the lane was reused");
    // The view goes: its page comes back within the server's next rounds, and the owner
    // stores into it.
    let (region, offset) = (view.region_id(), view.offset() as u64);
    drop(view);
    wait_until("the viewed page back", Duration::from_secs(5), || {
        owner.store_bytes(b"c", b"", b"CCCC").is_ok()
    });
    let again = reader.retrieve(b"c").unwrap().unwrap();
    assert_eq!((again.region_id(), again.offset() as u64), (region, offset));
    assert_eq!(again.to_vec(), b"CCCC");
}

#[test]
fn views_of_one_key_are_told_as_one_entry_that_counts_every_view() {
    let c = one_region_indexed(4);
    let owner = c.handler(one_region(&c, c.url().to_string()));
    let reader = c.handler(c.config());
    owner.store_bytes(b"a", b"", b"AAAA").unwrap();
    owner.store_bytes(b"b", b"", b"BBBB").unwrap();
    // The first view maps the owner's region (a round trip and the server's own hit).
    drop(reader.retrieve(b"a").unwrap().unwrap());
    let hits = || c.stats().namespaces.iter().map(|n| n.hits).sum::<u64>();
    wait_until("the first hit counted", Duration::from_secs(5), || {
        hits() >= 1
    });
    let (before, frames) = (hits(), ops(&c, "hit"));
    for _ in 0..10_000 {
        drop(reader.retrieve(b"a").unwrap().unwrap());
    }
    drop(reader.batch_retrieve(&[b"b", b"a", b"b"]).unwrap());
    // Every view is a hit, told with the reader's next request or its watcher's round.
    wait_until("the views told", Duration::from_secs(5), || {
        hits() >= before + 10_003
    });
    assert_eq!(hits(), before + 10_003, "each view counted once");
    // One by one, they would take three frames of a full batch.
    let told = ops(&c, "hit") - frames;
    assert!(
        (1..=2).contains(&told),
        "10,003 views of two keys are told in {told} frames: one entry per key and round"
    );
}

#[test]
fn without_lanes_every_view_is_held_by_the_server() {
    let c = one_region_indexed(0);
    let owner = c.handler(one_region(&c, c.url().to_string()));
    let reader = c.handler(c.config());
    owner.store_bytes(b"a", b"", b"AAAA").unwrap();
    drop(reader.retrieve(b"a").unwrap().unwrap());
    let lookups = ops(&c, "lookup");
    let view = reader.retrieve(b"a").unwrap().unwrap();
    assert_eq!(ops(&c, "lookup"), lookups + 1);
    assert!(view.holds_page());
}

#[test]
fn sixteen_threads_with_deletes_never_see_wrong_bytes_through_the_lanes() {
    let c = one_region_indexed(8);
    let url = c.url().to_string();
    let (wrong, checked) = churn(url.clone(), &c);
    assert!(checked > 50, "only {checked} views checked");
    assert_eq!(wrong, 0, "{wrong} wrong bytes in {checked} views");
    // Views held in a lane are told to the server as hits afterwards.
    assert!(ops(&c, "hit") > 0, "no view came through a lane");
}
