//! The one place that names every OS object Maru creates: pool files, per-region files,
//! state files (write-ahead log, checkpoint, secret, lock) and default socket paths.
//!
//! Everything is derived from a [`Naming`] whose prefix defaults to `maru`. Tests give each
//! case its own prefix (or their own directories), so concurrent tests never see each other's
//! objects; production uses the default.
//!
//! ```
//! use maru_shm::naming::Naming;
//! let n = Naming::new("maru-test-7");
//! assert_eq!(n.pool_dir().to_str(), Some("/dev/shm/maru-test-7"));
//! assert_eq!(n.region_file_name(42), "maru-test-7-region-000000000000002a");
//! ```

use std::path::{Path, PathBuf};

/// Prefix of every name when nothing else is configured.
pub const DEFAULT_PREFIX: &str = "maru";

/// Where shared-memory files live unless a pool spec says otherwise.
pub const SHM_ROOT: &str = "/dev/shm";

/// Names of OS objects under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    prefix: String,
}

impl Default for Naming {
    fn default() -> Self {
        Naming::new(DEFAULT_PREFIX)
    }
}

impl Naming {
    /// A naming scheme with `prefix`. Characters outside `[A-Za-z0-9._-]` are replaced by
    /// `_` so a prefix can never escape its directory.
    pub fn new(prefix: &str) -> Self {
        let clean: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Naming {
            prefix: if clean.is_empty() || clean.chars().all(|c| c == '.') {
                DEFAULT_PREFIX.to_owned()
            } else {
                clean
            },
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Directory of default shm pools: `/dev/shm/<prefix>`.
    pub fn pool_dir(&self) -> PathBuf {
        Path::new(SHM_ROOT).join(&self.prefix)
    }

    /// Default path of the `n`-th shm pool: `/dev/shm/<prefix>/pool<n>`.
    pub fn default_pool_path(&self, n: usize) -> PathBuf {
        self.pool_dir().join(format!("pool{n}"))
    }

    /// File name of a region's file in an FS_DAX pool. Region ids are fixed-width hex so a
    /// directory listing sorts by id and [`Naming::parse_region_file_name`] is unambiguous.
    pub fn region_file_name(&self, region_id: u64) -> String {
        format!("{}-region-{region_id:016x}", self.prefix)
    }

    /// The region id a file name of [`Naming::region_file_name`] stands for, if it is one.
    pub fn parse_region_file_name(&self, name: &str) -> Option<u64> {
        let hex = name.strip_prefix(&self.prefix)?.strip_prefix("-region-")?;
        if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    }

    /// Path of a region's file inside an FS_DAX directory.
    pub fn region_file(&self, dir: &Path, region_id: u64) -> PathBuf {
        dir.join(self.region_file_name(region_id))
    }

    /// Default state directory of a resource manager: `$XDG_STATE_HOME/<prefix>`, else
    /// `~/.local/state/<prefix>`, else (no home at all, e.g. a bare service) `/var/lib/<prefix>`.
    pub fn default_state_dir(&self) -> PathBuf {
        if let Some(d) = non_empty_env("XDG_STATE_HOME") {
            return PathBuf::from(d).join(&self.prefix);
        }
        if let Some(h) = non_empty_env("HOME") {
            return PathBuf::from(h)
                .join(".local")
                .join("state")
                .join(&self.prefix);
        }
        Path::new("/var/lib").join(&self.prefix)
    }

    /// Directory for default Unix sockets: `$XDG_RUNTIME_DIR/<prefix>`, else
    /// `/tmp/<prefix>-<uid>` (per user, so users never collide on a shared `/tmp`).
    pub fn runtime_dir(&self) -> PathBuf {
        if let Some(d) = non_empty_env("XDG_RUNTIME_DIR") {
            return PathBuf::from(d).join(&self.prefix);
        }
        let uid = rustix::process::getuid().as_raw();
        Path::new("/tmp").join(format!("{}-{uid}", self.prefix))
    }

    /// Default Unix socket of a daemon (`component` is e.g. `server` or `rm`).
    pub fn socket_path(&self, component: &str) -> PathBuf {
        self.runtime_dir().join(format!("{component}.sock"))
    }
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// File names inside a resource manager's state directory. The directory itself is the
/// namespace (one per resource manager), so these carry no prefix.
pub mod state {
    use std::path::{Path, PathBuf};

    /// Append-only write-ahead log.
    pub fn wal(dir: &Path) -> PathBuf {
        dir.join("wal")
    }
    /// Last complete checkpoint.
    pub fn checkpoint(dir: &Path) -> PathBuf {
        dir.join("checkpoint")
    }
    /// A checkpoint being written; renamed over [`checkpoint`] once durable.
    pub fn checkpoint_tmp(dir: &Path) -> PathBuf {
        dir.join("checkpoint.tmp")
    }
    /// Key of the auth tokens (32 bytes, mode 0600).
    pub fn secret(dir: &Path) -> PathBuf {
        dir.join("secret")
    }
    /// `flock`ed while a resource manager uses the directory.
    pub fn lock(dir: &Path) -> PathBuf {
        dir.join("lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_file_names_round_trip_and_reject_others() {
        let n = Naming::new("t1");
        for id in [0u64, 1, 0xdead_beef, u64::MAX] {
            assert_eq!(n.parse_region_file_name(&n.region_file_name(id)), Some(id));
        }
        assert_eq!(n.parse_region_file_name("t1-region-12"), None);
        assert_eq!(n.parse_region_file_name("t2-region-0000000000000001"), None);
        assert_eq!(n.parse_region_file_name("t1-region-000000000000000g"), None);
        assert_eq!(
            Naming::new("other").parse_region_file_name(&n.region_file_name(3)),
            None
        );
    }

    #[test]
    fn prefixes_cannot_escape_their_directory() {
        assert_eq!(Naming::new("../x/y").prefix(), ".._x_y");
        assert_eq!(Naming::new("..").prefix(), DEFAULT_PREFIX);
        assert_eq!(Naming::new("").prefix(), DEFAULT_PREFIX);
        assert_eq!(
            Naming::new("a/b").default_pool_path(2),
            PathBuf::from("/dev/shm/a_b/pool2")
        );
    }

    #[test]
    fn state_files_live_in_the_state_dir() {
        let d = Path::new("/s");
        assert_eq!(state::wal(d), PathBuf::from("/s/wal"));
        assert_eq!(state::checkpoint_tmp(d), PathBuf::from("/s/checkpoint.tmp"));
        assert!(
            Naming::default()
                .socket_path("rm")
                .ends_with("maru/rm.sock")
                || Naming::default()
                    .socket_path("rm")
                    .to_string_lossy()
                    .contains("/tmp/maru-")
        );
    }
}
