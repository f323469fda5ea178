//! A pool in one file on tmpfs (`/dev/shm`) or hugetlbfs. Regions are offsets into the file;
//! freed regions give their memory back by punching a hole.

use std::fs::File;
use std::path::Path;

use rustix::fs::FallocateFlags;

use super::{open_shared_file, round_up, Pool, PoolError, PoolGeometry, PoolKind, DEFAULT_ALIGN};
use crate::mapping::fs_page_size;

#[derive(Debug)]
pub struct ShmPool {
    geometry: PoolGeometry,
    /// Kept open for `fallocate` on release.
    file: File,
}

impl ShmPool {
    /// Opens or creates the pool file and sizes it to at least `size` rounded up to the file
    /// system's page size, plus one alignment unit in front for the pool header: `size` is
    /// what the pool can hand out (the header's extent costs one page of memory, the rest of
    /// it is never touched). An existing larger file is left as it is (it may hold regions
    /// of a previous configuration) and only that range of it is used.
    pub fn open(path: &Path, size: u64) -> Result<ShmPool, PoolError> {
        if size == 0 {
            return Err(PoolError::invalid(path, "pool size must not be zero"));
        }
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .ok_or_else(|| PoolError::invalid(path, "pool path has no directory"))?;
        std::fs::create_dir_all(dir).map_err(|e| PoolError::io(dir, e))?;
        let page_size = fs_page_size(dir).map_err(|e| PoolError::io(dir, e))?;
        // Regions stay mappable with huge pages even on tmpfs today, and on hugetlbfs the
        // page size itself may be larger than 2 MiB (1 GiB pages).
        let align = DEFAULT_ALIGN.max(page_size);
        let size = round_up(size, page_size)
            .and_then(|s| s.checked_add(align))
            .ok_or_else(|| PoolError::invalid(path, "pool size overflows"))?;
        let file = open_shared_file(path, false)?;
        let meta = file.metadata().map_err(|e| PoolError::io(path, e))?;
        if !meta.is_file() {
            return Err(PoolError::invalid(path, "not a regular file"));
        }
        if meta.len() < size {
            file.set_len(size).map_err(|e| PoolError::io(path, e))?;
        }
        Ok(ShmPool {
            geometry: PoolGeometry {
                kind: PoolKind::Shm,
                path: path.to_owned(),
                total_size: size,
                align,
                page_size,
            },
            file,
        })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), PoolError> {
        // PUNCH_HOLE|KEEP_SIZE only drops the range's pages; the kernel validates the range.
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        rustix::fs::fallocate(&self.file, flags, offset, len)
            .map_err(|e| PoolError::io(&self.geometry.path, e.into()))
    }
}

impl Pool for ShmPool {
    fn geometry(&self) -> &PoolGeometry {
        &self.geometry
    }
    fn release_region(&self, _region_id: u64, offset: u64, len: u64) -> Result<(), PoolError> {
        self.punch_hole(offset, len)
    }
    fn release_free_extent(&self, offset: u64, len: u64) -> Result<(), PoolError> {
        self.punch_hole(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::test_dir;
    use crate::{MapMode, Mapping};

    #[test]
    fn open_creates_sizes_and_keeps_a_larger_file() {
        let d = test_dir();
        let path = d.path().join("sub/pool0");
        let p = ShmPool::open(&path, 10_000).unwrap();
        let asked = round_up(10_000, p.page_size()).unwrap();
        assert_eq!(
            p.total_size(),
            asked + DEFAULT_ALIGN,
            "the header's extent comes on top"
        );
        assert_eq!(p.reserved(), DEFAULT_ALIGN);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), p.total_size());
        assert_eq!(p.align(), DEFAULT_ALIGN);
        assert_eq!(p.kind().name(), "shm");
        drop(p);
        let again = ShmPool::open(&path, 4096).unwrap();
        assert_eq!(again.total_size(), 4096 + DEFAULT_ALIGN);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            asked + DEFAULT_ALIGN
        );
    }

    #[test]
    fn release_zeroes_the_region_for_its_next_owner() {
        let d = test_dir();
        let path = d.path().join("pool");
        let p = ShmPool::open(&path, 8 << 20).unwrap();
        let a = p.access(1, 2 << 20, 2 << 20, [1; 16]);
        assert_eq!(a.path, path.to_string_lossy());
        let m = Mapping::map(&path, a.offset, a.len, MapMode::ReadWrite, false).unwrap();
        m.write_at(0, b"secret").unwrap();
        p.release_region(1, a.offset, a.len).unwrap();
        let mut out = [1u8; 6];
        m.read_at(0, &mut out).unwrap();
        assert_eq!(out, [0; 6]);
    }

    #[test]
    fn directory_path_is_refused() {
        let d = test_dir();
        assert!(ShmPool::open(d.path(), 4096).is_err());
        assert!(ShmPool::open(&d.path().join("p"), 0).is_err());
    }
}
