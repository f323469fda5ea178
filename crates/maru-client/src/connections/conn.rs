//! One handshaken connection of a session ([`PooledConn`]): requests out, replies back in
//! order, waits through [`crate::wait`], descriptors that come with `Descriptor` replies kept
//! in order, and the session's queued releases and index reads sent in front of each request.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use maru_proto::{decode_response, encode_request, Request, Response, ServerUrl};
use maru_transport::busy::{self, Backoff};
use maru_transport::fds::FdReader;
use maru_transport::{FrameBuf, Stream, TransportError};

use crate::claims::ReleaseQueue;
use crate::error::{Error, Result};
use crate::wait::{wait_readable, Wait, Waiting};

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
    pub(super) stream: Stream,
    pub(super) rx: FrameBuf,
    pub(super) tx: Vec<u8>,
    pub(super) next_id: u64,
    /// Whether this connection's waits may busy-poll (see [`wait_readable`]).
    pub(super) spin: Backoff,
    /// The session's queued view releases, sent in front of this connection's next request
    /// (set once the connection has joined the session).
    pub(super) releases: Option<Arc<ReleaseQueue>>,
    /// Descriptors that came with replies (Unix only), oldest first: the n-th belongs to
    /// the n-th `Descriptor` reply read (see `maru_transport::fds`).
    pub(super) fds: VecDeque<OwnedFd>,
    /// Set once a `Descriptor` request went out: from then on every read keeps descriptors.
    pub(super) fd_reads: bool,
}

impl PooledConn {
    pub(super) fn open(
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

    pub(super) fn over(stream: Stream) -> PooledConn {
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
            q.encode_pending(&mut self.tx, crate::uses::IN_FRONT);
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

    /// Tells the server the next request on this connection comes in about `in_time` (`Ahead`,
    /// answered with nothing). A failed write shows in the next request's.
    pub fn tell_ahead(&mut self, in_time: Duration) {
        self.tx.clear();
        if encode_request(&mut self.tx, 0, &super::ahead(in_time)).is_ok() {
            let _ = self.stream.write_all(&self.tx);
        }
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
    pub(super) fn next_reply(
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
pub(super) struct Sent {
    pub at: Instant,
    pub frame_len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wait::{NoHook, ReplyClock};
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
}
