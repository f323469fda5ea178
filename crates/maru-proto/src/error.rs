use std::fmt;

/// Why a byte string is not a valid frame. Every variant is reachable from hostile input and
/// none of them is a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated frame: needed {needed} bytes, got {got}")]
    Truncated { needed: usize, got: usize },
    #[error("bad magic {0:#010x}: not a Maru frame")]
    BadMagic(u32),
    #[error("bad header: {0}")]
    BadHeader(&'static str),
    #[error("unsupported protocol version {got} (this build speaks {ours})")]
    UnsupportedVersion { got: u16, ours: u16 },
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: u32, max: u32 },
    #[error("unknown message type {0:#06x}")]
    UnknownMessage(u16),
    #[error("{what} of {len} exceeds the limit of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("invalid field {0}")]
    InvalidField(&'static str),
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
}

impl DecodeError {
    /// The error code a server answers with when a request fails to decode.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownMessage(_) => ErrorCode::UnknownMessage,
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::TooLong { what: "key", .. } => ErrorCode::KeyTooLong,
            DecodeError::TooLong { what: "batch", .. } => ErrorCode::BatchTooLarge,
            _ => ErrorCode::BadFrame,
        }
    }
}

/// Why a message could not be encoded (it breaks a protocol limit). Checked on the sending
/// side too, so a caller gets a clear error before anything is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{what} of {len} exceeds the limit of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: u32 },
}

macro_rules! error_codes {
    ($($name:ident = $value:literal : $text:literal,)*) => {
        /// Typed error carried by an error response. Stable numbers: they are on the wire.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum ErrorCode { $($name = $value,)* }

        impl ErrorCode {
            pub fn from_u16(v: u16) -> Option<ErrorCode> {
                match v { $($value => Some(ErrorCode::$name),)* _ => None }
            }
            /// A short description, independent of the message that came with it.
            pub fn describe(self) -> &'static str {
                match self { $(ErrorCode::$name => $text,)* }
            }
            pub fn all() -> &'static [ErrorCode] { &[$(ErrorCode::$name,)*] }
        }
    };
}

error_codes! {
    BadFrame = 1: "malformed frame",
    UnsupportedVersion = 2: "unsupported protocol version",
    UnknownMessage = 3: "unknown message type",
    FrameTooLarge = 4: "frame too large",
    NotHandshaken = 5: "handshake required before this request",
    InvalidArgument = 6: "invalid argument",
    KeyTooLong = 7: "key too long",
    BatchTooLarge = 8: "batch too large",
    UnknownRegion = 9: "unknown region",
    NotOwner = 10: "region belongs to another owner",
    OutOfBounds = 11: "offset or length outside the region",
    BadToken = 12: "forged or stale auth token",
    PoolExhausted = 13: "no pool has room for the request",
    NoSuchPool = 14: "no such pool",
    TooManyClients = 15: "too many clients",
    DoubleFree = 16: "region already freed",
    Unavailable = 17: "a service this request needs is unavailable",
    ShuttingDown = 18: "shutting down",
    SessionConflict = 19: "instance id already in use by another session",
    Storage = 20: "state could not be made durable",
    Internal = 21: "internal error",
    PoolUnhealthy = 22: "the pool's file or device is gone or unusable",
    Unauthenticated = 23: "the peer could not prove who it is",
    IndexFull = 24: "the key index is full",
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// The payload of an error response: a code for programs and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }

    /// `Err(BatchTooLarge)` when a listing of `len` `what` does not fit one reply
    /// ([`MAX_BATCH`](crate::MAX_BATCH) entries), naming where the totals are instead.
    pub fn check_listing(len: usize, what: &str, totals: &str) -> Result<(), WireError> {
        if len <= crate::MAX_BATCH {
            return Ok(());
        }
        Err(WireError::new(
            ErrorCode::BatchTooLarge,
            format!(
                "{len} {what} exceed the {} one reply may list; use {totals} for totals",
                crate::MAX_BATCH
            ),
        ))
    }
}
