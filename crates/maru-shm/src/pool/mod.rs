//! Pool kinds behind one trait, one file per implementation:
//!
//! - [`shm::ShmPool`]: one file on tmpfs or hugetlbfs; regions are offsets into it. Runs
//!   anywhere, and is what tests, CI and `maru up` use.
//! - [`fs_dax::FsDaxPool`]: a DAX-mounted directory; one file per region.
//! - [`dev_dax::DevDaxPool`]: a character device `/dev/daxX.Y`; regions are offsets into it.
//!
//! A [`PoolSpec`] (`shm:PATH:SIZE`, `fs-dax:DIR`, `dev-dax:/dev/daxX.Y`) says which pool to
//! open; [`discover`] finds DAX hardware when no spec is given.

pub mod dev_dax;
pub mod fs_dax;
pub mod header;
pub mod shm;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use maru_proto::Access;

use crate::naming::Naming;

pub use dev_dax::DevDaxPool;
pub use fs_dax::FsDaxPool;
pub use header::{HeaderError, HeaderPlace, PoolHeader};
pub use shm::ShmPool;

/// Default region alignment: 2 MiB, so every region can be mapped with huge pages.
pub const DEFAULT_ALIGN: u64 = 2 * 1024 * 1024;

/// Why a pool could not be opened or a region prepared or released.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl PoolError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        PoolError::Io {
            path: path.to_owned(),
            source,
        }
    }
    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        PoolError::Invalid {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Which kind of memory a pool is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolKind {
    Shm,
    FsDax,
    DevDax,
}

impl PoolKind {
    /// `shm`, `fs-dax` or `dev-dax` (as in specs, stats and metrics).
    pub fn name(self) -> &'static str {
        match self {
            PoolKind::Shm => "shm",
            PoolKind::FsDax => "fs-dax",
            PoolKind::DevDax => "dev-dax",
        }
    }
}

impl fmt::Display for PoolKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a pool is and how large, as [`Pool`]'s accessors report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolGeometry {
    pub kind: PoolKind,
    /// The file, directory or device the pool lives in.
    pub path: PathBuf,
    /// Bytes that can be handed out.
    pub total_size: u64,
    /// Alignment of every region's offset and length.
    pub align: u64,
    /// Page size of the backing memory.
    pub page_size: u64,
}

/// Permissions of pool and region files created by the daemon: owner and group may map
/// them, so clients running as another user of the daemon's group can attach.
pub const SHARED_FILE_MODE: u32 = 0o660;

/// Opens (creating if missing) a file that daemon and clients share: read-write, mode
/// [`SHARED_FILE_MODE`]. `truncate` drops whatever a previous owner left in it.
pub(crate) fn open_shared_file(path: &Path, truncate: bool) -> Result<std::fs::File, PoolError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(SHARED_FILE_MODE)
        .open(path)
        .map_err(|e| PoolError::io(path, e))
}

/// A source of memory that a resource manager carves regions out of.
///
/// A pool is a range `[0, total_size)`; the resource manager decides which extents are in use
/// and calls the hooks so that the pool can back (or give back) the memory of one region.
pub trait Pool: Send + Sync + fmt::Debug {
    /// Kind, identity and sizes, fixed when the pool opens.
    fn geometry(&self) -> &PoolGeometry;
    fn kind(&self) -> PoolKind {
        self.geometry().kind
    }
    /// Identity of the pool: the file, directory or device it lives in. Handles name their
    /// pool by this path.
    fn path(&self) -> &Path {
        &self.geometry().path
    }
    /// Bytes that can be handed out.
    fn total_size(&self) -> u64 {
        self.geometry().total_size
    }
    /// Every region starts at a multiple of this and its length is a multiple of it.
    fn align(&self) -> u64 {
        self.geometry().align
    }
    /// Page size of the backing memory (4 KiB on tmpfs, 2 MiB on hugetlbfs).
    fn page_size(&self) -> u64 {
        self.geometry().page_size
    }
    /// Where the pool's header ([`header`]) lives. By default at the start of the pool's own
    /// file or device (shm, DEV_DAX).
    fn header_place(&self) -> HeaderPlace {
        HeaderPlace::InPool {
            path: self.path().to_owned(),
            map_len: self.page_size(),
        }
    }
    /// Bytes at the start of the range that are never allocated: the header's extent (one
    /// alignment unit) when the header is in the pool.
    fn reserved(&self) -> u64 {
        self.align()
    }
    /// How a client maps region `region_id` placed at `offset` with `len` bytes, in the pool
    /// whose header carries `pool_uuid`. By default a region is that range of the pool's own
    /// file or device (shm, DEV_DAX).
    fn access(&self, _region_id: u64, offset: u64, len: u64, pool_uuid: [u8; 16]) -> Access {
        Access {
            path: self.path().to_string_lossy().into_owned(),
            offset,
            len,
            page_size: self.page_size(),
            pool_uuid,
        }
    }
    /// Makes a region's memory available before its handle is given out (FS_DAX creates its
    /// file). Must tolerate leftovers of an earlier crash under the same id. By default there
    /// is nothing to do: tmpfs and hugetlbfs back pages on first touch, devices always are.
    fn prepare_region(&self, _region_id: u64, _offset: u64, _len: u64) -> Result<(), PoolError> {
        Ok(())
    }
    /// Gives a freed region's memory back (shm punches a hole, FS_DAX removes the file). The
    /// next owner of the range sees zeroes, never the previous owner's bytes.
    fn release_region(&self, region_id: u64, offset: u64, len: u64) -> Result<(), PoolError>;
    /// After a restart: gives back memory of a free extent that may still be backed (its
    /// region was freed while the resource manager was down or crashing).
    fn release_free_extent(&self, _offset: u64, _len: u64) -> Result<(), PoolError> {
        Ok(())
    }
    /// After a restart: removes per-region objects whose region no longer exists. Returns
    /// how many were removed.
    fn remove_stale_regions(&self, _is_live: &dyn Fn(u64) -> bool) -> Result<usize, PoolError> {
        Ok(0)
    }
}

/// Which pool to open, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PoolSpec {
    /// `shm:PATH:SIZE`: a file on tmpfs or hugetlbfs, created and sized by the daemon.
    Shm { path: PathBuf, size: u64 },
    /// `fs-dax:DIR`: a DAX-mounted directory, one file per region.
    FsDax { dir: PathBuf },
    /// `dev-dax:/dev/daxX.Y`: a device DAX character device.
    DevDax { path: PathBuf },
}

/// Why a pool spec does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(
        "invalid pool spec {0:?}: expected shm:PATH:SIZE (e.g. shm:/dev/shm/maru/pool0:8G), \
         fs-dax:DIR or dev-dax:/dev/daxX.Y"
    )]
    Syntax(String),
    #[error("invalid size {0:?}: expected a number with an optional K, M, G or T suffix")]
    Size(String),
    #[error("pool path in {0:?} must be absolute")]
    RelativePath(String),
}

impl PoolSpec {
    pub fn kind(&self) -> PoolKind {
        match self {
            PoolSpec::Shm { .. } => PoolKind::Shm,
            PoolSpec::FsDax { .. } => PoolKind::FsDax,
            PoolSpec::DevDax { .. } => PoolKind::DevDax,
        }
    }

    /// The path the pool will be known by.
    pub fn path(&self) -> &Path {
        match self {
            PoolSpec::Shm { path, .. } => path,
            PoolSpec::FsDax { dir } => dir,
            PoolSpec::DevDax { path } => path,
        }
    }

    /// Opens (creating and sizing where the kind allows) the pool. `naming` names the
    /// per-region files of FS_DAX pools.
    pub fn open(&self, naming: &Naming) -> Result<Box<dyn Pool>, PoolError> {
        Ok(match self {
            PoolSpec::Shm { path, size } => Box::new(ShmPool::open(path, *size)?),
            PoolSpec::FsDax { dir } => Box::new(FsDaxPool::open(dir, naming.clone())?),
            PoolSpec::DevDax { path } => Box::new(DevDaxPool::open(path)?),
        })
    }
}

impl FromStr for PoolSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let absolute = |p: &str| {
            if p.starts_with('/') {
                Ok(PathBuf::from(p))
            } else {
                Err(SpecError::RelativePath(s.to_owned()))
            }
        };
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| SpecError::Syntax(s.to_owned()))?;
        if rest.is_empty() {
            return Err(SpecError::Syntax(s.to_owned()));
        }
        match kind {
            "shm" => {
                // The size is after the last colon, so paths may contain colons.
                let (path, size) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| SpecError::Syntax(s.to_owned()))?;
                if path.is_empty() {
                    return Err(SpecError::Syntax(s.to_owned()));
                }
                Ok(PoolSpec::Shm {
                    path: absolute(path)?,
                    size: parse_size(size)?,
                })
            }
            "fs-dax" | "fsdax" => Ok(PoolSpec::FsDax {
                dir: absolute(rest)?,
            }),
            "dev-dax" | "devdax" => Ok(PoolSpec::DevDax {
                path: absolute(rest)?,
            }),
            _ => Err(SpecError::Syntax(s.to_owned())),
        }
    }
}

impl fmt::Display for PoolSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolSpec::Shm { path, size } => write!(f, "shm:{}:{size}", path.display()),
            PoolSpec::FsDax { dir } => write!(f, "fs-dax:{}", dir.display()),
            PoolSpec::DevDax { path } => write!(f, "dev-dax:{}", path.display()),
        }
    }
}

/// Parses `8G`, `512M`, `64k`, `1T`, `4096` (binary units; an optional trailing `B` or `iB`
/// is accepted). Zero and overflow are errors.
pub fn parse_size(s: &str) -> Result<u64, SpecError> {
    let bad = || SpecError::Size(s.to_owned());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let v = n.checked_mul(1u64 << shift).ok_or_else(bad)?;
    if v == 0 {
        return Err(bad());
    }
    Ok(v)
}

/// Rounds `v` up to a multiple of `to` (a power of two or any non-zero value).
pub fn round_up(v: u64, to: u64) -> Option<u64> {
    if to == 0 {
        return Some(v);
    }
    v.checked_add(to - 1).map(|x| x / to * to)
}

/// Pools found on this machine: every DEV_DAX device under `/sys/bus/dax/devices`, then every
/// FS_DAX mount in `/proc/mounts`. Empty on machines without DAX hardware.
pub fn discover() -> Vec<PoolSpec> {
    let mut found = dev_dax::discover_in(Path::new(dev_dax::SYSFS_DAX_DEVICES), Path::new("/dev"));
    if let Ok(mounts) = std::fs::read_to_string("/proc/mounts") {
        found.extend(
            fs_dax::parse_dax_mounts(&mounts)
                .into_iter()
                .map(|dir| PoolSpec::FsDax { dir }),
        );
    }
    found
}

/// A fresh directory under /dev/shm for one unit test, removed on drop.
#[cfg(test)]
pub(crate) fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("maru-test-")
        .tempdir_in("/dev/shm")
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("2TB").unwrap(), 2 << 40);
        for bad in ["", "0", "G", "1.5G", "-1", "12X", "99999999999T", " 1 G"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn specs_parse_and_print_back() {
        let cases = [
            (
                "shm:/dev/shm/maru/pool0:8G",
                PoolSpec::Shm {
                    path: "/dev/shm/maru/pool0".into(),
                    size: 8 << 30,
                },
            ),
            (
                "shm:/dev/shm/a:b:1M",
                PoolSpec::Shm {
                    path: "/dev/shm/a:b".into(),
                    size: 1 << 20,
                },
            ),
            (
                "fs-dax:/mnt/pmem0",
                PoolSpec::FsDax {
                    dir: "/mnt/pmem0".into(),
                },
            ),
            (
                "dev-dax:/dev/dax0.0",
                PoolSpec::DevDax {
                    path: "/dev/dax0.0".into(),
                },
            ),
        ];
        for (text, spec) in cases {
            let parsed: PoolSpec = text.parse().unwrap();
            assert_eq!(parsed, spec);
            assert_eq!(parsed.to_string().parse::<PoolSpec>().unwrap(), spec);
        }
        for bad in [
            "",
            "shm",
            "shm:",
            "shm:/dev/shm/x",
            "shm:relative/x:1G",
            "shm::1G",
            "shm:/x:0",
            "nvme:/dev/x",
            "fs-dax:",
            "dev-dax:dax0.0",
        ] {
            assert!(bad.parse::<PoolSpec>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn round_up_rounds() {
        assert_eq!(round_up(0, 4096), Some(0));
        assert_eq!(round_up(1, 4096), Some(4096));
        assert_eq!(round_up(4096, 4096), Some(4096));
        assert_eq!(round_up(u64::MAX, 4096), None);
    }
}
