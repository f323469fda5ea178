//! Takes regions back from dead owners.
//!
//! - A local owner (same hostname) is dead when `/proc/PID` is gone or the process there
//!   started at another time than the one recorded (the pid was reused).
//! - A remote owner cannot be checked that way: it is dead when it has had no connection for
//!   longer than the grace period. A new connection naming the same `host:pid` in time
//!   cancels. Owners recovered after a restart count as disconnected since the start.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::server::{lock, Shared};
use crate::wal::Owner;

/// Runs until `stop`, one pass per `reap_interval`.
pub(crate) fn run(shared: Arc<Shared>) {
    loop {
        {
            let (m, cv) = &shared.reaper_wake;
            let guard = lock(m);
            if shared.stop.load(Ordering::SeqCst) {
                break;
            }
            let _ = cv.wait_timeout(guard, shared.reap_interval);
        }
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        reap_once(&shared);
        shared.reap_passes.fetch_add(1, Ordering::SeqCst);
    }
}

/// Why `owner` is dead, or `None` while it lives.
fn verdict(shared: &Shared, owner: &Owner) -> Option<String> {
    if owner.host == shared.hostname {
        return match maru_transport::process_start_time(owner.pid) {
            None => Some("process is gone".into()),
            Some(t) if owner.start_time != 0 && t != owner.start_time => Some(format!(
                "pid was reused (start time {t}, recorded {})",
                owner.start_time
            )),
            Some(_) => None,
        };
    }
    let presence = lock(&shared.presence);
    let since = match presence.get(&(owner.host.clone(), owner.pid)) {
        Some(p) if p.connections > 0 => return None,
        Some(p) => p.since,
        None => shared.started,
    };
    let gone = since.elapsed();
    (gone > shared.grace_period).then(|| {
        format!(
            "remote owner disconnected for {:.1} s (grace period {:.1} s)",
            gone.as_secs_f64(),
            shared.grace_period.as_secs_f64()
        )
    })
}

/// One pass over every owner.
pub(crate) fn reap_once(shared: &Shared) {
    let mut by_owner: BTreeMap<Owner, Vec<u64>> = BTreeMap::new();
    for a in lock(&shared.manager).allocations() {
        by_owner
            .entry(a.owner.clone())
            .or_default()
            .push(a.region_id);
    }
    for (owner, regions) in by_owner {
        let Some(reason) = verdict(shared, &owner) else {
            continue;
        };
        let mut m = lock(&shared.manager);
        for id in regions {
            match m.reclaim(id, &owner) {
                Ok(Some(a)) => tracing::info!(
                    "reclaimed region {id} ({} bytes at {} in {}) of {}: {reason}",
                    a.len,
                    a.offset,
                    a.pool,
                    owner.key()
                ),
                Ok(None) => {} // freed meanwhile
                Err(e) => {
                    tracing::error!("cannot reclaim region {id} of {}: {e}", owner.key());
                    break;
                }
            }
        }
    }
}
