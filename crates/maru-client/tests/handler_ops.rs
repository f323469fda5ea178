//! One handler against an in-process resource manager and metadata server: store (zero
//! copy and copy-in), retrieve, exists, delete, pins and batches past the protocol's batch
//! limit; typed argument errors; views and handles kept past close().

mod common;

use std::time::Duration;

use common::*;
use maru_client::{DeleteStatus, ErrorKind, MaruConfig, MaruHandler, StoreItem, StoreOutcome, MIB};

#[test]
fn store_retrieve_exists_delete_round_trip() {
    let c = cluster();
    let h = c.handler(c.config());
    assert!(h.is_connected());

    // Zero-copy store.
    let handle = h.alloc(11).unwrap();
    handle.write_at(0, b"hello world").unwrap();
    assert_eq!(
        h.store_handle(b"k1", &handle).unwrap(),
        StoreOutcome::Stored
    );
    let v = h.retrieve(b"k1").unwrap().unwrap();
    assert_eq!(v.to_vec(), b"hello world");
    assert!(v.is_writable(), "own pages are mapped read-write");
    assert_eq!(v.region_id(), handle.region_id());
    assert_eq!(v.page_index(), handle.page_index());

    // Copy-in store with a prefix.
    assert_eq!(
        h.store_bytes(b"k2", b"hdr:", b"payload").unwrap(),
        StoreOutcome::Stored
    );
    assert_eq!(h.retrieve(b"k2").unwrap().unwrap().to_vec(), b"hdr:payload");

    // Dedup: the second store of a key frees its page and keeps the first value.
    let before = h.owned_regions()[0].allocated_pages;
    assert_eq!(
        h.store_bytes(b"k2", b"", b"other").unwrap(),
        StoreOutcome::Deduplicated
    );
    assert_eq!(h.owned_regions()[0].allocated_pages, before);
    assert_eq!(h.retrieve(b"k2").unwrap().unwrap().to_vec(), b"hdr:payload");

    assert!(h.exists(b"k1").unwrap());
    assert!(!h.exists(b"nope").unwrap());
    assert!(h.retrieve(b"nope").unwrap().is_none());

    // Delete takes the key away at once; the page comes back once no view holds it.
    assert_eq!(h.delete(b"k1").unwrap(), DeleteStatus::Deleted);
    assert!(!h.exists(b"k1").unwrap());
    assert_eq!(v.to_vec(), b"hello world", "a held page is not reused");
    assert_eq!(h.owned_regions()[0].allocated_pages, before);
    drop(v);
    wait_until("the page to come back", Duration::from_secs(5), || {
        h.owned_regions()[0].allocated_pages == before - 1
    });
    assert_eq!(h.delete(b"k1").unwrap(), DeleteStatus::NotFound);

    // Pins.
    assert!(h.pin(b"k2").unwrap());
    assert!(!h.pin(b"missing").unwrap());
    assert_eq!(h.delete(b"k2").unwrap(), DeleteStatus::Pinned);
    assert!(h.exists(b"k2").unwrap());
    assert!(h.unpin(b"k2").unwrap());
    assert!(!h.unpin(b"k2").unwrap());
    assert_eq!(h.delete(b"k2").unwrap(), DeleteStatus::Deleted);

    assert!(h.healthcheck());
    wait_until("every page to come back", Duration::from_secs(5), || {
        h.owned_regions()[0].allocated_pages == 0
    });
    let stats = h.stats().unwrap();
    assert_eq!(stats.regions.len(), 1);
    assert_eq!(stats.regions[0].allocated_pages, 0);
    assert!(stats.server.regions >= 1);
    h.close();
    assert!(!h.healthcheck());
}

#[test]
fn argument_errors_are_typed() {
    let c = cluster();
    let h = c.handler(c.config());
    let e = h.alloc(64 * 1024 + 1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let e = h.store_bytes(b"k", &[0; 10], &[0; 64 * 1024]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let e = h.exists(&[b'x'; 2000]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let e = h.exists(b"").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");

    // A page must be allocated and not yet stored.
    let a = h.alloc(10).unwrap();
    h.store_handle(b"a", &a).unwrap();
    let e = h.store_handle(b"b", &a).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let bogus = maru_client::PageId {
        region_id: 999_999,
        page_index: 0,
    };
    assert_eq!(
        h.free(bogus).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        h.store_page(b"c", bogus, 1).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    // Not connected, then closed.
    let idle = MaruHandler::new(c.config()).unwrap();
    assert_eq!(idle.exists(b"a").unwrap_err().kind(), ErrorKind::State);
    h.close();
    assert_eq!(h.exists(b"a").unwrap_err().kind(), ErrorKind::State);
    assert_eq!(h.alloc(1).unwrap_err().kind(), ErrorKind::State);
    assert_eq!(h.connect().unwrap_err().kind(), ErrorKind::State);
}

#[test]
fn batches_cross_the_protocol_batch_limit() {
    let c = cluster();
    let h = c.handler(MaruConfig {
        pool_size: 8 * MIB,
        chunk_size_bytes: 4096,
        ..c.config()
    });
    let n = maru_proto::MAX_BATCH + 10;
    let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("b-{i}").into_bytes()).collect();
    let datas: Vec<Vec<u8>> = (0..n).map(|i| (i as u32).to_le_bytes().to_vec()).collect();
    let handle = h.alloc(3).unwrap();
    handle.write_at(0, b"zc!").unwrap();
    let mut items: Vec<(&[u8], StoreItem)> = keys
        .iter()
        .zip(&datas)
        .map(|(k, d)| {
            (
                k.as_slice(),
                StoreItem::Bytes {
                    prefix: b"p",
                    data: d,
                },
            )
        })
        .collect();
    items.push((
        b"zero-copy",
        StoreItem::Page {
            page: handle.page(),
            len: 3,
        },
    ));
    let out = h.batch_store(&items).unwrap();
    assert!(out.iter().all(|o| *o == StoreOutcome::Stored));
    let mut refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    refs.push(b"zero-copy");
    refs.push(b"absent");
    let views = h.batch_retrieve(&refs).unwrap();
    assert_eq!(views.len(), n + 2);
    for (i, v) in views[..n].iter().enumerate() {
        let mut want = b"p".to_vec();
        want.extend((i as u32).to_le_bytes());
        assert_eq!(v.as_ref().unwrap().to_vec(), want);
    }
    assert_eq!(views[n].as_ref().unwrap().to_vec(), b"zc!");
    assert!(views[n + 1].is_none());
    let exists = h.batch_exists(&refs).unwrap();
    assert!(exists[..=n].iter().all(|e| *e) && !exists[n + 1]);
    assert!(h.batch_pin(&refs[..5]).unwrap().iter().all(|p| *p));
    assert!(h.batch_unpin(&refs[..5]).unwrap().iter().all(|p| *p));
    // Dedup in a batch: every entry reports deduplicated and no page stays taken.
    let taken = h
        .owned_regions()
        .iter()
        .map(|r| r.allocated_pages)
        .sum::<u64>();
    let again = h.batch_store(&items[..100]).unwrap();
    assert!(again.iter().all(|o| *o == StoreOutcome::Deduplicated));
    assert_eq!(
        h.owned_regions()
            .iter()
            .map(|r| r.allocated_pages)
            .sum::<u64>(),
        taken
    );
}

#[test]
fn free_of_a_stored_page_takes_the_key_away() {
    let c = cluster();
    let h = c.handler(c.config());
    let a = h.alloc(4).unwrap();
    a.write_at(0, b"evic").unwrap();
    h.store_handle(b"evict-me", &a).unwrap();
    h.pin(b"evict-me").unwrap();
    assert_eq!(
        h.free(a.page()).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    h.unpin(b"evict-me").unwrap();
    h.free(a.page()).unwrap();
    assert!(!h.exists(b"evict-me").unwrap());
}

#[test]
fn views_outlive_close() {
    let c = cluster();
    let h = c.handler(c.config());
    h.store_bytes(b"v", b"", &[7; 4096]).unwrap();
    let v = h.retrieve(b"v").unwrap().unwrap();
    let a = h.alloc(16).unwrap();
    h.close();
    h.close();
    assert!(
        v.to_vec() == vec![7; 4096],
        "view lost its bytes after close"
    );
    a.write_at(0, b"still mapped").unwrap();
    assert!(std::sync::Arc::strong_count(v.mapping()) >= 1);
    // The region may now be freed and carved for another owner: a write through a handle
    // kept past close() must not reach the pool.
    let (pool, at) = pool_view_of(&a);
    let mut seen = [0u8; 12];
    pool.read_at(at, &mut seen).unwrap();
    assert_ne!(
        &seen, b"still mapped",
        "a write after close() reached shared memory"
    );
}

#[test]
fn unix_socket_url() {
    let c = cluster();
    let path = c.server().unix_path().unwrap().to_owned();
    let h = c.handler(MaruConfig {
        server_url: format!("unix://{}", path.display()),
        ..c.config()
    });
    h.store_bytes(b"u", b"", b"over uds").unwrap();
    assert_eq!(h.retrieve(b"u").unwrap().unwrap().to_vec(), b"over uds");
}
