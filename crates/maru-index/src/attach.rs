//! Re-attaching an existing index: one pass over every slot that checks each entry and decides
//! what to repair, then (only if nothing is corrupt) a pass that repairs. A file that fails a
//! check is refused with the check it failed; it is never reset.
//!
//! What a writer killed mid-call can leave, and what becomes of it:
//!
//! | left behind | by | done |
//! |---|---|---|
//! | an entry with an odd version | any change cut off | emptied; reported in [`AttachReport::torn`] |
//! | a complete entry without its tag | an insert cut off before it took effect | emptied; reported as torn (its insert never returned) |
//! | a tag on an empty slot | a remove cut off after it took effect | tag cleared |
//! | overflow counts too high | an insert or remove cut off | recomputed from the live keys |
//! | key bytes nobody names | an insert cut off | free again (the key-bytes allocator is rebuilt from the entries) |
//!
//! Everything else that does not add up (a hash that is not its key's, a tag that is not its
//! hash's, key bytes outside the area or shared by two entries, one key twice) cannot come from
//! a cut-off writer, and is refused as corruption.
//!
//! Repairs are safe with readers attached: they only empty entries no completed call created,
//! clear tags of empty slots, and set overflow counts to exactly what the live keys need.

use crate::coherence::Coherence;
use crate::error::{ErrorKind, IndexError};
use crate::keyarea::KeyArea;
use crate::layout::*;
use crate::segment::Segment;
use crate::sync::Ordering::*;
use crate::table::{home_of, tag_of, unpack_location, Location};

/// What a re-attach found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachReport {
    /// The previous writer closed the index (false: it died attached).
    pub was_clean: bool,
    /// The epoch of this attachment (odd; readers see it change at every attach).
    pub epoch: u64,
    /// Keys present after the attach.
    pub keys: u64,
    /// Entries whose change was cut off, now emptied.
    pub torn: Vec<TornEntry>,
    /// Tags of empty slots cleared.
    pub tags_cleared: u64,
    /// Buckets whose overflow count was corrected.
    pub overflow_fixed: u64,
    /// The generation counter was behind an entry and was raised past it.
    pub generation_raised: bool,
}

impl AttachReport {
    /// Whether anything was repaired.
    pub fn repaired(&self) -> bool {
        !self.torn.is_empty()
            || self.tags_cleared > 0
            || self.overflow_fixed > 0
            || self.generation_raised
    }
}

/// An entry emptied at attach because the call that was changing it never finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornEntry {
    pub slot: u64,
    /// The namespace and key the entry's words name, when they are readable and consistent
    /// with its hash. A change cut off before it wrote the key words leaves the slot's
    /// previous occupant (a removed key) or nothing readable here.
    pub key: Option<(u32, Vec<u8>)>,
    /// The location the entry held (possibly half-written: the server uses it only to find a
    /// page that may need returning).
    pub location: Location,
    /// True for a complete entry whose tag was never stored (an insert cut off at its end).
    pub unpublished: bool,
}

pub(crate) struct Attached {
    pub report: AttachReport,
    pub keys: KeyArea,
    pub live: u64,
    pub next_generation: u64,
}

pub(crate) fn attach<C: Coherence>(seg: &Segment, coh: &C) -> Result<Attached, IndexError> {
    let t = seg.table();
    let header = seg.header();
    let corrupt = |slot: u64, what: String| {
        IndexError::new(&seg.path, ErrorKind::CorruptEntry { slot, what })
    };
    let epoch_before = header[H_EPOCH].load(Acquire);
    let mut next_generation = header[H_NEXT_GENERATION].load(Acquire).max(1);
    let mut report = AttachReport {
        was_clean: epoch_before & 1 == 0,
        ..AttachReport::default()
    };
    let mut overflow = vec![0u32; t.nbuckets as usize];
    let mut chunks = Vec::new();
    let mut hashes = Vec::new();
    let mut stale_tags = Vec::new();
    let mut key = Vec::new();
    for slot in 0..t.slots() {
        t.prefetch_key(slot + crate::table::PREFETCH_AHEAD);
        let e = t.entry(slot);
        let version = e[W_VERSION].load(Acquire);
        let generation = e[W_GENERATION].load(Acquire);
        let line = t.bucket(slot / BUCKET_SLOTS as u64);
        let tag = line[(slot % BUCKET_SLOTS as u64) as usize].load(Acquire);
        let location = unpack_location(e[W_REGION_LEN].load(Acquire), e[W_OFFSET].load(Acquire));
        let hash = e[W_HASH].load(Acquire);
        if version & 1 == 1 {
            let readable = t
                .stored_key(slot, &mut key)
                .filter(|(ns, _)| t.hash(*ns, &key) == hash)
                .map(|(ns, _)| (ns, key.clone()));
            report.torn.push(TornEntry {
                slot,
                key: readable,
                location,
                unpublished: false,
            });
            continue;
        }
        if generation == 0 {
            if tag != 0 {
                stale_tags.push(slot);
            }
            continue;
        }
        let Some((ns, key0)) = t.stored_key(slot, &mut key) else {
            return Err(corrupt(
                slot,
                "its key length or key bytes are out of range".into(),
            ));
        };
        if t.hash(ns, &key) != hash {
            return Err(corrupt(slot, "its stored hash is not its key's".into()));
        }
        if location.len == 0 {
            return Err(corrupt(slot, "its length is 0".into()));
        }
        if tag == 0 {
            report.torn.push(TornEntry {
                slot,
                key: Some((ns, key.clone())),
                location,
                unpublished: true,
            });
            continue;
        }
        if tag != tag_of(hash) {
            return Err(corrupt(slot, format!("its tag {tag:#x} is not its hash's")));
        }
        if key.len() > INLINE_KEY_BYTES {
            chunks.push((key0, key.len().div_ceil(8) as u64, slot));
        }
        if generation >= next_generation {
            next_generation = generation + 1;
            report.generation_raised = true;
        }
        hashes.push((hash, slot));
        let target = slot / BUCKET_SLOTS as u64;
        let mut b = home_of(hash, t.nbuckets);
        while b != target {
            overflow[b as usize] += 1;
            b = if b + 1 == t.nbuckets { 0 } else { b + 1 };
        }
    }
    hashes.sort_unstable();
    let mut other = Vec::new();
    for pair in hashes.windows(2) {
        if pair[0].0 == pair[1].0 {
            let a = t.stored_key(pair[0].1, &mut key);
            let b = t.stored_key(pair[1].1, &mut other);
            if a.map(|x| x.0) == b.map(|x| x.0) && key == other {
                return Err(corrupt(
                    pair[1].1,
                    format!("it holds the same key as entry {}", pair[0].1),
                ));
            }
        }
    }
    let keys = KeyArea::rebuild(seg.geometry.key_area_words(), chunks)
        .map_err(|(slot, what)| corrupt(slot, what))?;

    // Nothing is corrupt: repair.
    for torn in &report.torn {
        let e = t.entry(torn.slot);
        let v = e[W_VERSION].load(Relaxed);
        let even = (v | 1) + 1;
        e[W_VERSION].store(v | 1, Relaxed);
        e[W_GENERATION].store(0, Release);
        e[W_VERSION].store(even, Release);
        coh.publish(e.as_ptr() as *const u8, 64);
        t.set_tag(coh, torn.slot, 0);
    }
    for &slot in &stale_tags {
        t.set_tag(coh, slot, 0);
    }
    report.tags_cleared = stale_tags.len() as u64;
    for (b, &need) in overflow.iter().enumerate() {
        let w = &t.bucket(b as u64)[OVERFLOW_WORD];
        if w.load(Relaxed) != need {
            w.store(need, Release);
            coh.publish(w as *const _ as *const u8, 4);
            report.overflow_fixed += 1;
        }
    }
    let live = hashes.len() as u64;
    report.keys = live;
    report.epoch = (epoch_before | 1) + if epoch_before & 1 == 0 { 0 } else { 2 };
    header[H_NEXT_GENERATION].store(next_generation, Release);
    header[H_LIVE].store(live, Release);
    header[H_KEY_HIGH].store(keys.high(), Release);
    header[H_EPOCH].store(report.epoch, Release);
    coh.publish(header.as_ptr() as *const u8, HEADER_WORDS * 8);
    Ok(Attached {
        report,
        keys,
        live,
        next_generation,
    })
}
