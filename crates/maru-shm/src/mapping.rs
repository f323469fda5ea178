use std::fs::OpenOptions;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use rustix::mm::{Advice, MapFlags, ProtFlags};

/// Size of a huge page on hugetlbfs (x86-64 default).
pub const HUGE_PAGE_SIZE: u64 = 2 * 1024 * 1024;
/// `f_type` of a hugetlbfs mount (`linux/magic.h`).
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot map {len} bytes at offset {offset} of {path}: {source}")]
    Map {
        path: PathBuf,
        offset: u64,
        len: u64,
        source: io::Error,
    },
    #[error("invalid mapping request: {0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// How a mapping may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapMode {
    ReadWrite,
    ReadOnly,
}

/// A `MAP_SHARED` mapping of part of a file. Unmapped on drop.
///
/// The memory is shared with other processes, which may write it at any time, so this type
/// never hands out `&[u8]` / `&mut [u8]` over the mapping (that would promise Rust an
/// exclusivity or immutability nobody can keep). Access goes through raw pointers or the
/// copying helpers, whose bounds are checked.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    mode: MapMode,
    path: PathBuf,
    offset: u64,
    /// The descriptor it was mapped from, when it came from elsewhere ([`Mapping::map_fd`]).
    file: Option<std::fs::File>,
}

// SAFETY: a Mapping is an address range valid until drop; it holds no thread-affine state and
// all access is through raw pointers whose synchronisation is the caller's responsibility.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only exposes the address, length and bounds-checked copies.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `path` starting at `offset` (a multiple of the system page size;
    /// on hugetlbfs, of 2 MiB). With `populate`, page tables are filled at once
    /// (`MADV_POPULATE_WRITE` for writable maps, `MAP_POPULATE` as fallback), so later
    /// accesses take no page faults; without it, mapping costs microseconds whatever `len`.
    pub fn map(
        path: &Path,
        offset: u64,
        len: u64,
        mode: MapMode,
        populate: bool,
    ) -> Result<Mapping, ShmError> {
        check_request(path, offset, len)?;
        let file = OpenOptions::new()
            .read(true)
            .write(mode == MapMode::ReadWrite)
            .open(path)
            .map_err(|source| ShmError::Open {
                path: path.to_owned(),
                source,
            })?;
        Mapping::map_file(file, false, path, offset, len, mode, populate)
    }

    /// Maps `len` bytes at `offset` of the file that `fd` opens, as [`Mapping::map`] maps a
    /// path; `name` is the file's path where it was opened (for messages). The mapping keeps
    /// the descriptor, so [`Mapping::privatize`] needs no permission on the path. The kernel
    /// checks `mode` against the descriptor's access: a read-write mapping of a read-only
    /// descriptor is [`ShmError::Map`] with `EACCES`.
    pub fn map_fd(
        fd: OwnedFd,
        name: &Path,
        offset: u64,
        len: u64,
        mode: MapMode,
        populate: bool,
    ) -> Result<Mapping, ShmError> {
        check_request(name, offset, len)?;
        Mapping::map_file(fd.into(), true, name, offset, len, mode, populate)
    }

    fn map_file(
        file: std::fs::File,
        keep: bool,
        path: &Path,
        offset: u64,
        len: u64,
        mode: MapMode,
        populate: bool,
    ) -> Result<Mapping, ShmError> {
        let len_usize = len as usize;
        let meta = file.metadata().map_err(|source| ShmError::Io {
            path: path.to_owned(),
            source,
        })?;
        let file_len = meta.len();
        // A file's length bounds the range; a device (DEV_DAX) reports none, and its own
        // mmap refuses a range beyond it.
        let bounded = !std::os::unix::fs::FileTypeExt::is_char_device(&meta.file_type());
        if offset
            .checked_add(len)
            .is_none_or(|end| bounded && end > file_len)
        {
            return Err(ShmError::Invalid(format!(
                "range {offset}+{len} is outside {} ({file_len} bytes)",
                path.display()
            )));
        }
        let prot = match mode {
            MapMode::ReadWrite => ProtFlags::READ | ProtFlags::WRITE,
            MapMode::ReadOnly => ProtFlags::READ,
        };
        // Read-only maps that want population use MAP_POPULATE; writable ones use
        // MADV_POPULATE_WRITE below, which also pre-faults for writing (no later COW/RO faults).
        let flags = if populate && mode == MapMode::ReadOnly {
            MapFlags::SHARED | MapFlags::POPULATE
        } else {
            MapFlags::SHARED
        };
        // SAFETY: a fresh mapping (addr = NULL) of a file descriptor we own for the duration of
        // the call; the range was checked against the file's length above. The kernel keeps its
        // own reference to the file, so closing `file` afterwards is fine.
        let ptr = unsafe {
            rustix::mm::mmap(std::ptr::null_mut(), len_usize, prot, flags, &file, offset)
        }
        .map_err(|e| ShmError::Map {
            path: path.to_owned(),
            offset,
            len,
            source: e.into(),
        })?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| ShmError::Invalid("mmap returned NULL".into()))?;
        let mapping = Mapping {
            ptr,
            len: len_usize,
            mode,
            path: path.to_owned(),
            offset,
            file: keep.then_some(file),
        };
        if populate && mode == MapMode::ReadWrite {
            mapping.populate_write();
        }
        Ok(mapping)
    }

    /// Pre-faults the whole mapping for writing. Falls back to touching one byte per page on
    /// kernels without `MADV_POPULATE_WRITE` (before 5.14).
    fn populate_write(&self) {
        // SAFETY: the range is exactly our live mapping; madvise does not change its contents.
        let advised = unsafe {
            rustix::mm::madvise(
                self.ptr.as_ptr().cast(),
                self.len,
                Advice::LinuxPopulateWrite,
            )
        };
        if advised.is_ok() {
            return;
        }
        let page = system_page_size() as usize;
        let mut off = 0;
        while off < self.len {
            // SAFETY: `off < len`, so the pointer is inside our writable mapping. A volatile
            // read-then-write of the same byte leaves a concurrent writer's data as it was
            // only if nobody writes in between; this runs on freshly allocated regions that
            // no other process has been told about yet.
            unsafe {
                let p = self.ptr.as_ptr().add(off);
                p.write_volatile(p.read_volatile());
            }
            off += page;
        }
    }

    /// Cuts this mapping's writes off from the shared file, in place: the same addresses are
    /// remapped copy-on-write (`MAP_PRIVATE | MAP_FIXED`), so pointers into it stay valid and
    /// reads still show the file's bytes, but a later write only changes a private copy.
    ///
    /// A client calls this on its owned regions when it closes: Python views it handed out may
    /// outlive the handler, and once the region goes back to the pool and is carved for
    /// another owner, a write through such a view must not land in someone else's memory.
    /// If the file can no longer be opened, the range becomes private zero-filled memory.
    pub fn privatize(&self) -> Result<(), ShmError> {
        if self.mode == MapMode::ReadOnly {
            return Ok(());
        }
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        let fixed = MapFlags::PRIVATE | MapFlags::FIXED;
        let addr = self.ptr.as_ptr().cast();
        let reopened = match &self.file {
            Some(f) => f.try_clone(),
            None => OpenOptions::new().read(true).open(&self.path),
        };
        if let Ok(file) = reopened {
            // SAFETY: MAP_FIXED over exactly our own live range (same address and length), so
            // no other mapping is clobbered; the kernel replaces the pages atomically and the
            // addresses stay valid for every holder of a pointer into them.
            let remapped =
                unsafe { rustix::mm::mmap(addr, self.len, prot, fixed, &file, self.offset) };
            if remapped.is_ok() {
                return Ok(());
            }
        }
        // SAFETY: as above, with anonymous memory (no file involved).
        unsafe { rustix::mm::mmap_anonymous(addr, self.len, prot, fixed) }.map_err(|e| {
            ShmError::Map {
                path: self.path.clone(),
                offset: self.offset,
                len: self.len as u64,
                source: e.into(),
            }
        })?;
        Ok(())
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn mode(&self) -> MapMode {
        self.mode
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Offset of the mapping inside its file.
    pub fn file_offset(&self) -> u64 {
        self.offset
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), ShmError> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(ShmError::Invalid(format!(
                "range {offset}+{len} outside a mapping of {} bytes",
                self.len
            )));
        }
        Ok(())
    }

    /// Copies `src` into the mapping at `offset`; large copies bypass the cache
    /// ([`crate::copy_to_shared`]).
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<(), ShmError> {
        if self.mode != MapMode::ReadWrite {
            return Err(ShmError::Invalid("write to a read-only mapping".into()));
        }
        self.check(offset, src.len())?;
        // SAFETY: bounds checked above; the mapping is writable.
        let dst = unsafe { self.ptr.as_ptr().add(offset) };
        let (s, d) = (src.as_ptr() as usize, dst as usize);
        if s < d + src.len() && d < s + src.len() {
            // `src` is a Rust slice and so overlaps the mapping only if the caller built it
            // from our own pointer: `copy` has memmove semantics.
            // SAFETY: both ranges are valid for `src.len()` bytes (checked above).
            unsafe { std::ptr::copy(src.as_ptr(), dst, src.len()) };
        } else {
            // SAFETY: both ranges are valid for `src.len()` bytes and do not overlap.
            unsafe { crate::copy_to_shared(dst, src.as_ptr(), src.len()) };
        }
        Ok(())
    }

    /// Copies bytes out of the mapping at `offset` into `dst`.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), ShmError> {
        self.check(offset, dst.len())?;
        // SAFETY: bounds checked above; `dst` is exclusively borrowed, so the only possible
        // overlap is with memory other processes write, which a byte copy tolerates.
        unsafe { std::ptr::copy(self.ptr.as_ptr().add(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // munmap fails only for a range that is not a mapping, which this type rules out.
        // SAFETY: exactly the range returned by mmap, unmapped once. Anyone still holding raw
        // pointers into it must hold the Mapping (the Python views hold an Arc<Mapping>).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Checks what a mapping request says before anything is opened: a length, an offset on a
/// page boundary, a length that fits the address space.
fn check_request(path: &Path, offset: u64, len: u64) -> Result<(), ShmError> {
    if len == 0 {
        return Err(ShmError::Invalid(format!(
            "zero-length mapping of {}",
            path.display()
        )));
    }
    let page = system_page_size();
    if !offset.is_multiple_of(page) {
        return Err(ShmError::Invalid(format!(
            "offset {offset} is not a multiple of the page size {page}"
        )));
    }
    usize::try_from(len).map_err(|_| ShmError::Invalid(format!("length {len} too large")))?;
    Ok(())
}

/// The system page size (4 KiB on x86-64).
pub fn system_page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// Page size of the file system holding `path`: 2 MiB on hugetlbfs, the system page size
/// elsewhere.
pub fn fs_page_size(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statfs(path)?;
    // The field's integer type differs between targets; the cast is a no-op on x86-64.
    #[allow(clippy::unnecessary_cast)]
    let f_type = st.f_type as i64;
    if f_type == HUGETLBFS_MAGIC {
        Ok(HUGE_PAGE_SIZE)
    } else {
        Ok(system_page_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(len: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        f
    }

    #[test]
    fn two_mappings_of_one_file_share_bytes() {
        let f = file_of(1 << 20);
        let w = Mapping::map(f.path(), 4096, 8192, MapMode::ReadWrite, true).unwrap();
        let r = Mapping::map(f.path(), 4096, 8192, MapMode::ReadOnly, false).unwrap();
        w.write_at(100, b"shared").unwrap();
        let mut out = [0u8; 6];
        r.read_at(100, &mut out).unwrap();
        assert_eq!(&out, b"shared");
        assert!(
            r.write_at(0, b"x").is_err(),
            "read-only mapping accepted a write"
        );
    }

    /// A device reports no length (DEV_DAX, here /dev/zero): the range is the device's to
    /// check, a file's is checked against its length.
    #[test]
    fn a_device_is_mapped_without_a_length_check_a_file_is_not() {
        let m = Mapping::map(Path::new("/dev/zero"), 0, 8192, MapMode::ReadOnly, false).unwrap();
        let mut out = [1u8; 4];
        m.read_at(4096, &mut out).unwrap();
        assert_eq!(out, [0; 4]);
        let f = file_of(8192);
        assert!(Mapping::map(f.path(), 4096, 8192, MapMode::ReadOnly, false).is_err());
    }

    #[test]
    fn privatized_mapping_keeps_reading_but_stops_writing_through() {
        let f = file_of(1 << 20);
        let w = Mapping::map(f.path(), 0, 8192, MapMode::ReadWrite, true).unwrap();
        let other = Mapping::map(f.path(), 0, 8192, MapMode::ReadOnly, false).unwrap();
        w.write_at(10, b"before").unwrap();
        let addr = w.as_ptr();
        w.privatize().unwrap();
        assert_eq!(w.as_ptr(), addr, "same addresses after privatize");
        let mut out = [0u8; 6];
        w.read_at(10, &mut out).unwrap();
        assert_eq!(&out, b"before", "reads still see the shared bytes");
        w.write_at(10, b"after!").unwrap();
        other.read_at(10, &mut out).unwrap();
        assert_eq!(
            &out, b"before",
            "a write after privatize reached the shared file"
        );
    }

    /// The kernel holds a mapping to its descriptor's access: read-only stays read-only.
    #[test]
    fn a_read_only_descriptor_cannot_be_mapped_writable() {
        let f = file_of(1 << 16);
        let ro: OwnedFd = std::fs::File::open(f.path()).unwrap().into();
        let rw: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap()
            .into();
        let e = Mapping::map_fd(
            ro.try_clone().unwrap(),
            f.path(),
            0,
            4096,
            MapMode::ReadWrite,
            false,
        )
        .unwrap_err();
        match e {
            ShmError::Map { source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc_eacces()), "{source}")
            }
            other => panic!("expected EACCES from mmap, got {other}"),
        }
        let r = Mapping::map_fd(ro, f.path(), 4096, 4096, MapMode::ReadOnly, false).unwrap();
        let w = Mapping::map_fd(rw, f.path(), 4096, 4096, MapMode::ReadWrite, true).unwrap();
        w.write_at(7, b"fd").unwrap();
        let mut out = [0u8; 2];
        r.read_at(7, &mut out).unwrap();
        assert_eq!(&out, b"fd");
        // Privatize remaps from the kept descriptor, not the path.
        std::fs::remove_file(f.path()).unwrap();
        w.privatize().unwrap();
        w.read_at(7, &mut out).unwrap();
        assert_eq!(
            &out, b"fd",
            "privatize kept the file's bytes without its path"
        );
    }

    fn libc_eacces() -> i32 {
        rustix::io::Errno::ACCESS.raw_os_error()
    }

    #[test]
    fn bad_ranges_are_errors() {
        let f = file_of(1 << 16);
        assert!(Mapping::map(f.path(), 0, 0, MapMode::ReadOnly, false).is_err());
        assert!(Mapping::map(f.path(), 100, 4096, MapMode::ReadOnly, false).is_err());
        assert!(Mapping::map(f.path(), 0, 1 << 17, MapMode::ReadOnly, false).is_err());
        assert!(Mapping::map(
            Path::new("/nonexistent/maru"),
            0,
            4096,
            MapMode::ReadOnly,
            false
        )
        .is_err());
        let m = Mapping::map(f.path(), 0, 4096, MapMode::ReadWrite, false).unwrap();
        assert!(m.write_at(4090, &[0; 7]).is_err());
        assert!(m.read_at(usize::MAX, &mut [0; 2]).is_err());
    }

    #[test]
    fn page_size_of_tmp_is_the_system_page() {
        assert_eq!(fs_page_size(Path::new("/tmp")).unwrap(), system_page_size());
    }
}
