//! The connections of one instance session: [`PooledConn`], a handshaken socket whose reply
//! waits go through [`crate::wait`], and [`ConnectionPool`], which either lends one to each
//! call, so that concurrent callers never share a socket, or (with `use_async_rpc`) pipelines
//! the calls of all threads on one shared connection (`mux`). No lock is held across a round
//! trip either way.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use maru_proto::{
    decode_response, encode_request, Hello, HelloOk, Request, Response, Role, ServerUrl,
    SESSION_TOKEN_LEN,
};
use maru_transport::busy::{self, Backoff};
use maru_transport::fds::FdReader;
use maru_transport::{FrameBuf, Stream, TransportError};

use crate::claims::{PinBook, ReleaseQueue};
use crate::error::{Error, Result};
use crate::wait::{wait_readable, ReplyClock, Wait, WaitHook, Waiting};

mod mux;
mod resume;

/// Whether a failed read is worth trying again: the socket's safety-net timeout passed or a
/// signal came, and the connection is still fine.
pub(crate) fn read_again(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// One handshaken connection of the session; one call at a time. Replies come back in the
/// order their requests were sent.
pub(crate) struct PooledConn {
    stream: Stream,
    rx: FrameBuf,
    tx: Vec<u8>,
    next_id: u64,
    /// Whether this connection's waits may busy-poll (see [`wait_readable`]).
    spin: Backoff,
    /// The session's queued view releases, sent in front of this connection's next request
    /// (set once the connection has joined the session).
    releases: Option<Arc<ReleaseQueue>>,
    /// Descriptors that came with replies (Unix only), oldest first: the n-th belongs to
    /// the n-th `Descriptor` reply read (see `maru_transport::fds`).
    fds: VecDeque<OwnedFd>,
    /// Set once a `Descriptor` request went out: from then on every read keeps descriptors.
    fd_reads: bool,
}

impl PooledConn {
    fn open(
        url: &ServerUrl,
        timeout: Duration,
        secret: Option<&maru_transport::auth::ClusterSecret>,
    ) -> Result<PooledConn> {
        let stream = Stream::connect_with(url, timeout, secret).map_err(|source| {
            let e = TransportError::Connect {
                url: url.to_string(),
                source,
            };
            Error::transport("connect", e, timeout)
        })?;
        let io = |e| Error::io("connect", e);
        // Safety nets only: every read is preceded by a poll, every write is a small frame.
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        Ok(PooledConn::over(stream))
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }

    fn over(stream: Stream) -> PooledConn {
        PooledConn {
            stream,
            rx: FrameBuf::new(),
            tx: Vec::with_capacity(256),
            next_id: 1,
            spin: Backoff::default(),
            releases: None,
            fds: VecDeque::new(),
            fd_reads: false,
        }
    }

    /// Whether descriptors can come over this connection (a Unix socket).
    pub fn passes_fds(&self) -> bool {
        matches!(self.stream, Stream::Unix(_))
    }

    /// Asks for a descriptor of region `region_id`'s file and returns it with where the
    /// region lies in that file (offset, length).
    pub fn descriptor(
        &mut self,
        region_id: u64,
        writable: bool,
        w: &Wait,
    ) -> Result<(OwnedFd, u64, u64)> {
        self.fd_reads = true;
        let op = "descriptor";
        match self.call(
            &Request::Descriptor {
                region_id,
                writable,
            },
            w,
        )? {
            Response::Descriptor { offset, len, .. } => {
                let fd = self.fds.pop_front().ok_or_else(|| {
                    Error::protocol(op, "the reply came without its descriptor".to_owned())
                })?;
                Ok((fd, offset, len))
            }
            other => Err(Error::unexpected(op, &other)),
        }
    }

    /// Sends `req` and waits for its reply, for a grace that [`Wait::clock`] sets from the
    /// replies to requests of its size, which this one's joins. An error reply is an
    /// [`ErrorKind::Remote`](crate::ErrorKind::Remote).
    pub fn call(&mut self, req: &Request, w: &Wait) -> Result<Response> {
        let _waiting = Waiting::enter();
        let deadline = Instant::now() + w.timeout;
        let id = self.send(req, w)?;
        let sent = Sent {
            at: Instant::now(),
            frame_len: self.tx.len(),
        };
        self.next_reply(id, deadline, w, Some(sent))
            .map_err(|e| Error::transport(req.name(), e, w.timeout))?
            .map_err(|e| Error::remote(req.name(), e))
    }

    /// Sends `req` without waiting for its reply; returns its request id for
    /// [`PooledConn::recv`]. A send that fails may have put part of the frame out: the
    /// connection is not used again.
    pub fn send(&mut self, req: &Request, w: &Wait) -> Result<u64> {
        let op = req.name();
        let id = self.next_id;
        self.next_id += 1;
        self.tx.clear();
        // Releases of views dropped since the session's last request, and reads through the
        // key index, leave in the same write, as frames that ask for no reply.
        if let Some(q) = &self.releases {
            q.encode_pending(&mut self.tx);
        }
        let pending = self.tx.len();
        if let Err(e) = encode_request(&mut self.tx, id, req) {
            // What was pending still goes: releases must not be lost with a request too large.
            self.tx.truncate(pending);
            let _ = self.stream.write_all(&self.tx);
            return Err(Error::transport(op, e.into(), w.timeout));
        }
        self.stream
            .write_all(&self.tx)
            .map_err(|e| Error::transport(op, e.into(), w.timeout))?;
        Ok(id)
    }

    /// Whether the reply to the oldest request still outstanding can be read without waiting:
    /// a frame (or part of one) is buffered or the socket has bytes (a partial frame then
    /// costs one short wait for the rest, which is already on its way).
    pub fn reply_ready(&mut self) -> bool {
        !self.rx.is_empty() || matches!(busy::readable_now(self.stream.as_raw_fd()), Ok(true))
    }

    /// Waits for the reply to request `id` (sent on this connection with
    /// [`PooledConn::send`]), skipping late replies to earlier requests that timed out.
    pub fn recv(
        &mut self,
        id: u64,
        op: &'static str,
        deadline: Instant,
        w: &Wait,
    ) -> Result<Response> {
        self.next_reply(id, deadline, w, None)
            .map_err(|e| Error::transport(op, e, w.timeout))?
            .map_err(|e| Error::remote(op, e))
    }

    /// The reply to `id`: a response, a typed refusal, or why neither came. With `sent`, the
    /// grace is the clock's for the request and the wait for the reply's first bytes is
    /// booked on it; without, the grace is the least one.
    fn next_reply(
        &mut self,
        id: u64,
        deadline: Instant,
        w: &Wait,
        mut sent: Option<Sent>,
    ) -> Result<Result<Response, maru_proto::WireError>, TransportError> {
        let grace = sent.map_or(w.grace, |s| w.clock.grace(s.frame_len, w.grace));
        loop {
            if let Some((header, payload)) = self.rx.take_frame()? {
                // Request id 0 carries a refusal of the connection itself (a bad header, a
                // missing cluster secret): the daemon closes it after this frame.
                if header.request_id == 0 {
                    if let Ok(Response::Error(e)) = decode_response(&header, payload) {
                        return Ok(Err(e));
                    }
                }
                if header.request_id < id {
                    // A late descriptor reply: its descriptor is the oldest queued.
                    if header.msg_type == maru_proto::msg_type::R_DESCRIPTOR {
                        self.fds.pop_front();
                    }
                    continue;
                }
                if header.request_id != id {
                    return Err(TransportError::Mismatch {
                        expected: id,
                        got: header.request_id,
                    });
                }
                return Ok(match decode_response(&header, payload)? {
                    Response::Error(e) => Err(e),
                    other => Ok(other),
                });
            }
            let readable =
                wait_readable(self.stream.as_raw_fd(), deadline, grace, w, &mut self.spin)?;
            if let Some(s) = sent.take() {
                w.clock.record(s.frame_len, readable - s.at);
            }
            let got = match &self.stream {
                Stream::Unix(sock) if self.fd_reads => self.rx.read_some(&mut FdReader {
                    sock,
                    fds: &mut self.fds,
                }),
                _ => self.rx.read_some(&mut self.stream),
            };
            match got {
                Ok(0) => return Err(TransportError::Closed),
                Ok(_) => {}
                Err(e) if read_again(&e) => {}
                Err(e) => return Err(TransportError::Io(e)),
            }
        }
    }
}

/// A request on its way: when it went out and how large it was (its reply time's class).
#[derive(Clone, Copy)]
struct Sent {
    at: Instant,
    frame_len: usize,
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
    use crate::wait::NoHook;
    use crate::ErrorKind;
    use maru_proto::{encode_error, encode_response, ErrorCode, WireError};
    use std::os::unix::net::UnixStream;

    fn pair() -> (PooledConn, UnixStream) {
        let (client, server) = UnixStream::pair().unwrap();
        (PooledConn::over(Stream::Unix(client)), server)
    }

    fn quick() -> Wait<'static> {
        static CLOCK: ReplyClock = ReplyClock::new();
        Wait {
            hook: &NoHook,
            grace: Duration::from_micros(50),
            clock: &CLOCK,
            busy_poll: false,
            timeout: Duration::from_secs(5),
        }
    }

    fn recv(conn: &mut PooledConn, id: u64) -> Result<Response> {
        let w = quick();
        conn.recv(id, "exists", Instant::now() + w.timeout, &w)
    }

    #[test]
    fn late_replies_are_skipped_and_a_typed_refusal_is_remote() {
        let (mut conn, mut server) = pair();
        let mut wire = Vec::new();
        // The late reply to request 1, then the answers to 2 and 3.
        encode_response(&mut wire, 1, &Response::Bool(false)).unwrap();
        encode_response(&mut wire, 2, &Response::Bool(true)).unwrap();
        let refusal = WireError::new(ErrorCode::Internal, "no");
        encode_error(&mut wire, 3, &refusal);
        server.write_all(&wire).unwrap();
        assert_eq!(recv(&mut conn, 2).unwrap(), Response::Bool(true));
        let e = recv(&mut conn, 3).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Remote(ErrorCode::Internal), "{e}");
        assert!(e.keeps_connection());
    }

    #[test]
    fn a_reply_from_the_future_a_bad_frame_and_a_close_are_typed() {
        let (mut conn, mut server) = pair();
        let mut wire = Vec::new();
        encode_response(&mut wire, 9, &Response::Ok).unwrap();
        server.write_all(&wire).unwrap();
        let e = recv(&mut conn, 2).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert_eq!(e.to_string(), "reply to request 9 while waiting for 2");

        let (mut conn, mut server) = pair();
        server
            .write_all(b"NOTMARU-this-is-not-a-frame-at-all")
            .unwrap();
        let e = recv(&mut conn, 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().starts_with("bad reply to exists: "), "{e}");

        let (mut conn, server) = pair();
        drop(server);
        let e = recv(&mut conn, 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Transport);
        assert!(e.means_session_lost() && e.found_connection_dead(), "{e}");
    }

    #[test]
    fn a_reply_already_buffered_is_ready() {
        let (mut conn, mut server) = pair();
        assert!(!conn.reply_ready());
        let mut wire = Vec::new();
        encode_response(&mut wire, 1, &Response::Ok).unwrap();
        encode_response(&mut wire, 2, &Response::Ok).unwrap();
        server.write_all(&wire).unwrap();
        assert!(conn.reply_ready(), "bytes on the socket");
        assert_eq!(recv(&mut conn, 1).unwrap(), Response::Ok);
        assert!(
            conn.reply_ready(),
            "the second frame came with the first read"
        );
        assert_eq!(recv(&mut conn, 2).unwrap(), Response::Ok);
        assert!(!conn.reply_ready());
    }

    /// A reply skipped as late takes its descriptor along, so the next reply gets its own.
    #[test]
    fn a_late_descriptor_reply_takes_its_descriptor_along() {
        use std::os::fd::AsFd;
        let (mut conn, server) = pair();
        let (f1, f2) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
        f1.set_len(1).unwrap();
        f2.set_len(2).unwrap();
        for (id, f, offset) in [(1, &f1, 0), (2, &f2, 4096)] {
            let mut wire = Vec::new();
            let reply = Response::Descriptor {
                offset,
                len: 2 * MIB_TEST,
                writable: false,
            };
            encode_response(&mut wire, id, &reply).unwrap();
            maru_transport::fds::send_all_with_fds(&server, &wire, &[f.as_fd()]).unwrap();
        }
        conn.next_id = 2;
        let (fd, offset, len) = conn.descriptor(7, false, &quick()).unwrap();
        assert_eq!((offset, len), (4096, 2 * MIB_TEST));
        let file = std::fs::File::from(fd);
        assert_eq!(
            file.metadata().unwrap().len(),
            2,
            "the second reply's descriptor"
        );
        assert!(conn.fds.is_empty());
    }

    const MIB_TEST: u64 = 1 << 20;

    #[test]
    fn only_requests_that_change_nothing_are_sent_again() {
        assert!(idempotent(&Request::Exists { key: b"k" }));
        assert!(idempotent(&Request::Stats));
        assert!(!idempotent(&Request::Delete { key: b"k" }));
        assert!(!idempotent(&Request::Pin { key: b"k" }));
        assert!(!idempotent(&Request::RequestRegion { size: 1 }));
    }
}
