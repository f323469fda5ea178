//! The physical floors every row is compared with, measured in the same run: a raw socket
//! ping-pong with the row's own message sizes (blocking sockets, TCP_NODELAY — the fastest a
//! request/reply over that transport can be), a raw memcpy into and out of a shared mapping of
//! a `/dev/shm` file, and the cost of mapping and of populating a region.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use maru_shm::{MapMode, Mapping};
use serde::Serialize;

use super::stats::{round3, Samples};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Tcp,
    Unix,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Unix => "unix",
        }
    }
}

/// One measured ping-pong.
#[derive(Debug, Clone, Serialize)]
pub struct RttFloor {
    pub transport: &'static str,
    pub req_bytes: usize,
    pub resp_bytes: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub samples: usize,
    /// The row it was measured for (alternating with it in blocks, or right after it).
    pub row: String,
}

/// One measured copy.
#[derive(Debug, Clone, Serialize)]
pub struct CopyFloor {
    /// `into` (private buffer → shared mapping) or `out` (shared mapping → private buffer).
    pub direction: &'static str,
    pub chunk_bytes: u64,
    /// Size of the mapping the copies rotate over (as large as the rows' owned region, so
    /// the destination is as cold as it is for a store).
    pub region_bytes: u64,
    pub p50_us: f64,
    pub gbps: f64,
}

/// A measured mapping cost.
#[derive(Debug, Clone, Serialize)]
pub struct MapFloor {
    /// `map` (mmap without populate) or `populate` (mmap + MADV_POPULATE_WRITE of fresh
    /// tmpfs pages, what an owned region costs at connect).
    pub kind: &'static str,
    pub bytes: u64,
    pub p50_us: f64,
}

/// Floors measured on demand and cached, so a floor is measured close in time to the first
/// row that needs it.
pub struct Floors {
    dir: PathBuf,
    iters: usize,
    /// Every ping-pong measured, in order (the same sizes are measured again for each row:
    /// round trips on a shared VM drift within seconds).
    rtt: Mutex<Vec<RttFloor>>,
    copies: Mutex<HashMap<(&'static str, u64, u64), CopyFloor>>,
    maps: Mutex<HashMap<(&'static str, u64), MapFloor>>,
    map_samples: usize,
    /// The populated mapping copy probes rotate over (one for the whole run).
    copy_region: Mutex<Option<Arc<Mapping>>>,
}

impl Floors {
    /// Floors using scratch files and sockets under `dir`, `iters` round trips per ping-pong.
    pub fn new(dir: &Path, iters: usize, map_samples: usize) -> Floors {
        Floors {
            dir: dir.to_owned(),
            iters,
            rtt: Mutex::default(),
            copies: Mutex::default(),
            maps: Mutex::default(),
            map_samples,
            copy_region: Mutex::default(),
        }
    }

    /// The ping-pong floor for `req` request bytes and `resp` reply bytes, measured now.
    pub fn rtt(
        &self,
        t: Transport,
        req: usize,
        resp: usize,
        why: &str,
    ) -> anyhow::Result<RttFloor> {
        let s = pingpong(t, &self.dir, req, resp, self.iters)?;
        Ok(self.record(t, req, resp, &s, why))
    }

    /// Logs a measured ping-pong (for the report) and returns it.
    pub fn record(
        &self,
        t: Transport,
        req: usize,
        resp: usize,
        s: &Samples,
        why: &str,
    ) -> RttFloor {
        let m = s.summary();
        let f = RttFloor {
            transport: t.name(),
            req_bytes: req,
            resp_bytes: resp,
            p50_us: round3(m.p50_us),
            p99_us: round3(m.p99_us),
            samples: m.n,
            row: why.to_owned(),
        };
        lock(&self.rtt).push(f.clone());
        f
    }

    /// An echo connection for ping-pongs that alternate with a row's own calls in blocks;
    /// sample before each call, so both see the same machine (other work, idle states).
    pub fn probe(&self, t: Transport, req: usize, resp: usize) -> anyhow::Result<Probe> {
        Probe::start(t, &self.dir, req, resp, false)
    }

    /// A probe whose echo thread polls its socket without sleeping: with
    /// [`Probe::busy_round_trip`], the floor of two peers that both busy-poll (as Maru's client
    /// and server do, see docs/ARCHITECTURE.md §6).
    pub fn spinning_probe(&self, t: Transport, req: usize, resp: usize) -> anyhow::Result<Probe> {
        Probe::start(t, &self.dir, req, resp, true)
    }

    /// Copies of `chunk` bytes into or out of a populated shared mapping of `region` bytes,
    /// sampled one at a time between a row's calls (see [`Probe::attach_copy`]), so the copy
    /// floor sees the same minutes of the machine as the row — a copy floor measured once
    /// moved by 1.5× between runs on this VM.
    pub fn copy_probe(
        &self,
        direction: &'static str,
        chunk: u64,
        region: u64,
    ) -> anyhow::Result<CopyProbe> {
        let region = region.max(chunk);
        let mapping = {
            let mut slot = lock(&self.copy_region);
            match slot.as_ref() {
                Some(m) if m.len() as u64 >= region => m.clone(),
                _ => {
                    let path = self.dir.join("floor-copy-probe.shm");
                    let file = std::fs::File::create(&path)?;
                    file.set_len(region)?;
                    drop(file);
                    let m = Mapping::map(&path, 0, region, MapMode::ReadWrite, true);
                    // The mapping outlives the file's name.
                    let _ = std::fs::remove_file(&path);
                    let m = Arc::new(m?);
                    *slot = Some(m.clone());
                    m
                }
            }
        };
        Ok(CopyProbe {
            pages: (region / chunk) as usize,
            mapping,
            buf: vec![0xc3; chunk as usize],
            next: 0,
            into: direction == "into",
            direction,
            samples: Samples::default(),
        })
    }

    /// memcpy of `chunk` bytes into (`into`) or out of (`out`) a populated shared mapping of
    /// `region` bytes, rotating over its pages.
    pub fn copy(
        &self,
        direction: &'static str,
        chunk: u64,
        region: u64,
    ) -> anyhow::Result<CopyFloor> {
        if let Some(f) = lock(&self.copies).get(&(direction, chunk, region)) {
            return Ok(f.clone());
        }
        let iters = copy_iters(self.iters, chunk);
        let s = memcpy(&self.dir, direction, chunk, region, iters)?.summary();
        let f = CopyFloor {
            direction,
            chunk_bytes: chunk,
            region_bytes: region,
            p50_us: round3(s.p50_us),
            gbps: round3(chunk as f64 / (s.p50_us * 1e3)),
        };
        lock(&self.copies).insert((direction, chunk, region), f.clone());
        Ok(f)
    }

    /// Cost of mapping `bytes` of a shm file: `map` (no populate, what a lazy first retrieve
    /// pays) or `populate` (fresh pages, pre-faulted for writing: what connect pays for the
    /// owned region).
    pub fn map(&self, kind: &'static str, bytes: u64) -> anyhow::Result<MapFloor> {
        if let Some(f) = lock(&self.maps).get(&(kind, bytes)) {
            return Ok(f.clone());
        }
        let samples = if kind == "map" {
            self.map_samples * 10
        } else {
            self.map_samples
        };
        let s = map_cost(&self.dir, kind == "populate", bytes, samples)?.summary();
        let f = MapFloor {
            kind,
            bytes,
            p50_us: round3(s.p50_us),
        };
        lock(&self.maps).insert((kind, bytes), f.clone());
        Ok(f)
    }

    pub fn all_rtt(&self) -> Vec<RttFloor> {
        lock(&self.rtt).clone()
    }

    pub fn all_copies(&self) -> Vec<CopyFloor> {
        let mut v: Vec<_> = lock(&self.copies).values().cloned().collect();
        v.sort_by_key(|f| (f.direction, f.chunk_bytes));
        v
    }

    pub fn all_maps(&self) -> Vec<MapFloor> {
        let mut v: Vec<_> = lock(&self.maps).values().cloned().collect();
        v.sort_by_key(|f| (f.kind, f.bytes));
        v
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Big copies take long; fewer of them give the same confidence.
pub fn copy_iters(iters: usize, chunk: u64) -> usize {
    let cap = ((256u64 << 20) / chunk.max(1)) as usize;
    iters.min(cap.max(20))
}

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
const SPIN_WINDOW: std::time::Duration = std::time::Duration::from_micros(50);

/// [`echo`] that polls its socket without sleeping for up to [`SPIN_WINDOW`] before each
/// blocking read, as Maru's server does between requests (`maru-server/src/spin.rs`).
fn echo_spinning<S: Read + Write + std::os::fd::AsRawFd>(mut s: S, req: usize, resp: usize) {
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

fn client<S: Read + Write>(mut s: S, req: usize, resp: usize, iters: usize) -> io::Result<Samples> {
    let wb = vec![0xa5_u8; req];
    let mut rb = vec![0u8; resp];
    for _ in 0..(iters / 10).max(10) {
        s.write_all(&wb)?;
        s.read_exact(&mut rb)?;
    }
    let mut samples = Samples::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        s.write_all(&wb)?;
        s.read_exact(&mut rb)?;
        samples.push(t.elapsed());
    }
    Ok(samples)
}

/// Copy samples taken between a row's calls (see [`Floors::copy_probe`]).
pub struct CopyProbe {
    mapping: Arc<Mapping>,
    buf: Vec<u8>,
    pages: usize,
    next: usize,
    into: bool,
    pub direction: &'static str,
    pub samples: Samples,
}

impl CopyProbe {
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

trait Duplex: Read + Write + Send + std::os::fd::AsRawFd {}
impl<T: Read + Write + Send + std::os::fd::AsRawFd> Duplex for T {}

/// A connection to an echo thread, for floor samples taken between a row's calls.
pub struct Probe {
    conn: Option<Box<dyn Duplex>>,
    echo: Option<thread::JoinHandle<()>>,
    wb: Vec<u8>,
    rb: Vec<u8>,
    pub transport: Transport,
    pub samples: Samples,
    /// Copy floor samples taken with every round trip, for rows that move data.
    pub copy: Option<CopyProbe>,
    path: Option<PathBuf>,
}

impl Probe {
    fn start(
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
                let echo = thread::spawn(move || {
                    super::cpu::enter_server_side();
                    if let Ok((s, _)) = l.accept() {
                        let _ = s.set_nodelay(true);
                        if spin {
                            echo_spinning(s, req, resp);
                        } else {
                            echo(s, req, resp);
                        }
                    }
                });
                let c = TcpStream::connect(addr)?;
                c.set_nodelay(true)?;
                (Box::new(c), echo, None)
            }
            Transport::Unix => {
                static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = dir.join(format!("probe-{n}.sock"));
                let _ = std::fs::remove_file(&path);
                let l = UnixListener::bind(&path)?;
                let echo = thread::spawn(move || {
                    super::cpu::enter_server_side();
                    if let Ok((s, _)) = l.accept() {
                        if spin {
                            echo_spinning(s, req, resp);
                        } else {
                            echo(s, req, resp);
                        }
                    }
                });
                (Box::new(UnixStream::connect(&path)?), echo, Some(path))
            }
        };
        let mut p = Probe {
            conn: Some(conn),
            echo: Some(echo),
            wb: vec![0xa5; req],
            rb: vec![0; resp],
            transport: t,
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
    pub fn busy_round_trip(&mut self) -> io::Result<std::time::Duration> {
        let t = Instant::now();
        let c = self.conn.as_mut().ok_or(io::ErrorKind::NotConnected)?;
        c.write_all(&self.wb)?;
        // A window far longer than any reply: this caller never sleeps before it arrives.
        maru_transport::busy::spin_readable(
            c.as_raw_fd(),
            std::time::Duration::from_secs(1),
            || false,
        )?;
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

/// A ping-pong against an echo thread: the floor of one request/reply on `t`.
pub fn pingpong(
    t: Transport,
    dir: &Path,
    req: usize,
    resp: usize,
    iters: usize,
) -> anyhow::Result<Samples> {
    match t {
        Transport::Tcp => {
            let l = TcpListener::bind("127.0.0.1:0")?;
            let addr = l.local_addr()?;
            let echo_thread = thread::spawn(move || {
                super::cpu::enter_server_side();
                if let Ok((s, _)) = l.accept() {
                    let _ = s.set_nodelay(true);
                    echo(s, req, resp);
                }
            });
            let c = TcpStream::connect(addr)?;
            c.set_nodelay(true)?;
            let r = client(c, req, resp, iters);
            let _ = echo_thread.join();
            Ok(r?)
        }
        Transport::Unix => {
            let path = dir.join(format!("floor-{req}-{resp}.sock"));
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path)?;
            let echo_thread = thread::spawn(move || {
                super::cpu::enter_server_side();
                if let Ok((s, _)) = l.accept() {
                    echo(s, req, resp);
                }
            });
            let r = UnixStream::connect(&path).and_then(|c| client(c, req, resp, iters));
            let _ = echo_thread.join();
            let _ = std::fs::remove_file(&path);
            Ok(r?)
        }
    }
}

/// memcpy of `chunk` bytes per sample into or out of a populated shared mapping of `region`
/// bytes (a fresh `/dev/shm` file under `dir`), page after page.
fn memcpy(
    dir: &Path,
    direction: &str,
    chunk: u64,
    region: u64,
    iters: usize,
) -> anyhow::Result<Samples> {
    let region = region.max(chunk);
    let path = dir.join(format!("floor-memcpy-{chunk}.shm"));
    let file = std::fs::File::create(&path)?;
    file.set_len(region)?;
    drop(file);
    let result = (|| {
        let m = Mapping::map(&path, 0, region, MapMode::ReadWrite, true)?;
        let pages = (region / chunk) as usize;
        let mut private = vec![0xc3_u8; chunk as usize];
        let mut samples = Samples::with_capacity(iters);
        for i in 0..iters + pages.min(8) {
            let at = (i % pages) * chunk as usize;
            let t = Instant::now();
            if direction == "into" {
                m.write_at(at, &private)?;
            } else {
                m.read_at(at, &mut private)?;
            }
            // The first few copies warm the code path, not the floor.
            if i >= pages.min(8) {
                samples.push(t.elapsed());
            }
        }
        std::hint::black_box(&private);
        Ok(samples)
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// Time to map `bytes` of a fresh shm file, with or without populating it.
fn map_cost(dir: &Path, populate: bool, bytes: u64, samples: usize) -> anyhow::Result<Samples> {
    let path = dir.join(format!("floor-map-{bytes}.shm"));
    let mut out = Samples::with_capacity(samples);
    let result = (|| {
        for _ in 0..samples.max(1) {
            // A fresh file every time: the pages a populate faults in are new tmpfs pages, as
            // they are for a region the resource manager just carved (it punches freed ranges).
            let _ = std::fs::remove_file(&path);
            std::fs::File::create(&path)?.set_len(bytes)?;
            let mode = if populate {
                MapMode::ReadWrite
            } else {
                MapMode::ReadOnly
            };
            let m = out.time(|| Mapping::map(&path, 0, bytes, mode, populate))?;
            drop(m);
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    result.map(|()| out)
}
