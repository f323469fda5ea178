//! Write-behind registration ([`MaruConfig::write_behind`](crate::MaruConfig::write_behind)):
//! a store sends its registration on a connection of its own and returns; later calls
//! collect the replies, in order, and book them as a synchronous store would have. Failures
//! are kept for `flush`, since the stores they belong to have already returned.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Instant;

use maru_proto::{Request, Response};

use super::connected::Connected;
use super::owned::Owned;
use super::{during, lock_hooked, Hooked, StoreOutcome};
use crate::connections::PooledConn;
use crate::error::{Error, ErrorKind, Result};
use crate::view::PageId;
use crate::wait::WaitHook;

/// Write-behind registrations: sent on a connection of their own, their replies collected
/// later, in order. Lives under the write lock, like every other page book.
#[derive(Default)]
pub(super) struct WriteBehind {
    conn: Option<PooledConn>,
    pub inflight: VecDeque<Unsettled>,
    /// Registrations that failed after their store returned, for `flush` to report.
    failed: u64,
    first_error: Option<(ErrorKind, String)>,
}

pub(super) struct Unsettled {
    request_id: u64,
    key: Vec<u8>,
    page: PageId,
}

impl WriteBehind {
    /// Most registrations in flight; one more waits for the oldest reply.
    pub const WINDOW: usize = 64;

    /// The connection the next registration takes, if one is open.
    pub fn connection(&mut self) -> Option<&mut PooledConn> {
        self.conn.as_mut()
    }

    pub fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.conn.as_ref().map(PooledConn::raw_fd)
    }

    pub fn holds(&self, page: PageId) -> bool {
        self.inflight.iter().any(|u| u.page == page)
    }

    fn fail(&mut self, key: &[u8], kind: ErrorKind, why: String) {
        let msg = format!("store of {:?}: {why}", String::from_utf8_lossy(key));
        tracing::warn!("write-behind {msg}");
        self.failed += 1;
        self.first_error.get_or_insert((kind, msg));
    }

    /// Gives up on the connection: every registration still in flight on it has an unknown
    /// outcome, so each counts as failed and its page stays taken (it may yet be registered).
    fn abandon(&mut self, kind: ErrorKind, why: &str) {
        for u in std::mem::take(&mut self.inflight) {
            self.fail(&u.key, kind, why.to_owned());
        }
        self.conn = None;
    }

    /// The failures since the last call, as one error, and a clean slate.
    fn take_failures(&mut self) -> Result<()> {
        match self.first_error.take() {
            None => Ok(()),
            Some((kind, first)) => Err(Error::deferred(
                std::mem::take(&mut self.failed),
                kind,
                &first,
            )),
        }
    }
}

/// How far [`Connected::settle_behind`] goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Settle {
    /// Only replies that are already there.
    Ready,
    /// Until there is room for one more registration.
    Room,
    /// Every outstanding registration.
    All,
}

impl Connected {
    /// Collects write-behind replies (as far as `how` says) and books them.
    pub fn settle_behind(&self, owned: &mut Owned, hook: &dyn WaitHook, how: Settle) {
        let w = self.conns.wait(hook);
        if self.fence.is_lost() {
            // The server is gone: nothing in flight will be answered.
            owned
                .behind
                .abandon(ErrorKind::Transport, "the server was lost");
        }
        loop {
            let behind = &mut owned.behind;
            let enough = match how {
                Settle::Room => behind.inflight.len() < WriteBehind::WINDOW,
                Settle::Ready | Settle::All => behind.inflight.is_empty(),
            };
            if enough {
                break;
            }
            let Some(conn) = behind.conn.as_mut() else {
                break;
            };
            if how == Settle::Ready && !conn.reply_ready() {
                break;
            }
            let Some(u) = behind.inflight.pop_front() else {
                break;
            };
            let deadline = Instant::now() + w.timeout;
            match conn.recv(u.request_id, "register", deadline, &w) {
                Ok(Response::Bool(is_new)) => {
                    owned.book(&u.key, u.page, is_new);
                }
                Ok(other) => {
                    // Whatever the server did, the page is not reused.
                    let e = Error::unexpected("register", &other);
                    behind.fail(&u.key, e.kind(), e.to_string());
                }
                Err(e) if e.surely_not_applied() => {
                    behind.fail(&u.key, e.kind(), e.to_string());
                    let _ = owned.free_page(u.page);
                }
                Err(e) => {
                    // The connection is unusable (a timed-out registration may still be
                    // applied, so its page stays taken too).
                    behind.fail(&u.key, e.kind(), e.to_string());
                    behind.abandon(e.kind(), "its connection failed");
                    self.lose_if_gone(&e);
                }
            }
        }
        self.publish_unsettled(owned);
    }

    /// Mirrors how many registrations are in flight where reads can see it without the lock.
    fn publish_unsettled(&self, owned: &Owned) {
        self.unsettled
            .store(owned.behind.inflight.len(), Ordering::Release);
    }

    /// Before a call that must see this handler's own stores: waits for every write-behind
    /// registration still in flight. Free (one atomic load) when there are none.
    pub fn settle_for_read(&self, hook: &dyn WaitHook) {
        if self.unsettled.load(Ordering::Acquire) > 0 {
            let mut owned = lock_hooked(&self.owned, hook);
            self.settle_behind(&mut owned, hook, Settle::All);
        }
    }

    /// Sends the registration of `key` at `page` without waiting for its reply.
    pub fn register_behind(
        &self,
        owned: &mut Owned,
        hook: &dyn WaitHook,
        req: &Request,
        key: &[u8],
        page: PageId,
    ) -> Result<StoreOutcome> {
        // Replies are collected in bulk once half the window is out (one read for many), not
        // one system call per store.
        if owned.behind.inflight.len() >= WriteBehind::WINDOW / 2 {
            self.settle_behind(owned, hook, Settle::Ready);
            self.settle_behind(owned, hook, Settle::Room);
        }
        // Taken out and put back only if the send succeeds: a connection that failed a send
        // may hold part of a frame and is never reused.
        let sent = match owned.behind.conn.take() {
            Some(c) => Ok(c),
            None => self.conns.open_conn(hook),
        }
        .and_then(|mut conn| {
            let id = conn.send(req, &self.conns.wait(hook))?;
            Ok((conn, id))
        });
        let result = match sent {
            Ok((conn, request_id)) => {
                let behind = &mut owned.behind;
                behind.conn = Some(conn);
                behind.inflight.push_back(Unsettled {
                    request_id,
                    key: key.to_vec(),
                    page,
                });
                Ok(StoreOutcome::Sent)
            }
            Err(e) => {
                owned.behind.abandon(e.kind(), "its connection failed");
                self.lose_if_gone(&e);
                if e.surely_not_applied() {
                    let _ = owned.free_page(page);
                }
                Err(e)
            }
        };
        self.publish_unsettled(owned);
        result
    }
}

impl Hooked<'_> {
    /// Waits until every write-behind registration
    /// ([`MaruConfig::write_behind`](crate::MaruConfig::write_behind)) has been answered, so
    /// the keys stored so far are visible to every instance. Fails if any registration failed
    /// since the last `flush` (each is also logged), with the first failure's kind; those keys
    /// are not stored. Without write-behind there is nothing to wait for.
    pub fn flush(&self) -> Result<()> {
        during("flush", || {
            let c = self.h.connected(self.hook)?;
            let mut owned = lock_hooked(&c.owned, self.hook);
            c.settle_behind(&mut owned, self.hook, Settle::All);
            owned.behind.take_failures()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsettled(request_id: u64, key: &[u8], page_index: u64) -> Unsettled {
        Unsettled {
            request_id,
            key: key.to_vec(),
            page: PageId {
                region_id: 1,
                page_index,
            },
        }
    }

    #[test]
    fn abandoned_registrations_are_reported_once_with_the_first_failure() {
        let mut behind = WriteBehind::default();
        behind.take_failures().unwrap();
        behind.inflight.push_back(unsettled(1, b"a", 0));
        behind.inflight.push_back(unsettled(2, b"b", 1));
        assert!(behind.holds(PageId {
            region_id: 1,
            page_index: 1
        }));
        behind.abandon(ErrorKind::Timeout, "its connection failed");
        assert!(behind.inflight.is_empty() && behind.conn.is_none());
        behind.fail(b"c", ErrorKind::Transport, "later".into());
        let e = behind.take_failures().unwrap_err();
        assert_eq!((e.kind(), e.op()), (ErrorKind::Timeout, "flush"));
        assert_eq!(
            e.to_string(),
            "3 write-behind store(s) failed; the first: store of \"a\": its connection failed"
        );
        behind.take_failures().unwrap();
    }
}
