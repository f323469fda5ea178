//! Write-through to the key index in shared memory (`maru-index`, docs/ARCHITECTURE.md §10).
//!
//! The in-process registry stays the server's own book: pins, holds, page records and
//! eviction work on it as before. The index is a second copy of every key's location, kept in
//! step under the same region mutexes, for two readers the registry cannot serve: clients in
//! other processes (existence checks and copy-out reads without a round trip) and the next
//! server process (a restart re-attaches the index and rebuilds the registry from it).
//!
//! - **Register** inserts into the index first, then into the registry, under the region's
//!   mutex: a full index refuses the registration ([`ErrorCode::IndexFull`]) before anything
//!   is stored. The key's generation is the index's, so an RPC lookup and an index read of the
//!   same registration report the same number.
//! - **A key leaving** (delete, eviction) leaves the registry first, then the index, under the
//!   same mutex. Registry keys are therefore always index keys (a register finding its key in
//!   the index while a delete is between the two steps answers "existed", as if it had come
//!   just before the delete).
//! - **Locations** are the resource manager's region id (stable across server restarts, which
//!   the server's own region slots are not), offset and length; namespaces are numbers from a
//!   persisted table (`registry::namespaces`).
//!
//! Lock order: region mutexes, then the index's mutex; nothing is taken under it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use maru_index::{ErrorKind, IndexError, IndexWriter, Inserted, Location};
use maru_proto::{ErrorCode, IndexInfo, WireError};

use super::regions::TableRegion;
use super::{err, lock, ServerState};
use crate::config::IndexConfig;
use crate::registry::Namespaces;

/// The server's writer of the index, and its namespace numbers.
pub(crate) struct KeyIndex {
    /// `None` once closed (at shutdown).
    pub(super) inner: Mutex<Option<Writer>>,
    /// Absolute, as clients are told.
    path: PathBuf,
    ephemeral: bool,
}

pub(super) struct Writer {
    pub(super) index: IndexWriter,
    pub(super) names: Namespaces,
}

/// One registration, as the index stores it.
pub(super) struct ToIndex<'a> {
    /// The key behind its namespace's prefix (as the registry knows it).
    pub scoped: &'a [u8],
    pub region_id: u64,
    pub offset: u64,
    pub len: u64,
}

/// Why the index could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum IndexOpenError {
    /// The file is not a valid index; it is left as it is.
    #[error("{0}; the file is left as it is (move it aside, or remove it, to start with an empty index)")]
    Corrupt(IndexError),
    #[error("{0}")]
    Unusable(String),
}

fn is_corruption(kind: &ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Truncated { .. }
            | ErrorKind::BadMagic { .. }
            | ErrorKind::VersionMismatch { .. }
            | ErrorKind::HeaderChecksum { .. }
            | ErrorKind::Geometry(_)
            | ErrorKind::CorruptEntry { .. }
            | ErrorKind::CorruptBucket { .. }
    )
}

/// `(namespace name, key)` of a registry key (`[name length][name][key]`).
pub(super) fn split_scoped(scoped: &[u8]) -> (&[u8], &[u8]) {
    let n = scoped.first().map_or(0, |&n| n as usize);
    let name_end = (1 + n).min(scoped.len());
    (&scoped[1.min(scoped.len())..name_end], &scoped[name_end..])
}

pub(super) fn scoped(name: &[u8], key: &[u8], out: &mut Vec<u8>) {
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(key);
}

impl KeyIndex {
    /// Creates the index, or re-attaches the one at the configured path: a file that fails
    /// validation is refused, never reset.
    pub fn open(cfg: &IndexConfig) -> Result<KeyIndex, IndexOpenError> {
        let path = std::path::absolute(&cfg.path).map_err(|e| {
            IndexOpenError::Unusable(format!("index path {}: {e}", cfg.path.display()))
        })?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                IndexOpenError::Unusable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let opened = if path.exists() {
            Self::attach(&path)?
        } else {
            let opts = maru_index::CreateOptions {
                capacity: cfg.capacity,
                key_area_bytes: cfg.key_area_bytes,
            };
            match IndexWriter::create(&path, opts) {
                Ok(w) => {
                    tracing::info!(
                        path = %path.display(),
                        keys = cfg.capacity,
                        bytes = w.file_bytes(),
                        "key index created"
                    );
                    w
                }
                // Made by someone else in between: attach it like any existing index.
                Err(e) if matches!(e.kind, ErrorKind::Exists) => Self::attach(&path)?,
                Err(e) => return Err(IndexOpenError::Unusable(e.to_string())),
            }
        };
        let names = Namespaces::open(&path).map_err(|e| {
            IndexOpenError::Unusable(format!(
                "namespace table {}: {e}",
                Namespaces::path_for(&path).display()
            ))
        })?;
        Ok(KeyIndex {
            inner: Mutex::new(Some(Writer {
                index: opened,
                names,
            })),
            path,
            ephemeral: cfg.ephemeral,
        })
    }

    fn attach(path: &std::path::Path) -> Result<IndexWriter, IndexOpenError> {
        match IndexWriter::open(path) {
            Ok((w, report)) => {
                if report.repaired() {
                    let torn: Vec<_> = report
                        .torn
                        .iter()
                        .map(|t| (t.slot, t.location, t.unpublished))
                        .collect();
                    tracing::warn!(
                        path = %path.display(),
                        keys = report.keys,
                        ?torn,
                        tags_cleared = report.tags_cleared,
                        overflow_fixed = report.overflow_fixed,
                        generation_raised = report.generation_raised,
                        "key index re-attached with repairs (a writer died mid-change; the \
                         torn entries' registrations never returned)"
                    );
                } else {
                    tracing::info!(
                        path = %path.display(),
                        keys = report.keys,
                        clean = report.was_clean,
                        "key index re-attached"
                    );
                }
                Ok(w)
            }
            Err(e) if is_corruption(&e.kind) => Err(IndexOpenError::Corrupt(e)),
            Err(e) => Err(IndexOpenError::Unusable(e.to_string())),
        }
    }

    /// Where clients find the index, with `namespace`'s number (`None` when the namespace
    /// cannot get one now: the client then asks the server).
    pub fn info(&self, namespace: &str) -> Option<IndexInfo> {
        let mut g = lock(&self.inner);
        let w = g.as_mut()?;
        match w.names.id_of(namespace.as_bytes()) {
            Ok(id) => Some(IndexInfo {
                path: self.path.display().to_string(),
                namespace: id,
                lane: None,
            }),
            Err(e) => {
                tracing::warn!("cannot number namespace {namespace:?} in the key index: {e}");
                None
            }
        }
    }

    /// Inserts every registration (write-once), all or nothing: for each, its generation if
    /// it is new, `None` if the key was there. On an error the batch's new keys are taken out
    /// again and nothing stays stored.
    pub(super) fn insert_all(&self, items: &[ToIndex<'_>]) -> Result<Vec<Option<u64>>, WireError> {
        let mut g = lock(&self.inner);
        let w = g
            .as_mut()
            .ok_or_else(|| err(ErrorCode::ShuttingDown, "the key index is closed"))?;
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            match w.insert(it) {
                Ok(g) => out.push(g),
                Err(e) => {
                    for (done, it) in out.iter().zip(items) {
                        if done.is_some() {
                            w.remove(it.scoped);
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Takes `scoped` out of the index.
    pub(super) fn remove(&self, scoped: &[u8]) {
        if let Some(w) = lock(&self.inner).as_mut() {
            w.remove(scoped);
        }
    }

    /// Lets the index go: a clean detach (readers see the epoch change); an ephemeral index
    /// is removed with its namespace table.
    pub fn close(&self) {
        let Some(w) = lock(&self.inner).take() else {
            return;
        };
        let Writer { index, names } = w;
        drop(index);
        if self.ephemeral {
            let _ = std::fs::remove_file(&self.path);
            names.remove_file();
        }
    }

    pub fn is_ephemeral(&self) -> bool {
        self.ephemeral
    }
}

impl Writer {
    fn insert(&mut self, it: &ToIndex<'_>) -> Result<Option<u64>, WireError> {
        let (name, key) = split_scoped(it.scoped);
        let ns = self.names.id_of(name).map_err(|e| {
            err(
                ErrorCode::Storage,
                format!("cannot number the namespace in the key index: {e}"),
            )
        })?;
        let at = Location {
            region: u32::try_from(it.region_id).map_err(|_| {
                err(
                    ErrorCode::Internal,
                    format!("region id {} does not fit the key index", it.region_id),
                )
            })?,
            offset: it.offset,
            len: u32::try_from(it.len).map_err(|_| {
                err(
                    ErrorCode::OutOfBounds,
                    format!("length {} is more than a key may have", it.len),
                )
            })?,
        };
        match self.index.insert_if_absent(ns, key, at) {
            Ok(Inserted::New(f)) => Ok(Some(f.generation)),
            Ok(Inserted::Existed(_)) => Ok(None),
            Err(e) => Err(match e.kind {
                ErrorKind::TableFull { .. } | ErrorKind::KeyAreaFull { .. } => err(
                    ErrorCode::IndexFull,
                    format!("{e} (start the server with a larger --index-keys or --index-key-bytes on a new index)"),
                ),
                ErrorKind::KeyTooLong { .. } => err(ErrorCode::KeyTooLong, e.to_string()),
                _ => err(ErrorCode::Internal, e.to_string()),
            }),
        }
    }

    fn remove(&mut self, scoped: &[u8]) {
        let (name, key) = split_scoped(scoped);
        if let Some(ns) = self.names.get(name) {
            self.index.remove(ns, key);
        }
    }
}

impl ServerState {
    /// Writes through to `index` from now on.
    pub fn with_index(mut self, index: KeyIndex) -> ServerState {
        self.index = Some(index);
        self
    }

    /// Where clients find the index and `namespace` in it.
    pub(super) fn index_info(&self, namespace: &str) -> Option<IndexInfo> {
        self.index.as_ref()?.info(namespace)
    }

    /// The index's half of a registration (see the module docs): `None` without an index.
    pub(super) fn index_insert(
        &self,
        items: &[ToIndex<'_>],
    ) -> Result<Option<Vec<Option<u64>>>, WireError> {
        match &self.index {
            Some(ix) => ix.insert_all(items).map(Some),
            None => Ok(None),
        }
    }

    /// The index's half of a key leaving.
    pub(super) fn unindex(&self, scoped: &[u8]) {
        if let Some(ix) = &self.index {
            ix.remove(scoped);
        }
    }

    /// Shutdown with an index that outlives the server: regions no key names go back to the
    /// resource manager; the others stay allocated to this process, for a server started in
    /// it again (or the resource manager's reaper, once the process is gone). Without such an
    /// index every region goes back.
    pub fn shut_down_regions(&self) {
        let keep = self.index.as_ref().is_some_and(|ix| !ix.is_ephemeral());
        if !keep {
            self.free_everything();
        } else {
            let regions: Vec<Arc<TableRegion>> = self.table().by_slot.values().cloned().collect();
            for region in regions {
                let handle = {
                    let mut st = lock(&region.state);
                    st.owner_live = false;
                    self.take_if_unreferenced(&region, &mut st)
                };
                if let Some(h) = handle {
                    self.free_at_rm(h);
                }
            }
            self.retry_pending_frees();
        }
        if let Some(ix) = &self.index {
            ix.close();
        }
        self.close_lanes();
    }
}

#[cfg(test)]
mod tests {
    use maru_index::IndexReader;
    use maru_proto::DeleteStatus;

    use super::*;
    use crate::resource_manager::RegionSource;
    use crate::state::fixtures::*;
    use crate::state::Restored;

    /// Register, delete and eviction keep the index in step with the registry; a new state
    /// on the same index and resource manager rebuilds keys, generations and reference
    /// counts, and drops the keys of a region the resource manager no longer holds.
    #[test]
    fn the_index_follows_the_registry_and_rebuilds_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = index_config(&dir, 1000, 64 << 10);
        let (st, rm) = indexed_state(&cfg);
        let (_p, a, r1) = client_with_region(&st, "a");
        let r2 = st.request_region(&a, MIB).unwrap();
        let (k1, k2, k3, kb) = (
            key_in(b"", b"k1"),
            key_in(b"", b"a key longer than sixteen bytes"),
            key_in(b"", b"k3"),
            key_in(b"tenant", b"k1"),
        );
        assert!(st.register(&a, &reg(&k1, &r1, 0, 10)).unwrap());
        assert!(
            !st.register(&a, &reg(&k1, &r1, 4096, 10)).unwrap(),
            "write-once"
        );
        let batch = [
            reg(&k2, &r1, 4096, 20),
            reg(&kb, &r1, 8192, 30),
            reg(&k3, &r2, 0, 5),
        ];
        assert_eq!(st.batch_register(&a, &batch).unwrap(), [true; 3]);
        let reader = IndexReader::open(&cfg.path).unwrap();
        let ns_b = st.index_info("tenant").unwrap().namespace;
        assert_ne!(ns_b, 0);
        let f1 = reader.lookup(0, b"k1").unwrap();
        assert_eq!(
            (
                f1.location.region as u64,
                f1.location.offset,
                f1.location.len
            ),
            (r1.info.handle.region_id, 0, 10)
        );
        assert_eq!(reader.lookup(ns_b, b"k1").unwrap().location.len, 30);
        // The generation the server reports is the index's.
        let held = st.find_and_hold(None, &k1).unwrap();
        assert_eq!(held.generation, f1.generation);
        assert_eq!(st.delete(&k1), DeleteStatus::Deleted);
        assert!(reader.lookup(0, b"k1").is_none());
        let mut returned = crate::state::notices::Returned::default();
        assert!(st.evict_key(&k3, &mut returned).is_some());
        assert!(reader.lookup(0, b"k3").is_none());
        assert_eq!(reader.len(), 2);

        st.shut_down_regions();
        assert_eq!(
            rm.live().len(),
            1,
            "r2 had no key left; r1 stays for the index"
        );
        let st2 = restarted_state(&rm, &cfg);
        let restored = st2.restore_from_index().unwrap();
        assert_eq!(
            restored,
            Restored {
                keys: 2,
                regions: 1,
                dropped: 0
            }
        );
        st2.check_ref_counts();
        let h2 = st2.find_and_hold(None, &k2).unwrap();
        assert_eq!((h2.offset, h2.len), (4096, 20));
        assert_eq!(
            h2.generation,
            reader
                .lookup(0, b"a key longer than sixteen bytes")
                .unwrap()
                .generation
        );
        assert!(st2.find_and_hold(None, &kb).is_some());
        // A restored region goes back with its last key.
        assert_eq!(st2.delete(&k2), DeleteStatus::Deleted);
        assert_eq!(st2.delete(&kb), DeleteStatus::Deleted);
        assert!(rm.live().is_empty());
        assert_eq!(reader.len(), 0);

        // Entries of a region the resource manager does not hold are dropped at the rebuild.
        let (_p, c, r3) = client_with_region(&st2, "c");
        assert!(st2.register(&c, &reg(&k1, &r3, 0, 1)).unwrap());
        st2.shut_down_regions();
        rm.free(&r3.info.handle).unwrap();
        let st3 = restarted_state(&rm, &cfg);
        assert_eq!(st3.restore_from_index().unwrap().dropped, 1);
        assert_eq!(reader.len(), 0);
    }

    #[test]
    fn scoped_keys_split_into_namespace_and_key() {
        let mut s = Vec::new();
        scoped(b"tenant", b"k1", &mut s);
        assert_eq!(split_scoped(&s), (&b"tenant"[..], &b"k1"[..]));
        s.clear();
        scoped(b"", b"k", &mut s);
        assert_eq!(split_scoped(&s), (&b""[..], &b"k"[..]));
        assert_eq!(split_scoped(&[]), (&b""[..], &b""[..]));
        assert_eq!(split_scoped(&[5, b'a']), (&b"a"[..], &b""[..]));
    }
}
