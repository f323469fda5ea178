//! Reads the server does not see: copies out through the key index (`retrieve_into`,
//! `batch_retrieve_into`) ask the server nothing, so the keys they read are told to it later
//! (`Touch`, answered with nothing, in front of the session's next request or with the
//! watcher's next round), and count as uses for eviction like the reads it answers. Without
//! them a key read only through the index would look unused and go first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use maru_proto::{encode_request, Request, MAX_BATCH};

/// The most keys waiting to be told; reads beyond it are not told until the next send takes
/// the ones waiting (the watcher sends every 50 ms, so only a burst of this many reads within
/// one round loses any).
const MAX_PENDING: usize = 4 * MAX_BATCH;

/// Keys read through the index and not told yet, in one byte buffer.
#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

/// The session's reads to tell the server.
#[derive(Debug, Default)]
pub(crate) struct UseQueue {
    pending: Mutex<Pending>,
    /// Whether `pending` has any: lets a request see there is nothing without locking.
    any: AtomicBool,
}

impl UseQueue {
    /// Books reads of `keys`.
    pub fn used<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            if p.ends.len() >= MAX_PENDING {
                break;
            }
            p.bytes.extend_from_slice(key);
            let end = p.bytes.len() as u32;
            p.ends.push(end);
        }
        if !p.ends.is_empty() {
            self.any.store(true, Ordering::Release);
        }
    }

    /// Appends the reads booked so far to `out` as `Touch` frames (request id 0) and forgets
    /// them; one load when there are none.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let taken = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            self.any.store(false, Ordering::Release);
            std::mem::take(&mut *p)
        };
        let mut start = 0;
        let keys: Vec<&[u8]> = taken
            .ends
            .iter()
            .map(|&end| {
                let k = &taken.bytes[start..end as usize];
                start = end as usize;
                k
            })
            .collect();
        for chunk in keys.chunks(MAX_BATCH) {
            // A frame of keys the handler checked when it read them: within the limits.
            let _ = encode_request(
                out,
                0,
                &Request::Touch {
                    keys: chunk.to_vec(),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use maru_proto::{decode_request, Header, HEADER_LEN};

    fn told(q: &UseQueue) -> Vec<Vec<Vec<u8>>> {
        let mut wire = Vec::new();
        q.encode_into(&mut wire);
        let mut frames = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let h = Header::decode(&wire[at..at + HEADER_LEN]).unwrap();
            let end = at + HEADER_LEN + h.payload_len as usize;
            match decode_request(&h, &wire[at + HEADER_LEN..end]).unwrap() {
                Request::Touch { keys } => frames.push(keys.iter().map(|k| k.to_vec()).collect()),
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
        q.used([b"a".as_slice(), b"bb"]);
        q.used([b"a".as_slice()]);
        assert_eq!(
            told(&q),
            [vec![b"a".to_vec(), b"bb".to_vec(), b"a".to_vec()]]
        );
        assert!(told(&q).is_empty(), "told once");
        let many: Vec<Vec<u8>> = (0..MAX_PENDING + 10)
            .map(|i| i.to_string().into_bytes())
            .collect();
        q.used(many.iter().map(|k| k.as_slice()));
        let frames = told(&q);
        assert_eq!(frames.len(), MAX_PENDING / MAX_BATCH);
        assert!(frames.iter().all(|f| f.len() == MAX_BATCH));
        assert_eq!(frames[0][0], b"0");
    }
}
