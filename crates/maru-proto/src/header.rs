use crate::error::DecodeError;
use crate::{MAX_FRAME, PROTOCOL_VERSION};

/// `b"MARU"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"MARU");
/// Size of the fixed header that starts every frame.
pub const HEADER_LEN: usize = 24;
/// Set on every response frame.
pub const FLAG_RESPONSE: u16 = 1 << 0;
/// Set on a response whose payload is a [`crate::WireError`].
pub const FLAG_ERROR: u16 = 1 << 1;
const KNOWN_FLAGS: u16 = FLAG_RESPONSE | FLAG_ERROR;

/// The fixed frame header. Layout (little-endian):
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | magic `MARU` |
/// | 4 | 2 | protocol version |
/// | 6 | 2 | message type |
/// | 8 | 2 | flags |
/// | 10 | 2 | reserved, zero |
/// | 12 | 8 | request id |
/// | 20 | 4 | payload length |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub msg_type: u16,
    pub flags: u16,
    pub request_id: u64,
    pub payload_len: u32,
}

impl Header {
    pub fn new(msg_type: u16, flags: u16, request_id: u64, payload_len: u32) -> Self {
        Header {
            version: PROTOCOL_VERSION,
            msg_type,
            flags,
            request_id,
            payload_len,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&self.msg_type.to_le_bytes());
        out[8..10].copy_from_slice(&self.flags.to_le_bytes());
        out[12..20].copy_from_slice(&self.request_id.to_le_bytes());
        out[20..24].copy_from_slice(&self.payload_len.to_le_bytes());
        out
    }

    /// Decodes and validates a header. The version is *not* checked here, so that a peer
    /// can still read the request id of a frame it must refuse for its version.
    pub fn decode(bytes: &[u8]) -> Result<Header, DecodeError> {
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::Truncated {
                needed: HEADER_LEN,
                got: bytes.len(),
            });
        }
        let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[12..20]);
        let header = Header {
            version: u16_at(4),
            msg_type: u16_at(6),
            flags: u16_at(8),
            request_id: u64::from_le_bytes(id),
            payload_len: u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]),
        };
        if u16_at(10) != 0 || header.flags & !KNOWN_FLAGS != 0 {
            return Err(DecodeError::BadHeader("reserved bits set"));
        }
        if header.payload_len > MAX_FRAME {
            return Err(DecodeError::FrameTooLarge {
                len: header.payload_len,
                max: MAX_FRAME,
            });
        }
        Ok(header)
    }

    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }
}
