//! A pool on a DAX-mounted file system (pmem or CXL memory mounted with `-o dax`): one file
//! per region, named by region id. The allocator still places regions in a virtual range of
//! the file system's size, which is what keeps the accounting (total, free, largest extent)
//! the same for every pool kind.

use std::io;
use std::path::{Path, PathBuf};

use rustix::fs::FallocateFlags;

use maru_proto::Access;

use super::{
    header, open_shared_file, HeaderPlace, Pool, PoolError, PoolGeometry, PoolKind, DEFAULT_ALIGN,
};
use crate::mapping::fs_page_size;
use crate::naming::Naming;

#[derive(Debug)]
pub struct FsDaxPool {
    /// Its path is the pool's directory.
    geometry: PoolGeometry,
    naming: Naming,
}

impl FsDaxPool {
    /// Opens an existing directory. Its capacity is the file system's size, rounded down to
    /// the alignment.
    pub fn open(dir: &Path, naming: Naming) -> Result<FsDaxPool, PoolError> {
        let meta = std::fs::metadata(dir).map_err(|e| PoolError::io(dir, e))?;
        if !meta.is_dir() {
            return Err(PoolError::invalid(dir, "fs-dax pool must be a directory"));
        }
        let size =
            fs_capacity(dir).map_err(|e| PoolError::io(dir, e))? / DEFAULT_ALIGN * DEFAULT_ALIGN;
        if size == 0 {
            return Err(PoolError::invalid(
                dir,
                "file system is smaller than one region",
            ));
        }
        let page_size = fs_page_size(dir).map_err(|e| PoolError::io(dir, e))?;
        Ok(FsDaxPool {
            geometry: PoolGeometry {
                kind: PoolKind::FsDax,
                path: dir.to_owned(),
                total_size: size,
                align: DEFAULT_ALIGN,
                page_size,
            },
            naming,
        })
    }

    fn dir(&self) -> &Path {
        &self.geometry.path
    }

    pub fn region_path(&self, region_id: u64) -> PathBuf {
        self.naming.region_file(self.dir(), region_id)
    }
}

fn fs_capacity(dir: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_blocks.saturating_mul(st.f_frsize))
}

impl Pool for FsDaxPool {
    fn geometry(&self) -> &PoolGeometry {
        &self.geometry
    }
    fn header_place(&self) -> HeaderPlace {
        HeaderPlace::Sidecar {
            path: self.dir().join(header::SIDECAR_NAME),
        }
    }
    /// Regions are files of their own: the range has no start to give up.
    fn reserved(&self) -> u64 {
        0
    }
    fn access(&self, region_id: u64, _offset: u64, len: u64, pool_uuid: [u8; 16]) -> Access {
        Access {
            path: self.region_path(region_id).to_string_lossy().into_owned(),
            offset: 0,
            len,
            page_size: self.geometry.page_size,
            pool_uuid,
        }
    }
    fn prepare_region(&self, region_id: u64, _offset: u64, len: u64) -> Result<(), PoolError> {
        let path = self.region_path(region_id);
        // Truncate: a file left by a crash under this id must not show its old bytes.
        let file = open_shared_file(&path, true)?;
        // Allocate the blocks now: on DAX a fault on a hole of a full file system is SIGBUS
        // in the client, an ENOSPC here is a clear error.
        match rustix::fs::fallocate(&file, FallocateFlags::empty(), 0, len) {
            Ok(()) => {}
            Err(rustix::io::Errno::OPNOTSUPP) => {
                file.set_len(len).map_err(|e| PoolError::io(&path, e))?
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(PoolError::io(&path, e.into()));
            }
        }
        Ok(())
    }
    fn release_region(&self, region_id: u64, _offset: u64, _len: u64) -> Result<(), PoolError> {
        let path = self.region_path(region_id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(PoolError::io(&path, e)),
        }
    }
    fn remove_stale_regions(&self, is_live: &dyn Fn(u64) -> bool) -> Result<usize, PoolError> {
        let mut removed = 0;
        for entry in std::fs::read_dir(self.dir()).map_err(|e| PoolError::io(self.dir(), e))? {
            let entry = entry.map_err(|e| PoolError::io(self.dir(), e))?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| self.naming.parse_region_file_name(n))
            else {
                continue;
            };
            if !is_live(id) {
                self.release_region(id, 0, 0)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Mount points of DAX file systems in `/proc/mounts` text: entries whose options include
/// `dax` or `dax=always` / `dax=inode` (not `dax=never`).
pub fn parse_dax_mounts(mounts: &str) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_dev, dir, _fstype, options) = (
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
            );
            let dax = options
                .split(',')
                .any(|o| o == "dax" || (o.starts_with("dax=") && o != "dax=never"));
            dax.then(|| PathBuf::from(unescape_mount_path(dir)))
        })
        .collect()
}

/// `/proc/mounts` writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::test_dir;

    const MOUNTS_FIXTURE: &str = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
/dev/pmem0 /mnt/pmem0 ext4 rw,relatime,dax 0 0
/dev/pmem1 /mnt/pmem\\0401 xfs rw,relatime,attr2,dax=always,inode64 0 0
/dev/pmem2 /mnt/pmem2 xfs rw,relatime,dax=never 0 0
/dev/pmem3 /mnt/pmem3 ext4 rw,relatime,dax=inode 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
/dev/sda1 /daxfoo ext4 rw,relatime,nodax 0 0
garbage
";

    #[test]
    fn dax_mounts_are_found_in_proc_mounts_fixture() {
        assert_eq!(
            parse_dax_mounts(MOUNTS_FIXTURE),
            vec![
                PathBuf::from("/mnt/pmem0"),
                PathBuf::from("/mnt/pmem 1"),
                PathBuf::from("/mnt/pmem3"),
            ]
        );
        assert!(parse_dax_mounts("").is_empty());
    }

    /// The FS_DAX logic (one file per region, stale-file cleanup) on a plain tmpfs directory.
    #[test]
    fn region_files_on_a_plain_directory() {
        let d = test_dir();
        let naming = Naming::new("t-fsdax");
        let p = FsDaxPool::open(d.path(), naming.clone()).unwrap();
        assert!(p.total_size() >= DEFAULT_ALIGN);
        assert_eq!(p.kind().name(), "fs-dax");
        p.prepare_region(7, 0, 4 << 20).unwrap();
        p.prepare_region(9, 4 << 20, 2 << 20).unwrap();
        let a = p.access(7, 123, 4 << 20, [1; 16]);
        assert_eq!(a.offset, 0);
        assert_eq!(std::fs::metadata(&a.path).unwrap().len(), 4 << 20);
        std::fs::write(d.path().join("unrelated"), b"x").unwrap();
        assert_eq!(p.remove_stale_regions(&|id| id == 9).unwrap(), 1);
        assert!(!Path::new(&a.path).exists());
        assert!(p.region_path(9).exists());
        assert!(d.path().join("unrelated").exists());
        p.release_region(9, 0, 0).unwrap();
        p.release_region(9, 0, 0).unwrap();
        assert!(!p.region_path(9).exists());
        assert!(FsDaxPool::open(&d.path().join("unrelated"), naming).is_err());
    }
}
