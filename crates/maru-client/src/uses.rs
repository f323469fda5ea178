//! Reads the server does not see: copies out through the key index (`retrieve_into`,
//! `batch_retrieve_into`) ask the server nothing, so the keys they read are told to it later
//! (`Touch`, answered with nothing, in front of the session's next request or with the
//! watcher's next round), and count as uses for eviction like the reads it answers. Without
//! them a key read only through the index would look unused and go first. Views held in the
//! session's hold lane are told as `Hit`s: uses that count as hits too, as the lookups they
//! stand for would (their misses still ask the server, which counts them).

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use maru_proto::{encode_request, Request, MAX_BATCH};

/// The most keys waiting to be told; reads beyond it are not told until the next send takes
/// the ones waiting (the watcher sends every 50 ms, so only a burst of this many reads within
/// one round loses any).
const MAX_PENDING: usize = 4 * MAX_BATCH;

/// The most reads told in front of one request (the watcher tells any number).
pub(crate) const IN_FRONT: usize = MAX_BATCH;

/// Keys read through the index and not told yet, in one byte buffer. Copies are kept once
/// each: a key copied again before it is told is one use to the server (a recency policy needs
/// no more), so a loop over hot keys costs the server one touch per key per round, not one per
/// read. Views are kept as often as they were taken: each is a hit in the counters.
#[derive(Debug, Default)]
struct Keys {
    bytes: Vec<u8>,
    ends: Vec<u32>,
    /// Hashes of the keys waiting (two keys of one hash: the second goes untold this round,
    /// which only ages it a round early).
    waiting: HashSet<u64>,
}

fn hash_of(key: &[u8]) -> u64 {
    foldhash::fast::FixedState::default().hash_one(key)
}

impl Keys {
    fn add<'k>(&mut self, keys: impl IntoIterator<Item = &'k [u8]>, room: usize, once: bool) {
        for key in keys {
            if self.ends.len() >= room {
                break;
            }
            if once && !self.waiting.insert(hash_of(key)) {
                continue;
            }
            self.bytes.extend_from_slice(key);
            self.ends.push(self.bytes.len() as u32);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let k = &self.bytes[start..end as usize];
            start = end as usize;
            k
        })
    }

    /// The first `n` keys, taken out.
    fn take_front(&mut self, n: usize) -> Keys {
        if n >= self.ends.len() {
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
        let front = Keys {
            bytes,
            ends,
            waiting: HashSet::new(),
        };
        for key in front.iter() {
            self.waiting.remove(&hash_of(key));
        }
        front
    }

    /// Appends the keys as frames of `make` (request id 0).
    fn encode(&self, out: &mut Vec<u8>, make: fn(Vec<&[u8]>) -> Request<'_>) {
        let keys: Vec<&[u8]> = self.iter().collect();
        for chunk in keys.chunks(MAX_BATCH) {
            // A frame of keys the handler checked when it read them: within the limits.
            let _ = encode_request(out, 0, &make(chunk.to_vec()));
        }
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
        let room = MAX_PENDING.saturating_sub(p.copied.ends.len() + p.viewed.ends.len());
        let list = if viewed { &mut p.viewed } else { &mut p.copied };
        list.add(keys, list.ends.len() + room, !viewed);
        if !p.copied.ends.is_empty() || !p.viewed.ends.is_empty() {
            self.any.store(true, Ordering::Release);
        }
    }

    /// Appends up to `limit` of the reads booked so far to `out` as `Touch` and `Hit` frames
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
            let viewed = p.viewed.take_front(limit - copied.ends.len());
            let left = !p.copied.ends.is_empty() || !p.viewed.ends.is_empty();
            self.any.store(left, Ordering::Release);
            (copied, viewed)
        };
        copied.encode(out, |keys| Request::Touch { keys });
        viewed.encode(out, |keys| Request::Hit { keys });
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
                Request::Hit { keys } => {
                    let mut f: Vec<Vec<u8>> = vec![b"hit:".to_vec()];
                    f.extend(keys.iter().map(|k| k.to_vec()));
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
        // A key copied twice before it is told is one use; viewed twice, two hits.
        q.used([b"a".as_slice(), b"bb"]);
        q.used([b"a".as_slice()]);
        q.hit([b"v".as_slice(), b"v"]);
        assert_eq!(
            told(&q),
            [
                vec![b"a".to_vec(), b"bb".to_vec()],
                vec![b"hit:".to_vec(), b"v".to_vec(), b"v".to_vec()]
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
            [vec![b"c".to_vec()], vec![b"hit:".to_vec(), b"v".to_vec()]]
        );
        q.used(many.iter().map(|k| k.as_slice()));
        q.hit([b"v".as_slice()]);
        assert_eq!(
            told(&q).len(),
            MAX_PENDING / MAX_BATCH,
            "no room left for the view"
        );
        // In front of a request, a bounded share: the rest waits for the next send.
        q.used([b"a".as_slice(), b"bb", b"c"]);
        q.hit([b"v".as_slice()]);
        let mut wire = Vec::new();
        q.encode_into(&mut wire, 2);
        assert!(!wire.is_empty());
        q.encode_into(&mut wire, 0);
        assert_eq!(
            told(&q),
            [vec![b"c".to_vec()], vec![b"hit:".to_vec(), b"v".to_vec()]],
            "the first two keys went in front, the rest after"
        );
    }
}
