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
use super::rows::{handler, prefill};
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
            r: BufReader::with_capacity(64 * 1024, BusyPoll(s)),
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

/// Reads the way Maru's client waits for a reply ([`maru_client::MaruConfig::busy_poll`]):
/// polling the socket without sleeping for up to 50 µs, then a blocking read. Without it the
/// Redis rows would pay a sleeping wake-up per reply that Maru's rows do not, and the
/// comparison would be of the clients' waits, not of the servers.
struct BusyPoll(Box<dyn RW>);

impl Read for BusyPoll {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.0.as_raw_fd();
        maru_transport::busy::spin_readable(fd, maru_client::DEFAULT_REPLY_GRACE, || false)?;
        self.0.read(buf)
    }
}

pub trait RW: Read + Write + Send + std::os::fd::AsRawFd {
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
    r: BufReader<BusyPoll>,
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

/// A Redis row measured against the matching Maru call in alternating blocks: `redis(i)` and
/// `maru(i)` each return the duration of the part they time; both servers are compared under
/// the same conditions (load on a shared machine moves within seconds).
#[allow(clippy::too_many_arguments)]
fn paired(
    b: &mut Bench,
    t: Transport,
    op: &str,
    chunk: u64,
    batch: u32,
    maru_op: &str,
    n: usize,
    mut redis: impl FnMut(usize) -> anyhow::Result<Duration>,
    mut maru: impl FnMut(usize) -> anyhow::Result<Duration>,
) -> anyhow::Result<()> {
    // Blocks of BLOCK calls alternate (one server at a time, as a client would use it; a
    // strict call-by-call alternation makes each server wake up after the other one ran, a
    // pattern neither sees in use), so both still see the same minutes of the machine.
    const BLOCK: usize = 50;
    let (mut rs, mut ms) = (Samples::with_capacity(n), Samples::with_capacity(n));
    let mut i = 0;
    while i < n + 3 {
        let end = (i + BLOCK).min(n + 3);
        for j in i..end {
            let r = redis(j)?;
            if j >= 3 {
                rs.push(r);
            }
        }
        for j in i..end {
            let m = maru(j)?;
            if j >= 3 {
                ms.push(m);
            }
        }
        i = end;
    }
    let mut row = Row::new(op, t.name(), chunk, batch, &rs.summary());
    if op != "EXISTS" {
        row = row.with_bytes(chunk * batch as u64);
    }
    let m = ms.summary();
    row.floor = format!(
        "maru {maru_op} {} x{batch} {:.2} us (alternating)",
        super::size(if chunk == 64 { 4096 } else { chunk }),
        m.p50_us
    );
    row.floor_us = Some(super::stats::round3(m.p50_us));
    if row.p50_us > 0.0 {
        row.ratio = Some(super::stats::round3(m.p50_us / row.p50_us));
    }
    b.push_redis(row);
    Ok(())
}

fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Duration)> {
    let t0 = Instant::now();
    let v = f()?;
    Ok((v, t0.elapsed()))
}

/// Measures the Redis rows on each transport, each against the matching Maru call on the
/// Maru server of the same transport (`urls`, in the order of `transports`).
pub fn run(
    b: &mut Bench,
    r: &Redis,
    transports: &[Transport],
    urls: &[String],
) -> anyhow::Result<()> {
    let small = vec![0x61u8; 64];
    let region = b.plan.region;
    for (&t, url) in transports.iter().zip(urls) {
        let mut c = r.connect(t)?;
        let mut out = Vec::new();
        let n = b.plan.iters;

        // Metadata: 64-byte values against Maru's key operations on 4 KiB chunks.
        let h = handler(url, 4096, region, true)?;
        let page = vec![0x63u8; 4096];
        let pages = (region / 4096) as usize;
        let ks = keys(256);
        let stored = prefill(&h, 256, &page)?;
        let mut live: Vec<Vec<u8>> = Vec::new();
        let mut fresh = keys(n + 3).into_iter();
        paired(
            b,
            t,
            "SET",
            64,
            1,
            "store",
            n,
            |i| {
                out.clear();
                Ok(timed(|| Ok(c.call(&[b"SET", &ks[i % ks.len()], &small], &mut out)?))?.1)
            },
            |_| {
                if live.len() + 256 >= pages {
                    let r: Vec<&[u8]> = live.iter().map(|k| k.as_slice()).collect();
                    h.batch_delete(&r)?;
                    live.clear();
                }
                let key = fresh.next().context("out of keys")?;
                let d = timed(|| {
                    let p = h.alloc(4096)?;
                    p.write_at(0, &page)?;
                    Ok(h.store_handle(&key, &p)?)
                })?
                .1;
                live.push(key);
                Ok(d)
            },
        )?;
        let r: Vec<&[u8]> = live.iter().map(|k| k.as_slice()).collect();
        h.batch_delete(&r)?;
        for k in &ks {
            c.call(&[b"SET", k, &small], &mut out)?;
        }
        paired(
            b,
            t,
            "GET",
            64,
            1,
            "retrieve",
            n,
            |i| {
                out.clear();
                let d = timed(|| Ok(c.call(&[b"GET", &ks[i % ks.len()]], &mut out)?))?.1;
                if out.len() != 64 {
                    bail!("redis GET returned {} bytes", out.len());
                }
                Ok(d)
            },
            |i| Ok(timed(|| Ok(h.retrieve(&stored[i % stored.len()])?))?.1),
        )?;
        paired(
            b,
            t,
            "EXISTS",
            64,
            1,
            "exists",
            n,
            |i| {
                out.clear();
                Ok(timed(|| Ok(c.call(&[b"EXISTS", &ks[i % ks.len()]], &mut out)?))?.1)
            },
            |i| Ok(timed(|| Ok(h.exists(&stored[i % stored.len()])?))?.1),
        )?;
        for &m in &[32usize, 256] {
            let mut args: Vec<&[u8]> = vec![b"MGET"];
            args.extend(ks.iter().take(m).map(|k| k.as_slice()));
            let mk: Vec<&[u8]> = stored.iter().take(m).map(|k| k.as_slice()).collect();
            paired(
                b,
                t,
                "MGET",
                64,
                m as u32,
                "batch_retrieve",
                b.plan.batch_iters,
                |_| {
                    out.clear();
                    let d = timed(|| Ok(c.call(&args, &mut out)?))?.1;
                    if out.len() != 64 * m {
                        bail!("redis MGET returned {} bytes", out.len());
                    }
                    Ok(d)
                },
                |_| Ok(timed(|| Ok(h.batch_retrieve(&mk)?))?.1),
            )?;
        }
        let r: Vec<&[u8]> = stored.iter().map(|k| k.as_slice()).collect();
        h.batch_delete(&r)?;
        h.close();

        // The data path: the chunk itself goes through Redis; Maru writes it into shared
        // memory (store) and copies it out (retrieve_copy).
        for &chunk in &b.plan.sizes.clone() {
            let h = handler(url, chunk, region, true)?;
            let pages = (region / chunk) as usize;
            let data = vec![0x62u8; chunk as usize];
            let iters = super::floor::copy_iters(n, chunk);
            let ks = keys(16);
            let mut live: Vec<Vec<u8>> = Vec::new();
            let mut fresh = keys(iters + 3).into_iter();
            paired(
                b,
                t,
                "SET",
                chunk,
                1,
                "store",
                iters,
                |i| {
                    out.clear();
                    Ok(timed(|| Ok(c.call(&[b"SET", &ks[i % ks.len()], &data], &mut out)?))?.1)
                },
                |_| {
                    if live.len() + 1 >= pages {
                        let r: Vec<&[u8]> = live.iter().map(|k| k.as_slice()).collect();
                        h.batch_delete(&r)?;
                        live.clear();
                    }
                    let key = fresh.next().context("out of keys")?;
                    let d = timed(|| {
                        let p = h.alloc(chunk)?;
                        p.write_at(0, &data)?;
                        Ok(h.store_handle(&key, &p)?)
                    })?
                    .1;
                    live.push(key);
                    Ok(d)
                },
            )?;
            let r: Vec<&[u8]> = live.iter().map(|k| k.as_slice()).collect();
            h.batch_delete(&r)?;
            let stored = prefill(&h, 8.min(pages - 1), &data)?;
            let mut dst = vec![0u8; chunk as usize];
            paired(
                b,
                t,
                "GET",
                chunk,
                1,
                "retrieve_copy",
                iters,
                |i| {
                    out.clear();
                    let d = timed(|| Ok(c.call(&[b"GET", &ks[i % ks.len()]], &mut out)?))?.1;
                    if out.len() != chunk as usize {
                        bail!("redis GET returned {} bytes", out.len());
                    }
                    Ok(d)
                },
                |i| {
                    Ok(timed(|| {
                        let v = h
                            .retrieve(&stored[i % stored.len()])?
                            .context("stored key not found")?;
                        v.mapping().read_at(v.offset(), &mut dst[..v.len()])?;
                        Ok(())
                    })?
                    .1)
                },
            )?;
            let r: Vec<&[u8]> = stored.iter().map(|k| k.as_slice()).collect();
            h.batch_delete(&r)?;
            h.close();
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
