//! Every kind of bad input (registrations outside the caller's regions, oversized keys and
//! batches, requests before the handshake, malformed frames) gets a typed error, changes
//! nothing, and leaves the server serving normal clients.

mod common;

use common::*;
use maru_proto::*;

/// What the server's state looks like from outside, to show a bad request changed nothing.
fn snapshot(c: &InProcessCluster) -> (u64, u64, u64, u64, Vec<u64>, Vec<u64>) {
    let s = c.stats();
    (
        s.keys,
        s.bytes,
        s.pinned_keys,
        s.regions,
        c.rm_region_ids(),
        s.clients
            .iter()
            .filter(|c| c.regions > 0)
            .map(|c| c.regions)
            .collect(),
    )
}

/// Region size used below: a multiple of the pool alignment (2 MiB), so it is exact.
const RLEN: u64 = 2 * MIB;

/// Common setup: instance "a" with a region and one key, instance "b" with a region.
fn setup() -> (InProcessCluster, Client, u64, Client, u64) {
    let c = InProcessCluster::start();
    let mut a = c.client("a");
    let ra = a.region(RLEN).handle.region_id;
    assert!(a.register(b"existing", ra, 0, 10));
    let mut b = c.client("b");
    let rb = b.region(RLEN).handle.region_id;
    (c, a, ra, b, rb)
}

fn normal_client_still_served(c: &InProcessCluster) {
    let mut n = c.client("normal");
    let r = n.region(MIB).handle.region_id;
    assert!(n.register(b"after", r, 0, 1));
    assert_eq!(n.lookup(b"after").unwrap().region.handle.region_id, r);
    assert_eq!(n.delete(b"after"), DeleteStatus::Deleted);
    n.goodbye();
}

fn reg(key: &[u8], region_id: u64, offset: u64, len: u64) -> Request<'_> {
    Request::Register(RegisterEntry {
        key,
        region_id,
        offset,
        len,
    })
}

#[test]
fn registrations_outside_the_callers_regions_are_refused() {
    let (c, mut a, ra, mut b, rb) = setup();
    let before = snapshot(&c);
    let cases: Vec<(Request, ErrorCode)> = vec![
        (reg(b"k", 424242, 0, 1), ErrorCode::UnknownRegion),
        (reg(b"k", rb, 0, 1), ErrorCode::NotOwner),
        (reg(b"k", ra, 100, 1), ErrorCode::OutOfBounds),
        (reg(b"k", ra, 0, 0), ErrorCode::OutOfBounds),
        (reg(b"k", ra, RLEN, 1), ErrorCode::OutOfBounds),
        (reg(b"k", ra, RLEN - 4096, 4097), ErrorCode::OutOfBounds),
        (reg(b"k", ra, 0, u64::MAX), ErrorCode::OutOfBounds),
        (reg(b"k", ra, u64::MAX - 4095, 4096), ErrorCode::OutOfBounds),
        (
            Request::BatchRegister(vec![
                RegisterEntry {
                    key: b"good",
                    region_id: ra,
                    offset: 4096,
                    len: 1,
                },
                RegisterEntry {
                    key: b"bad",
                    region_id: rb,
                    offset: 0,
                    len: 1,
                },
            ]),
            ErrorCode::NotOwner,
        ),
        (Request::ReturnRegion { region_id: rb }, ErrorCode::NotOwner),
        (
            Request::ReturnRegion { region_id: 424242 },
            ErrorCode::UnknownRegion,
        ),
        (
            Request::GetRegion { region_id: 424242 },
            ErrorCode::UnknownRegion,
        ),
        (
            Request::RequestRegion { size: 0 },
            ErrorCode::InvalidArgument,
        ),
        (
            Request::RmAlloc {
                size: MIB,
                pool: None,
            },
            ErrorCode::UnknownMessage,
        ),
    ];
    for (req, code) in &cases {
        assert_eq!(a.fails(req), *code, "{req:?}");
        assert_eq!(snapshot(&c), before, "{req:?} changed state");
    }
    assert!(
        !a.bool(&Request::Exists { key: b"good" }),
        "batch applied halfway"
    );
    // The refused connections keep working.
    assert!(a.register(b"fine", ra, 4096, 1));
    assert!(b.register(b"fine-b", rb, 0, 1));
    normal_client_still_served(&c);
}

#[test]
fn limits_are_enforced_by_the_decoder_with_typed_errors() {
    let (c, _a, _ra, _b, _rb) = setup();
    let before = snapshot(&c);
    let mut raw = Raw::connect(&c.url());
    raw.hello("raw");

    // A key one byte over the limit.
    let mut payload = ((MAX_KEY_LEN + 1) as u32).to_le_bytes().to_vec();
    payload.extend(std::iter::repeat_n(b'k', MAX_KEY_LEN + 1));
    raw.send(&wire::frame(
        PROTOCOL_VERSION,
        msg_type::EXISTS,
        0,
        5,
        &payload,
    ));
    assert_eq!(raw.recv_error(), (5, ErrorCode::KeyTooLong));

    // A batch one item over the limit (the count alone is enough to refuse it).
    let mut payload = ((MAX_BATCH + 1) as u32).to_le_bytes().to_vec();
    payload.extend(std::iter::repeat_n(0u8, 8 * (MAX_BATCH + 1)));
    for t in [
        msg_type::BATCH_EXISTS,
        msg_type::BATCH_LOOKUP,
        msg_type::BATCH_DELETE,
        msg_type::BATCH_PIN,
        msg_type::BATCH_UNPIN,
        msg_type::BATCH_REGISTER,
    ] {
        raw.send(&wire::frame(PROTOCOL_VERSION, t, 0, 6, &payload));
        assert_eq!(raw.recv_error(), (6, ErrorCode::BatchTooLarge), "{t:#x}");
    }
    // The encoder refuses to even build them.
    let keys: Vec<&[u8]> = vec![b"k"; MAX_BATCH + 1];
    assert!(encode_request(&mut Vec::new(), 1, &Request::BatchExists { keys }).is_err());

    // The connection is still good.
    raw.send_request(7, &Request::Exists { key: b"existing" });
    assert_eq!(raw.recv(), (7, Response::Bool(true)));
    assert_eq!(snapshot(&c), before);
    normal_client_still_served(&c);
}

#[test]
fn requests_before_the_handshake_are_refused() {
    let (c, _a, ra, _b, _rb) = setup();
    let before = snapshot(&c);
    let mut raw = Raw::connect(&c.url());
    for (id, req) in [
        (1, Request::Exists { key: b"existing" }),
        (2, Request::Lookup { key: b"existing" }),
        (3, Request::Delete { key: b"existing" }),
        (4, Request::RequestRegion { size: MIB }),
        (5, reg(b"x", ra, 0, 1)),
        (6, Request::Stats),
        (7, Request::Heartbeat),
        (8, Request::Goodbye),
        (12, Request::Ahead { in_us: 0 }),
    ] {
        raw.send_request(id, &req);
        assert_eq!(raw.recv_error(), (id, ErrorCode::NotHandshaken), "{req:?}");
    }
    assert_eq!(snapshot(&c), before);
    // Then a proper hello works on the same connection.
    raw.hello("late");
    // A request said to follow is answered with nothing; the one that follows as usual.
    raw.send_request(0, &Request::Ahead { in_us: 200 });
    raw.send_request(9, &Request::Exists { key: b"existing" });
    assert_eq!(raw.recv(), (9, Response::Bool(true)));
    // A hit that counts a key zero times is malformed: refused, the connection kept.
    let mut zero = Vec::new();
    let hits = vec![KeyCount {
        key: b"existing",
        count: 1,
    }];
    encode_request(&mut zero, 14, &Request::Hit { hits }).unwrap();
    let n = zero.len();
    zero[n - 4..].copy_from_slice(&0u32.to_le_bytes());
    raw.send(&zero);
    assert_eq!(raw.recv_error(), (14, ErrorCode::BadFrame));
    raw.send_request(15, &Request::Exists { key: b"existing" });
    assert_eq!(raw.recv(), (15, Response::Bool(true)));
    // After goodbye the connection is back to needing a hello.
    raw.send_request(10, &Request::Goodbye);
    assert_eq!(raw.recv(), (10, Response::Ok));
    raw.send_request(11, &Request::Exists { key: b"existing" });
    assert_eq!(raw.recv_error(), (11, ErrorCode::NotHandshaken));
    normal_client_still_served(&c);
}

#[test]
fn session_conflicts_and_bad_hellos_are_refused() {
    let (c, a, _ra, _b, _rb) = setup();
    let before = snapshot(&c);
    let url = c.url();
    let code = |r: Result<Client, maru_transport::CallError>| r.err().and_then(|e| e.code());
    assert_eq!(
        code(Client::connect_role(&url, Role::Client, "a", Some([1; 16]))),
        Some(ErrorCode::SessionConflict),
        "a token of no live session"
    );
    let _ = &a;
    assert_eq!(
        code(Client::connect_role(&url, Role::Client, "", None)),
        Some(ErrorCode::InvalidArgument)
    );
    assert_eq!(
        code(Client::connect_role(&url, Role::Server, "x", None)),
        Some(ErrorCode::InvalidArgument)
    );
    // A second hello on a live connection.
    let mut raw = Raw::connect(&url);
    raw.hello("twice");
    raw.send_request(
        2,
        &Request::Hello(Hello {
            role: Role::Client,
            instance_id: "other",
            host: "h",
            pid: 1,
            start_time: 0,
            session_token: None,
            namespace: "",
        }),
    );
    assert_eq!(raw.recv_error(), (2, ErrorCode::InvalidArgument));
    drop(raw);
    assert!(wait_until(TIMEOUT, || snapshot(&c) == before));
    drop(a);
    normal_client_still_served(&c);
}

#[test]
fn malformed_frames_get_errors_and_bad_headers_close_the_connection() {
    let (c, _a, _ra, _b, _rb) = setup();
    let before = snapshot(&c);
    let url = c.url();

    // Valid header, payload that does not decode: error with the request id, connection lives.
    let mut raw = Raw::connect(&url);
    raw.hello("m");
    let cases: Vec<(Vec<u8>, u64, ErrorCode)> = vec![
        (
            wire::frame(PROTOCOL_VERSION, msg_type::EXISTS, 0, 20, &[1, 2]),
            20,
            ErrorCode::BadFrame,
        ),
        (
            // Key length says 100, 3 bytes follow.
            wire::frame(
                PROTOCOL_VERSION,
                msg_type::LOOKUP,
                0,
                21,
                &[100, 0, 0, 0, 1, 2, 3],
            ),
            21,
            ErrorCode::BadFrame,
        ),
        (
            // Trailing bytes after a heartbeat.
            wire::frame(PROTOCOL_VERSION, msg_type::HEARTBEAT, 0, 22, &[0]),
            22,
            ErrorCode::BadFrame,
        ),
        (
            wire::frame(PROTOCOL_VERSION, 0x7777, 0, 23, &[]),
            23,
            ErrorCode::UnknownMessage,
        ),
        (
            wire::frame(PROTOCOL_VERSION + 1, msg_type::HEARTBEAT, 0, 24, &[]),
            24,
            ErrorCode::UnsupportedVersion,
        ),
        (
            // A response sent as a request.
            wire::frame(PROTOCOL_VERSION, msg_type::R_OK, FLAG_RESPONSE, 25, &[]),
            25,
            ErrorCode::BadFrame,
        ),
        (
            // A bool that is neither 0 nor 1 in a hello-sized payload.
            wire::frame(PROTOCOL_VERSION, msg_type::REQUEST_REGION, 0, 26, &[0; 7]),
            26,
            ErrorCode::BadFrame,
        ),
    ];
    for (frame, id, code) in &cases {
        raw.send(frame);
        assert_eq!(raw.recv_error(), (*id, *code));
    }
    raw.send_request(30, &Request::Heartbeat);
    assert_eq!(raw.recv(), (30, Response::Ok));

    // Bad headers: an error with request id 0, then the server closes the connection.
    let mut bad_magic = wire::frame(PROTOCOL_VERSION, msg_type::HEARTBEAT, 0, 40, &[]);
    bad_magic[0] ^= 0xff;
    let mut reserved = wire::frame(PROTOCOL_VERSION, msg_type::HEARTBEAT, 0, 41, &[]);
    reserved[10] = 1;
    let unknown_flag = wire::frame(PROTOCOL_VERSION, msg_type::HEARTBEAT, 0x80, 42, &[]);
    let mut too_large = wire::frame(PROTOCOL_VERSION, msg_type::EXISTS, 0, 43, &[]);
    too_large[20..24].copy_from_slice(&(MAX_FRAME + 1).to_le_bytes());
    for (frame, code) in [
        (bad_magic, ErrorCode::BadFrame),
        (reserved, ErrorCode::BadFrame),
        (unknown_flag, ErrorCode::BadFrame),
        (too_large, ErrorCode::FrameTooLarge),
    ] {
        let mut raw = Raw::connect(&url);
        raw.hello("closing");
        raw.send(&frame);
        assert_eq!(raw.recv_error(), (0, code));
        assert!(raw.is_closed(), "connection not closed after {code:?}");
    }
    assert!(wait_until(TIMEOUT, || snapshot(&c) == before));
    normal_client_still_served(&c);
}

#[test]
fn a_peer_that_stops_mid_frame_does_not_block_others() {
    let (c, mut a, _ra, _b, _rb) = setup();
    let mut raw = Raw::connect(&c.url());
    raw.hello("slow");
    let frame = wire::frame(PROTOCOL_VERSION, msg_type::EXISTS, 0, 5, b"\x03\0\0\0abc");
    raw.send(&frame[..10]); // half a header, then nothing
    for _ in 0..10 {
        assert!(a.bool(&Request::Exists { key: b"existing" }));
    }
    normal_client_still_served(&c);
}
