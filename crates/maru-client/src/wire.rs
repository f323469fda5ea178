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
    ServerUrl, Stream, HEADER_LEN, SESSION_TOKEN_LEN,
};

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
    pub timeout: Duration,
}

/// Waits up to `timeout` for `fd` to become readable. `Ok(false)` on timeout or signal.
fn poll_readable(fd: i32, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `pfd` and `ts` are valid for the duration of the call; one descriptor; no
    // signal mask change (null sigmask).
    let rc = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    // POLLHUP / POLLERR also mean "a read will not block" (it returns 0 or the error).
    Ok(rc > 0)
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
/// through the hook.
fn wait_readable(fd: i32, deadline: Instant, w: &Wait, op: &'static str) -> Result<(), RpcError> {
    let now = Instant::now();
    let timeout = RpcError::Timeout {
        op,
        after: w.timeout,
    };
    if now >= deadline {
        return Err(timeout);
    }
    let io_err = |source| RpcError::Io { op, source };
    if poll_readable(fd, w.grace.min(deadline - now)).map_err(io_err)? {
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
        })
    }

    /// Sends `req` and waits for its reply. An error reply is [`RpcError::Remote`].
    pub fn call(&mut self, req: &Request, w: &Wait) -> Result<Response, RpcError> {
        let op = req.name();
        let deadline = Instant::now() + w.timeout;
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
            wait_readable(self.stream.as_raw_fd(), deadline, w, op)?;
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
        hook: &dyn WaitHook,
    ) -> Result<Link, RpcError> {
        let w = Wait {
            hook,
            grace,
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
        })
    }

    fn wait<'a>(&self, hook: &'a dyn WaitHook) -> Wait<'a> {
        Wait {
            hook,
            grace: self.grace,
            timeout: self.timeout,
        }
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
        let w = Wait {
            hook: &hook,
            grace: Duration::from_micros(50),
            timeout: Duration::from_millis(30),
        };
        let started = Instant::now();
        let r = wait_readable(a.as_raw_fd(), started + w.timeout, &w, "test");
        assert!(matches!(r, Err(RpcError::Timeout { .. })), "{r:?}");
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(hook.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn a_ready_reply_never_reaches_the_hook() {
        struct Forbidden;
        impl WaitHook for Forbidden {
            fn block(&self, _f: &mut (dyn FnMut() + Send)) {
                panic!("hook called for a reply that was already there");
            }
        }
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.write_all(b"x").unwrap();
        let w = Wait {
            hook: &Forbidden,
            grace: Duration::from_micros(50),
            timeout: Duration::from_secs(1),
        };
        wait_readable(a.as_raw_fd(), Instant::now() + w.timeout, &w, "test").unwrap();
    }
}
