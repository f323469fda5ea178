//! The crate's one error type: what went wrong ([`ErrorKind`]) and with which index file.

use std::io;
use std::path::PathBuf;

/// An index operation failed. `kind` says what, `path` with which file.
#[derive(Debug, thiserror::Error)]
#[error("key index {}: {kind}", path.display())]
pub struct IndexError {
    pub kind: ErrorKind,
    pub path: PathBuf,
}

impl IndexError {
    pub(crate) fn new(path: impl Into<PathBuf>, kind: ErrorKind) -> IndexError {
        IndexError {
            kind,
            path: path.into(),
        }
    }
}

/// What went wrong. The kinds an opener can get name the first check the file failed; none of
/// them is ever answered by resetting the file.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error("{op}: {source}")]
    Io { op: &'static str, source: io::Error },
    #[error(transparent)]
    Map(#[from] maru_shm::ShmError),
    #[error("the file exists already")]
    Exists,
    #[error("file is {found} bytes, the index needs {expected}: truncated")]
    Truncated { found: u64, expected: u64 },
    #[error("not a Maru key index: magic is {found:02x?}")]
    BadMagic { found: [u8; 8] },
    #[error("layout version {found}, this build reads version {expected}")]
    VersionMismatch { found: u32, expected: u32 },
    #[error("header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("header geometry is inconsistent: {0}")]
    Geometry(String),
    #[error("entry {slot} is corrupt: {what}")]
    CorruptEntry { slot: u64, what: String },
    #[error("bucket {bucket} is corrupt: {what}")]
    CorruptBucket { bucket: u64, what: String },
    #[error("another writer holds the index")]
    Locked,
    #[error("the table is full: {live} keys in {slots} slots")]
    TableFull { live: u64, slots: u64 },
    #[error("the key-bytes area is full: a {need}-byte key does not fit")]
    KeyAreaFull { need: usize },
    #[error("a key is at most {max} bytes, this one is {len}")]
    KeyTooLong { len: usize, max: usize },
    #[error("invalid location: {0}")]
    InvalidLocation(&'static str),
    #[error("invalid geometry requested: {0}")]
    InvalidOptions(String),
}
