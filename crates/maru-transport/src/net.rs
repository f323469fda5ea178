//! The one piece of socket code every component shares: a connected stream that is either
//! TCP (with `TCP_NODELAY`, since every message is a small request awaiting its answer) or a
//! Unix socket.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use maru_proto::{encode_error, ErrorCode, ServerUrl, WireError};

#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Connects with a bounded wait (per resolved address for TCP).
    pub fn connect(url: &ServerUrl, timeout: Duration) -> io::Result<Stream> {
        match url {
            ServerUrl::Tcp(addr) => {
                let mut last =
                    io::Error::new(io::ErrorKind::NotFound, format!("{addr} did not resolve"));
                for sa in addr.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&sa, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            ServerUrl::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path)?)),
        }
    }

    /// Connects like [`Stream::connect`], then, on TCP with a `secret`, proves it holds the
    /// cluster secret and checks the daemon does ([`crate::auth`]); Unix sockets need no
    /// proof (the kernel names their peers). A refusal is a `PermissionDenied` error that
    /// says why. The stream's read and write timeouts are left at `timeout`.
    pub fn connect_with(
        url: &ServerUrl,
        timeout: Duration,
        secret: Option<&crate::auth::ClusterSecret>,
    ) -> io::Result<Stream> {
        let mut s = Stream::connect(url, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        if let (Stream::Tcp(tcp), Some(secret)) = (&mut s, secret) {
            crate::auth::client_handshake(tcp, secret).map_err(|e| match e {
                crate::auth::AuthError::Io(io) => io,
                other => io::Error::new(io::ErrorKind::PermissionDenied, other.to_string()),
            })?;
        }
        Ok(s)
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        }
    }

    /// Turns away a connection over a daemon's connection limit: answers `request_id` with
    /// `TooManyClients` and `message`, then closes it (best effort: a peer that is gone
    /// already is the same outcome).
    pub fn turn_away(mut self, request_id: u64, message: String) {
        let mut out = Vec::new();
        let e = WireError::new(ErrorCode::TooManyClients, message);
        encode_error(&mut out, request_id, &e);
        let _ = self.write_all(&out);
        let _ = self.shutdown();
    }

    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// An address a local client can connect to: a wildcard listener is reached on loopback.
pub fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// How long a TCP peer may stay unreachable before a daemon drops its connection (unless
/// configured otherwise): about the time keepalive probes take to fail, 25 s.
pub const DEAD_PEER_AFTER: Duration = Duration::from_secs(25);

/// Lets the kernel notice a peer host that vanished without closing its connection (power
/// loss, a pulled cable, a partition): keepalive probes after `after`·2/5 of silence, three
/// probes `after`/5 apart, and `TCP_USER_TIMEOUT` of `after` so that data left unacknowledged
/// ends the connection too. Without it, a read on that connection waits for ever and the
/// peer's session and regions are never released. Whole seconds, at least one each.
pub fn set_dead_peer_timeout(stream: &TcpStream, after: Duration) -> io::Result<()> {
    let secs = after.as_secs().max(3);
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| -> io::Result<()> {
        // SAFETY: setsockopt on a socket the caller holds open, with a pointer to a live
        // c_int and its exact size; the kernel copies the value before returning.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let int = |v: u64| libc::c_int::try_from(v).unwrap_or(libc::c_int::MAX);
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        int((secs * 2 / 5).max(1)),
    )?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        int((secs / 5).max(1)),
    )?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        int(secs.saturating_mul(1000)),
    )
}
