//! Ping-pongs against an echo thread: a [`Probe`] is one connection to one, whose samples
//! alternate with a row's calls in blocks (so both see the same minutes of the machine), and
//! [`pingpong`] a run of them measured on its own.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use maru_shm::Mapping;

use super::Transport;
use crate::cpu;
use crate::stats::Samples;

/// Reads exactly `req` bytes, answers `resp` bytes, until the peer hangs up.
fn echo<S: Read + Write>(mut s: S, req: usize, resp: usize) {
    let mut rb = vec![0u8; req];
    let wb = vec![0x5a_u8; resp];
    while s.read_exact(&mut rb).is_ok() {
        if s.write_all(&wb).is_err() {
            return;
        }
    }
}

/// How long the busy floors poll before they block, as Maru's client and server do by default.
const SPIN_WINDOW: Duration = Duration::from_micros(50);

/// [`echo`] that polls its socket without sleeping for up to [`SPIN_WINDOW`] before each
/// blocking read, as Maru's server does between requests (`maru-server --busy-poll-us`).
fn echo_spinning<S: Read + Write + AsRawFd>(mut s: S, req: usize, resp: usize) {
    let mut rb = vec![0u8; req];
    let wb = vec![0x5a_u8; resp];
    let fd = s.as_raw_fd();
    loop {
        let _ = maru_transport::busy::spin_readable(fd, SPIN_WINDOW, || false);
        if s.read_exact(&mut rb).is_err() || s.write_all(&wb).is_err() {
            return;
        }
    }
}

/// The echo thread of a probe, on the server side: accepts one connection and answers it
/// until the peer hangs up.
fn serve_one<S: Read + Write + AsRawFd>(
    accept: impl FnOnce() -> io::Result<S> + Send + 'static,
    req: usize,
    resp: usize,
    spin: bool,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        cpu::enter_server_side();
        if let Ok(s) = accept() {
            if spin {
                echo_spinning(s, req, resp);
            } else {
                echo(s, req, resp);
            }
        }
    })
}

/// Copy samples taken between a row's calls (see [`super::Floors::copy_probe`]).
pub struct CopyProbe {
    mapping: Arc<Mapping>,
    buf: Vec<u8>,
    pages: usize,
    next: usize,
    into: bool,
    pub samples: Samples,
}

impl CopyProbe {
    /// Copies of `chunk` bytes into (`into`) or out of the first `pages` chunk-sized pages
    /// of `mapping`, one page after the other.
    pub(super) fn new(mapping: Arc<Mapping>, chunk: u64, pages: usize, into: bool) -> CopyProbe {
        CopyProbe {
            pages,
            mapping,
            buf: vec![0xc3; chunk as usize],
            next: 0,
            into,
            samples: Samples::default(),
        }
    }

    /// One timed copy of a chunk, into or out of the next page of the mapping.
    pub fn tick(&mut self) -> anyhow::Result<()> {
        let at = self.next * self.buf.len();
        self.next = (self.next + 1) % self.pages;
        let t = Instant::now();
        if self.into {
            self.mapping.write_at(at, &self.buf)?;
        } else {
            self.mapping.read_at(at, &mut self.buf)?;
        }
        self.samples.push(t.elapsed());
        std::hint::black_box(&self.buf);
        Ok(())
    }
}

trait Duplex: Read + Write + Send + AsRawFd {}
impl<T: Read + Write + Send + AsRawFd> Duplex for T {}

/// A connection to an echo thread, for floor samples taken between a row's calls.
pub struct Probe {
    conn: Option<Box<dyn Duplex>>,
    echo: Option<thread::JoinHandle<()>>,
    wb: Vec<u8>,
    rb: Vec<u8>,
    pub samples: Samples,
    /// Copy floor samples taken with every round trip, for rows that move data.
    pub copy: Option<CopyProbe>,
    path: Option<PathBuf>,
}

impl Probe {
    pub(super) fn start(
        t: Transport,
        dir: &Path,
        req: usize,
        resp: usize,
        spin: bool,
    ) -> anyhow::Result<Probe> {
        let (conn, echo, path): (Box<dyn Duplex>, _, _) = match t {
            Transport::Tcp => {
                let l = TcpListener::bind("127.0.0.1:0")?;
                let addr = l.local_addr()?;
                let accept = move || {
                    let (s, _) = l.accept()?;
                    let _ = s.set_nodelay(true);
                    Ok(s)
                };
                let echo = serve_one(accept, req, resp, spin);
                let c = TcpStream::connect(addr)?;
                c.set_nodelay(true)?;
                (Box::new(c), echo, None)
            }
            Transport::Unix => {
                static N: AtomicU64 = AtomicU64::new(0);
                let n = N.fetch_add(1, Ordering::Relaxed);
                let path = dir.join(format!("probe-{n}.sock"));
                let _ = std::fs::remove_file(&path);
                let l = UnixListener::bind(&path)?;
                let echo = serve_one(move || Ok(l.accept()?.0), req, resp, spin);
                (Box::new(UnixStream::connect(&path)?), echo, Some(path))
            }
        };
        let mut p = Probe {
            conn: Some(conn),
            echo: Some(echo),
            wb: vec![0xa5; req],
            rb: vec![0; resp],
            samples: Samples::default(),
            copy: None,
            path,
        };
        for _ in 0..10 {
            p.round_trip()?;
        }
        Ok(p)
    }

    fn round_trip(&mut self) -> io::Result<()> {
        let c = self.conn.as_mut().ok_or(io::ErrorKind::NotConnected)?;
        c.write_all(&self.wb)?;
        c.read_exact(&mut self.rb)
    }

    /// One timed ping-pong (and one timed copy, with [`Probe::attach_copy`]).
    pub fn tick(&mut self) -> anyhow::Result<()> {
        let t = Instant::now();
        self.round_trip()?;
        self.samples.push(t.elapsed());
        if let Some(c) = &mut self.copy {
            c.tick()?;
        }
        Ok(())
    }

    /// Takes a copy sample with every round trip from now on.
    pub fn attach_copy(&mut self, copy: CopyProbe) {
        self.copy = Some(copy);
    }

    /// One ping-pong whose reply is awaited by polling the socket without sleeping (what the
    /// client's busy-poll grace does), timed and returned rather than recorded: the floor of a
    /// spinning caller, for the diagnostic rows.
    pub fn busy_round_trip(&mut self) -> io::Result<Duration> {
        let t = Instant::now();
        let c = self.conn.as_mut().ok_or(io::ErrorKind::NotConnected)?;
        c.write_all(&self.wb)?;
        // A window far longer than any reply: this caller never sleeps before it arrives.
        maru_transport::busy::spin_readable(c.as_raw_fd(), Duration::from_secs(1), || false)?;
        c.read_exact(&mut self.rb)?;
        Ok(t.elapsed())
    }

    pub fn sizes(&self) -> (usize, usize) {
        (self.wb.len(), self.rb.len())
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        drop(self.conn.take());
        if let Some(e) = self.echo.take() {
            let _ = e.join();
        }
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A ping-pong against an echo thread: the floor of one request/reply on `t`, `iters`
/// samples after a warm-up.
pub fn pingpong(
    t: Transport,
    dir: &Path,
    req: usize,
    resp: usize,
    iters: usize,
) -> anyhow::Result<Samples> {
    let mut p = Probe::start(t, dir, req, resp, false)?;
    for _ in 0..(iters / 10).max(10) {
        p.round_trip()?;
    }
    for _ in 0..iters {
        p.tick()?;
    }
    Ok(std::mem::take(&mut p.samples))
}
