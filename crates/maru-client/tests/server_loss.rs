//! A server that is slow, gone or closes the connection: timeouts through the wait hook, a
//! fast failure, a timed-out connection kept and its late reply skipped, owned pages detached
//! from the pool once the server is lost (and every later call saying so), and close() never
//! taken for a loss.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::fake_server::{closing_server, late_server, stalled_server};
use common::*;
use maru_client::{ErrorKind, MaruConfig, MaruHandler, WaitHook, MIB};

#[test]
fn a_stalled_server_times_out_through_the_hook() {
    struct Counting(AtomicUsize);
    impl WaitHook for Counting {
        fn block(&self, f: &mut (dyn FnMut() + Send)) {
            self.0.fetch_add(1, Ordering::SeqCst);
            f()
        }
    }
    let (url, t) = stalled_server();
    let h = MaruHandler::new(MaruConfig {
        server_url: url,
        timeout_ms: 300,
        ..MaruConfig::default()
    })
    .unwrap();
    let hook = Counting(AtomicUsize::new(0));
    let started = Instant::now();
    let e = h.with_hook(&hook).connect().unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(
        hook.0.load(Ordering::SeqCst) >= 1,
        "slow wait went through the hook"
    );
    assert!(!h.is_connected());
    // The session's second connection (the watcher's) waits for its hello in vain.
    assert!(e.to_string().contains("hello"), "{e}");
    drop(h);
    t.join().unwrap();
}

#[test]
fn a_dead_server_fails_fast() {
    let mut c = cluster();
    let h = c.handler(c.config());
    h.store_bytes(b"d", b"", b"x").unwrap();
    c.server.take().unwrap().shutdown();
    let started = Instant::now();
    let e = h.exists(b"d").unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Transport | ErrorKind::Remote(_)),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!h.healthcheck());
}

#[test]
fn a_timed_out_connection_is_kept_and_its_late_reply_skipped() {
    let dir = maru_testkit::temp_dir();
    let (url, conns, late_sent) = late_server(dir.path(), Duration::from_millis(300));
    let h = MaruHandler::new(MaruConfig {
        server_url: url,
        pool_size: 2 * MIB,
        chunk_size_bytes: 64 * 1024,
        timeout_ms: 100,
        eager_map: false,
        ..MaruConfig::default()
    })
    .unwrap();
    h.connect().unwrap();
    let e = h.exists(b"k").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    // Once the late `true` is on the wire, the next call must skip it and return its own
    // `false`.
    wait_until("the late reply", Duration::from_secs(5), || {
        late_sent.load(Ordering::SeqCst)
    });
    assert!(
        !h.exists(b"k").unwrap(),
        "the stale reply was taken for this call's"
    );
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "the timed-out connection was kept (plus the watcher's): the server ends a session \
         with its last connection"
    );
    h.close();
}

#[test]
fn a_lost_server_detaches_owned_pages_and_the_next_call_says_so() {
    let mut c = cluster();
    let h = c.handler(c.config());
    h.store_bytes(b"kept", b"", &[9; 4096]).unwrap();
    let kept = h.retrieve(b"kept").unwrap().unwrap();
    let a = h.alloc(64).unwrap();
    let pool = pool_view_of(&a);
    assert!(
        write_reaches_pool(&a, &pool, b"live session write"),
        "an owned page is shared while the server lives"
    );

    c.server.take().unwrap().shutdown();
    // No call of ours: the watcher notices on its own, within a bounded wait.
    wait_until(
        "the server's loss to be noticed",
        Duration::from_secs(10),
        || !h.is_connected(),
    );
    // The server gave our regions back; the resource manager may hand them to anyone now.
    wait_until("the regions to go back", Duration::from_secs(10), || {
        c.rm_allocations() == 0
    });
    for i in 0..3 {
        let stamp = format!("stale write {i}");
        assert!(
            !write_reaches_pool(&a, &pool, stamp.as_bytes()),
            "a write through a page allocated before the server's loss reached the pool"
        );
        // Reads through old views still work: the handle shows its own (private) bytes.
        assert_eq!(&a.view().to_vec()[..stamp.len()], stamp.as_bytes());
    }
    let old = kept.to_vec();
    assert!(
        old == vec![9; 4096] || old == vec![0; 4096],
        "a view of a stored key reads the value or, once its region was freed, zeros"
    );

    // The next operation says what happened, with a typed error.
    let e = h.exists(b"kept").unwrap_err();
    assert!(e.is_server_lost(), "{e}");
    assert_eq!(e.kind(), ErrorKind::Transport);
    assert!(
        e.to_string()
            .contains("metadata server connection was lost")
            && e.to_string().contains("close()"),
        "{e}"
    );
    assert!(h.alloc(16).unwrap_err().is_server_lost());
    assert!(matches!(
        h.store_bytes(b"x", b"", b"y").unwrap_err().kind(),
        ErrorKind::Transport
    ));
    assert!(h.connect().unwrap_err().is_server_lost());
    assert!(!h.healthcheck());
    h.close();
    assert_eq!(h.exists(b"kept").unwrap_err().kind(), ErrorKind::State);
}

#[test]
fn close_is_not_reported_as_server_loss() {
    let c = cluster();
    let h = c.handler(c.config());
    let other = c.handler(c.config());
    h.store_bytes(b"mine", b"", b"v").unwrap();
    let me = |stats: maru_client::HandlerStats| {
        stats
            .server
            .clients
            .into_iter()
            .find(|cl| cl.instance_id == h.instance_id())
    };
    let before = me(other.stats().unwrap()).unwrap();
    assert!(
        before.connected && before.connections >= 2,
        "a pooled connection and the watcher's: {before:?}"
    );
    h.close();
    let e = h.exists(b"mine").unwrap_err();
    assert!(e.is_closed(), "{e}");
    assert_eq!(e.kind(), ErrorKind::State);
    // The session ended by goodbye, not by a lost connection: its regions went back (the
    // key keeps its own), and nobody else noticed anything.
    assert!(other.is_connected());
    assert_eq!(other.retrieve(b"mine").unwrap().unwrap().to_vec(), b"v");
    // Its session is over at the server (its region stays for the key, owner gone).
    let after = me(other.stats().unwrap()).unwrap();
    assert!(
        !after.connected && after.connections == 0,
        "the closed handler's session (or its watcher) is still at the server: {after:?}"
    );
    other.close();
}

#[test]
fn a_call_that_finds_the_connection_closed_detaches_at_once() {
    let dir = maru_testkit::temp_dir();
    let h = MaruHandler::new(MaruConfig {
        server_url: closing_server(dir.path()),
        pool_size: 2 * MIB,
        chunk_size_bytes: 64 * 1024,
        eager_map: false,
        ..MaruConfig::default()
    })
    .unwrap();
    h.connect().unwrap();
    let a = h.alloc(64).unwrap();
    let pool = pool_view_of(&a);
    assert!(write_reaches_pool(&a, &pool, b"before"));
    // The watcher's own connection stays open here: the call itself must notice.
    let e = h.exists(b"k").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transport, "{e}");
    assert!(!h.is_connected());
    assert!(!write_reaches_pool(&a, &pool, b"after!"));
    assert!(h.exists(b"k").unwrap_err().is_server_lost());
    h.close();
}
