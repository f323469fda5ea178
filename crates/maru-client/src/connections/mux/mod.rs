//! Pipelining (`MaruConfig::use_async_rpc`): the concurrent calls of one session share a
//! connection ([`Mux`]) instead of taking one each. Every call writes its frame under the
//! send lock with a request id of its own and waits for the reply that echoes it; at most
//! `max_inflight` calls are in flight on the connection at once.
//!
//! Nobody reads for everyone: whichever waiting caller holds the read side (the *leader*)
//! reads the socket, puts every reply for another caller into that caller's slot and wakes
//! it (`Thread::unpark`, a futex), and when its own reply has come hands the read side to the
//! oldest caller still waiting. A dedicated reader thread would cost a wake-up per reply; here
//! the caller whose reply comes first usually reads it itself, and a lone caller reads its
//! own reply exactly as a lent connection does: it spins for the grace with the caller's
//! context held, then waits through the hook.
//!
//! The server answers a connection's requests in order, so a reply nobody waits for any more
//! (its caller timed out) is dropped when it comes, and a connection that fails fails every
//! call in flight on it with the error the failing read or write met.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, Instant};

use maru_proto::{decode_response, encode_request, Request, Response, WireError};
use maru_transport::busy::Backoff;
use maru_transport::{FrameBuf, Stream, TransportError};

use super::{read_again, PooledConn, Sent};
use crate::claims::ReleaseQueue;
use crate::error::{Error, Result};
use crate::wait::{poll_until, wait_readable, NoHook, ReplyClock, Wait, Waiting};

/// A reply as a caller gets it: a response, a typed refusal, or why neither came.
type Reply = std::result::Result<std::result::Result<Response, WireError>, TransportError>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One connection shared by the session's concurrent calls.
pub(crate) struct Mux {
    stream: Stream,
    /// The frame being written; held while it goes out, so frames never interleave.
    tx: Mutex<Vec<u8>>,
    /// The session's queued view releases, sent in front of the next request.
    releases: Option<Arc<ReleaseQueue>>,
    /// The read side, taken by the leader while it reads (the lock is never contended).
    read: Mutex<Option<ReadSide>>,
    book: Mutex<Book>,
    /// Signalled when a slot frees up for a caller waiting beyond `max_inflight`.
    room: Condvar,
    max_inflight: usize,
    /// The most calls ever in flight at once on the session's shared connections.
    peak: Arc<AtomicUsize>,
    /// `Book::dead` is set, readable without the lock (each call checks it).
    dead: AtomicBool,
    /// The server was told a request comes (`Ahead`): its thread is awake when that request
    /// arrives, so the wait for the reply spins whatever the read side's back-off.
    announced: AtomicBool,
}

struct ReadSide {
    rx: FrameBuf,
    /// Whether the leader's waits may busy-poll (see [`wait_readable`]).
    spin: Backoff,
}

/// The calls in flight and who reads for them.
struct Book {
    /// One per call in flight, at most `max_inflight`.
    slots: Vec<Slot>,
    /// The next request id; every id below it went (or is going) out on this connection.
    next_id: u64,
    /// Some waiting caller holds the read side.
    leader: bool,
    /// Why the connection failed; every call on it fails the same way.
    dead: Option<Failure>,
    /// Callers waiting for a slot.
    room_waiters: usize,
}

struct Slot {
    id: u64,
    /// Who to wake; none for a caller that led from the start (it never sleeps).
    thread: Option<Thread>,
    reply: Option<Reply>,
}

/// What killed a shared connection, kept to fail each of its calls with its own copy.
enum Failure {
    Transport(TransportError),
    /// A refusal of the connection itself (request id 0); the server closes it after.
    Refused(WireError),
}

impl Failure {
    fn reply(&self) -> Reply {
        match self {
            Failure::Refused(e) => Ok(Err(e.clone())),
            Failure::Transport(e) => Err(match e {
                TransportError::Closed => TransportError::Closed,
                TransportError::Timeout => TransportError::Timeout,
                TransportError::Io(io) => {
                    TransportError::Io(io::Error::new(io.kind(), io.to_string()))
                }
                TransportError::Decode(d) => TransportError::Decode(d.clone()),
                TransportError::Mismatch { expected, got } => TransportError::Mismatch {
                    expected: *expected,
                    got: *got,
                },
                other => TransportError::Unexpected(other.to_string()),
            }),
        }
    }
}

/// The timing of waits inside the hook: straight to `poll`, no grace (spent already).
fn quiet(clock: &ReplyClock) -> Wait<'_> {
    Wait {
        hook: &NoHook,
        busy_poll: false,
        grace: Duration::ZERO,
        clock,
        timeout: Duration::ZERO,
    }
}

/// Never seen: only the leader takes the read side, and it puts it back before it hands over.
fn missing_read_side() -> TransportError {
    TransportError::Unexpected("the shared connection's read side was taken".to_owned())
}

/// How a caller's wait for its reply went on.
enum Step {
    Done(Reply),
    /// The read side was free: this caller reads now.
    Lead,
}

impl Mux {
    /// Shares `conn` (a connection joined to the session that never asked for a descriptor)
    /// between at most `max_inflight` calls at a time.
    pub fn new(conn: PooledConn, max_inflight: usize, peak: Arc<AtomicUsize>) -> Mux {
        Mux {
            stream: conn.stream,
            tx: Mutex::new(conn.tx),
            releases: conn.releases,
            read: Mutex::new(Some(ReadSide {
                rx: conn.rx,
                spin: conn.spin,
            })),
            book: Mutex::new(Book {
                slots: Vec::with_capacity(max_inflight.min(64)),
                next_id: conn.next_id,
                leader: false,
                dead: None,
                room_waiters: 0,
            }),
            room: Condvar::new(),
            max_inflight: max_inflight.max(1),
            peak,
            dead: AtomicBool::new(false),
            announced: AtomicBool::new(false),
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Whether the connection failed (the next call opens a fresh one).
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    pub fn shutdown(&self) {
        let _ = self.stream.shutdown();
    }

    /// No call is in flight.
    fn idle(&self) -> bool {
        lock(&self.book).slots.is_empty()
    }

    /// Sends `req` and waits for its reply, as [`PooledConn::call`] does on a lent
    /// connection: the same grace, the same errors.
    pub fn call(&self, req: &Request, w: &Wait) -> Result<Response> {
        let _waiting = Waiting::enter();
        let op = req.name();
        let deadline = Instant::now() + w.timeout;
        let (id, leading) = self
            .enter(deadline, w)
            .map_err(|e| Error::transport(op, e, w.timeout))?;
        let frame_len = match self.send(id, req) {
            Ok(n) => n,
            Err(e) => {
                self.finish(id, leading);
                return Err(Error::transport(op, e, w.timeout));
            }
        };
        let sent = Sent {
            at: Instant::now(),
            frame_len,
        };
        self.reply(id, leading, deadline, w, sent)
            .map_err(|e| Error::transport(op, e, w.timeout))?
            .map_err(|e| Error::remote(op, e))
    }

    /// Takes a slot (waiting, bounded by `deadline`, while `max_inflight` calls are in
    /// flight) and a request id; whether this caller took the read side too.
    fn enter(
        &self,
        deadline: Instant,
        w: &Wait,
    ) -> std::result::Result<(u64, bool), TransportError> {
        loop {
            let mut book = lock(&self.book);
            if let Some(f) = &book.dead {
                return match f.reply() {
                    Err(e) => Err(e),
                    // A refused connection reads as closed to calls that come after.
                    Ok(_) => Err(TransportError::Closed),
                };
            }
            if book.slots.len() < self.max_inflight {
                let id = book.next_id;
                book.next_id += 1;
                let leading = !book.leader;
                book.leader = true;
                book.slots.push(Slot {
                    id,
                    thread: (!leading).then(std::thread::current),
                    reply: None,
                });
                let n = book.slots.len();
                if n > self.peak.load(Ordering::Relaxed) {
                    self.peak.fetch_max(n, Ordering::Relaxed);
                }
                return Ok((id, leading));
            }
            if Instant::now() >= deadline {
                return Err(TransportError::Timeout);
            }
            book.room_waiters += 1;
            drop(book);
            w.hook.block(&mut || {
                let mut book = lock(&self.book);
                while book.slots.len() >= self.max_inflight && book.dead.is_none() {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    book = self
                        .room
                        .wait_timeout(book, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            });
            lock(&self.book).room_waiters -= 1;
        }
    }

    /// Writes request `id`, behind the session's queued releases and index reads; the frame's
    /// length.
    fn send(&self, id: u64, req: &Request) -> std::result::Result<usize, TransportError> {
        let mut tx = lock(&self.tx);
        tx.clear();
        if let Some(q) = &self.releases {
            q.encode_pending(&mut tx, crate::uses::IN_FRONT);
        }
        let start = tx.len();
        if let Err(e) = encode_request(&mut tx, id, req) {
            // What was pending still goes: releases must not be lost with a request too large.
            tx.truncate(start);
            let _ = self.write(&tx);
            return Err(e.into());
        }
        let written = self.write(&tx);
        if let Err(e) = written {
            // Part of the frame may be out: nothing more can go on this connection.
            let kept = TransportError::Io(io::Error::new(e.kind(), e.to_string()));
            self.fail(Failure::Transport(kept));
            return Err(TransportError::Io(e));
        }
        Ok(tx.len() - start)
    }

    /// Tells the server a request follows in about `in_time` (`Ahead`, answered with
    /// nothing), as any request goes: behind the queued releases and reads; a failed write
    /// fails the connection.
    pub fn tell_ahead(&self, in_time: Duration) {
        // A frame of one integer encodes; a failed write has failed the connection already.
        if self.send(0, &super::ahead(in_time)).is_ok() {
            self.announced.store(true, Ordering::Relaxed);
        }
    }

    fn write(&self, bytes: &[u8]) -> io::Result<()> {
        match &self.stream {
            Stream::Unix(s) => (&*s).write_all(bytes),
            Stream::Tcp(s) => (&*s).write_all(bytes),
        }
    }

    /// Waits for the reply to `id`: reads for everyone while this caller leads, else sleeps
    /// until the leader brings the reply or hands the read side over.
    fn reply(&self, id: u64, mut leading: bool, deadline: Instant, w: &Wait, sent: Sent) -> Reply {
        let grace = w.clock.grace(sent.frame_len, w.grace);
        // Only a call that read from the start measures a reply time.
        let mut sent = leading.then_some(sent);
        loop {
            if leading {
                return self.lead(id, deadline, grace, w, sent.take());
            }
            match self.follow(id, deadline, grace, w) {
                Step::Done(r) => return r,
                Step::Lead => leading = true,
            }
        }
    }

    /// As the leader: reads until `id`'s reply came (or the deadline passed, or the
    /// connection failed), delivering every other reply on the way, then hands over. The
    /// grace is spent in the caller's context; the rest of the wait, and the hand-over, run
    /// inside the hook, so that the others' replies are delivered, and the next leader reads,
    /// while this caller has given up its context (the GIL) and before it takes it back.
    fn lead(
        &self,
        id: u64,
        deadline: Instant,
        grace: Duration,
        w: &Wait,
        mut sent: Option<Sent>,
    ) -> Reply {
        let until = (Instant::now() + grace).min(deadline);
        // The grace, as a lent connection spends it: its tail must not reach the hook.
        let in_place = Wait {
            hook: &NoHook,
            ..*w
        };
        let mine = match lock(&self.read).as_mut() {
            Some(rd) => self.read_until(rd, id, until, &in_place, &mut sent, true),
            None => Some(Err(missing_read_side())),
        };
        if let Some(mine) = mine {
            self.finish(id, true);
            return mine;
        }
        let clock = w.clock;
        let mut mine = None;
        w.hook.block(&mut || {
            let quiet = quiet(clock);
            mine = self.lead_until(id, deadline, &quiet, &mut sent, true);
        });
        // A hook that did not run the wait leaves the read side to hand over here.
        self.finish(id, true);
        mine.unwrap_or(Err(TransportError::Timeout))
    }

    /// The leader's wait inside the hook: takes the read side, reads until `id`'s reply, a
    /// failure or `until`, and puts the read side back. Hands it over (gives up `id`'s slot) when the
    /// wait is over: the reply came, the connection failed, or `last` and `until` passed.
    fn lead_until(
        &self,
        id: u64,
        until: Instant,
        w: &Wait,
        sent: &mut Option<Sent>,
        last: bool,
    ) -> Option<Reply> {
        // Taken out of the lock, not borrowed through its guard: this runs inside the hook,
        // which takes only what can move to another thread.
        let taken = lock(&self.read).take();
        let mine = match taken {
            Some(mut rd) => {
                let mine = self.read_until(&mut rd, id, until, w, sent, false);
                *lock(&self.read) = Some(rd);
                mine
            }
            None => Some(Err(missing_read_side())),
        };
        if mine.is_some() || last {
            self.finish(id, true);
        }
        mine
    }

    /// Reads frames until `id`'s reply, a failure, or `until`; `None` when `until` passed.
    /// With `spin`, waits go through [`wait_readable`] (busy-polling where it may), else
    /// straight to `poll`.
    fn read_until(
        &self,
        rd: &mut ReadSide,
        id: u64,
        until: Instant,
        w: &Wait,
        sent: &mut Option<Sent>,
        spin: bool,
    ) -> Option<Reply> {
        let mut mine = None;
        loop {
            // Every whole frame buffered is delivered before this caller returns, so replies
            // that came with its own reach their callers without waiting for a next leader.
            loop {
                let frame = match rd.rx.take_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return Some(self.failed(TransportError::Decode(e))),
                };
                let (header, payload) = frame;
                let reply: Reply = decode_response(&header, payload)
                    .map(|r| match r {
                        Response::Error(e) => Err(e),
                        other => Ok(other),
                    })
                    .map_err(TransportError::from);
                if header.request_id == 0 {
                    // A refusal of the connection itself: the daemon closes it after this.
                    if let Ok(Err(e)) = reply {
                        self.fail(Failure::Refused(e.clone()));
                        return Some(Ok(Err(e)));
                    }
                    continue;
                }
                if header.request_id == id {
                    mine = Some(reply);
                    continue;
                }
                if let Err(e) = self.deliver(header.request_id, reply, id) {
                    return Some(self.failed(e));
                }
            }
            if mine.is_some() {
                return mine;
            }
            let now = Instant::now();
            if now >= until {
                return None;
            }
            let readable = if spin {
                if self.announced.swap(false, Ordering::Relaxed) {
                    rd.spin.spin_next();
                }
                match wait_readable(self.raw_fd(), until, until - now, w, &mut rd.spin) {
                    Ok(at) => at,
                    Err(TransportError::Timeout) => return None,
                    Err(e) => return Some(self.failed(e)),
                }
            } else {
                match poll_until(self.raw_fd(), until) {
                    Ok(true) => Instant::now(),
                    Ok(false) => return None,
                    Err(e) => return Some(self.failed(TransportError::Io(e))),
                }
            };
            if let Some(s) = sent.take() {
                w.clock.record(s.frame_len, readable - s.at);
            }
            let got = match &self.stream {
                Stream::Unix(s) => rd.rx.read_some(&mut &*s),
                Stream::Tcp(s) => rd.rx.read_some(&mut &*s),
            };
            match got {
                Ok(0) => return Some(self.failed(TransportError::Closed)),
                Ok(_) => {}
                Err(e) if read_again(&e) => {}
                Err(e) => return Some(self.failed(TransportError::Io(e))),
            }
        }
    }

    /// Puts the reply to request `rid` into its caller's slot and wakes the caller; a reply
    /// nobody waits for (its caller timed out) is dropped. A reply to a request never sent
    /// means the stream is out of step.
    fn deliver(
        &self,
        rid: u64,
        reply: Reply,
        reader: u64,
    ) -> std::result::Result<(), TransportError> {
        let mut book = lock(&self.book);
        if rid >= book.next_id {
            return Err(TransportError::Mismatch {
                expected: reader,
                got: rid,
            });
        }
        let Some(slot) = book.slots.iter_mut().find(|s| s.id == rid) else {
            return Ok(());
        };
        slot.reply = Some(reply);
        let thread = slot.thread.clone();
        drop(book);
        if let Some(t) = thread {
            t.unpark();
        }
        Ok(())
    }

    /// As a follower: sleeps until the reply comes, the read side is free, the connection
    /// failed or the deadline passed — for the grace in the caller's context, then inside
    /// the hook.
    fn follow(&self, id: u64, deadline: Instant, grace: Duration, w: &Wait) -> Step {
        let until = (Instant::now() + grace).min(deadline);
        if let Some(step) = self.sleep_until(id, until) {
            return step;
        }
        let (mut step, clock) = (None, w.clock);
        w.hook.block(&mut || {
            step = match self.sleep_until(id, deadline) {
                // Read at once, without taking the caller's context back first.
                Some(Step::Lead) => {
                    let quiet = quiet(clock);
                    let mine = self.lead_until(id, deadline, &quiet, &mut None, true);
                    Some(Step::Done(mine.unwrap_or(Err(TransportError::Timeout))))
                }
                other => other,
            }
        });
        match step.or_else(|| self.check(id)) {
            Some(s) => s,
            None => {
                self.finish(id, false);
                Step::Done(Err(TransportError::Timeout))
            }
        }
    }

    fn sleep_until(&self, id: u64, until: Instant) -> Option<Step> {
        loop {
            if let Some(step) = self.check(id) {
                return Some(step);
            }
            let now = Instant::now();
            if now >= until {
                return None;
            }
            std::thread::park_timeout(until - now);
        }
    }

    /// Whether the wait for `id` is over (its reply came, or the connection failed: its slot
    /// is given up) or this caller is to read now.
    fn check(&self, id: u64) -> Option<Step> {
        let mut book = lock(&self.book);
        let Some(pos) = book.slots.iter().position(|s| s.id == id) else {
            // Never so while its caller waits; a wait that lost its slot is over.
            return Some(Step::Done(Err(TransportError::Closed)));
        };
        if book.slots[pos].reply.is_some() || book.dead.is_some() {
            let reply = match book.slots[pos].reply.take() {
                Some(r) => r,
                None => book
                    .dead
                    .as_ref()
                    .map_or(Err(TransportError::Closed), Failure::reply),
            };
            let next = self.vacate(&mut book, pos, false);
            drop(book);
            self.wake(next);
            return Some(Step::Done(reply));
        }
        if !book.leader {
            book.leader = true;
            return Some(Step::Lead);
        }
        None
    }

    /// Gives up `id`'s slot (and the read side, if it leads).
    fn finish(&self, id: u64, leading: bool) {
        let mut book = lock(&self.book);
        let next = match book.slots.iter().position(|s| s.id == id) {
            Some(pos) => self.vacate(&mut book, pos, leading),
            None => (None, false),
        };
        drop(book);
        self.wake(next);
    }

    /// Removes slot `pos`; when the read side is (now) free, the oldest caller still waiting
    /// is to take it — its reply is the next to come. Returns who to wake and whether a
    /// caller waits for room.
    fn vacate(&self, book: &mut Book, pos: usize, leading: bool) -> (Option<Thread>, bool) {
        book.slots.swap_remove(pos);
        if leading {
            book.leader = false;
        }
        let next = if book.leader || book.dead.is_some() {
            None
        } else {
            book.slots
                .iter()
                .filter(|s| s.reply.is_none())
                .min_by_key(|s| s.id)
                .and_then(|s| s.thread.clone())
        };
        (next, book.room_waiters > 0)
    }

    fn wake(&self, (next, room): (Option<Thread>, bool)) {
        if let Some(t) = next {
            t.unpark();
        }
        if room {
            self.room.notify_one();
        }
    }

    /// Marks the connection failed with `e` and returns the reader's own copy.
    fn failed(&self, e: TransportError) -> Reply {
        let f = Failure::Transport(e);
        let mine = f.reply();
        self.fail(f);
        mine
    }

    /// Fails every call in flight: each waiter wakes and finds the failure.
    fn fail(&self, f: Failure) {
        let mut book = lock(&self.book);
        if book.dead.is_none() {
            book.dead = Some(f);
            self.dead.store(true, Ordering::Release);
        }
        let waiters: Vec<Thread> = book.slots.iter().filter_map(|s| s.thread.clone()).collect();
        drop(book);
        for t in waiters {
            t.unpark();
        }
        self.room.notify_all();
    }
}

mod shared;
#[cfg(test)]
mod tests;

pub(crate) use shared::Shared;
