//! The Maru client: [`MaruHandler`].
//!
//! A handler owns regions of shared memory it writes KV chunks into (one page per chunk, a
//! paged allocator per region), maps other instances' regions read-only to read theirs, and
//! talks to a metadata server about keys only: a store is one round trip carrying a key, a
//! region id, an offset and a length; a retrieve returns a [`View`] straight into the mapping.
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
//! [`WaitHook`], which a Python binding implements by releasing the GIL. Use [`MaruHandler::with_hook`] to run any operation with a hook.

mod alloc;
mod config;
mod error;
mod handler;
mod view;
mod watch;
mod wire;

pub use alloc::{PageAllocator, PageFreeError};
pub use config::{
    random_uuid4, ConfigError, MaruConfig, DEFAULT_REPLY_GRACE, DEFAULT_SERVER_URL, MIB,
};
pub use error::{
    AllocError, ConnectError, ErrorKind, FreeError, KeyError, OpError, RetrieveError, RpcError,
    StateError, StoreError,
};
pub use handler::{
    HandlerStats, Hooked, MaruHandler, OwnedRegionStats, RegionCallback, StoreItem, StoreOutcome,
};
pub use maru_proto::stats::ServerStats;
pub use maru_proto::{DeleteStatus, ErrorCode, Handle};
pub use view::{AllocHandle, PageId, View};
pub use wire::{NoHook, WaitHook};
