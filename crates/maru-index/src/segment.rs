//! The index file mapped into this process, and the typed views over it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use maru_shm::{MapMode, Mapping};

use crate::error::{ErrorKind, IndexError};
use crate::layout::{Geometry, HEADER_BYTES, HEADER_WORDS};
use crate::sync::{AtomicU32, AtomicU64};
use crate::table::Table;

pub(crate) struct Segment {
    map: Mapping,
    pub(crate) geometry: Geometry,
    pub(crate) path: PathBuf,
}

impl Segment {
    /// Reads and checks the header of `file`, then maps the whole index.
    pub(crate) fn open(
        path: &Path,
        file: &File,
        mode: MapMode,
        populate: bool,
    ) -> Result<Segment, IndexError> {
        let err = |kind| IndexError::new(path, kind);
        let file_len = file
            .metadata()
            .map_err(|source| err(ErrorKind::Io { op: "stat", source }))?
            .len();
        let mut header = vec![0u8; HEADER_BYTES.min(file_len) as usize];
        file.read_exact_at(&mut header, 0).map_err(|source| {
            err(ErrorKind::Io {
                op: "read header",
                source,
            })
        })?;
        let geometry = Geometry::decode(&header, file_len).map_err(err)?;
        let map = Mapping::map(path, 0, geometry.file_bytes(), mode, populate)
            .map_err(|e| err(ErrorKind::Map(e)))?;
        Ok(Segment {
            map,
            geometry,
            path: path.to_owned(),
        })
    }

    fn words<T>(&self, offset: u64, count: u64) -> &[T] {
        debug_assert!(offset + count * size_of::<T>() as u64 <= self.map.len() as u64);
        debug_assert!((offset as usize).is_multiple_of(align_of::<T>()));
        // SAFETY: the range lies inside the mapping (the geometry was checked against the file
        // size and the mapping covers `file_bytes`), is aligned (the mapping is page-aligned
        // and every section offset is a multiple of 64), and lives as long as `&self`. `T` is
        // AtomicU32 or AtomicU64, which have the layout of u32/u64, so any bytes are valid
        // values, and all access through them is atomic, so stores by other processes are not
        // data races. On a read-only mapping only loads are made (lock-free loads of 4 and 8
        // bytes are plain reads on the platforms this runs on).
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().add(offset as usize) as *const T,
                count as usize,
            )
        }
    }

    /// The header viewed as atomic words (the first 160 bytes).
    pub(crate) fn header(&self) -> &[AtomicU64] {
        self.words(0, HEADER_WORDS as u64)
    }

    pub(crate) fn table(&self) -> Table<'_> {
        let g = &self.geometry;
        Table {
            buckets: self.words::<AtomicU32>(g.buckets_offset(), g.buckets * 16),
            entries: self.words::<AtomicU64>(g.entries_offset(), g.slots() * 8),
            keys: self.words::<AtomicU64>(g.key_area_offset(), g.key_area_words()),
            nbuckets: g.buckets,
            seed: g.seed,
        }
    }

    pub(crate) fn mapped_bytes(&self) -> u64 {
        self.map.len() as u64
    }
}
