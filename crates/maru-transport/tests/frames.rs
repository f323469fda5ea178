//! The frame reader: pipelined frames come out of one buffer in order, a frame larger than
//! the buffer grows it (and it shrinks back), and hostile bytes give typed errors, never
//! panics.

use maru_proto::{decode_request, encode_request, Header, Request};
use maru_transport::{FrameBuf, FrameReadError};
use proptest::prelude::*;

fn refs(v: &[Vec<u8>]) -> Vec<&[u8]> {
    v.iter().map(|k| k.as_slice()).collect()
}

proptest! {
    /// Arbitrary bytes after a valid header never panic the reader.
    #[test]
    fn garbage_payloads_are_errors_not_panics(t in any::<u16>(), flags in 0u16..4, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut buf = Header::new(t, flags, 1, payload.len() as u32).encode().to_vec();
        buf.extend_from_slice(&payload);
        let mut fb = FrameBuf::new();
        let _ = fb.read_frame(&mut buf.as_slice());
    }
}

#[test]
fn framebuf_reads_pipelined_frames_from_one_buffer() {
    let mut wire = Vec::new();
    for id in 0..100u64 {
        encode_request(
            &mut wire,
            id,
            &Request::Exists {
                key: format!("k{id}").as_bytes(),
            },
        )
        .unwrap();
    }
    let mut fb = FrameBuf::new();
    let mut src = wire.as_slice();
    for id in 0..100u64 {
        let (h, p) = fb.read_frame(&mut src).unwrap();
        assert_eq!(h.request_id, id);
        assert_eq!(
            decode_request(&h, p).unwrap(),
            Request::Exists {
                key: format!("k{id}").as_bytes()
            }
        );
    }
    assert!(matches!(
        fb.read_frame(&mut src),
        Err(FrameReadError::Closed)
    ));
}

#[test]
fn framebuf_handles_frames_larger_than_its_buffer() {
    let keys: Vec<Vec<u8>> = (0..2000).map(|i| vec![i as u8; 200]).collect();
    let mut wire = Vec::new();
    encode_request(&mut wire, 1, &Request::BatchExists { keys: refs(&keys) }).unwrap();
    encode_request(&mut wire, 2, &Request::Heartbeat).unwrap();
    let mut fb = FrameBuf::new();
    let mut src = wire.as_slice();
    let (h, p) = fb.read_frame(&mut src).unwrap();
    match decode_request(&h, p).unwrap() {
        Request::BatchExists { keys: got } => assert_eq!(got, refs(&keys)),
        other => panic!("unexpected {other:?}"),
    }
    assert!(fb.capacity() > 400_000, "the big frame grew the buffer");
    assert_eq!(fb.read_frame(&mut src).unwrap().0.request_id, 2);
    assert!(
        fb.capacity() <= 64 * 1024,
        "the buffer shrinks once drained"
    );
}
