//! Stores whose copy is long tell the server, as the copy begins, when their registration
//! comes (`Ahead`, once per call), so the thread that serves their connection is awake for it;
//! write-behind stores too, on the connection their registrations take. Short copies
//! and stores without pipelining tell nothing. The bytes stored are the bytes given, whether
//! the call copied one piece or several.

mod common;

use common::*;
use maru_client::{MaruConfig, MaruHandler, StoreItem, MIB};

fn aheads(c: &InProcessCluster) -> u64 {
    c.stats().ops.get("ahead").map_or(0, |o| o.count)
}

fn big_pages(c: &InProcessCluster, f: impl FnOnce(&mut MaruConfig)) -> MaruHandler {
    let mut cfg = MaruConfig {
        pool_size: 16 * MIB,
        chunk_size_bytes: MIB,
        ..c.config()
    };
    f(&mut cfg);
    c.handler(cfg)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn stored(h: &MaruHandler, key: &[u8]) -> Vec<u8> {
    h.retrieve(key).unwrap().expect("stored").to_vec()
}

#[test]
fn a_long_copy_tells_the_server_once_that_its_registration_is_coming() {
    let c = cluster();
    let h = big_pages(&c, |_| {});
    let mb = MIB as usize;
    h.store_bytes(b"short", b"", &pattern(64 * 1024, 1))
        .unwrap();
    assert_eq!(
        aheads(&c),
        0,
        "a short copy ends within the server's window"
    );

    let whole = pattern(mb, 2);
    h.store_bytes(b"long", b"", &whole).unwrap();
    assert_eq!(aheads(&c), 1);
    assert_eq!(stored(&h, b"long"), whole);

    // A prefix and the data: one call, one `Ahead`, both parts where they belong.
    let (prefix, data) = whole.split_at(600 * 1024);
    h.store_bytes(b"prefixed", prefix, data).unwrap();
    assert_eq!(aheads(&c), 2);
    assert_eq!(stored(&h, b"prefixed"), whole);

    // A batch counts all its copies: four quarters of a MiB are one long copy.
    let parts: Vec<Vec<u8>> = (0..4).map(|i| pattern(mb / 4, 10 + i)).collect();
    let keys: Vec<Vec<u8>> = (0..4).map(|i| format!("part-{i}").into_bytes()).collect();
    let items: Vec<(&[u8], StoreItem)> = keys
        .iter()
        .zip(&parts)
        .map(|(k, p)| {
            let item = StoreItem::Bytes {
                prefix: b"",
                data: p,
            };
            (k.as_slice(), item)
        })
        .collect();
    h.batch_store(&items).unwrap();
    assert_eq!(aheads(&c), 3, "one for the whole batch");
    for (k, p) in keys.iter().zip(&parts) {
        assert_eq!(&stored(&h, k), p);
    }
}

#[test]
fn write_behind_stores_tell_too_and_stores_that_share_no_connection_tell_nothing() {
    let c = cluster();
    let whole = pattern(MIB as usize, 3);
    let unshared = big_pages(&c, |cfg| cfg.use_async_rpc = false);
    unshared.store_bytes(b"unshared", b"", &whole).unwrap();
    assert_eq!(stored(&unshared, b"unshared"), whole);
    assert_eq!(aheads(&c), 0, "without pipelining");
    let behind = big_pages(&c, |cfg| cfg.write_behind = true);
    for i in 0..3u8 {
        behind
            .store_bytes(&[b'b', i], b"", &pattern(MIB as usize, 20 + i))
            .unwrap();
    }
    behind.flush().unwrap();
    // On the write-behind connection, which the first store opens: one per store after it.
    assert_eq!(
        aheads(&c),
        2,
        "one per write-behind store on an open connection"
    );
    for i in 0..3u8 {
        assert_eq!(stored(&behind, &[b'b', i]), pattern(MIB as usize, 20 + i));
    }
}
