//! The metadata server's key index in a shared-memory segment: a file beside the pool that the
//! server (its only writer) changes and clients read directly, so existence checks and
//! lookups need no round trip, and a restarted server re-attaches it without losing keys.
//!
//! - [`layout`]: the file format (header, buckets, entries, key bytes) and its budget.
//! - [`IndexWriter`]: create, re-attach (validate, repair what a killed writer left, refuse
//!   corruption), insert-if-absent, remove, update, iterate.
//! - [`IndexReader`]: lookup, batch lookup, prefix length, copy-out reads with a generation
//!   recheck ([`IndexReader::read_into`]).
//! - [`LaneFile`] / [`LaneWriter`]: hold lanes, a second file where clients hold pages they
//!   found in the index without a round trip, and the server looks before it returns a page
//!   (`lanes.rs` has the protocol and why it is sound).
//! - [`Coherence`]: what happens around loads and stores on memory that is not coherent
//!   (CXL 2.0 sharing between hosts); nothing on ordinary memory.
//!
//! It owns the index file's format and every access to it. It may not touch regions, pools
//! or the wire protocol: an entry holds a location (region, offset, length) it never maps or
//! checks, a copy-out read copies from a mapping its caller hands it, and which keys exist
//! and when they go is the metadata server's decision.
//!
//! # Memory model
//!
//! The index is memory that other processes write while this one reads, so every access to it
//! is atomic: the file's words are viewed as `AtomicU32` / `AtomicU64` and never as plain
//! integers or byte slices. Readers use acquire loads only; the writer uses release stores
//! (the first store of each change, its version going odd, may be relaxed). An entry is read
//! seqlock-style: version (even), fields and key bytes, version again; equal versions mean the
//! read saw one state of the entry. Because each field is an atomic word, a concurrent change
//! can make a read inconsistent but never undefined, and the version check discards the
//! inconsistent ones. The argument in full, and the linearisation points of insert, remove and
//! update, are in `table.rs`; tests/loom.rs model-checks them.
//!
//! Key bytes are data, yet they too are read with atomic word loads, because the writer reuses
//! the key-bytes area of removed keys. The bytes of a key's page are outside the index: a
//! copy-out read copies them with atomic word loads ([`copy_atomic`]) and then rechecks the
//! entry's generation; the server returns a page to its owner only after the key naming it is
//! gone, so an unchanged generation after the copy means the copy is of the key's bytes.
//!
//! # Example
//!
//! ```
//! use maru_index::{CreateOptions, IndexReader, IndexWriter, Inserted, Location};
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("pool.index");
//! let mut w = IndexWriter::create(&path, CreateOptions { capacity: 1000, key_area_bytes: 64 << 10 })?;
//! let at = Location { region: 3, offset: 8192, len: 4096 };
//! assert!(matches!(w.insert_if_absent(0, b"a key longer than sixteen bytes", at)?, Inserted::New(_)));
//! let r = IndexReader::open(&path)?;
//! let found = r.lookup(0, b"a key longer than sixteen bytes").unwrap();
//! assert_eq!(found.location, at);
//! assert!(r.lookup(1, b"a key longer than sixteen bytes").is_none()); // another namespace
//! w.remove(0, b"a key longer than sixteen bytes");
//! assert!(!r.is_current(&found));
//! # Ok::<(), maru_index::IndexError>(())
//! ```

// The loom build keeps only the table and lanes protocols and their models.
#![cfg_attr(loom, allow(dead_code, unused_imports))]

mod coherence;
mod error;
mod hash;
mod header;
mod lanes;
pub mod layout;
mod sync;
mod table;

#[cfg(not(loom))]
mod attach;
#[cfg(not(loom))]
mod keyarea;
#[cfg(not(loom))]
mod reader;
#[cfg(not(loom))]
mod segment;
#[cfg(not(loom))]
mod writer;

#[cfg(loom)]
pub mod model;

pub use coherence::{Coherence, Coherent, FlushLines};
pub use error::{ErrorKind, IndexError};
pub use hash::key_hash;
pub use lanes::{MAX_LANES, MAX_LANE_PAGE, MAX_LANE_SLOTS};
pub use layout::Geometry;
pub use table::{Found, Location};

#[cfg(not(loom))]
pub use attach::{AttachReport, TornEntry};
#[cfg(not(loom))]
pub use lanes::{LaneFile, LaneWriter};
#[cfg(not(loom))]
pub use reader::{copy_atomic, IndexReader, PageSource, ReadOutcome};
#[cfg(not(loom))]
pub use writer::{CreateOptions, IndexWriter, Inserted};
