//! Accepting connections: the accept loop, the `max_clients` limit, and the polite refusal of
//! connections over it.

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use maru_proto::{encode_error, ErrorCode, WireError};
use maru_transport::{FrameBuf, Stream};

use crate::conn::{self, READ_TICK, WRITE_TIMEOUT};
use crate::server::Shared;

/// Connections over the client limit that may be waiting for their refusal at once; more are
/// closed without a word.
const MAX_REFUSING: usize = 8;

/// The connections being served or refused, and their threads.
#[derive(Default)]
pub(crate) struct Conns {
    next_id: u64,
    /// Served connections (a clone of each stream, so shutdown can unblock its thread).
    open: HashMap<u64, Stream>,
    /// Connections being refused now (at most [`MAX_REFUSING`]).
    refusing: usize,
    threads: Vec<JoinHandle<()>>,
}

impl Shared {
    fn conns(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
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
        let full = conns.open.len() >= self.max_clients;
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
                    refuse(stream, shared.max_clients);
                    shared.conns().refusing -= 1;
                } else {
                    conn::serve(&shared, stream);
                    shared.conns().open.remove(&id);
                }
            });
        match spawned {
            Ok(t) => {
                if full {
                    conns.refusing += 1;
                } else {
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

/// Answers the first request of a connection over the client limit with
/// [`ErrorCode::TooManyClients`] and closes it.
fn refuse(mut stream: Stream, max_clients: usize) {
    let mut rx = FrameBuf::new();
    rx.max_stall = READ_TICK * 2;
    let mut out = Vec::new();
    let request_id = match rx.read_frame(&mut stream) {
        Ok((header, _)) => header.request_id,
        Err(_) => 0,
    };
    encode_error(
        &mut out,
        request_id,
        &WireError::new(
            ErrorCode::TooManyClients,
            format!("the server already has its maximum of {max_clients} clients"),
        ),
    );
    let _ = stream.write_all(&out);
    let _ = stream.shutdown();
}
