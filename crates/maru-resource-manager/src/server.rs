//! Connections: a blocking thread per connection (few peers — metadata servers and tools —
//! and the lowest latency per round trip, see FACTS.md), bounded by `max_clients`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use maru_proto::stats::RmStats;
use maru_proto::{
    decode_request, encode_error, encode_response, request_name, ErrorCode, Header, HelloOk,
    Request, Response, RmAllocation, Role, WireError, HEADER_LEN, RM_REQUESTS,
};
use maru_telemetry::OpTable;
use maru_transport::{FrameBuf, FrameReadError, Stream};

use crate::identity::{self, Caller};
use crate::manager::Manager;
use crate::wal::{Owner, ServerId};

/// How often a blocked read wakes up to look at the shutdown flag.
const POLL: Duration = Duration::from_millis(500);
/// A peer that does not read its replies for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused connection (too many clients) may take to send its Hello.
const REJECT_DEADLINE: Duration = Duration::from_secs(1);
/// Refusals answered at once; beyond this, extra connections are closed without an answer.
const MAX_REJECTING: usize = 16;

/// Names of the operations in stats and metrics: the requests a resource manager answers,
/// and `invalid`, which counts frames that did not decode or asked for something a resource
/// manager does not serve.
pub(crate) fn op_names() -> Vec<&'static str> {
    RM_REQUESTS
        .iter()
        .map(|t| request_name(*t))
        .chain(["invalid"])
        .collect()
}

/// Whether an owner is connected, and since when it is not.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Presence {
    pub connections: usize,
    /// When the last connection closed (meaningless while `connections > 0`).
    pub since: Instant,
}

/// Everything the threads share.
pub(crate) struct Shared {
    pub manager: Mutex<Manager>,
    pub hostname: String,
    /// This process's effective uid: the one uid (besides root) the Unix socket serves.
    pub uid: u32,
    pub grace_period: Duration,
    /// See [`crate::RmConfig::server_grace`].
    pub server_grace: Duration,
    /// Dead owners bound to a server identity, and since when the reaper knows them dead
    /// (the grace runs from then; after a restart of the resource manager it starts over).
    pub server_dead_since: Mutex<HashMap<Owner, Instant>>,
    pub reap_interval: Duration,
    pub max_clients: usize,
    pub stall_timeout: Duration,
    /// How long a connection may stay without a completed Hello.
    pub handshake_timeout: Duration,
    /// See [`crate::RmConfig::dead_peer_after`].
    pub dead_peer_after: Duration,
    /// What TCP connections must prove before their first frame (`None`: nothing).
    pub tcp_auth: Option<maru_transport::auth::Acceptor>,
    /// Pools came from discovery, so SIGHUP rescans.
    pub discovered: bool,
    pub ops: OpTable,
    pub stop: AtomicBool,
    pub started: Instant,
    /// Keyed by (host, pid).
    pub presence: Mutex<HashMap<(String, u32), Presence>>,
    /// Open connections (clones of their sockets, to shut them down on stop).
    pub conns: Mutex<HashMap<u64, Stream>>,
    pub threads: Mutex<Vec<JoinHandle<()>>>,
    pub next_conn: AtomicU64,
    pub active: AtomicUsize,
    pub rejecting: AtomicUsize,
    pub reap_passes: AtomicU64,
    /// Wakes the reaper early (shutdown).
    pub reaper_wake: (Mutex<()>, Condvar),
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock is a bug elsewhere; the data (plain maps) stays usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn stats(&self) -> RmStats {
        let m = lock(&self.manager);
        let (count, bytes) = m
            .allocations()
            .fold((0u64, 0u64), |(n, b), a| (n + 1, b + a.len));
        RmStats {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pools: m.pool_stats(),
            allocations: count,
            allocated_bytes: bytes,
            connected_clients: self.active.load(Ordering::Relaxed) as u64,
            reclaimed_regions: m.reclaimed(),
            wal_seq: m.wal_seq(),
            ops: self.ops.snapshot(),
        }
    }

    pub fn list(&self) -> Vec<RmAllocation> {
        let m = lock(&self.manager);
        let presence = lock(&self.presence);
        m.list()
            .into_iter()
            .map(|(handle, a)| RmAllocation {
                handle,
                owner_host: a.owner.host.clone(),
                owner_pid: a.owner.pid,
                owner_start_time: a.owner.start_time,
                connected: presence
                    .get(&(a.owner.host.clone(), a.owner.pid))
                    .is_some_and(|p| p.connections > 0),
            })
            .collect()
    }

    fn spawn(
        self: &Arc<Self>,
        name: &str,
        f: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let t = std::thread::Builder::new().name(name.into()).spawn(f)?;
        let mut threads = lock(&self.threads);
        threads.retain(|t| !t.is_finished());
        threads.push(t);
        Ok(())
    }
}

/// A TCP connection as the accept loop takes it: set up for small messages and dead peers,
/// with what the kernel says about its other end.
pub(crate) fn accepted_tcp(shared: &Shared, stream: TcpStream) -> (Stream, Caller) {
    let _ = stream.set_nodelay(true);
    if let Err(e) = maru_transport::set_dead_peer_timeout(&stream, shared.dead_peer_after) {
        tracing::debug!("no dead-peer timeout on a connection: {e}");
    }
    let caller = Caller::of_tcp(&stream);
    (Stream::Tcp(stream), caller)
}

/// A Unix-socket connection with its peer's credentials (`None` when the kernel cannot
/// say: the connection is then closed).
pub(crate) fn accepted_unix(stream: std::os::unix::net::UnixStream) -> Option<(Stream, Caller)> {
    match maru_transport::unix_peer_cred(&stream) {
        Ok(cred) => Some((Stream::Unix(stream), Caller::Unix(cred))),
        Err(e) => {
            tracing::warn!("no credentials for a Unix-socket peer ({e}); closing");
            None
        }
    }
}

/// An accept loop (TCP or Unix: `accept` gives the next connection, `Ok(None)` for one to
/// skip); returns when `stop` is set (and the listener woken).
pub(crate) fn accept_loop(
    shared: Arc<Shared>,
    mut accept: impl FnMut(&Shared) -> std::io::Result<Option<(Stream, Caller)>>,
) {
    loop {
        let conn = accept(&shared);
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let (stream, caller) = match conn {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                // Out of descriptors or similar: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.active.fetch_add(1, Ordering::SeqCst) >= shared.max_clients {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            if shared.rejecting.fetch_add(1, Ordering::SeqCst) >= MAX_REJECTING {
                shared.rejecting.fetch_sub(1, Ordering::SeqCst);
                continue; // dropped: closed without an answer
            }
            let s2 = shared.clone();
            let spawned = shared.spawn("maru-rm-reject", move || {
                reject(stream, s2.max_clients);
                s2.rejecting.fetch_sub(1, Ordering::SeqCst);
            });
            if let Err(e) = spawned {
                shared.rejecting.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!("cannot start a thread: {e}");
            }
            continue;
        }
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        match stream.try_clone() {
            Ok(clone) => {
                lock(&shared.conns).insert(id, clone);
            }
            Err(e) => {
                tracing::warn!("cannot track a connection: {e}");
                shared.active.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
        }
        let s2 = shared.clone();
        let spawned = shared.spawn("maru-rm-conn", move || {
            serve(&s2, stream, caller);
            lock(&s2.conns).remove(&id);
            s2.active.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a connection thread: {e}");
            lock(&shared.conns).remove(&id);
            shared.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Answers the first request of a connection over the limit with `TooManyClients`, within a
/// bounded time whatever the peer does, and closes it.
fn reject(mut stream: Stream, max: usize) {
    let deadline = Instant::now() + REJECT_DEADLINE;
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = stream.set_write_timeout(Some(REJECT_DEADLINE));
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN && Instant::now() < deadline {
        match stream.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => continue,
        }
    }
    // Answer with the request id when the header arrived, else id 0.
    let id = if got == HEADER_LEN {
        Header::decode(&head).map(|h| h.request_id).unwrap_or(0)
    } else {
        0
    };
    stream.turn_away(
        id,
        format!("the resource manager serves at most {max} connections"),
    );
}

/// Per-connection state.
struct ConnState {
    owner: Option<Owner>,
    role: Role,
    caller: Caller,
    /// The durable identity of a metadata server that proved it may present one.
    server_id: Option<ServerId>,
}

/// Serves one connection until it closes, misbehaves beyond repair or the daemon stops.
fn serve(shared: &Arc<Shared>, mut stream: Stream, caller: Caller) {
    let hello_by = Instant::now() + shared.handshake_timeout;
    // A TCP peer proves it holds the cluster secret before its first frame; Unix-socket
    // peers are named by the kernel.
    if let (Some(auth), Stream::Tcp(tcp)) = (&shared.tcp_auth, &mut stream) {
        if let Err(e) = auth.accept(tcp, hello_by) {
            tracing::warn!("closing a TCP connection: {e}");
            let _ = stream.shutdown();
            return;
        }
    }
    let peer = match (&stream, &caller) {
        (Stream::Tcp(s), _) => s
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into()),
        (Stream::Unix(_), Caller::Unix(cred)) => format!("pid {} (uid {})", cred.pid, cred.uid),
        (Stream::Unix(_), _) => "unix peer".into(),
    };
    let _ = stream.set_read_timeout(Some(POLL));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut rx = FrameBuf::new();
    let mut tx = Vec::with_capacity(4096);
    let mut conn = ConnState {
        owner: None,
        role: Role::Admin,
        caller,
        server_id: None,
    };
    loop {
        // Until its Hello, a connection has a deadline (a silent one would hold its slot
        // for ever); a frame begun before it must be finished by it too.
        rx.max_stall = shared.stall_timeout;
        if conn.owner.is_none() {
            let left = hello_by.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    "{peer}: no hello within {:?}; closing",
                    shared.handshake_timeout
                );
                break;
            }
            rx.max_stall = rx.max_stall.min(left);
        }
        let (header, payload) = match rx.read_frame(&mut stream) {
            Ok(f) => f,
            Err(FrameReadError::Idle) => {
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                continue;
            }
            Err(FrameReadError::Closed) => break,
            Err(FrameReadError::Stalled) => {
                tracing::warn!("{peer}: stalled in the middle of a frame; closing");
                break;
            }
            Err(FrameReadError::Decode(e)) => {
                // The stream cannot be resynchronised after a bad header: answer and close.
                tracing::warn!("{peer}: bad frame header ({e}); closing");
                tx.clear();
                encode_error(&mut tx, 0, &WireError::new(e.code(), e.to_string()));
                let _ = stream.write_all(&tx);
                shared.ops.record("invalid", Duration::ZERO, false);
                break;
            }
            Err(FrameReadError::Io(e)) => {
                tracing::debug!("{peer}: {e}; closing");
                break;
            }
        };
        let t0 = Instant::now();
        tx.clear();
        let id = header.request_id;
        let (name, ok, close) = match decode_request(&header, payload) {
            Err(e) => {
                encode_error(&mut tx, id, &WireError::new(e.code(), e.to_string()));
                ("invalid", false, false)
            }
            Ok(req) => {
                let close = matches!(req, Request::Goodbye);
                let name = match req.msg_type() {
                    t if crate::server::is_rm_request(t) => req.name(),
                    _ => "invalid",
                };
                let ok = match handle(shared, &mut conn, req) {
                    Ok(resp) => {
                        if let Err(e) = encode_response(&mut tx, id, &resp) {
                            encode_error(
                                &mut tx,
                                id,
                                &WireError::new(ErrorCode::Internal, e.to_string()),
                            );
                        }
                        true
                    }
                    Err(e) => {
                        encode_error(&mut tx, id, &e);
                        false
                    }
                };
                (name, ok, close)
            }
        };
        shared.ops.record(name, t0.elapsed(), ok);
        if stream.write_all(&tx).is_err() || close {
            break;
        }
    }
    if let Some(owner) = conn.owner {
        let mut presence = lock(&shared.presence);
        if let Some(p) = presence.get_mut(&(owner.host.clone(), owner.pid)) {
            p.connections = p.connections.saturating_sub(1);
            if p.connections == 0 {
                p.since = Instant::now();
            }
        }
    }
    let _ = stream.shutdown();
}

pub(crate) fn is_rm_request(t: u16) -> bool {
    use maru_proto::msg_type::*;
    matches!(
        t,
        HELLO | HEARTBEAT | GOODBYE | RM_ALLOC | RM_FREE | RM_GET_ACCESS | RM_STATS | RM_LIST
    )
}

fn handle(shared: &Arc<Shared>, conn: &mut ConnState, req: Request) -> Result<Response, WireError> {
    let owner = match (&req, &conn.owner) {
        (Request::Hello(_), _) => None,
        (_, Some(o)) => Some(o.clone()),
        (_, None) if is_rm_request(req.msg_type()) => {
            return Err(WireError::new(
                ErrorCode::NotHandshaken,
                "the first request on a connection must be Hello",
            ))
        }
        (_, None) => None,
    };
    match req {
        Request::Hello(h) => {
            if conn.owner.is_some() {
                return Err(WireError::new(
                    ErrorCode::InvalidArgument,
                    "already handshaken",
                ));
            }
            if h.host.is_empty() || h.pid == 0 {
                return Err(WireError::new(
                    ErrorCode::InvalidArgument,
                    "Hello must name the peer's host and pid",
                ));
            }
            let owner = identity::owner_of(&conn.caller, &h, &shared.hostname, shared.uid)
                .inspect_err(|e| tracing::warn!("hello refused: {}", e.message))?;
            let server_id = match (h.role, h.session_token) {
                (Role::Server, Some(id)) => server_identity(shared, &conn.caller, &owner, &id)
                    .inspect_err(|e| tracing::warn!("hello refused: {}", e.message))?,
                _ => None,
            };
            {
                let mut presence = lock(&shared.presence);
                let p = presence
                    .entry((owner.host.clone(), owner.pid))
                    .or_insert(Presence {
                        connections: 0,
                        since: Instant::now(),
                    });
                p.connections += 1;
            }
            tracing::debug!("hello from {} ({:?})", owner.key(), h.role);
            conn.owner = Some(owner);
            conn.role = h.role;
            conn.server_id = server_id;
            Ok(Response::HelloOk(HelloOk {
                server: format!("maru-resource-manager {}", env!("CARGO_PKG_VERSION")),
                hostname: shared.hostname.clone(),
                session_token: [0; maru_proto::SESSION_TOKEN_LEN],
                index: None,
            }))
        }
        Request::Heartbeat | Request::Goodbye => Ok(Response::Ok),
        Request::RmAlloc { size, pool } => {
            if conn.role == Role::Admin {
                return Err(WireError::new(
                    ErrorCode::InvalidArgument,
                    "admin connections own nothing and cannot allocate",
                ));
            }
            let owner = owner.ok_or_else(not_handshaken)?;
            let h = {
                let mut m = lock(&shared.manager);
                if let Some(id) = &conn.server_id {
                    // Before the region exists, so that it is never a server's without
                    // the grace.
                    m.bind(&owner, id)?;
                }
                m.alloc(&owner, size, pool)?
            };
            tracing::debug!(
                "region {} ({} bytes at {} in {}) to {}",
                h.region_id,
                h.len,
                h.offset,
                h.pool,
                h.owner
            );
            Ok(Response::Handle(h))
        }
        Request::RmFree { handle } => {
            let owner = owner.ok_or_else(not_handshaken)?;
            lock(&shared.manager).free(&owner, &handle)?;
            Ok(Response::Ok)
        }
        Request::RmGetAccess { handle } => {
            Ok(Response::Access(lock(&shared.manager).access(&handle)?))
        }
        Request::RmStats => serde_json::to_string(&shared.stats())
            .map(Response::RmStats)
            .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string())),
        Request::RmList => {
            let list = shared.list();
            WireError::check_listing(list.len(), "allocations", "RmStats")?;
            Ok(Response::RmAllocations(list))
        }
        other => Err(WireError::new(
            ErrorCode::UnknownMessage,
            format!("{} is not a resource-manager request", other.name()),
        )),
    }
}

/// The durable identity a server's Hello may act for, adopting the regions of a dead
/// predecessor that presented it. Adopting needs proof that the caller may act for the
/// server: the Unix socket (the kernel vouched for a uid the resource manager serves) or a
/// TCP connection that proved it holds the cluster secret. Without that proof an identity
/// with regions to adopt is refused, and one with none is ignored (the connection owns
/// regions as its process only, without the grace). A proven identity whose owner is
/// alive is refused: two live servers never share one.
fn server_identity(
    shared: &Shared,
    caller: &Caller,
    owner: &Owner,
    id: &ServerId,
) -> Result<Option<ServerId>, WireError> {
    let proven = match caller {
        Caller::Unix(_) => true,
        Caller::TcpLocal(_) | Caller::TcpRemote => shared.tcp_auth.is_some(),
    };
    let others = lock(&shared.manager).bound_to(id, owner);
    let (dead, alive): (Vec<Owner>, Vec<Owner>) = others
        .into_iter()
        .partition(|o| crate::reaper::verdict(shared, o).is_some());
    if !proven {
        if !dead.is_empty() {
            return Err(WireError::new(
                ErrorCode::Unauthenticated,
                "adopting a metadata server's regions needs the resource manager's Unix \
                 socket or a TCP connection with the cluster secret",
            ));
        }
        tracing::warn!(
            "{}: a metadata server identity over TCP without the cluster secret is ignored \
             (its regions get no grace when it dies)",
            owner.key()
        );
        return Ok(None);
    }
    if let Some(live) = alive.first() {
        return Err(WireError::new(
            ErrorCode::SessionConflict,
            format!(
                "another live process ({}) holds this metadata server identity",
                live.key()
            ),
        ));
    }
    for from in dead {
        let n = lock(&shared.manager).adopt(&from, owner)?;
        lock(&shared.server_dead_since).remove(&from);
        tracing::info!(
            "{} adopted {n} regions of the dead metadata server {} (same identity)",
            owner.key(),
            from.key()
        );
    }
    Ok(Some(*id))
}

fn not_handshaken() -> WireError {
    WireError::new(
        ErrorCode::NotHandshaken,
        "the first request on a connection must be Hello",
    )
}
