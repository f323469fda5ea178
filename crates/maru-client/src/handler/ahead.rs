//! Copies that tell the server their registration is coming. A store waits for its
//! registration's reply right after its copy; a copy longer than the server's busy-poll window
//! (50 µs: a chunk of about 1 MiB) leaves the thread that serves the connection asleep by
//! then, and waking it costs the round trip several times over. So a long copy sends `Ahead`
//! (answered with nothing) on the shared connection when about [`AHEAD_LEFT`] bytes are left
//! to copy: the thread wakes while the copy finishes and is polling when the registration
//! comes.

use maru_shm::{Mapping, ShmError};

use super::connected::Connected;

/// Copies of at least this many bytes in one call tell the server ahead; shorter ones end
/// within the window of the server's previous reply.
pub(super) const AHEAD_FROM: usize = 256 * 1024;

/// How many bytes are still to copy when `Ahead` goes: their copy (25–40 µs at 13–20 GB/s)
/// covers the server thread's wake-up and stays inside its busy-poll window.
pub(super) const AHEAD_LEFT: usize = 512 * 1024;

/// The copies of one store call: `left` bytes still to copy, and whether `Ahead` still has
/// to go.
pub(super) struct CopyAhead<'c> {
    c: &'c Connected,
    left: usize,
    pending: bool,
}

impl<'c> CopyAhead<'c> {
    /// The copies of a call that copies `total` bytes in all and then waits for a reply
    /// (`waits`: false for write-behind, whose reply is collected later).
    pub fn new(c: &'c Connected, total: usize, waits: bool) -> CopyAhead<'c> {
        CopyAhead {
            c,
            left: total,
            pending: waits && total >= AHEAD_FROM,
        }
    }

    /// Copies `bytes` to `at` in `mapping`, telling the server ahead at the point where
    /// [`AHEAD_LEFT`] bytes of the call are left.
    pub fn copy(&mut self, mapping: &Mapping, at: usize, bytes: &[u8]) -> Result<(), ShmError> {
        let after = self.left.saturating_sub(bytes.len());
        if self.pending && after < AHEAD_LEFT {
            let cut = bytes.len().min(self.left.saturating_sub(AHEAD_LEFT));
            mapping.write_at(at, &bytes[..cut])?;
            self.c.conns.tell_ahead();
            self.pending = false;
            mapping.write_at(at + cut, &bytes[cut..])?;
        } else {
            mapping.write_at(at, bytes)?;
        }
        self.left = after;
        Ok(())
    }
}
