//! The Maru wire protocol, shared by every component.
//!
//! A frame is a fixed 24-byte little-endian [`Header`] followed by `payload_len` bytes of
//! payload. Requests and responses are plain enums ([`Request`], [`Response`]); encoding and
//! decoding are pure functions of bytes, bounded by the limits below, so a hostile peer can
//! neither make a decoder allocate without bound nor make it panic (see `fuzz/`).
//!
//! Many requests may be in flight on one connection; every response carries the request id
//! of the request it answers.
//!
//! Every message type is listed once, in `catalog.rs`: its variant, wire number, name, the
//! daemon that answers it and its decoder.
//!
//! It owns the wire format: the header, the messages and the value types they carry, the
//! bounded codec, server URLs and the statistics documents. It may not touch I/O — no
//! sockets, no files, no libc: reading frames from a stream, connections, waits and process
//! identity belong to `maru-transport`, and what a message means to a daemon is the daemon's.
//!
//! ```
//! use maru_proto::{encode_request, decode_frame, Body, Request};
//! let mut buf = Vec::new();
//! encode_request(&mut buf, 7, &Request::Exists { key: b"chunk-1" }).unwrap();
//! let frame = decode_frame(&buf).unwrap();
//! assert_eq!(frame.header.request_id, 7);
//! assert_eq!(frame.body, Body::Request(Request::Exists { key: b"chunk-1" }));
//! ```

mod catalog;
mod codec;
mod error;
mod frame;
mod header;
mod request;
mod response;
pub mod stats;
mod types;
mod url;

pub use catalog::{msg_type, request_name, Request, Response, RM_REQUESTS, SERVER_REQUESTS};
pub use codec::{Reader, Writer};
pub use error::{DecodeError, EncodeError, ErrorCode, WireError};
pub use frame::{decode_frame, Body, Frame};
pub use header::{Header, FLAG_ERROR, FLAG_RESPONSE, HEADER_LEN, MAGIC};
pub use request::{decode_request, encode_request};
pub use response::{decode_response, encode_error, encode_response};
pub use types::{
    Access, DeleteStatus, Handle, Hello, HelloOk, IndexInfo, KeyCount, LaneInfo, Location, PageRef,
    RegionInfo, RegionRecord, RegisterEntry, ResumeHold, ResumePin, RmAllocation, Role, Slot,
};
pub use url::{ServerUrl, UrlError};

/// The protocol version this build speaks. A peer with another version is refused at the
/// handshake with [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u16 = 10;

/// Largest payload a decoder accepts. Big enough for a full batch of maximal keys.
pub const MAX_FRAME: u32 = 8 * 1024 * 1024;

/// Longest key, in bytes. Keys are opaque byte strings.
pub const MAX_KEY_LEN: usize = 1024;

/// Most items in one batch request.
pub const MAX_BATCH: usize = 4096;

/// Longest string field (paths, owners, instance ids, messages).
pub const MAX_STRING_LEN: usize = 4096;

/// Longest namespace (tenant name) a hello may carry, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 255;

/// Length of an auth token (a keyed BLAKE3 hash).
pub const TOKEN_LEN: usize = 32;

/// Length of the session token a metadata server hands to an instance's first connection.
pub const SESSION_TOKEN_LEN: usize = 16;
