//! File descriptors over a Unix socket (SCM_RIGHTS ancillary data).
//!
//! On a stream socket a descriptor travels with the bytes of the `sendmsg` that carried it,
//! and the kernel hands it to the `recvmsg` that reads those bytes: a plain `read` of them
//! closes it. So a receiver that expects descriptors reads every byte through
//! [`FdReader`], which queues the descriptors in arrival order; since a sender attaches the
//! descriptors of its replies to a write that starts at or before each reply's first byte,
//! the descriptor of the n-th such reply is the n-th in the queue once that reply has been
//! read whole.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Most descriptors one write carries (and one read accepts): a sender with more pending
/// writes what it has before it takes more.
pub const MAX_FDS: usize = 64;

/// Sends `data` with `fds` attached to its first byte, then the rest of `data` plainly, as
/// `write_all` does. At most [`MAX_FDS`] descriptors; an empty `data` sends nothing.
pub fn send_all_with_fds(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} descriptors in one write (at most {MAX_FDS})", fds.len()),
        ));
    }
    if data.is_empty() {
        return Ok(());
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(
            "descriptors do not fit the control buffer",
        ));
    }
    let sent = loop {
        match rustix::net::sendmsg(
            sock,
            &[IoSlice::new(data)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    // The descriptors went with the first byte sent; what is left is plain bytes.
    io::Write::write_all(&mut &*sock, &data[sent..])
}

/// A [`Read`] of a Unix socket that keeps the descriptors arriving with the bytes (close on
/// exec), in order, in `fds`.
pub struct FdReader<'a> {
    pub sock: &'a UnixStream,
    pub fds: &'a mut VecDeque<OwnedFd>,
}

impl Read for FdReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = rustix::net::recvmsg(self.sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                self.fds.extend(received);
            }
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) {
            // Descriptors were lost: the queue no longer lines up with the replies.
            return Err(io::Error::other(
                "descriptors arrived that did not fit the control buffer",
            ));
        }
        Ok(msg.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_arrive_in_order_with_their_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let dir = std::env::temp_dir();
        let f1 = tempfile::tempfile_in(&dir).unwrap();
        let f2 = tempfile::tempfile_in(&dir).unwrap();
        f1.set_len(1).unwrap();
        f2.set_len(2).unwrap();
        send_all_with_fds(&a, b"one", &[f1.as_fd()]).unwrap();
        (&a).write_all(b"-plain-").unwrap();
        send_all_with_fds(&a, b"two", &[f2.as_fd()]).unwrap();
        drop(a);
        let mut fds = VecDeque::new();
        let mut got = Vec::new();
        FdReader {
            sock: &b,
            fds: &mut fds,
        }
        .read_to_end(&mut got)
        .unwrap();
        assert_eq!(got, b"one-plain-two");
        let lens: Vec<u64> = fds
            .into_iter()
            .map(|fd| std::fs::File::from(fd).metadata().unwrap().len())
            .collect();
        assert_eq!(lens, [1, 2], "each descriptor once, in the order sent");
    }

    #[test]
    fn too_many_descriptors_are_refused_before_anything_is_sent() {
        let (a, _b) = UnixStream::pair().unwrap();
        let fds: Vec<BorrowedFd> = (0..=MAX_FDS).map(|_| a.as_fd()).collect();
        let e = send_all_with_fds(&a, b"x", &fds).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
