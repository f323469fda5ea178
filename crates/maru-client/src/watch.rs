//! Noticing the metadata server's loss without waiting for the application's next call.
//!
//! The metadata server owns every region at the resource manager. When it dies, the resource
//! manager's reaper reclaims its regions within a pass (~1 s) and carves the same pool space
//! for new instances, while this process still has its owned regions mapped read-write: a
//! later write through a page from `alloc()` (no round trip needed) would land in another
//! instance's values. So each connected handler runs one [`Watcher`]: a thread reading a
//! connection of its own, joined to the session and made its *watch connection* (`Watch`).
//! The server writes only notices there — pages returned to this owner ([`Returns`]) and the
//! answers to `Watch` — and the thread sends the releases of dropped views that no request
//! carried within 50 ms. When the connection ends, unless the handler is closing, the server
//! is gone, and the watcher [`Fence::lose`]s the session: every
//! owned mapping is detached from the pool in place (copy-on-write, see
//! [`Mapping::privatize`]). The next operation tries to resume the session at a restarted
//! server (see `handler::connected`), which maps the regions it gets back afresh, shared;
//! when that fails, operations fail with an error that
//! [`is_server_lost`](crate::Error::is_server_lost).
//!
//! The watcher's connection counts as one of the session's connections at the server, which
//! ends a session on its last connection or on goodbye. It lives exactly as long as the
//! handler's session (close() stops it just before saying goodbye), so the session ends when
//! it did before: on goodbye, or when the process dies and the kernel closes its sockets.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use maru_proto::{decode_response, encode_request, PageRef, Request, Response};
use maru_shm::Mapping;
use maru_transport::{busy, FrameBuf, Stream};

use crate::claims::ReleaseQueue;
use crate::connections::read_again;
use crate::wait::WaitHook;

/// The owned mappings to detach from the pool when the session ends or is lost, under a
/// small lock of their own: the watcher must never wait on the handler's write lock, which a
/// caller blocked on the dead server may hold.
#[derive(Default)]
pub(crate) struct Fence {
    state: Mutex<FenceState>,
    /// Set once the server was lost, after every owned mapping was detached.
    lost: AtomicBool,
}

#[derive(Default)]
struct FenceState {
    /// `(region_id, mapping)` of every owned region.
    mappings: Vec<(u64, Arc<Mapping>)>,
    /// Every mapping was privatized (and any added later is, at once).
    detached: bool,
}

fn privatize(region_id: u64, m: &Mapping, why: &str) {
    if let Err(e) = m.privatize() {
        tracing::warn!("could not detach region {region_id} ({why}): {e}");
    }
}

impl Fence {
    fn state(&self) -> MutexGuard<'_, FenceState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tracks a newly mapped owned region. Once detached, a late arrival is detached at once.
    pub fn add(&self, region_id: u64, mapping: Arc<Mapping>) {
        let mut st = self.state();
        if st.detached {
            privatize(region_id, &mapping, "the session is over");
        }
        st.mappings.push((region_id, mapping));
    }

    /// Stops tracking a region given back, and cuts its mapping's writes off from the pool
    /// now: the region is about to be carved for another owner, and a buffer over it that
    /// outlives this call must never write there.
    pub fn forget(&self, region_id: u64) {
        let mut st = self.state();
        let detached = st.detached;
        st.mappings.retain(|(id, m)| {
            if *id == region_id && !detached {
                privatize(*id, m, "the region was given back");
            }
            *id != region_id
        });
    }

    /// Cuts every owned mapping's writes off from the pool, once: reads keep working, writes
    /// stay private. Later calls (and their callers) wait for the first to finish.
    pub fn detach(&self, why: &str) {
        let mut st = self.state();
        if std::mem::replace(&mut st.detached, true) {
            return;
        }
        for (id, m) in &st.mappings {
            privatize(*id, m, why);
        }
    }

    /// The server is gone (or ended our session): detach, then mark the session lost.
    pub fn lose(&self, why: &str) {
        self.detach("the metadata server was lost");
        if !self.lost.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                "maru: {why}; owned regions were detached from the pool (writes to them stay \
                 private); the next call tries to resume the session at a restarted server"
            );
        }
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

/// Items waiting for another thread to take them (what the watcher received, releases to
/// send): a list behind a flag, so that taking from an empty one costs one atomic load and
/// no lock.
#[derive(Debug)]
pub(crate) struct Inbox<T> {
    items: Mutex<Vec<T>>,
    any: AtomicBool,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        Inbox {
            items: Mutex::new(Vec::new()),
            any: AtomicBool::new(false),
        }
    }
}

impl<T> Inbox<T> {
    pub fn add(&self, items: impl IntoIterator<Item = T>) {
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(items);
        self.any.store(true, Ordering::Release);
    }

    /// Everything received so far.
    pub fn take(&self) -> Vec<T> {
        if !self.any.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        self.any.store(false, Ordering::Release);
        std::mem::take(&mut *items)
    }

    fn pending(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }
}

/// Pages the server returned to this handler (their key is gone and no view holds them),
/// waiting for the write lock to put them back on the free lists, and how far the watch
/// connection's answers have come.
#[derive(Default)]
pub(crate) struct Returns {
    pages: Inbox<PageRef>,
    /// Request id of the latest `Watch` answered on the watch connection.
    synced: Mutex<u64>,
    answered: Condvar,
}

impl Returns {
    fn add(&self, pages: Vec<PageRef>) {
        self.pages.add(pages);
    }

    /// Every page returned so far (no lock taken when there is none).
    pub fn take(&self) -> Vec<PageRef> {
        self.pages.take()
    }

    fn answered(&self, id: u64) {
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        *synced = (*synced).max(id);
        self.answered.notify_all();
    }
}

/// Regions the server asked back (`Reclaim` notices), waiting for the write lock, and what
/// the watcher calls to act on them.
#[derive(Default)]
pub(crate) struct Reclaims {
    ids: Inbox<u64>,
    /// Gives back what can be given back now; true while some region asked back still waits
    /// for its pages (the watcher then calls it again on its next tick). Set once the
    /// handler is built.
    act: OnceLock<GiveBackFn>,
}

/// See [`Reclaims::act`].
pub(crate) type GiveBackFn = Box<dyn Fn() -> bool + Send + Sync>;

impl Reclaims {
    /// Every region asked back so far (no lock taken when there is none). Taken *after* the
    /// page returns a caller is about to use: the server sends a region's `Reclaim` before
    /// the pages its evictions freed there, so a caller never hands out such a page without
    /// knowing that its region is asked back.
    pub fn take(&self) -> Vec<u64> {
        self.ids.take()
    }

    pub fn set_action(&self, act: GiveBackFn) {
        let _ = self.act.set(act);
    }

    fn act(&self) -> bool {
        self.act.get().is_some_and(|f| f())
    }
}

/// What callers share with the watcher thread: the watch connection's write side (releases
/// and syncs go out on it), and the pages and region requests it brought back.
pub(crate) struct WatchLink {
    writer: Mutex<Stream>,
    next_sync: AtomicU64,
    pub returns: Returns,
    pub reclaims: Reclaims,
    releases: Arc<ReleaseQueue>,
}

impl WatchLink {
    /// Sends the releases and index reads queued so far on the watch connection (no reply),
    /// followed by `then` in the same write.
    fn flush_releases(&self, then: &[u8]) -> bool {
        let mut frame = Vec::new();
        self.releases.encode_pending(&mut frame, usize::MAX);
        if frame.is_empty() && then.is_empty() {
            return true;
        }
        frame.extend_from_slice(then);
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        // A failed write means the connection is ending; the session's end releases every
        // hold anyway (sending them again could release a hold twice).
        w.write_all(&frame).is_ok()
    }

    /// Gives region `region_id` back to the server (`GiveBack`, answered with nothing), after
    /// the releases queued so far. False when the connection is ending (the session's end
    /// then releases the region anyway).
    pub fn give_back(&self, region_id: u64) -> bool {
        let mut frame = Vec::new();
        if encode_request(&mut frame, 0, &Request::GiveBack { region_id }).is_err() {
            return false;
        }
        self.flush_releases(&frame)
    }

    /// Waits (at most `timeout`) until every page return the server queued before now has
    /// reached [`WatchLink::returns`]: the server answers a `Watch` on this connection after
    /// the notices queued before it. False when the answer did not come in time.
    pub fn sync(&self, hook: &dyn WaitHook, timeout: Duration) -> bool {
        let id = self.next_sync.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        if encode_request(&mut frame, id, &Request::Watch).is_err() {
            return false;
        }
        // Our own views' releases first: the pages they free come back before the answer.
        if !self.flush_releases(&frame) {
            return false;
        }
        let deadline = Instant::now() + timeout;
        let mut done = false;
        hook.block(&mut || {
            let mut synced = self
                .returns
                .synced
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            while *synced < id {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return;
                }
                synced = self
                    .returns
                    .answered
                    .wait_timeout(synced, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            done = true;
        });
        done
    }
}

/// How often an idle watcher sends the releases queued meanwhile.
const RELEASE_TICK: Duration = Duration::from_millis(50);

/// The thread watching one session's own connection (see the module docs). Dropping it stops
/// the thread without reporting a loss.
pub(crate) struct Watcher {
    stopping: Arc<AtomicBool>,
    /// A second descriptor of the watched socket, to shut it down from here.
    socket: Stream,
    /// The watched socket's descriptor, owned by the thread.
    watched: RawFd,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Makes `stream`, a connection already joined to the session, its watch connection and
    /// starts watching it.
    pub fn start(
        stream: Stream,
        fence: Arc<Fence>,
        releases: Arc<ReleaseQueue>,
    ) -> io::Result<(Watcher, Arc<WatchLink>)> {
        let socket = stream.try_clone()?;
        let watched = stream.as_raw_fd();
        let link = Arc::new(WatchLink {
            writer: Mutex::new(stream.try_clone()?),
            next_sync: AtomicU64::new(1),
            returns: Returns::default(),
            reclaims: Reclaims::default(),
            releases,
        });
        // A safety net only: every read follows a poll that saw bytes.
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut hello = Vec::new();
        let id = link.next_sync.fetch_add(1, Ordering::Relaxed);
        encode_request(&mut hello, id, &Request::Watch)
            .map_err(|e| io::Error::other(e.to_string()))?;
        link.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&hello)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let l = link.clone();
        let thread = std::thread::Builder::new()
            .name("maru-watch".into())
            .spawn(move || watch(stream, &stop, &fence, &l))?;
        Ok((
            Watcher {
                stopping,
                socket,
                watched,
                thread: Some(thread),
            },
            link,
        ))
    }

    /// Both descriptors of the watched socket (for a forked child to close its copies).
    pub fn raw_fds(&self) -> [RawFd; 2] {
        [self.socket.as_raw_fd(), self.watched]
    }

    /// Stops the thread (a normal close: not a loss) and waits for it.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // Shutting the socket down wakes the blocked read; the server sees the connection
        // close.
        let _ = self.socket.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop();
    }
}

fn watch(mut stream: Stream, stopping: &AtomicBool, fence: &Fence, link: &WatchLink) {
    let mut rx = FrameBuf::new();
    let fd = stream.as_raw_fd();
    // A region asked back still waits for pages in the handler's hands.
    let mut giving_back = false;
    let why = 'watching: loop {
        if stopping.load(Ordering::Acquire) {
            return;
        }
        link.flush_releases(&[]);
        if giving_back || link.reclaims.ids.pending() {
            giving_back = link.reclaims.act();
        }
        match busy::poll_readable(fd, RELEASE_TICK) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) if read_again(&e) => continue,
            Err(e) => break format!("the connection to the metadata server failed: {e}"),
        }
        match rx.read_some(&mut stream) {
            Ok(0) => break "the metadata server closed the connection".to_owned(),
            Ok(_) => {}
            Err(e) if read_again(&e) => {}
            Err(e) => break format!("the connection to the metadata server failed: {e}"),
        }
        loop {
            match rx.take_frame() {
                Ok(Some((header, payload))) => match decode_response(&header, payload) {
                    Ok(Response::ReturnPages(pages)) => link.returns.add(pages),
                    Ok(Response::Reclaim { region_id }) => link.reclaims.ids.add([region_id]),
                    Ok(Response::Ok) => link.returns.answered(header.request_id),
                    // Nothing else is expected; a refusal says the session is gone, which
                    // the connection's end will show.
                    Ok(_) | Err(_) => {}
                },
                Ok(None) => break,
                Err(e) => break 'watching format!("bad frame from the metadata server: {e}"),
            }
        }
    };
    if !stopping.load(Ordering::Acquire) {
        fence.lose(&why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use maru_shm::MapMode;

    /// A 2-page file, a read-write mapping of it (as an owned region is) and a read-only one
    /// (what everyone else sees of the pool).
    fn region() -> (tempfile::TempDir, Arc<Mapping>, Mapping) {
        let dir = tempfile::Builder::new()
            .prefix("maru-watch-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let path = dir.path().join("pool");
        std::fs::File::create(&path).unwrap().set_len(8192).unwrap();
        let rw = Mapping::map(&path, 0, 8192, MapMode::ReadWrite, true).unwrap();
        let ro = Mapping::map(&path, 0, 8192, MapMode::ReadOnly, false).unwrap();
        (dir, Arc::new(rw), ro)
    }

    /// Whether a write through `rw` reaches the pool.
    fn shared(rw: &Mapping, ro: &Mapping, stamp: &[u8; 8]) -> bool {
        rw.write_at(100, stamp).unwrap();
        let mut seen = [0u8; 8];
        ro.read_at(100, &mut seen).unwrap();
        &seen == stamp
    }

    #[test]
    fn stopping_the_watcher_is_no_loss() {
        let (_dir, rw, ro) = region();
        let fence = Arc::new(Fence::default());
        fence.add(1, rw.clone());
        let (client, mut server) = UnixStream::pair().unwrap();
        let (mut w, _) =
            Watcher::start(Stream::Unix(client), fence.clone(), Default::default()).unwrap();
        w.stop();
        assert!(
            !fence.is_lost(),
            "a normal stop was taken for the server's loss"
        );
        assert!(shared(&rw, &ro, b"stopped!"), "stop detached the mappings");
        // The server sees the watched connection close.
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // (after the watch request the watcher sent first)
        let mut sent = Vec::new();
        std::io::Read::read_to_end(&mut server, &mut sent).unwrap();
        assert_eq!(sent.len(), maru_proto::HEADER_LEN, "only the watch request");
        drop(w);
    }

    #[test]
    fn the_server_going_away_detaches_every_owned_mapping() {
        let (_dir, rw, ro) = region();
        let fence = Arc::new(Fence::default());
        fence.add(1, rw.clone());
        let (client, server) = UnixStream::pair().unwrap();
        let _w = Watcher::start(Stream::Unix(client), fence.clone(), Default::default()).unwrap();
        assert!(shared(&rw, &ro, b"attached"));
        drop(server);
        assert!(
            maru_testkit::wait_until(Duration::from_secs(5), || fence.is_lost()),
            "the loss was not noticed"
        );
        assert!(!shared(&rw, &ro, b"detached"), "a write reached the pool");
        let mut seen = [0u8; 8];
        rw.read_at(100, &mut seen).unwrap();
        assert_eq!(&seen, b"detached", "reads through the mapping still work");
        // A region mapped after the loss is detached as it arrives.
        let (_dir2, late, late_ro) = region();
        fence.add(2, late.clone());
        assert!(!shared(&late, &late_ro, b"too late"));
    }
}
