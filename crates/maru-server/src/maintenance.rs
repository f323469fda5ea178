//! The maintenance thread: what the server does on its own, between requests — the lease clock
//! (expired pins are dropped), retrying frees
//! the resource manager could not take, noticing when it goes away, and reconciling its list
//! of this server's regions with the region table.

use std::time::{Duration, Instant};

use crate::server::Shared;

/// How often frees that failed (resource manager down) are retried.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How often an idle server checks that the resource manager is still there.
const PING_EVERY: Duration = Duration::from_secs(5);
/// How often the resource manager's list of this server's regions is compared with the
/// region table (and regions the table does not know are freed), besides right after an
/// allocation whose outcome is unknown.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);

/// Retries failed frees, pings the resource manager now and then so a lost connection is
/// noticed (and logged) before a client's request needs it, and reconciles the resource
/// manager's list of this server's regions with the region table (right after an allocation
/// whose outcome is unknown, and every [`RECONCILE_EVERY`]).
pub(crate) fn maintenance_loop(shared: &Shared) {
    let (lock, cvar) = &shared.maintenance;
    let mut rm_up = shared.state.ping_rm(true);
    let mut last_ping = Instant::now();
    let mut last_reconcile = Instant::now();
    let mut last_retry = Instant::now();
    let tick = shared.state.lease_tick().min(RETRY_EVERY);
    let mut stop = lock.lock().unwrap_or_else(|e| e.into_inner());
    while !*stop {
        let (guard, _) = cvar
            .wait_timeout(stop, tick)
            .unwrap_or_else(|e| e.into_inner());
        stop = guard;
        if *stop {
            break;
        }
        drop(stop);
        shared.state.expire_leases(Instant::now());
        shared.state.end_reconnect_grace_if_due(Instant::now());
        if last_retry.elapsed() >= RETRY_EVERY {
            shared.state.retry_pending_frees();
            last_retry = Instant::now();
        }
        if last_ping.elapsed() >= PING_EVERY {
            rm_up = shared.state.ping_rm(rm_up);
            last_ping = Instant::now();
        }
        if shared.state.reconcile_due() || last_reconcile.elapsed() >= RECONCILE_EVERY {
            last_reconcile = Instant::now();
            if let Err(e) = shared.state.reconcile() {
                tracing::debug!("cannot reconcile regions with the resource manager now: {e}");
            }
        }
        stop = lock.lock().unwrap_or_else(|e| e.into_inner());
    }
}
