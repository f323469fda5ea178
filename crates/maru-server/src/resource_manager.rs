//! The server's view of the resource manager: allocate, free, list, stats. Behind a small
//! trait so the request logic neither knows nor cares how regions are obtained (unit tests use
//! an in-memory source; the daemon talks to a real resource manager).

use std::sync::Mutex;
use std::time::Duration;

use maru_proto::stats::RmStats;
use maru_proto::{Access, ErrorCode, Handle, RegionInfo, Role, ServerUrl, WireError};
use maru_resource_manager::{RmClient, RmClientError};

/// Why a resource-manager call failed.
#[derive(Debug, thiserror::Error)]
pub enum RmCallError {
    /// No answer: not running, unreachable, or the connection broke.
    #[error("resource manager at {url} is unreachable: {source}")]
    Unreachable { url: String, source: RmClientError },
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
    /// Every region the resource manager has allocated to this source's owner identity (this
    /// process), whether or not the server knows about it.
    fn list_owned(&self) -> Result<Vec<Handle>, RmCallError>;
    /// How to map a region this owner holds (a restarted server describes the regions its
    /// key index names).
    fn access(&self, handle: &Handle) -> Result<Access, RmCallError>;
    /// Keeps the connection warm (and notices a lost one early).
    fn ping(&self) -> Result<(), RmCallError> {
        self.stats().map(|_| ())
    }
}

/// A resource manager reached over its wire protocol, through one lazily (re)connected
/// [`maru_resource_manager::RmClient`]. The server connects as [`Role::Server`]: it is the
/// resource-manager-level owner of every region it hands out, so if this server dies the
/// resource manager's reaper takes them all back.
///
/// The owner identity is the process (host, pid, start time): one metadata server per process
/// and resource manager, since [`RegionSource::list_owned`] cannot tell two apart. A server
/// with a lasting key index also presents a durable identity ([`durable_identity`]): when
/// the process dies the resource manager keeps its regions for its server grace, and the
/// next process presenting the identity adopts them at its first connection.
pub(crate) struct RemoteRm {
    url: ServerUrl,
    timeout: Duration,
    /// This process's identity, as every connection's Hello gives it.
    me: (String, u32, u64),
    /// The cluster secret, when this server has one (see [`RemoteRm::with_secret`]).
    secret: Option<maru_transport::auth::ClusterSecret>,
    /// The durable identity (see [`RemoteRm::with_identity`]).
    server_id: Option<[u8; maru_proto::SESSION_TOKEN_LEN]>,
    /// One connection, used by one call at a time. Region requests are rare next to key
    /// operations (a region holds many chunks) and never hold any lock a lookup needs, so a
    /// pool of connections would buy nothing measurable.
    conn: Mutex<Option<RmClient>>,
}

impl RemoteRm {
    pub fn new(url: ServerUrl, timeout: Duration) -> Self {
        RemoteRm {
            url,
            timeout,
            secret: None,
            server_id: None,
            me: maru_transport::local_identity(),
            conn: Mutex::new(None),
        }
    }

    /// Proves this server holds the cluster secret when it reaches the resource manager
    /// over TCP.
    pub fn with_secret(mut self, secret: Option<maru_transport::auth::ClusterSecret>) -> Self {
        self.secret = secret;
        self
    }

    /// Presents `id` as this server's durable identity in every Hello.
    pub fn with_identity(mut self, id: Option<[u8; maru_proto::SESSION_TOKEN_LEN]>) -> Self {
        self.server_id = id;
        self
    }

    fn unreachable(&self, source: RmClientError) -> RmCallError {
        RmCallError::Unreachable {
            url: self.url.to_string(),
            source,
        }
    }

    /// Runs `f` on a connected client, connecting first if needed. A transport failure drops
    /// the connection (the next call reconnects); a typed refusal keeps it.
    ///
    /// A connection that sat idle may have been closed by the other side (the resource
    /// manager restarted). Before a request that must not be repeated (`idempotent` false:
    /// an allocation) a reused connection is checked for that, without a round trip, and
    /// replaced if closed; the request is then sent once, whatever happens — a closed
    /// connection afterwards does not tell whether it was carried out (the reply may be what
    /// was lost), and the caller reconciles. An idempotent request that finds a reused
    /// connection closed or reset is sent once more on a fresh connection. A timeout is never
    /// retried.
    fn with_client<T>(
        &self,
        idempotent: bool,
        mut f: impl FnMut(&mut RmClient) -> Result<T, RmClientError>,
    ) -> Result<T, RmCallError> {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if !idempotent && guard.as_mut().is_some_and(|c| !quiet(c)) {
            tracing::debug!("resource manager connection was closed by its peer; reconnecting");
            *guard = None;
        }
        let mut reused = guard.is_some();
        loop {
            let client = match guard.as_mut() {
                Some(c) => c,
                None => {
                    let c = match &self.server_id {
                        Some(id) => RmClient::connect_server(
                            &self.url,
                            id,
                            self.timeout,
                            self.secret.as_ref(),
                        ),
                        None => RmClient::connect_with(
                            &self.url,
                            Role::Server,
                            self.timeout,
                            self.secret.as_ref(),
                        ),
                    };
                    match c {
                        Ok(c) => guard.insert(c),
                        // A refused Hello (a live process holds the identity, no proof to
                        // adopt) is the resource manager's answer, not an outage.
                        Err(e) => {
                            return Err(match e.remote() {
                                Some(w) => RmCallError::Remote(w.clone()),
                                None => self.unreachable(e),
                            })
                        }
                    }
                }
            };
            let e = match f(client) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if let Some(w) = e.remote() {
                return Err(RmCallError::Remote(w.clone()));
            }
            *guard = None;
            if !(idempotent && reused && peer_went_away(&e)) {
                return Err(self.unreachable(e));
            }
            tracing::debug!("resource manager connection was stale ({e}); reconnecting");
            reused = false;
        }
    }
}

/// The durable identity of a server whose key index is at `index`: 16 random bytes in
/// `INDEX.server-id` (mode 0600), made at the first start. It names the server at the
/// resource manager across restarts; it proves nothing by itself (adopting needs the Unix
/// socket's kernel check or the cluster secret).
pub fn durable_identity(
    index: &std::path::Path,
) -> Result<[u8; maru_proto::SESSION_TOKEN_LEN], String> {
    let mut path = index.as_os_str().to_owned();
    path.push(".server-id");
    let path = std::path::PathBuf::from(path);
    let parse = |text: &str| -> Option<[u8; maru_proto::SESSION_TOKEN_LEN]> {
        let text = text.trim();
        let mut id = [0u8; maru_proto::SESSION_TOKEN_LEN];
        if text.len() != 2 * id.len() {
            return None;
        }
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(id)
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            return parse(&text).ok_or_else(|| {
                format!(
                    "server identity {}: not {} hex digits (remove it to make a new one; the \
                    resource manager then keeps the old one's regions only for its grace)",
                    path.display(),
                    2 * maru_proto::SESSION_TOKEN_LEN
                )
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("server identity {}: {e}", path.display())),
    }
    let mut id = [0u8; maru_proto::SESSION_TOKEN_LEN];
    getrandom::fill(&mut id).map_err(|e| format!("server identity: no randomness: {e}"))?;
    let text: String = id.iter().map(|b| format!("{b:02x}")).collect();
    crate::private_file::replace(&path, "server-id.tmp", text.as_bytes(), true)
        .map_err(|e| format!("server identity {}: {e}", path.display()))?;
    Ok(id)
}

/// Whether an idle connection is still usable: nothing to read (a closed or reset peer makes
/// it readable: end of file or an error), checked without blocking. A failed check counts as
/// not usable.
fn quiet(c: &mut RmClient) -> bool {
    use std::os::fd::AsRawFd;
    let fd = c.conn_mut().stream_mut().as_raw_fd();
    matches!(maru_transport::busy::readable_now(fd), Ok(false))
}

/// Whether a call failed because the peer had closed the connection before answering.
fn peer_went_away(e: &RmClientError) -> bool {
    matches!(e, RmClientError::Transport(t) if t.peer_went_away())
}

impl RegionSource for RemoteRm {
    fn alloc(&self, size: u64, pool: Option<&str>) -> Result<RegionInfo, RmCallError> {
        let handle = self.with_client(false, |c| c.alloc(size, pool))?;
        match self.with_client(true, |c| c.get_access(&handle)) {
            Ok(access) => Ok(RegionInfo { handle, access }),
            Err(e) => {
                // Do not leak a region we cannot describe (should this free fail too, the
                // caller's reconcile finds the region).
                let _ = self.free(&handle);
                Err(e)
            }
        }
    }

    /// Idempotent: a free carried out twice is answered `DoubleFree` the second time.
    fn free(&self, handle: &Handle) -> Result<(), RmCallError> {
        self.with_client(true, |c| c.free(handle))
    }

    fn stats(&self) -> Result<RmStats, RmCallError> {
        self.with_client(true, |c| c.stats())
    }

    fn list_owned(&self) -> Result<Vec<Handle>, RmCallError> {
        let (host, pid, start_time) = &self.me;
        let owner = format!("{host}:{pid}");
        let all = self.with_client(true, |c| c.list())?;
        Ok(all
            .into_iter()
            .filter(|a| {
                a.handle.owner == owner
                    && a.owner_host == *host
                    && a.owner_pid == *pid
                    // 0: unknown (the resource manager could not read it); host and pid
                    // decide then.
                    && (a.owner_start_time == *start_time
                        || a.owner_start_time == 0
                        || *start_time == 0)
            })
            .map(|a| a.handle)
            .collect())
    }

    fn access(&self, handle: &Handle) -> Result<Access, RmCallError> {
        self.with_client(true, |c| c.get_access(handle))
    }

    fn ping(&self) -> Result<(), RmCallError> {
        self.with_client(true, |c| c.heartbeat())
    }
}
