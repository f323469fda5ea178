//! [`MaruHandler`]: its lifecycle (not connected, connected, closed) and the operations, each
//! concept in a file of its own:
//!
//! - `connected`: the live state of a connected handler ([`Connected`]: the session's
//!   connection pool, fence and watcher), connect and close;
//! - `owned`: the regions this handler owns, their page allocators, alloc and free;
//! - `mapped`: mappings of every region the handler reads, and the views into them;
//! - `store`: registering pages under keys (synchronously), single and batched; `ahead`: its
//!   long copies, which tell the server the registration is coming;
//! - `write_behind`: registrations whose replies are collected later, and flush;
//! - `read`: retrieve, exists, pins and delete, single and batched;
//! - `stats`: the server's statistics with this handler's allocator state.
//!
//! Locking, from outside in (a lock is only ever taken while holding the ones before it):
//! `transition` (connect/close) → `lifecycle` (brief) → `Connected::owned` (the write lock:
//! allocators and the key ↔ page books; held across a store's round trip, which serialises
//! writes) → `Connected::mapped` (brief) → the connection pool (brief) → `Connected::fence`
//! (brief). Reads (retrieve, exists) take only the brief ones, so they run concurrently,
//! each on its own pooled connection. The session's watcher thread (see [`crate::watch`])
//! takes only the fence's lock, so it never waits for a caller blocked on a dead server.
//!
//! Any lock that may be held across a [`WaitHook`] wait is taken with [`lock_hooked`], which
//! waits through the hook: a Python thread holding the GIL must never block on a lock whose
//! holder needs the GIL back to finish.

mod ahead;
mod connected;
mod index_hold;
mod index_read;
mod mapped;
mod owned;
mod pool_check;
mod read;
mod region_fd;
mod stats;
mod store;
mod write_behind;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use maru_proto::{DeleteStatus, ServerUrl, MAX_KEY_LEN};
use maru_transport::local_identity;

use crate::config::MaruConfig;
use crate::connections::Identity;
use crate::error::{Error, Result};
use crate::view::{AllocHandle, PageId, View};
use crate::wait::{lock_hooked, NoHook, WaitHook};

use connected::Connected;
pub use region_fd::REGION_FDS_ENV;
pub use stats::{HandlerStats, OwnedRegionStats};
pub use store::{StoreItem, StoreOutcome};

/// Called with `(region_id, page_count)` for every region this handler comes to own.
pub type RegionCallback = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Regions added during an operation, `(region_id, page_count)`, reported to the callback
/// once the operation's locks are released.
type Added = Vec<(u64, u64)>;

/// Where a handler is in its life: it connects once and closes once.
enum Lifecycle {
    Idle { last_error: Option<String> },
    Connected(Arc<Connected>),
    Closed,
}

/// A Maru client: owns regions it writes into, maps other instances' regions to read, and
/// talks to one metadata server. `Sync`: share it across threads (e.g. in an `Arc`).
pub struct MaruHandler {
    config: MaruConfig,
    url: ServerUrl,
    identity: Identity,
    lifecycle: RwLock<Lifecycle>,
    /// Serialises connect and close.
    transition: Mutex<()>,
    on_region_added: Mutex<Option<RegionCallback>>,
}

/// A borrowed handler whose waits go through a [`WaitHook`]. Every operation of
/// [`MaruHandler`] is here; the handler's own methods use [`NoHook`].
pub struct Hooked<'a> {
    h: &'a MaruHandler,
    hook: &'a dyn WaitHook,
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// Runs the body of the public operation `op`; an error it ends with names `op`.
fn during<T>(op: &'static str, body: impl FnOnce() -> Result<T>) -> Result<T> {
    body().map_err(|e| e.during(op))
}

/// A key the protocol can carry: not empty, at most [`MAX_KEY_LEN`] bytes.
fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid("key", "empty key"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::invalid(
            "key",
            format!(
                "key of {} bytes exceeds the limit of {MAX_KEY_LEN}",
                key.len()
            ),
        ));
    }
    Ok(())
}

fn check_keys(keys: &[&[u8]]) -> Result<()> {
    keys.iter().try_for_each(|k| check_key(k))
}

impl MaruHandler {
    /// A handler for `config` (validated here), not connected yet.
    pub fn new(config: MaruConfig) -> Result<MaruHandler> {
        let url = config.validate()?;
        let secret = config.cluster_secret()?;
        let (host, pid, start_time) = local_identity();
        Ok(MaruHandler {
            identity: Identity {
                instance_id: config.instance_id.clone(),
                namespace: config.namespace.clone(),
                host,
                pid,
                start_time,
                secret,
            },
            config,
            url,
            lifecycle: RwLock::new(Lifecycle::Idle { last_error: None }),
            transition: Mutex::new(()),
            on_region_added: Mutex::new(None),
        })
    }

    /// Waits of the returned adapter's calls go through `hook`.
    pub fn with_hook<'a>(&'a self, hook: &'a dyn WaitHook) -> Hooked<'a> {
        Hooked { h: self, hook }
    }

    pub fn config(&self) -> &MaruConfig {
        &self.config
    }
    pub fn instance_id(&self) -> &str {
        &self.config.instance_id
    }
    pub fn chunk_size(&self) -> u64 {
        self.config.chunk_size_bytes
    }
    /// Connected, not closing, and the server was not lost.
    pub fn is_connected(&self) -> bool {
        matches!(&*read(&self.lifecycle),
            Lifecycle::Connected(c) if c.check_open().is_ok() && !c.birth.inherited())
    }
    pub fn is_closed(&self) -> bool {
        matches!(&*read(&self.lifecycle), Lifecycle::Closed)
    }

    /// The live state, for an operation that needs a connected handler; a resume after the
    /// server's loss waits through `hook`.
    fn connected(&self, hook: &dyn WaitHook) -> Result<Arc<Connected>> {
        match &*read(&self.lifecycle) {
            Lifecycle::Connected(c) if c.birth.inherited() => {}
            Lifecycle::Connected(c) => match c.check_open() {
                Ok(()) => return Ok(c.clone()),
                Err(e) if e.is_server_lost() && !c.resume_refused.load(Ordering::Acquire) => {}
                Err(e) => return Err(e),
            },
            Lifecycle::Idle { last_error } => {
                return Err(Error::not_connected(last_error.as_deref()))
            }
            Lifecycle::Closed => return Err(Error::closed()),
        }
        let lost = match &*read(&self.lifecycle) {
            Lifecycle::Connected(c) if !c.birth.inherited() => Some(c.clone()),
            _ => None,
        };
        if let Some(c) = lost {
            return self.resume(c, hook);
        }
        self.after_fork(hook)
    }

    /// The server was lost: once, under the transition lock, the session is taken up again
    /// at the restarted server (see `Hooked::resume`); callers that come meanwhile wait for
    /// it, bounded by the timeout of the resume's own connects and replies.
    fn resume(&self, lost: Arc<Connected>, hook: &dyn WaitHook) -> Result<Arc<Connected>> {
        let _transition = lock_hooked(&self.transition, hook);
        match &*read(&self.lifecycle) {
            Lifecycle::Connected(c) if !Arc::ptr_eq(c, &lost) => {
                c.check_open()?;
                return Ok(c.clone());
            }
            Lifecycle::Connected(_) => {}
            Lifecycle::Idle { last_error } => {
                return Err(Error::not_connected(last_error.as_deref()))
            }
            Lifecycle::Closed => return Err(Error::closed()),
        }
        if lost.resume_refused.load(Ordering::Acquire) {
            return Err(Error::server_lost());
        }
        let fresh = self.with_hook(hook).resume(&lost).map_err(|e| {
            tracing::debug!("maru: the session could not be resumed: {e}");
            Error::server_lost()
        })?;
        *write(&self.lifecycle) = Lifecycle::Connected(fresh.clone());
        Ok(fresh)
    }

    /// In a forked child: the session is the parent's. Refused, or (with
    /// `reconnect_after_fork`) given up and replaced by a session of the child's own.
    fn after_fork(&self, hook: &dyn WaitHook) -> Result<Arc<Connected>> {
        if !self.config.reconnect_after_fork {
            return Err(Error::forked());
        }
        {
            let mut life = write(&self.lifecycle);
            if matches!(&*life, Lifecycle::Connected(c) if c.birth.inherited()) {
                let idle = Lifecycle::Idle { last_error: None };
                if let Lifecycle::Connected(c) = std::mem::replace(&mut *life, idle) {
                    c.abandon_after_fork();
                }
            }
        }
        self.with_hook(hook).connect()?;
        self.connected(hook)
    }

    fn callback(&self) -> Option<RegionCallback> {
        self.on_region_added
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn fire(&self, added: &[(u64, u64)]) {
        if added.is_empty() {
            return;
        }
        if let Some(cb) = self.callback() {
            for &(id, pages) in added {
                cb(id, pages);
            }
        }
    }
}

macro_rules! forward {
    ($($(#[$m:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        impl MaruHandler {
            $(
                $(#[$m])*
                pub fn $name(&self $(, $arg: $ty)*) -> $ret {
                    self.with_hook(&NoHook).$name($($arg),*)
                }
            )*
        }
    };
}

forward! {
    /// Connects: handshake, the session's watcher and, with `eager_map`, every live region.
    /// No owned region yet (the first `alloc` asks for one of `pool_size` bytes), so a
    /// handler connects to a full pool and reads, pins and deletes there. Connecting a
    /// connected handler does nothing.
    fn connect(&self) -> Result<()>;
    /// Takes a page for a value of `size` bytes (at most the chunk size). With no free page,
    /// asks the server for a region; an [`ErrorKind::Exhausted`](crate::ErrorKind) error when
    /// the pool has none.
    fn alloc(&self, size: u64) -> Result<AllocHandle>;
    /// Returns a page. A page never stored goes back at once; a stored one is freed by
    /// deleting its key, and comes back (from the server) once no view holds it.
    fn free(&self, page: PageId) -> Result<()>;
    /// Registers an alloc'ed, written page under `key` (one round trip, no copy).
    fn store_handle(&self, key: &[u8], handle: &AllocHandle) -> Result<StoreOutcome>;
    /// See [`Hooked::flush`].
    fn flush(&self) -> Result<()>;
    /// Registers `len` bytes of an alloc'ed page under `key`.
    fn store_page(&self, key: &[u8], page: PageId, len: u64) -> Result<StoreOutcome>;
    /// Copies `prefix` then `data` into a fresh page and registers it under `key`.
    fn store_bytes(&self, key: &[u8], prefix: &[u8], data: &[u8]) -> Result<StoreOutcome>;
    /// Stores many entries with one round trip per `MAX_BATCH` entries.
    fn batch_store(&self, items: &[(&[u8], StoreItem<'_>)]) -> Result<Vec<StoreOutcome>>;
    /// A view of `key`'s value, or `None` if the key does not exist.
    fn retrieve(&self, key: &[u8]) -> Result<Option<View>>;
    fn batch_retrieve(&self, keys: &[&[u8]]) -> Result<Vec<Option<View>>>;
    fn exists(&self, key: &[u8]) -> Result<bool>;
    fn batch_exists(&self, keys: &[&[u8]]) -> Result<Vec<bool>>;
    /// How many leading keys of `keys` exist (a prefix match stops at the first miss).
    fn prefix_len(&self, keys: &[&[u8]]) -> Result<usize>;
    /// Copies `key`'s value into `buf`: its length, or `None` if the key does not exist.
    /// From the server's key index without a round trip when this host maps it (see
    /// [`Hooked::retrieve_into`]); takes no hold (the copy is checked instead).
    fn retrieve_into(&self, key: &[u8], buf: &mut [u8]) -> Result<Option<usize>>;
    /// [`MaruHandler::retrieve_into`] for many keys, each into its own buffer.
    fn batch_retrieve_into(&self, keys: &[&[u8]], bufs: &mut [&mut [u8]]) -> Result<Vec<Option<usize>>>;
    /// Whether existence checks and copy-out reads are answered from the server's key index
    /// (mapped on this host) rather than by a round trip.
    fn reads_index(&self) -> bool;
    /// Deletes `key`. The status says what happened: [`DeleteStatus::Deleted`],
    /// [`DeleteStatus::NotFound`], or [`DeleteStatus::Pinned`] (some session holds a pin on
    /// it; the key stays).
    fn delete(&self, key: &[u8]) -> Result<DeleteStatus>;
    fn batch_delete(&self, keys: &[&[u8]]) -> Result<Vec<DeleteStatus>>;
    /// Pins `key` against deletion and eviction for this handler's session, as a lease: it
    /// ends with [`MaruHandler::unpin`], with the session, or when the server's pin TTL
    /// passes without [`MaruHandler::renew_pins`]. False if the key does not exist.
    fn pin(&self, key: &[u8]) -> Result<bool>;
    fn batch_pin(&self, keys: &[&[u8]]) -> Result<Vec<bool>>;
    /// Takes away one of this handler's pins of `key`; false if it holds none (another
    /// handler's pins are never affected).
    fn unpin(&self, key: &[u8]) -> Result<bool>;
    /// Renews every pin of this handler's session (see [`MaruHandler::pin`]).
    fn renew_pins(&self) -> Result<()>;
    /// Whether the page at `offset` of `region_id` still holds the registration of
    /// `generation` ([`View::generation`]). A view from `retrieve` needs no such check (it
    /// holds its page); a reader that kept only an address asks this after reading.
    fn page_current(&self, region_id: u64, offset: u64, generation: u64) -> Result<bool>;
    fn batch_unpin(&self, keys: &[&[u8]]) -> Result<Vec<bool>>;
    /// Connected and the server answers a heartbeat.
    fn healthcheck(&self) -> bool;
    fn stats(&self) -> Result<HandlerStats>;
    /// See [`HandlerStats::peak_inflight`] (no round trip; 0 when not connected).
    fn peak_inflight(&self) -> usize;
    /// Allocator state of every owned region (empty when not connected).
    fn owned_regions(&self) -> Vec<OwnedRegionStats>;
    /// Pages of a region: an owned region's allocator size, else the mapped size / stride.
    fn region_page_count(&self, region_id: u64) -> Option<u64>;
    /// A view of `len` bytes at `offset` of a mapped region (`None` if unmapped or outside).
    fn buffer(&self, region_id: u64, offset: u64, len: u64) -> Option<View>;
}

impl MaruHandler {
    /// Rejects new operations, waits for in-flight writes, says goodbye and drops the owned
    /// state. Views still alive keep their mappings. Never fails; idempotent.
    pub fn close(&self) {
        self.with_hook(&NoHook).close()
    }

    /// Sets (or clears) the callback for new owned regions; replays it for existing ones.
    pub fn set_on_region_added(&self, callback: Option<RegionCallback>) {
        self.with_hook(&NoHook).set_on_region_added(callback)
    }
}

impl Hooked<'_> {
    pub fn set_on_region_added(&self, callback: Option<RegionCallback>) {
        *self
            .h
            .on_region_added
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = callback.clone();
        if let Some(cb) = callback {
            for r in self.owned_regions() {
                cb(r.region_id, r.page_count);
            }
        }
    }
}

impl Drop for MaruHandler {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn keys_the_protocol_cannot_carry_are_refused() {
        check_key(b"k").unwrap();
        check_key(&[b'x'; MAX_KEY_LEN]).unwrap();
        let e = check_key(b"").unwrap_err();
        assert_eq!(
            (e.kind(), e.to_string()),
            (ErrorKind::InvalidArgument, "empty key".into())
        );
        let e = check_keys(&[b"ok", &[b'x'; MAX_KEY_LEN + 1]]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            e.to_string(),
            format!(
                "key of {} bytes exceeds the limit of {MAX_KEY_LEN}",
                MAX_KEY_LEN + 1
            )
        );
    }

    #[test]
    fn an_operation_names_itself_in_its_errors() {
        let e = during("exists", || check_key(b"")).unwrap_err();
        assert_eq!(e.op(), "exists");
        // The outermost operation wins (store_handle runs store_page).
        let e = during("store_handle", || during("store_page", || check_key(b""))).unwrap_err();
        assert_eq!(e.op(), "store_handle");
    }

    #[test]
    fn a_handler_that_never_connected_says_why_it_cannot_run() {
        let h = MaruHandler::new(MaruConfig {
            server_url: "unix:///nonexistent/maru.sock".into(),
            ..MaruConfig::default()
        })
        .unwrap();
        assert!(!h.is_connected() && !h.is_closed());
        let e = h.exists(b"k").unwrap_err();
        assert_eq!((e.kind(), e.op()), (ErrorKind::State, "exists"));
        assert!(e.to_string().contains("call connect() first"), "{e}");
        let e = h.connect().unwrap_err();
        assert_eq!((e.kind(), e.op()), (ErrorKind::Transport, "connect"));
        let e = h.alloc(1).unwrap_err();
        assert!(
            e.to_string()
                .contains("last connect failed: cannot connect"),
            "{e}"
        );
        h.close();
        let e = h.retrieve(b"k").unwrap_err();
        assert!(e.is_closed() && h.is_closed(), "{e}");
        assert!(h.owned_regions().is_empty() && !h.healthcheck());
    }

    #[test]
    fn a_refused_configuration_is_an_invalid_argument() {
        let e = MaruHandler::new(MaruConfig {
            chunk_size_bytes: 0,
            ..MaruConfig::default()
        })
        .err()
        .expect("a zero chunk size is refused");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(e.to_string(), "invalid chunk_size_bytes: must be positive");
    }
}
