//! Hold lanes: a second shared-memory file, beside the index, where clients that read the
//! index hold pages without a round trip to the server. Each client session has one lane of
//! slots; a slot names one page it holds. The server scans the lanes before it returns a page
//! to its owner, and defers the return of a page some lane names.
//!
//! ```text
//! 0        header (4 KiB; 44 bytes used)
//!            0  magic "MARULNS\0"    8  layout version u32   12 header bytes u32
//!           16  lanes u32           20  slots per lane u32   24  lane bytes u64
//!           32  file size u64       40  CRC32 of bytes 0..40
//! 4096     lane 0: one 64-byte line (high-water mark u64, tag u64, 48 bytes unused), then
//!          `slots` u64 slots, padded to a multiple of 64 bytes
//! ...      lane 1, ...
//! ```
//!
//! A slot is 0 when empty, else `tag << 56 | region << 24 | page`: `page` is the page's offset
//! in its region in 4 KiB units (below 2^24, so regions up to 64 GiB), `tag` the session's
//! number for the lane (1..=255, never 0, so a used slot is never 0). The high-water mark is
//! one past the highest slot the lane's client has claimed since the lane was last reset: the
//! server scans no further. The file is sparse: lanes nobody uses cost no memory.
//!
//! # The protocol
//!
//! **Taking a hold (the client).** Having looked a key up, the client claims a slot for the
//! key's page (raises the high-water mark past it, then stores the page into it), issues a
//! SeqCst fence ([`LaneWriter::fence`], once for a batch of claims), and rechecks the key's
//! generation in the index ([`crate::IndexReader::is_current`]). An unchanged generation means
//! it holds the page: it may read the page in place until it releases the slot. A changed
//! generation means the key went or moved: it releases the slot and treats the key as changed.
//!
//! **Returning a page (the server).** The server removes the key from the index first (the
//! entry's generation goes to 0), issues a SeqCst fence, then scans every lane for the page
//! ([`LaneFile::is_held`]). A page no lane names goes back to its owner; a named one is
//! deferred and scanned for again later.
//!
//! **Why no page is returned while held.** The two sides are Dekker's: each stores (the
//! client its slot, the server the generation), fences, then loads what the other stored.
//! SeqCst fences are totally ordered. If the client's fence comes first, the server's scan
//! after its own fence sees the slot and the high-water mark the client stored before its
//! fence, and defers the page. If the server's fence comes first, the client's recheck after
//! its fence sees the generation the server stored before its fence, and the client gives the
//! hold up. Either way the page is never both held and returned. tests/loom.rs checks this.
//!
//! **Why the page's reads end before its reuse.** A client ends a hold by clearing its slot
//! with a release store; the server scans with acquire loads. A scan that finds the slot empty
//! therefore happens after every read the client made of the page before releasing it, so the
//! server's later return of the page (and its next owner's writes) cannot reach those reads.
//!
//! **Why tags.** A lane is given to a new session when the previous one ends, but the
//! previous session's client may still be running (its connection dropped, say) and writing
//! into the lane. Every assignment advances the lane's tag, and a client writes with its own:
//! its claims only fill empty slots (a compare-exchange from 0), and its releases only clear a
//! slot holding exactly its own value (a compare-exchange from the value), so a client of an
//! ended session can neither clear nor overwrite the holds of the lane's new session. Its own
//! late claims are still honoured by the server's scans until the next reset: conservative.
//!
//! **Why the server ignores tags when scanning.** Any slot naming a page may be a hold some
//! client relies on; the server cannot tell a stale client's hold from a live one's, and a
//! page held by nobody but kept back too long costs only memory, so every named page counts.
//! The holds of an ended session are guaranteed only while the session lasts: the server
//! resets a lane when its session ends, and a client of that session must not rely on holds it
//! took after then (a claim racing with the reset can land above the reset high-water mark,
//! where no scan looks).
//!
//! **What a crash leaves.** A client that dies leaves its slots set: the pages they name stay
//! held until the server sees the session end and resets the lane. That keeps pages back too
//! long, never returns one too early. A server that dies takes its lanes with it: the next
//! server creates a fresh file and renames it over the old path, so clients still mapping the
//! old one write where no one looks, and must open the new file with their new session.

use std::collections::HashSet;

use crate::error::ErrorKind;
use crate::header::HeaderFormat;
use crate::sync::{fence, AtomicU64, Ordering::*};

#[cfg(not(loom))]
use std::path::{Path, PathBuf};

#[cfg(not(loom))]
use crate::error::IndexError;

pub const LANES_MAGIC: [u8; 8] = *b"MARULNS\0";
pub const LANES_LAYOUT_VERSION: u32 = 1;
pub const LANES_HEADER_BYTES: u64 = 4096;
/// The most lanes a file has (one per client session the server admits at once).
pub const MAX_LANES: u32 = 1 << 16;
/// The most slots a lane has.
pub const MAX_LANE_SLOTS: u32 = 1 << 20;
/// Pages (4 KiB units of a region offset) a slot can name: below this.
pub const MAX_LANE_PAGE: u32 = 1 << 24;

/// Words of a lane's first line: high-water mark, tag, then unused.
const LINE_WORDS: usize = 8;
const W_HIGH: usize = 0;
const W_TAG: usize = 1;
const CRC_END: usize = 40;
const PAGE: u64 = 4096;

const LANES_HEADER: HeaderFormat = HeaderFormat {
    magic: LANES_MAGIC,
    version: LANES_LAYOUT_VERSION,
    header_bytes: LANES_HEADER_BYTES,
    crc_end: CRC_END,
};

/// A slot's value for `page` of `region` under `tag`, or None when the page does not fit.
#[inline]
pub(crate) fn pack_slot(tag: u8, region: u32, page: u32) -> Option<u64> {
    (tag != 0 && page < MAX_LANE_PAGE)
        .then_some((tag as u64) << 56 | (region as u64) << 24 | page as u64)
}

/// The (region, page) a used slot names, whatever its tag.
#[inline]
pub(crate) fn unpack_slot(value: u64) -> (u32, u32) {
    (
        (value >> 24) as u32,
        (value & (MAX_LANE_PAGE as u64 - 1)) as u32,
    )
}

/// The shape of a lanes file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LaneGeometry {
    pub lanes: u32,
    pub slots: u32,
}

impl LaneGeometry {
    pub(crate) fn new(lanes: u32, slots: u32) -> Result<LaneGeometry, ErrorKind> {
        if lanes == 0 || lanes > MAX_LANES {
            return Err(ErrorKind::InvalidOptions(format!(
                "{lanes} lanes: between 1 and {MAX_LANES}"
            )));
        }
        if slots == 0 || slots > MAX_LANE_SLOTS {
            return Err(ErrorKind::InvalidOptions(format!(
                "{slots} slots per lane: between 1 and {MAX_LANE_SLOTS}"
            )));
        }
        Ok(LaneGeometry { lanes, slots })
    }

    /// Words from one lane's start to the next's.
    pub(crate) fn lane_words(&self) -> usize {
        (LINE_WORDS + self.slots as usize).div_ceil(8) * 8
    }

    /// Words of all the lanes.
    pub(crate) fn words(&self) -> usize {
        self.lanes as usize * self.lane_words()
    }

    pub(crate) fn file_bytes(&self) -> u64 {
        (LANES_HEADER_BYTES + self.words() as u64 * 8).div_ceil(PAGE) * PAGE
    }

    /// The header, checksum included.
    pub(crate) fn encode(&self) -> [u8; CRC_END + 4] {
        let mut h: [u8; CRC_END + 4] = LANES_HEADER.begin();
        h[16..20].copy_from_slice(&self.lanes.to_le_bytes());
        h[20..24].copy_from_slice(&self.slots.to_le_bytes());
        h[24..32].copy_from_slice(&(self.lane_words() as u64 * 8).to_le_bytes());
        h[32..40].copy_from_slice(&self.file_bytes().to_le_bytes());
        LANES_HEADER.seal(&mut h);
        h
    }

    /// Checks a header read from a file of `file_len` bytes, in the index header's order:
    /// size, magic, version, checksum, then each geometry field.
    pub(crate) fn decode(h: &[u8], file_len: u64) -> Result<LaneGeometry, ErrorKind> {
        let f = LANES_HEADER.check(h, file_len)?;
        let (u32_at, u64_at) = (|o| f.u32_at(o), |o| f.u64_at(o));
        let g = LaneGeometry::new(u32_at(16), u32_at(20)).map_err(|_| {
            ErrorKind::Geometry(format!("{} lanes of {} slots", u32_at(16), u32_at(20)))
        })?;
        let lane_bytes = u64_at(24);
        if lane_bytes != g.lane_words() as u64 * 8 {
            return Err(ErrorKind::Geometry(format!(
                "lane bytes field {lane_bytes} does not match {} slots",
                g.slots
            )));
        }
        let recorded = u64_at(32);
        if recorded != g.file_bytes() {
            return Err(ErrorKind::Geometry(format!(
                "file size field {recorded} does not match the geometry ({})",
                g.file_bytes()
            )));
        }
        if file_len < recorded {
            return Err(ErrorKind::Truncated {
                found: file_len,
                expected: recorded,
            });
        }
        Ok(g)
    }
}

/// A view of the lanes' memory: the protocol both sides run, over the mapped file or, under
/// `cfg(loom)`, over loom's atomics in memory (`model.rs`).
#[derive(Clone, Copy)]
pub(crate) struct Lanes<'a> {
    pub words: &'a [AtomicU64],
    pub geometry: LaneGeometry,
}

impl<'a> Lanes<'a> {
    #[inline]
    fn lane(&self, lane: u32) -> &'a [AtomicU64] {
        let n = self.geometry.lane_words();
        let at = lane as usize * n;
        &self.words[at..at + n]
    }

    #[inline]
    fn lane_slots(&self, lane: u32) -> &'a [AtomicU64] {
        &self.lane(lane)[LINE_WORDS..LINE_WORDS + self.geometry.slots as usize]
    }

    // ---- the server's side: one thread at a time per lane ----

    /// Advances `lane`'s tag (1..=255, wrapping past 0) and returns it.
    pub(crate) fn assign(&self, lane: u32) -> u8 {
        let w = &self.lane(lane)[W_TAG];
        let tag = (w.load(Relaxed) % 255 + 1) as u8;
        w.store(tag as u64, Release);
        tag
    }

    /// Every slot of `lane` to 0, then its high-water mark.
    pub(crate) fn reset(&self, lane: u32) {
        let line = self.lane(lane);
        let high = (line[W_HIGH].load(Acquire) as usize).min(self.geometry.slots as usize);
        for s in &self.lane_slots(lane)[..high] {
            s.store(0, Release);
        }
        line[W_HIGH].store(0, Release);
    }

    /// Calls `f` with every used slot's value below each lane's high-water mark, until `f`
    /// answers false. Fences first (the second half of the server's Dekker pattern), and loads
    /// with acquire ordering so that finding a slot empty happens after the client's release.
    fn scan(&self, mut f: impl FnMut(u64) -> bool) {
        fence(SeqCst);
        for lane in 0..self.geometry.lanes {
            let high =
                (self.lane(lane)[W_HIGH].load(Acquire) as usize).min(self.geometry.slots as usize);
            for s in &self.lane_slots(lane)[..high] {
                let v = s.load(Acquire);
                if v != 0 && !f(v) {
                    return;
                }
            }
        }
    }

    pub(crate) fn is_held(&self, region: u32, page: u32) -> bool {
        let mut held = false;
        self.scan(|v| {
            held = unpack_slot(v) == (region, page);
            !held
        });
        held
    }

    pub(crate) fn held_pages(&self, out: &mut HashSet<(u32, u32)>) {
        out.clear();
        self.scan(|v| {
            out.insert(unpack_slot(v));
            true
        });
    }

    // ---- a client's side: the threads of the lane's one client ----

    /// Raises the high-water mark past `slot`, then fills the slot if it is empty. Both may be
    /// relaxed: the fence the caller issues before its recheck orders them before the recheck.
    pub(crate) fn claim(&self, lane: u32, tag: u8, slot: u32, region: u32, page: u32) -> bool {
        let Some(value) = pack_slot(tag, region, page) else {
            return false;
        };
        if slot >= self.geometry.slots {
            return false;
        }
        let line = self.lane(lane);
        // The mark only grows while the lane is this session's, so a mark already past the
        // slot needs no write (a locked read-modify-write per claim otherwise).
        if line[W_HIGH].load(Relaxed) <= u64::from(slot) {
            line[W_HIGH].fetch_max(u64::from(slot) + 1, Relaxed);
        }
        self.lane_slots(lane)[slot as usize]
            .compare_exchange(0, value, Relaxed, Relaxed)
            .is_ok()
    }

    /// The first half of the client's Dekker pattern: claims before, rechecks after.
    #[inline]
    pub(crate) fn fence(&self) {
        fence(SeqCst);
    }

    /// Empties `slot` if it holds exactly this client's claim of the page, with release
    /// ordering so the client's reads of the page come before a scan that finds it empty.
    pub(crate) fn release(&self, lane: u32, tag: u8, slot: u32, region: u32, page: u32) {
        let Some(value) = pack_slot(tag, region, page) else {
            return;
        };
        if slot >= self.geometry.slots {
            return;
        }
        let _ = self.lane_slots(lane)[slot as usize].compare_exchange(value, 0, Release, Relaxed);
    }

    /// A slot's value (for tests and models).
    #[cfg(any(test, loom))]
    pub(crate) fn slot_value(&self, lane: u32, slot: u32) -> u64 {
        self.lane_slots(lane)[slot as usize].load(Acquire)
    }
}

#[cfg(not(loom))]
mod file {
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};

    use maru_shm::{MapMode, Mapping};

    use super::*;

    /// The lanes' words of a mapping of a lanes file of geometry `g`.
    fn view(map: &Mapping, g: LaneGeometry) -> Lanes<'_> {
        debug_assert!(LANES_HEADER_BYTES as usize + g.words() * 8 <= map.len());
        // SAFETY: the `g.words()` words from byte 4096 lie inside the mapping (the header was
        // checked against the file's size, and the mapping covers `file_bytes`), are 8-aligned
        // (the mapping is page-aligned), and live as long as the borrow of `map`. AtomicU64
        // has u64's layout, so any bytes are a valid value, and every access through the view
        // is atomic, so stores by other processes are not data races.
        let words = unsafe {
            std::slice::from_raw_parts(
                map.as_ptr().add(LANES_HEADER_BYTES as usize) as *const AtomicU64,
                g.words(),
            )
        };
        Lanes { words, geometry: g }
    }

    fn io_err<'a>(path: &'a Path, op: &'static str) -> impl Fn(std::io::Error) -> IndexError + 'a {
        move |source| IndexError::new(path, ErrorKind::Io { op, source })
    }

    /// The server's side of the lanes file.
    pub struct LaneFile {
        map: Mapping,
        geometry: LaneGeometry,
        path: PathBuf,
    }

    impl LaneFile {
        /// Creates a fresh lanes file at `path` with `lanes` lanes of `slots` slots each. It
        /// is built under a temporary name in the same directory and renamed over `path`, so
        /// clients still mapping an earlier file (of a server that died) write into that one,
        /// never into this. Readable and writable by its owner only; sparse (only the header
        /// is written).
        pub fn create(path: &Path, lanes: u32, slots: u32) -> Result<LaneFile, IndexError> {
            let geometry = LaneGeometry::new(lanes, slots).map_err(|k| IndexError::new(path, k))?;
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(format!(".creating.{}", std::process::id()));
            let tmp = PathBuf::from(tmp);
            let _ = std::fs::remove_file(&tmp);
            let built = Self::build(path, &tmp, geometry);
            if built.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            built
        }

        fn build(path: &Path, tmp: &Path, geometry: LaneGeometry) -> Result<LaneFile, IndexError> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(tmp)
                .map_err(io_err(tmp, "create"))?;
            file.set_len(geometry.file_bytes())
                .map_err(io_err(tmp, "size"))?;
            file.write_all_at(&geometry.encode(), 0)
                .map_err(io_err(tmp, "write header"))?;
            let map = Mapping::map_fd(
                file.into(),
                path,
                0,
                geometry.file_bytes(),
                MapMode::ReadWrite,
                false,
            )
            .map_err(|e| IndexError::new(tmp, ErrorKind::Map(e)))?;
            std::fs::rename(tmp, path).map_err(io_err(path, "rename"))?;
            Ok(LaneFile {
                map,
                geometry,
                path: path.to_owned(),
            })
        }

        pub(super) fn lanes_view(&self) -> Lanes<'_> {
            view(&self.map, self.geometry)
        }

        pub fn path(&self) -> &Path {
            &self.path
        }

        pub fn lanes(&self) -> u32 {
            self.geometry.lanes
        }

        pub fn slots(&self) -> u32 {
            self.geometry.slots
        }

        /// Gives `lane` to a new session: returns the tag the session's client writes with
        /// (1..=255, advanced at every assignment, so a client of the lane's previous session
        /// never writes the new session's values). The server assigns one lane at a time.
        ///
        /// # Panics
        /// If `lane >= self.lanes()`.
        pub fn assign(&self, lane: u32) -> u8 {
            self.check(lane);
            self.lanes_view().assign(lane)
        }

        /// Empties `lane` (its session ended): every slot below the high-water mark to 0, then
        /// the mark. Slots above the mark are empty already, except for a claim of a client of
        /// the ended session that raced with the reset: it stays, refuses the next session's
        /// claims of that slot, and counts as a hold once the mark passes it (conservative).
        /// Leaving the rest alone keeps a reset from touching the pages of a sparse lane.
        ///
        /// # Panics
        /// If `lane >= self.lanes()`.
        pub fn reset(&self, lane: u32) {
            self.check(lane);
            self.lanes_view().reset(lane)
        }

        /// Whether any lane names page `page` of `region`, under any tag. Issues a SeqCst fence
        /// first: call it after the store that made the page unreachable (the key's removal
        /// from the index). Scans each lane's slots below its high-water mark only.
        pub fn is_held(&self, region: u32, page: u32) -> bool {
            self.lanes_view().is_held(region, page)
        }

        /// Every (region, page) any lane names, into `out` (cleared first), with the same
        /// fence: for the evictor, to pass held pages over.
        pub fn held_pages(&self, out: &mut HashSet<(u32, u32)>) {
            self.lanes_view().held_pages(out)
        }

        fn check(&self, lane: u32) {
            assert!(
                lane < self.geometry.lanes,
                "lane {lane} of {}",
                self.geometry.lanes
            );
        }
    }

    /// A client's own lane, mapped read-write.
    pub struct LaneWriter {
        map: Mapping,
        geometry: LaneGeometry,
        lane: u32,
        tag: u8,
    }

    impl LaneWriter {
        /// Maps lane `lane` of the lanes file at `path`, to write with `tag` (the one its
        /// session was given). Checks the header (size, magic, version, checksum, geometry),
        /// `lane` and `tag`; a file that fails is an error, never a panic.
        pub fn open(path: &Path, lane: u32, tag: u8) -> Result<LaneWriter, IndexError> {
            let err = |kind| IndexError::new(path, kind);
            if tag == 0 {
                return Err(err(ErrorKind::InvalidOptions(
                    "tag 0 marks an empty slot".into(),
                )));
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io_err(path, "open"))?;
            let geometry = read_geometry(path, &file)?;
            if lane >= geometry.lanes {
                return Err(err(ErrorKind::InvalidOptions(format!(
                    "lane {lane}, the file has {}",
                    geometry.lanes
                ))));
            }
            let map = Mapping::map_fd(
                file.into(),
                path,
                0,
                geometry.file_bytes(),
                MapMode::ReadWrite,
                false,
            )
            .map_err(|e| err(ErrorKind::Map(e)))?;
            Ok(LaneWriter {
                map,
                geometry,
                lane,
                tag,
            })
        }

        fn lanes_view(&self) -> Lanes<'_> {
            view(&self.map, self.geometry)
        }

        pub fn slots(&self) -> u32 {
            self.geometry.slots
        }

        /// The lane it writes into.
        pub fn lane(&self) -> u32 {
            self.lane
        }

        /// The tag of its session, in every value it writes.
        pub fn tag(&self) -> u8 {
            self.tag
        }

        /// Claims slot `slot` for page `page` of `region`: raises the lane's high-water mark
        /// past `slot`, then stores the page into the slot if it is empty. False, with nothing
        /// stored in the slot, when `slot >= self.slots()`, when `page` does not fit a slot
        /// ([`MAX_LANE_PAGE`]), or when the slot is not empty (a value of a client of the
        /// lane's previous session). Call [`LaneWriter::fence`] before rechecking the index.
        pub fn claim(&self, slot: u32, region: u32, page: u32) -> bool {
            self.lanes_view()
                .claim(self.lane, self.tag, slot, region, page)
        }

        /// The SeqCst fence between a batch of claims and their rechecks in the index.
        #[inline]
        pub fn fence(&self) {
            self.lanes_view().fence()
        }

        /// Ends the claim of `slot` for `page` of `region`, with release ordering (the reads of
        /// the page before it come before the server's return of the page). Nothing happens if
        /// the slot holds anything else (the lane was reset, and maybe given to another
        /// session).
        pub fn release(&self, slot: u32, region: u32, page: u32) {
            self.lanes_view()
                .release(self.lane, self.tag, slot, region, page)
        }
    }

    fn read_geometry(path: &Path, file: &File) -> Result<LaneGeometry, IndexError> {
        let file_len = file.metadata().map_err(io_err(path, "stat"))?.len();
        let mut header = vec![0u8; LANES_HEADER_BYTES.min(file_len) as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(io_err(path, "read header"))?;
        LaneGeometry::decode(&header, file_len).map_err(|k| IndexError::new(path, k))
    }

    #[cfg(test)]
    impl LaneFile {
        pub(crate) fn slot_value(&self, lane: u32, slot: u32) -> u64 {
            self.lanes_view().slot_value(lane, slot)
        }

        pub(crate) fn high_water(&self, lane: u32) -> u64 {
            self.lanes_view().lane(lane)[W_HIGH].load(Acquire)
        }
    }
}

#[cfg(not(loom))]
pub use file::{LaneFile, LaneWriter};

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn fresh(lanes: u32, slots: u32) -> (tempfile::TempDir, PathBuf, LaneFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.lanes");
        let f = LaneFile::create(&path, lanes, slots).unwrap();
        (dir, path, f)
    }

    #[test]
    fn both_sides_are_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<LaneFile>();
        shared::<LaneWriter>();
    }

    #[test]
    fn packing_keeps_region_and_page_and_refuses_what_does_not_fit() {
        let v = pack_slot(255, u32::MAX, MAX_LANE_PAGE - 1).unwrap();
        assert_eq!(v >> 56, 255);
        assert_eq!(unpack_slot(v), (u32::MAX, MAX_LANE_PAGE - 1));
        assert_eq!(unpack_slot(pack_slot(1, 0, 0).unwrap()), (0, 0));
        assert_ne!(pack_slot(1, 0, 0), Some(0));
        assert_eq!(pack_slot(1, 7, MAX_LANE_PAGE), None);
        assert_eq!(pack_slot(0, 7, 1), None);
    }

    #[test]
    fn absurd_geometries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        for (lanes, slots) in [(0, 1), (1, 0), (MAX_LANES + 1, 1), (1, MAX_LANE_SLOTS + 1)] {
            let e = LaneFile::create(&path, lanes, slots).err().unwrap();
            assert!(matches!(e.kind, ErrorKind::InvalidOptions(_)), "{e}");
        }
        assert!(!path.exists());
    }

    #[test]
    fn create_makes_a_sparse_private_file_of_the_geometry() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let (_dir, path, f) = fresh(3, 5);
        assert_eq!((f.lanes(), f.slots(), f.path()), (3, 5, path.as_path()));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // 5 slots and the line: 13 words, padded to 16 per lane.
        assert_eq!(meta.len(), (4096u64 + 3 * 128).div_ceil(4096) * 4096);
        let big = LaneFile::create(&path, MAX_LANES, 1 << 12).unwrap();
        let meta = std::fs::metadata(big.path()).unwrap();
        assert!(meta.len() > 1 << 31);
        assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
    }

    #[test]
    fn assign_advances_the_tag_through_1_to_255() {
        let (_dir, _path, f) = fresh(2, 4);
        let tags: Vec<u8> = (0..256).map(|_| f.assign(1)).collect();
        assert_eq!(&tags[..3], &[1, 2, 3]);
        assert_eq!(tags[254], 255);
        assert_eq!(tags[255], 1);
        assert_eq!(f.assign(0), 1);
    }

    #[test]
    fn claims_are_held_until_released_or_reset() {
        let (_dir, path, f) = fresh(2, 4);
        let tag = f.assign(1);
        let w = LaneWriter::open(&path, 1, tag).unwrap();
        assert_eq!(w.slots(), 4);
        assert!(!f.is_held(3, 9));
        assert!(w.claim(2, 3, 9));
        assert_eq!(f.high_water(1), 3);
        w.fence();
        assert!(f.is_held(3, 9));
        assert!(!f.is_held(3, 8) && !f.is_held(2, 9));
        // Taken slots, slots past the end and pages past the packing are refused.
        assert!(!w.claim(2, 3, 10));
        assert!(!w.claim(4, 3, 10));
        assert!(!w.claim(0, 3, MAX_LANE_PAGE));
        assert_eq!(f.slot_value(1, 0), 0);
        assert!(w.claim(0, u32::MAX, MAX_LANE_PAGE - 1));
        let mut held = HashSet::from([(99, 99)]);
        f.held_pages(&mut held);
        assert_eq!(held, HashSet::from([(3, 9), (u32::MAX, MAX_LANE_PAGE - 1)]));
        // A release of another page leaves the slot alone.
        w.release(2, 3, 8);
        assert!(f.is_held(3, 9));
        w.release(2, 3, 9);
        assert!(!f.is_held(3, 9));
        assert_eq!(f.slot_value(1, 2), 0);
        f.reset(1);
        assert_eq!(f.high_water(1), 0);
        assert_eq!(f.slot_value(1, 0), 0);
        f.held_pages(&mut held);
        assert!(held.is_empty());
    }

    #[test]
    fn a_scan_looks_below_the_high_water_mark_only() {
        let (_dir, path, f) = fresh(1, 8);
        let w = LaneWriter::open(&path, 0, f.assign(0)).unwrap();
        assert!(w.claim(5, 1, 1));
        f.lanes_view().lane(0)[W_HIGH].store(5, Release);
        assert!(!f.is_held(1, 1));
        assert!(w.claim(0, 1, 2));
        assert_eq!(f.high_water(0), 5);
        assert!(f.is_held(1, 2));
    }

    #[test]
    fn a_client_of_an_ended_session_cannot_clear_the_new_sessions_holds() {
        let (_dir, path, f) = fresh(1, 4);
        let old = LaneWriter::open(&path, 0, f.assign(0)).unwrap();
        assert!(old.claim(0, 1, 1));
        f.reset(0);
        let new = LaneWriter::open(&path, 0, f.assign(0)).unwrap();
        assert_ne!(old.tag(), new.tag());
        assert!(new.claim(0, 1, 1));
        old.release(0, 1, 1);
        assert!(f.is_held(1, 1));
        // Its late claims fill empty slots only, and count as holds until the next reset.
        assert!(!old.claim(0, 2, 2));
        assert!(old.claim(1, 2, 2));
        assert!(!new.claim(1, 3, 3));
        assert!(f.is_held(2, 2));
        new.release(0, 1, 1);
        assert!(!f.is_held(1, 1));
        f.reset(0);
        assert!(!f.is_held(2, 2));
    }

    #[test]
    fn open_refuses_a_lane_or_tag_the_file_does_not_have() {
        let (_dir, path, _f) = fresh(2, 4);
        let e = LaneWriter::open(&path, 2, 1).err().unwrap();
        assert!(matches!(e.kind, ErrorKind::InvalidOptions(_)), "{e}");
        let e = LaneWriter::open(&path, 0, 0).err().unwrap();
        assert!(matches!(e.kind, ErrorKind::InvalidOptions(_)), "{e}");
        let e = LaneWriter::open(&path.with_extension("none"), 0, 1)
            .err()
            .unwrap();
        assert!(matches!(e.kind, ErrorKind::Io { .. }), "{e}");
    }
}
