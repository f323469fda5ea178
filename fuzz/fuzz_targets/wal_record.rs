//! Arbitrary bytes into the resource manager's write-ahead-log decoder
//! (`maru_resource_manager::decode_wal`), the function start-up runs on whatever a crash left on disk.
//!
//! Two modes, chosen by the first byte (the rest is the input): the bytes as they are (headers, torn tails, damage in the
//! middle), or the bytes cut into records whose checksums are fixed up, so the fuzzer gets
//! past the CRC and into the record bodies. Nothing may panic; a log that decodes must be
//! canonical (its valid prefix re-encodes to the same bytes), the prefix decodes on its own
//! with no torn tail, and a scan without a torn tail covers every byte.

#![no_main]

use libfuzzer_sys::fuzz_target;
use maru_resource_manager::wal::{RECORD_HEADER_LEN, WAL_MAGIC};
use maru_resource_manager::{decode_wal, encode_record};

/// Splits `data` into records: each takes a 1-byte body length, then that many body bytes,
/// and gets a valid header (magic, consecutive sequence, length, CRC-32).
fn with_valid_checksums(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut seq = 1u64;
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let body = &tail[..(n as usize).min(tail.len())];
        rest = &tail[body.len()..];
        let mut h = crc32fast::Hasher::new();
        h.update(&seq.to_le_bytes());
        h.update(&(body.len() as u32).to_le_bytes());
        h.update(body);
        out.extend_from_slice(&WAL_MAGIC.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&h.finalize().to_le_bytes());
        out.extend_from_slice(body);
        seq += 1;
    }
    out
}

fn check(bytes: &[u8]) {
    let Ok(scan) = decode_wal(bytes) else {
        return;
    };
    assert!(scan.valid_len <= bytes.len());
    if scan.torn.is_none() {
        assert_eq!(
            scan.valid_len,
            bytes.len(),
            "no torn tail but bytes left over"
        );
    }
    let mut again = Vec::with_capacity(scan.valid_len);
    for r in &scan.records {
        again.extend(encode_record(r.seq, &r.op).expect("a decoded record re-encodes"));
    }
    assert_eq!(&again[..], &bytes[..scan.valid_len], "log not canonical");
    let prefix = decode_wal(&bytes[..scan.valid_len]).expect("the valid prefix decodes");
    assert_eq!(prefix.records, scan.records);
    assert!(prefix.torn.is_none());
    assert!(scan.records.len() * RECORD_HEADER_LEN <= scan.valid_len);
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        check(&with_valid_checksums(rest));
    } else {
        check(rest);
    }
});
