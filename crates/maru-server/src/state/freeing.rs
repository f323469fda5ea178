//! Giving regions back to the resource manager: frees that must wait until it is reachable
//! again, the reconcile that finds regions it holds for this server that the table does not
//! know, and the shutdown that returns everything.
//!
//! # No region at the resource manager that the server does not know
//!
//! Every region the resource manager holds for this server is, whenever no allocation is in
//! flight, in the region table or in `freeing` (on its way back) — except after an allocation
//! whose outcome the server could not learn (the reply lost: the resource manager died after
//! logging it, the connection broke, a timeout). [`ServerState::reconcile`] restores the
//! invariant: it waits until no allocation is in flight (`alloc_gate`: every allocation holds
//! it shared from its request until its region is in the table; the reconcile holds it
//! exclusively), takes the known set, lists the resource manager's regions of this server, and
//! frees the ones not in that set. Nothing enters the known set while the gate is held
//! exclusively, so a region listed but unknown is an orphan, never a concurrent allocation.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use maru_proto::{ErrorCode, Handle};

use super::regions::TableRegion;
use super::{lock, ServerState};
use crate::resource_manager::RmCallError;

impl ServerState {
    /// Frees a region that is not (or no longer) in the table; until that is done (or known
    /// to be done) the region stays in `freeing`.
    pub(super) fn free_at_rm(&self, handle: Handle) {
        lock(&self.freeing).insert(handle.region_id);
        let done = |h: &Handle| {
            lock(&self.freeing).remove(&h.region_id);
            *lock(&self.regions_freed) += 1;
            self.region_freed.notify_all();
        };
        match self.rm.free(&handle) {
            Ok(()) => {
                tracing::debug!(region = handle.region_id, "region freed");
                done(&handle);
            }
            // Already gone there (e.g. reclaimed): nothing left to do.
            Err(RmCallError::Remote(e))
                if matches!(e.code, ErrorCode::DoubleFree | ErrorCode::UnknownRegion) =>
            {
                tracing::warn!(
                    region = handle.region_id,
                    "region already freed at the resource manager: {e}"
                );
                done(&handle);
            }
            Err(e) => {
                tracing::warn!(
                    region = handle.region_id,
                    "cannot free region now, will retry: {e}"
                );
                lock(&self.pending_free).push(handle);
            }
        }
    }

    /// Retries frees that failed earlier. Returns how many are still pending.
    pub fn retry_pending_frees(&self) -> usize {
        let pending = std::mem::take(&mut *lock(&self.pending_free));
        for h in pending {
            self.free_at_rm(h);
        }
        lock(&self.pending_free).len()
    }

    /// Checks the resource manager is there; logs when that changes.
    pub fn ping_rm(&self, was_up: bool) -> bool {
        match self.rm.ping() {
            Ok(()) => {
                if !was_up {
                    tracing::info!("resource manager reachable");
                }
                true
            }
            Err(e) => {
                if was_up {
                    tracing::warn!("{e}");
                }
                false
            }
        }
    }

    /// Whether an allocation's outcome was unknown since the last reconcile.
    pub fn reconcile_due(&self) -> bool {
        self.reconcile_due.load(Ordering::SeqCst)
    }

    /// Frees every region the resource manager holds for this server that the server does
    /// not know (see the module docs); returns how many it found. Waits for allocations in
    /// flight to finish (each is bounded by the resource manager's timeout) and holds new
    /// ones back for one list request.
    pub fn reconcile(&self) -> Result<usize, RmCallError> {
        self.reconcile_due.store(false, Ordering::SeqCst);
        let orphans: Vec<Handle> = {
            let _quiet = self.alloc_gate.write().unwrap_or_else(|e| e.into_inner());
            // The known set first: with no allocation in flight nothing enters it, so a
            // region the list shows outside it was never known (regions leave the table only
            // through `freeing`, and `freeing` only once their free is done).
            let mut known: HashSet<u64> = self.table().by_id.keys().copied().collect();
            known.extend(lock(&self.freeing).iter().copied());
            // Adopted regions a resuming session may still claim are not orphans yet.
            known.extend(self.kept_for_resume());
            let listed = match self.rm.list_owned() {
                Ok(l) => l,
                Err(e) => {
                    if matches!(e, RmCallError::Unreachable { .. }) {
                        // Try again on the next maintenance pass.
                        self.reconcile_due.store(true, Ordering::SeqCst);
                    }
                    return Err(e);
                }
            };
            listed
                .into_iter()
                .filter(|h| !known.contains(&h.region_id))
                .collect()
        };
        for h in &orphans {
            tracing::warn!(
                region = h.region_id,
                len = h.len,
                "the resource manager holds a region of this server the server does not know \
                 (an allocation whose reply was lost); freeing it"
            );
            self.free_at_rm(h.clone());
        }
        Ok(orphans.len())
    }

    /// Shutdown: every region goes back to the resource manager, keys or not.
    pub fn free_everything(&self) {
        let all: Vec<Arc<TableRegion>> = {
            let mut table = self.regions.write().unwrap_or_else(|e| e.into_inner());
            lock(&self.freeing).extend(table.by_id.keys().copied());
            table.by_id.clear();
            table.by_slot.drain().map(|(_, r)| r).collect()
        };
        for region in all {
            let free = {
                let mut st = lock(&region.state);
                !std::mem::replace(&mut st.freed, true)
            };
            if free {
                self.free_at_rm(region.info.handle.clone());
            }
        }
        self.retry_pending_frees();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use maru_proto::DeleteStatus;

    use super::*;
    use crate::state::fixtures::*;

    #[test]
    fn an_unreachable_rm_is_unavailable_and_frees_are_retried() {
        let (st, rm) = state(&[]);
        let (mut p, a, _) = client(&st, "a");
        st.request_region(&a, MIB).unwrap();
        rm.down.store(true, Ordering::SeqCst);
        let e = st.request_region(&a, MIB).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert!(e.message.contains("unreachable"), "{}", e.message);
        assert!(st.stats().rm_error.is_some());
        st.goodbye(&mut p);
        assert_eq!(st.retry_pending_frees(), 1);
        assert_eq!(rm.live().len(), 1);
        rm.down.store(false, Ordering::SeqCst);
        assert_eq!(st.retry_pending_frees(), 0);
        assert!(rm.live().is_empty());
        assert!(st.stats().rm_error.is_none());
    }

    #[test]
    fn a_region_whose_alloc_reply_was_lost_is_found_and_freed_by_the_reconcile() {
        let (st, rm) = state(&[]);
        let (mut p, a, _) = client(&st, "a");
        let kept = st.request_region(&a, MIB).unwrap().info.handle.region_id;
        assert!(!st.reconcile_due());
        assert_eq!(st.reconcile().unwrap(), 0, "nothing unknown yet");
        rm.lose_next_reply.store(true, Ordering::SeqCst);
        let e = st.request_region(&a, MIB).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert_eq!(rm.live().len(), 2, "allocated there, unknown here");
        assert!(
            st.reconcile_due(),
            "an unknown outcome makes a reconcile due"
        );
        assert_eq!(st.reconcile().unwrap(), 1);
        assert!(!st.reconcile_due());
        assert_eq!(rm.live().into_iter().collect::<Vec<_>>(), vec![kept]);
        // "No room" is a certain answer: nothing to reconcile.
        rm.room.lock().unwrap().insert("/dev/shm/default".into(), 0);
        assert_eq!(
            st.request_region(&a, MIB).unwrap_err().code,
            ErrorCode::PoolExhausted
        );
        assert!(!st.reconcile_due());
        rm.room.lock().unwrap().clear();

        // A region whose free is pending is known: the reconcile leaves it to the retry.
        let r = st.request_region(&a, MIB).unwrap().info.handle.region_id;
        rm.down.store(true, Ordering::SeqCst);
        st.return_region(&a, r).unwrap();
        assert!(st.reconcile().is_err(), "unreachable");
        assert!(st.reconcile_due(), "tried again later");
        rm.down.store(false, Ordering::SeqCst);
        assert_eq!(st.reconcile().unwrap(), 0);
        assert!(rm.live().contains(&r));
        assert_eq!(st.retry_pending_frees(), 0);
        assert!(!rm.live().contains(&r));
        assert_eq!(
            rm.freed
                .lock()
                .unwrap()
                .iter()
                .filter(|id| **id == r)
                .count(),
            1
        );
        st.goodbye(&mut p);
        assert!(rm.live().is_empty());
    }

    /// Allocations, frees and reconciles race; a reconcile must never free a region that is
    /// being allocated or is in the table (it would find nothing unknown at all here).
    #[test]
    fn reconciles_never_free_a_region_allocated_concurrently() {
        let (st, rm, stop) = shared_state();
        let reconciler = {
            let (st, stop) = (st.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut runs, mut found) = (0u64, 0usize);
                while !stop.load(Ordering::SeqCst) {
                    found += st.reconcile().unwrap();
                    runs += 1;
                }
                (runs, found)
            })
        };
        let workers: Vec<_> = (0..3)
            .map(|t| {
                let st = st.clone();
                std::thread::spawn(move || {
                    for round in 0..300 {
                        let (mut peer, s, r) = client_with_region(&st, &format!("i{t}-{round}"));
                        let key = format!("k{t}-{round}");
                        assert!(st.register(&s, &reg(key.as_bytes(), &r, 0, 1)).unwrap());
                        st.request_region(&s, MIB).unwrap();
                        st.goodbye(&mut peer);
                        if round % 2 == 0 {
                            assert_eq!(st.delete(key.as_bytes()), DeleteStatus::Deleted);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        let (runs, found) = reconciler.join().unwrap();
        assert!(runs > 0);
        assert_eq!(found, 0, "a reconcile freed a region the server knew");
        let known: BTreeSet<u64> = st
            .allocations()
            .iter()
            .map(|r| r.handle.region_id)
            .collect();
        assert_eq!(known.len(), 3 * 150, "the kept keys' regions");
        assert_eq!(rm.live(), known);
    }
}
