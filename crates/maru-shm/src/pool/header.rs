//! The pool header: what makes a pool recognisable as one particular pool. The resource
//! manager writes it when it formats a pool and checks it when it opens one; clients read it
//! from the file or device they are about to map and refuse a pool whose UUID is not the one
//! their grant names (a host that names the wrong device).
//!
//! Layout (little-endian), in the first [`HEADER_LEN`] bytes of the header's place:
//!
//! | bytes  | field                                              |
//! |--------|----------------------------------------------------|
//! | 0..8   | magic `MARUPOOL`                                   |
//! | 8..12  | layout version ([`LAYOUT_VERSION`])                |
//! | 12..16 | pool kind (1 shm, 2 fs-dax, 3 dev-dax)             |
//! | 16..32 | UUID (random, version 4)                           |
//! | 32..40 | pool size in bytes (the whole range, header too)   |
//! | 40..48 | alignment of regions                               |
//! | 48..56 | page size of the backing memory                    |
//! | 56..64 | bytes reserved at the start (the header's extent)  |
//! | 64..68 | CRC32 of bytes 0..64                               |
//!
//! The rest of the block is zero. Where it lives ([`HeaderPlace`]): in a shm file or a
//! DEV_DAX device, at offset 0 of a first extent of one alignment unit that the allocator
//! never hands out; in an FS_DAX directory (one file per region, no common range), in the
//! sidecar file [`SIDECAR_NAME`].

use std::path::{Path, PathBuf};

use maru_proto::Access;

use super::{PoolError, PoolKind};
use crate::mapping::{MapMode, Mapping};

/// Bytes of the header block.
pub const HEADER_LEN: usize = 4096;
/// First bytes of every pool header.
pub const MAGIC: [u8; 8] = *b"MARUPOOL";
/// The layout this code writes and reads.
pub const LAYOUT_VERSION: u32 = 1;
/// The header file of an FS_DAX pool, in the pool's directory.
pub const SIDECAR_NAME: &str = "maru-pool.header";

const CRC_AT: usize = 64;

/// A pool's identity and geometry as its header records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolHeader {
    pub uuid: [u8; 16],
    pub kind: PoolKind,
    /// The whole range of the pool, the reserved start included.
    pub total_size: u64,
    pub align: u64,
    pub page_size: u64,
    /// Bytes at the start of the range that hold the header and are never allocated.
    pub reserved: u64,
}

/// Why a header block is not a valid header of this layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Zeroes where the magic goes (or no sidecar file): a pool never formatted.
    #[error("no pool header (never formatted)")]
    Blank,
    /// Something else is there: not a Maru pool, or a pool of a layout before headers.
    #[error("no pool header (the first bytes are not a Maru pool header)")]
    Foreign,
    #[error("pool header of layout version {0}, this build reads version {LAYOUT_VERSION}")]
    Version(u32),
    #[error("pool header checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("pool header field {0} is invalid")]
    Field(&'static str),
}

impl PoolKind {
    fn code(self) -> u32 {
        match self {
            PoolKind::Shm => 1,
            PoolKind::FsDax => 2,
            PoolKind::DevDax => 3,
        }
    }
    fn from_code(v: u32) -> Option<PoolKind> {
        match v {
            1 => Some(PoolKind::Shm),
            2 => Some(PoolKind::FsDax),
            3 => Some(PoolKind::DevDax),
            _ => None,
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl PoolHeader {
    /// A fresh identity (a random UUID) for a pool of this geometry.
    pub fn new(kind: PoolKind, total_size: u64, align: u64, page_size: u64, reserved: u64) -> Self {
        PoolHeader {
            uuid: *uuid::Uuid::new_v4().as_bytes(),
            kind,
            total_size,
            align,
            page_size,
            reserved,
        }
    }

    /// The UUID in its canonical text form.
    pub fn uuid_text(&self) -> String {
        uuid_text(&self.uuid)
    }

    pub fn encode(&self) -> Box<[u8; HEADER_LEN]> {
        let mut b = Box::new([0u8; HEADER_LEN]);
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.kind.code().to_le_bytes());
        b[16..32].copy_from_slice(&self.uuid);
        b[32..40].copy_from_slice(&self.total_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.align.to_le_bytes());
        b[48..56].copy_from_slice(&self.page_size.to_le_bytes());
        b[56..64].copy_from_slice(&self.reserved.to_le_bytes());
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a header block (at least the first 68 bytes of it).
    pub fn decode(b: &[u8]) -> Result<PoolHeader, HeaderError> {
        if b.len() < CRC_AT + 4 || b[..8].iter().all(|&x| x == 0) {
            return Err(HeaderError::Blank);
        }
        if b[..8] != MAGIC {
            return Err(HeaderError::Foreign);
        }
        let version = u32_at(b, 8);
        if version != LAYOUT_VERSION {
            return Err(HeaderError::Version(version));
        }
        let stored = u32_at(b, CRC_AT);
        let computed = crc32fast::hash(&b[..CRC_AT]);
        if stored != computed {
            return Err(HeaderError::Checksum { stored, computed });
        }
        let kind = PoolKind::from_code(u32_at(b, 12)).ok_or(HeaderError::Field("kind"))?;
        let h = PoolHeader {
            uuid: b[16..32].try_into().expect("16 bytes"),
            kind,
            total_size: u64_at(b, 32),
            align: u64_at(b, 40),
            page_size: u64_at(b, 48),
            reserved: u64_at(b, 56),
        };
        if h.uuid == [0; 16] {
            return Err(HeaderError::Field("uuid"));
        }
        if h.align == 0 || !h.align.is_power_of_two() {
            return Err(HeaderError::Field("align"));
        }
        if h.reserved > h.total_size {
            return Err(HeaderError::Field("reserved"));
        }
        Ok(h)
    }
}

/// A UUID in its canonical text form.
pub fn uuid_text(uuid: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*uuid).to_string()
}

/// Where a pool's header is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderPlace {
    /// At offset 0 of the pool's file or device, read by mapping its first `map_len` bytes
    /// (a page of the backing memory: hugetlbfs and DEV_DAX map only whole pages, and DEV_DAX
    /// cannot be read with `read(2)` at all).
    InPool { path: PathBuf, map_len: u64 },
    /// A file of its own.
    Sidecar { path: PathBuf },
}

impl HeaderPlace {
    pub fn path(&self) -> &Path {
        match self {
            HeaderPlace::InPool { path, .. } | HeaderPlace::Sidecar { path } => path,
        }
    }

    /// Reads the header. The outer error is the file's (missing, unreadable); the inner one
    /// says why what is there is not a header.
    pub fn read(&self) -> Result<Result<PoolHeader, HeaderError>, PoolError> {
        match self {
            HeaderPlace::InPool { path, map_len } => {
                let len = (*map_len).max(HEADER_LEN as u64);
                let m = Mapping::map(path, 0, len, MapMode::ReadOnly, false)
                    .map_err(|e| PoolError::invalid(path, e.to_string()))?;
                let mut b = vec![0u8; HEADER_LEN];
                m.read_at(0, &mut b)
                    .map_err(|e| PoolError::invalid(path, e.to_string()))?;
                Ok(PoolHeader::decode(&b))
            }
            HeaderPlace::Sidecar { path } => match std::fs::read(path) {
                Ok(b) => Ok(PoolHeader::decode(&b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Err(HeaderError::Blank)),
                Err(e) => Err(PoolError::io(path, e)),
            },
        }
    }

    /// Reads the header through `fd`, a descriptor of the pool's own file (the place is
    /// [`HeaderPlace::InPool`]: what a client that was passed the descriptor, and may not
    /// open the path, can read); a sidecar is read from its path.
    pub fn read_through(
        &self,
        fd: &std::os::fd::OwnedFd,
    ) -> Result<Result<PoolHeader, HeaderError>, PoolError> {
        match self {
            HeaderPlace::InPool { path, map_len } => {
                let len = (*map_len).max(HEADER_LEN as u64);
                let fd = fd.try_clone().map_err(|e| PoolError::io(path, e))?;
                let m = Mapping::map_fd(fd, path, 0, len, MapMode::ReadOnly, false)
                    .map_err(|e| PoolError::invalid(path, e.to_string()))?;
                let mut b = vec![0u8; HEADER_LEN];
                m.read_at(0, &mut b)
                    .map_err(|e| PoolError::invalid(path, e.to_string()))?;
                Ok(PoolHeader::decode(&b))
            }
            HeaderPlace::Sidecar { .. } => self.read(),
        }
    }

    /// Writes `h` (durably: a sidecar is replaced atomically and synced).
    pub fn write(&self, h: &PoolHeader) -> Result<(), PoolError> {
        let bytes = h.encode();
        match self {
            HeaderPlace::InPool { path, map_len } => {
                let len = (*map_len).max(HEADER_LEN as u64);
                let m = Mapping::map(path, 0, len, MapMode::ReadWrite, false)
                    .map_err(|e| PoolError::invalid(path, e.to_string()))?;
                m.write_at(0, &bytes[..])
                    .map_err(|e| PoolError::invalid(path, e.to_string()))?;
                // SAFETY: msync on the live mapping `m` owns, over its whole length.
                unsafe {
                    rustix::mm::msync(m.as_ptr().cast(), m.len(), rustix::mm::MsyncFlags::SYNC)
                }
                .map_err(|e| PoolError::io(path, e.into()))
            }
            HeaderPlace::Sidecar { path } => {
                use std::io::Write;
                let tmp = path.with_extension("tmp");
                let mut f = super::open_shared_file(&tmp, true)?;
                f.write_all(&bytes[..])
                    .and_then(|()| f.sync_all())
                    .map_err(|e| PoolError::io(&tmp, e))?;
                std::fs::rename(&tmp, path).map_err(|e| PoolError::io(path, e))
            }
        }
    }
}

/// Where a client on this host finds a granted region and its pool's header: the pool is the
/// one the grant's handle names (`pool`, as the resource manager's host names it), or
/// `pool_path` when this host names it its own way. A region that is the pool file itself at
/// an offset (shm, DEV_DAX) has the header in that file; a region that is a file of its own
/// (FS_DAX) sits in the pool's directory beside its sidecar.
pub fn locate(pool: &str, access: &Access, pool_path: Option<&Path>) -> (PathBuf, HeaderPlace) {
    let region = Path::new(&access.path);
    let in_pool = access.path == pool;
    let pool = pool_path.unwrap_or(Path::new(pool));
    if in_pool {
        let place = HeaderPlace::InPool {
            path: pool.to_owned(),
            map_len: access.page_size,
        };
        return (pool.to_owned(), place);
    }
    let file = match (pool_path, region.file_name()) {
        (Some(dir), Some(name)) => dir.join(name),
        _ => region.to_owned(),
    };
    let dir = match pool_path {
        Some(dir) => dir.to_owned(),
        None => region.parent().unwrap_or(Path::new("/")).to_owned(),
    };
    let place = HeaderPlace::Sidecar {
        path: dir.join(SIDECAR_NAME),
    };
    (file, place)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::test_dir;

    fn sample() -> PoolHeader {
        PoolHeader::new(PoolKind::Shm, 64 << 20, 2 << 20, 4096, 2 << 20)
    }

    #[test]
    fn a_header_round_trips_and_uuids_differ() {
        let h = sample();
        let b = h.encode();
        assert_eq!(&b[..8], b"MARUPOOL");
        assert!(b[CRC_AT + 4..].iter().all(|&x| x == 0));
        assert_eq!(PoolHeader::decode(&b[..]), Ok(h));
        assert_ne!(sample().uuid, h.uuid, "every format draws a new UUID");
        assert_eq!(h.uuid_text().len(), 36);
        for kind in [PoolKind::Shm, PoolKind::FsDax, PoolKind::DevDax] {
            let h = PoolHeader { kind, ..h };
            assert_eq!(PoolHeader::decode(&h.encode()[..]), Ok(h));
        }
    }

    #[test]
    fn every_flipped_bit_of_the_checked_fields_is_refused() {
        let b = sample().encode();
        for byte in 0..CRC_AT + 4 {
            for bit in 0..8 {
                let mut c = b.clone();
                c[byte] ^= 1 << bit;
                assert!(
                    PoolHeader::decode(&c[..]).is_err(),
                    "bit {bit} of byte {byte} flipped and accepted"
                );
            }
        }
        let mut c = b.clone();
        c[20] ^= 0xff;
        assert!(matches!(
            PoolHeader::decode(&c[..]),
            Err(HeaderError::Checksum { .. })
        ));
    }

    #[test]
    fn blank_foreign_and_newer_blocks_are_told_apart() {
        assert_eq!(
            PoolHeader::decode(&[0u8; HEADER_LEN]),
            Err(HeaderError::Blank)
        );
        assert_eq!(PoolHeader::decode(&[]), Err(HeaderError::Blank));
        assert_eq!(
            PoolHeader::decode(&[7u8; HEADER_LEN]),
            Err(HeaderError::Foreign)
        );
        let mut b = sample().encode();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(PoolHeader::decode(&b[..]), Err(HeaderError::Version(2)));
        let mut b = sample().encode();
        b[12..16].copy_from_slice(&9u32.to_le_bytes());
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(PoolHeader::decode(&b[..]), Err(HeaderError::Field("kind")));
    }

    #[test]
    fn headers_are_written_and_read_in_a_pool_file_and_in_a_sidecar() {
        let d = test_dir();
        let file = d.path().join("pool");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let in_pool = HeaderPlace::InPool {
            path: file.clone(),
            map_len: 4096,
        };
        assert_eq!(in_pool.read().unwrap(), Err(HeaderError::Blank));
        let h = sample();
        in_pool.write(&h).unwrap();
        assert_eq!(in_pool.read().unwrap(), Ok(h));

        let side = HeaderPlace::Sidecar {
            path: d.path().join(SIDECAR_NAME),
        };
        assert_eq!(side.read().unwrap(), Err(HeaderError::Blank));
        side.write(&h).unwrap();
        assert_eq!(side.read().unwrap(), Ok(h));
        assert!(!d.path().join("maru-pool.tmp").exists());

        let missing = HeaderPlace::InPool {
            path: d.path().join("nothing"),
            map_len: 4096,
        };
        assert!(missing.read().is_err());
    }

    #[test]
    fn a_grant_is_located_under_the_hosts_own_pool_path() {
        let access = |path: &str| Access {
            path: path.into(),
            offset: 2 << 20,
            len: 2 << 20,
            page_size: 4096,
            pool_uuid: [1; 16],
        };
        let shm = access("/dev/shm/maru/pool0");
        let (file, place) = locate("/dev/shm/maru/pool0", &shm, None);
        assert_eq!(file, Path::new("/dev/shm/maru/pool0"));
        assert_eq!(
            place,
            HeaderPlace::InPool {
                path: file.clone(),
                map_len: 4096
            }
        );
        let (file, place) = locate("/dev/shm/maru/pool0", &shm, Some(Path::new("/dev/dax1.0")));
        assert_eq!(file, Path::new("/dev/dax1.0"));
        assert_eq!(place.path(), Path::new("/dev/dax1.0"));

        let fsdax = access("/mnt/pmem0/maru-region-0000000000000007");
        let (file, place) = locate("/mnt/pmem0", &fsdax, None);
        assert_eq!(file, Path::new("/mnt/pmem0/maru-region-0000000000000007"));
        assert_eq!(place.path(), Path::new("/mnt/pmem0/maru-pool.header"));
        let (file, place) = locate("/mnt/pmem0", &fsdax, Some(Path::new("/mnt/cxl")));
        assert_eq!(file, Path::new("/mnt/cxl/maru-region-0000000000000007"));
        assert_eq!(place.path(), Path::new("/mnt/cxl/maru-pool.header"));
    }
}
