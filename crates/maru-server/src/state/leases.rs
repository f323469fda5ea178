//! Pins are leases: `(session, key) → (count, deadline)`. `pin` adds one to the count and
//! moves the deadline to now + the pin TTL; `renew_pins` moves every deadline of the session;
//! `unpin` takes one away, and only from a pin the session itself holds. The lease clock (the
//! maintenance thread) drops pins whose deadline passed, and a session's end drops all of its
//! pins at once. Lookups never touch a lease.
//!
//! The registry keeps each key's total pin count (the sum over sessions), which is what
//! makes "delete unless pinned" one atomic registry operation; the leases here say whose pins
//! those are. Lock order: a session's lease mutex, then registry shard locks; nothing takes a
//! lease mutex while holding a registry lock or a region mutex.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use maru_proto::WireError;

use super::sessions::{session_ended, Session};
use super::{lock, ServerState};
use crate::registry::KeyRegistry;

/// Default of `--pin-ttl`: how long a pin lives without being renewed.
pub const PIN_TTL: Duration = Duration::from_secs(30);

/// One session's pins of one key.
struct Lease {
    count: u32,
    deadline: Instant,
}

/// The pins of one session, by (namespace-scoped) key.
#[derive(Default)]
pub(crate) struct Leases {
    by_key: HashMap<Box<[u8]>, Lease>,
}

impl Leases {
    /// Pins held, each key's counted.
    pub(super) fn pins(&self) -> u64 {
        self.by_key.values().map(|l| u64::from(l.count)).sum()
    }
}

impl ServerState {
    /// Pins `key` for `session` until now + the pin TTL; false when the key does not exist.
    pub fn pin(&self, session: &Session, key: &[u8]) -> Result<bool, WireError> {
        let mut leases = lock(&session.leases);
        // Checked under the lease mutex: a session's end marks it ended before it takes this
        // mutex to drop the leases, so no pin can slip in after that drop.
        if session.is_ended() {
            return Err(session_ended());
        }
        if !self.registry.pin(key) {
            return Ok(false);
        }
        self.capacity.touch(key);
        let deadline = Instant::now() + self.pin_ttl;
        match leases.by_key.get_mut(key) {
            Some(l) => {
                l.count += 1;
                l.deadline = deadline;
            }
            None => {
                leases
                    .by_key
                    .insert(key.into(), Lease { count: 1, deadline });
            }
        }
        Ok(true)
    }

    /// Takes one of `session`'s pins of `key` away; false when the session holds none (a
    /// session can never release another's pin).
    pub fn unpin(&self, session: &Session, key: &[u8]) -> bool {
        let mut leases = lock(&session.leases);
        let Some(lease) = leases.by_key.get_mut(key) else {
            return false;
        };
        self.registry.unpin(key);
        lease.count -= 1;
        if lease.count == 0 {
            leases.by_key.remove(key);
        }
        true
    }

    /// Moves the deadline of every pin of `session` to now + the pin TTL; returns how many
    /// keys it holds pins of.
    pub fn renew_pins(&self, session: &Session) -> usize {
        let deadline = Instant::now() + self.pin_ttl;
        let mut leases = lock(&session.leases);
        for lease in leases.by_key.values_mut() {
            lease.deadline = deadline;
        }
        leases.by_key.len()
    }

    /// Drops every pin of a session that ended; returns how many pins that was.
    pub(super) fn drop_leases(&self, session: &Session) -> u64 {
        let leases = std::mem::take(&mut *lock(&session.leases));
        let mut n = 0;
        for (key, lease) in leases.by_key {
            self.registry.unpin_n(&key, lease.count);
            n += u64::from(lease.count);
        }
        n
    }

    /// Gives a resumed session the pins it held before the restart, each leased from now:
    /// `pins` are (namespace-scoped key, count). A key that does not exist now gets none;
    /// returns the positions of those, ascending.
    pub(super) fn restore_pins(&self, session: &Session, pins: &[(Vec<u8>, u32)]) -> Vec<u32> {
        let mut leases = lock(&session.leases);
        let mut refused = Vec::new();
        if session.is_ended() {
            return (0..pins.len() as u32).collect();
        }
        let deadline = Instant::now() + self.pin_ttl;
        for (i, (key, count)) in pins.iter().enumerate() {
            if !self.registry.pin_n(key, *count) {
                refused.push(i as u32);
                continue;
            }
            self.capacity.touch(key);
            let lease = leases
                .by_key
                .entry(key.as_slice().into())
                .or_insert(Lease { count: 0, deadline });
            lease.count = lease.count.saturating_add(*count);
        }
        refused
    }

    /// The lease clock: drops every pin whose deadline is before `now`; returns how many.
    pub fn expire_leases(&self, now: Instant) -> u64 {
        let sessions: Vec<Arc<Session>> = lock(&self.sessions)
            .values()
            .map(|r| r.session.clone())
            .collect();
        let mut expired = 0;
        for s in sessions {
            let mut leases = lock(&s.leases);
            leases.by_key.retain(|key, lease| {
                if lease.deadline > now {
                    return true;
                }
                self.registry.unpin_n(key, lease.count);
                expired += u64::from(lease.count);
                false
            });
        }
        if expired > 0 {
            self.pins_expired.fetch_add(expired, Ordering::Relaxed);
            tracing::debug!(pins = expired, "pin leases expired");
        }
        expired
    }

    /// How often the lease clock should run: often enough that a pin outlives its deadline
    /// by at most a quarter of the TTL (and at most a second).
    pub fn lease_tick(&self) -> Duration {
        (self.pin_ttl / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use maru_proto::DeleteStatus;

    use super::*;
    use crate::state::fixtures::*;

    #[test]
    fn pins_belong_to_their_session_and_expire_at_their_deadline() {
        let (st, _rm, (_pa, a, r)) = state_with_owner("same");
        let (mut pb, b, _) = client(&st, "same");
        assert!(st.register(&a, &reg(b"k", &r, 0, 1)).unwrap());
        assert!(!st.pin(&a, b"missing").unwrap());
        assert!(st.pin(&a, b"k").unwrap());
        assert!(st.pin(&b, b"k").unwrap());
        assert!(st.pin(&b, b"k").unwrap());
        assert!(!st.unpin(&a, b"missing"));
        assert_eq!(st.delete(b"k"), DeleteStatus::Pinned);
        // b's two pins end with b's session; a's stays.
        st.goodbye(&mut pb);
        assert!(!st.unpin(&b, b"k"), "an ended session holds nothing");
        assert_eq!(st.delete(b"k"), DeleteStatus::Pinned);
        // Lookups never renew: only the deadline decides.
        for _ in 0..100 {
            assert!(st.exists(b"k"));
        }
        assert_eq!(st.expire_leases(Instant::now()), 0, "not yet due");
        let later = Instant::now() + st.pin_ttl + Duration::from_millis(1);
        assert_eq!(st.expire_leases(later), 1);
        assert!(!st.unpin(&a, b"k"), "the expired pin is gone");
        assert_eq!(st.stats().pins_expired, 1);
        assert_eq!(st.delete(b"k"), DeleteStatus::Deleted);
    }

    #[test]
    fn renewing_moves_every_deadline_of_the_session() {
        let (st, _rm, (_pa, a, r)) = state_with_owner("a");
        for (i, k) in [b"x", b"y"].iter().enumerate() {
            assert!(st.register(&a, &reg(*k, &r, i as u64 * 4096, 1)).unwrap());
            assert!(st.pin(&a, *k).unwrap());
        }
        let first_deadline = Instant::now() + st.pin_ttl;
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(st.renew_pins(&a), 2);
        assert_eq!(st.expire_leases(first_deadline), 0, "renewed past it");
        assert!(st.unpin(&a, b"x") && st.unpin(&a, b"y"));
    }

    #[test]
    fn restored_pins_count_as_pinned_and_only_on_keys_that_exist() {
        let (st, _rm, (_pa, a, r)) = state_with_owner("a");
        let (_pb, b, _) = client(&st, "b");
        assert!(st.register(&a, &reg(b"k", &r, 0, 1)).unwrap());
        let pins = [
            (b"missing".to_vec(), 1),
            (b"k".to_vec(), 2),
            (b"k".to_vec(), 1),
        ];
        assert_eq!(st.restore_pins(&b, &pins), [0]);
        assert_eq!(lock(&b.leases).pins(), 3);
        assert!(!st.unpin(&a, b"k"), "restored pins are the session's own");
        assert_eq!(st.delete(b"k"), DeleteStatus::Pinned);
        assert!(st.unpin(&b, b"k") && st.unpin(&b, b"k"));
        assert_eq!(st.delete(b"k"), DeleteStatus::Pinned);
        // Leased as pins are: the lease clock drops them at their deadline.
        let later = Instant::now() + st.pin_ttl + Duration::from_millis(1);
        assert_eq!(st.expire_leases(later), 1);
        assert_eq!(st.delete(b"k"), DeleteStatus::Deleted);
    }
}
