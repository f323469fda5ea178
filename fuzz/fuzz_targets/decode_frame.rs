//! Arbitrary bytes into the wire decoders: the pure `decode_frame`, and `FrameBuf`, the
//! streaming reader every daemon uses, followed by the request/response decoders exactly as
//! the daemons call them. Nothing may panic or allocate without bound, and whatever decodes
//! must encode back to the same payload (the codec is canonical).

#![no_main]

use libfuzzer_sys::fuzz_target;
use maru_proto::{
    decode_frame, decode_request, decode_response, encode_request, encode_response, Body,
    HEADER_LEN,
};
use maru_transport::FrameBuf;

fn check_canonical(input: &[u8]) {
    let Ok(frame) = decode_frame(input) else {
        return;
    };
    let mut again = Vec::new();
    let id = frame.header.request_id;
    match &frame.body {
        Body::Request(req) => encode_request(&mut again, id, req),
        Body::Response(resp) => encode_response(&mut again, id, resp),
    }
    .expect("a decoded message re-encodes");
    assert_eq!(&again[HEADER_LEN..], &input[HEADER_LEN..], "payload not canonical");
    assert_eq!(&again[..8], &input[..8], "magic, version or type changed");
    assert_eq!(&again[12..], &input[12..], "request id or length changed");
}

fuzz_target!(|data: &[u8]| {
    check_canonical(data);

    let mut reader = FrameBuf::new();
    let mut stream = std::io::Cursor::new(data);
    // Each frame consumes at least a header, so this ends; the bound is belt and braces.
    for _ in 0..data.len() / HEADER_LEN + 1 {
        let Ok((header, payload)) = reader.read_frame(&mut stream) else {
            break;
        };
        if header.is_response() {
            let _ = decode_response(&header, payload);
        } else {
            let _ = decode_request(&header, payload);
        }
    }
});
