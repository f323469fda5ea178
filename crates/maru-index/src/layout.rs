//! The file format. Everything in the file is little-endian and 8-byte aligned; offsets are
//! from the start of the file; nothing holds a pointer.
//!
//! ```text
//! 0        header (4 KiB; 128 bytes used)
//!            0  magic "MARUIDX\0"                8  layout version u32   12 header bytes u32
//!           16  bucket count u64                24  slots per bucket u32 28 entry bytes u32
//!           32  inline key bytes u32            36  max key length u32
//!           40  key-bytes area size u64         48  hash seed [u64; 2]
//!           64  file size u64                   72  CRC32 of bytes 0..72
//!          128  epoch        (atomic; odd while a writer is attached: even = shut down cleanly)
//!          136  next generation (atomic; the writer's counter, never reused)
//!          144  live keys    (atomic; for statistics, recomputed at every attach)
//!          152  key area high-water mark in words (atomic; recomputed at every attach)
//! 4096     buckets: one 64-byte line each: 15 tags (u32) + 1 overflow count (u32)
//! ...      entries: 15 per bucket, 64 bytes each, slot s of bucket b at index 15 b + s
//! ...      key-bytes area (from a 4 KiB boundary): keys longer than 16 bytes, zero-padded
//!          to whole words
//! ```
//!
//! **Bucket line.** Tag `t` of slot `s` is 0 when the slot is free, else the key hash's high
//! half with its low bit set (never 0). A lookup reads the tags and looks at an entry only when
//! its tag matches. The overflow count is the number of keys whose home bucket comes before
//! this one in probe order and that sit after it: a lookup that has checked a bucket whose count
//! is 0 knows the key is nowhere further, so the table needs no tombstones and a removed slot
//! is free at once.
//!
//! **Entry** (one cache line, eight words):
//!
//! | word | field | meaning |
//! |---|---|---|
//! | 0 | version | odd while the writer changes the entry; +2 per change, never goes back |
//! | 1 | generation | 0 = empty; else the registration's number, fresh for every insert and update |
//! | 2 | hash | the key's hash (`hash.rs`), which fixes its home bucket and tag |
//! | 3 | namespace (low 32) · key length (high 32) | |
//! | 4 | region (low 32) · length (high 32) | where the bytes are: the server's region number, the byte count |
//! | 5 | offset | byte offset inside the region |
//! | 6, 7 | key | ≤ 16 bytes: the key, zero-padded; longer: word 6 is its word index in the key-bytes area, word 7 its first 8 bytes (so most mismatches never touch the area) |
//!
//! **Budget.** A table created for `capacity` keys has `ceil(capacity / 0.85)` slots rounded
//! up to whole buckets: 64 bytes per slot + 64/15 per slot of bucket lines, at 85 % load
//! 80.3 bytes per key, plus at most 7 bytes of padding of a long key's last word: ≤ 88 bytes
//! per key beyond the key's own bytes (the budget is 100).

use crate::error::ErrorKind;
use crate::header::HeaderFormat;

pub const MAGIC: [u8; 8] = *b"MARUIDX\0";
pub const LAYOUT_VERSION: u32 = 1;
pub const HEADER_BYTES: u64 = 4096;
/// Slots per bucket: 15 tags and the overflow count fill one 64-byte line.
pub const BUCKET_SLOTS: usize = 15;
pub(crate) const BUCKET_WORDS: usize = 16;
pub(crate) const OVERFLOW_WORD: usize = 15;
pub const ENTRY_BYTES: u64 = 64;
pub(crate) const ENTRY_WORDS: usize = 8;
/// Keys up to this long live in their entry.
pub const INLINE_KEY_BYTES: usize = 16;
/// The longest key (the wire protocol's limit).
pub const MAX_KEY_LEN: usize = 1024;
/// A table is sized so that `capacity` keys fill this share of its slots.
pub const TARGET_LOAD_PERCENT: u64 = 85;
/// Inserts are refused beyond this share of slots: past it probe sequences grow quickly.
pub const MAX_LOAD_PERCENT: u64 = 95;

/// Entry word indices.
pub(crate) const W_VERSION: usize = 0;
pub(crate) const W_GENERATION: usize = 1;
pub(crate) const W_HASH: usize = 2;
pub(crate) const W_NS_KEYLEN: usize = 3;
pub(crate) const W_REGION_LEN: usize = 4;
pub(crate) const W_OFFSET: usize = 5;
pub(crate) const W_KEY0: usize = 6;
pub(crate) const W_KEY1: usize = 7;

/// Header word indices (of the header viewed as u64 words) of the fields that change.
pub(crate) const H_EPOCH: usize = 16;
pub(crate) const H_NEXT_GENERATION: usize = 17;
pub(crate) const H_LIVE: usize = 18;
pub(crate) const H_KEY_HIGH: usize = 19;
pub(crate) const HEADER_WORDS: usize = 20;

const CRC_END: usize = 72;
const PAGE: u64 = 4096;

const INDEX_HEADER: HeaderFormat = HeaderFormat {
    magic: MAGIC,
    version: LAYOUT_VERSION,
    header_bytes: HEADER_BYTES,
    crc_end: CRC_END,
};

/// The shape of an index, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub buckets: u64,
    /// Size of the key-bytes area, a multiple of 8.
    pub key_area_bytes: u64,
    pub seed: [u64; 2],
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

impl Geometry {
    /// A geometry for `capacity` keys at [`TARGET_LOAD_PERCENT`] and `key_area_bytes` of long
    /// keys (rounded up to words), with a fresh random seed.
    pub fn for_capacity(capacity: u64, key_area_bytes: u64) -> Result<Geometry, ErrorKind> {
        if capacity == 0 {
            return Err(ErrorKind::InvalidOptions(
                "capacity must be at least 1".into(),
            ));
        }
        let slots = capacity
            .checked_mul(100)
            .map(|v| v.div_ceil(TARGET_LOAD_PERCENT))
            .ok_or_else(|| ErrorKind::InvalidOptions(format!("capacity {capacity}")))?;
        let buckets = slots.div_ceil(BUCKET_SLOTS as u64);
        if buckets > u32::MAX as u64 {
            return Err(ErrorKind::InvalidOptions(format!(
                "capacity {capacity} needs more than 2^32 buckets"
            )));
        }
        let g = Geometry {
            buckets,
            key_area_bytes: round_up(key_area_bytes, 8),
            seed: random_seed(),
        };
        g.file_bytes_checked()
            .ok_or_else(|| ErrorKind::InvalidOptions("the file would be too large".into()))?;
        Ok(g)
    }

    pub fn slots(&self) -> u64 {
        self.buckets * BUCKET_SLOTS as u64
    }
    pub fn buckets_offset(&self) -> u64 {
        HEADER_BYTES
    }
    pub fn entries_offset(&self) -> u64 {
        HEADER_BYTES + self.buckets * 64
    }
    pub fn key_area_offset(&self) -> u64 {
        round_up(self.entries_offset() + self.slots() * ENTRY_BYTES, PAGE)
    }
    pub(crate) fn key_area_words(&self) -> u64 {
        self.key_area_bytes / 8
    }
    fn file_bytes_checked(&self) -> Option<u64> {
        let entries = self.buckets.checked_mul(64 * (1 + BUCKET_SLOTS as u64))?;
        let end = HEADER_BYTES
            .checked_add(entries)?
            .checked_add(PAGE)?
            .checked_add(self.key_area_bytes)?;
        (end < (1 << 50)).then(|| round_up(self.key_area_offset() + self.key_area_bytes, PAGE))
    }
    /// The file's size.
    pub fn file_bytes(&self) -> u64 {
        round_up(self.key_area_offset() + self.key_area_bytes, PAGE)
    }
    /// Most keys the writer accepts ([`MAX_LOAD_PERCENT`] of the slots).
    pub fn max_keys(&self) -> u64 {
        self.slots() * MAX_LOAD_PERCENT / 100
    }

    /// The immutable part of the header, checksum included.
    pub(crate) fn encode(&self) -> [u8; CRC_END + 4] {
        let mut h: [u8; CRC_END + 4] = INDEX_HEADER.begin();
        h[16..24].copy_from_slice(&self.buckets.to_le_bytes());
        h[24..28].copy_from_slice(&(BUCKET_SLOTS as u32).to_le_bytes());
        h[28..32].copy_from_slice(&(ENTRY_BYTES as u32).to_le_bytes());
        h[32..36].copy_from_slice(&(INLINE_KEY_BYTES as u32).to_le_bytes());
        h[36..40].copy_from_slice(&(MAX_KEY_LEN as u32).to_le_bytes());
        h[40..48].copy_from_slice(&self.key_area_bytes.to_le_bytes());
        h[48..56].copy_from_slice(&self.seed[0].to_le_bytes());
        h[56..64].copy_from_slice(&self.seed[1].to_le_bytes());
        h[64..72].copy_from_slice(&self.file_bytes().to_le_bytes());
        INDEX_HEADER.seal(&mut h);
        h
    }

    /// Checks a header read from a file of `file_len` bytes, in the order a reader of a broken
    /// file learns most from: size, magic, version, checksum, then each geometry field.
    pub(crate) fn decode(h: &[u8], file_len: u64) -> Result<Geometry, ErrorKind> {
        let f = INDEX_HEADER.check(h, file_len)?;
        let (u32_at, u64_at) = (|o| f.u32_at(o), |o| f.u64_at(o));
        let fixed = [
            ("slots per bucket", u32_at(24) as u64, BUCKET_SLOTS as u64),
            ("entry bytes", u32_at(28) as u64, ENTRY_BYTES),
            (
                "inline key bytes",
                u32_at(32) as u64,
                INLINE_KEY_BYTES as u64,
            ),
            ("max key length", u32_at(36) as u64, MAX_KEY_LEN as u64),
        ];
        for (what, found, expected) in fixed {
            if found != expected {
                return Err(ErrorKind::Geometry(format!(
                    "{what} is {found}, layout version {LAYOUT_VERSION} has {expected}"
                )));
            }
        }
        let g = Geometry {
            buckets: u64_at(16),
            key_area_bytes: u64_at(40),
            seed: [u64_at(48), u64_at(56)],
        };
        if g.buckets == 0 || g.buckets > u32::MAX as u64 {
            return Err(ErrorKind::Geometry(format!("bucket count {}", g.buckets)));
        }
        if !g.key_area_bytes.is_multiple_of(8) {
            return Err(ErrorKind::Geometry(format!(
                "key area of {} bytes is not whole words",
                g.key_area_bytes
            )));
        }
        let expected = g
            .file_bytes_checked()
            .ok_or_else(|| ErrorKind::Geometry("sizes overflow".into()))?;
        let recorded = u64_at(64);
        if recorded != expected {
            return Err(ErrorKind::Geometry(format!(
                "file size field {recorded} does not match the geometry ({expected})"
            )));
        }
        if file_len < expected {
            return Err(ErrorKind::Truncated {
                found: file_len,
                expected,
            });
        }
        Ok(g)
    }
}

/// A seed no other index shares, so one client's keys cannot be chosen to collide everywhere.
fn random_seed() -> [u64; 2] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u64; 2];
    for (i, w) in out.iter_mut().enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i as u64);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        *w = h.finish();
    }
    out
}
