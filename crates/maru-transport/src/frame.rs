//! Reading frames from a byte stream with one buffer and few system calls.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use maru_proto::{DecodeError, Header, HEADER_LEN};

const INITIAL_CAPACITY: usize = 64 * 1024;

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameReadError {
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    /// The stream has a read timeout and it passed with no byte of a new frame.
    #[error("no frame within the read timeout")]
    Idle,
    /// A frame was started but not finished within the stall limit (slow or stuck peer).
    #[error("peer stalled in the middle of a frame")]
    Stalled,
    /// The header is not a valid Maru header; the stream cannot be resynchronised.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A reusable receive buffer. Reads ahead, so pipelined frames that arrive together cost one
/// system call; [`FrameBuf::read_frame`] hands out the payload in place.
pub struct FrameBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// How long a started frame may take to complete when the stream has a read timeout.
    pub max_stall: Duration,
}

impl Default for FrameBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameBuf {
    pub fn new() -> Self {
        FrameBuf {
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
            max_stall: Duration::from_secs(10),
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Whether a complete frame is already buffered (reading it will not touch the stream).
    pub fn has_frame(&self) -> bool {
        match Header::decode(self.buffered()) {
            Ok(h) => self.end - self.start >= HEADER_LEN + h.payload_len as usize,
            Err(DecodeError::Truncated { .. }) => false,
            Err(_) => true, // reading it returns the error at once
        }
    }

    /// Bytes held by the receive buffer (for tests and memory accounting).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Whether any byte of a next frame is buffered.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Reads one frame. The returned payload borrows the buffer until the next call.
    pub fn read_frame<R: Read>(&mut self, r: &mut R) -> Result<(Header, &[u8]), FrameReadError> {
        // A large frame grew the buffer; give the memory back once it is drained, so an idle
        // connection does not hold up to MAX_FRAME bytes.
        if self.is_empty() && self.buf.len() > 4 * INITIAL_CAPACITY {
            self.buf.truncate(INITIAL_CAPACITY);
            self.buf.shrink_to_fit();
        }
        let mut stalled_since: Option<Instant> = None;
        let header = loop {
            match Header::decode(self.buffered()) {
                Ok(h) => break h,
                Err(DecodeError::Truncated { .. }) => {
                    self.fill(r, HEADER_LEN, &mut stalled_since)?;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let total = HEADER_LEN + header.payload_len as usize;
        while self.end - self.start < total {
            self.fill(r, total, &mut stalled_since)?;
        }
        let payload_start = self.start + HEADER_LEN;
        self.start += total;
        if self.start == self.end {
            // Keep the buffer's head free so the next frame lands at offset 0.
            let (s, e) = (payload_start, self.start);
            self.start = 0;
            self.end = 0;
            return Ok((header, &self.buf[s..e]));
        }
        Ok((header, &self.buf[payload_start..self.start]))
    }

    /// The next frame if it is already whole in the buffer; never touches a stream. For
    /// callers that wait for the stream themselves (a poll with a deadline) and then
    /// [`FrameBuf::read_some`]. The payload borrows the buffer until the next call.
    pub fn take_frame(&mut self) -> Result<Option<(Header, &[u8])>, DecodeError> {
        let header = match Header::decode(self.buffered()) {
            Ok(h) => h,
            Err(DecodeError::Truncated { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let total = HEADER_LEN + header.payload_len as usize;
        if self.end - self.start < total {
            return Ok(None);
        }
        let payload = self.start + HEADER_LEN..self.start + total;
        self.start += total;
        Ok(Some((header, &self.buf[payload])))
    }

    /// One `read` from `r` into the buffer, after making room for the whole frame being
    /// received (its header bounded the size). `Ok(0)`: the peer closed the stream.
    pub fn read_some<R: Read>(&mut self, r: &mut R) -> io::Result<usize> {
        let want = match Header::decode(self.buffered()) {
            Ok(h) => HEADER_LEN + h.payload_len as usize,
            Err(_) => HEADER_LEN,
        };
        self.make_room(want);
        let n = r.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Makes the buffer hold at least `want` bytes from the start of the current frame.
    fn make_room(&mut self, want: usize) {
        if self.is_empty() {
            self.start = 0;
            self.end = 0;
        }
        if self.start > 0 && self.buf.len() - self.start < want {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.start < want {
            self.buf.resize(self.start + want, 0);
        }
    }

    /// Reads more bytes so that at least `want` bytes of the current frame are buffered
    /// (or fails). Grows the buffer for large frames; the header already bounded `want`.
    fn fill<R: Read>(
        &mut self,
        r: &mut R,
        want: usize,
        stalled_since: &mut Option<Instant>,
    ) -> Result<(), FrameReadError> {
        self.make_room(want);
        loop {
            match r.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    return Err(if self.is_empty() {
                        FrameReadError::Closed
                    } else {
                        FrameReadError::Io(io::ErrorKind::UnexpectedEof.into())
                    })
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.is_empty() {
                        return Err(FrameReadError::Idle);
                    }
                    let since = *stalled_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.max_stall {
                        return Err(FrameReadError::Stalled);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Reads one frame with a fresh buffer; convenient for tests and tools.
pub fn read_frame<R: Read>(r: &mut R) -> Result<(Header, Vec<u8>), FrameReadError> {
    let mut fb = FrameBuf::new();
    let (h, p) = fb.read_frame(r)?;
    Ok((h, p.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use maru_proto::{decode_response, encode_response, Response};

    #[test]
    fn take_frame_and_read_some_reassemble_frames_fed_a_few_bytes_at_a_time() {
        let mut wire = Vec::new();
        encode_response(&mut wire, 1, &Response::Bool(true)).unwrap();
        let big = Response::Stats("x".repeat(3 * INITIAL_CAPACITY));
        encode_response(&mut wire, 2, &big).unwrap();
        let mut fb = FrameBuf::new();
        let mut src = &wire[..];
        let mut got = Vec::new();
        while got.len() < 2 {
            if let Some((h, p)) = fb.take_frame().unwrap() {
                got.push((h.request_id, decode_response(&h, p).unwrap()));
                continue;
            }
            // Three bytes at a time, as a slow peer sends them.
            let n = src.len().min(3);
            let mut chunk = &src[..n];
            assert_eq!(fb.read_some(&mut chunk).unwrap(), n);
            src = &src[n..];
        }
        assert_eq!(got[0], (1, Response::Bool(true)));
        assert_eq!(got[1], (2, big));
        assert!(fb.is_empty());
        assert_eq!(fb.read_some(&mut &[][..]).unwrap(), 0, "end of stream");
    }

    #[test]
    fn take_frame_refuses_garbage() {
        let mut fb = FrameBuf::new();
        let mut junk: &[u8] = b"NOTMARU-this-is-not-a-frame-at-all";
        fb.read_some(&mut junk).unwrap();
        assert!(fb.take_frame().is_err());
    }
}
