//! First-fit extent allocation over one pool: a sorted map of free extents
//! (offset → length), every offset and length a multiple of the pool's alignment, adjacent
//! free extents always merged.

use std::collections::BTreeMap;

/// Why a range cannot be freed or reserved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtentError {
    #[error("range {offset}+{len} is not aligned to {align}")]
    Unaligned { offset: u64, len: u64, align: u64 },
    #[error("range {offset}+{len} is outside the pool ({capacity} bytes)")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("range {offset}+{len} overlaps free space")]
    AlreadyFree { offset: u64, len: u64 },
    #[error("range {offset}+{len} is not entirely free")]
    NotFree { offset: u64, len: u64 },
}

/// Free-space map of one pool.
#[derive(Debug, Clone)]
pub struct ExtentAllocator {
    /// Allocatable bytes: `[start, end)`.
    capacity: u64,
    /// First allocatable byte (after what [`ExtentAllocator::set_aside_start`] took).
    start: u64,
    align: u64,
    free: BTreeMap<u64, u64>,
    free_bytes: u64,
}

impl ExtentAllocator {
    /// An empty pool of `total` bytes. Only whole multiples of `align` are usable (a tail
    /// smaller than one alignment unit could never hold a region). `align` 0 counts as 1.
    pub fn new(total: u64, align: u64) -> Self {
        let align = align.max(1);
        let capacity = total / align * align;
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        ExtentAllocator {
            capacity,
            start: 0,
            align,
            free,
            free_bytes: capacity,
        }
    }

    /// Bytes that can be allocated (the range set aside at the start excluded).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Takes `len` bytes (rounded up to the alignment) at the start of the range out of the
    /// pool for good: they are neither free nor allocated, and not part of the capacity (the
    /// pool header's extent; a pool smaller than that has no capacity left). The range must
    /// be free. Idempotent for the same length.
    pub fn set_aside_start(&mut self, len: u64) -> Result<(), ExtentError> {
        let end = self.start + self.capacity;
        let len = match self.rounded(len) {
            Some(l) => l.min(end),
            None if len == 0 => 0,
            None => end,
        };
        if len <= self.start {
            return Ok(());
        }
        let extra = len - self.start;
        self.reserve(self.start, extra)?;
        self.start = len;
        self.capacity -= extra;
        Ok(())
    }
    pub fn align(&self) -> u64 {
        self.align
    }
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }
    pub fn used_bytes(&self) -> u64 {
        self.capacity - self.free_bytes
    }

    /// `len` rounded up to the alignment, `None` on overflow or zero.
    pub fn rounded(&self, len: u64) -> Option<u64> {
        if len == 0 {
            return None;
        }
        len.checked_add(self.align - 1)
            .map(|x| x / self.align * self.align)
    }

    pub fn largest_free(&self) -> u64 {
        self.free.values().copied().max().unwrap_or(0)
    }

    /// Free extents in offset order.
    pub fn free_extents(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.free.iter().map(|(o, l)| (*o, *l))
    }

    /// Takes the lowest-addressed free range of `len` bytes (rounded up to the alignment).
    /// Returns its offset and rounded length.
    pub fn alloc(&mut self, len: u64) -> Option<(u64, u64)> {
        let len = self.rounded(len)?;
        let (&off, &ext) = self.free.iter().find(|(_, l)| **l >= len)?;
        self.free.remove(&off);
        if ext > len {
            self.free.insert(off + len, ext - len);
        }
        self.free_bytes -= len;
        Some((off, len))
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<u64, ExtentError> {
        if len == 0 || !offset.is_multiple_of(self.align) || !len.is_multiple_of(self.align) {
            return Err(ExtentError::Unaligned {
                offset,
                len,
                align: self.align,
            });
        }
        match offset.checked_add(len) {
            Some(end) if offset >= self.start && end <= self.start + self.capacity => Ok(end),
            _ => Err(ExtentError::OutOfRange {
                offset,
                len,
                capacity: self.capacity,
            }),
        }
    }

    /// Returns a range to the free map, merging it with its neighbours. Refuses a range that
    /// overlaps free space (a double free) and leaves the map unchanged then.
    pub fn free(&mut self, offset: u64, len: u64) -> Result<(), ExtentError> {
        let end = self.check_range(offset, len)?;
        let before = self
            .free
            .range(..=offset)
            .next_back()
            .map(|(o, l)| (*o, *l));
        let after = self.free.range(offset..).next().map(|(o, l)| (*o, *l));
        if before.is_some_and(|(o, l)| o + l > offset) || after.is_some_and(|(o, _)| o < end) {
            return Err(ExtentError::AlreadyFree { offset, len });
        }
        let mut start = offset;
        let mut size = len;
        if let Some((o, l)) = before.filter(|(o, l)| o + l == offset) {
            self.free.remove(&o);
            start = o;
            size += l;
        }
        if let Some((o, l)) = after.filter(|(o, _)| *o == end) {
            self.free.remove(&o);
            size += l;
        }
        self.free.insert(start, size);
        self.free_bytes += len;
        Ok(())
    }

    /// Marks a specific range as used (rebuilding the map from a recovered allocation table).
    /// The range must lie inside one free extent.
    pub fn reserve(&mut self, offset: u64, len: u64) -> Result<(), ExtentError> {
        let end = self.check_range(offset, len)?;
        let Some((o, l)) = self
            .free
            .range(..=offset)
            .next_back()
            .map(|(o, l)| (*o, *l))
            .filter(|(o, l)| o + l >= end)
        else {
            return Err(ExtentError::NotFree { offset, len });
        };
        self.free.remove(&o);
        if offset > o {
            self.free.insert(o, offset - o);
        }
        if o + l > end {
            self.free.insert(end, o + l - end);
        }
        self.free_bytes -= len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 2 << 20;

    #[test]
    fn first_fit_splits_and_free_coalesces() {
        let mut x = ExtentAllocator::new(10 * A + 5, A);
        assert_eq!(x.capacity(), 10 * A);
        assert_eq!(x.alloc(1), Some((0, A)));
        assert_eq!(x.alloc(A + 1), Some((A, 2 * A)));
        assert_eq!(x.alloc(A), Some((3 * A, A)));
        x.free(A, 2 * A).unwrap();
        assert_eq!(x.alloc(A), Some((A, A)), "first fit reuses the hole");
        x.free(0, A).unwrap();
        x.free(A, A).unwrap();
        x.free(3 * A, A).unwrap();
        assert_eq!(x.free_extents().collect::<Vec<_>>(), vec![(0, 10 * A)]);
        assert_eq!(x.free_bytes(), 10 * A);
    }

    #[test]
    fn double_free_and_bad_ranges_change_nothing() {
        let mut x = ExtentAllocator::new(4 * A, A);
        let (o, l) = x.alloc(A).unwrap();
        x.free(o, l).unwrap();
        let before = x.free_extents().collect::<Vec<_>>();
        assert!(matches!(x.free(o, l), Err(ExtentError::AlreadyFree { .. })));
        assert!(matches!(x.free(1, A), Err(ExtentError::Unaligned { .. })));
        assert!(matches!(
            x.free(4 * A, A),
            Err(ExtentError::OutOfRange { .. })
        ));
        assert!(x.free(u64::MAX - A + 1, A).is_err());
        assert_eq!(x.free_extents().collect::<Vec<_>>(), before);
        assert_eq!(x.alloc(0), None);
        assert_eq!(x.alloc(u64::MAX), None);
        assert_eq!(x.alloc(5 * A), None);
    }

    #[test]
    fn reserve_carves_exact_ranges() {
        let mut x = ExtentAllocator::new(8 * A, A);
        x.reserve(2 * A, 2 * A).unwrap();
        x.reserve(7 * A, A).unwrap();
        assert!(x.reserve(3 * A, A).is_err());
        assert_eq!(
            x.free_extents().collect::<Vec<_>>(),
            vec![(0, 2 * A), (4 * A, 3 * A)]
        );
        assert_eq!(x.alloc(3 * A), Some((4 * A, 3 * A)));
    }

    #[test]
    fn a_range_set_aside_at_the_start_is_never_handed_out_nor_counted() {
        let mut x = ExtentAllocator::new(4 * A, A);
        x.set_aside_start(1).unwrap();
        x.set_aside_start(A).unwrap();
        assert_eq!(
            (x.capacity(), x.free_bytes(), x.used_bytes()),
            (3 * A, 3 * A, 0)
        );
        assert_eq!(x.free_extents().collect::<Vec<_>>(), vec![(A, 3 * A)]);
        assert_eq!(x.alloc(A), Some((A, A)));
        assert!(matches!(x.free(0, A), Err(ExtentError::OutOfRange { .. })));
        assert!(x.reserve(0, A).is_err());
        assert_eq!(x.alloc(3 * A), None, "only 2 units are left");
        x.free(A, A).unwrap();
        assert_eq!(x.alloc(3 * A), Some((A, 3 * A)));
        // A start already in use cannot be set aside.
        let mut y = ExtentAllocator::new(4 * A, A);
        y.alloc(A).unwrap();
        assert!(matches!(
            y.set_aside_start(A),
            Err(ExtentError::NotFree { .. })
        ));
        assert_eq!(y.capacity(), 4 * A);
        let mut small = ExtentAllocator::new(A, A);
        small.set_aside_start(A).unwrap();
        assert_eq!((small.capacity(), small.alloc(1)), (0, None));
    }
}
