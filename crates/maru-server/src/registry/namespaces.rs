//! Namespace numbers for the key index: the index stores a `u32` per key, the server knows
//! namespaces by name. The table of names lives in a file beside the index (`INDEX.namespaces`)
//! so that a restarted server and every reader agree on the numbers.
//!
//! The file is append-only: one record per name (its length in one byte, then its bytes), the
//! record's position + 1 being its number; the empty name (the shared default) is 0 and is not
//! stored. A record is written and synced before any key of its namespace enters the index, so
//! a record cut off by a crash (the file's tail shorter than its length byte says) named no key:
//! it is cut when the file is loaded.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Names ↔ numbers, and the file that keeps them.
pub struct Namespaces {
    path: PathBuf,
    file: File,
    ids: HashMap<Box<[u8]>, u32>,
    names: Vec<Box<[u8]>>,
}

impl Namespaces {
    /// The table's file for the index at `index`.
    pub fn path_for(index: &Path) -> PathBuf {
        let mut p = index.as_os_str().to_owned();
        p.push(".namespaces");
        PathBuf::from(p)
    }

    /// Opens (or creates) the table of the index at `index`, cutting a torn last record.
    pub fn open(index: &Path) -> std::io::Result<Namespaces> {
        let path = Self::path_for(index);
        // Readable by the clients, writable by the server only, whatever the umask.
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o644)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut t = Namespaces {
            path,
            file,
            ids: HashMap::new(),
            names: Vec::new(),
        };
        let mut at = 0;
        while let Some(&len) = bytes.get(at) {
            let Some(name) = bytes.get(at + 1..at + 1 + len as usize) else {
                break;
            };
            t.remember(name);
            at += 1 + len as usize;
        }
        if at < bytes.len() {
            tracing::warn!(
                path = %t.path.display(),
                "cutting a namespace record a crash left incomplete"
            );
            t.file.set_len(at as u64)?;
            t.file.sync_all()?;
        }
        Ok(t)
    }

    fn remember(&mut self, name: &[u8]) -> u32 {
        let id = self.names.len() as u32 + 1;
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        id
    }

    /// The number of `name`, if it has one.
    pub fn get(&self, name: &[u8]) -> Option<u32> {
        if name.is_empty() {
            return Some(0);
        }
        self.ids.get(name).copied()
    }

    /// The number of `name`, given one (durably) if it has none yet. Names are at most 255
    /// bytes (`maru_proto::MAX_NAMESPACE_LEN`).
    pub fn id_of(&mut self, name: &[u8]) -> std::io::Result<u32> {
        if let Some(id) = self.get(name) {
            return Ok(id);
        }
        let len = u8::try_from(name.len()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "namespace names are at most 255 bytes",
            )
        })?;
        let mut record = Vec::with_capacity(1 + name.len());
        record.push(len);
        record.extend_from_slice(name);
        self.file.write_all(&record)?;
        self.file.sync_data()?;
        Ok(self.remember(name))
    }

    /// The name numbered `id`.
    pub fn name(&self, id: u32) -> Option<&[u8]> {
        match id {
            0 => Some(&[]),
            _ => self.names.get(id as usize - 1).map(|n| &n[..]),
        }
    }

    /// Removes the table's file (an ephemeral index goes with its server).
    pub fn remove_file(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_survive_a_reopen_and_a_torn_record_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("keys.index");
        let mut t = Namespaces::open(&index).unwrap();
        assert_eq!(t.id_of(b"").unwrap(), 0);
        assert_eq!(t.id_of(b"tenant-a").unwrap(), 1);
        assert_eq!(t.id_of(b"tenant-b").unwrap(), 2);
        assert_eq!(t.id_of(b"tenant-a").unwrap(), 1);
        drop(t);
        // A record cut off by a crash: a length byte and half the name.
        let mut f = OpenOptions::new()
            .append(true)
            .open(Namespaces::path_for(&index))
            .unwrap();
        f.write_all(&[9, b'x', b'y']).unwrap();
        drop(f);
        let mut t = Namespaces::open(&index).unwrap();
        assert_eq!(t.get(b"tenant-b"), Some(2));
        assert_eq!(t.name(1), Some(&b"tenant-a"[..]));
        assert_eq!(t.name(3), None, "the torn record is gone");
        assert_eq!(
            t.id_of(b"tenant-c").unwrap(),
            3,
            "and its number is free again"
        );
        assert_eq!(
            std::fs::metadata(Namespaces::path_for(&index))
                .unwrap()
                .len(),
            (1 + 8) * 3
        );
    }
}
