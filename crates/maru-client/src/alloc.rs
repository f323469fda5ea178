//! The paged allocator of one owned region: fixed-size pages handed out from a free-list
//! stack, O(1) alloc and free, with a per-page bit that catches double frees.

use crate::error::{Error, Result};

/// Allocator over `page_count` pages. Not synchronised: the handler keeps it under its
/// write lock.
#[derive(Debug, Clone)]
pub struct PageAllocator {
    /// Free page indices; the top of the stack is handed out next. Freed pages go on top, so
    /// a page just released (still hot in cache and page tables) is reused first.
    free: Vec<u32>,
    allocated: Vec<bool>,
}

impl PageAllocator {
    /// An allocator with every page free; page 0 is handed out first. At most `u32::MAX`
    /// pages (16 PiB of 4 KiB pages), which the caller's region sizes never approach.
    pub fn new(page_count: u32) -> Self {
        PageAllocator {
            free: (0..page_count).rev().collect(),
            allocated: vec![false; page_count as usize],
        }
    }

    pub fn page_count(&self) -> u64 {
        self.allocated.len() as u64
    }

    pub fn free_pages(&self) -> u64 {
        self.free.len() as u64
    }

    pub fn allocated_pages(&self) -> u64 {
        self.page_count() - self.free_pages()
    }

    /// Takes a free page, or `None` when the region is full.
    pub fn alloc(&mut self) -> Option<u64> {
        let index = self.free.pop()?;
        self.allocated[index as usize] = true;
        Some(u64::from(index))
    }

    /// Returns a page. A page outside the region, or one not allocated (a double free), is
    /// an [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument).
    pub fn free(&mut self, index: u64) -> Result<()> {
        let count = self.page_count();
        let Some(slot) = usize::try_from(index)
            .ok()
            .and_then(|i| self.allocated.get_mut(i))
        else {
            return Err(Error::invalid(
                "free",
                format!("page {index} is outside a region of {count} pages"),
            ));
        };
        if !*slot {
            return Err(Error::invalid(
                "free",
                format!("page {index} is not allocated (double free?)"),
            ));
        }
        *slot = false;
        // `index < count <= u32::MAX` was checked by the lookup above.
        self.free.push(index as u32);
        Ok(())
    }

    pub fn is_allocated(&self, index: u64) -> bool {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.allocated.get(i))
            .copied()
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn hands_out_every_page_once_then_none() {
        let mut a = PageAllocator::new(4);
        let got: Vec<u64> = (0..4).map(|_| a.alloc().unwrap()).collect();
        assert_eq!(got, vec![0, 1, 2, 3]);
        assert_eq!(a.alloc(), None);
        assert_eq!(
            a.free(9).unwrap_err().to_string(),
            "page 9 is outside a region of 4 pages"
        );
        a.free(2).unwrap();
        assert_eq!(
            a.free(2).unwrap_err().to_string(),
            "page 2 is not allocated (double free?)"
        );
        assert_eq!(a.alloc(), Some(2), "a freed page is reused first");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc,
        Free(u64),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![Just(Op::Alloc), (0u64..40).prop_map(Op::Free)],
            0..300,
        )
    }

    proptest! {
        /// The allocator agrees with a set model: pages are unique while allocated, frees of
        /// unallocated or out-of-range pages are refused, and counts always add up.
        #[test]
        fn matches_a_set_model(count in 0u32..32, ops in ops()) {
            let mut a = PageAllocator::new(count);
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Alloc => match a.alloc() {
                        Some(p) => {
                            prop_assert!(p < u64::from(count));
                            prop_assert!(model.insert(p), "page {} handed out twice", p);
                        }
                        None => prop_assert_eq!(model.len() as u64, u64::from(count)),
                    },
                    Op::Free(p) => {
                        let r = a.free(p);
                        if model.remove(&p) {
                            prop_assert!(r.is_ok(), "{:?}", r);
                        } else {
                            prop_assert!(r.is_err());
                        }
                    }
                }
                prop_assert_eq!(a.allocated_pages(), model.len() as u64);
                prop_assert_eq!(a.free_pages() + a.allocated_pages(), u64::from(count));
                for p in 0..u64::from(count) {
                    prop_assert_eq!(a.is_allocated(p), model.contains(&p));
                }
            }
        }
    }
}
