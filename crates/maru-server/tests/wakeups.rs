//! A connection thread asleep between requests is woken by requests only. A thread asleep in
//! a Unix socket's `read` is also woken each time its peer reads a reply (the socket's
//! write-space wake-up goes to the same queue), at the peer's cost; the server's threads wait
//! for input in `poll`, which sleeps through those.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use maru_proto::*;

/// The thread ids of this process's connection threads.
fn connection_threads() -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("maru-conn-") {
            out.push(task.file_name().to_string_lossy().parse().unwrap());
        }
    }
    out
}

/// How often thread `tid` of this process gave up its CPU to wait.
fn voluntary_switches(tid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap()
}

#[test]
fn a_client_reading_its_replies_does_not_wake_the_connection_thread() {
    // No busy-polling: the thread sleeps after every reply.
    let c = InProcessCluster::with(|_, _| {}, |_, s| s.busy_poll = Duration::ZERO);
    let before = connection_threads();
    let path = c.server().unix_path().unwrap().to_owned();
    let mut sock = UnixStream::connect(path).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut rx = maru_transport::FrameBuf::new();
    let mut call = |id: u64, req: &Request, read_after: Duration| {
        let mut frame = Vec::new();
        encode_request(&mut frame, id, req).unwrap();
        sock.write_all(&frame).unwrap();
        // The reply is written and the thread back asleep before the reply is read.
        std::thread::sleep(read_after);
        let (h, p) = rx.read_frame(&mut sock).unwrap();
        assert_eq!(h.request_id, id);
        decode_response(&h, p).unwrap();
    };
    call(
        1,
        &Request::Hello(Hello {
            role: Role::Client,
            instance_id: "reader",
            host: "h",
            pid: 1,
            start_time: 0,
            session_token: None,
            namespace: "",
        }),
        Duration::ZERO,
    );
    let mine: Vec<u32> = connection_threads()
        .into_iter()
        .filter(|t| !before.contains(t))
        .collect();
    assert_eq!(mine.len(), 1, "one new connection thread: {mine:?}");
    let tid = mine[0];
    let start = voluntary_switches(tid);
    let calls = 40;
    for id in 0..calls {
        call(
            10 + id,
            &Request::Exists { key: b"k" },
            Duration::from_millis(2),
        );
    }
    // Give a wake-up from the last read the time to show.
    std::thread::sleep(Duration::from_millis(5));
    let slept = voluntary_switches(tid) - start;
    // One sleep per request (plus a few for the allocator, the logger or a read tick); a
    // thread woken by every reply read as well sleeps twice per request.
    assert!(
        slept <= calls + calls / 4,
        "{slept} sleeps for {calls} requests"
    );
    assert!(slept >= calls, "{slept} sleeps for {calls} requests");
}
