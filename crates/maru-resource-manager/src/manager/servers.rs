//! Metadata servers with a durable identity. A server presents the same random id in every
//! Hello across its restarts; the owner (host, pid, start time) that presented it is *bound*
//! to it. When that owner dies its regions are not reclaimed at once but after the server
//! grace (see `reaper`), and a successor that presents the same id in time *adopts* them:
//! ownership of every region moves to the new process. Both are logged before they apply.

use maru_proto::{ErrorCode, WireError};

use super::{wire, Manager};
use crate::wal::{Owner, ServerId, WalOp};

impl Manager {
    /// The durable identity `owner` is bound to, if it is a server that has one.
    pub fn server_id_of(&self, owner: &Owner) -> Option<ServerId> {
        self.bindings.get(owner).copied()
    }

    /// The owners other than `except` bound to `id`.
    pub fn bound_to(&self, id: &ServerId, except: &Owner) -> Vec<Owner> {
        self.bindings
            .iter()
            .filter(|(o, b)| *b == id && *o != except)
            .map(|(o, _)| o.clone())
            .collect()
    }

    /// Binds `owner` to `id` (logged; nothing to do when it already is).
    pub fn bind(&mut self, owner: &Owner, id: &ServerId) -> Result<(), WireError> {
        if self.bindings.get(owner) == Some(id) {
            return Ok(());
        }
        let op = WalOp::Bind {
            owner: owner.clone(),
            server_id: *id,
        };
        self.wal
            .append(&op)
            .map_err(|e| wire(ErrorCode::Storage, e.to_string()))?;
        self.bindings.insert(owner.clone(), *id);
        self.after_commit();
        Ok(())
    }

    /// Moves every region of `from` and its identity to `to`; the number of regions moved.
    /// The caller has checked that `from` is dead and that `to` proved it may act for the
    /// identity.
    pub fn adopt(&mut self, from: &Owner, to: &Owner) -> Result<usize, WireError> {
        let op = WalOp::Adopt {
            from: from.clone(),
            to: to.clone(),
        };
        self.wal
            .append(&op)
            .map_err(|e| wire(ErrorCode::Storage, e.to_string()))?;
        let n = self.apply_adopt(from, to);
        self.after_commit();
        Ok(n)
    }

    /// Applies a logged adoption.
    pub(super) fn apply_adopt(&mut self, from: &Owner, to: &Owner) -> usize {
        let mut n = 0;
        for a in self.allocations.values_mut() {
            if a.owner == *from {
                a.owner = to.clone();
                n += 1;
            }
        }
        if let Some(id) = self.bindings.remove(from) {
            self.bindings.insert(to.clone(), id);
        }
        n
    }

    /// The bindings a checkpoint keeps: those of owners that still hold a region (a server
    /// binds again at its next allocation).
    pub(super) fn live_bindings(&self) -> Vec<(Owner, ServerId)> {
        self.bindings
            .iter()
            .filter(|(o, _)| self.allocations.values().any(|a| a.owner == **o))
            .map(|(o, id)| (o.clone(), *id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn an_adoption_moves_every_region_and_survives_a_restart() {
        for every in [0, 1, 1000] {
            let d = dir();
            let state = d.path().join("state");
            let mut m = Manager::open(&state, &specs(d.path()), every).unwrap();
            let id = [9; crate::wal::SERVER_ID_LEN];
            m.bind(&owner(1), &id).unwrap();
            m.alloc(&owner(1), MIB, None).unwrap();
            m.alloc(&owner(1), MIB, None).unwrap();
            m.alloc(&owner(2), MIB, None).unwrap();
            assert_eq!(m.bound_to(&id, &owner(3)), vec![owner(1)]);
            assert_eq!(m.adopt(&owner(1), &owner(3)).unwrap(), 2);
            drop(m);
            let m = Manager::open(&state, &specs(d.path()), every).unwrap();
            let owners: Vec<u32> = table(&m).iter().map(|a| a.owner.pid).collect();
            assert_eq!(owners, vec![3, 3, 2], "checkpoint_every={every}");
            assert_eq!(m.server_id_of(&owner(3)), Some(id));
            assert_eq!(m.server_id_of(&owner(1)), None);
        }
    }
}
