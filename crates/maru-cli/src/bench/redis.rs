//! Redis side by side: what a user would pick instead. A `redis-server` started here on a free
//! loopback port and a Unix socket, persistence off; metadata as SET / GET / EXISTS / MGET of
//! 64-byte values, and the data path as SET / GET of the chunk itself (what LMCache's Redis
//! backend does). The client is a minimal RESP2 client over blocking sockets, the same kind of
//! client the Maru rows use, so the comparison is the servers and the data path, not the
//! client libraries.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::daemons::{track_child, untrack_child};
use super::floor::Transport;
use super::stats::{Row, Samples};
use super::{keys, Bench};

/// Whether `redis-server` is on PATH.
pub fn available() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A running redis-server, killed on drop.
pub struct Redis {
    child: Child,
    pub port: u16,
    pub sock: std::path::PathBuf,
}

impl Redis {
    pub fn start(dir: &Path) -> anyhow::Result<Redis> {
        // Ask the OS for a free port, then hand it to Redis (a tiny race, retried below).
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let sock = dir.join("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(&sock)
            .args(["--unixsocketperm", "700", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .args(["--loglevel", "warning", "--logfile", ""])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server")?;
        track_child(child.id());
        let mut r = Redis { child, port, sock };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = r.connect(Transport::Tcp) {
                if c.call(&[b"PING"], &mut Vec::new()).is_ok() {
                    return Ok(r);
                }
            }
            if let Ok(Some(status)) = r.child.try_wait() {
                bail!("redis-server exited at start ({status}); port {port} taken?");
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn connect(&self, t: Transport) -> io::Result<Resp> {
        let s: Box<dyn RW> = match t {
            Transport::Tcp => {
                let s = TcpStream::connect(("127.0.0.1", self.port))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                Box::new(s)
            }
            Transport::Unix => {
                let s = UnixStream::connect(&self.sock)?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                Box::new(s)
            }
        };
        let w = s.try_clone_box()?;
        Ok(Resp {
            r: BufReader::with_capacity(64 * 1024, s),
            w,
            cmd: Vec::new(),
            line: Vec::new(),
        })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        untrack_child(self.child.id());
    }
}

pub trait RW: Read + Write + Send {
    fn try_clone_box(&self) -> io::Result<Box<dyn RW>>;
}
impl RW for TcpStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn RW>> {
        Ok(Box::new(self.try_clone()?))
    }
}
impl RW for UnixStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn RW>> {
        Ok(Box::new(self.try_clone()?))
    }
}

/// A minimal RESP2 client: one command, one reply.
pub struct Resp {
    r: BufReader<Box<dyn RW>>,
    w: Box<dyn RW>,
    cmd: Vec<u8>,
    line: Vec<u8>,
}

impl Resp {
    /// Sends `args` as one command and reads its reply; bulk payloads are appended to `out`.
    pub fn call(&mut self, args: &[&[u8]], out: &mut Vec<u8>) -> io::Result<()> {
        self.cmd.clear();
        write!(self.cmd, "*{}\r\n", args.len())?;
        for a in args {
            write!(self.cmd, "${}\r\n", a.len())?;
            self.cmd.extend_from_slice(a);
            self.cmd.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&self.cmd)?;
        self.reply(out)
    }

    fn reply(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        self.line.clear();
        self.r.read_until(b'\n', &mut self.line)?;
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
                    let at = out.len();
                    out.resize(at + n as usize + 2, 0);
                    self.r.read_exact(&mut out[at..])?;
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

/// Measures the Redis rows on both transports.
pub fn run(b: &mut Bench, r: &Redis, transports: &[Transport]) -> anyhow::Result<()> {
    let small = vec![0x61u8; 64];
    for &t in transports {
        let mut c = r.connect(t)?;
        let mut out = Vec::new();
        let n = b.plan.iters;

        let ks = keys(256);
        let mut s = Samples::with_capacity(n);
        for i in 0..n {
            out.clear();
            s.time(|| c.call(&[b"SET", &ks[i % ks.len()], &small], &mut out))?;
        }
        b.push_redis(Row::new("SET", t.name(), 64, 1, &s.summary()).with_bytes(64));
        let mut s = Samples::with_capacity(n);
        for i in 0..n {
            out.clear();
            s.time(|| c.call(&[b"GET", &ks[i % ks.len()]], &mut out))?;
            if out.len() != 64 {
                bail!("redis GET returned {} bytes", out.len());
            }
        }
        b.push_redis(Row::new("GET", t.name(), 64, 1, &s.summary()).with_bytes(64));
        let mut s = Samples::with_capacity(n);
        for i in 0..n {
            out.clear();
            s.time(|| c.call(&[b"EXISTS", &ks[i % ks.len()]], &mut out))?;
        }
        b.push_redis(Row::new("EXISTS", t.name(), 64, 1, &s.summary()));
        for k in &ks {
            c.call(&[b"SET", k, &small], &mut out)?;
        }
        for &m in &[32usize, 256] {
            let mut args: Vec<&[u8]> = vec![b"MGET"];
            args.extend(ks.iter().take(m).map(|k| k.as_slice()));
            let mut s = Samples::with_capacity(b.plan.batch_iters);
            for _ in 0..b.plan.batch_iters {
                out.clear();
                s.time(|| c.call(&args, &mut out))?;
                if out.len() != 64 * m {
                    bail!("redis MGET returned {} bytes", out.len());
                }
            }
            b.push_redis(
                Row::new("MGET", t.name(), 64, m as u32, &s.summary()).with_bytes(64 * m as u64),
            );
        }

        // The data path: the chunk itself goes through Redis.
        for &chunk in &b.plan.sizes.clone() {
            let data = vec![0x62u8; chunk as usize];
            let iters = super::floor::copy_iters(n, chunk);
            let ks = keys(16);
            let mut s = Samples::with_capacity(iters);
            for i in 0..iters {
                out.clear();
                s.time(|| c.call(&[b"SET", &ks[i % ks.len()], &data], &mut out))?;
            }
            b.push_redis(Row::new("SET", t.name(), chunk, 1, &s.summary()).with_bytes(chunk));
            let mut s = Samples::with_capacity(iters);
            for i in 0..iters {
                out.clear();
                s.time(|| c.call(&[b"GET", &ks[i % ks.len()]], &mut out))?;
                if out.len() != chunk as usize {
                    bail!("redis GET returned {} bytes", out.len());
                }
            }
            b.push_redis(Row::new("GET", t.name(), chunk, 1, &s.summary()).with_bytes(chunk));
            let mut args: Vec<&[u8]> = vec![b"DEL"];
            args.extend(ks.iter().map(|k| k.as_slice()));
            c.call(&args, &mut out)?;
        }
        out.clear();
        c.call(&[b"FLUSHALL"], &mut out)?;
    }
    Ok(())
}

/// The Maru row a Redis row is compared with: `(op, chunk_bytes, batch)`.
pub fn maru_match(redis: &Row) -> Option<(&'static str, u64, u32)> {
    let chunk4k = 4096;
    match (redis.op.as_str(), redis.chunk_bytes) {
        ("SET", 64) => Some(("store", chunk4k, 1)),
        ("GET", 64) => Some(("retrieve", chunk4k, 1)),
        ("EXISTS", _) => Some(("exists", chunk4k, 1)),
        ("MGET", _) => Some(("batch_retrieve", chunk4k, redis.batch)),
        ("SET", c) => Some(("store", c, 1)),
        ("GET", c) => Some(("retrieve_copy", c, 1)),
        _ => None,
    }
}
