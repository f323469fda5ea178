//! A private hugetlbfs for tests and benchmarks: reserves 2 MiB pages (`vm.nr_hugepages`),
//! mounts a hugetlbfs on a fresh directory, and undoes both when dropped, so the huge-page
//! paths are exercised and measured on any machine where the caller is root. Operators mount
//! their own (`maru up --pool-dir`); nothing in the daemons calls this.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::mount::{mount, unmount, MountFlags, UnmountFlags};

use crate::mapping::{MapMode, Mapping, ShmError, HUGE_PAGE_SIZE};

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// A mounted hugetlbfs with `pages` 2 MiB pages reserved for it; unmounted and the pages given
/// back on drop.
#[derive(Debug)]
pub struct HugePageMount {
    dir: PathBuf,
    pages: u64,
}

fn read_count(path: &str) -> io::Result<u64> {
    let text = fs::read_to_string(path)?;
    text.trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {e}")))
}

/// Moves the system's reservation by `delta` pages from what it is now (not to a remembered
/// value: another process may have moved it meanwhile); returns the count the kernel reports
/// afterwards (it may reserve fewer than asked when memory is fragmented).
fn adjust_reservation(delta: i64) -> io::Result<u64> {
    let now = read_count(NR_HUGEPAGES)?;
    let want = now.saturating_add_signed(delta);
    fs::write(NR_HUGEPAGES, want.to_string())?;
    read_count(NR_HUGEPAGES)
}

impl HugePageMount {
    /// Reserves enough 2 MiB pages for `bytes` on top of those reserved now, and mounts a
    /// hugetlbfs on a new directory under `parent`. The error says why not, in words fit for a
    /// skipped test or benchmark row (not root, too few pages, no hugetlbfs in the kernel).
    pub fn reserve(parent: &Path, bytes: u64) -> Result<HugePageMount, String> {
        if !rustix::process::geteuid().is_root() {
            return Err(
                "2 MiB pages need root (to reserve vm.nr_hugepages and mount a \
                        hugetlbfs)"
                    .into(),
            );
        }
        let pages = bytes.div_ceil(HUGE_PAGE_SIZE).max(1);
        let before = read_count(NR_HUGEPAGES).map_err(|e| format!("{NR_HUGEPAGES}: {e}"))?;
        let after = adjust_reservation(pages as i64)
            .map_err(|e| format!("cannot reserve {pages} 2 MiB pages: {e}"))?;
        if after < before + pages {
            let got = after.saturating_sub(before);
            let _ = adjust_reservation(-(got as i64));
            return Err(format!(
                "the kernel reserved {got} of {pages} 2 MiB pages asked for (memory in use or \
                 fragmented)"
            ));
        }
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = parent.join(format!("maru-huge-{}-{stamp}", std::process::id()));
        let undo = |why: String| {
            let _ = fs::remove_dir(&dir);
            let _ = adjust_reservation(-(pages as i64));
            why
        };
        fs::create_dir(&dir).map_err(|e| undo(format!("cannot create {}: {e}", dir.display())))?;
        mount(
            "maru-huge",
            &dir,
            "hugetlbfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            c"pagesize=2M",
        )
        .map_err(|e| {
            undo(format!(
                "cannot mount a hugetlbfs on {}: {e}",
                dir.display()
            ))
        })?;
        Ok(HugePageMount { dir, pages })
    }

    /// The mount point (a pool directory for `maru up --pool-dir`).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// 2 MiB pages reserved for this mount.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Touches every reserved page once and gives it back to the reservation. Pages taken
    /// from memory a virtual machine has not used since it booted cost the hypervisor a fault
    /// per 4 KiB on their first touch (~3 s per GiB measured, against ~0.1 s for a page
    /// used before); a host that runs Maru has long touched its reserved pages, so
    /// measurements warm them first.
    pub fn warm(&self) -> Result<(), ShmError> {
        let path = self.dir.join("warm");
        let io = |source| ShmError::Io {
            path: path.clone(),
            source,
        };
        let f = fs::File::create(&path).map_err(io)?;
        let len = self.pages * HUGE_PAGE_SIZE;
        let touched = f
            .set_len(len)
            .map_err(io)
            .and_then(|()| Mapping::map(&path, 0, len, MapMode::ReadWrite, true).map(drop));
        drop(f);
        let _ = fs::remove_file(&path);
        touched
    }
}

impl Drop for HugePageMount {
    fn drop(&mut self) {
        // Lazily: a file still mapped by a process that outlives us keeps its pages until it
        // unmaps them, and the directory is gone from the namespace at once.
        let _ = unmount(&self.dir, UnmountFlags::DETACH);
        let _ = fs::remove_dir(&self.dir);
        let _ = adjust_reservation(-(self.pages as i64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs_page_size;

    /// Runs where the caller may reserve huge pages; elsewhere says why it did nothing.
    #[test]
    fn a_private_mount_serves_2_mib_pages_and_is_gone_after_drop() {
        let parent = std::env::temp_dir();
        let m = match HugePageMount::reserve(&parent, 8 * HUGE_PAGE_SIZE) {
            Ok(m) => m,
            Err(why) => {
                eprintln!("skipped: {why}");
                assert!(!rustix::process::geteuid().is_root(), "root, yet: {why}");
                return;
            }
        };
        let dir = m.path().to_owned();
        assert_eq!(m.pages(), 8);
        m.warm().unwrap();
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            0,
            "warming leaves no file"
        );
        assert_eq!(fs_page_size(&dir).unwrap(), HUGE_PAGE_SIZE);
        let file = dir.join("pool");
        let f = fs::File::create(&file).unwrap();
        f.set_len(4 * HUGE_PAGE_SIZE).unwrap();
        let w = Mapping::map(
            &file,
            HUGE_PAGE_SIZE,
            2 * HUGE_PAGE_SIZE,
            MapMode::ReadWrite,
            true,
        )
        .unwrap();
        let big = vec![0x5au8; HUGE_PAGE_SIZE as usize + 4096];
        w.write_at(100, &big).unwrap();
        let r = Mapping::map(
            &file,
            HUGE_PAGE_SIZE,
            2 * HUGE_PAGE_SIZE,
            MapMode::ReadOnly,
            false,
        )
        .unwrap();
        let mut out = vec![0u8; big.len()];
        r.read_at(100, &mut out).unwrap();
        assert_eq!(out, big);
        // Offsets inside a huge page are refused.
        assert!(Mapping::map(&file, 4096, HUGE_PAGE_SIZE, MapMode::ReadOnly, false).is_err());
        drop((w, r, f));
        drop(m);
        assert!(!dir.exists(), "the mount point is removed");
    }
}
