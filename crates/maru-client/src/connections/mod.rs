//! The connections of one instance session: [`PooledConn`], a handshaken socket whose reply
//! waits go through [`crate::wait`], and [`ConnectionPool`], which either lends one to each
//! call, so that concurrent callers never share a socket, or (with `use_async_rpc`) pipelines
//! the calls of all threads on one shared connection (`mux`). No lock is held across a round
//! trip either way.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use maru_proto::{Hello, HelloOk, Request, Response, Role, ServerUrl, SESSION_TOKEN_LEN};
use maru_transport::Stream;

use crate::claims::{PinBook, ReleaseQueue};
use crate::error::{Error, Result};
use crate::wait::{ReplyClock, Wait, WaitHook};

mod conn;
mod mux;
mod resume;

use conn::Sent;
pub(crate) use conn::{read_again, PooledConn};

/// `Ahead`: the next request on a connection comes in about `in_time`.
fn ahead(in_time: Duration) -> Request<'static> {
    let in_us = u32::try_from(in_time.as_micros()).unwrap_or(u32::MAX);
    Request::Ahead { in_us }
}

/// Who this client is, for every handshake.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub instance_id: String,
    /// The tenant whose keys the session sees ("" is the shared default).
    pub namespace: String,
    pub host: String,
    pub pid: u32,
    pub start_time: u64,
    /// Proven to TCP servers before the Hello.
    pub secret: Option<maru_transport::auth::ClusterSecret>,
}

impl Identity {
    /// This identity as the current process presents it: a forked child is another process
    /// (its own pid and start time), and its session another session, labelled
    /// `<instance id>/fork-<pid>` so that neither the server nor a person takes it for the
    /// parent's.
    pub fn here(&self) -> Identity {
        if self.pid == std::process::id() {
            return self.clone();
        }
        let (host, pid, start_time) = maru_transport::local_identity();
        Identity {
            instance_id: format!("{}/fork-{pid}", self.instance_id),
            namespace: self.namespace.clone(),
            host,
            pid,
            start_time,
            secret: self.secret.clone(),
        }
    }
}

/// How the pool's calls wait.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// Bound on the connect and on every reply.
    pub timeout: Duration,
    /// See [`crate::MaruConfig::reply_grace`].
    pub grace: Duration,
    /// See [`crate::MaruConfig::busy_poll`].
    pub busy_poll: bool,
}

/// A session's books of its claims at the server (see `claims`): new for a new session, the
/// lost one's for a resumed session.
#[derive(Default)]
pub(crate) struct Books {
    pub releases: Arc<ReleaseQueue>,
    pub pins: Arc<PinBook>,
}

/// The connection pool of one instance session. Without pipelining, connections are taken for
/// one call and put back, so concurrent callers each get their own; with it, calls share one
/// connection (see `mux`) and only descriptor requests and the requests that wait on the
/// resource manager take a connection of their own.
pub(crate) struct ConnectionPool {
    /// The session's view holds: releases of dropped views, carried by the session's next
    /// request on any connection, and the live ones (kept across a resume).
    pub releases: Arc<ReleaseQueue>,
    /// The session's pins as the handler counts them (kept across a resume).
    pub pins: Arc<PinBook>,
    url: ServerUrl,
    identity: Identity,
    session: [u8; SESSION_TOKEN_LEN],
    /// The server's key index, as its hello described it.
    pub index: Option<maru_proto::IndexInfo>,
    idle: Mutex<Vec<PooledConn>>,
    max_idle: usize,
    closed: AtomicBool,
    timing: Timing,
    clock: ReplyClock,
    /// The shared connection (`use_async_rpc`); `None`: a connection per call.
    shared: Option<mux::Shared>,
}

/// How a session's calls use its connections: `max_inflight` bounds the calls in flight on the
/// shared connection when `pipelined`, else the idle connections kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sharing {
    pub pipelined: bool,
    pub max_inflight: usize,
}

fn handshake(
    url: &ServerUrl,
    identity: &Identity,
    session: Option<[u8; SESSION_TOKEN_LEN]>,
    w: &Wait,
) -> Result<(PooledConn, HelloOk)> {
    let mut conn = PooledConn::open(url, w.timeout, identity.secret.as_ref())?;
    let hello = Request::Hello(Hello {
        role: Role::Client,
        instance_id: &identity.instance_id,
        host: &identity.host,
        pid: identity.pid,
        start_time: identity.start_time,
        session_token: session,
        namespace: &identity.namespace,
    });
    match conn.call(&hello, w)? {
        Response::HelloOk(ok) => Ok((conn, ok)),
        other => Err(Error::unexpected("hello", &other)),
    }
}

/// Requests that go on the shared connection even while other calls are in flight on it. Those
/// that wait on the resource manager (a region granted or given back, room made by eviction)
/// take milliseconds; the server answers a connection's requests in order, so they would hold
/// up every lookup queued behind them: they take a connection of their own then (and the
/// shared one when it is idle, so that a handler used by one thread keeps two connections).
fn shares(req: &Request) -> bool {
    !matches!(
        req,
        Request::RequestRegion { .. }
            | Request::ReturnRegion { .. }
            | Request::MakeRoom { .. }
            | Request::GiveBack { .. }
    )
}

/// Requests that may be sent again on a fresh connection when a pooled one turns out to be
/// dead (the server restarted or dropped an idle connection): they change nothing.
fn idempotent(req: &Request) -> bool {
    matches!(
        req,
        Request::Heartbeat
            | Request::Lookup { .. }
            | Request::BatchLookup { .. }
            | Request::Exists { .. }
            | Request::BatchExists { .. }
            | Request::Stats
            | Request::GetRegion { .. }
            | Request::ListRegions
    )
}

impl ConnectionPool {
    /// Opens the session's first connection.
    pub fn establish(
        url: ServerUrl,
        identity: Identity,
        sharing: Sharing,
        timing: Timing,
        hook: &dyn WaitHook,
    ) -> Result<ConnectionPool> {
        let clock = ReplyClock::new();
        let w = timing.wait(hook, &clock);
        let (conn, server) = handshake(&url, &identity, None, &w)?;
        let books = Books::default();
        Ok(ConnectionPool::around(
            conn, server, url, identity, sharing, timing, clock, books,
        ))
    }

    /// The pool of the session `server` answered for on `conn`, its first connection, over
    /// the session's books.
    #[allow(clippy::too_many_arguments)]
    fn around(
        mut conn: PooledConn,
        server: HelloOk,
        url: ServerUrl,
        identity: Identity,
        sharing: Sharing,
        timing: Timing,
        clock: ReplyClock,
        books: Books,
    ) -> ConnectionPool {
        let Books { releases, pins } = books;
        conn.releases = Some(releases.clone());
        ConnectionPool {
            releases,
            pins,
            url,
            identity,
            session: server.session_token,
            index: server.index,
            idle: Mutex::new(vec![conn]),
            max_idle: sharing.max_inflight,
            closed: AtomicBool::new(false),
            timing,
            clock,
            shared: sharing
                .pipelined
                .then(|| mux::Shared::new(sharing.max_inflight)),
        }
    }

    /// The session's token.
    pub fn token(&self) -> [u8; SESSION_TOKEN_LEN] {
        self.session
    }

    /// Who this session's hellos say it is.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    fn take_idle(&self) -> Option<PooledConn> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put_back(&self, conn: PooledConn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if !self.closed.load(Ordering::Acquire) && idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    fn open(&self, w: &Wait) -> Result<PooledConn> {
        let (mut conn, _) = handshake(&self.url, &self.identity, Some(self.session), w)?;
        conn.releases = Some(self.releases.clone());
        Ok(conn)
    }

    /// A fresh connection joined to the session, outside the pool (for write-behind
    /// registrations, whose replies are collected later).
    pub fn open_conn(&self, hook: &dyn WaitHook) -> Result<PooledConn> {
        self.open(&self.wait(hook))
    }

    /// The timing of a call through `hook`.
    pub fn wait<'a>(&'a self, hook: &'a dyn WaitHook) -> Wait<'a> {
        self.timing.wait(hook, &self.clock)
    }

    /// A fresh connection joined to the session, handed over whole (the session's watcher
    /// reads it).
    pub fn open_stream(&self, hook: &dyn WaitHook) -> Result<Stream> {
        let conn = self.open(&self.wait(hook))?;
        Ok(conn.stream)
    }

    /// One request, one reply. A connection that failed is dropped (the next call opens a
    /// fresh one); a typed error reply leaves it usable.
    pub fn call(&self, req: &Request, hook: &dyn WaitHook) -> Result<Response> {
        let w = self.wait(hook);
        if let Some(shared) = &self.shared {
            if shares(req) || shared.idle() {
                return self.call_shared(shared, req, &w);
            }
        }
        let (mut conn, pooled) = match self.take_idle() {
            Some(c) => (c, true),
            None => (self.open(&w)?, false),
        };
        match conn.call(req, &w) {
            Ok(resp) => {
                self.put_back(conn);
                Ok(resp)
            }
            // A typed error leaves the stream in a known state; after a timeout the late reply
            // is skipped by the next call. Keeping the connection matters: the server ends the
            // session (and releases our regions) when its last connection closes.
            Err(e) if e.keeps_connection() => {
                self.put_back(conn);
                Err(e)
            }
            Err(e) if pooled && e.found_connection_dead() && idempotent(req) => {
                drop(conn);
                let mut fresh = self.open(&w)?;
                let resp = fresh.call(req, &w)?;
                self.put_back(fresh);
                Ok(resp)
            }
            Err(e) => Err(e),
        }
    }

    /// Tells the server a request follows in about `in_time` on the shared connection, if
    /// there is one that works (without pipelining the next request's connection is not known
    /// yet: nothing is told).
    pub fn tell_ahead(&self, in_time: Duration) {
        if let Some(m) = self.shared.as_ref().and_then(|s| s.live()) {
            m.tell_ahead(in_time);
        }
    }

    /// One request, one reply on the shared connection. A connection that failed is replaced
    /// by the next call; an idempotent request that found a connection from before dead goes
    /// again on a fresh one, as on a lent connection.
    fn call_shared(&self, shared: &mux::Shared, req: &Request, w: &Wait) -> Result<Response> {
        let (conn, fresh) = shared.get(w.hook, || self.unshared_conn(w))?;
        match conn.call(req, w) {
            Err(e) if !fresh && e.found_connection_dead() && idempotent(req) => {
                let (conn, _) = shared.get(w.hook, || self.unshared_conn(w))?;
                conn.call(req, w)
            }
            got => got,
        }
    }

    /// A connection for the shared one: an idle one that never asked for a descriptor (whose
    /// replies may bring one), else a fresh one; whether it is fresh.
    fn unshared_conn(&self, w: &Wait) -> Result<(PooledConn, bool)> {
        match self.take_idle() {
            Some(c) if !c.fd_reads => Ok((c, false)),
            Some(c) => {
                self.put_back(c);
                Ok((self.open(w)?, true))
            }
            None => Ok((self.open(w)?, true)),
        }
    }

    /// The most calls the session had in flight at once on its shared connection (0 without
    /// pipelining).
    pub fn peak_inflight(&self) -> usize {
        self.shared.as_ref().map_or(0, |s| s.peak_inflight())
    }

    /// A descriptor of region `region_id`'s file from the server, over a Unix connection
    /// (`None` when the session's connections are TCP): see [`PooledConn::descriptor`].
    pub fn descriptor(
        &self,
        region_id: u64,
        writable: bool,
        hook: &dyn WaitHook,
    ) -> Option<Result<(OwnedFd, u64, u64)>> {
        if !matches!(self.url, ServerUrl::Unix(_)) {
            return None;
        }
        let w = self.wait(hook);
        let mut conn = match self.take_idle() {
            Some(c) => c,
            None => match self.open(&w) {
                Ok(c) => c,
                Err(e) => return Some(Err(e)),
            },
        };
        if !conn.passes_fds() {
            self.put_back(conn);
            return None;
        }
        let got = conn.descriptor(region_id, writable, &w);
        match &got {
            Err(e) if !e.keeps_connection() => {}
            _ => self.put_back(conn),
        }
        Some(got)
    }

    /// The descriptors of the idle connections and the shared one (none of a kind if another
    /// thread held its lock when the process forked: that lock is never released in the
    /// child).
    pub fn raw_fds(&self) -> Vec<std::os::fd::RawFd> {
        let mut fds = match self.idle.try_lock() {
            Ok(idle) => idle.iter().map(|c| c.raw_fd()).collect(),
            Err(_) => Vec::new(),
        };
        fds.extend(self.shared.as_ref().and_then(|s| s.raw_fd()));
        fds
    }

    /// Drops every idle connection and the shared one (the server sees them close);
    /// connections still in use are dropped when their call ends.
    pub fn close_all(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(s) = &self.shared {
            s.close();
        }
        let conns = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        for c in conns {
            let _ = c.stream.shutdown();
        }
    }
}

impl Timing {
    fn wait<'a>(&self, hook: &'a dyn WaitHook, clock: &'a ReplyClock) -> Wait<'a> {
        Wait {
            hook,
            grace: self.grace,
            clock,
            busy_poll: self.busy_poll,
            timeout: self.timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_requests_that_change_nothing_are_sent_again() {
        assert!(idempotent(&Request::Exists { key: b"k" }));
        assert!(idempotent(&Request::Stats));
        assert!(!idempotent(&Request::Delete { key: b"k" }));
        assert!(!idempotent(&Request::Pin { key: b"k" }));
        assert!(!idempotent(&Request::RequestRegion { size: 1 }));
    }
}
