//! Set-up shared by the tests of sessions that ride through a metadata-server restart
//! (`tests/server_resume.rs`, `tests/resume_claims.rs`, `tests/resume_parking.rs`): a
//! cluster whose restarted server waits for sessions to resume, scripted client processes on
//! it, views taken before a restart and the reuse of their pages after it, and raw first
//! requests of a connection (a resume as a handler sends it, or as a forger would).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use maru_proto::{decode_frame, Body, Hello, Request, Response, Role, ServerUrl, HEADER_LEN};
use maru_testkit::{wire, BinaryCluster, ClusterOpts};

use crate::child::{num, pages_of, ChildProc};
use crate::{KIB, MIB};

/// How long a test waits for any one answer.
pub const T: Duration = Duration::from_secs(30);
/// The clients' `timeout_ms`: long enough for a resume to wait out the restart.
pub const CLIENT_TIMEOUT_MS: u64 = 3000;

/// A client process connected to `url` with a 2 MiB pool of 16 KiB pages.
pub fn connect(name: &str, url: &str) -> ChildProc {
    ChildProc::spawn_connected(name, url, 2 * MIB, 16 * KIB, CLIENT_TIMEOUT_MS, T)
}

/// A cluster whose restarted server waits `grace_secs` for sessions to resume (the
/// resource manager keeps a dead server's regions for 30 s).
pub fn cluster(grace_secs: f64) -> BinaryCluster {
    cluster_with(grace_secs, ClusterOpts::default())
}

/// As [`cluster`], on `opts` (its server's extra arguments come after the grace's).
pub fn cluster_with(grace_secs: f64, opts: ClusterOpts) -> BinaryCluster {
    let mut server_extra = vec!["--reconnect-grace-secs".into(), grace_secs.to_string()];
    server_extra.extend(opts.server_extra);
    BinaryCluster::start(ClusterOpts {
        rm_extra: vec!["--server-grace-secs".into(), "30".into()],
        server_extra,
        ..opts
    })
}

/// Sends the bytes of one frame as the first request of a fresh connection to the Unix
/// socket of `url` and returns the reply.
pub fn first_frame(url: &str, frame: &[u8]) -> Response {
    first_frame_kept(url, frame).1
}

/// As [`first_frame`], keeping the connection open (a session it resumed lives while it
/// is).
pub fn first_frame_kept(url: &str, frame: &[u8]) -> (UnixStream, Response) {
    let ServerUrl::Unix(path) = ServerUrl::parse(url).unwrap() else {
        panic!("not a unix url: {url}")
    };
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(frame).unwrap();
    let mut head = [0u8; HEADER_LEN];
    s.read_exact(&mut head).unwrap();
    let len = u32::from_le_bytes(head[HEADER_LEN - 4..].try_into().unwrap()) as usize;
    let mut frame = head.to_vec();
    frame.resize(HEADER_LEN + len, 0);
    s.read_exact(&mut frame[HEADER_LEN..]).unwrap();
    match decode_frame(&frame).unwrap().body {
        Body::Response(r) => (s, r),
        other => panic!("not a response: {other:?}"),
    }
}

/// Sends `req` as the first request of a fresh connection and returns the reply.
pub fn first_request(url: &str, req: &Request) -> Response {
    first_frame(url, &wire::request(1, req))
}

/// The hello of a resume of the session of `token` in the default namespace.
pub fn resume_hello(token: [u8; 16]) -> Hello<'static> {
    Hello {
        role: Role::Client,
        instance_id: "probe",
        host: "probe",
        pid: std::process::id(),
        start_time: 0,
        session_token: Some(token),
        namespace: "",
    }
}

/// A resume of the session of `token` claiming `regions` and no pins or holds.
pub fn resume(url: &str, token: [u8; 16], regions: Vec<u64>) -> Response {
    let req = Request::Resume {
        hello: resume_hello(token),
        regions,
        pins: vec![],
        holds: vec![],
    };
    first_request(url, &req)
}

/// Pages as the scripted clients name them: region id and offset.
pub type Pages = BTreeSet<(u64, u64)>;

/// Holds of views the server counts for its sessions, all instances together.
pub fn holds(c: &BinaryCluster) -> u64 {
    c.server_stats().clients.iter().map(|s| s.holds).sum()
}

/// A writer stores 16 keys (`k 0..16`, the first pages of its 128-page region) and a holder
/// views them: both processes and the viewed pages.
pub fn viewed_keys(c: &BinaryCluster) -> (ChildProc, ChildProc, Pages) {
    let mut writer = connect("writer", &c.unix_url());
    assert_eq!(num(&writer.ok("store k 0 16", T), "stored"), 16);
    let mut holder = connect("holder", &c.unix_url());
    let a = holder.ok("hold k 0 16", T);
    assert_eq!((num(&a, "held"), num(&a, "corrupt")), (16, 0), "{a}");
    let viewed = pages_of(&a);
    assert_eq!(viewed.len(), 16);
    (writer, holder, viewed)
}

/// The holder releases its 16 views, then [`reused_by_the_writer`]; closes both processes.
pub fn released_pages_are_reused(
    c: &BinaryCluster,
    mut writer: ChildProc,
    mut holder: ChildProc,
    viewed: &Pages,
) {
    assert_eq!(num(&holder.ok("release", T), "released"), 16);
    assert!(
        crate::wait_until(T, || holds(c) == 0),
        "the releases did not arrive"
    );
    reused_by_the_writer(c, &mut writer, viewed);
    for p in [&mut writer, &mut holder] {
        p.ok("close", T);
    }
}

/// The writer, its region full of 112 keys `n 0..112`, stores 16 more (`m 0..16`): they take
/// exactly the `viewed` pages (freed by now), and every stored key reads back intact.
pub fn reused_by_the_writer(c: &BinaryCluster, writer: &mut ChildProc, viewed: &Pages) {
    assert_eq!(num(&writer.ok("store m 0 16", T), "stored"), 16);
    let reused = pages_of(&writer.ok("where m 0 16", T));
    assert_eq!(&reused, viewed, "the freed pages were not the ones reused");
    let mut reader = connect("reader", &c.unix_url());
    for (prefix, n) in [("n", 112), ("m", 16)] {
        let a = reader.ok(&format!("verify {prefix} 0 {n}"), T);
        assert_eq!((num(&a, "found"), num(&a, "corrupt")), (n, 0), "{a}");
    }
    reader.ok("close", T);
}
