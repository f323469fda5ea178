//! The writer's allocator for the key-bytes area. It lives in the writer's memory only: what is
//! in use is exactly what live entries name, so a re-attach rebuilds it from the entries (and
//! so coalesces every gap) instead of trusting a free list a dead writer left behind.
//!
//! Chunks are whole words. Free chunks are kept by size; an allocation takes the smallest free
//! chunk that fits (splitting off the rest), else bumps the high-water mark.

use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub(crate) struct KeyArea {
    /// Words in the area.
    total: u64,
    /// Words below this have been handed out at some point.
    high: u64,
    /// Free chunks below `high`: size in words → start words.
    free: BTreeMap<u64, Vec<u64>>,
    free_words: u64,
}

impl KeyArea {
    pub(crate) fn new(total: u64) -> KeyArea {
        KeyArea {
            total,
            ..KeyArea::default()
        }
    }

    /// Rebuilds from the live chunks `(start, words)`; Err names two chunks that overlap or one
    /// outside the area.
    pub(crate) fn rebuild(
        total: u64,
        mut live: Vec<(u64, u64, u64)>,
    ) -> Result<KeyArea, (u64, String)> {
        live.sort_unstable();
        let mut area = KeyArea::new(total);
        let mut at = 0u64;
        let mut prev_slot = None;
        for (start, words, slot) in live {
            if start.checked_add(words).is_none_or(|end| end > total) {
                return Err((
                    slot,
                    format!("it names key words {start}+{words}, beyond the area's {total}"),
                ));
            }
            if start < at {
                return Err((
                    slot,
                    format!(
                        "its key bytes overlap those of entry {}",
                        prev_slot.unwrap_or(slot)
                    ),
                ));
            }
            if start > at {
                area.put(at, start - at);
            }
            at = start + words;
            prev_slot = Some(slot);
        }
        area.high = at;
        Ok(area)
    }

    fn put(&mut self, start: u64, words: u64) {
        self.free.entry(words).or_default().push(start);
        self.free_words += words;
    }

    /// A chunk of `words` words, or None when nothing fits.
    pub(crate) fn alloc(&mut self, words: u64) -> Option<u64> {
        let size = self.free.range(words..).next().map(|(s, _)| *s);
        if let Some(size) = size {
            let starts = self.free.get_mut(&size)?;
            let start = starts.pop()?;
            if starts.is_empty() {
                self.free.remove(&size);
            }
            self.free_words -= size;
            if size > words {
                self.put(start + words, size - words);
            }
            return Some(start);
        }
        if self.total - self.high >= words {
            let start = self.high;
            self.high += words;
            return Some(start);
        }
        None
    }

    pub(crate) fn release(&mut self, start: u64, words: u64) {
        if start + words == self.high {
            self.high = start;
        } else {
            self.put(start, words);
        }
    }

    pub(crate) fn high(&self) -> u64 {
        self.high
    }

    /// Words in use.
    pub(crate) fn used(&self) -> u64 {
        self.high - self.free_words
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_freed_chunks_and_rebuilds_gaps() {
        let mut a = KeyArea::new(10);
        let x = a.alloc(4).unwrap();
        let y = a.alloc(4).unwrap();
        assert_eq!(a.alloc(4), None);
        a.release(x, 4);
        assert_eq!(a.alloc(3), Some(x));
        assert_eq!(a.alloc(1), Some(x + 3));
        a.release(y, 4);
        assert_eq!(a.high(), 4);
        let r = KeyArea::rebuild(10, vec![(6, 2, 1), (0, 2, 0)]).unwrap();
        assert_eq!((r.high(), r.used()), (8, 4));
        assert!(KeyArea::rebuild(10, vec![(0, 4, 0), (2, 2, 1)]).is_err());
        assert!(KeyArea::rebuild(10, vec![(9, 2, 0)]).is_err());
    }
}
