//! Malformed input against both real daemons (`maru-resource-manager`, `maru-server`):
//! garbage, truncated frames, oversized frames, a wrong version, unknown messages, requests
//! before the handshake, valid frames with invalid fields, slow-loris partial frames, and
//! connection floods beyond `--max-clients`. Each probe's observed outcome is printed as a row
//! of the table in docs/RELIABILITY.md and checked against what is expected; after all of
//! them the daemons are alive, their state is unchanged and a normal client is served.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use maru_client::MaruHandler;
use maru_faults::{observable_state, small_handler, wait_until, MIB};
use maru_proto::{
    decode_response, msg_type, Header, Hello, Request, Response, Role, FLAG_RESPONSE, HEADER_LEN,
    MAX_BATCH, MAX_FRAME, MAX_KEY_LEN, MAX_STRING_LEN, PROTOCOL_VERSION,
};
use maru_testkit::wire::{header, request};
use maru_testkit::{BinaryCluster, ClusterOpts};

/// How long a probe waits for an answer (or the close) before calling the peer silent.
const QUIET: Duration = Duration::from_millis(1500);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Daemon {
    Rm,
    Server,
}

impl Daemon {
    fn name(self) -> &'static str {
        match self {
            Daemon::Rm => "maru-resource-manager",
            Daemon::Server => "maru-server",
        }
    }
    fn addr(self, c: &BinaryCluster) -> String {
        match self {
            Daemon::Rm => c.rm_addr(),
            Daemon::Server => c.server_addr(),
        }
    }
    fn role(self) -> Role {
        match self {
            Daemon::Rm => Role::Server,
            Daemon::Server => Role::Client,
        }
    }
}

fn hello(d: Daemon, instance: &str) -> Vec<u8> {
    request(
        1,
        &Request::Hello(Hello {
            role: d.role(),
            instance_id: instance,
            host: "probe",
            pid: std::process::id(),
            start_time: 0,
            session_token: None,
            namespace: "",
        }),
    )
}

/// What came back.
fn observe(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(QUIET)).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let started = Instant::now();
    loop {
        if buf.len() >= HEADER_LEN {
            if let Ok(h) = Header::decode(&buf) {
                let end = HEADER_LEN + h.payload_len as usize;
                if buf.len() >= end {
                    let what = match decode_response(&h, &buf[HEADER_LEN..end]) {
                        Ok(Response::Error(e)) => format!("error {:?}", e.code),
                        Ok(other) => format!("{:?}", std::mem::discriminant(&other))
                            .replace("Discriminant", "reply"),
                        Err(e) => format!("undecodable reply: {e}"),
                    };
                    // Is the connection still open afterwards?
                    s.set_read_timeout(Some(Duration::from_millis(300)))
                        .unwrap();
                    let after = match s.read(&mut chunk) {
                        Ok(0) => "connection closed",
                        Ok(_) => "more bytes",
                        Err(_) => "connection kept",
                    };
                    return format!("{what} (request id {}), {after}", h.request_id);
                }
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                return format!(
                    "closed without a reply after {} ms",
                    started.elapsed().as_millis()
                )
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return "no reply, connection kept open".into()
            }
            Err(e) => return format!("connection reset ({e})"),
        }
    }
}

/// Connects, optionally says hello, sends `bytes` (then half-closes if asked), observes.
fn probe(addr: &str, d: Daemon, handshake: bool, bytes: &[u8], half_close: bool) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    if handshake {
        s.write_all(&hello(d, "probe")).unwrap();
        let got = observe(&mut s);
        assert!(got.starts_with("reply"), "hello refused: {got}");
    }
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    observe(&mut s)
}

struct Case {
    input: &'static str,
    handshake: bool,
    bytes: Vec<u8>,
    half_close: bool,
    /// A substring the observed outcome must contain.
    expect: &'static str,
}

fn case(input: &'static str, handshake: bool, bytes: Vec<u8>, expect: &'static str) -> Case {
    Case {
        input,
        handshake,
        bytes,
        half_close: false,
        expect,
    }
}

fn cases(d: Daemon) -> Vec<Case> {
    let mut garbage = vec![0u8; 64];
    for (i, b) in garbage.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(151).wrapping_add(7);
    }
    let exists = request(2, &Request::Exists { key: b"k" });
    let stats = request(
        2,
        match d {
            Daemon::Rm => &Request::RmStats,
            Daemon::Server => &Request::Stats,
        },
    );
    let mut bad_role = hello(d, "probe");
    bad_role[HEADER_LEN] = 9;
    let mut wrong_version = hello(d, "probe");
    wrong_version[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
    let mut trailing = stats.clone();
    trailing.extend_from_slice(&[0, 0, 0]);
    let plen = (trailing.len() - HEADER_LEN) as u32;
    trailing[20..24].copy_from_slice(&plen.to_le_bytes());
    let mut as_response = stats.clone();
    as_response[8..10].copy_from_slice(&FLAG_RESPONSE.to_le_bytes());
    let mut truncated_payload = header(PROTOCOL_VERSION, msg_type::EXISTS, 0, 3, 100);
    truncated_payload.extend_from_slice(&[1; 10]);
    // A key one byte over the limit, and a batch one item over it, spelled out on the wire
    // (the encoder refuses to produce them).
    let long_key = {
        let mut p = Vec::new();
        p.extend_from_slice(&((MAX_KEY_LEN + 1) as u32).to_le_bytes());
        p.extend(std::iter::repeat_n(b'k', MAX_KEY_LEN + 1));
        let mut f = header(PROTOCOL_VERSION, msg_type::EXISTS, 0, 4, p.len() as u32);
        f.extend(p);
        f
    };
    let big_batch = {
        let mut p = Vec::new();
        p.extend_from_slice(&((MAX_BATCH + 1) as u32).to_le_bytes());
        for _ in 0..=MAX_BATCH {
            p.extend_from_slice(&1u32.to_le_bytes());
            p.push(b'k');
        }
        let mut f = header(
            PROTOCOL_VERSION,
            msg_type::BATCH_EXISTS,
            0,
            5,
            p.len() as u32,
        );
        f.extend(p);
        f
    };
    let long_pool = "p".repeat(MAX_STRING_LEN + 1);
    let mut v = vec![
        case(
            "64 bytes of garbage",
            false,
            garbage,
            "error BadFrame (request id 0), connection closed",
        ),
        Case {
            half_close: true,
            ..case(
                "10 bytes of a header, then EOF",
                false,
                hello(d, "x")[..10].to_vec(),
                "closed without a reply",
            )
        },
        Case {
            half_close: true,
            ..case(
                "header announcing 100 bytes, 10 sent, then EOF",
                true,
                truncated_payload,
                "closed without a reply",
            )
        },
        case(
            "header announcing MAX_FRAME + 1 bytes",
            true,
            header(PROTOCOL_VERSION, msg_type::EXISTS, 0, 6, MAX_FRAME + 1),
            "error FrameTooLarge (request id 0), connection closed",
        ),
        case(
            "hello with the next protocol version",
            false,
            wrong_version,
            "error UnsupportedVersion (request id 1)",
        ),
        case(
            "hello with role 9",
            false,
            bad_role,
            "error BadFrame (request id 1)",
        ),
        case(
            "request before the hello",
            false,
            stats.clone(),
            "error NotHandshaken (request id 2), connection kept",
        ),
        case(
            "unknown message type 0x7777",
            true,
            header(PROTOCOL_VERSION, 0x7777, 0, 7, 0),
            "error UnknownMessage (request id 7), connection kept",
        ),
        case(
            "payload with 3 trailing bytes",
            true,
            trailing,
            "error BadFrame (request id 2), connection kept",
        ),
        case(
            "a response frame sent as a request",
            true,
            as_response,
            "error",
        ),
        case(
            "reserved header bits set",
            true,
            header(PROTOCOL_VERSION, msg_type::STATS, 0x80, 8, 0),
            "error BadFrame (request id 0), connection closed",
        ),
        case(
            "second hello on a handshaken connection",
            true,
            hello(d, "again"),
            "error",
        ),
    ];
    match d {
        Daemon::Server => v.extend([
            case(
                "key of MAX_KEY_LEN + 1 bytes",
                true,
                long_key,
                "error KeyTooLong (request id 4), connection kept",
            ),
            case(
                "batch of MAX_BATCH + 1 keys",
                true,
                big_batch,
                "error BatchTooLarge (request id 5), connection kept",
            ),
            case(
                "register into a region that does not exist",
                true,
                request(
                    9,
                    &Request::Register(maru_proto::RegisterEntry {
                        key: b"k",
                        region_id: 987_654,
                        offset: 0,
                        len: 1,
                    }),
                ),
                "error UnknownRegion (request id 9), connection kept",
            ),
            case(
                "request_region of 0 bytes",
                true,
                request(10, &Request::RequestRegion { size: 0 }),
                "error InvalidArgument (request id 10), connection kept",
            ),
            case(
                "request_region of 2^63 bytes",
                true,
                request(11, &Request::RequestRegion { size: 1 << 63 }),
                "error PoolExhausted (request id 11), connection kept",
            ),
            case(
                "a resource-manager request (rm_alloc)",
                true,
                request(
                    12,
                    &Request::RmAlloc {
                        size: MIB,
                        pool: None,
                    },
                ),
                "error UnknownMessage (request id 12), connection kept",
            ),
            case(
                "exists before the hello",
                false,
                exists,
                "error NotHandshaken",
            ),
        ]),
        Daemon::Rm => v.extend([
            case(
                "rm_alloc naming a pool of MAX_STRING_LEN + 1 bytes",
                true,
                {
                    let mut p = Vec::new();
                    p.extend_from_slice(&MIB.to_le_bytes());
                    p.push(1);
                    p.extend_from_slice(&(long_pool.len() as u32).to_le_bytes());
                    p.extend_from_slice(long_pool.as_bytes());
                    let mut f = header(PROTOCOL_VERSION, msg_type::RM_ALLOC, 0, 13, p.len() as u32);
                    f.extend(p);
                    f
                },
                "error BadFrame (request id 13), connection kept",
            ),
            case(
                "rm_alloc of 0 bytes",
                true,
                request(
                    14,
                    &Request::RmAlloc {
                        size: 0,
                        pool: None,
                    },
                ),
                "error InvalidArgument (request id 14), connection kept",
            ),
            case(
                "rm_alloc of 2^63 bytes",
                true,
                request(
                    15,
                    &Request::RmAlloc {
                        size: 1 << 63,
                        pool: None,
                    },
                ),
                "error PoolExhausted (request id 15), connection kept",
            ),
            case(
                "rm_alloc from a pool that does not exist",
                true,
                request(
                    16,
                    &Request::RmAlloc {
                        size: MIB,
                        pool: Some("/nope"),
                    },
                ),
                "error NoSuchPool (request id 16), connection kept",
            ),
            case(
                "rm_free of a forged handle",
                true,
                request(
                    17,
                    &Request::RmFree {
                        handle: maru_proto::Handle {
                            region_id: 1,
                            pool: "p".into(),
                            offset: 0,
                            len: MIB,
                            owner: "x:1".into(),
                            token: [7; 32],
                        },
                    },
                ),
                "error BadToken (request id 17), connection kept",
            ),
            case(
                "a metadata-server request (exists)",
                true,
                exists,
                "error UnknownMessage (request id 2), connection kept",
            ),
        ]),
    }
    v
}

fn normal_client_works(c: &BinaryCluster) {
    let h = small_handler(&c.unix_url());
    h.connect().expect("a normal client connects");
    h.store_bytes(b"normal", b"", b"value").unwrap();
    assert_eq!(h.retrieve(b"normal").unwrap().unwrap().to_vec(), b"value");
    h.delete(b"normal").unwrap();
    h.close();
}

/// A client that owns a region and a key, so that "state unchanged" means something.
fn resident(c: &BinaryCluster) -> MaruHandler {
    let h = small_handler(&c.unix_url());
    h.connect().unwrap();
    h.store_bytes(b"resident", b"", b"stays").unwrap();
    h
}

#[test]
fn malformed_frames_against_both_daemons() {
    let mut c = BinaryCluster::start(ClusterOpts::default());
    let _resident = resident(&c);
    let before = observable_state(&c);
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for d in [Daemon::Rm, Daemon::Server] {
        let addr = d.addr(&c);
        for k in cases(d) {
            let got = probe(&addr, d, k.handshake, &k.bytes, k.half_close);
            if !got.contains(k.expect) {
                failures.push(format!(
                    "{}: {}: expected {:?}, got {got:?}",
                    d.name(),
                    k.input,
                    k.expect
                ));
            }
            rows.push(format!("| {} | {} | {got} |", d.name(), k.input));
            assert!(
                c.rm.is_running() && c.server.is_running(),
                "a daemon died on {:?}",
                k.input
            );
            assert_eq!(
                observable_state(&c),
                before,
                "{}: {} changed state",
                d.name(),
                k.input
            );
        }
    }
    println!(
        "| daemon | input | observed |\n|---|---|---|\n{}",
        rows.join("\n")
    );
    normal_client_works(&c);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!(
        "bad input: {} malformed inputs, daemons alive, state unchanged",
        rows.len()
    );
}

#[test]
fn slow_loris_partial_frames_are_dropped_and_never_block_others() {
    let c = BinaryCluster::start(ClusterOpts::default());
    let targets = [
        (Daemon::Rm, Daemon::Rm.addr(&c)),
        (Daemon::Server, Daemon::Server.addr(&c)),
    ];
    let rows: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = targets
            .iter()
            .map(|(d, addr)| {
                s.spawn(move || {
                    // Hello, then 10 bytes of the next frame, then silence.
                    let mut st = TcpStream::connect(addr).unwrap();
                    st.write_all(&hello(*d, "loris")).unwrap();
                    assert!(observe(&mut st).starts_with("reply"));
                    let started = Instant::now();
                    st.write_all(&request(2, &Request::Heartbeat)[..10])
                        .unwrap();
                    st.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let mut b = [0u8; 64];
                    let r = st.read(&mut b);
                    let took = started.elapsed();
                    let what = match r {
                        Ok(0) => format!("closed after {:.1} s", took.as_secs_f64()),
                        other => format!("{other:?} after {took:?}"),
                    };
                    (*d, what, took)
                })
            })
            .collect();
        // Meanwhile both daemons serve everyone else.
        normal_client_works(&c);
        hs.into_iter()
            .map(|h| {
                let (d, what, took) = h.join().unwrap();
                assert!(what.starts_with("closed"), "{}: {what}", d.name());
                assert!(took < Duration::from_secs(20), "{}: {what}", d.name());
                format!("| {} | hello, then 10 bytes of a frame, then silence | {what}; others served meanwhile |", d.name())
            })
            .collect()
    });
    println!("{}", rows.join("\n"));
}

#[test]
fn connection_floods_beyond_max_clients_are_refused_and_recovered_from() {
    const MAX: usize = 8;
    let c = BinaryCluster::start(ClusterOpts {
        rm_extra: vec!["--max-clients".into(), MAX.to_string()],
        server_extra: vec!["--max-clients".into(), MAX.to_string()],
        ..ClusterOpts::default()
    });
    let mut rows = Vec::new();
    for d in [Daemon::Rm, Daemon::Server] {
        let addr = d.addr(&c);
        // The metadata server holds one connection to the resource manager.
        let room = if d == Daemon::Rm { MAX - 1 } else { MAX };
        let mut held: Vec<TcpStream> = (0..room)
            .map(|i| {
                let mut s = TcpStream::connect(&addr).unwrap();
                s.write_all(&hello(d, &format!("held-{i}"))).unwrap();
                let got = observe(&mut s);
                assert!(
                    got.starts_with("reply"),
                    "{}: connection {i}: {got}",
                    d.name()
                );
                s
            })
            .collect();
        let mut extra = TcpStream::connect(&addr).unwrap();
        extra.write_all(&hello(d, "one-too-many")).unwrap();
        let got = observe(&mut extra);
        assert!(got.contains("TooManyClients"), "{}: {got}", d.name());
        rows.push(format!(
            "| {} | hello on connection {} (--max-clients {MAX}) | {got} |",
            d.name(),
            MAX + 1
        ));

        // A flood: 300 connections at once, each sending a hello and leaving.
        let t = Instant::now();
        let mut refused = 0;
        let flood: Vec<TcpStream> = (0..300)
            .filter_map(|i| {
                let mut s = TcpStream::connect(&addr).ok()?;
                let _ = s.write_all(&hello(d, &format!("flood-{i}")));
                Some(s)
            })
            .collect();
        for mut s in flood {
            if observe_quick(&mut s).contains("TooManyClients") {
                refused += 1;
            }
        }
        rows.push(format!(
            "| {} | 300 connections at once beyond the limit | {refused} answered TooManyClients, the rest closed unanswered; daemon up ({:.1} s) |",
            d.name(),
            t.elapsed().as_secs_f64()
        ));

        // Connections that never say hello hold their slots.
        held.truncate(0);
        let ok = wait_until(Duration::from_secs(5), || {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(&hello(d, "after")).unwrap();
            observe(&mut s).starts_with("reply")
        });
        assert!(ok, "{}: not served after the flood", d.name());
        let silent: Vec<TcpStream> = (0..room)
            .map(|_| TcpStream::connect(&addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200)); // let the daemon accept them all
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&hello(d, "behind-silent")).unwrap();
        let got = observe(&mut s);
        rows.push(format!(
            "| {} | {room} connections that never send a byte, then a real client | {got} |",
            d.name()
        ));
        drop(silent);
        let ok = wait_until(Duration::from_secs(5), || {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(&hello(d, "after-silent")).unwrap();
            observe(&mut s).starts_with("reply")
        });
        assert!(
            ok,
            "{}: not served after the silent connections left",
            d.name()
        );
    }
    normal_client_works(&c);
    println!("{}", rows.join("\n"));
}

fn observe_quick(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut b = [0u8; 256];
    match s.read(&mut b) {
        Ok(n) if n >= HEADER_LEN => match Header::decode(&b[..n]) {
            Ok(h) => match decode_response(
                &h,
                &b[HEADER_LEN..n.min(HEADER_LEN + h.payload_len as usize)],
            ) {
                Ok(Response::Error(e)) => format!("{:?}", e.code),
                Ok(_) => "reply".into(),
                Err(e) => format!("{e}"),
            },
            Err(e) => format!("{e}"),
        },
        Ok(_) => "closed".into(),
        Err(_) => "silent".into(),
    }
}

/// Connections that never send a byte are never dropped, so `--max-clients` of them lock
/// every real client out for as long as they stay open (see the flood test's last row).
#[test]
fn a_connection_that_never_says_hello_is_dropped_after_a_bound() {
    let c = BinaryCluster::start(ClusterOpts::default());
    let addrs = [c.rm_addr(), c.server_addr()];
    std::thread::scope(|s| {
        for addr in &addrs {
            s.spawn(move || {
                let mut st = TcpStream::connect(addr).unwrap();
                st.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                let mut b = [0u8; 16];
                let r = st.read(&mut b);
                assert!(
                    matches!(r, Ok(0)),
                    "{addr}: a silent connection is still open after 15 s ({r:?})"
                );
            });
        }
    });
}
