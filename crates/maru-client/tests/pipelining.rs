//! Pipelining (`use_async_rpc`): the threads of one handler share its connection, with at most
//! `max_inflight` calls in flight; a call that times out leaves the others in step; a
//! connection that dies fails every call in flight with a typed error; without pipelining,
//! each concurrent caller has a connection of its own.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::fake_server::{dying_server, late_server};
use common::*;
use maru_client::{ErrorKind, MaruConfig, MaruHandler, MIB};

/// A handler of a fake server (no eager mapping: the fakes do not list regions).
fn fake_handler(url: String, timeout_ms: u64, f: impl FnOnce(&mut MaruConfig)) -> MaruHandler {
    let mut cfg = MaruConfig {
        server_url: url,
        pool_size: 2 * MIB,
        chunk_size_bytes: 64 * 1024,
        timeout_ms,
        eager_map: false,
        ..MaruConfig::default()
    };
    f(&mut cfg);
    let h = MaruHandler::new(cfg).unwrap();
    h.connect().unwrap();
    h
}

/// Runs `f(thread)` on `n` threads released together; their results in thread order.
fn on_threads<T: Send + 'static>(
    n: usize,
    f: impl Fn(usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let barrier = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (f, barrier) = (f.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                f(i)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// This handler's connections as the server counts them.
fn connections_at_server(h: &MaruHandler) -> u64 {
    let stats = h.stats().unwrap();
    let me = stats
        .server
        .clients
        .into_iter()
        .find(|c| c.instance_id == h.instance_id())
        .expect("the handler's session at the server");
    me.connections
}

#[test]
fn threads_of_one_handler_share_its_connection() {
    let c = cluster();
    let h = Arc::new(c.handler(c.config()));
    let keys: Vec<Vec<u8>> = (0..32).map(|i| format!("mux-{i}").into_bytes()).collect();
    for (i, k) in keys.iter().enumerate() {
        h.store_bytes(k, b"", &[i as u8; 512]).unwrap();
    }
    let before = connections_at_server(&h);
    let (hh, kk) = (h.clone(), Arc::new(keys));
    let calls = on_threads(16, move |t| {
        let mut calls = 0;
        for i in 0..200 {
            let k = &kk[(t * 7 + i) % kk.len()];
            // Each goes to the server: a lookup that takes a hold, a pin, a miss.
            let v = hh.retrieve(k).unwrap().expect("a stored key");
            assert_eq!(v.to_vec(), vec![((t * 7 + i) % kk.len()) as u8; 512]);
            assert!(hh.pin(k).unwrap());
            assert!(hh.unpin(k).unwrap());
            assert!(!hh.pin(format!("missing-{t}-{i}").as_bytes()).unwrap());
            calls += 4;
        }
        calls
    });
    assert_eq!(calls.iter().sum::<usize>(), 16 * 200 * 4);
    let after = connections_at_server(&h);
    // The shared connection (which also asked for the region, being idle then) and the
    // watcher's.
    assert_eq!(before, 2, "connections before the threads ran");
    assert_eq!(
        after, before,
        "16 threads opened connections of their own instead of sharing"
    );
    let peak = h.stats().unwrap().peak_inflight;
    assert!(
        (1..=64).contains(&peak),
        "at most max_inflight calls in flight: {peak}"
    );
    h.close();
}

#[test]
fn max_inflight_bounds_the_calls_in_flight() {
    let dir = maru_testkit::temp_dir();
    // The first exists waits 300 ms at the server: the callers behind it pile up.
    let (url, conns, _) = late_server(dir.path(), Duration::from_millis(300));
    let h = Arc::new(fake_handler(url, 5000, |c| c.max_inflight = 2));
    let hh = h.clone();
    let answers = on_threads(16, move |_| hh.exists(b"k").unwrap());
    // Exactly one call got the late `true`; every other call its own `false`.
    assert_eq!(answers.iter().filter(|a| **a).count(), 1, "{answers:?}");
    let peak = h.peak_inflight();
    assert_eq!(peak, 2, "calls in flight at once, max_inflight = 2");
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "one shared connection and the watcher's"
    );
    h.close();
}

#[test]
fn a_timed_out_call_leaves_the_next_caller_its_own_reply() {
    let dir = maru_testkit::temp_dir();
    let delay = Duration::from_millis(400);
    let (url, conns, late_sent) = late_server(dir.path(), delay);
    let h = Arc::new(fake_handler(url, 250, |_| {}));
    // The first call times out; the second goes out on the same connection while the
    // first's reply is still to come, and must skip it.
    let e = h.exists(b"k").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(
        !late_sent.load(Ordering::SeqCst),
        "the late reply is still to come"
    );
    assert!(
        !h.exists(b"k").unwrap(),
        "the late reply of the timed-out call was taken for the next call's"
    );
    assert!(late_sent.load(Ordering::SeqCst));
    // More callers at once, all on the same connection, all in step.
    let hh = h.clone();
    let answers = on_threads(8, move |_| hh.exists(b"k").unwrap());
    assert!(answers.iter().all(|a| !a), "{answers:?}");
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "the timed-out connection was kept"
    );
    h.close();
}

#[test]
fn a_connection_that_dies_fails_every_call_in_flight() {
    let dir = maru_testkit::temp_dir();
    let (url, _conns) = dying_server(dir.path(), Duration::from_millis(200));
    let h = Arc::new(fake_handler(url, 3000, |_| {}));
    let hh = h.clone();
    let started = Instant::now();
    let errors = on_threads(8, move |_| hh.exists(b"k").unwrap_err());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the failure reached the waiters late: {:?}",
        started.elapsed()
    );
    for e in &errors {
        // Calls that came after the session was found lost say so; the others name the
        // connection's failure, as a lent connection's call does.
        assert!(
            e.kind() == ErrorKind::Transport || e.is_server_lost(),
            "{e:?}"
        );
    }
    assert!(
        errors.iter().any(|e| !e.is_server_lost()),
        "no call saw the connection fail: {errors:?}"
    );
    // The session is lost, as after a single call that finds its connection closed.
    assert!(h.exists(b"k").unwrap_err().is_server_lost());
    h.close();
}

#[test]
fn a_server_that_dies_fails_the_callers_in_flight_within_the_timeout() {
    let mut c = cluster();
    let timeout = Duration::from_millis(1000);
    let h = Arc::new(c.handler(MaruConfig {
        timeout_ms: timeout.as_millis() as u64,
        ..c.config()
    }));
    h.store_bytes(b"live", b"", b"v").unwrap();
    let (hh, go) = (h.clone(), Arc::new(Barrier::new(9)));
    let gate = go.clone();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (h, gate) = (hh.clone(), gate.clone());
            std::thread::spawn(move || {
                gate.wait();
                loop {
                    let t = Instant::now();
                    if let Err(e) = h.pin(b"live") {
                        return (e, t, t.elapsed());
                    }
                }
            })
        })
        .collect();
    go.wait();
    std::thread::sleep(Duration::from_millis(50));
    let cut = Instant::now();
    c.server.take().unwrap().shutdown();
    for w in workers {
        let (e, started, took) = w.join().unwrap();
        assert!(
            matches!(
                e.kind(),
                ErrorKind::Transport | ErrorKind::Remote(_) | ErrorKind::Timeout
            ),
            "{e:?}"
        );
        // A call that began after the loss was noticed waits for the handler's attempts to
        // resume the session (each bounded by the timeout, one caller after another); a call
        // in flight when the server went ends within its own timeout.
        if started < cut {
            assert!(
                took < timeout + Duration::from_millis(500),
                "a call took {took:?}"
            );
        }
    }
    assert!(!h.healthcheck());
    let e = h.pin(b"live").unwrap_err();
    assert!(e.is_server_lost(), "{e}");
    h.close();
}

#[test]
fn without_pipelining_each_concurrent_caller_has_a_connection() {
    let dir = maru_testkit::temp_dir();
    let (url, conns, _) = late_server(dir.path(), Duration::from_millis(300));
    let h = Arc::new(fake_handler(url, 5000, |c| c.use_async_rpc = false));
    let hh = h.clone();
    // Every connection's first exists waits 300 ms, so callers released together each
    // find every other connection busy.
    let answers = on_threads(4, move |_| hh.exists(b"k").unwrap());
    assert!(answers.iter().all(|a| *a), "{answers:?}");
    assert_eq!(
        conns.load(Ordering::SeqCst),
        4 + 1,
        "a connection per caller (the first the session's own) and the watcher's"
    );
    assert_eq!(h.peak_inflight(), 0);
    h.close();
}
