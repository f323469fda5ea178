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
            Response::HelloOk(HelloOk { server: name.clone(), hostname: name.clone(), session_token: [7; 16], index: Some(maru_proto::IndexInfo { path: name.clone(), namespace: 9 }) }),
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
    for regions in [vec![], vec![1, u64::MAX]] {
        roundtrip_request(&Request::Resume {
            hello: hello.clone(),
            regions,
        });
    }
    for index in [
        None,
        Some(IndexInfo {
            path: "/dev/shm/ix".into(),
            namespace: 3,
        }),
    ] {
        roundtrip_response(Response::Resumed {
            refused: vec![4],
            hello: HelloOk {
                server: "s".into(),
                hostname: "h".into(),
                session_token: [5; SESSION_TOKEN_LEN],
                index,
            },
        });
    }
}
