//! The life of one connection: a blocking thread reading frames, answering them, and writing
//! the replies back with as few system calls as the pipeline allows.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use maru_proto::{encode_error, WireError};
use maru_transport::busy::poll_readable;
use maru_transport::{fds, FrameBuf, FrameReadError, Stream};

use crate::admission::standing;
use crate::busy_poll::{count_request, wait_for_next, Next};
use crate::server::Shared;
use crate::service::{handle_frame, ConnCtx};
use crate::state::Peer;

/// How often an idle connection thread looks at the shutdown flag.
pub(crate) const READ_TICK: Duration = Duration::from_millis(500);
/// How long a peer may take to finish a frame it started (slow-loris guard).
pub(crate) const MAX_STALL: Duration = Duration::from_secs(10);
/// A peer that does not read its replies for this long is dropped.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Replies are flushed once this much has accumulated, even if more requests are queued.
const FLUSH_AT: usize = 256 * 1024;
/// A reply buffer that grew past this (a huge batch) is given back afterwards.
const KEEP_CAPACITY: usize = 1024 * 1024;

/// Serves requests until the peer leaves, misbehaves, or the server shuts down.
/// `id` is the connection's number in `admission`, whose limits a hello or goodbye may hit.
pub(crate) fn serve(shared: &Shared, mut stream: Stream, id: u64) {
    // A TCP peer proves it holds the cluster secret before its first frame (Unix-socket
    // peers are named by the kernel and the socket's mode).
    if let (Some(auth), Stream::Tcp(tcp)) = (&shared.tcp_auth, &mut stream) {
        if let Err(e) = auth.accept(tcp, Instant::now() + shared.handshake_timeout) {
            tracing::warn!("closing a TCP connection: {e}");
            let _ = stream.shutdown();
            return;
        }
    }
    let state = &shared.state;
    state.connections.fetch_add(1, Ordering::Relaxed);
    let mut rx = FrameBuf::new();
    let mut out = Vec::with_capacity(4096);
    let mut ctx = ConnCtx::new(stream.try_clone().ok());
    ctx.unix = matches!(stream, Stream::Unix(_));
    let mut spin = maru_transport::busy::Backoff::default();
    // This connection's latest request, as numbered by `count_request`.
    let mut last_request: u64;
    // What the latest frame said of the next request, and whether the one before it was an
    // `Ahead` (so that the latest is the request it announced).
    let mut next: Next;
    let mut announced = false;
    // The busy-poll after the latest reply saw the next request arrive.
    let mut arrived = false;
    // Since when the connection has had no session (from its accept, or its goodbye).
    let mut unhandshaken_since = Some(Instant::now());
    loop {
        // Until its Hello, a connection has a deadline (a silent one would hold its slot for
        // ever); a frame begun before it must be finished by it too.
        rx.max_stall = MAX_STALL;
        if matches!(ctx.peer, Peer::New) {
            let since = *unhandshaken_since.get_or_insert_with(Instant::now);
            let left = shared.handshake_timeout.saturating_sub(since.elapsed());
            if left.is_zero() {
                tracing::debug!(
                    "closing connection: no hello within {:?}",
                    shared.handshake_timeout
                );
                let _ = stream.write_all(&out);
                break;
            }
            rx.max_stall = MAX_STALL.min(left);
        } else {
            unhandshaken_since = None;
        }
        // Between requests the thread sleeps in `poll`, not in `read`: a thread asleep in a
        // Unix socket's `read` waits on the queue that the socket's write-space wake-ups go
        // to, so each reply its peer reads would wake it for nothing, in the peer's `read`
        // (a wake-up across the hypervisor on a VM: 12–35 µs added to the peer's call). A
        // `poll` for input sleeps through those. (A frame begun is finished in `read`.)
        if rx.is_empty()
            && !std::mem::take(&mut arrived)
            && matches!(poll_readable(stream.as_raw_fd(), READ_TICK), Ok(false))
        {
            if shared.is_shutting_down() {
                break;
            }
            continue;
        }
        match rx.read_frame(&mut stream) {
            Ok((header, payload)) => {
                last_request = count_request();
                let (before, mark) = (standing(&ctx.peer), out.len());
                handle_frame(state, &mut ctx, &header, payload, &mut out);
                next = match (ctx.ahead.take(), announced) {
                    (Some(wait), _) => Next::In(wait),
                    (None, true) => Next::AfterAnnounced,
                    (None, false) => Next::Unknown,
                };
                announced = matches!(next, Next::In(_));
                let now = standing(&ctx.peer);
                if now != before {
                    if let Err(e) = shared.take_standing(id, now) {
                        // Over a limit: the hello is answered with the refusal instead.
                        out.truncate(mark);
                        encode_error(&mut out, header.request_id, &e);
                        let _ = stream.write_all(&out);
                        break;
                    }
                }
            }
            Err(FrameReadError::Idle) => {
                if shared.is_shutting_down() {
                    break;
                }
                continue;
            }
            Err(FrameReadError::Decode(e)) => {
                // The header itself is bad: the stream cannot be resynchronised. Say why (with
                // request id 0, since the header's id cannot be trusted) and close.
                tracing::debug!("closing connection after a bad header: {e}");
                encode_error(&mut out, 0, &WireError::new(e.code(), e.to_string()));
                let _ = stream.write_all(&out);
                break;
            }
            Err(FrameReadError::Stalled) => {
                tracing::debug!("closing connection: peer stalled mid-frame");
                break;
            }
            Err(FrameReadError::Closed | FrameReadError::Io(_)) => break,
        }
        // Pipelined requests that already arrived are answered first and their replies leave
        // in one write.
        if !rx.has_frame() || out.len() >= FLUSH_AT || ctx.fds.len() >= fds::MAX_FDS {
            if write_replies(&mut stream, &out, &mut ctx.fds).is_err() {
                break;
            }
            out.clear();
            if out.capacity() > KEEP_CAPACITY {
                out.shrink_to(4096);
            }
            // Nothing buffered: wait for the next request awake for a moment, so a client
            // sending it soon does not pay for waking this thread.
            if !rx.has_frame() {
                arrived = wait_for_next(
                    &mut spin,
                    stream.as_raw_fd(),
                    shared.busy_poll,
                    last_request,
                    next,
                );
            }
        }
    }
    state.disconnect(&mut ctx.peer);
    state.connections.fetch_sub(1, Ordering::Relaxed);
}

/// Writes the buffered replies; descriptors for them (only ever on a Unix socket) go with
/// the first byte, so each arrives no later than its reply, and are closed here once sent.
fn write_replies(
    stream: &mut Stream,
    out: &[u8],
    pending: &mut Vec<std::os::fd::OwnedFd>,
) -> std::io::Result<()> {
    if pending.is_empty() {
        return stream.write_all(out);
    }
    let sent = match &*stream {
        Stream::Unix(sock) => {
            let borrowed: Vec<_> = pending.iter().map(|fd| fd.as_fd()).collect();
            fds::send_all_with_fds(sock, out, &borrowed)
        }
        Stream::Tcp(_) => stream.write_all(out),
    };
    pending.clear();
    sent
}
