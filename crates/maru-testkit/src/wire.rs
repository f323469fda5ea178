//! Bytes on the wire made by hand, for the tests that feed daemons bad input, and the raw
//! exchanges those tests make.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use maru_proto::{
    decode_response, encode_request, ErrorCode, Handle, Header, Hello, Request, Response, Role,
    ServerUrl, SESSION_TOKEN_LEN,
};
use maru_transport::{read_frame, BlockingConn, CallError};

/// One encoded request frame.
pub fn request(id: u64, req: &Request) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_request(&mut buf, id, req).expect("an encodable request");
    buf
}

/// A header with any version, type and flags, announcing `payload_len` bytes (which the
/// caller may or may not send).
pub fn header(version: u16, msg_type: u16, flags: u16, id: u64, payload_len: u32) -> Vec<u8> {
    let mut h = Header::new(msg_type, flags, id, payload_len);
    h.version = version;
    h.encode().to_vec()
}

/// A frame with an arbitrary header and payload.
pub fn frame(version: u16, msg_type: u16, flags: u16, id: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = header(version, msg_type, flags, id, payload.len() as u32);
    out.extend_from_slice(payload);
    out
}

/// `h` altered in each way a forger could try, named: its token changed (one bit at either
/// end, zeroed, made up) or another field changed under its token (length, offset, owner,
/// pool). The resource manager must refuse every one with `BadToken`.
pub fn altered_handles(h: &Handle) -> Vec<(&'static str, Handle)> {
    let with = |change: &dyn Fn(&mut Handle)| {
        let mut a = h.clone();
        change(&mut a);
        a
    };
    vec![
        ("first token bit flipped", with(&|a| a.token[0] ^= 1)),
        ("one token bit flipped", with(&|a| a.token[31] ^= 0x40)),
        ("zero token", with(&|a| a.token = [0; 32])),
        ("a made-up token", with(&|a| a.token = [0x5a; 32])),
        ("a longer region", with(&|a| a.len *= 2)),
        ("another offset", with(&|a| a.offset += a.len)),
        ("another owner", with(&|a| a.owner = "somebody:1".into())),
        (
            "another pool",
            with(&|a| a.pool = "/dev/shm/elsewhere".into()),
        ),
    ]
}

/// A connection that has said hello as `instance` with `role` (host "probe", this pid), with
/// `token` to join an existing session.
pub fn connect_as(
    url: &ServerUrl,
    role: Role,
    instance: &str,
    token: Option<[u8; SESSION_TOKEN_LEN]>,
) -> Result<BlockingConn, CallError> {
    let hello = Hello {
        role,
        instance_id: instance,
        host: "probe",
        pid: std::process::id(),
        start_time: 0,
        session_token: token,
        namespace: "",
    };
    BlockingConn::connect(url, &hello, crate::TIMEOUT)
}

/// Sends heartbeats on a connection that never said hello until the daemon closes it, and
/// returns how many it refused with `NotHandshaken`. Panics on any other reply, or when the
/// connection is still open after `limit`.
pub fn heartbeats_refused_until_closed(s: &mut TcpStream, limit: Duration) -> usize {
    let heartbeat = request(7, &Request::Heartbeat);
    let t0 = Instant::now();
    let mut refused = 0;
    loop {
        // A write may fail once the daemon has closed; the read below then says so.
        let _ = s.write_all(&heartbeat);
        match read_frame(s) {
            Ok((h, p)) => match decode_response(&h, &p) {
                Ok(Response::Error(e)) if e.code == ErrorCode::NotHandshaken => refused += 1,
                other => panic!("{other:?}"),
            },
            Err(_) => return refused,
        }
        assert!(
            t0.elapsed() < limit,
            "a chatty unhandshaken connection stays"
        );
    }
}

/// The whole answer (status line, headers, body) to `GET path` on the HTTP endpoint at
/// `addr`; the endpoint closes the connection after one answer.
pub fn http_get(addr: impl std::net::ToSocketAddrs, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the HTTP endpoint");
    s.set_read_timeout(Some(crate::TIMEOUT))
        .expect("read timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("send the request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read the answer");
    body
}
