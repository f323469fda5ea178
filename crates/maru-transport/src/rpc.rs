//! A simple blocking request/reply connection: handshake, then one call at a time. Used by
//! the metadata server to reach the resource manager, by operator tools and by tests. The
//! client library has its own pipelined, GIL-aware connection built on the same codec.

use std::io::{self, Write};
use std::time::Duration;

use maru_proto::{
    decode_response, encode_request, DecodeError, EncodeError, ErrorCode, Hello, HelloOk, Request,
    Response, Role, ServerUrl, WireError,
};

use crate::{local_identity, FrameBuf, FrameReadError, Stream, TransportError};

/// Why a call failed: the exchange itself, or the peer's typed refusal.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The peer answered with a typed error.
    #[error(transparent)]
    Remote(#[from] WireError),
}

impl CallError {
    /// The remote error code, if the peer answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        self.remote().map(|e| e.code)
    }

    /// The peer's typed error, if it answered with one.
    pub fn remote(&self) -> Option<&WireError> {
        match self {
            CallError::Remote(e) => Some(e),
            CallError::Transport(_) => None,
        }
    }
}

impl From<io::Error> for CallError {
    fn from(e: io::Error) -> Self {
        CallError::Transport(e.into())
    }
}

impl From<EncodeError> for CallError {
    fn from(e: EncodeError) -> Self {
        CallError::Transport(e.into())
    }
}

impl From<DecodeError> for CallError {
    fn from(e: DecodeError) -> Self {
        CallError::Transport(e.into())
    }
}

impl From<FrameReadError> for CallError {
    fn from(e: FrameReadError) -> Self {
        CallError::Transport(e.into())
    }
}

/// A handshaken connection.
pub struct BlockingConn {
    stream: Stream,
    rx: FrameBuf,
    tx: Vec<u8>,
    next_id: u64,
    hello: HelloOk,
    url: ServerUrl,
}

impl BlockingConn {
    /// Connects, sends `hello` and waits for its answer. `timeout` bounds the connect and
    /// every later reply.
    pub fn connect(
        url: &ServerUrl,
        hello: &Hello,
        timeout: Duration,
    ) -> Result<BlockingConn, CallError> {
        Self::connect_with(url, hello, timeout, None)
    }

    /// [`BlockingConn::connect`], proving first that this side holds the cluster secret
    /// when `secret` is given and the connection is TCP ([`Stream::connect_with`]).
    pub fn connect_with(
        url: &ServerUrl,
        hello: &Hello,
        timeout: Duration,
        secret: Option<&crate::auth::ClusterSecret>,
    ) -> Result<BlockingConn, CallError> {
        let stream = Stream::connect_with(url, timeout, secret).map_err(|source| {
            TransportError::Connect {
                url: url.to_string(),
                source,
            }
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut rx = FrameBuf::new();
        rx.max_stall = timeout;
        let mut conn = BlockingConn {
            stream,
            rx,
            tx: Vec::new(),
            next_id: 1,
            hello: HelloOk {
                server: String::new(),
                hostname: String::new(),
                session_token: [0; 16],
                index: None,
            },
            url: url.clone(),
        };
        match conn.call(&Request::Hello(hello.clone()))? {
            Response::HelloOk(ok) => conn.hello = ok,
            other => return Err(TransportError::Unexpected(format!("{other:?}")).into()),
        }
        Ok(conn)
    }

    /// Connects as an administrator (read-only requests such as statistics and region
    /// tables; no session) with this process's identity.
    pub fn connect_admin(url: &ServerUrl, timeout: Duration) -> Result<BlockingConn, CallError> {
        let (host, pid, start_time) = local_identity();
        let hello = Hello::sessionless(Role::Admin, &host, pid, start_time);
        BlockingConn::connect(url, &hello, timeout)
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
        // Request id 0 carries a refusal of the connection itself (a bad header, a missing
        // cluster secret): the daemon closes it after this frame.
        if header.request_id == 0 {
            if let Ok(Response::Error(e)) = decode_response(&header, payload) {
                return Err(CallError::Remote(e));
            }
        }
        if header.request_id != id {
            return Err(TransportError::Mismatch {
                expected: id,
                got: header.request_id,
            }
            .into());
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
