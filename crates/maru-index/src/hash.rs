//! The key hash. It is part of the file format (readers in other processes and a restarted
//! writer must compute the same value from the same seed), so it is defined here, pinned by
//! the layout version and by test vectors, rather than borrowed from a hasher whose output may
//! change between versions of a dependency.

const K0: u64 = 0x9e37_79b9_7f4a_7c15;
const K1: u64 = 0xa076_1d64_78bd_642f;
const K2: u64 = 0xe703_7ed1_a0b4_28db;

/// The full product of two words folded into one: cheap, and every input bit reaches every
/// output bit.
#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let p = (a as u128).wrapping_mul(b as u128);
    (p as u64) ^ ((p >> 64) as u64)
}

/// Little-endian word `i` of `key`, zero-padded past its end. Stored keys are zero-padded the
/// same way, so keys compare word by word. A partial last word is assembled from two
/// overlapping loads rather than a copy of variable length (which compiles to a call of
/// `memcpy`): every lookup hashes and compares its key's words.
#[inline]
pub(crate) fn key_word(key: &[u8], i: usize) -> u64 {
    let start = i * 8;
    if let Some(w) = key.get(start..start + 8) {
        return u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
    }
    let rest = key.get(start..).unwrap_or(&[]);
    let n = rest.len();
    // Two loads whose bytes overlap where n is not a power of two; the overlap holds the same
    // bytes in both, so OR-ing them is exact.
    let w2 = |b: &[u8]| u64::from(u16::from_le_bytes([b[0], b[1]]));
    let w4 = |b: &[u8]| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    match n {
        0 => 0,
        1 => u64::from(rest[0]),
        2..=3 => w2(rest) | (w2(&rest[n - 2..]) << ((n - 2) * 8)),
        _ => w4(rest) | (w4(&rest[n - 4..]) << ((n - 4) * 8)),
    }
}

/// The hash of `key` in namespace `ns` under the index's `seed`.
#[inline]
pub fn key_hash(seed: [u64; 2], ns: u32, key: &[u8]) -> u64 {
    let mut h = fold(seed[0] ^ K0, (((ns as u64) << 32) | key.len() as u64) ^ K1);
    let words = key.len().div_ceil(8);
    let mut i = 0;
    while i + 1 < words {
        h = fold(key_word(key, i) ^ seed[1] ^ h, key_word(key, i + 1) ^ K2);
        i += 2;
    }
    if i < words {
        h = fold(key_word(key, i) ^ seed[1] ^ h, K2);
    }
    fold(h ^ K1, seed[1] ^ K0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_pinned() {
        // These values are part of layout version 1: a change here breaks every existing file.
        let vectors = [
            key_hash([1, 2], 0, b""),
            key_hash([1, 2], 0, b"a"),
            key_hash([1, 2], 1, b"a"),
            key_hash([1, 2], 0, b"0123456789abcdefX"),
        ];
        assert_eq!(vectors, PINNED);
    }

    const PINNED: [u64; 4] = [
        6029358277560168114,
        7283079841696244051,
        6471174740218094718,
        2455283319225842434,
    ];

    /// The word of the format's definition: the key's bytes from `8 i`, zero-padded.
    fn word_by_definition(key: &[u8], i: usize) -> u64 {
        let mut w = [0u8; 8];
        for (j, b) in w.iter_mut().enumerate() {
            *b = key.get(i * 8 + j).copied().unwrap_or(0);
        }
        u64::from_le_bytes(w)
    }

    #[test]
    fn key_words_are_the_zero_padded_bytes_at_every_length() {
        let bytes: Vec<u8> = (1..=40u8).map(|b| b.wrapping_mul(37) | 1).collect();
        for len in 0..=bytes.len() {
            let key = &bytes[..len];
            for i in 0..6 {
                assert_eq!(
                    key_word(key, i),
                    word_by_definition(key, i),
                    "len {len} word {i}"
                );
            }
        }
    }

    #[test]
    fn namespace_length_and_padding_change_the_hash() {
        let s = [7, 9];
        assert_ne!(key_hash(s, 0, b"k"), key_hash(s, 1, b"k"));
        assert_ne!(key_hash(s, 0, b"k"), key_hash(s, 0, b"k\0"));
        assert_ne!(key_hash(s, 0, b"k"), key_hash([8, 9], 0, b"k"));
        assert_eq!(key_word(b"abc", 0), u64::from_le_bytes(*b"abc\0\0\0\0\0"));
        assert_eq!(key_word(b"abc", 1), 0);
    }
}
