//! Arbitrary bytes into the resource manager's checkpoint decoder
//! (`maru_resource_manager::decode_checkpoint`), which start-up runs before anything else.
//!
//! Two modes, chosen by the first byte (the rest is the input): the bytes as they are, or the bytes as a checkpoint body
//! wrapped in a valid header (magic, version, length, CRC-32), so the fuzzer reaches the body
//! decoder. Nothing may panic or reserve memory a lying count asks for; a checkpoint that
//! decodes must be canonical (it re-encodes to the same bytes).

#![no_main]

use libfuzzer_sys::fuzz_target;
use maru_resource_manager::checkpoint::{CHECKPOINT_MAGIC, CHECKPOINT_VERSION};
use maru_resource_manager::{decode_checkpoint, encode_checkpoint};

fn wrap(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + body.len());
    out.extend_from_slice(&CHECKPOINT_MAGIC.to_le_bytes());
    out.extend_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn check(bytes: &[u8]) {
    let Ok(c) = decode_checkpoint(bytes) else {
        return;
    };
    let again = encode_checkpoint(&c).expect("a decoded checkpoint re-encodes");
    // The current version is canonical; an older one re-encodes to the same table.
    if bytes[4..8] == CHECKPOINT_VERSION.to_le_bytes() {
        assert_eq!(again, bytes, "checkpoint not canonical");
    } else {
        assert_eq!(decode_checkpoint(&again).ok(), Some(c), "an old checkpoint changed");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        check(&wrap(rest));
    } else {
        check(rest);
    }
});
