//! The evictor thread: keeps the bytes held by keys between the watermarks (and each
//! namespace under its quota) without any request waiting on it. It wakes when a registration
//! passes the high watermark, and every [`TICK`] in any case (pins expire, quotas change
//! hands); it reads the pool's size from the resource manager now and then, and on each tick
//! writes the page-return notices that slow owners have room for again and returns the pages
//! that views in the hold lanes kept and no longer keep.

use std::time::{Duration, Instant};

use crate::server::Shared;

/// Longest sleep between two checks of the watermarks.
const TICK: Duration = Duration::from_millis(100);
/// How often the pool's size is read again from the resource manager.
const POOL_EVERY: Duration = Duration::from_secs(5);
/// How soon the pool's size is asked for again while it is unknown.
const POOL_RETRY: Duration = Duration::from_secs(1);
/// Longest one round of eviction runs before the thread looks at the clock and its stop flag.
const ROUND: Duration = Duration::from_millis(50);

pub(crate) fn evictor_loop(shared: &Shared) {
    let state = &shared.state;
    let cap = &state.capacity;
    state.refresh_pool_bytes();
    let mut pool_read = Instant::now();
    while cap.wait(TICK) && !shared.is_shutting_down() {
        // An unknown size (the resource manager was not reachable) is asked for again sooner.
        let every = if cap.pool_bytes() == 0 {
            POOL_RETRY
        } else {
            POOL_EVERY
        };
        if pool_read.elapsed() >= every {
            state.refresh_pool_bytes();
            pool_read = Instant::now();
        }
        // Notices that owners were too slow to take go out as they read again.
        state.flush_stalled();
        // Pages kept for views in the hold lanes go back once those views are gone.
        state.recheck_lanes();
        let done = state.evict_to_watermarks(Instant::now() + ROUND);
        if done.keys > 0 {
            tracing::debug!(keys = done.keys, bytes = done.bytes, "evicted");
            if cap.over_high() {
                // More to do: go again at once.
                cap.nudge();
            }
        }
    }
}
