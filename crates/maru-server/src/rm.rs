//! The server's view of the resource manager: allocate, free, stats. Behind a small trait so
//! the request logic neither knows nor cares how regions are obtained (unit tests use an
//! in-memory source; the daemon talks to a real resource manager).

use std::sync::Mutex;
use std::time::Duration;

use maru_proto::rpc::{self, CallError, Conn};
use maru_proto::stats::RmStats;
use maru_proto::{
    ErrorCode, Handle, Hello, RegionInfo, Request, Response, Role, ServerUrl, WireError,
};

/// Why a resource-manager call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RmCallError {
    /// No answer: not running, unreachable, or the connection broke.
    #[error("resource manager at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    /// The resource manager answered with a typed error (pool exhausted, bad token, ...).
    #[error("resource manager refused: {0}")]
    Remote(WireError),
}

impl RmCallError {
    /// The error a client of the metadata server gets for it.
    pub fn to_wire(&self) -> WireError {
        match self {
            RmCallError::Unreachable { .. } => {
                WireError::new(ErrorCode::Unavailable, self.to_string())
            }
            RmCallError::Remote(e) => e.clone(),
        }
    }

    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            RmCallError::Remote(e) => Some(e.code),
            RmCallError::Unreachable { .. } => None,
        }
    }
}

/// Where regions come from.
pub(crate) trait RegionSource: Send + Sync {
    /// A new region of `size` bytes, from `pool` or any pool, with its access information.
    fn alloc(&self, size: u64, pool: Option<&str>) -> Result<RegionInfo, RmCallError>;
    fn free(&self, handle: &Handle) -> Result<(), RmCallError>;
    fn stats(&self) -> Result<RmStats, RmCallError>;
}

/// A resource manager reached over its wire protocol, through one lazily (re)connected
/// connection. The server connects as [`maru_proto::Role::Server`]: it is the
/// resource-manager-level owner of every region it hands out, so if this server dies the
/// resource manager's reaper takes them all back.
pub(crate) struct RemoteRm {
    url: ServerUrl,
    timeout: Duration,
    /// One connection, used by one call at a time. Region requests are rare next to key
    /// operations (a region holds many chunks) and never hold any lock a lookup needs, so a
    /// pool of connections would buy nothing measurable.
    conn: Mutex<Option<Conn>>,
}

impl RemoteRm {
    pub fn new(url: ServerUrl, timeout: Duration) -> Self {
        RemoteRm {
            url,
            timeout,
            conn: Mutex::new(None),
        }
    }

    fn unreachable(&self, reason: impl ToString) -> RmCallError {
        RmCallError::Unreachable {
            url: self.url.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Sends one request, connecting first if needed. A transport failure drops the
    /// connection (the next call reconnects); a typed refusal keeps it.
    fn call(&self, req: &Request) -> Result<Response, RmCallError> {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let conn = match guard.as_mut() {
            Some(c) => c,
            None => {
                let (host, pid, start_time) = rpc::local_identity();
                let hello = Hello {
                    role: Role::Server,
                    instance_id: "maru-server",
                    host: &host,
                    pid,
                    start_time,
                    session_token: None,
                };
                let c = Conn::connect(&self.url, &hello, self.timeout)
                    .map_err(|e| self.unreachable(e))?;
                guard.insert(c)
            }
        };
        match conn.call(req) {
            Ok(resp) => Ok(resp),
            Err(CallError::Remote(w)) => Err(RmCallError::Remote(w)),
            Err(e) => {
                *guard = None;
                Err(self.unreachable(e))
            }
        }
    }

    fn unexpected(&self, what: &str, got: Response) -> RmCallError {
        self.unreachable(format!("unexpected reply to {what}: {got:?}"))
    }
}

impl RegionSource for RemoteRm {
    fn alloc(&self, size: u64, pool: Option<&str>) -> Result<RegionInfo, RmCallError> {
        let handle = match self.call(&Request::RmAlloc { size, pool })? {
            Response::Handle(h) => h,
            other => return Err(self.unexpected("alloc", other)),
        };
        let access = self.call(&Request::RmGetAccess {
            handle: handle.clone(),
        });
        match access {
            Ok(Response::Access(access)) => Ok(RegionInfo { handle, access }),
            other => {
                // Do not leak a region we cannot describe.
                let _ = self.free(&handle);
                Err(match other {
                    Err(e) => e,
                    Ok(resp) => self.unexpected("get_access", resp),
                })
            }
        }
    }

    fn free(&self, handle: &Handle) -> Result<(), RmCallError> {
        match self.call(&Request::RmFree {
            handle: handle.clone(),
        })? {
            Response::Ok => Ok(()),
            other => Err(self.unexpected("free", other)),
        }
    }

    fn stats(&self) -> Result<RmStats, RmCallError> {
        match self.call(&Request::RmStats)? {
            Response::RmStats(json) => serde_json::from_str(&json)
                .map_err(|e| self.unreachable(format!("unreadable stats: {e}"))),
            other => Err(self.unexpected("stats", other)),
        }
    }
}
