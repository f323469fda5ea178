//! Who a caller is. A Hello names an owner (host, pid, start time), and ownership decides
//! who may free a region, so the name must be one the caller cannot choose freely:
//!
//! * **Unix socket**: the kernel says who connected (`SO_PEERCRED`). The Hello's pid must be
//!   that pid, and the caller's uid must be the resource manager's own or root.
//! * **TCP from this host** (loopback, or one of its own addresses): a Hello that claims a
//!   local process must come from that process: it must hold the other end of the
//!   connection (found through `/proc`). A claim of a process that does not hold it is
//!   refused.
//! * **TCP from elsewhere**: a remote peer may not claim to be a process of this host (the
//!   reaper would judge its liveness by a local pid it does not have).
//!
//! Refusals happen at the Hello, before any state changes, with
//! [`ErrorCode::Unauthenticated`] and a message that says what did not match.

use std::net::TcpStream;

use maru_proto::{ErrorCode, Hello, WireError};

use crate::wal::Owner;

/// What the kernel says about a connection's other end, taken at accept.
pub(crate) enum Caller {
    Unix(maru_transport::PeerCred),
    /// TCP from one of this host's own addresses (a clone of the socket, to look its peer
    /// up when a Hello claims a local process).
    TcpLocal(TcpStream),
    TcpRemote,
}

impl Caller {
    pub fn of_tcp(stream: &TcpStream) -> Caller {
        if maru_transport::tcp_peer_is_local(stream) {
            match stream.try_clone() {
                Ok(s) => return Caller::TcpLocal(s),
                Err(e) => tracing::warn!("cannot keep a connection's identity: {e}"),
            }
        }
        Caller::TcpRemote
    }
}

fn refuse(msg: String) -> WireError {
    WireError::new(ErrorCode::Unauthenticated, msg)
}

/// The owner a Hello may act as, or why not. `hostname` is this host's name as Hellos give
/// it; `uid` the resource manager's effective uid.
pub(crate) fn owner_of(
    caller: &Caller,
    h: &Hello<'_>,
    hostname: &str,
    uid: u32,
) -> Result<Owner, WireError> {
    // Process `pid` of this host, which the Hello must not give another start time.
    let local = |pid: u32| {
        let owner = Owner {
            host: hostname.to_owned(),
            pid,
            start_time: maru_transport::process_start_time(pid).unwrap_or(0),
        };
        if h.start_time != 0 && h.start_time != owner.start_time {
            return Err(refuse(format!(
                "Hello claims start time {} for pid {pid}, which started at {}",
                h.start_time, owner.start_time
            )));
        }
        Ok(owner)
    };
    match caller {
        Caller::Unix(cred) => {
            if cred.uid != uid && cred.uid != 0 {
                return Err(refuse(format!(
                    "uid {} may not use this resource manager (it runs as uid {uid}; only that \
                     uid and root may connect)",
                    cred.uid
                )));
            }
            if h.pid != cred.pid {
                return Err(refuse(format!(
                    "Hello claims pid {} but the caller is pid {} (as the kernel says)",
                    h.pid, cred.pid
                )));
            }
            if h.host != hostname {
                return Err(refuse(format!(
                    "Hello claims host {:?} on this host's Unix socket (this host is {hostname:?})",
                    h.host
                )));
            }
            local(cred.pid)
        }
        Caller::TcpLocal(stream) if h.host == hostname => {
            match maru_transport::tcp_peer_held_by(stream, h.pid) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(refuse(format!(
                        "Hello claims pid {} of this host, which does not hold this \
                         connection",
                        h.pid
                    )))
                }
                Err(e) => {
                    return Err(refuse(format!(
                        "cannot tell whether pid {} holds this connection ({e}); connect \
                         over the Unix socket instead",
                        h.pid
                    )))
                }
            }
            local(h.pid)
        }
        Caller::TcpRemote if h.host == hostname => Err(refuse(format!(
            "a peer on another host claims to be process {} of this host ({hostname:?})",
            h.pid
        ))),
        // A process that names another host is an owner of that host: its liveness is
        // judged by its connections and the grace period, never by a local pid.
        Caller::TcpLocal(_) | Caller::TcpRemote => Ok(Owner {
            host: h.host.to_owned(),
            pid: h.pid,
            start_time: h.start_time,
        }),
    }
}
