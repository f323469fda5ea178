//! The Maru metadata server: the control plane of one application group.
//!
//! It owns the group's metadata and nothing else:
//!
//! * **sessions** — which instance is connected, over how many connections, with which token;
//! * **the region table** — the regions it allocated from the resource manager on its clients'
//!   behalf, who owns each, how many keys point into each, and when each may go back: only
//!   once its owner is gone **and** no key references it (deferred freeing);
//! * **the key registry** — key → (region, offset, length), write-once, with pins;
//! * **the wire service** — one request in, one reply out, over TCP and a Unix socket;
//! * **metrics and stats** — counts, per-operation latencies, Prometheus exposition.
//!
//! It may not touch KV bytes or pools. Clients write and read chunks through their own
//! mappings; pools, extents, tokens and the reclaiming of dead owners' regions belong to the
//! resource manager (`maru-resource-manager`). This server only asks it for regions, gives
//! them back, and lists its regions and pool statistics.
//!
//! It is a library with a thin binary (`maru-server`), so tests and embedded mode (`maru up`)
//! run it in-process:
//!
//! ```no_run
//! let server = maru_server::start(maru_server::ServerConfig {
//!     tcp: Some("127.0.0.1:0".parse().unwrap()),
//!     rm_url: "tcp://127.0.0.1:9850".parse().unwrap(),
//!     ..Default::default()
//! })
//! .unwrap();
//! println!("serving on {}", server.url());
//! server.shutdown();
//! ```
//!
//! Layout, one concept per file:
//!
//! * `state/` — sessions, regions, freeing (pending frees, reconcile), keys, stats; the locks
//!   and invariants are in `state/mod.rs`;
//! * [`registry`] — the key registry behind one narrow trait;
//! * `service` — one request → one reply; `reply` — zero-copy encoders of the replies that
//!   carry regions;
//! * `conn` — a connection's thread; `busy_poll` — its wait for the next request; `slice` —
//!   the short scheduler slice it asks for;
//! * `server` — start and shutdown; `config`; `admission` — accept loops and the client limit;
//!   `unix_socket`; `maintenance` — retries, pings and reconciles between requests;
//!   `evictor` — keeps the pool between the eviction watermarks ([`eviction`]);
//! * `resource_manager` — the resource manager behind a small trait;
//! * `metrics`; [`cli`].

mod admission;
mod busy_poll;
pub mod cli;
mod config;
mod conn;
mod descriptor;
mod evictor;
mod maintenance;
mod metrics;
mod private_file;
pub mod registry;
mod reply;
mod resource_manager;
mod server;
mod service;
mod slice;
mod state;
mod unix_socket;

pub use config::{
    IndexConfig, ServerConfig, BUSY_POLL, HANDSHAKE_TIMEOUT, HOLD_LANES, INDEX_KEYS,
    INDEX_KEY_BYTES, LANE_SLOTS,
};
pub use resource_manager::RmCallError;
pub use server::{start, ServerError, ServerHandle};
pub use state::eviction;
pub use state::{IndexOpenError, Restored, PIN_TTL};

#[cfg(test)]
mod testing;
