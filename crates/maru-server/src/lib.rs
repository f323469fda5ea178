//! The Maru metadata server: for one application group, it maps keys to locations in shared
//! memory (region, offset, length), owns the regions its clients write into (allocated from
//! the resource manager), counts how many keys point into each region, pins keys, and gives a
//! region back only when its owner is gone **and** no key references it (deferred freeing).
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
//! Layout: [`registry`] (the key registry behind one narrow trait), `state` (sessions, regions,
//! reference counts, deferred freeing), `service` (one request → one reply), `conn` (a
//! connection's thread; `busy_poll` its wait for the next request), `server` (start and shutdown), `config`, `admission` (accept loops and
//! the client limit), `unix_socket`, `maintenance` (retries, pings and reconciles between
//! requests), `resource_manager` (the resource manager behind a small trait), `reply` (zero-copy reply
//! encoders), `metrics`, [`cli`].

mod admission;
mod busy_poll;
pub mod cli;
mod config;
mod conn;
mod maintenance;
mod metrics;
pub mod registry;
mod reply;
mod resource_manager;
mod server;
mod service;
mod state;
mod unix_socket;

pub use config::{ServerConfig, BUSY_POLL, HANDSHAKE_TIMEOUT};
pub use resource_manager::RmCallError;
pub use server::{start, ServerError, ServerHandle};

#[cfg(test)]
mod testing;
