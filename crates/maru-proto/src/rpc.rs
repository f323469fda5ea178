//! A simple blocking request/reply connection: handshake, then one call at a time. Used by
//! the metadata server to reach the resource manager, by operator tools and by tests. The
//! client library has its own pipelined, GIL-aware connection built on the same codec.

use std::io::{self, Write};
use std::time::Duration;

use crate::{
    decode_response, encode_request, DecodeError, EncodeError, ErrorCode, FrameBuf, FrameReadError,
    Hello, HelloOk, Request, Response, Role, ServerUrl, Stream, WireError,
};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: io::Error },
    #[error("connection lost: {0}")]
    Io(#[from] io::Error),
    #[error("timed out waiting for a reply")]
    Timeout,
    #[error("peer closed the connection")]
    Closed,
    #[error("bad reply: {0}")]
    Decode(#[from] DecodeError),
    #[error("request not sent: {0}")]
    Encode(#[from] EncodeError),
    #[error("reply to request {got} while waiting for {expected}")]
    Mismatch { expected: u64, got: u64 },
    /// The peer answered with a typed error.
    #[error(transparent)]
    Remote(#[from] WireError),
    #[error("unexpected reply {0}")]
    Unexpected(String),
}

impl CallError {
    /// The remote error code, if the peer answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            CallError::Remote(e) => Some(e.code),
            _ => None,
        }
    }
}

impl From<FrameReadError> for CallError {
    fn from(e: FrameReadError) -> Self {
        match e {
            FrameReadError::Closed => CallError::Closed,
            FrameReadError::Idle | FrameReadError::Stalled => CallError::Timeout,
            FrameReadError::Decode(d) => CallError::Decode(d),
            FrameReadError::Io(e) => CallError::Io(e),
        }
    }
}

/// A handshaken connection.
pub struct Conn {
    stream: Stream,
    rx: FrameBuf,
    tx: Vec<u8>,
    next_id: u64,
    hello: HelloOk,
    url: ServerUrl,
}

impl Conn {
    /// Connects, sends `hello` and waits for its answer. `timeout` bounds the connect and
    /// every later reply.
    pub fn connect(url: &ServerUrl, hello: &Hello, timeout: Duration) -> Result<Conn, CallError> {
        let stream = Stream::connect(url, timeout).map_err(|source| CallError::Connect {
            url: url.to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut rx = FrameBuf::new();
        rx.max_stall = timeout;
        let mut conn = Conn {
            stream,
            rx,
            tx: Vec::new(),
            next_id: 1,
            hello: HelloOk {
                server: String::new(),
                hostname: String::new(),
                session_token: [0; 16],
            },
            url: url.clone(),
        };
        match conn.call(&Request::Hello(hello.clone()))? {
            Response::HelloOk(ok) => conn.hello = ok,
            other => return Err(CallError::Unexpected(format!("{other:?}"))),
        }
        Ok(conn)
    }

    /// Connects as an administrator (read-only requests such as statistics and region
    /// tables; no session) with this process's identity.
    pub fn connect_admin(url: &ServerUrl, timeout: Duration) -> Result<Conn, CallError> {
        let (host, pid, start_time) = local_identity();
        let hello = Hello {
            role: Role::Admin,
            instance_id: "",
            host: &host,
            pid,
            start_time,
            session_token: None,
        };
        Conn::connect(url, &hello, timeout)
    }

    /// What the peer said at the handshake.
    pub fn peer(&self) -> &HelloOk {
        &self.hello
    }

    pub fn url(&self) -> &ServerUrl {
        &self.url
    }

    /// Sends a request and waits for its reply. An error reply becomes
    /// [`CallError::Remote`].
    pub fn call(&mut self, req: &Request) -> Result<Response, CallError> {
        let id = self.next_id;
        self.next_id += 1;
        self.tx.clear();
        encode_request(&mut self.tx, id, req)?;
        self.stream.write_all(&self.tx)?;
        let (header, payload) = self.rx.read_frame(&mut self.stream)?;
        if header.request_id != id {
            return Err(CallError::Mismatch {
                expected: id,
                got: header.request_id,
            });
        }
        match decode_response(&header, payload)? {
            Response::Error(e) => Err(CallError::Remote(e)),
            other => Ok(other),
        }
    }

    /// The underlying stream (for tests that misbehave on purpose).
    pub fn stream_mut(&mut self) -> &mut Stream {
        &mut self.stream
    }
}

/// This process's identity for a [`Hello`]: hostname, pid and start time.
pub fn local_identity() -> (String, u32, u64) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    let pid = std::process::id();
    (host, pid, process_start_time(pid).unwrap_or(0))
}

/// Start time of `pid` in clock ticks since boot (`/proc/PID/stat` field 22), `None` when the
/// process does not exist. Pid reuse gives the same pid a different start time.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: skip past it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}
