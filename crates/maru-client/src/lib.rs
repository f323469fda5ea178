//! The Maru client: [`MaruHandler`].
//!
//! This crate owns everything a client process holds: the handler's session with one
//! metadata server and its connection pool, the regions it owns with a page allocator each,
//! the mappings of other instances' regions it reads, and every key operation (store,
//! retrieve, exists, pin, delete — single and batched). A store is one round trip carrying a
//! key, a region id, an offset and a length; a retrieve returns a [`View`] straight into the
//! mapping. Errors of every operation are one [`Error`] with an [`ErrorKind`].
//!
//! It may not touch the pools (only the resource manager carves and frees regions; the
//! client maps what it is handed) nor the server's books (keys, reference counts, pins and
//! sessions change only through requests). The wire format is `maru_proto`'s and the
//! sockets, frame reader and busy-poll waits are `maru_transport`'s.
//!
//! ```no_run
//! use maru_client::{MaruConfig, MaruHandler};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let handler = MaruHandler::new(MaruConfig {
//!     server_url: "unix:///run/maru/server.sock".into(),
//!     ..MaruConfig::default()
//! })?;
//! handler.connect()?;
//!
//! // Zero copy: write into the page, then register the key (metadata only).
//! let data = b"hello world";
//! let handle = handler.alloc(data.len() as u64)?;
//! handle.write_at(0, data)?;
//! handler.store_handle(b"12345", &handle)?;
//!
//! // Or copy in: alloc + copy + register in one call.
//! handler.store_bytes(b"12346", b"header:", data)?;
//!
//! let view = handler.retrieve(b"12345")?.expect("just stored");
//! assert_eq!(view.to_vec(), data);
//! assert!(handler.exists(b"12346")?);
//! handler.delete(b"12345")?;
//! handler.close();
//! # Ok(()) }
//! ```
//!
//! Waiting for replies is GIL-aware: a call first waits a short bounded time
//! ([`MaruConfig::reply_grace`]) in its own context — polling the socket without sleeping
//! ([`MaruConfig::busy_poll`]) or in `ppoll` — and only then hands the rest of the wait to a
//! [`WaitHook`], which a Python binding implements by releasing the GIL. Use
//! [`MaruHandler::with_hook`] to run any operation with a hook.

mod alloc;
mod claims;
mod config;
mod connections;
mod error;
mod fork;
mod handler;
mod reply_clock;
mod uses;
mod view;
mod wait;
mod watch;

pub use alloc::PageAllocator;
pub use config::{
    random_uuid4, MaruConfig, DEFAULT_REPLY_GRACE, DEFAULT_SERVER_URL, MIB, POOL_PATH_ENV,
};
pub use error::{Error, ErrorKind, Result};
pub use handler::{
    HandlerStats, Hooked, MaruHandler, OwnedRegionStats, RegionCallback, StoreItem, StoreOutcome,
    REGION_FDS_ENV,
};
pub use maru_proto::stats::ServerStats;
pub use maru_proto::{DeleteStatus, ErrorCode, Handle};
pub use view::{AllocHandle, PageId, View};
pub use wait::{NoHook, WaitHook, MAX_REPLY_GRACE};
