//! The Redis rows' client: a minimal RESP2 client, one command and one reply at a time, whose
//! reads wait the way Maru's client waits for a reply ([`maru_client::MaruConfig::busy_poll`]):
//! polling the socket without sleeping for up to 50 µs, then a blocking read.
//!
//! Why not the `redis` crate: measured side by side in one run (client pinned to one CPU,
//! redis-server to the other, p50), it would make Redis look slower than its server is.
//! - `redis::Connection` blocks in `read` for every reply and exposes no descriptor to poll:
//!   a GET of 64 bytes took 35.4 µs through it against 22.3 µs here over the Unix socket, and
//!   51.1 against 25.5 µs over TCP — a sleeping wake-up per reply that Maru's rows do not pay.
//! - Driven over this socket instead (its `ConnectionLike` and `Parser`), single commands cost
//!   what they cost here, but its reply parser alone takes ~57 µs for an MGET of 256 64-byte
//!   values and ~1 ms for a 4 MiB value, even from memory: MGET(256) took 174 µs against
//!   112 µs here, and a GET of 4 MiB 3.3 ms against 1.6 ms — on rows the targets judge.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

trait Duplex: Read + Write + AsRawFd + Send {}
impl<T: Read + Write + AsRawFd + Send> Duplex for T {}

/// How long a read waits for a reply that has not arrived before failing.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// One connection to a Redis server.
pub struct RedisConn {
    /// Reads are buffered; commands are written through `get_mut`, past the buffer.
    stream: BufReader<BusyPoll>,
    /// The command being sent, reused from call to call.
    cmd: Vec<u8>,
    /// The reply line being read.
    line: Vec<u8>,
}

impl RedisConn {
    pub fn tcp(addr: impl ToSocketAddrs) -> io::Result<RedisConn> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(READ_TIMEOUT))?;
        Ok(RedisConn::over(Box::new(s)))
    }

    pub fn unix(path: &Path) -> io::Result<RedisConn> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(READ_TIMEOUT))?;
        Ok(RedisConn::over(Box::new(s)))
    }

    fn over(stream: Box<dyn Duplex>) -> RedisConn {
        RedisConn {
            stream: BufReader::with_capacity(64 * 1024, BusyPoll(stream)),
            cmd: Vec::new(),
            line: Vec::new(),
        }
    }

    /// Sends `args` as one command and reads its reply; bulk payloads are appended to `out`
    /// (an array's one after the other). A Redis error reply is an error.
    pub fn call(&mut self, args: &[&[u8]], out: &mut Vec<u8>) -> io::Result<()> {
        self.cmd.clear();
        write!(self.cmd, "*{}\r\n", args.len())?;
        for a in args {
            write!(self.cmd, "${}\r\n", a.len())?;
            self.cmd.extend_from_slice(a);
            self.cmd.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().0.write_all(&self.cmd)?;
        self.reply(out)
    }

    fn reply(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        self.line.clear();
        self.stream.read_until(b'\n', &mut self.line)?;
        if self.line.len() < 3 || !self.line.ends_with(b"\r\n") {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short RESP line",
            ));
        }
        let kind = self.line[0];
        let body = std::str::from_utf8(&self.line[1..self.line.len() - 2])
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "non-UTF-8 RESP line"))?;
        let num = || {
            body.parse::<i64>()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad RESP length"))
        };
        match kind {
            b'+' | b':' => Ok(()),
            b'-' => Err(io::Error::other(format!("redis: {body}"))),
            b'$' => {
                let n = num()?;
                if n >= 0 {
                    // The payload and its CRLF, read in place; the CRLF is cut again.
                    let at = out.len();
                    out.resize(at + n as usize + 2, 0);
                    self.stream.read_exact(&mut out[at..])?;
                    out.truncate(at + n as usize);
                }
                Ok(())
            }
            b'*' => {
                for _ in 0..num()?.max(0) {
                    self.reply(out)?;
                }
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unknown RESP type",
            )),
        }
    }
}

/// The socket, read the way Maru's client waits: busy-polling for up to the client's default
/// reply grace before a blocking read.
struct BusyPoll(Box<dyn Duplex>);

impl Read for BusyPoll {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.0.as_raw_fd();
        maru_transport::busy::spin_readable(fd, maru_client::DEFAULT_REPLY_GRACE, || false)?;
        self.0.read(buf)
    }
}
