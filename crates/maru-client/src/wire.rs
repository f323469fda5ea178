//! The client's connections: a pool of handshaken sockets of one instance session, and a
//! request/reply call whose wait is split in two — a short `ppoll` in the caller's context,
//! then the rest through a [`WaitHook`] (which the Python binding uses to release the GIL).

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use maru_proto::{
    decode_response, encode_request, DecodeError, Header, Hello, HelloOk, Request, Response, Role,
    ServerUrl, HEADER_LEN, SESSION_TOKEN_LEN,
};
use maru_transport::busy::{self, poll_readable, Backoff, Spun};
use maru_transport::Stream;

use crate::error::RpcError;

/// Runs the slow part of a wait. The default ([`NoHook`]) just runs it; the Python binding
/// releases the GIL around it, so other Python threads run while this one sleeps in the
/// kernel. `f` holds no reference to anything the hook's caller protects (no GIL-bound
/// object), which is why it is `Send`.
pub trait WaitHook {
    fn block(&self, f: &mut (dyn FnMut() + Send));
}

/// The hook that runs the wait in place.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHook;

impl WaitHook for NoHook {
    fn block(&self, f: &mut (dyn FnMut() + Send)) {
        f()
    }
}

/// Timing of one call.
#[derive(Clone, Copy)]
pub(crate) struct Wait<'a> {
    pub hook: &'a dyn WaitHook,
    /// How long to wait in the caller's context before handing over to the hook.
    pub grace: Duration,
    /// Spend the grace polling without sleeping (see [`crate::MaruConfig::busy_poll`]).
    pub busy_poll: bool,
    pub timeout: Duration,
}

/// Calls of this process waiting for a reply right now. Only a call that waits alone
/// busy-polls: two spinners would hold both CPUs of a small machine while the server's threads
/// that answer them wait for one, and calls that run concurrently already keep each other's
/// CPUs awake (measured: with 4 threads spinning, p99 went from 0.2–0.7 ms to 1.5–2 ms).
static WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts one call in [`WAITING`] while it lives.
struct Waiting;

impl Waiting {
    fn enter() -> Waiting {
        WAITING.fetch_add(1, Ordering::AcqRel);
        Waiting
    }

    /// No other call of the process is waiting (a wait outside [`Conn::call`] counts none).
    fn alone() -> bool {
        WAITING.load(Ordering::Acquire) <= 1
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING.fetch_sub(1, Ordering::AcqRel);
    }
}

fn poll_until(fd: i32, deadline: Instant) -> io::Result<bool> {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        if poll_readable(fd, deadline - now)? {
            return Ok(true);
        }
    }
}

/// Waits for `fd` to become readable before `deadline`: first for `grace` in place, then
/// through the hook. The grace is spent polling without sleeping (`maru_transport::busy`) when
/// `w.busy_poll`, the connection's back-off and [`Waiting::alone`] allow — no timer armed and
/// the thread never leaves the CPU, so a reply inside the grace is seen at once (a sleeping
/// wait cost 6–15 µs per call here, docs/PERFORMANCE.md finding 1) — else in `ppoll`.
fn wait_readable(
    fd: i32,
    deadline: Instant,
    w: &Wait,
    spin: &mut Backoff,
    op: &'static str,
) -> Result<(), RpcError> {
    let now = Instant::now();
    let timeout = RpcError::Timeout {
        op,
        after: w.timeout,
    };
    if now >= deadline {
        return Err(timeout);
    }
    let io_err = |source| RpcError::Io { op, source };
    let grace = w.grace.min(deadline - now);
    let ready = if w.busy_poll && Waiting::alone() && spin.try_spin() {
        let spun = busy::spin_readable(fd, grace, || false).map_err(io_err)?;
        spin.record(spun);
        spun == Spun::Came
    } else {
        poll_readable(fd, grace).map_err(io_err)?
    };
    if ready {
        return Ok(());
    }
    let mut outcome = Ok(false);
    w.hook.block(&mut || outcome = poll_until(fd, deadline));
    match outcome {
        Ok(true) => Ok(()),
        Ok(false) => Err(timeout),
        Err(source) => Err(RpcError::Io { op, source }),
    }
}

/// A receive buffer that never blocks on its own: the caller polls, then asks for one read.
struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    fn new() -> Self {
        RecvBuf {
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
        }
    }

    /// The next whole frame, if buffered.
    fn take_frame(&mut self) -> Result<Option<(Header, std::ops::Range<usize>)>, DecodeError> {
        let header = match Header::decode(&self.buf[self.start..self.end]) {
            Ok(h) => h,
            Err(DecodeError::Truncated { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let total = HEADER_LEN + header.payload_len as usize;
        if self.end - self.start < total {
            // Make room for the whole frame; the header bounded its size by MAX_FRAME.
            if self.buf.len() - self.start < total {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.buf.len() < total {
                    self.buf.resize(total, 0);
                }
            }
            return Ok(None);
        }
        let payload = self.start + HEADER_LEN..self.start + total;
        self.start += total;
        Ok(Some((header, payload)))
    }

    /// One `read` into the free tail of the buffer.
    fn read_from(&mut self, r: &mut impl Read) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = r.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }
}

/// One handshaken connection; one call at a time.
pub(crate) struct Conn {
    stream: Stream,
    rx: RecvBuf,
    tx: Vec<u8>,
    next_id: u64,
    /// Whether this connection's waits may busy-poll (see [`wait_readable`]).
    spin: Backoff,
}

impl Conn {
    fn open(url: &ServerUrl, timeout: Duration) -> Result<Conn, RpcError> {
        let stream = Stream::connect(url, timeout).map_err(|source| RpcError::Connect {
            url: url.to_string(),
            source,
        })?;
        let io = |source| RpcError::Io {
            op: "connect",
            source,
        };
        // Safety nets only: every read is preceded by a poll, every write is a small frame.
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        Ok(Conn {
            stream,
            rx: RecvBuf::new(),
            tx: Vec::with_capacity(256),
            next_id: 1,
            spin: Backoff::default(),
        })
    }

    /// Sends `req` and waits for its reply. An error reply is [`RpcError::Remote`].
    pub fn call(&mut self, req: &Request, w: &Wait) -> Result<Response, RpcError> {
        let _waiting = Waiting::enter();
        let deadline = Instant::now() + w.timeout;
        let id = self.send(req, w)?;
        self.recv(id, req.name(), deadline, w)
    }

    /// Sends `req` without waiting for its reply; returns its request id for [`Conn::recv`].
    /// Replies come back in the order their requests were sent.
    pub fn send(&mut self, req: &Request, w: &Wait) -> Result<u64, RpcError> {
        let op = req.name();
        let id = self.next_id;
        self.next_id += 1;
        self.tx.clear();
        encode_request(&mut self.tx, id, req)?;
        if let Err(source) = self.stream.write_all(&self.tx) {
            return Err(match source.kind() {
                // Part of the frame may be out: the stream is unusable (SendTimeout drops it).
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => RpcError::SendTimeout {
                    op,
                    after: w.timeout,
                },
                _ => RpcError::Io { op, source },
            });
        }
        Ok(id)
    }

    /// Whether the reply to the oldest request still outstanding can be read without waiting:
    /// a whole frame is buffered or the socket has bytes (a partial frame then costs one short
    /// wait for the rest, which is already on its way).
    pub fn reply_ready(&mut self) -> bool {
        let buffered = self.rx.end > self.rx.start;
        buffered || matches!(busy::readable_now(self.stream.as_raw_fd()), Ok(true))
    }

    /// Waits for the reply to request `id` (sent on this connection with [`Conn::send`]).
    pub fn recv(
        &mut self,
        id: u64,
        op: &'static str,
        deadline: Instant,
        w: &Wait,
    ) -> Result<Response, RpcError> {
        loop {
            match self.rx.take_frame() {
                Ok(Some((header, range))) => {
                    if header.request_id < id {
                        // The late reply to an earlier call that timed out: skip it.
                        continue;
                    }
                    if header.request_id != id {
                        return Err(RpcError::Mismatch {
                            expected: id,
                            got: header.request_id,
                        });
                    }
                    let resp = decode_response(&header, &self.rx.buf[range])
                        .map_err(|source| RpcError::Decode { op, source })?;
                    return match resp {
                        Response::Error(source) => Err(RpcError::Remote { op, source }),
                        other => Ok(other),
                    };
                }
                Ok(None) => {}
                Err(source) => return Err(RpcError::Decode { op, source }),
            }
            wait_readable(self.stream.as_raw_fd(), deadline, w, &mut self.spin, op)?;
            match self.rx.read_from(&mut self.stream) {
                Ok(0) => return Err(RpcError::Closed { op }),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                    ) => {}
                Err(source) => return Err(RpcError::Io { op, source }),
            }
        }
    }
}

/// Who this client is, for every handshake.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub instance_id: String,
    pub host: String,
    pub pid: u32,
    pub start_time: u64,
}

/// The connection pool of one instance session. Connections are taken for one call and put
/// back, so concurrent callers each get their own and no lock is held across a round trip.
pub(crate) struct Link {
    pub url: ServerUrl,
    identity: Identity,
    session: [u8; SESSION_TOKEN_LEN],
    idle: Mutex<Vec<Conn>>,
    max_idle: usize,
    closed: AtomicBool,
    pub timeout: Duration,
    pub grace: Duration,
    pub busy_poll: bool,
}

fn handshake(
    url: &ServerUrl,
    identity: &Identity,
    session: Option<[u8; SESSION_TOKEN_LEN]>,
    w: &Wait,
) -> Result<(Conn, HelloOk), RpcError> {
    let mut conn = Conn::open(url, w.timeout)?;
    let hello = Request::Hello(Hello {
        role: Role::Client,
        instance_id: &identity.instance_id,
        host: &identity.host,
        pid: identity.pid,
        start_time: identity.start_time,
        session_token: session,
    });
    match conn.call(&hello, w)? {
        Response::HelloOk(ok) => Ok((conn, ok)),
        other => Err(RpcError::Unexpected {
            op: "hello",
            got: format!("{other:?}"),
        }),
    }
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

impl Link {
    /// Opens the session's first connection.
    pub fn establish(
        url: ServerUrl,
        identity: Identity,
        max_idle: usize,
        timeout: Duration,
        grace: Duration,
        busy_poll: bool,
        hook: &dyn WaitHook,
    ) -> Result<Link, RpcError> {
        let w = Wait {
            hook,
            grace,
            busy_poll,
            timeout,
        };
        let (conn, server) = handshake(&url, &identity, None, &w)?;
        Ok(Link {
            url,
            identity,
            session: server.session_token,
            idle: Mutex::new(vec![conn]),
            max_idle,
            closed: AtomicBool::new(false),
            timeout,
            grace,
            busy_poll,
        })
    }

    fn take_idle(&self) -> Option<Conn> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put_back(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if !self.closed.load(Ordering::Acquire) && idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    fn open(&self, w: &Wait) -> Result<Conn, RpcError> {
        let (conn, _) = handshake(&self.url, &self.identity, Some(self.session), w)?;
        Ok(conn)
    }

    /// A fresh connection joined to the session, outside the pool (for write-behind
    /// registrations, whose replies are collected later).
    pub fn open_conn(&self, hook: &dyn WaitHook) -> Result<Conn, RpcError> {
        self.open(&self.wait(hook))
    }

    /// The timing of a call through `hook`.
    pub fn wait<'a>(&self, hook: &'a dyn WaitHook) -> Wait<'a> {
        Wait {
            hook,
            grace: self.grace,
            busy_poll: self.busy_poll,
            timeout: self.timeout,
        }
    }

    /// A fresh connection joined to the session, handed over whole (the session's watcher
    /// reads it).
    pub fn open_stream(&self, hook: &dyn WaitHook) -> Result<Stream, RpcError> {
        let conn = self.open(&self.wait(hook))?;
        Ok(conn.stream)
    }

    /// One request, one reply. A connection that failed is dropped (the next call opens a
    /// fresh one); a typed error reply leaves it usable.
    pub fn call(&self, req: &Request, hook: &dyn WaitHook) -> Result<Response, RpcError> {
        let w = self.wait(hook);
        let (mut conn, pooled) = match self.take_idle() {
            Some(c) => (c, true),
            None => (self.open(&w)?, false),
        };
        let result = conn.call(req, &w);
        match result {
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
            Err(RpcError::Closed { .. } | RpcError::Io { .. }) if pooled && idempotent(req) => {
                drop(conn);
                let mut fresh = self.open(&w)?;
                let resp = fresh.call(req, &w)?;
                self.put_back(fresh);
                Ok(resp)
            }
            Err(e) => Err(e),
        }
    }

    /// Drops every idle connection (the server sees them close); connections still in use
    /// are dropped when their call ends.
    pub fn close_all(&self) {
        self.closed.store(true, Ordering::Release);
        let conns = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        for c in conns {
            let _ = c.stream.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hook for waits that must end inside the grace, in the caller's context.
    struct Forbidden;
    impl WaitHook for Forbidden {
        fn block(&self, _f: &mut (dyn FnMut() + Send)) {
            panic!("hook called although the reply was there within the grace");
        }
    }

    #[test]
    fn recv_buf_splits_and_reassembles_frames() {
        let mut wire = Vec::new();
        maru_proto::encode_response(&mut wire, 1, &Response::Bool(true)).unwrap();
        maru_proto::encode_response(&mut wire, 2, &Response::Stats("x".repeat(40_000))).unwrap();
        let mut rx = RecvBuf::new();
        // Feed the bytes three at a time, as a slow peer would.
        let mut src = &wire[..];
        let mut got = Vec::new();
        while got.len() < 2 {
            if let Some((h, r)) = rx.take_frame().unwrap() {
                got.push((h.request_id, decode_response(&h, &rx.buf[r]).unwrap()));
                continue;
            }
            let n = src.len().min(3);
            let mut chunk = &src[..n];
            rx.read_from(&mut chunk).unwrap();
            src = &src[n..];
        }
        assert_eq!(got[0], (1, Response::Bool(true)));
        assert_eq!(got[1], (2, Response::Stats("x".repeat(40_000))));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let mut rx = RecvBuf::new();
        let mut junk: &[u8] = b"NOTMARU-this-is-not-a-frame-at-all";
        rx.read_from(&mut junk).unwrap();
        assert!(rx.take_frame().is_err());
    }

    #[test]
    fn wait_times_out_through_the_hook() {
        struct Counting(std::sync::atomic::AtomicUsize);
        impl WaitHook for Counting {
            fn block(&self, f: &mut (dyn FnMut() + Send)) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                f()
            }
        }
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let hook = Counting(Default::default());
        for busy_poll in [false, true] {
            hook.0.store(0, std::sync::atomic::Ordering::SeqCst);
            let w = Wait {
                hook: &hook,
                grace: Duration::from_micros(50),
                busy_poll,
                timeout: Duration::from_millis(30),
            };
            let started = Instant::now();
            let mut spin = Backoff::default();
            let r = wait_readable(a.as_raw_fd(), started + w.timeout, &w, &mut spin, "test");
            assert!(matches!(r, Err(RpcError::Timeout { .. })), "{r:?}");
            assert!(started.elapsed() >= Duration::from_millis(30));
            assert_eq!(hook.0.load(std::sync::atomic::Ordering::SeqCst), 1);
            // A spin that saw no reply makes the next calls sleep instead.
            assert_eq!(spin.skipping(), if busy_poll { Backoff::MIN } else { 0 });
        }
    }

    #[test]
    fn a_ready_reply_never_reaches_the_hook() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.write_all(b"x").unwrap();
        for busy_poll in [false, true] {
            let w = Wait {
                hook: &Forbidden,
                grace: Duration::from_micros(50),
                busy_poll,
                timeout: Duration::from_secs(1),
            };
            let mut spin = Backoff::default();
            wait_readable(
                a.as_raw_fd(),
                Instant::now() + w.timeout,
                &w,
                &mut spin,
                "test",
            )
            .unwrap();
        }
    }

    #[test]
    fn a_busy_poll_sees_a_reply_that_comes_during_the_grace_without_the_hook() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        // The grace is long enough that the writer thread is sure to run inside it, even on a
        // loaded machine.
        let w = Wait {
            hook: &Forbidden,
            grace: Duration::from_secs(5),
            busy_poll: true,
            timeout: Duration::from_secs(10),
        };
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            b.write_all(b"x").unwrap();
            b
        });
        let mut spin = Backoff::default();
        wait_readable(
            a.as_raw_fd(),
            Instant::now() + w.timeout,
            &w,
            &mut spin,
            "test",
        )
        .unwrap();
        writer.join().unwrap();
        assert_eq!(spin.skipping(), 0);
    }
}
