//! The physical floors every row is compared with, measured in the same run: a raw socket
//! ping-pong with the row's own message sizes (blocking sockets, TCP_NODELAY — the fastest a
//! request/reply over that transport can be; [`probe`]), a raw memcpy into and out of a
//! shared mapping of a `/dev/shm` file, and the cost of mapping and of populating a region
//! ([`memory`]). [`Floors`] measures them on demand and keeps every one for the report.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use maru_shm::{MapMode, Mapping};
use serde::Serialize;

use crate::stats::{round3, Samples};

mod memory;
mod probe;

pub use probe::{CopyProbe, Probe};

use memory::{map_cost, memcpy};
use probe::pingpong;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Tcp,
    Unix,
}

impl Transport {
    /// The transport of a server URL (`unix://…`, else TCP).
    pub fn of_url(url: &str) -> Transport {
        if url.starts_with("unix://") {
            Transport::Unix
        } else {
            Transport::Tcp
        }
    }

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
    /// moved by 1.5× between runs on a shared VM.
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
        let pages = (region / chunk) as usize;
        Ok(CopyProbe::new(mapping, chunk, pages, direction == "into"))
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
