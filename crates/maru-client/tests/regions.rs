//! Pages and regions across instances: exhaustion and auto-expansion, another instance's
//! regions mapped read-only, deferred freeing while keys reference a closed owner's region,
//! eager mapping at connect, and a connection of its own for each concurrent reader.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use maru_client::{DeleteStatus, ErrorKind, MaruConfig, MIB};

#[test]
fn exhaustion_and_auto_expand() {
    let c = cluster();
    let chunk = 64 * 1024;
    let fixed = c.handler(MaruConfig {
        pool_size: 4 * chunk,
        chunk_size_bytes: chunk,
        auto_expand: false,
        ..c.config()
    });
    assert!(
        fixed.owned_regions().is_empty(),
        "connect takes no region; the first alloc does"
    );
    let mut pages = vec![fixed.alloc(chunk).unwrap()];
    // The resource manager rounds regions up to its alignment: use the real page count.
    let count = fixed.owned_regions()[0].page_count;
    assert!(count >= 4);
    pages.extend((1..count).map(|_| fixed.alloc(chunk).unwrap()));
    let e = fixed.alloc(1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Exhausted, "{e}");
    fixed.free(pages[2].page()).unwrap();
    assert_eq!(
        fixed.free(pages[2].page()).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(fixed.alloc(1).unwrap().page(), pages[2].page());

    let growing = c.handler(MaruConfig {
        pool_size: 2 * chunk,
        chunk_size_bytes: chunk,
        expand_size: Some(3 * chunk),
        ..c.config()
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    growing.set_on_region_added(Some(Arc::new(move |id, pages| {
        s2.lock().unwrap().push((id, pages))
    })));
    assert!(
        seen.lock().unwrap().is_empty(),
        "no region before the first alloc"
    );
    let mut handles = vec![growing.alloc(chunk).unwrap()];
    assert_eq!(seen.lock().unwrap().len(), 1, "the first region reported");
    let first = growing.owned_regions()[0].page_count;
    handles.extend((1..=first).map(|_| growing.alloc(chunk).unwrap()));
    let regions = growing.owned_regions();
    assert_eq!(regions.len(), 2);
    assert!(regions[1].page_count >= 3);
    assert_eq!(regions[1].allocated_pages, 1);
    assert_eq!(seen.lock().unwrap().len(), 2, "expansion reported");
    assert_eq!(seen.lock().unwrap()[1].0, regions[1].region_id);
    assert_ne!(handles[0].region_id(), handles[first as usize].region_id());
    // A page freed in the first region is found by the scan.
    growing.free(handles[0].page()).unwrap();
    while regions.len() == growing.owned_regions().len() {
        let h = growing.alloc(1).unwrap();
        if h.region_id() == handles[0].region_id() {
            break;
        }
    }
    assert_eq!(
        growing.owned_regions().len(),
        2,
        "no expansion while a page is free"
    );
}

#[test]
fn other_instances_read_only_and_deferred_freeing() {
    let c = cluster();
    let a = c.handler(MaruConfig {
        eager_map: false,
        ..c.config()
    });
    let b = c.handler(MaruConfig {
        eager_map: false,
        ..c.config()
    });
    assert_eq!(c.rm_allocations(), 0, "connecting takes no region");
    for i in 0..8u8 {
        a.store_bytes(format!("key-{i}").as_bytes(), &[], &[i; 1000])
            .unwrap();
    }
    let views: Vec<_> = (0..8u8)
        .map(|i| b.retrieve(format!("key-{i}").as_bytes()).unwrap().unwrap())
        .collect();
    for (i, v) in views.iter().enumerate() {
        assert_eq!(v.to_vec(), vec![i as u8; 1000]);
        assert!(!v.is_writable(), "another instance's region is read-only");
        assert!(v.write_at(0, b"x").is_err());
    }
    // B may not delete-by-freeing A's pages, but it may delete A's keys.
    a.close();
    for (i, v) in views.iter().enumerate() {
        assert_eq!(v.to_vec(), vec![i as u8; 1000], "deferred freeing");
    }
    assert_eq!(
        b.retrieve(b"key-3").unwrap().unwrap().to_vec(),
        vec![3; 1000]
    );
    assert_eq!(
        c.rm_allocations(),
        1,
        "A's region lives while keys reference it"
    );
    let keys: Vec<Vec<u8>> = (0..8).map(|i| format!("key-{i}").into_bytes()).collect();
    let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    assert!(b
        .batch_delete(&refs)
        .unwrap()
        .iter()
        .all(|s| *s == DeleteStatus::Deleted));
    // B's views still hold their pages: the region stays until they are gone.
    assert_eq!(c.rm_allocations(), 1, "held pages keep their region");
    assert_eq!(views[0].to_vec(), vec![0; 1000]);
    drop(views);
    wait_until("A's region to be freed", Duration::from_secs(10), || {
        c.rm_allocations() == 0
    });
}

#[test]
fn eager_map_maps_existing_regions_at_connect() {
    let c = cluster();
    let a = c.handler(c.config());
    a.store_bytes(b"x", b"", b"eager").unwrap();
    let rid = a.owned_regions()[0].region_id;
    let b = c.handler(c.config());
    assert!(
        b.buffer(rid, 0, 16).is_some(),
        "A's region mapped at connect"
    );
    assert_eq!(b.region_page_count(rid), Some(4 * MIB / (64 * 1024)));
    let lazy = c.handler(MaruConfig {
        eager_map: false,
        ..c.config()
    });
    assert!(lazy.buffer(rid, 0, 16).is_none());
    lazy.retrieve(b"x").unwrap().unwrap();
    assert!(
        lazy.buffer(rid, 0, 16).is_some(),
        "mapped at first retrieve"
    );
    assert!(lazy.buffer(rid, 4 * MIB, 1).is_none(), "out of range");
}

#[test]
fn concurrent_readers_use_their_own_connections() {
    let c = cluster();
    // Without pipelining (with it they share one: tests/pipelining.rs).
    let h = Arc::new(c.handler(MaruConfig {
        use_async_rpc: false,
        ..c.config()
    }));
    for i in 0..32u32 {
        h.store_bytes(format!("c-{i}").as_bytes(), b"", &i.to_le_bytes())
            .unwrap();
    }
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let h = h.clone();
            std::thread::spawn(move || {
                for round in 0..200u32 {
                    let i = (round * 7 + t) % 32;
                    let v = h.retrieve(format!("c-{i}").as_bytes()).unwrap().unwrap();
                    assert_eq!(v.to_vec(), i.to_le_bytes());
                    assert!(h.exists(format!("c-{i}").as_bytes()).unwrap());
                }
            })
        })
        .collect();
    // Writers interleave with the readers.
    for i in 32..64u32 {
        h.store_bytes(format!("c-{i}").as_bytes(), b"", &i.to_le_bytes())
            .unwrap();
    }
    for t in threads {
        t.join().unwrap();
    }
    let clients = &h.stats().unwrap().server.clients;
    let me = clients
        .iter()
        .find(|cl| cl.instance_id == h.instance_id())
        .unwrap();
    // One of them is the session's watcher.
    assert!(me.connections > 2, "readers ran on several connections");
}

#[test]
fn a_reader_connects_reads_pins_and_deletes_on_a_full_pool() {
    let c = InProcessCluster::with(
        |dir, rm| rm.pools = vec![maru_testkit::shm_pool(dir, "p0", 4 * MIB)],
        |_, _| {},
    );
    let writer = c.handler(MaruConfig {
        pool_size: 4 * MIB,
        auto_expand: false,
        ..c.config()
    });
    writer.store_bytes(b"a", b"", b"first").unwrap();
    writer.store_bytes(b"b", b"", b"second").unwrap();
    assert_eq!(c.rm_allocations(), 1);
    // The writer's region is the whole pool; a reader needs none to connect.
    let reader = c.handler(c.config());
    assert!(reader.is_connected());
    assert_eq!(reader.retrieve(b"a").unwrap().unwrap().to_vec(), b"first");
    assert!(reader.pin(b"a").unwrap());
    assert_eq!(reader.delete(b"a").unwrap(), DeleteStatus::Pinned);
    assert_eq!(reader.delete(b"b").unwrap(), DeleteStatus::Deleted);
    assert!(reader.unpin(b"a").unwrap());
    // Pinned again, "a" keeps the writer's region: no region can be taken back.
    assert!(reader.pin(b"a").unwrap());
    let e = reader.alloc(1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Exhausted, "{e}");
    assert!(e.to_string().contains("pool exhausted"), "{e}");
    assert!(e.to_string().contains("pinned keys"), "{e}");
    assert!(
        reader.is_connected(),
        "a refused alloc leaves the handler usable"
    );
    assert!(reader.exists(b"a").unwrap());
    // Unpinned, the writer's region is taken back (the writer is idle: its watcher gives it
    // back): its key goes, and the reader gets a page.
    assert!(reader.unpin(b"a").unwrap());
    let page = reader.alloc(1).unwrap();
    assert!(!reader.exists(b"a").unwrap());
    assert!(writer.owned_regions().is_empty());
    assert_eq!(c.rm_allocations(), 1);
    reader.free(page.page()).unwrap();
}
