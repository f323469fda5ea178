//! Self-checking payloads: the bytes of a value are a pseudo-random stream seeded by its key,
//! so a reader can tell, from the bytes alone, whether they are this key's value, zeros (a
//! freed, punched region) or something else (another key's page, a torn write).

use maru_client::StoreItem;

/// FNV-1a of `key`, the stream's seed (never zero: xorshift would stay at zero).
fn seed(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h | 1
}

/// The value of `key` with `len` bytes.
pub fn payload(key: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut s = seed(key);
    while out.len() < len {
        // xorshift64*
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        out.extend_from_slice(&s.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What a reader found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Intact,
    /// Every byte zero: the region was freed (punched) under the reader.
    Zeros,
    /// Anything else: another value, or a mix.
    Corrupt,
}

pub fn check(key: &[u8], bytes: &[u8]) -> Check {
    if bytes == payload(key, bytes.len()).as_slice() {
        Check::Intact
    } else if bytes.iter().all(|b| *b == 0) {
        Check::Zeros
    } else {
        Check::Corrupt
    }
}

/// Length of the value stored under `key` by the tests: 1..=`max`, derived from the key, so
/// a reader knows the length to expect too.
pub fn len_for(key: &[u8], max: usize) -> usize {
    1 + (seed(key) >> 7) as usize % max
}

/// The self-checking value of each of `keys`, of [`len_for`] the key and `max`.
pub fn values_for(keys: &[Vec<u8>], max: usize) -> Vec<Vec<u8>> {
    keys.iter().map(|k| payload(k, len_for(k, max))).collect()
}

/// `keys` with their `values` as copy-in items of one `batch_store` (no prefix).
pub fn batch_items<'a>(
    keys: &'a [Vec<u8>],
    values: &'a [Vec<u8>],
) -> Vec<(&'a [u8], StoreItem<'a>)> {
    keys.iter()
        .zip(values)
        .map(|(k, v)| {
            (
                k.as_slice(),
                StoreItem::Bytes {
                    prefix: b"",
                    data: v,
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_check_themselves() {
        let v = payload(b"k1", 1000);
        assert_eq!(check(b"k1", &v), Check::Intact);
        assert_eq!(check(b"k2", &v), Check::Corrupt);
        assert_eq!(check(b"k1", &[0; 1000]), Check::Zeros);
        assert_eq!(payload(b"k1", 10), v[..10]);
        let n = len_for(b"k", 4096);
        assert!((1..=4096).contains(&n));
    }
}
