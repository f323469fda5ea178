//! The session's shared connection: the [`Mux`] its calls use now, opened by the first call
//! that needs one and replaced by the first call that finds it failed.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::{lock, Mux};
use crate::connections::PooledConn;
use crate::error::Result;
use crate::wait::{lock_hooked, WaitHook};

/// The session's shared connection, opened at the first call that needs it and replaced when
/// it fails.
pub(crate) struct Shared {
    current: Mutex<Option<Arc<Mux>>>,
    /// Held while a shared connection is being opened, so that the callers that find it
    /// failed open one new connection between them, not one each.
    opening: Mutex<()>,
    max_inflight: usize,
    peak: Arc<AtomicUsize>,
}

impl Shared {
    pub fn new(max_inflight: usize) -> Shared {
        Shared {
            current: Mutex::new(None),
            opening: Mutex::new(()),
            max_inflight,
            peak: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The most calls the session has had in flight at once on its shared connections.
    pub fn peak_inflight(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// No call is in flight on the shared connection (or there is none yet).
    pub fn idle(&self) -> bool {
        self.live().is_none_or(|m| m.idle())
    }

    pub fn live(&self) -> Option<Arc<Mux>> {
        lock(&self.current)
            .as_ref()
            .filter(|m| !m.is_dead())
            .cloned()
    }

    /// The shared connection, made from `conn()` when there is none that works; whether it
    /// is a connection opened just now (a failure on it is no stale connection's).
    pub fn get(
        &self,
        hook: &dyn WaitHook,
        conn: impl FnOnce() -> Result<(PooledConn, bool)>,
    ) -> Result<(Arc<Mux>, bool)> {
        if let Some(m) = self.live() {
            return Ok((m, false));
        }
        let _opening = lock_hooked(&self.opening, hook);
        if let Some(m) = self.live() {
            return Ok((m, false));
        }
        let (conn, fresh) = conn()?;
        let mux = Arc::new(Mux::new(conn, self.max_inflight, self.peak.clone()));
        *lock(&self.current) = Some(mux.clone());
        Ok((mux, fresh))
    }

    /// The shared connection's descriptor, if there is one (none if another thread held the
    /// lock when the process forked: that lock is never released in the child).
    pub fn raw_fd(&self) -> Option<RawFd> {
        match self.current.try_lock() {
            Ok(m) => m.as_ref().map(|m| m.raw_fd()),
            Err(_) => None,
        }
    }

    /// Shuts the shared connection down (the server sees it close; calls on it fail).
    pub fn close(&self) {
        if let Some(m) = lock(&self.current).take() {
            m.shutdown();
        }
    }
}
