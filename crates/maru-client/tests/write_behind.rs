//! Write-behind stores (`write_behind: true`): the handler's own reads see a key at once,
//! other instances after flush(); dedup, a page already on its way, and failures that
//! surface instead of being lost.

mod common;

use std::time::Duration;

use common::*;
use maru_client::{DeleteStatus, ErrorKind, MaruConfig, MaruHandler, StoreOutcome};

fn write_behind(c: &InProcessCluster) -> MaruConfig {
    MaruConfig {
        write_behind: true,
        ..c.config()
    }
}

#[test]
fn write_behind_stores_are_seen_by_their_handler_at_once_and_by_others_after_flush() {
    let c = cluster();
    let h = c.handler(write_behind(&c));
    let other = c.handler(c.config());
    // More than the 64 in flight, through both store forms.
    for i in 0..200u32 {
        let key = format!("wb-{i}");
        let outcome = if i % 2 == 0 {
            h.store_bytes(key.as_bytes(), b"", &i.to_le_bytes())
                .unwrap()
        } else {
            let a = h.alloc(4).unwrap();
            a.write_at(0, &i.to_le_bytes()).unwrap();
            h.store_handle(key.as_bytes(), &a).unwrap()
        };
        assert_eq!(outcome, StoreOutcome::Sent);
        if i % 50 == 0 {
            // The handler's own reads wait for its registrations.
            assert!(h.exists(key.as_bytes()).unwrap());
            let v = h.retrieve(key.as_bytes()).unwrap().unwrap();
            assert_eq!(v.to_vec(), i.to_le_bytes());
        }
    }
    h.flush().unwrap();
    for i in 0..200u32 {
        let v = other.retrieve(format!("wb-{i}").as_bytes()).unwrap();
        assert_eq!(v.expect("visible after flush").to_vec(), i.to_le_bytes());
    }
    let allocated =
        |h: &MaruHandler| -> u64 { h.owned_regions().iter().map(|r| r.allocated_pages).sum() };
    assert_eq!(allocated(&h), 200);
    // Deleting keys stored behind works like any other delete.
    assert_eq!(h.delete(b"wb-0").unwrap(), DeleteStatus::Deleted);
    // Its page comes back once the reader's (dropped) view has released it.
    wait_until("the page to come back", Duration::from_secs(5), || {
        allocated(&h) == 199
    });
}

#[test]
fn write_behind_dedup_frees_the_page_and_keeps_the_first_value() {
    let c = cluster();
    let h = c.handler(write_behind(&c));
    assert_eq!(
        h.store_bytes(b"dup", b"", b"first").unwrap(),
        StoreOutcome::Sent
    );
    assert_eq!(
        h.store_bytes(b"dup", b"", b"second").unwrap(),
        StoreOutcome::Sent
    );
    h.flush().unwrap();
    assert_eq!(h.owned_regions()[0].allocated_pages, 1);
    assert_eq!(h.retrieve(b"dup").unwrap().unwrap().to_vec(), b"first");
}

#[test]
fn stores_of_existing_keys_behind_a_full_region_take_back_their_pages() {
    let c = cluster();
    // 4 pages and no expansion: the 64 registrations allowed in flight are far more.
    let h = c.handler(MaruConfig {
        pool_size: 4 * 64 * 1024,
        auto_expand: false,
        ..write_behind(&c)
    });
    assert_eq!(
        h.store_bytes(b"kept", b"", b"first").unwrap(),
        StoreOutcome::Sent
    );
    h.flush().unwrap();
    // Each later store takes a page of its own, which only its reply (the key exists) gives
    // back; once none is free, the replies in flight are collected instead of failing.
    for i in 0..40u32 {
        let outcome = h.store_bytes(b"kept", b"", &i.to_le_bytes()).unwrap();
        assert_eq!(outcome, StoreOutcome::Sent, "store {i}");
    }
    h.flush().unwrap();
    assert_eq!(h.retrieve(b"kept").unwrap().unwrap().to_vec(), b"first");
    let allocated: u64 = h.owned_regions().iter().map(|r| r.allocated_pages).sum();
    assert_eq!(allocated, 1, "only the stored key keeps a page");
}

#[test]
fn write_behind_refuses_a_page_that_is_already_on_its_way() {
    let c = cluster();
    let h = c.handler(write_behind(&c));
    let a = h.alloc(4).unwrap();
    assert_eq!(h.store_handle(b"a", &a).unwrap(), StoreOutcome::Sent);
    let again = h.store_handle(b"b", &a).unwrap_err();
    assert_eq!(again.kind(), ErrorKind::InvalidArgument, "{again}");
    h.flush().unwrap();
    assert!(!h.exists(b"b").unwrap());
    // Free takes the key away with the page, as for a synchronous store.
    h.free(a.page()).unwrap();
    assert!(!h.exists(b"a").unwrap());
}

#[test]
fn write_behind_failures_are_reported_never_lost() {
    let mut c = cluster();
    let h = c.handler(write_behind(&c));
    assert_eq!(h.store_bytes(b"ok", b"", b"x").unwrap(), StoreOutcome::Sent);
    h.flush().unwrap();
    // With the server gone, a store either fails at once or its failure comes from flush.
    c.server.take().unwrap().shutdown();
    let stored = h.store_bytes(b"after", b"", b"y");
    let flushed = h.flush();
    assert!(
        stored.is_err() || flushed.is_err(),
        "a store the server never saw reported success: {stored:?} / {flushed:?}"
    );
    if let Err(e) = &flushed {
        assert!(
            matches!(e.kind(), ErrorKind::Transport | ErrorKind::State),
            "{e}"
        );
    }
    h.close();
}
