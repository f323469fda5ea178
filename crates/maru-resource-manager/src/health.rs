//! Whether a pool's backing file or device is still there.
//!
//! A pool file deleted (or replaced, or truncated) under a running resource manager leaves
//! the processes that mapped it working on memory nobody else can reach: a region carved
//! from it now would be mapped by its client from a new, empty file — or not at all. So each
//! pool keeps what it opened open (a descriptor, which survives the unlink and whose link
//! count then drops to zero) and checks, before every allocation and on every reaper pass,
//! that it is still linked, still long enough, and still what its path names. An unhealthy pool
//! gives no new regions (the caller gets `PoolUnhealthy` with the reason), is reported in
//! the statistics and the metrics, and is logged once when it turns unhealthy and once when
//! it recovers.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use maru_shm::PoolKind;

/// What a pool was opened on, and what is wrong with it now, if anything.
#[derive(Debug)]
pub(crate) struct PoolHealth {
    /// The pool's file, directory or device as it was opened; `None` if it could not be
    /// opened then (the pool is then checked through its path only).
    opened: Option<File>,
    /// Bytes a shm pool file must keep (its regions live inside it).
    min_len: Option<u64>,
    problem: Option<String>,
}

impl PoolHealth {
    /// Watches the pool at `path`, of `kind`, that hands out `total` bytes.
    pub fn watch(path: &Path, kind: PoolKind, total: u64) -> PoolHealth {
        PoolHealth {
            opened: File::open(path).ok(),
            min_len: (kind == PoolKind::Shm).then_some(total),
            problem: None,
        }
    }

    /// Why the pool at `path` cannot give regions, if it cannot.
    fn diagnose(&self, path: &Path) -> Option<String> {
        let shown = path.display();
        let deleted = || {
            Some(format!(
                "pool {shown} was deleted; its memory lives on only in processes that mapped it"
            ))
        };
        let ours = self.opened.as_ref().and_then(|f| f.metadata().ok());
        if ours.as_ref().is_some_and(|md| md.nlink() == 0) {
            return deleted();
        }
        let md = match std::fs::metadata(path) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return deleted(),
            Err(e) => return Some(format!("pool {shown} cannot be examined: {e}")),
        };
        if ours
            .as_ref()
            .is_some_and(|o| (o.dev(), o.ino()) != (md.dev(), md.ino()))
        {
            return Some(format!(
                "pool {shown} was replaced by another file; the pool's memory is no longer \
                 reachable through it"
            ));
        }
        let len = ours.as_ref().unwrap_or(&md).len();
        match self.min_len {
            Some(need) if md.is_file() && len < need => Some(format!(
                "pool {shown} was truncated to {len} bytes (it needs {need})"
            )),
            _ => None,
        }
    }

    /// Checks again; logs a change. Returns whether the pool can give regions.
    pub fn check(&mut self, path: &Path) -> bool {
        let now = self.diagnose(path);
        match (&self.problem, &now) {
            (None, Some(p)) => tracing::error!("{p}; no new regions come from it"),
            (Some(_), None) => {
                tracing::warn!("pool {} is usable again", path.display())
            }
            _ => {}
        }
        self.problem = now;
        self.problem.is_none()
    }

    /// What is wrong, as last checked.
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_file(path: &Path, len: u64) {
        std::fs::File::create(path).unwrap().set_len(len).unwrap();
    }

    /// A 4 KiB pool file in a fresh directory, and its health watched from now on.
    fn watched_pool() -> (tempfile::TempDir, std::path::PathBuf, PoolHealth) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool");
        pool_file(&path, 4096);
        let h = PoolHealth::watch(&path, PoolKind::Shm, 4096);
        (dir, path, h)
    }

    fn resize(path: &Path, len: u64) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_len(len).unwrap();
    }

    #[test]
    fn a_truncated_pool_file_is_unhealthy_until_sized_again() {
        let (_dir, path, mut h) = watched_pool();
        assert!(h.check(&path) && h.problem().is_none());
        resize(&path, 100);
        assert!(!h.check(&path));
        assert!(h.problem().unwrap().contains("truncated to 100 bytes"));
        resize(&path, 4096);
        assert!(h.check(&path) && h.problem().is_none());
    }

    #[test]
    fn a_deleted_pool_file_stays_deleted_even_when_a_new_file_takes_its_name() {
        let (_dir, path, mut h) = watched_pool();
        std::fs::remove_file(&path).unwrap();
        assert!(!h.check(&path));
        assert!(h.problem().unwrap().contains("was deleted"));
        // A new file under the same name (the inode number may even be reused) is not the
        // pool: the pool's own file is unlinked.
        pool_file(&path, 4096);
        assert!(!h.check(&path));
        assert!(h.problem().unwrap().contains("was deleted"));
    }

    #[test]
    fn a_pool_file_moved_away_and_replaced_is_unhealthy() {
        let (dir, path, mut h) = watched_pool();
        std::fs::rename(&path, dir.path().join("pool.old")).unwrap();
        assert!(!h.check(&path));
        assert!(h.problem().unwrap().contains("was deleted"));
        pool_file(&path, 4096);
        assert!(!h.check(&path));
        assert!(h.problem().unwrap().contains("replaced by another file"));
    }
}
