//! Extent allocation: the allocator against a model (property test), alignment of every
//! region, and the exhaustion errors a client sees.

mod common;

use common::*;
use maru_proto::ErrorCode;
use maru_resource_manager::extent::ExtentAllocator;
use proptest::prelude::*;

const A: u64 = 2 * MIB;

/// The obvious first-fit allocator over a bitmap of alignment units.
struct Model {
    used: Vec<bool>,
}

impl Model {
    fn alloc(&mut self, units: usize) -> Option<usize> {
        let n = self.used.len();
        (0..n.saturating_sub(units - 1))
            .find(|&s| self.used[s..s + units].iter().all(|u| !u))
            .inspect(|&s| self.used[s..s + units].iter_mut().for_each(|u| *u = true))
    }
    fn free(&mut self, start: usize, units: usize) {
        self.used[start..start + units]
            .iter_mut()
            .for_each(|u| *u = false);
    }
    /// Maximal free runs, as (offset, len) in bytes: what a coalescing free list must hold.
    fn runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.used.len() {
            if self.used[i] {
                i += 1;
                continue;
            }
            let s = i;
            while i < self.used.len() && !self.used[i] {
                i += 1;
            }
            out.push((s as u64 * A, (i - s) as u64 * A));
        }
        out
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Bytes to allocate (not necessarily aligned).
    Alloc(u64),
    /// Index (modulo the live count) of a live region to free.
    Free(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u64..=10 * A).prop_map(Op::Alloc),
        2 => any::<usize>().prop_map(Op::Free),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn extent_allocator_matches_first_fit_model(units in 1usize..48, tail in 0u64..A, ops in proptest::collection::vec(op(), 1..200)) {
        let mut x = ExtentAllocator::new(units as u64 * A + tail, A);
        let mut model = Model { used: vec![false; units] };
        let mut live: Vec<(u64, u64)> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc(size) => {
                    let want = size.div_ceil(A) as usize;
                    let got = x.alloc(size);
                    let expected = model.alloc(want).map(|s| (s as u64 * A, want as u64 * A));
                    prop_assert_eq!(got, expected);
                    if let Some((o, l)) = got {
                        prop_assert_eq!(o % A, 0);
                        prop_assert!(l >= size && l - size < A);
                        live.push((o, l));
                    }
                }
                Op::Free(i) if !live.is_empty() => {
                    let (o, l) = live.swap_remove(i % live.len());
                    x.free(o, l).unwrap();
                    model.free((o / A) as usize, (l / A) as usize);
                    // A second free of the same range is refused and changes nothing.
                    let before: Vec<_> = x.free_extents().collect();
                    prop_assert!(x.free(o, l).is_err());
                    prop_assert_eq!(x.free_extents().collect::<Vec<_>>(), before);
                }
                Op::Free(_) => {}
            }
            prop_assert_eq!(x.free_extents().collect::<Vec<_>>(), model.runs());
            let used: u64 = live.iter().map(|(_, l)| l).sum();
            prop_assert_eq!(x.free_bytes(), units as u64 * A - used);
        }
    }
}

#[test]
fn every_region_is_aligned_and_disjoint() {
    let (_d, rm, mut c) = default_rm();
    let mut got = Vec::new();
    for size in [1, 4096, 2 * MIB - 1, 2 * MIB, 2 * MIB + 1, 5 * MIB, 7] {
        let h = c.alloc(size, None).unwrap();
        assert_eq!(
            h.offset % (2 * MIB),
            0,
            "offset {} of a {size}-byte region",
            h.offset
        );
        assert_eq!(h.len % (2 * MIB), 0);
        assert!(h.len >= size && h.len - size < 2 * MIB);
        got.push((h.offset, h.len));
    }
    got.sort();
    for w in got.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "regions overlap: {w:?}");
    }
    rm.shutdown();
}

#[test]
fn exhaustion_and_oversize_are_typed_errors() {
    let d = temp_dir();
    let rm = start_default(d.path()); // 64 MiB
    let mut c = client(&rm);

    let e = c.alloc(65 * MIB, None).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PoolExhausted));
    let msg = e.remote().unwrap().message.clone();
    assert!(
        msg.contains("larger than any pool") && msg.contains(&(64 * MIB).to_string()),
        "{msg}"
    );

    let e = c.alloc(0, None).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidArgument));

    let hs: Vec<_> = (0..32).map(|_| c.alloc(2 * MIB, None).unwrap()).collect();
    let e = c.alloc(1, None).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PoolExhausted));
    assert!(
        e.remote()
            .unwrap()
            .message
            .contains("largest free extent: 0"),
        "{e}"
    );

    // Free two non-adjacent regions: 4 MiB free but not contiguous.
    c.free(&hs[3]).unwrap();
    c.free(&hs[5]).unwrap();
    assert_eq!(
        c.alloc(4 * MIB, None).unwrap_err().code(),
        Some(ErrorCode::PoolExhausted)
    );
    // Freeing the one between coalesces into 6 MiB.
    c.free(&hs[4]).unwrap();
    let h = c.alloc(6 * MIB, None).unwrap();
    assert_eq!(h.offset, hs[3].offset);
    let s = c.stats().unwrap();
    assert_eq!(
        (s.pools[0].free_bytes, s.pools[0].largest_free_extent),
        (0, 0)
    );
    rm.shutdown();
}
