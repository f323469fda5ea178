use std::io;

use maru_proto::{DecodeError, EncodeError};

use crate::FrameReadError;

/// Why an exchange with a peer failed short of an answer: the connection, the clock or the
/// bytes. A peer's typed refusal ([`maru_proto::WireError`]) is an answer, not one of these.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
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
    /// The request breaks a protocol limit; nothing was sent.
    #[error("request not sent: {0}")]
    Encode(#[from] EncodeError),
    #[error("reply to request {got} while waiting for {expected}")]
    Mismatch { expected: u64, got: u64 },
    /// A well-formed reply of the wrong type.
    #[error("unexpected reply {0}")]
    Unexpected(String),
}

impl TransportError {
    /// Whether the peer had closed or reset the connection: the same request may succeed on
    /// a fresh one.
    pub fn peer_went_away(&self) -> bool {
        use io::ErrorKind::*;
        match self {
            TransportError::Closed => true,
            TransportError::Io(e) => matches!(
                e.kind(),
                BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof
            ),
            _ => false,
        }
    }
}

impl From<FrameReadError> for TransportError {
    fn from(e: FrameReadError) -> Self {
        match e {
            FrameReadError::Closed => TransportError::Closed,
            FrameReadError::Idle | FrameReadError::Stalled => TransportError::Timeout,
            FrameReadError::Decode(d) => TransportError::Decode(d),
            FrameReadError::Io(e) => TransportError::Io(e),
        }
    }
}
