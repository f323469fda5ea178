//! Noticing the metadata server's loss without waiting for the application's next call.
//!
//! The metadata server owns every region at the resource manager. When it dies, the resource
//! manager's reaper reclaims its regions within a pass (~1 s) and carves the same pool space
//! for new instances, while this process still has its owned regions mapped read-write: a
//! later write through a page from `alloc()` (no round trip needed) would land in another
//! instance's values. So each connected handler runs one [`Watcher`]: a thread blocked reading
//! a connection of its own, joined to the instance session. The server never sends anything
//! unsolicited, so the read only returns when the connection ends; unless the handler is
//! closing, that means the server is gone, and the watcher [`Fence::lose`]s the session: every
//! owned mapping is detached from the pool in place (copy-on-write, see
//! [`Mapping::privatize`]) and later operations fail with an error that
//! [`is_server_lost`](crate::Error::is_server_lost).
//!
//! The watcher's connection counts as one of the session's connections at the server, which
//! ends a session on its last connection or on goodbye. It lives exactly as long as the
//! handler's session (close() stops it just before saying goodbye), so the session ends when
//! it did before: on goodbye, or when the process dies and the kernel closes its sockets.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use maru_shm::Mapping;
use maru_transport::Stream;

use crate::connections::read_again;

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
                 private); close() this handler and connect a new one"
            );
        }
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

/// The thread watching one session's own connection (see the module docs). Dropping it stops
/// the thread without reporting a loss.
pub(crate) struct Watcher {
    stopping: Arc<AtomicBool>,
    /// A second descriptor of the watched socket, to shut it down from here.
    socket: Stream,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Starts watching `stream`, a connection already joined to the session.
    pub fn start(stream: Stream, fence: Arc<Fence>) -> io::Result<Watcher> {
        let socket = stream.try_clone()?;
        // Block until the connection ends: no timeout (close() wakes the thread).
        stream.set_read_timeout(None)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("maru-watch".into())
            .spawn(move || watch(stream, &stop, &fence))?;
        Ok(Watcher {
            stopping,
            socket,
            thread: Some(thread),
        })
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

fn watch(mut stream: Stream, stopping: &AtomicBool, fence: &Fence) {
    let mut sink = [0u8; 256];
    let why = loop {
        match stream.read(&mut sink) {
            Ok(0) => break "the metadata server closed the connection".to_owned(),
            // Nothing is expected; whatever comes is not a reason to stop watching.
            Ok(_) => {}
            Err(e) if read_again(&e) => {}
            Err(e) => break format!("the connection to the metadata server failed: {e}"),
        }
        if stopping.load(Ordering::Acquire) {
            return;
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
        let mut w = Watcher::start(Stream::Unix(client), fence.clone()).unwrap();
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
        assert_eq!(server.read(&mut [0u8; 8]).unwrap(), 0);
        drop(w);
    }

    #[test]
    fn the_server_going_away_detaches_every_owned_mapping() {
        let (_dir, rw, ro) = region();
        let fence = Arc::new(Fence::default());
        fence.add(1, rw.clone());
        let (client, server) = UnixStream::pair().unwrap();
        let _w = Watcher::start(Stream::Unix(client), fence.clone()).unwrap();
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
