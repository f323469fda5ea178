//! Page-return notices and the watch connection they travel on: each session's *outbox*.
//!
//! A page freed by an operation (a delete, a batch delete, a round of evictions, the end of
//! holds) goes back to its region's owner as a `ReturnPages` notice (request id 0) on the
//! owner's watch connection. An operation collects its pages by owner ([`Returned`]) and sends
//! one notice per owner when it is done, before it answers.
//!
//! Writing a notice never blocks the operation that freed the pages: under the outbox's mutex
//! a notice is appended and written with a non-blocking send; whatever the socket does not
//! take stays in the outbox, in order. The rest goes out when the owner reads again: on its
//! next `Watch` (whose own connection thread may wait for the socket, holding no lock), or on
//! the evictor thread's tick, which retries every stalled outbox ([`ServerState::flush_stalled`]).
//! A stuck owner (stopped, not reading) therefore costs other sessions nothing but memory, and
//! that is bounded by its own pages: a page is returned once, and comes back only after the
//! owner has received it, handed it out and registered it again.
//!
//! `Watch` answers go through the same outbox, after the pages queued before them, so an owner
//! that waits for its answer has every page returned before its request. The outbox is the
//! only writer of the watch connection once it is one (the connection's own thread answers
//! nothing else there), so a partly written frame is never interleaved with another.
//!
//! Lock order: the outbox's mutex is innermost; the list of stalled outboxes is taken only
//! after it is released.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use maru_proto::{encode_response, PageRef, Response, MAX_BATCH};
use maru_transport::Stream;

use super::regions::TableRegion;
use super::sessions::Session;
use super::{lock, ServerState};

/// How long a `Watch` answer may wait for its owner to read before it is left to the
/// evictor's retries (the connection's own thread waits, no lock held).
const WATCH_WAIT: Duration = Duration::from_secs(10);
/// `Watch` requests answered but not yet written, beyond which the peer is not reading its
/// answers at all and its watch connection is closed (a handler has one sync in flight).
const MAX_ANSWERS: usize = 1024;

/// Pages one operation returned, by owner: sent as one notice per owner when it ends.
#[derive(Default)]
pub(crate) struct Returned {
    by_owner: Vec<(Arc<Session>, Vec<PageRef>)>,
}

impl Returned {
    /// Adds `page` of `region` for its owner (nothing when the owner is gone: its region is on
    /// its way back to the resource manager).
    pub(super) fn add(&mut self, region: &TableRegion, page: PageRef) {
        if let Some((_, pages)) = self
            .by_owner
            .iter_mut()
            .find(|(s, _)| s.id == region.session())
        {
            pages.push(page);
            return;
        }
        if let Some(owner) = region.owner() {
            self.by_owner.push((owner, vec![page]));
        }
    }

    /// Pages returned so far to the session `id`.
    pub(super) fn count_for(&self, id: u64) -> usize {
        self.by_owner
            .iter()
            .find(|(s, _)| s.id == id)
            .map_or(0, |(_, p)| p.len())
    }

    /// Takes the session `id`'s pages out (they are answered to it directly).
    pub(super) fn take_for(&mut self, id: u64) -> Vec<PageRef> {
        match self.by_owner.iter().position(|(s, _)| s.id == id) {
            Some(i) => self.by_owner.swap_remove(i).1,
            None => Vec::new(),
        }
    }
}

/// A session's notices not yet written, and the connection they go out on.
#[derive(Default)]
pub(crate) struct Outbox {
    /// Regions the server asks back (`Reclaim` notices), not yet encoded: they go out before
    /// `pages`, so the owner learns a region is asked back before it sees that region's
    /// pages free again (see `eviction::room`).
    reclaims: Vec<u64>,
    /// Pages returned and not yet encoded (all of them until the session has a watch
    /// connection).
    pages: Vec<PageRef>,
    /// `Watch` requests to answer, after `pages`.
    answers: Vec<u64>,
    /// Encoded frames, written up to `sent`.
    out: Vec<u8>,
    sent: usize,
    /// The session's watch connection (a second descriptor of its socket).
    sink: Option<Stream>,
    /// On the server's list of stalled outboxes.
    listed: bool,
}

/// How far a flush got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flushed {
    /// Everything is written (or there is no connection to write to yet).
    Done,
    /// The socket takes no more now; the rest waits in the outbox.
    Blocked,
}

impl Outbox {
    /// Writes what the socket takes now, without waiting.
    fn flush(&mut self) -> Flushed {
        loop {
            let Some(sink) = &self.sink else {
                return Flushed::Done;
            };
            if self.sent == self.out.len() {
                self.out.clear();
                self.sent = 0;
                if self.reclaims.is_empty() && self.pages.is_empty() && self.answers.is_empty() {
                    return Flushed::Done;
                }
                for region_id in self.reclaims.drain(..) {
                    // Infallible: a region id always fits a frame.
                    let _ = encode_response(&mut self.out, 0, &Response::Reclaim { region_id });
                }
                encode_returns(&mut self.out, &self.pages);
                self.pages.clear();
                for id in self.answers.drain(..) {
                    // Infallible: an empty response always fits a frame.
                    let _ = encode_response(&mut self.out, id, &Response::Ok);
                }
            }
            match send_now(sink.as_raw_fd(), &self.out[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flushed::Blocked,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The connection is ending (and with its session's last one, the session):
                    // nothing more can reach the owner on it.
                    tracing::debug!(
                        "a watch connection failed while the server wrote a notice: {e}"
                    );
                    self.drop_sink();
                    return Flushed::Done;
                }
            }
        }
    }

    fn drop_sink(&mut self) {
        if let Some(s) = self.sink.take() {
            let _ = s.shutdown();
        }
        self.out.clear();
        self.sent = 0;
        self.reclaims.clear();
        self.pages.clear();
        self.answers.clear();
    }

    #[cfg(test)]
    pub(super) fn queued(&self) -> Vec<PageRef> {
        self.pages.clone()
    }

    #[cfg(test)]
    pub(super) fn queued_reclaims(&self) -> Vec<u64> {
        self.reclaims.clone()
    }
}

/// `ReturnPages` notices (request id 0) for `pages`, at most a batch per frame.
pub(super) fn encode_returns(frame: &mut Vec<u8>, pages: &[PageRef]) {
    for chunk in pages.chunks(MAX_BATCH) {
        // Infallible: MAX_BATCH pages of 16 bytes fit a frame.
        let _ = encode_response(frame, 0, &Response::ReturnPages(chunk.to_vec()));
    }
}

/// One send(2) that never waits: what the socket buffer takes now.
fn send_now(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live slice for the whole call and send(2) reads at most `buf.len()`
    // bytes from it; `fd` belongs to a `Stream` the caller keeps open across the call.
    // MSG_DONTWAIT makes this one call non-blocking without changing the socket's flags,
    // which the connection's own thread shares; MSG_NOSIGNAL turns a closed peer into EPIPE.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Waits until `fd` can take bytes, at most `timeout`.
fn wait_writable(fd: RawFd, timeout: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `p` is one valid pollfd on the stack for the call's duration, and the count
    // passed is 1; poll(2) writes only its `revents`.
    unsafe { libc::poll(&mut p, 1, ms) };
}

impl ServerState {
    /// Sends every owner its pages of one operation: one notice each.
    pub(super) fn send_returns(&self, returned: Returned) {
        for (owner, pages) in returned.by_owner {
            self.notify(&owner, pages);
        }
    }

    fn notify(&self, owner: &Arc<Session>, pages: Vec<PageRef>) {
        if pages.is_empty() || owner.is_ended() {
            return;
        }
        self.pages_returned
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        self.post(owner, |ob| ob.pages.extend(pages));
    }

    /// Asks `owner` to give region `region_id` back (a `Reclaim` notice), ahead of any page
    /// returned after this call.
    pub(super) fn ask_back(&self, owner: &Arc<Session>, region_id: u64) {
        if !owner.is_ended() {
            self.post(owner, |ob| ob.reclaims.push(region_id));
        }
    }

    /// Queues a notice in `owner`'s outbox and writes what the socket takes now; an outbox
    /// left with bytes joins the stalled list (once).
    fn post(&self, owner: &Arc<Session>, queue: impl FnOnce(&mut Outbox)) {
        let blocked = {
            let mut ob = lock(&owner.notices);
            queue(&mut ob);
            ob.flush() == Flushed::Blocked && !std::mem::replace(&mut ob.listed, true)
        };
        if blocked {
            lock(&self.stalled).push(Arc::downgrade(owner));
        }
    }

    /// `Watch`: `socket` (this connection) becomes the session's watch connection, if it has
    /// none yet; pages queued so far go out on it, then the answer to request `id`. Called on
    /// the connection's own thread, which may wait here (bounded) for its peer to read; no
    /// lock is held while it waits.
    pub fn watch(&self, session: &Arc<Session>, socket: Option<Stream>, id: u64) {
        let deadline = Instant::now() + WATCH_WAIT;
        let mut ob = lock(&session.notices);
        if ob.sink.is_none() {
            ob.sink = socket;
        }
        if ob.answers.len() >= MAX_ANSWERS {
            tracing::warn!(
                session = session.id,
                "a watch connection does not read its answers; closing it"
            );
            ob.drop_sink();
            return;
        }
        ob.answers.push(id);
        let mut waiter: Option<Stream> = None;
        while ob.flush() == Flushed::Blocked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                if !std::mem::replace(&mut ob.listed, true) {
                    drop(ob);
                    lock(&self.stalled).push(Arc::downgrade(session));
                }
                return;
            }
            // A descriptor of our own to wait on: the outbox may drop its sink meanwhile.
            if waiter.is_none() {
                waiter = ob.sink.as_ref().and_then(|s| s.try_clone().ok());
            }
            let Some(w) = &waiter else { return };
            drop(ob);
            wait_writable(w.as_raw_fd(), left.min(Duration::from_millis(100)));
            ob = lock(&session.notices);
        }
    }

    /// Writes what stalled outboxes' owners read meanwhile (the evictor thread's tick).
    pub(crate) fn flush_stalled(&self) {
        let list = std::mem::take(&mut *lock(&self.stalled));
        if list.is_empty() {
            return;
        }
        let mut still = Vec::new();
        for weak in list {
            let Some(s) = weak.upgrade() else { continue };
            if s.is_ended() {
                continue;
            }
            let mut ob = lock(&s.notices);
            if ob.flush() == Flushed::Blocked {
                still.push(weak);
            } else {
                ob.listed = false;
            }
        }
        lock(&self.stalled).extend(still);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use maru_proto::decode_response;
    use maru_transport::FrameBuf;

    use super::*;
    use crate::state::fixtures::*;

    const PAGE: u64 = 4096;

    /// What a reader of notices has so far: the notices, and the ids of `Ok` answers.
    type Seen<'a> = dyn FnMut(&[Vec<PageRef>], &[u64]) -> bool + 'a;

    /// Reads frames from `end` until `stop` says enough, or `timeout` passes: the
    /// `ReturnPages` notices (one `Vec` per frame) and the ids of `Ok` answers.
    fn read_notices(
        end: &mut UnixStream,
        timeout: Duration,
        stop: &mut Seen<'_>,
    ) -> (Vec<Vec<PageRef>>, Vec<u64>) {
        end.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let (mut notices, mut answers) = (Vec::new(), Vec::new());
        let mut rx = FrameBuf::new();
        let deadline = Instant::now() + timeout;
        while !stop(&notices, &answers) && Instant::now() < deadline {
            let _ = rx.read_some(end);
            while let Ok(Some((h, payload))) = rx.take_frame() {
                match decode_response(&h, payload).unwrap() {
                    Response::ReturnPages(p) => notices.push(p),
                    Response::Ok => answers.push(h.request_id),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        (notices, answers)
    }

    /// A session with a watch connection: its far end, as the owner's watcher reads it.
    fn watched(st: &ServerState, name: &str) -> (Peer, Arc<Session>, UnixStream) {
        let (peer, s, _) = client(st, name);
        let (near, mut far) = UnixStream::pair().unwrap();
        st.watch(&s, Some(Stream::Unix(near)), 1);
        let (_, answers) =
            read_notices(&mut far, Duration::from_secs(5), &mut |_, a| !a.is_empty());
        assert_eq!(answers, [1]);
        (peer, s, far)
    }

    use crate::state::Peer;

    #[test]
    fn a_batch_delete_sends_one_notice_per_owner() {
        let (st, _rm) = state(&[]);
        let (_pa, a, mut fa) = watched(&st, "a");
        let (_pb, b, mut fb) = watched(&st, "b");
        let (ra, rb) = (
            st.request_region(&a, MIB).unwrap(),
            st.request_region(&b, MIB).unwrap(),
        );
        let mut keys = Vec::new();
        for i in 0..6u64 {
            let (s, r) = if i < 4 { (&a, &ra) } else { (&b, &rb) };
            let k = format!("k{i}").into_bytes();
            assert!(st.register(s, &reg(&k, r, i * PAGE, 10)).unwrap());
            keys.push(k);
        }
        let refs: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
        assert_eq!(st.batch_delete(&refs).len(), 6);
        let got = |f: &mut UnixStream, n: usize| {
            read_notices(f, Duration::from_secs(5), &mut |p, _| {
                p.iter().map(Vec::len).sum::<usize>() >= n
            })
            .0
        };
        let (na, nb) = (got(&mut fa, 4), got(&mut fb, 2));
        assert_eq!(na.len(), 1, "one notice for a's four pages: {na:?}");
        assert_eq!(na[0].len(), 4);
        assert_eq!(nb.len(), 1, "one notice for b's two pages: {nb:?}");
        assert_eq!(nb[0].len(), 2);
    }

    #[test]
    fn a_stuck_owner_never_blocks_a_deleter_and_gets_every_page_once_it_reads() {
        let (st, _rm) = state(&[]);
        let (_pa, a, mut far) = watched(&st, "a");
        let (_pb, b, _) = client(&st, "b");
        // A small send buffer, so a few notices fill the socket while the owner reads nothing.
        {
            let ob = lock(&a.notices);
            let fd = ob.sink.as_ref().unwrap().as_raw_fd();
            let size: libc::c_int = 4096;
            // SAFETY: `fd` is an open socket owned by the outbox (locked here); the option
            // value is a c_int on the stack, passed with its size.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0);
        }
        let r = st.request_region(&a, 64 * MIB).unwrap();
        let n = 2000u64;
        for i in 0..n {
            let k = format!("k{i}").into_bytes();
            assert!(st.register(&a, &reg(&k, &r, i * PAGE, 10)).unwrap());
        }
        // Another session deletes them one by one: every delete is quick although the owner
        // reads nothing.
        let mut worst = Duration::ZERO;
        for i in 0..n {
            let t = Instant::now();
            st.delete(format!("k{i}").as_bytes());
            worst = worst.max(t.elapsed());
        }
        let _ = &b;
        assert!(
            worst < Duration::from_millis(500),
            "a delete took {worst:?}"
        );
        assert!(
            !lock(&a.notices).out.is_empty() || !lock(&a.notices).pages.is_empty(),
            "the socket took everything: the test did not fill it"
        );
        assert_eq!(lock(&st.stalled).len(), 1, "the outbox is listed once");
        // The owner reads again; the evictor's ticks write the rest.
        let reader = std::thread::spawn(move || {
            read_notices(&mut far, Duration::from_secs(20), &mut |p, _| {
                p.iter().map(Vec::len).sum::<usize>() as u64 >= n
            })
            .0
        });
        while !reader.is_finished() {
            st.flush_stalled();
            std::thread::sleep(Duration::from_millis(5));
        }
        let pages: Vec<u64> = reader
            .join()
            .unwrap()
            .into_iter()
            .flatten()
            .map(|p| p.offset / PAGE)
            .collect();
        assert_eq!(
            pages,
            (0..n).collect::<Vec<_>>(),
            "every page once, in order"
        );
        st.flush_stalled();
        assert!(lock(&st.stalled).is_empty());
    }
}
