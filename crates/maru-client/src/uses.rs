//! Reads the server does not see: copies out through the key index (`retrieve_into`,
//! `batch_retrieve_into`) ask the server nothing, so the keys they read are told to it later
//! (`Touch`, answered with nothing, in front of the session's next request or with the
//! watcher's next round), and count as uses for eviction like the reads it answers. Without
//! them a key read only through the index would look unused and go first. Views held in the
//! session's hold lane are told as `Hit`s: uses that count as hits too, as the lookups they
//! stand for would (their misses still ask the server, which counts them).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use maru_proto::{encode_request, KeyCount, Request, MAX_BATCH};

/// The most keys waiting to be told; reads beyond it are not told until the next send takes
/// the ones waiting (the watcher sends every 50 ms, so only a burst of this many keys within
/// one round loses any).
const MAX_PENDING: usize = 4 * MAX_BATCH;

/// The most keys told in front of one request (the watcher tells any number).
pub(crate) const IN_FRONT: usize = MAX_BATCH;

/// Keys read through the index and not told yet, in one byte buffer, each once with how many
/// times it was read since it was last told: a loop over hot keys costs the server one entry
/// per key per round, not one per read. A copy tells only the use (a recency policy needs no
/// more); views tell their count, each a hit in the counters.
#[derive(Debug, Default)]
struct Keys {
    bytes: Vec<u8>,
    ends: Vec<u32>,
    counts: Vec<u32>,
    /// Where each waiting key is, by its hash (of two keys of one hash the second is kept
    /// apart, uncounted together).
    waiting: HashMap<u64, u32, foldhash::fast::FixedState>,
}

fn hash_of(key: &[u8]) -> u64 {
    foldhash::fast::FixedState::default().hash_one(key)
}

impl Keys {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.bytes[start..self.ends[i] as usize]
    }

    fn add<'k>(&mut self, keys: impl IntoIterator<Item = &'k [u8]>, room: usize) {
        for key in keys {
            let hash = hash_of(key);
            if let Some(&i) = self.waiting.get(&hash) {
                if self.key(i as usize) == key {
                    self.counts[i as usize] = self.counts[i as usize].saturating_add(1);
                    continue;
                }
            }
            if self.len() >= room {
                break;
            }
            let at = self.len() as u32;
            self.waiting.entry(hash).or_insert(at);
            self.bytes.extend_from_slice(key);
            self.ends.push(self.bytes.len() as u32);
            self.counts.push(1);
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], u32)> {
        (0..self.len()).map(|i| (self.key(i), self.counts[i]))
    }

    /// The first `n` keys, taken out.
    fn take_front(&mut self, n: usize) -> Keys {
        if n >= self.len() {
            return std::mem::take(self);
        }
        if n == 0 {
            return Keys::default();
        }
        let cut = self.ends[n - 1];
        let rest = self.bytes.split_off(cut as usize);
        let bytes = std::mem::replace(&mut self.bytes, rest);
        let mut rest = self.ends.split_off(n);
        rest.iter_mut().for_each(|e| *e -= cut);
        let ends = std::mem::replace(&mut self.ends, rest);
        let rest = self.counts.split_off(n);
        let counts = std::mem::replace(&mut self.counts, rest);
        self.waiting.clear();
        for i in 0..self.len() {
            let hash = hash_of(self.key(i));
            self.waiting.entry(hash).or_insert(i as u32);
        }
        Keys {
            bytes,
            ends,
            counts,
            waiting: HashMap::default(),
        }
    }

    /// Appends the keys as `Touch` frames (request id 0).
    fn encode_uses(&self, out: &mut Vec<u8>) {
        let keys: Vec<&[u8]> = self.iter().map(|(k, _)| k).collect();
        encode_frames(out, &keys, |keys| Request::Touch { keys });
    }

    /// Appends the keys and their counts as `Hit` frames (request id 0).
    fn encode_hits(&self, out: &mut Vec<u8>) {
        let hits: Vec<KeyCount> = self
            .iter()
            .map(|(key, count)| KeyCount { key, count })
            .collect();
        encode_frames(out, &hits, |hits| Request::Hit { hits });
    }
}

/// Appends `items` as frames of at most a batch each, made by `make` (request id 0).
fn encode_frames<'a, T: Clone>(
    out: &mut Vec<u8>,
    items: &[T],
    make: impl Fn(Vec<T>) -> Request<'a>,
) {
    for chunk in items.chunks(MAX_BATCH) {
        // Keys the handler checked when it read them: within the limits.
        let _ = encode_request(out, 0, &make(chunk.to_vec()));
    }
}

/// Reads waiting to be told: copies (uses) and views (uses and hits).
#[derive(Debug, Default)]
struct Pending {
    copied: Keys,
    viewed: Keys,
}

/// The session's reads to tell the server.
#[derive(Debug, Default)]
pub(crate) struct UseQueue {
    pending: Mutex<Pending>,
    /// Whether `pending` has any: lets a request see there is nothing without locking.
    any: AtomicBool,
}

impl UseQueue {
    /// Books copies of `keys` out of the index.
    pub fn used<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) {
        self.book(keys, false);
    }

    /// Books views of `keys` held in the session's lane.
    pub fn hit<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) {
        self.book(keys, true);
    }

    fn book<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>, viewed: bool) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let room = MAX_PENDING.saturating_sub(p.copied.len() + p.viewed.len());
        let list = if viewed { &mut p.viewed } else { &mut p.copied };
        list.add(keys, list.len() + room);
        if p.copied.len() + p.viewed.len() > 0 {
            self.any.store(true, Ordering::Release);
        }
    }

    /// Appends up to `limit` of the keys booked so far to `out` as `Touch` and `Hit` frames
    /// (request id 0) and forgets them; one load when there are none. A request carries at
    /// most [`IN_FRONT`] of them: the server handles what rides in front of a request before
    /// the request, so a backlog of reads would delay it; the watcher takes the rest.
    pub fn encode_into(&self, out: &mut Vec<u8>, limit: usize) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let (copied, viewed) = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let copied = p.copied.take_front(limit);
            let viewed = p.viewed.take_front(limit - copied.len());
            self.any
                .store(p.copied.len() + p.viewed.len() > 0, Ordering::Release);
            (copied, viewed)
        };
        copied.encode_uses(out);
        viewed.encode_hits(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use maru_proto::{decode_request, Header, HEADER_LEN};

    fn told(q: &UseQueue) -> Vec<Vec<Vec<u8>>> {
        let mut wire = Vec::new();
        q.encode_into(&mut wire, usize::MAX);
        let mut frames = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let h = Header::decode(&wire[at..at + HEADER_LEN]).unwrap();
            let end = at + HEADER_LEN + h.payload_len as usize;
            match decode_request(&h, &wire[at + HEADER_LEN..end]).unwrap() {
                Request::Touch { keys } => frames.push(keys.iter().map(|k| k.to_vec()).collect()),
                Request::Hit { hits } => {
                    let mut f: Vec<Vec<u8>> = vec![b"hit:".to_vec()];
                    f.extend(hits.iter().map(|h| {
                        format!("{}x{}", h.count, String::from_utf8_lossy(h.key)).into_bytes()
                    }));
                    frames.push(f)
                }
                other => panic!("not a touch: {other:?}"),
            }
            at = end;
        }
        frames
    }

    #[test]
    fn reads_are_told_once_in_frames_of_a_batch_and_bounded() {
        let q = UseQueue::default();
        assert!(told(&q).is_empty(), "nothing read, nothing told");
        // A key copied twice before it is told is one use; viewed twice, one key of two hits.
        q.used([b"a".as_slice(), b"bb"]);
        q.used([b"a".as_slice()]);
        q.hit([b"v".as_slice(), b"w", b"v"]);
        assert_eq!(
            told(&q),
            [
                vec![b"a".to_vec(), b"bb".to_vec()],
                vec![b"hit:".to_vec(), b"2xv".to_vec(), b"1xw".to_vec()]
            ]
        );
        assert!(told(&q).is_empty(), "told once");
        q.used([b"a".as_slice()]);
        assert_eq!(
            told(&q),
            [vec![b"a".to_vec()]],
            "told, a key is booked anew"
        );
        let many: Vec<Vec<u8>> = (0..MAX_PENDING + 10)
            .map(|i| i.to_string().into_bytes())
            .collect();
        q.used(many.iter().map(|k| k.as_slice()));
        let frames = told(&q);
        assert_eq!(frames.len(), MAX_PENDING / MAX_BATCH);
        assert!(frames.iter().all(|f| f.len() == MAX_BATCH));
        assert_eq!(frames[0][0], b"0");
        // Views are told as hits, after the copies, within the same bound.
        q.hit([b"v".as_slice()]);
        q.used([b"c".as_slice()]);
        assert_eq!(
            told(&q),
            [vec![b"c".to_vec()], vec![b"hit:".to_vec(), b"1xv".to_vec()]]
        );
        q.used(many.iter().map(|k| k.as_slice()));
        q.hit([b"v".as_slice()]);
        assert_eq!(
            told(&q).len(),
            MAX_PENDING / MAX_BATCH,
            "no room left for the view"
        );
        // In front of a request, a bounded share: the rest waits for the next send, and
        // keeps counting what it waits for.
        q.used([b"a".as_slice(), b"bb", b"c"]);
        q.hit([b"v".as_slice(), b"w"]);
        let mut wire = Vec::new();
        q.encode_into(&mut wire, 4);
        assert!(!wire.is_empty());
        q.encode_into(&mut wire, 0);
        q.hit([b"w".as_slice(), b"w", b"v"]);
        assert_eq!(
            told(&q),
            [vec![b"hit:".to_vec(), b"3xw".to_vec(), b"1xv".to_vec()]],
            "the first four keys went in front, the rest after"
        );
    }
}
