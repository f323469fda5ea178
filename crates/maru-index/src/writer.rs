//! The single writer: the metadata server creates or re-attaches the index and is then the
//! only process that changes it. An exclusive `flock` on the file enforces that; the kernel
//! drops it when the writer dies, so a restarted server can re-attach at once.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use maru_shm::MapMode;
use rustix::fs::{flock, FlockOperation};

use crate::attach::{attach, AttachReport};
use crate::coherence::{Coherence, Coherent};
use crate::error::{ErrorKind, IndexError};
use crate::keyarea::KeyArea;
use crate::layout::*;
use crate::segment::Segment;
use crate::sync::Ordering::*;
use crate::table::{Found, Location};

/// What [`IndexWriter::insert_if_absent`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// The key is new; here is its entry.
    New(Found),
    /// The key was there already (write-once: nothing changed).
    Existed(Found),
}

/// The shape of a new index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateOptions {
    /// Keys the table is sized for (at 85 % load; up to 95 % of slots are accepted).
    pub capacity: u64,
    /// Bytes for keys longer than 16 bytes (each takes its length rounded up to 8).
    pub key_area_bytes: u64,
}

/// The index's one writer.
pub struct IndexWriter<C: Coherence = Coherent> {
    seg: Segment,
    coh: C,
    keys: KeyArea,
    live: u64,
    next_generation: u64,
    /// Holds the exclusive lock for as long as the writer lives.
    _lock: File,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl Fn(std::io::Error) -> IndexError + 'a {
    move |source| IndexError::new(path, ErrorKind::Io { op, source })
}

fn lock(path: &Path, file: &File) -> Result<(), IndexError> {
    flock(file, FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        if e == rustix::io::Errno::WOULDBLOCK {
            IndexError::new(path, ErrorKind::Locked)
        } else {
            io_err(path, "lock")(e.into())
        }
    })
}

impl IndexWriter<Coherent> {
    /// Creates a new index at `path` (which must not exist) on coherent memory.
    pub fn create(path: &Path, opts: CreateOptions) -> Result<Self, IndexError> {
        Self::create_with(path, opts, Coherent)
    }

    /// Re-attaches the index at `path` (see [`IndexWriter::open_with`]).
    pub fn open(path: &Path) -> Result<(Self, AttachReport), IndexError> {
        Self::open_with(path, Coherent)
    }
}

impl<C: Coherence> IndexWriter<C> {
    /// Creates a new index. The file is built under a temporary name, header included, and
    /// linked to `path` only when complete, so no reader ever sees a half-made index; an
    /// existing `path` is an error ([`ErrorKind::Exists`]), never overwritten.
    pub fn create_with(path: &Path, opts: CreateOptions, coh: C) -> Result<Self, IndexError> {
        let geometry = Geometry::for_capacity(opts.capacity, opts.key_area_bytes)
            .map_err(|k| IndexError::new(path, k))?;
        if path.exists() {
            return Err(IndexError::new(path, ErrorKind::Exists));
        }
        // A hugetlbfs refuses `write` and lengths that are not whole 2 MiB pages; said in
        // words rather than as the EINVAL of the first call that meets it.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if dir.and_then(|d| maru_shm::fs_page_size(d).ok()) == Some(maru_shm::HUGE_PAGE_SIZE) {
            return Err(IndexError::new(
                path,
                ErrorKind::InvalidOptions(
                    "the key index cannot live on a hugetlbfs (it holds mappable files only); \
                     put it on a tmpfs such as /dev/shm"
                        .into(),
                ),
            ));
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".creating.{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let built = Self::build(path, &tmp, geometry, coh);
        let _ = std::fs::remove_file(&tmp);
        built
    }

    fn build(path: &Path, tmp: &Path, geometry: Geometry, coh: C) -> Result<Self, IndexError> {
        // Readable by the clients, writable by the server only, whatever the umask.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(tmp)
            .map_err(io_err(tmp, "create"))?;
        lock(tmp, &file)?;
        file.set_len(geometry.file_bytes())
            .map_err(io_err(tmp, "size"))?;
        let mut header = vec![0u8; 160];
        header[..76].copy_from_slice(&geometry.encode());
        let counters = [
            (H_EPOCH, 1u64),
            (H_NEXT_GENERATION, 1),
            (H_LIVE, 0),
            (H_KEY_HIGH, 0),
        ];
        for (word, value) in counters {
            header[word * 8..word * 8 + 8].copy_from_slice(&value.to_le_bytes());
        }
        file.write_all_at(&header, 0)
            .map_err(io_err(tmp, "write header"))?;
        let mut seg = Segment::open(tmp, &file, MapMode::ReadWrite, true)?;
        std::fs::hard_link(tmp, path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                IndexError::new(path, ErrorKind::Exists)
            } else {
                io_err(path, "link")(e)
            }
        })?;
        seg.path = path.to_owned();
        Ok(IndexWriter {
            keys: KeyArea::new(geometry.key_area_words()),
            seg,
            coh,
            live: 0,
            next_generation: 1,
            _lock: file,
        })
    }

    /// Re-attaches an existing index: checks the header (magic, layout version, checksum,
    /// geometry, size), takes the writer's lock, then checks every entry and repairs what a
    /// writer killed mid-call leaves behind (`attach.rs`); the report says what was repaired.
    /// A corrupt file is refused with what is wrong and left as it is.
    pub fn open_with(path: &Path, coh: C) -> Result<(Self, AttachReport), IndexError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path, "open"))?;
        lock(path, &file)?;
        let seg = Segment::open(path, &file, MapMode::ReadWrite, true)?;
        let attached = attach(&seg, &coh)?;
        Ok((
            IndexWriter {
                seg,
                coh,
                keys: attached.keys,
                live: attached.live,
                next_generation: attached.next_generation,
                _lock: file,
            },
            attached.report,
        ))
    }

    fn err(&self, kind: ErrorKind) -> IndexError {
        IndexError::new(&self.seg.path, kind)
    }

    fn check(&self, key: &[u8], loc: Location) -> Result<(), IndexError> {
        if key.len() > MAX_KEY_LEN {
            return Err(self.err(ErrorKind::KeyTooLong {
                len: key.len(),
                max: MAX_KEY_LEN,
            }));
        }
        if loc.len == 0 {
            return Err(self.err(ErrorKind::InvalidLocation("length must be positive")));
        }
        Ok(())
    }

    /// A fresh generation, counted in the header before any entry carries it, so a restarted
    /// writer never hands it out again.
    fn take_generation(&mut self) -> u64 {
        let g = self.next_generation;
        self.next_generation += 1;
        let w = &self.seg.header()[H_NEXT_GENERATION];
        w.store(self.next_generation, Release);
        self.coh.publish(w as *const _ as *const u8, 8);
        g
    }

    fn count_live(&self) {
        let header = self.seg.header();
        header[H_LIVE].store(self.live, Release);
        header[H_KEY_HIGH].store(self.keys.high(), Release);
    }

    /// Stores `loc` under `(ns, key)` unless the key exists (write-once).
    pub fn insert_if_absent(
        &mut self,
        ns: u32,
        key: &[u8],
        loc: Location,
    ) -> Result<Inserted, IndexError> {
        self.check(key, loc)?;
        let table = self.seg.table();
        let hash = table.hash(ns, key);
        if let Some(f) = table.lookup_hashed(&self.coh, hash, ns, key) {
            return Ok(Inserted::Existed(f));
        }
        if self.live >= self.seg.geometry.max_keys() {
            return Err(self.err(ErrorKind::TableFull {
                live: self.live,
                slots: self.seg.geometry.slots(),
            }));
        }
        let Some(slot) = table.free_slot(hash) else {
            return Err(self.err(ErrorKind::TableFull {
                live: self.live,
                slots: self.seg.geometry.slots(),
            }));
        };
        let key_at = if key.len() > INLINE_KEY_BYTES {
            match self.keys.alloc(key.len().div_ceil(8) as u64) {
                Some(at) => at,
                None => return Err(self.err(ErrorKind::KeyAreaFull { need: key.len() })),
            }
        } else {
            0
        };
        let generation = self.take_generation();
        let table = self.seg.table();
        table.insert_at(&self.coh, slot, hash, ns, key, loc, generation, key_at);
        self.live += 1;
        self.count_live();
        Ok(Inserted::New(Found {
            location: loc,
            generation,
            slot,
        }))
    }

    /// Removes `(ns, key)`; returns the entry it had.
    pub fn remove(&mut self, ns: u32, key: &[u8]) -> Option<Found> {
        let table = self.seg.table();
        let hash = table.hash(ns, key);
        let found = table.lookup_hashed(&self.coh, hash, ns, key)?;
        let key_at = table.entry(found.slot)[W_KEY0].load(Relaxed);
        table.remove_at(&self.coh, found.slot, hash);
        if key.len() > INLINE_KEY_BYTES {
            self.keys.release(key_at, key.len().div_ceil(8) as u64);
        }
        self.live -= 1;
        self.count_live();
        Some(found)
    }

    /// Points an existing key at `loc` under a new generation; None when the key is absent.
    pub fn update(
        &mut self,
        ns: u32,
        key: &[u8],
        loc: Location,
    ) -> Result<Option<Found>, IndexError> {
        self.check(key, loc)?;
        let table = self.seg.table();
        let Some(found) = table.lookup(&self.coh, ns, key) else {
            return Ok(None);
        };
        let generation = self.take_generation();
        self.seg
            .table()
            .update_at(&self.coh, found.slot, loc, generation);
        Ok(Some(Found {
            location: loc,
            generation,
            slot: found.slot,
        }))
    }

    pub fn lookup(&self, ns: u32, key: &[u8]) -> Option<Found> {
        self.seg.table().lookup(&self.coh, ns, key)
    }

    /// Visits every key in slot order (for rebuilding per-region reference counts after a
    /// restart: one pass, no allocation per key).
    pub fn for_each(&self, mut f: impl FnMut(u32, &[u8], Found)) {
        let table = self.seg.table();
        let mut key = Vec::with_capacity(MAX_KEY_LEN);
        for slot in 0..table.slots() {
            table.prefetch_key(slot + crate::table::PREFETCH_AHEAD);
            let e = table.entry(slot);
            let generation = e[W_GENERATION].load(Relaxed);
            if generation == 0 {
                continue;
            }
            if let Some((ns, _)) = table.stored_key(slot, &mut key) {
                let location = crate::table::unpack_location(
                    e[W_REGION_LEN].load(Relaxed),
                    e[W_OFFSET].load(Relaxed),
                );
                f(
                    ns,
                    &key,
                    Found {
                        location,
                        generation,
                        slot,
                    },
                );
            }
        }
    }

    /// Keys in the index.
    pub fn len(&self) -> u64 {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    pub fn geometry(&self) -> Geometry {
        self.seg.geometry
    }

    pub fn path(&self) -> &Path {
        &self.seg.path
    }

    /// Bytes of the key-bytes area in use (whole words).
    pub fn key_bytes_used(&self) -> u64 {
        self.keys.used() * 8
    }

    /// The index file's size.
    pub fn file_bytes(&self) -> u64 {
        self.seg.mapped_bytes()
    }

    /// Marks the index as shut down cleanly (an even epoch) and lets the lock go.
    pub fn close(self) {}
}

impl<C: Coherence> Drop for IndexWriter<C> {
    /// Every call leaves the index consistent (`&mut self` rules out one in progress), so
    /// dropping the writer is a clean shutdown; only death of the process is not.
    fn drop(&mut self) {
        let w = &self.seg.header()[H_EPOCH];
        let epoch = w.load(Relaxed);
        if epoch & 1 == 1 {
            w.store(epoch + 1, Release);
            self.coh.publish(w as *const _ as *const u8, 8);
        }
    }
}
