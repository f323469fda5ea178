//! Accepting connections and the limits on them.
//!
//! A connection's *standing* decides what it counts against ([`Standing`]):
//!
//! - before its Hello it is *pre-hello*: at most [`PRE_HELLO_SLOTS`] of them at once, and
//!   when one more arrives the oldest is closed. A real client says hello microseconds after
//!   connecting, so sockets that never speak churn among themselves and never keep a
//!   handshaking client out; each also has the short `handshake_timeout`.
//! - a client connection counts its *session* (one `MaruHandler`, whatever number of
//!   connections it opens): `max_clients` bounds the distinct sessions, and a connection
//!   joining a session already counted is always let in;
//! - an operator tool (`maru stats`, `maru top`) takes one of [`ADMIN_SLOTS`] of its own, so
//!   it answers even when the clients are at their limit.
//!
//! Connections over a limit are answered [`ErrorCode::TooManyClients`] and closed. Every
//! change of standing goes through [`Shared::take_standing`], the one place that counts.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use maru_proto::{ErrorCode, WireError};
use maru_transport::{FrameBuf, Stream};

use crate::conn::{self, READ_TICK, WRITE_TIMEOUT};
use crate::server::Shared;
use crate::state::Peer;

/// Connections over the client limit that may be waiting for their refusal at once; more are
/// closed without a word.
const MAX_REFUSING: usize = 8;
/// Connections that have not said hello yet; one more closes the oldest of them.
pub(crate) const PRE_HELLO_SLOTS: usize = 64;
/// Operator connections (statistics), outside `max_clients`.
pub(crate) const ADMIN_SLOTS: usize = 4;
/// Connections per counted session, on average, before new connections are refused: a
/// bound on threads, far above what handlers open (a pool, a watcher, write-behind).
const CONNECTIONS_PER_SESSION: usize = 16;

/// What a connection counts against (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    PreHello,
    /// A client connection of the session with this identity (the session object's
    /// address: every connection of a session shares it, and it is not reused while any of
    /// them is counted).
    Session(usize),
    Admin,
}

/// The standing of a connection whose peer is `peer`.
pub(crate) fn standing(peer: &Peer) -> Standing {
    match peer {
        Peer::New => Standing::PreHello,
        Peer::Client(session) => Standing::Session(Arc::as_ptr(session) as usize),
        Peer::Admin(_) => Standing::Admin,
    }
}

/// The connections being served or refused, their standings and their threads.
#[derive(Default)]
pub(crate) struct Conns {
    next_id: u64,
    /// Served connections (a clone of each stream, so shutdown can unblock its thread).
    open: HashMap<u64, Stream>,
    /// The standing of every served connection.
    standing: HashMap<u64, Standing>,
    /// Pre-hello connections, oldest first.
    pre_hello: VecDeque<u64>,
    /// Connections per counted session.
    sessions: HashMap<usize, usize>,
    admins: usize,
    /// Connections being refused now (at most [`MAX_REFUSING`]).
    refusing: usize,
    threads: Vec<JoinHandle<()>>,
}

impl Conns {
    fn count(&mut self, id: u64, s: Standing) {
        self.standing.insert(id, s);
        match s {
            Standing::PreHello => self.pre_hello.push_back(id),
            Standing::Session(k) => *self.sessions.entry(k).or_insert(0) += 1,
            Standing::Admin => self.admins += 1,
        }
    }

    fn uncount(&mut self, id: u64) {
        match self.standing.remove(&id) {
            Some(Standing::PreHello) => self.pre_hello.retain(|&p| p != id),
            Some(Standing::Session(k)) => {
                if let Some(n) = self.sessions.get_mut(&k) {
                    *n -= 1;
                    if *n == 0 {
                        self.sessions.remove(&k);
                    }
                }
            }
            Some(Standing::Admin) => self.admins -= 1,
            None => {}
        }
    }

    /// Why a connection may not take standing `to`, if it may not.
    fn refusal(&self, to: Standing, max_clients: usize) -> Option<String> {
        match to {
            Standing::Session(k) if !self.sessions.contains_key(&k) => {
                (self.sessions.len() >= max_clients).then(|| {
                    format!(
                        "the server already serves its maximum of {max_clients} clients \
                         (handlers); close one, or raise --max-clients"
                    )
                })
            }
            Standing::Admin => (self.admins >= ADMIN_SLOTS)
                .then(|| format!("the server already serves {ADMIN_SLOTS} operator connections")),
            _ => None,
        }
    }

    /// Closes the oldest pre-hello connections until one more fits.
    fn make_pre_hello_room(&mut self) {
        while self.pre_hello.len() >= PRE_HELLO_SLOTS {
            let Some(oldest) = self.pre_hello.pop_front() else {
                break;
            };
            // Its thread sees the connection end and leaves; it no longer counts meanwhile.
            self.standing.remove(&oldest);
            if let Some(stream) = self.open.get(&oldest) {
                tracing::debug!("closing connection {oldest}: no hello, and newer ones wait");
                let _ = stream.shutdown();
            }
        }
    }
}

impl Shared {
    fn conns(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connection `id` now has standing `to` (after a hello or a goodbye); refused with
    /// [`ErrorCode::TooManyClients`] when that is over its limit (it keeps its standing).
    pub(crate) fn take_standing(&self, id: u64, to: Standing) -> Result<(), WireError> {
        let mut conns = self.conns();
        if conns.standing.get(&id) == Some(&to) {
            return Ok(());
        }
        if let Some(why) = conns.refusal(to, self.max_clients) {
            return Err(WireError::new(ErrorCode::TooManyClients, why));
        }
        if to == Standing::PreHello {
            conns.make_pre_hello_room();
        }
        conns.uncount(id);
        conns.count(id, to);
        Ok(())
    }

    /// Takes a freshly accepted connection: serve it, or refuse it when the server is full.
    fn admit(self: &Arc<Self>, stream: Stream) {
        // Socket options first: every connection thread must wake up regularly (to notice
        // shutdown) and must not block forever on a peer that stops reading.
        if stream.set_read_timeout(Some(READ_TICK)).is_err()
            || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
        {
            return;
        }
        let mut conns = self.conns();
        conns.threads.retain(|t| !t.is_finished());
        let most = self.max_clients * CONNECTIONS_PER_SESSION + PRE_HELLO_SLOTS + ADMIN_SLOTS;
        let full = conns.open.len() >= most;
        if full && conns.refusing >= MAX_REFUSING {
            return;
        }
        let id = conns.next_id;
        conns.next_id += 1;
        let Ok(clone) = stream.try_clone() else {
            return;
        };
        let shared = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("maru-conn-{id}"))
            .spawn(move || {
                if full {
                    refuse(stream, most);
                    shared.conns().refusing -= 1;
                } else {
                    crate::slice::ask_short_slice();
                    crate::slice::ask_exact_timers();
                    conn::serve(&shared, stream, id);
                    let mut conns = shared.conns();
                    conns.uncount(id);
                    conns.open.remove(&id);
                }
            });
        match spawned {
            Ok(t) => {
                if full {
                    conns.refusing += 1;
                } else {
                    conns.make_pre_hello_room();
                    conns.count(id, Standing::PreHello);
                    conns.open.insert(id, clone);
                }
                conns.threads.push(t);
            }
            Err(e) => tracing::warn!("cannot start a connection thread: {e}"),
        }
    }

    /// Shutdown, once the accept loops have stopped: unblocks every open connection and
    /// returns the connection threads to join.
    pub(crate) fn close_connections(&self) -> Vec<JoinHandle<()>> {
        let mut conns = self.conns();
        for stream in conns.open.values() {
            let _ = stream.shutdown();
        }
        std::mem::take(&mut conns.threads)
    }
}

/// Admits what `accept` (one listener's accept, TCP or Unix) returns, until shutdown.
pub(crate) fn accept_loop(shared: &Arc<Shared>, mut accept: impl FnMut() -> io::Result<Stream>) {
    loop {
        let accepted = accept();
        if shared.is_shutting_down() {
            break;
        }
        match accepted {
            Ok(stream) => shared.admit(stream),
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Answers the first request of a connection over the connection limit with
/// [`ErrorCode::TooManyClients`] and closes it.
fn refuse(mut stream: Stream, most: usize) {
    let mut rx = FrameBuf::new();
    rx.max_stall = READ_TICK * 2;
    let request_id = match rx.read_frame(&mut stream) {
        Ok((header, _)) => header.request_id,
        Err(_) => 0,
    };
    stream.turn_away(
        request_id,
        format!("the server already has its maximum of {most} connections"),
    );
}
