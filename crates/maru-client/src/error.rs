//! Typed errors, one enum per operation family, each with an [`ErrorKind`] that bindings map
//! to their own exception types (the Python package maps them to RuntimeError, ValueError,
//! TimeoutError and `maru.MaruError`).

use std::io;
use std::time::Duration;

use maru_proto::{DecodeError, EncodeError, ErrorCode, WireError, MAX_KEY_LEN};
use maru_shm::ShmError;

/// What kind of failure an error is, independent of the operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The handler is not connected, or closed.
    State,
    /// The caller passed something unusable (size above the chunk size, bad key, unknown page).
    InvalidArgument,
    /// No page is free and the handler may not (or could not) get another region.
    Exhausted,
    /// The server did not answer within `timeout_ms`.
    Timeout,
    /// The server answered with a typed error.
    Remote(ErrorCode),
    /// The connection failed or was lost (also: the server was lost earlier, see
    /// [`StateError::ServerLost`]).
    Transport,
    /// The server's reply made no sense (wrong type, out-of-range location).
    Protocol,
    /// A region could not be mapped.
    Map,
}

/// Why a round trip to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: io::Error },
    #[error("no reply from the server to {op} within {} ms", .after.as_millis())]
    Timeout { op: &'static str, after: Duration },
    #[error("the server did not take the {op} request within {} ms", .after.as_millis())]
    SendTimeout { op: &'static str, after: Duration },
    #[error("connection to the server lost during {op}: {source}")]
    Io { op: &'static str, source: io::Error },
    #[error("the server closed the connection during {op}")]
    Closed { op: &'static str },
    #[error("bad reply to {op}: {source}")]
    Decode {
        op: &'static str,
        source: DecodeError,
    },
    #[error("request not sent: {0}")]
    Encode(#[from] EncodeError),
    #[error("reply to request {got} while waiting for {expected}")]
    Mismatch { expected: u64, got: u64 },
    #[error("server refused {op}: {source}")]
    Remote { op: &'static str, source: WireError },
    #[error("unexpected reply to {op}: {got}")]
    Unexpected { op: &'static str, got: String },
}

impl RpcError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RpcError::Timeout { .. } | RpcError::SendTimeout { .. } => ErrorKind::Timeout,
            RpcError::Connect { .. } | RpcError::Io { .. } | RpcError::Closed { .. } => {
                ErrorKind::Transport
            }
            RpcError::Remote { source, .. } => ErrorKind::Remote(source.code),
            RpcError::Encode(_) => ErrorKind::InvalidArgument,
            RpcError::Decode { .. } | RpcError::Mismatch { .. } | RpcError::Unexpected { .. } => {
                ErrorKind::Protocol
            }
        }
    }

    /// The server's error code, if it answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            RpcError::Remote { source, .. } => Some(source.code),
            _ => None,
        }
    }

    /// Whether the connection it happened on can still be used: after a typed error reply,
    /// or a timeout waiting for one (the request went out whole; its late reply is skipped).
    pub(crate) fn keeps_connection(&self) -> bool {
        matches!(
            self,
            RpcError::Remote { .. } | RpcError::Encode(_) | RpcError::Timeout { .. }
        )
    }

    /// Whether the error shows the session gone: the server closed or reset the connection
    /// (it died or shut down), or it says the session ended.
    pub(crate) fn means_session_lost(&self) -> bool {
        match self {
            RpcError::Closed { .. } => true,
            RpcError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::NotConnected
                    | io::ErrorKind::UnexpectedEof
            ),
            RpcError::Remote { source, .. } => source.code == ErrorCode::SessionConflict,
            _ => false,
        }
    }

    /// Whether the request certainly had no effect at the server (it refused it, or it was
    /// never sent). After a timeout or a lost connection the server may still have applied
    /// it, so a page sent for registration must not be reused.
    pub fn surely_not_applied(&self) -> bool {
        matches!(
            self,
            RpcError::Remote { .. } | RpcError::Encode(_) | RpcError::Connect { .. }
        )
    }
}

/// The handler is in no state to run an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("MaruHandler is not connected; call connect() first{}", .last_error.as_ref().map(|e| format!(" (last connect failed: {e})")).unwrap_or_default())]
    NotConnected { last_error: Option<String> },
    #[error("MaruHandler is closed")]
    Closed,
    /// The metadata server died or shut down (or ended the session). The handler's owned
    /// regions were detached from the pool: views still read, writes through them stay
    /// private. Only a new handler can go on.
    #[error(
        "the metadata server connection was lost and this session with it; close() and \
         reconnect with a new handler"
    )]
    ServerLost,
}

impl StateError {
    /// [`ErrorKind::Transport`] for a lost server, else [`ErrorKind::State`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            StateError::ServerLost => ErrorKind::Transport,
            StateError::NotConnected { .. } | StateError::Closed => ErrorKind::State,
        }
    }
}

/// A key the protocol cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("empty key")]
    Empty,
    #[error("key of {len} bytes exceeds the limit of {max}")]
    TooLong { len: usize, max: usize },
}

pub(crate) fn check_key(key: &[u8]) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong {
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    Ok(())
}

/// Why `connect` failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("cannot map region {region_id}: {source}")]
    Map { region_id: u64, source: ShmError },
    #[error("unusable region from the server: {0}")]
    BadRegion(String),
}

impl ConnectError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ConnectError::State(e) => e.kind(),
            ConnectError::Rpc(e) => e.kind(),
            ConnectError::Map { .. } => ErrorKind::Map,
            ConnectError::BadRegion(_) => ErrorKind::Protocol,
        }
    }
}

/// Why `alloc` failed.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("requested size {size} exceeds chunk_size {chunk}")]
    TooLarge { size: u64, chunk: u64 },
    #[error("cannot allocate a page: pool exhausted and auto_expand is disabled")]
    Exhausted,
    #[error("cannot allocate a page: pool exhausted and expansion failed: {0}")]
    Expand(RpcError),
    #[error("cannot allocate a page: expansion region {region_id} cannot be mapped: {source}")]
    Map { region_id: u64, source: ShmError },
    #[error("cannot allocate a page: unusable expansion region: {0}")]
    BadRegion(String),
}

impl AllocError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            AllocError::State(e) => e.kind(),
            AllocError::TooLarge { .. } => ErrorKind::InvalidArgument,
            AllocError::Exhausted => ErrorKind::Exhausted,
            AllocError::Expand(e) => match e.kind() {
                // The server had no room either: the pool is exhausted.
                ErrorKind::Remote(ErrorCode::PoolExhausted) => ErrorKind::Exhausted,
                k => k,
            },
            AllocError::Map { .. } => ErrorKind::Map,
            AllocError::BadRegion(_) => ErrorKind::Protocol,
        }
    }
}

/// Why `free` failed.
#[derive(Debug, thiserror::Error)]
pub enum FreeError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("page {page_index} of region {region_id} is not tracked (already freed or not from alloc())")]
    NotTracked { region_id: u64, page_index: u64 },
    #[error("page {page_index} of region {region_id} holds a pinned key; unpin it first")]
    Pinned { region_id: u64, page_index: u64 },
    #[error(transparent)]
    Rpc(#[from] RpcError),
}

impl FreeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            FreeError::State(e) => e.kind(),
            FreeError::NotTracked { .. } | FreeError::Pinned { .. } => ErrorKind::InvalidArgument,
            FreeError::Rpc(e) => e.kind(),
        }
    }
}

/// Why `store` (or `batch_store`) failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("data of {size} bytes exceeds chunk_size {chunk}")]
    TooLarge { size: u64, chunk: u64 },
    #[error("page {page_index} of region {region_id} is not an allocated page of this handler")]
    NotTracked { region_id: u64, page_index: u64 },
    #[error("page {page_index} of region {region_id} is already stored under another key")]
    AlreadyStored { region_id: u64, page_index: u64 },
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("{0}")]
    Invalid(String),
    /// Write-behind registrations that failed after their `store` had returned (reported by
    /// `flush`): `failed` of them, the first one's error in `first`.
    #[error("{failed} write-behind store(s) failed; the first: {first}")]
    Deferred {
        failed: u64,
        first: String,
        first_kind: ErrorKind,
    },
}

impl StoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::State(e) => e.kind(),
            StoreError::Key(_)
            | StoreError::TooLarge { .. }
            | StoreError::NotTracked { .. }
            | StoreError::AlreadyStored { .. }
            | StoreError::Invalid(_) => ErrorKind::InvalidArgument,
            StoreError::Alloc(e) => e.kind(),
            StoreError::Rpc(e) => e.kind(),
            StoreError::Deferred { first_kind, .. } => *first_kind,
        }
    }
}

/// Why `retrieve` (or `batch_retrieve`) failed.
#[derive(Debug, thiserror::Error)]
pub enum RetrieveError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("cannot map region {region_id}: {source}")]
    Map { region_id: u64, source: ShmError },
    #[error("the server returned an unusable location: {0}")]
    BadLocation(String),
}

impl RetrieveError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RetrieveError::State(e) => e.kind(),
            RetrieveError::Key(_) => ErrorKind::InvalidArgument,
            RetrieveError::Rpc(e) => e.kind(),
            RetrieveError::Map { .. } => ErrorKind::Map,
            RetrieveError::BadLocation(_) => ErrorKind::Protocol,
        }
    }
}

/// Why a metadata operation (exists, delete, pin, unpin, stats, …) failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("bad reply: {0}")]
    BadReply(String),
}

impl OpError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            OpError::State(e) => e.kind(),
            OpError::Key(_) => ErrorKind::InvalidArgument,
            OpError::Rpc(e) => e.kind(),
            OpError::BadReply(_) => ErrorKind::Protocol,
        }
    }
}
