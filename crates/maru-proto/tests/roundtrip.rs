//! Every message type survives encode → decode unchanged (property test), and hostile bytes
//! give typed errors, never panics.

use maru_proto::*;
use proptest::prelude::*;

fn key() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..64)
}
fn keys() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(key(), 0..20)
}
fn s() -> impl Strategy<Value = String> {
    "[a-z0-9/:._-]{0,40}"
}
fn handle() -> impl Strategy<Value = Handle> {
    (
        any::<u64>(),
        s(),
        any::<u64>(),
        any::<u64>(),
        s(),
        any::<[u8; 32]>(),
    )
        .prop_map(|(region_id, pool, offset, len, owner, token)| Handle {
            region_id,
            pool,
            offset,
            len,
            owner,
            token,
        })
}
fn region() -> impl Strategy<Value = RegionInfo> {
    (
        handle(),
        s(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<[u8; 16]>(),
    )
        .prop_map(
            |(handle, path, offset, len, page_size, pool_uuid)| RegionInfo {
                handle,
                access: Access {
                    path,
                    offset,
                    len,
                    page_size,
                    pool_uuid,
                },
            },
        )
}
fn delete_status() -> impl Strategy<Value = DeleteStatus> {
    prop_oneof![
        Just(DeleteStatus::NotFound),
        Just(DeleteStatus::Deleted),
        Just(DeleteStatus::Pinned)
    ]
}

fn roundtrip_request(req: &Request) {
    let mut buf = Vec::new();
    encode_request(&mut buf, 42, req).unwrap();
    let frame = decode_frame(&buf).unwrap();
    assert_eq!(frame.header.request_id, 42);
    assert_eq!(&frame.body, &Body::Request(req.clone()));
}

fn roundtrip_response(resp: Response) {
    let mut buf = Vec::new();
    encode_response(&mut buf, u64::MAX, &resp).unwrap();
    let frame = decode_frame(&buf).unwrap();
    assert_eq!(frame.header.request_id, u64::MAX);
    assert_eq!(frame.body, Body::Response(resp));
}

fn refs(v: &[Vec<u8>]) -> Vec<&[u8]> {
    v.iter().map(|k| k.as_slice()).collect()
}

proptest! {
    #[test]
    fn requests_roundtrip(k in key(), ks in keys(), h in handle(), n in any::<u64>(), m in any::<u64>(),
                          name in s(), pid in any::<u32>(), tok in proptest::option::of(any::<[u8; 16]>())) {
        let ks = refs(&ks);
        let entries: Vec<RegisterEntry> = ks.iter().map(|k| RegisterEntry { key: k, region_id: n, offset: m, len: n ^ m }).collect();
        let all = vec![
            Request::Hello(Hello { role: Role::Client, instance_id: &name, host: &name, pid, start_time: n, session_token: tok, namespace: if n % 2 == 0 { "" } else { &name } }),
            Request::Hello(Hello { role: Role::Admin, instance_id: "", host: "h", pid, start_time: 0, session_token: None, namespace: "" }),
            Request::Heartbeat, Request::Goodbye,
            Request::RmAlloc { size: n, pool: Some(&name) }, Request::RmAlloc { size: m, pool: None },
            Request::RmFree { handle: h.clone() }, Request::RmGetAccess { handle: h.clone() },
            Request::RmStats, Request::RmList,
            Request::RequestRegion { size: n }, Request::ReturnRegion { region_id: m },
            Request::MakeRoom { pages: n as u32 },
            Request::Register(RegisterEntry { key: &k, region_id: n, offset: m, len: 7 }),
            Request::BatchRegister(entries),
            Request::Lookup { key: &k }, Request::BatchLookup { keys: ks.clone() },
            Request::Exists { key: &k }, Request::BatchExists { keys: ks.clone() },
            Request::Delete { key: &k }, Request::BatchDelete { keys: ks.clone() },
            Request::Pin { key: &k }, Request::BatchPin { keys: ks.clone() },
            Request::Unpin { key: &k }, Request::BatchUnpin { keys: ks.clone() },
            Request::ListAllocations, Request::Stats, Request::GetRegion { region_id: n }, Request::ListRegions,
            Request::Descriptor { region_id: n, writable: m % 2 == 0 },
            Request::Touch { keys: ks.clone() },
            Request::Hit { hits: ks.iter().map(|&key| KeyCount { key, count: (n as u32).max(1) }).collect() },
            Request::Ahead { in_us: 250 },
        ];
        for req in &all {
            roundtrip_request(req);
        }
    }

    #[test]
    fn responses_roundtrip(h in handle(), r in region(), regions in proptest::collection::vec(region(), 1..4),
                           bools in proptest::collection::vec(any::<bool>(), 0..50), name in s(),
                           n in any::<u64>(), st in delete_status(),
                           sts in proptest::collection::vec(delete_status(), 0..20),
                           slots in proptest::collection::vec(proptest::option::of((0u32..1, any::<u64>(), any::<u64>())), 0..20)) {
        let code = ErrorCode::all()[(n as usize) % ErrorCode::all().len()];
        let entries = slots.into_iter().map(|o| o.map(|(region_index, offset, len)| Slot { region_index, offset, len, generation: offset + 1 })).collect();
        let all = vec![
            Response::HelloOk(HelloOk { server: name.clone(), hostname: name.clone(), session_token: [7; 16], index: None }),
            Response::HelloOk(HelloOk { server: name.clone(), hostname: name.clone(), session_token: [7; 16], index: Some(maru_proto::IndexInfo { path: name.clone(), namespace: 9, lane: None }) }),
            Response::Ok,
            Response::Error(WireError::new(code, name.clone())),
            Response::Handle(h.clone()),
            Response::Access(r.access.clone()),
            Response::RmStats(format!("{{\"x\":\"{name}\"}}")),
            Response::RmAllocations(vec![RmAllocation { handle: h.clone(), owner_host: name.clone(), owner_pid: 3, owner_start_time: n, connected: true }]),
            Response::Region(r.clone()),
            Response::Bool(n % 2 == 0),
            Response::Bools(bools),
            Response::Lookup(Some(Location { region: r.clone(), offset: n, len: 9, generation: n + 7 })),
            Response::Lookup(None),
            Response::BatchLookup { regions, entries },
            Response::Delete(st),
            Response::BatchDelete(sts),
            Response::Allocations(vec![RegionRecord { handle: h, instance_id: name.clone(), ref_count: n, owner_connected: false }]),
            Response::Stats(name),
            Response::Regions(vec![r]),
            Response::Descriptor { offset: n, len: n ^ 1, writable: n % 2 == 1 },
        ];
        for resp in all {
            roundtrip_response(resp);
        }
    }

    /// Arbitrary bytes after a valid header never panic the decoder.
    #[test]
    fn garbage_payloads_are_errors_not_panics(t in any::<u16>(), flags in 0u16..4, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut buf = Header::new(t, flags, 1, payload.len() as u32).encode().to_vec();
        buf.extend_from_slice(&payload);
        let _ = decode_frame(&buf);
    }

    /// Any prefix of a valid frame is reported as truncated.
    #[test]
    fn truncated_frames_are_reported(ks in keys(), cut in any::<prop::sample::Index>()) {
        let ks = refs(&ks);
        let mut buf = Vec::new();
        encode_request(&mut buf, 1, &Request::BatchExists { keys: ks }).unwrap();
        let cut = cut.index(buf.len());
        prop_assert!(decode_frame(&buf[..cut]).is_err());
    }
}

#[test]
fn limits_are_enforced_on_both_sides() {
    let long = vec![0u8; MAX_KEY_LEN + 1];
    let mut buf = Vec::new();
    assert!(matches!(
        encode_request(&mut buf, 1, &Request::Exists { key: &long }),
        Err(EncodeError::TooLong { what: "key", .. })
    ));
    assert!(
        buf.is_empty(),
        "a failed encode leaves the buffer as it was"
    );

    // Hand-made frame with an oversized key length.
    let mut payload = Vec::new();
    payload.extend_from_slice(&((MAX_KEY_LEN + 1) as u32).to_le_bytes());
    payload.extend_from_slice(&long);
    let mut frame = Header::new(msg_type::EXISTS, 0, 5, payload.len() as u32)
        .encode()
        .to_vec();
    frame.extend_from_slice(&payload);
    let err = decode_frame(&frame).unwrap_err();
    assert_eq!(err.code(), ErrorCode::KeyTooLong);

    // A batch count above the limit.
    let mut frame = Header::new(msg_type::BATCH_EXISTS, 0, 5, 4)
        .encode()
        .to_vec();
    frame.extend_from_slice(&((MAX_BATCH + 1) as u32).to_le_bytes());
    assert_eq!(
        decode_frame(&frame).unwrap_err().code(),
        ErrorCode::BatchTooLarge
    );

    // A count that lies about the bytes behind it must not allocate.
    let mut frame = Header::new(msg_type::BATCH_EXISTS, 0, 5, 4)
        .encode()
        .to_vec();
    frame.extend_from_slice(&(MAX_BATCH as u32).to_le_bytes());
    assert!(matches!(
        decode_frame(&frame),
        Err(DecodeError::Truncated { .. })
    ));

    // Oversized frame length in the header.
    let frame = Header::new(msg_type::STATS, 0, 5, MAX_FRAME + 1).encode();
    assert_eq!(
        Header::decode(&frame).unwrap_err().code(),
        ErrorCode::FrameTooLarge
    );
}

#[test]
fn wrong_magic_version_and_type_are_typed() {
    let mut buf = Vec::new();
    encode_request(&mut buf, 9, &Request::Heartbeat).unwrap();
    let mut bad = buf.clone();
    bad[0] ^= 0xff;
    assert!(matches!(decode_frame(&bad), Err(DecodeError::BadMagic(_))));

    let mut v2 = buf.clone();
    v2[4] = (PROTOCOL_VERSION + 1) as u8;
    let err = decode_frame(&v2).unwrap_err();
    assert_eq!(
        err,
        DecodeError::UnsupportedVersion {
            got: PROTOCOL_VERSION + 1,
            ours: PROTOCOL_VERSION
        }
    );
    // The request id is still readable, so the refusal can be matched to the request.
    assert_eq!(Header::decode(&v2).unwrap().request_id, 9);

    let unknown = Header::new(0x7777, 0, 1, 0).encode();
    assert_eq!(
        decode_frame(&unknown).unwrap_err(),
        DecodeError::UnknownMessage(0x7777)
    );
}

#[test]
fn resume_and_its_answer_roundtrip_with_and_without_an_index() {
    let hello = Hello {
        role: Role::Client,
        instance_id: "inst",
        host: "h",
        pid: 7,
        start_time: 9,
        session_token: Some([5; SESSION_TOKEN_LEN]),
        namespace: "tenant",
    };
    let pins = [
        ResumePin {
            key: b"a",
            count: 1,
        },
        ResumePin {
            key: b"",
            count: u32::MAX,
        },
    ];
    let holds = [ResumeHold {
        key: b"k",
        page: PageRef {
            region_id: 3,
            offset: 8192,
        },
        generation: 11,
        count: 2,
    }];
    for (regions, pins, holds) in [
        (vec![], vec![], vec![]),
        (vec![1, u64::MAX], pins.to_vec(), holds.to_vec()),
    ] {
        roundtrip_request(&Request::Resume {
            hello: hello.clone(),
            regions,
            pins,
            holds,
        });
    }
    for index in [
        None,
        Some(IndexInfo {
            path: "/dev/shm/ix".into(),
            namespace: 3,
            lane: None,
        }),
        Some(IndexInfo {
            path: "/dev/shm/ix".into(),
            namespace: 3,
            lane: Some(maru_proto::LaneInfo {
                path: "/dev/shm/ix.holds".into(),
                lane: 17,
                tag: 255,
            }),
        }),
    ] {
        roundtrip_response(Response::Resumed {
            refused: vec![4],
            refused_pins: vec![0, 7],
            refused_holds: vec![(MAX_BATCH - 1) as u32],
            hello: HelloOk {
                server: "s".into(),
                hostname: "h".into(),
                session_token: [5; SESSION_TOKEN_LEN],
                index,
            },
        });
    }
}

/// A resume frame with the given claim lists, bytes as they are.
fn resume_frame(pins: &[u8], holds: &[u8]) -> Vec<u8> {
    let hello = Hello::sessionless(Role::Client, "h", 1, 2);
    let mut buf = Vec::new();
    encode_request(
        &mut buf,
        1,
        &Request::Resume {
            hello,
            regions: vec![],
            pins: vec![],
            holds: vec![],
        },
    )
    .unwrap();
    // The two empty lists are the payload's last eight bytes.
    buf.truncate(buf.len() - 8);
    buf.extend_from_slice(pins);
    buf.extend_from_slice(holds);
    let len = (buf.len() - HEADER_LEN) as u32;
    buf[20..24].copy_from_slice(&len.to_le_bytes());
    buf
}

fn list(items: &[&[u8]]) -> Vec<u8> {
    let mut out = (items.len() as u32).to_le_bytes().to_vec();
    for i in items {
        out.extend_from_slice(i);
    }
    out
}

fn pin_bytes(key: &[u8], count: u32) -> Vec<u8> {
    let mut out = (key.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(key);
    out.extend_from_slice(&count.to_le_bytes());
    out
}

fn hold_bytes(key: &[u8], region: u64, offset: u64, generation: u64, count: u32) -> Vec<u8> {
    let mut out = (key.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(key);
    for v in [region, offset, generation] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&count.to_le_bytes());
    out
}

#[test]
fn hits_are_counted_at_least_once_each() {
    let frame = |hits: &[u8]| {
        let mut payload = hits.to_vec();
        let mut buf = Vec::new();
        encode_request(&mut buf, 3, &Request::Hit { hits: vec![] }).unwrap();
        buf.truncate(buf.len() - 4);
        buf.append(&mut payload);
        let len = (buf.len() - HEADER_LEN) as u32;
        buf[20..24].copy_from_slice(&len.to_le_bytes());
        buf
    };
    match decode_frame(&frame(&list(&[&pin_bytes(b"k", 3)])))
        .unwrap()
        .body
    {
        Body::Request(Request::Hit { hits }) => {
            assert_eq!(
                hits,
                [KeyCount {
                    key: b"k",
                    count: 3
                }]
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        decode_frame(&frame(&list(&[&pin_bytes(b"k", 0)]))).unwrap_err(),
        DecodeError::InvalidField("hit count")
    );
}

#[test]
fn malformed_resume_claims_are_typed_errors() {
    let none = list(&[]);
    let good_pin = pin_bytes(b"k", 2);
    let good_hold = hold_bytes(b"k", 1, 0, 5, 1);
    // The hand-made frame decodes when its claims are well formed.
    match decode_frame(&resume_frame(&list(&[&good_pin]), &list(&[&good_hold])))
        .unwrap()
        .body
    {
        Body::Request(Request::Resume { pins, holds, .. }) => {
            assert_eq!(
                pins,
                [ResumePin {
                    key: b"k",
                    count: 2
                }]
            );
            assert_eq!(
                holds[0].page,
                PageRef {
                    region_id: 1,
                    offset: 0
                }
            );
            assert_eq!((holds[0].generation, holds[0].count), (5, 1));
        }
        other => panic!("{other:?}"),
    }
    let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
        (
            "a pin counted zero times",
            resume_frame(&list(&[&pin_bytes(b"k", 0)]), &none),
            DecodeError::InvalidField("pin count"),
        ),
        (
            "a hold counted zero times",
            resume_frame(&none, &list(&[&hold_bytes(b"k", 1, 0, 5, 0)])),
            DecodeError::InvalidField("hold count"),
        ),
        (
            "a pin's key over the limit",
            resume_frame(&list(&[&pin_bytes(&[0; MAX_KEY_LEN + 1], 1)]), &none),
            DecodeError::TooLong {
                what: "key",
                len: MAX_KEY_LEN + 1,
                max: MAX_KEY_LEN,
            },
        ),
        (
            "more holds than a batch",
            resume_frame(&none, &((MAX_BATCH + 1) as u32).to_le_bytes()),
            DecodeError::TooLong {
                what: "batch",
                len: MAX_BATCH + 1,
                max: MAX_BATCH,
            },
        ),
        (
            "a pin count that lies about the bytes behind it",
            resume_frame(&(MAX_BATCH as u32).to_le_bytes(), &none),
            DecodeError::Truncated {
                needed: MAX_BATCH * 8,
                got: 4,
            },
        ),
        (
            "a hold cut short",
            resume_frame(&none, &list(&[&good_hold[..good_hold.len() - 2], &[0; 33]])),
            DecodeError::Truncated { needed: 4, got: 3 },
        ),
        (
            "the hold list missing",
            resume_frame(&none, &[]),
            DecodeError::Truncated { needed: 4, got: 0 },
        ),
    ];
    for (what, frame, want) in cases {
        assert_eq!(decode_frame(&frame).unwrap_err(), want, "{what}");
    }
    // Two more bytes than the lists: trailing bytes are refused, not ignored.
    let mut long = resume_frame(&none, &none);
    long.extend_from_slice(&[0, 0]);
    let len = (long.len() - HEADER_LEN) as u32;
    long[20..24].copy_from_slice(&len.to_le_bytes());
    assert_eq!(
        decode_frame(&long).unwrap_err(),
        DecodeError::TrailingBytes(2)
    );
}

#[test]
fn refused_claim_positions_are_ascending_and_in_range() {
    let answer = |pins: &[u32]| {
        let mut buf = Vec::new();
        encode_response(
            &mut buf,
            1,
            &Response::Resumed {
                refused: vec![],
                refused_pins: pins.to_vec(),
                refused_holds: vec![],
                hello: HelloOk {
                    server: "s".into(),
                    hostname: "h".into(),
                    session_token: [1; SESSION_TOKEN_LEN],
                    index: None,
                },
            },
        )
        .unwrap();
        decode_frame(&buf).map(|_| ())
    };
    assert!(answer(&[0, 1, 4095]).is_ok());
    for bad in [&[3, 3][..], &[4, 2], &[MAX_BATCH as u32]] {
        assert_eq!(
            answer(bad).unwrap_err(),
            DecodeError::InvalidField("claim position"),
            "{bad:?}"
        );
    }
}
