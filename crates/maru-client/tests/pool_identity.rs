//! Device identity: a handler maps regions only from a file whose pool header is the pool
//! the region was granted from. Pointed (with `pool_path`) at another pool's file, or at a
//! file without a header, it refuses with `WrongPool`, maps nothing, and leaves the daemons
//! as they were; pointed at this host's own path of the right pool, it works.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use maru_client::{ErrorKind, MaruConfig, MaruHandler};

fn pool_file(c: &InProcessCluster) -> PathBuf {
    PathBuf::from(maru_testkit::pool_path(c.dir.path(), "p0"))
}

fn uuid_of(c: &InProcessCluster) -> String {
    c.rm().stats().pools[0].uuid.clone()
}

/// What a refused attempt must not change: keys and regions at the server, regions at the
/// resource manager.
fn observe(c: &InProcessCluster) -> (u64, u64, Vec<u64>) {
    let s = c.stats();
    (s.keys, s.regions, c.rm_region_ids())
}

fn handler_at(c: &InProcessCluster, pool_path: &Path, eager_map: bool) -> MaruHandler {
    c.handler(MaruConfig {
        pool_path: Some(pool_path.display().to_string()),
        eager_map,
        ..c.config()
    })
}

#[test]
fn another_pools_file_is_refused_with_both_uuids_and_nothing_changes() {
    let c = cluster();
    let other = cluster();
    let producer = c.handler(c.config());
    producer.store_bytes(b"k1", b"", b"value one").unwrap();
    let before = observe(&c);
    let others_before = observe(&other);
    let (ours, theirs) = (uuid_of(&c), uuid_of(&other));
    assert_ne!(ours, theirs);

    for eager_map in [true, false] {
        let h = handler_at(&c, &pool_file(&other), eager_map);
        // A write would need an owned region mapped from the wrong file.
        let e = h.store_bytes(b"k2", b"", b"value two").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WrongPool, "{e}");
        let text = e.to_string();
        let expect = format!(
            "pool file {} is pool UUID {theirs}, the resource manager's pool is {ours}",
            pool_file(&other).display()
        );
        assert!(text.contains(&expect), "{text}");
        // A read would need another instance's region mapped from it.
        let e = h.retrieve(b"k1").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WrongPool, "{e}");
        let mut buf = vec![0u8; 64];
        let e = h.retrieve_into(b"k1", &mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WrongPool, "{e}");
        assert!(h.owned_regions().is_empty());
        h.close();
        assert_eq!(observe(&c), before, "a refused handler changed the daemons");
    }
    assert_eq!(observe(&other), others_before);
    assert_eq!(
        producer.retrieve(b"k1").unwrap().unwrap().to_vec(),
        b"value one"
    );
}

#[test]
fn a_file_without_a_pool_header_is_refused() {
    let c = cluster();
    let dir = maru_testkit::temp_dir();
    let plain = dir.path().join("not-a-pool");
    std::fs::File::create(&plain)
        .unwrap()
        .set_len(256 * maru_client::MIB)
        .unwrap();
    let before = observe(&c);
    let h = handler_at(&c, &plain, true);
    let e = h.store_bytes(b"k", b"", b"v").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongPool, "{e}");
    assert!(
        e.to_string().contains(&format!(
            "is not the resource manager's pool {}",
            uuid_of(&c)
        )),
        "{e}"
    );
    h.close();
    assert_eq!(observe(&c), before);
}

#[test]
fn this_hosts_own_path_of_the_pool_works() {
    let c = cluster();
    let dir = maru_testkit::temp_dir();
    // Another name for the same memory, as another host names the switch's device.
    let mine = dir.path().join("cxl0");
    std::fs::hard_link(pool_file(&c), &mine).unwrap();
    let h = handler_at(&c, &mine, true);
    h.store_bytes(b"k", b"", b"through my own path").unwrap();
    let view = h.retrieve(b"k").unwrap().unwrap();
    assert_eq!(view.mapping().path(), mine.as_path());
    let reader = c.handler(c.config());
    assert_eq!(
        reader.retrieve(b"k").unwrap().unwrap().to_vec(),
        b"through my own path"
    );
}
