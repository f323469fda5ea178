//! Takes regions back from dead owners (and, on the same beat, checks the pools' files and
//! devices, see `health`).
//!
//! - A local owner (same hostname) is dead when `/proc/PID` is gone or the process there
//!   started at another time than the one recorded (the pid was reused).
//! - A remote owner cannot be checked that way: it is dead when it has had no connection for
//!   longer than the grace period. A new connection naming the same `host:pid` in time
//!   cancels. Owners recovered after a restart count as disconnected since the start.
//! - A dead owner bound to a metadata server identity (`manager::servers`) keeps its regions
//!   for the server grace more, counted from the pass that first found it dead, so that a
//!   restarted server presenting the same identity can adopt them.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

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
        lock(&shared.manager).check_pools();
        shared.reap_passes.fetch_add(1, Ordering::SeqCst);
    }
}

/// Why `owner` is dead, or `None` while it lives.
pub(crate) fn verdict(shared: &Shared, owner: &Owner) -> Option<String> {
    if owner.host == shared.hostname {
        return local_verdict(owner);
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

/// Why the local process `owner` names is dead, or `None` while it lives: gone, or its pid
/// now belongs to a process that started at another time.
fn local_verdict(owner: &Owner) -> Option<String> {
    match maru_transport::process_start_time(owner.pid) {
        None => Some("process is gone".into()),
        // It has exited and waits for its parent to collect it: it holds no memory and no
        // connection, and a successor must not be refused because of it.
        Some(_) if exited(owner.pid) => Some("process has exited".into()),
        Some(t) if owner.start_time != 0 && t != owner.start_time => Some(format!(
            "pid was reused (start time {t}, recorded {})",
            owner.start_time
        )),
        Some(_) => None,
    }
}

/// Whether process `pid` has exited and is not yet collected (a zombie: state `Z` or `X`
/// in `/proc/PID/stat`).
fn exited(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The command name (field 2) is in parentheses and may contain spaces: skip past it.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    matches!(state, Some("Z" | "X"))
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
        let Some(mut reason) = verdict(shared, &owner) else {
            continue;
        };
        let mut m = lock(&shared.manager);
        if m.server_id_of(&owner).is_some() {
            let mut dead = lock(&shared.server_dead_since);
            let since = *dead.entry(owner.clone()).or_insert_with(|| {
                tracing::info!(
                    "metadata server {} is dead ({reason}); its {} regions wait {:.1} s for \
                    its successor",
                    owner.key(),
                    regions.len(),
                    shared.server_grace.as_secs_f64()
                );
                Instant::now()
            });
            if since.elapsed() < shared.server_grace {
                continue;
            }
            dead.remove(&owner);
            reason = format!(
                "{reason}; no successor adopted its regions within the server grace ({:.1} s)",
                shared.server_grace.as_secs_f64()
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_start_time_that_differs_means_the_pid_was_reused() {
        let (host, pid, start) = maru_transport::local_identity();
        let owner = |start_time| Owner {
            host: host.clone(),
            pid,
            start_time,
        };
        assert_eq!(local_verdict(&owner(start)), None);
        assert!(local_verdict(&owner(start + 1000))
            .unwrap()
            .contains("pid was reused"));
        let gone = Owner {
            pid: u32::MAX,
            ..owner(start)
        };
        assert_eq!(local_verdict(&gone).as_deref(), Some("process is gone"));
    }

    #[test]
    fn an_exited_process_not_yet_collected_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not waited for: once it exits it stays a zombie until `wait`.
        let exited_in_time = (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            exited(pid)
        });
        assert!(exited_in_time, "the child never showed as exited");
        let (host, _, _) = maru_transport::local_identity();
        let owner = Owner {
            host,
            pid,
            start_time: maru_transport::process_start_time(pid).unwrap_or(0),
        };
        assert_eq!(local_verdict(&owner).as_deref(), Some("process has exited"));
        child.wait().unwrap();
        assert!(!exited(std::process::id()));
    }
}
