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

    /// Reads more bytes so that at least `want` bytes of the current frame are buffered
    /// (or fails). Grows the buffer for large frames; the header already bounded `want`.
    fn fill<R: Read>(
        &mut self,
        r: &mut R,
        want: usize,
        stalled_since: &mut Option<Instant>,
    ) -> Result<(), FrameReadError> {
        if self.start > 0 && self.buf.len() - self.start < want {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.start < want {
            self.buf.resize(self.start + want, 0);
        }
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
