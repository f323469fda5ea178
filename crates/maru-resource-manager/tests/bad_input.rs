//! Every kind of bad input gets its typed error (or a clean close), changes nothing, and the
//! daemon goes on serving a normal client.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use maru_proto::{
    decode_response, msg_type, ErrorCode, Header, Hello, Request, Response, Role, HEADER_LEN,
    MAGIC, MAX_FRAME, PROTOCOL_VERSION,
};
use maru_resource_manager::{RmClient, RmHandle};
use maru_testkit::wire::{header, heartbeats_refused_until_closed, request};
use maru_transport::{read_frame, FrameReadError};

fn raw(rm: &RmHandle) -> TcpStream {
    let s = TcpStream::connect(rm.addr()).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

fn hello_frame(id: u64) -> Vec<u8> {
    let (host, pid, start) = maru_transport::local_identity();
    let hello = Hello::sessionless(Role::Server, &host, pid, start);
    request(id, &Request::Hello(hello))
}

/// Sends `bytes`, reads one reply: its request id and error code (None: not an error).
fn exchange(s: &mut TcpStream, bytes: &[u8]) -> (u64, Option<ErrorCode>) {
    s.write_all(bytes).unwrap();
    let (h, payload) = read_frame(s).expect("a reply");
    let code = match decode_response(&h, &payload).unwrap() {
        Response::Error(e) => Some(e.code),
        _ => None,
    };
    (h.request_id, code)
}

fn expect_closed(s: &mut TcpStream) {
    match read_frame(s) {
        Err(FrameReadError::Closed) | Err(FrameReadError::Io(_)) => {}
        other => panic!("connection still open after a bad header: {other:?}"),
    }
}

/// A normal client still gets served, and the allocation table is what it was.
fn still_serves(rm: &RmHandle, before: &[maru_resource_manager::RmAllocation]) {
    let mut c = client(rm);
    assert_eq!(
        c.list().unwrap(),
        before,
        "bad input changed the allocation table"
    );
    let h = c.alloc(MIB, None).unwrap();
    c.free(&h).unwrap();
}

#[test]
fn malformed_frames_get_errors_and_the_stream_continues_when_it_can() {
    let (_d, rm, mut c) = default_rm();
    c.alloc(2 * MIB, None).unwrap();
    let before = c.list().unwrap();

    let mut s = raw(&rm);
    // Before the handshake.
    assert_eq!(
        exchange(&mut s, &request(1, &Request::RmStats)),
        (1, Some(ErrorCode::NotHandshaken))
    );
    assert_eq!(
        exchange(
            &mut s,
            &request(
                2,
                &Request::RmAlloc {
                    size: MIB,
                    pool: None
                }
            )
        ),
        (2, Some(ErrorCode::NotHandshaken))
    );
    assert_eq!(exchange(&mut s, &hello_frame(3)), (3, None));
    // A second Hello.
    assert_eq!(
        exchange(&mut s, &hello_frame(4)),
        (4, Some(ErrorCode::InvalidArgument))
    );
    // Unknown message type, valid header.
    assert_eq!(
        exchange(&mut s, &header(PROTOCOL_VERSION, 0x7777, 0, 5, 0)),
        (5, Some(ErrorCode::UnknownMessage))
    );
    // A metadata-server request sent to the resource manager.
    assert_eq!(
        exchange(&mut s, &request(6, &Request::Exists { key: b"k" })),
        (6, Some(ErrorCode::UnknownMessage))
    );
    // Payload that does not decode (an RmAlloc of 3 bytes).
    let mut bad = header(PROTOCOL_VERSION, msg_type::RM_ALLOC, 0, 7, 3);
    bad.extend_from_slice(&[1, 2, 3]);
    assert_eq!(exchange(&mut s, &bad), (7, Some(ErrorCode::BadFrame)));
    // Trailing garbage after a valid payload.
    let mut bad = header(PROTOCOL_VERSION, msg_type::HEARTBEAT, 0, 8, 2);
    bad.extend_from_slice(&[0, 0]);
    assert_eq!(exchange(&mut s, &bad), (8, Some(ErrorCode::BadFrame)));
    // Another protocol version.
    assert_eq!(
        exchange(
            &mut s,
            &header(PROTOCOL_VERSION + 1, msg_type::HEARTBEAT, 0, 9, 0)
        ),
        (9, Some(ErrorCode::UnsupportedVersion))
    );
    // A response frame where a request belongs.
    let resp = Header::new(msg_type::R_OK, maru_proto::FLAG_RESPONSE, 10, 0).encode();
    assert_eq!(exchange(&mut s, &resp), (10, Some(ErrorCode::BadFrame)));
    // The stream is still in sync: a normal request works.
    assert_eq!(
        exchange(&mut s, &request(11, &Request::Heartbeat)),
        (11, None)
    );
    still_serves(&rm, &before);

    // Wrong magic: answered with request id 0, then closed.
    let mut s = raw(&rm);
    let mut bad = header(PROTOCOL_VERSION, msg_type::HEARTBEAT, 0, 12, 0);
    bad[0..4].copy_from_slice(&(MAGIC ^ 1).to_le_bytes());
    assert_eq!(exchange(&mut s, &bad), (0, Some(ErrorCode::BadFrame)));
    expect_closed(&mut s);

    // Oversized frame: refused from its header alone, then closed.
    let mut s = raw(&rm);
    assert_eq!(
        exchange(
            &mut s,
            &header(PROTOCOL_VERSION, msg_type::RM_ALLOC, 0, 13, MAX_FRAME + 1)
        ),
        (0, Some(ErrorCode::FrameTooLarge))
    );
    expect_closed(&mut s);

    // Reserved header bits set.
    let mut s = raw(&rm);
    let mut bad = header(PROTOCOL_VERSION, msg_type::HEARTBEAT, 0, 14, 0);
    bad[10] = 1;
    assert_eq!(exchange(&mut s, &bad), (0, Some(ErrorCode::BadFrame)));
    expect_closed(&mut s);

    // Truncated frame, then the peer hangs up: closed without fuss.
    let mut s = raw(&rm);
    let mut bad = header(PROTOCOL_VERSION, msg_type::RM_ALLOC, 0, 15, 100);
    bad.extend_from_slice(&[0; 10]);
    s.write_all(&bad).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    expect_closed(&mut s);
    // A frame cut after half a header.
    let mut s = raw(&rm);
    s.write_all(&hello_frame(16)[..HEADER_LEN / 2]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    expect_closed(&mut s);

    still_serves(&rm, &before);
    drop(c);
    rm.shutdown();
}

#[test]
fn peer_stalling_mid_frame_is_disconnected() {
    let d = temp_dir();
    let mut cfg = rm_config(d.path(), vec![shm_pool(d.path(), "p0", 64 * MIB)]);
    cfg.stall_timeout = Duration::from_millis(300);
    let rm = maru_resource_manager::start(cfg).unwrap();
    let mut s = raw(&rm);
    let frame = hello_frame(1);
    s.write_all(&frame[..frame.len() - 3]).unwrap();
    let t0 = Instant::now();
    expect_closed(&mut s);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "slow peer held its connection for {:?}",
        t0.elapsed()
    );
    still_serves(&rm, &[]);
    rm.shutdown();
}

#[test]
fn bad_requests_get_typed_errors_and_change_nothing() {
    let (_d, rm, mut c) = default_rm();
    let h = c.alloc(2 * MIB, None).unwrap();
    let gone = c.alloc(2 * MIB, None).unwrap();
    c.free(&gone).unwrap();
    let before = c.list().unwrap();

    let code = |r: Result<(), maru_resource_manager::RmClientError>| r.unwrap_err().code();
    assert_eq!(
        c.alloc(0, None).unwrap_err().code(),
        Some(ErrorCode::InvalidArgument)
    );
    assert_eq!(
        c.alloc(1 << 40, None).unwrap_err().code(),
        Some(ErrorCode::PoolExhausted)
    );
    assert_eq!(
        c.alloc(u64::MAX, None).unwrap_err().code(),
        Some(ErrorCode::PoolExhausted)
    );
    assert_eq!(
        c.alloc(MIB, Some("/nope")).unwrap_err().code(),
        Some(ErrorCode::NoSuchPool)
    );
    assert_eq!(code(c.free(&gone)), Some(ErrorCode::DoubleFree));
    let mut forged = h.clone();
    forged.token = [0xab; 32];
    assert_eq!(code(c.free(&forged)), Some(ErrorCode::BadToken));
    let mut other =
        RmClient::connect_as(&rm.url(), Role::Server, "other-host", 99, 1, TIMEOUT).unwrap();
    assert_eq!(code(other.free(&h)), Some(ErrorCode::NotOwner));
    let mut admin = RmClient::connect(&rm.url(), Role::Admin, TIMEOUT).unwrap();
    assert_eq!(
        admin.alloc(MIB, None).unwrap_err().code(),
        Some(ErrorCode::InvalidArgument)
    );
    assert!(admin.stats().is_ok());
    // Hello without an identity.
    let e = RmClient::connect_as(&rm.url(), Role::Server, "", 0, 0, TIMEOUT)
        .err()
        .unwrap();
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument));

    drop((other, admin));
    still_serves(&rm, &before);
    let s = c.stats().unwrap();
    assert!(s.ops["rm_free"].errors >= 3, "{:?}", s.ops);
    rm.shutdown();
}

#[test]
fn too_many_clients_are_refused_then_served_when_room_frees_up() {
    let d = temp_dir();
    let mut cfg = rm_config(d.path(), vec![shm_pool(d.path(), "p0", 64 * MIB)]);
    cfg.max_clients = 2;
    let rm = maru_resource_manager::start(cfg).unwrap();
    let mut a = client(&rm);
    let b = client(&rm);
    let e = RmClient::connect(&rm.url(), Role::Server, TIMEOUT)
        .err()
        .expect("third client accepted");
    assert_eq!(e.code(), Some(ErrorCode::TooManyClients), "{e}");
    // The refusal also reaches a peer that never speaks.
    let mut silent = raw(&rm);
    let (h, payload) = read_frame(&mut silent).unwrap();
    assert!(
        matches!(decode_response(&h, &payload).unwrap(), Response::Error(e) if e.code == ErrorCode::TooManyClients)
    );
    // The two admitted clients are unaffected.
    a.heartbeat().unwrap();
    drop(b);
    assert!(
        wait_until(Duration::from_secs(5), || RmClient::connect(
            &rm.url(),
            Role::Server,
            TIMEOUT
        )
        .is_ok()),
        "a slot freed by a closed connection was never reused"
    );
    a.alloc(MIB, None).unwrap();
    rm.shutdown();
}

#[test]
fn a_connection_without_hello_is_closed_after_the_handshake_timeout_and_its_slot_freed() {
    assert_eq!(
        maru_resource_manager::HANDSHAKE_TIMEOUT,
        Duration::from_secs(10)
    );
    let d = temp_dir();
    let mut cfg = rm_config(d.path(), vec![shm_pool(d.path(), "p0", 64 * MIB)]);
    assert_eq!(
        cfg.handshake_timeout,
        maru_resource_manager::HANDSHAKE_TIMEOUT
    );
    let bound = Duration::from_millis(300);
    cfg.handshake_timeout = bound;
    cfg.max_clients = 3;
    let rm = maru_resource_manager::start(cfg).unwrap();
    let mut idle = client(&rm);
    let h = idle.alloc(MIB, None).unwrap();
    // One never sends a byte; another sends requests, but never a hello.
    let mut silent = raw(&rm);
    let mut chatty = raw(&rm);
    let t0 = Instant::now();
    let refused = heartbeats_refused_until_closed(&mut chatty, TIMEOUT);
    assert!(refused > 0);
    let mut b = [0u8; 16];
    let r = std::io::Read::read(&mut silent, &mut b);
    assert!(matches!(r, Ok(0)), "a silent connection stays: {r:?}");
    // Both slots are free again: two new clients fit next to the idle one.
    let mut more = Vec::new();
    for _ in 0..2 {
        let mut got = None;
        assert!(
            wait_until(TIMEOUT, || {
                got = RmClient::connect(&rm.url(), Role::Server, TIMEOUT).ok();
                got.is_some()
            }),
            "slot never freed"
        );
        more.push(got.unwrap());
    }
    // The handshaken connection sat idle past the bound and is still served.
    assert!(t0.elapsed() >= bound);
    idle.heartbeat().unwrap();
    idle.free(&h).unwrap();
    drop(more);
    rm.shutdown();
}
