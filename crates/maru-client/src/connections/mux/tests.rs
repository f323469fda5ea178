//! The shared connection against a scripted server on a socket pair.

use super::*;
use crate::ErrorKind;
use maru_proto::encode_response;
use std::os::unix::net::UnixStream;

static CLOCK: ReplyClock = ReplyClock::new();

fn wait(timeout: Duration) -> Wait<'static> {
    Wait {
        hook: &NoHook,
        grace: Duration::from_micros(50),
        clock: &CLOCK,
        busy_poll: true,
        timeout,
    }
}

fn mux(max_inflight: usize) -> (Arc<Mux>, UnixStream) {
    let (client, server) = UnixStream::pair().unwrap();
    let conn = PooledConn::over(Stream::Unix(client));
    let peak = Arc::new(AtomicUsize::new(0));
    (Arc::new(Mux::new(conn, max_inflight, peak)), server)
}

/// Reads `n` request frames through `rx` (pipelined frames come in one read); their ids,
/// in arrival order.
fn requests(rx: &mut FrameBuf, server: &mut UnixStream, n: usize) -> Vec<u64> {
    (0..n)
        .map(|_| rx.read_frame(server).unwrap().0.request_id)
        .collect()
}

fn answer(server: &mut UnixStream, id: u64, yes: bool) {
    let mut wire = Vec::new();
    encode_response(&mut wire, id, &Response::Bool(yes)).unwrap();
    server.write_all(&wire).unwrap();
}

/// Each caller's key is its index; the reply says whether it is odd. Replies come in the
/// reverse order of the requests, in one write: the leader reads them all and delivers
/// every other one to its caller.
#[test]
fn every_caller_gets_the_reply_to_its_own_request() {
    let (m, mut server) = mux(64);
    let callers: Vec<_> = (0..6u8)
        .map(|i| {
            let m = m.clone();
            std::thread::spawn(move || {
                let key = [i];
                let got = m.call(
                    &Request::Exists { key: &key },
                    &wait(Duration::from_secs(10)),
                );
                (i, got.unwrap())
            })
        })
        .collect();
    let mut frames = Vec::new();
    let mut rx = FrameBuf::new();
    for _ in 0..6 {
        let (h, payload) = rx.read_frame(&mut server).unwrap();
        let key = match maru_proto::decode_request(&h, payload).unwrap() {
            Request::Exists { key } => key[0],
            other => panic!("{other:?}"),
        };
        frames.push((h.request_id, key));
    }
    let mut wire = Vec::new();
    for (id, key) in frames.iter().rev() {
        encode_response(&mut wire, *id, &Response::Bool(key % 2 == 1)).unwrap();
    }
    server.write_all(&wire).unwrap();
    for c in callers {
        let (i, got) = c.join().unwrap();
        assert_eq!(got, Response::Bool(i % 2 == 1), "caller {i}");
    }
    assert_eq!(m.peak.load(Ordering::Relaxed), 6);
    assert!(lock(&m.book).slots.is_empty() && !lock(&m.book).leader);
}

#[test]
fn a_late_reply_is_dropped_and_a_failure_reaches_every_waiter() {
    let (m, mut server) = mux(64);
    let e = m
        .call(
            &Request::Exists { key: b"a" },
            &wait(Duration::from_millis(30)),
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    let mut rx = FrameBuf::new();
    let late = requests(&mut rx, &mut server, 1)[0];
    answer(&mut server, late, true);
    let m2 = m.clone();
    let next = std::thread::spawn(move || {
        m2.call(
            &Request::Exists { key: b"b" },
            &wait(Duration::from_secs(10)),
        )
    });
    let id = requests(&mut rx, &mut server, 1)[0];
    answer(&mut server, id, false);
    assert_eq!(next.join().unwrap().unwrap(), Response::Bool(false));

    // Three callers in flight; the connection closes under them.
    let callers: Vec<_> = (0..3)
        .map(|_| {
            let m = m.clone();
            std::thread::spawn(move || {
                m.call(
                    &Request::Exists { key: b"c" },
                    &wait(Duration::from_secs(10)),
                )
            })
        })
        .collect();
    requests(&mut rx, &mut server, 3);
    drop(server);
    for c in callers {
        let e = c.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Transport, "{e}");
        assert!(e.found_connection_dead() && e.means_session_lost(), "{e}");
    }
    assert!(m.is_dead());
    let e = m
        .call(
            &Request::Exists { key: b"d" },
            &wait(Duration::from_secs(1)),
        )
        .unwrap_err();
    assert!(e.found_connection_dead(), "{e}");
}

/// The leader times out with a follower still waiting: the follower takes the read side
/// over, skips the leader's late reply and gets its own.
#[test]
fn a_leader_that_times_out_hands_the_read_side_to_a_waiting_caller() {
    let (m, mut server) = mux(64);
    let mut rx = FrameBuf::new();
    let m1 = m.clone();
    let leader = std::thread::spawn(move || {
        m1.call(
            &Request::Exists { key: b"a" },
            &wait(Duration::from_millis(100)),
        )
    });
    let first = requests(&mut rx, &mut server, 1)[0];
    let m2 = m.clone();
    let follower = std::thread::spawn(move || {
        m2.call(
            &Request::Exists { key: b"b" },
            &wait(Duration::from_secs(10)),
        )
    });
    let second = requests(&mut rx, &mut server, 1)[0];
    let e = leader.join().unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    answer(&mut server, first, true);
    answer(&mut server, second, false);
    assert_eq!(follower.join().unwrap().unwrap(), Response::Bool(false));
    let book = lock(&m.book);
    assert!(book.slots.is_empty() && !book.leader && book.dead.is_none());
}

#[test]
fn callers_beyond_max_inflight_wait_for_room() {
    let (m, mut server) = mux(2);
    let callers: Vec<_> = (0..5)
        .map(|_| {
            let m = m.clone();
            std::thread::spawn(move || {
                m.call(
                    &Request::Exists { key: b"k" },
                    &wait(Duration::from_secs(10)),
                )
            })
        })
        .collect();
    let mut rx = FrameBuf::new();
    for _ in 0..5 {
        let id = requests(&mut rx, &mut server, 1)[0];
        assert!(lock(&m.book).slots.len() <= 2);
        answer(&mut server, id, true);
    }
    for c in callers {
        assert_eq!(c.join().unwrap().unwrap(), Response::Bool(true));
    }
    assert_eq!(m.peak.load(Ordering::Relaxed), 2);
}
