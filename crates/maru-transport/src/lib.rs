//! How Maru's processes reach each other: the bytes of [`maru_proto`] over real sockets.
//!
//! This crate owns everything between a socket and a decoded frame: the connected [`Stream`]
//! (TCP or Unix), the buffered frame reader [`FrameBuf`], busy-poll waits ([`busy`]), the
//! blocking request/reply connection [`BlockingConn`] that daemons and tools use, the one
//! [`TransportError`] of every exchange, and this process's identity ([`local_identity`]) as
//! a Hello states it, descriptors passed over a Unix socket ([`fds`]); with the `cli` feature, the TCP flags the daemons share ([`flags`]).
//!
//! It defines no message types or encodings (those are `maru_proto`'s, used through its
//! encoders and decoders) and knows nothing of keys, regions or pools.

pub mod auth;
pub mod busy;
mod error;
pub mod fds;
#[cfg(feature = "cli")]
pub mod flags;
mod frame;
mod net;
mod peer;
mod rpc;

pub use error::TransportError;
pub use frame::{read_frame, FrameBuf, FrameReadError};
pub use net::{connectable, set_dead_peer_timeout, Stream, DEAD_PEER_AFTER};
pub use peer::{
    effective_uid, local_identity, process_start_time, tcp_peer_held_by, tcp_peer_is_local,
    unix_peer_cred, PeerCred,
};
pub use rpc::{BlockingConn, CallError};
