//! The key registry: key → where its bytes are.
//!
//! Everything the server needs from it goes through [`KeyRegistry`], a deliberately narrow
//! interface (insert-if-absent, lookup, remove-if-unpinned, pin/unpin, iterate and count). Its
//! next home is a versioned index inside a shared-memory segment that clients read without a
//! round trip (docs/ARCHITECTURE.md §8), so nothing above this module may assume the registry
//! is a private in-process map: it stores only compact, pointer-free values (16-byte [`Entry`]s,
//! and keys in byte arenas addressed by offset) and never hands out references into itself.

pub(crate) mod arena;
mod bulk;
mod namespaces;
mod sharded;

pub use bulk::Staged;
pub use namespaces::Namespaces;
pub use sharded::ShardedRegistry;

/// Keys register at offsets that are a multiple of this (the client's page allocator works in
/// 4 KiB units at least), which is what lets an [`Entry`] store the offset in 32 bits.
pub const PAGE_ALIGN: u64 = 4096;

/// The server's small number for a region (not the resource manager's 64-bit region id).
/// Never reused while the server runs, so an entry can never silently point into a region
/// that replaced a freed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionSlot(pub u32);

/// A key's location: 16 bytes, no pointers (it must be able to live in shared memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub region: RegionSlot,
    /// Offset inside the region in units of [`PAGE_ALIGN`].
    page: u32,
    len: u32,
    /// How many pins hold the key; a pinned key is not deleted.
    pub pins: u32,
}

/// Why a location cannot be stored in an [`Entry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("offset {0} is not a multiple of {PAGE_ALIGN}")]
    Unaligned(u64),
    #[error("length must be greater than zero")]
    Empty,
    #[error("offset {0} is beyond what the registry can address (16 TiB)")]
    OffsetTooLarge(u64),
    #[error("length {0} is larger than one key may be (4 GiB - 1)")]
    LenTooLarge(u64),
}

impl Entry {
    /// An unpinned entry for `len` bytes at `offset` of `region`.
    pub fn new(region: RegionSlot, offset: u64, len: u64) -> Result<Entry, EntryError> {
        if !offset.is_multiple_of(PAGE_ALIGN) {
            return Err(EntryError::Unaligned(offset));
        }
        if len == 0 {
            return Err(EntryError::Empty);
        }
        let page =
            u32::try_from(offset / PAGE_ALIGN).map_err(|_| EntryError::OffsetTooLarge(offset))?;
        let len32 = u32::try_from(len).map_err(|_| EntryError::LenTooLarge(len))?;
        Ok(Entry {
            region,
            page,
            len: len32,
            pins: 0,
        })
    }

    /// Offset in bytes from the start of the region.
    pub fn offset(&self) -> u64 {
        self.page as u64 * PAGE_ALIGN
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Always false: entries have a positive length. (Here for clippy's `len_without_is_empty`.)
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Same location, ignoring pins.
    pub fn same_place(&self, other: &Entry) -> bool {
        self.region == other.region && self.page == other.page && self.len == other.len
    }
}

/// Outcome of [`KeyRegistry::remove_if_unpinned`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    NotFound,
    /// The key exists and is pinned; it stays.
    Pinned,
    /// The key points into another region than the caller expected (it was deleted and
    /// registered again meanwhile); nothing was removed.
    Elsewhere(Entry),
    Removed(Entry),
}

/// Totals kept by the registry itself, so stats never walk every key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryCounts {
    pub keys: u64,
    /// Sum of the lengths of all entries.
    pub bytes: u64,
    pub pinned_keys: u64,
}

/// The registry interface. Every method is atomic with respect to the others for one key.
pub trait KeyRegistry: Send + Sync {
    /// Stores `entry` under `key` unless the key exists (write-once). True when stored.
    ///
    /// Keys are at most [`maru_proto::MAX_KEY_LEN`] bytes (the decoder refuses longer ones);
    /// an implementation may panic on a key it cannot hold.
    fn insert_if_absent(&self, key: &[u8], entry: Entry) -> bool;

    fn lookup(&self, key: &[u8]) -> Option<Entry>;

    fn exists(&self, key: &[u8]) -> bool {
        self.lookup(key).is_some()
    }

    /// Removes the key if it is unpinned and points into `region`.
    fn remove_if_unpinned(&self, key: &[u8], region: RegionSlot) -> Removal;

    /// Adds a pin; false when the key does not exist.
    fn pin(&self, key: &[u8]) -> bool {
        self.pin_n(key, 1)
    }

    /// Adds `n` pins at once (a resumed session's); false when the key does not exist.
    fn pin_n(&self, key: &[u8], n: u32) -> bool;

    /// Takes a pin away; false when the key does not exist or is not pinned.
    fn unpin(&self, key: &[u8]) -> bool {
        self.unpin_n(key, 1)
    }

    /// Takes up to `n` pins away at once; false when the key does not exist or is not
    /// pinned.
    fn unpin_n(&self, key: &[u8], n: u32) -> bool;

    fn counts(&self) -> RegistryCounts;

    /// Visits every key (in no particular order). Not a hot-path operation.
    fn for_each(&self, f: &mut dyn FnMut(&[u8], Entry));

    /// Number of keys that point into `region` (a slow walk; the server keeps its own
    /// per-region reference counts and uses this only to check them).
    fn count_in_region(&self, region: RegionSlot) -> u64 {
        let mut n = 0;
        self.for_each(&mut |_, e| n += (e.region == region) as u64);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_is_sixteen_bytes_and_checks_its_fields() {
        assert_eq!(std::mem::size_of::<Entry>(), 16);
        let e = Entry::new(RegionSlot(3), 8192, 100).unwrap();
        assert_eq!((e.offset(), e.len(), e.pins), (8192, 100, 0));
        assert_eq!(
            Entry::new(RegionSlot(0), 100, 1),
            Err(EntryError::Unaligned(100))
        );
        assert_eq!(Entry::new(RegionSlot(0), 0, 0), Err(EntryError::Empty));
        assert!(matches!(
            Entry::new(RegionSlot(0), PAGE_ALIGN << 32, 1),
            Err(EntryError::OffsetTooLarge(_))
        ));
        assert!(matches!(
            Entry::new(RegionSlot(0), 0, 1 << 32),
            Err(EntryError::LenTooLarge(_))
        ));
        let largest = Entry::new(
            RegionSlot(0),
            (u32::MAX as u64) * PAGE_ALIGN,
            u32::MAX as u64,
        )
        .unwrap();
        assert_eq!(largest.offset(), (u32::MAX as u64) * PAGE_ALIGN);
    }
}
