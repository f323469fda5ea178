//! Whole frames: a header and the payload of one request or response.

use crate::catalog::{Request, Response};
use crate::codec::Writer;
use crate::error::{DecodeError, EncodeError};
use crate::header::{Header, HEADER_LEN};
use crate::request::decode_request;
use crate::response::decode_response;
use crate::{MAX_FRAME, PROTOCOL_VERSION};

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: Header,
    pub body: Body<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<'a> {
    Request(Request<'a>),
    Response(Response),
}

pub(crate) fn encode_with(
    buf: &mut Vec<u8>,
    msg_type: u16,
    flags: u16,
    request_id: u64,
    payload: impl FnOnce(&mut Writer) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; HEADER_LEN]);
    if let Err(e) = payload(&mut Writer::new(buf)) {
        buf.truncate(start);
        return Err(e);
    }
    let len = buf.len() - start - HEADER_LEN;
    if len > MAX_FRAME as usize {
        buf.truncate(start);
        return Err(EncodeError::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    let header = Header::new(msg_type, flags, request_id, len as u32);
    buf[start..start + HEADER_LEN].copy_from_slice(&header.encode());
    Ok(())
}

pub(crate) fn check_version(header: &Header) -> Result<(), DecodeError> {
    if header.version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            got: header.version,
            ours: PROTOCOL_VERSION,
        });
    }
    Ok(())
}

/// Decodes exactly one whole frame (header and payload, nothing after). A pure function of
/// its input: this is what the fuzz target drives.
pub fn decode_frame(bytes: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let header = Header::decode(bytes)?;
    let payload = &bytes[HEADER_LEN..];
    let len = header.payload_len as usize;
    if payload.len() < len {
        return Err(DecodeError::Truncated {
            needed: HEADER_LEN + len,
            got: bytes.len(),
        });
    }
    if payload.len() > len {
        return Err(DecodeError::TrailingBytes(payload.len() - len));
    }
    let body = if header.is_response() {
        Body::Response(decode_response(&header, payload)?)
    } else {
        Body::Request(decode_request(&header, payload)?)
    };
    Ok(Frame { header, body })
}
