use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use maru_proto::{ErrorCode, WireError};
use maru_transport::{CallError, TransportError};

use crate::checkpoint::CheckpointError;
use crate::wal::WalError;

/// Why a resource manager did not start. Every variant says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum RmError {
    #[error(
        "no memory pool: none was given and no DEV_DAX device or FS_DAX mount was found; \
         add a shm pool, e.g. --pool shm:/dev/shm/maru/pool0:8G"
    )]
    NoPool,
    #[error("cannot open pool {spec}: {source}")]
    Pool {
        spec: String,
        source: maru_shm::PoolError,
    },
    #[error("pool {path}: {reason}")]
    PoolHeader { path: String, reason: String },
    #[error("state directory {path}: {source}")]
    StateDir { path: PathBuf, source: io::Error },
    #[error(
        "state directory {path} is in use by another resource manager (its lock file is held)"
    )]
    Locked { path: PathBuf },
    #[error(
        "checkpoint {path} is corrupt ({source}); refusing to start rather than lose the \
         allocation table. Restore it from a backup, or move the state directory away to \
         start empty (every region handed out before is then forgotten)"
    )]
    CorruptCheckpoint {
        path: PathBuf,
        source: CheckpointError,
    },
    #[error("{path}: {source}")]
    CorruptWal { path: PathBuf, source: WalError },
    #[error(
        "state in {path} is inconsistent: {reason}; refusing to start (fix the --pool flags \
         if a pool is missing, otherwise restore the state directory from a backup)"
    )]
    Inconsistent { path: PathBuf, reason: String },
    #[error(
        "{allocations} allocations exist but the secret {path} is missing: their handles could \
         no longer be verified. Restore the secret file, or move the state directory away to \
         start empty"
    )]
    SecretMissing { path: PathBuf, allocations: usize },
    #[error("secret {path}: {source}")]
    Secret { path: PathBuf, source: io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot listen on the Unix socket {path}: {source}")]
    BindUnix { path: PathBuf, source: io::Error },
    #[error("cannot start a thread: {0}")]
    Thread(io::Error),
    #[error("{0}")]
    Auth(String),
}

/// Why a [`crate::RmClient`] call failed.
#[derive(Debug, thiserror::Error)]
pub enum RmClientError {
    /// No answer: the connection failed, broke or timed out, or the reply made no sense.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A typed refusal from the resource manager ([`Self::code`]).
    #[error(transparent)]
    Remote(#[from] WireError),
    #[error("resource manager sent an invalid stats document: {0}")]
    BadStats(String),
}

impl RmClientError {
    /// The resource manager's error code, when it answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        self.remote().map(|e| e.code)
    }

    /// The resource manager's typed error, when it answered with one.
    pub fn remote(&self) -> Option<&WireError> {
        match self {
            RmClientError::Remote(e) => Some(e),
            _ => None,
        }
    }
}

impl From<CallError> for RmClientError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Transport(t) => RmClientError::Transport(t),
            CallError::Remote(w) => RmClientError::Remote(w),
        }
    }
}
