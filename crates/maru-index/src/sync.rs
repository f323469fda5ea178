//! The atomics the table is made of: std's, or loom's under `cfg(loom)` so the same protocol
//! code is model-checked (tests/loom.rs).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// One turn of a wait for the writer to finish changing an entry.
#[inline]
pub(crate) fn relax(turn: u32) {
    #[cfg(loom)]
    {
        let _ = turn;
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    {
        if turn < 64 {
            std::hint::spin_loop();
        } else {
            // The writer may have been descheduled inside its few stores: let it run.
            std::thread::yield_now();
        }
    }
}
