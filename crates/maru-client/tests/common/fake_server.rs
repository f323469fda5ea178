//! Fake metadata servers on 127.0.0.1:0 that misbehave on purpose: late, closing or silent
//! replies, which a real server never gives when a test needs them.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use maru_client::MIB;
use maru_proto::{encode_response, msg_type, Access, Handle, HelloOk, RegionInfo, Response};

/// The 2 MiB region a fake server grants: a file `<name>-region` in `dir`.
fn fake_region(dir: &std::path::Path, name: &str) -> RegionInfo {
    let path = dir.join(format!("{name}-region"));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    let path = path.display().to_string();
    RegionInfo {
        handle: Handle {
            region_id: 1,
            pool: path.clone(),
            offset: 0,
            len: 2 * MIB,
            owner: format!("{name}:1"),
            token: [0; 32],
        },
        access: Access {
            path,
            offset: 0,
            len: 2 * MIB,
            page_size: 4096,
            pool_uuid: [0; 16],
        },
    }
}

/// A fake server on 127.0.0.1:0 (its region a file in `dir`). Each connection answers the
/// handshake and the region request itself and every other request with what the
/// connection's `answer` (made by `per_conn` at accept) returns — `None` closes the
/// connection — and calls `sent` with each reply's message type once it is written.
fn fake_server<A>(
    dir: &std::path::Path,
    tag: &'static str,
    per_conn: impl Fn() -> A + Send + 'static,
    sent: impl Fn(u16) + Send + Sync + 'static,
) -> String
where
    A: FnMut(u16) -> Option<Response> + Send + 'static,
{
    let region = fake_region(dir, tag);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp://{}", listener.local_addr().unwrap());
    let sent = Arc::new(sent);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let (region, sent, mut answer) = (region.clone(), sent.clone(), per_conn());
            std::thread::spawn(move || {
                // One buffer for the connection: pipelined requests arrive in one read.
                let mut rx = maru_transport::FrameBuf::new();
                while let Ok((h, _)) = rx.read_frame(&mut s) {
                    let resp = match h.msg_type {
                        msg_type::HELLO => Response::HelloOk(HelloOk {
                            server: tag.into(),
                            hostname: tag.into(),
                            session_token: [2; 16],
                            index: None,
                        }),
                        msg_type::REQUEST_REGION => Response::Region(region.clone()),
                        t => match answer(t) {
                            Some(r) => r,
                            None => return,
                        },
                    };
                    let mut out = Vec::new();
                    encode_response(&mut out, h.request_id, &resp).unwrap();
                    if s.write_all(&out).is_err() {
                        return;
                    }
                    sent(h.msg_type);
                }
            });
        }
    });
    url
}

/// A fake server whose first `exists` is answered only after `delay`, every later one at
/// once; it counts its connections and says when the late reply has been sent.
pub fn late_server(
    dir: &std::path::Path,
    delay: Duration,
) -> (String, Arc<AtomicUsize>, Arc<AtomicBool>) {
    let conns = Arc::new(AtomicUsize::new(0));
    let late_sent = Arc::new(AtomicBool::new(false));
    let (counter, sent) = (conns.clone(), late_sent.clone());
    let url = fake_server(
        dir,
        "late",
        move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut first_exists = true;
            move |t| {
                Some(match t {
                    msg_type::EXISTS if first_exists => {
                        first_exists = false;
                        std::thread::sleep(delay);
                        Response::Bool(true)
                    }
                    msg_type::EXISTS => Response::Bool(false),
                    _ => Response::Ok,
                })
            }
        },
        move |t| {
            if t == msg_type::EXISTS {
                sent.store(true, Ordering::SeqCst);
            }
        },
    );
    (url, conns, late_sent)
}

/// A fake server that closes the connection on `exists` (a server going away under a pooled
/// connection). The region is a file in `dir`.
pub fn closing_server(dir: &std::path::Path) -> String {
    fake_server(
        dir,
        "closing",
        || |t| (t != msg_type::EXISTS).then_some(Response::Ok),
        |_| {},
    )
}

/// A fake server that answers the handshake and then never replies.
pub fn stalled_server() -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp://{}", listener.local_addr().unwrap());
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let (h, _) = maru_transport::read_frame(&mut s).unwrap();
        let mut out = Vec::new();
        encode_response(
            &mut out,
            h.request_id,
            &Response::HelloOk(HelloOk {
                server: "stall".into(),
                hostname: "stall".into(),
                session_token: [1; 16],
                index: None,
            }),
        )
        .unwrap();
        s.write_all(&out).unwrap();
        // Swallow whatever comes next, never answer; end when the client hangs up.
        let mut sink = [0u8; 1024];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    (url, t)
}

/// A fake server that holds every `exists` for `delay` and then closes the connection (a
/// server dying with calls in flight); counts its connections.
pub fn dying_server(dir: &std::path::Path, delay: Duration) -> (String, Arc<AtomicUsize>) {
    let conns = Arc::new(AtomicUsize::new(0));
    let counter = conns.clone();
    let url = fake_server(
        dir,
        "dying",
        move || {
            counter.fetch_add(1, Ordering::SeqCst);
            move |t| {
                if t == msg_type::EXISTS {
                    std::thread::sleep(delay);
                    return None;
                }
                Some(Response::Ok)
            }
        },
        |_| {},
    );
    (url, conns)
}
