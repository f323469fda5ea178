//! The state of one run: its plan, its floors and the rows measured so far. Every row goes
//! through [`Bench::push`] or [`Bench::push_probed`], which attach the row's floor, print it
//! and keep it for the report.

use anyhow::Context;
use maru_proto::RegionInfo;

use crate::concurrency::ALTERNATING;
use crate::floor::{Floors, Probe, Transport};
use crate::plan::{key_of, Plan, GIB};
use crate::stats::{round3, round4, Row};
use crate::table::{self, size, Out};
use crate::wire;
use crate::worker::Launcher;

pub struct Bench {
    pub plan: Plan,
    pub floors: Floors,
    /// A region description as the server sends it, for the wire sizes of lookups.
    pub region: RegionInfo,
    pub rows: Vec<Row>,
    pub redis: Vec<Row>,
    pub out: Out,
    /// Set while diagnostic rows are measured: their `api` (e.g. `raw`).
    pub api: Option<&'static str>,
    /// How worker processes are started.
    pub launcher: Launcher,
}

impl Bench {
    /// An echo connection with the wire sizes of `op` over `batch` keys, to alternate floor
    /// samples with the row's calls.
    pub fn probe(&self, t: Transport, op: &str, batch: u32) -> anyhow::Result<Probe> {
        let w = wire::wire_of(op, batch as usize, &key_of(0), &self.region)
            .with_context(|| format!("no wire shape for {op}"))?;
        self.floors.probe(t, w.req, w.resp)
    }

    /// [`Bench::probe`] for a row of `chunk`-byte chunks: a row that copies data also samples
    /// a copy of one chunk with every round trip.
    pub fn probe_row(
        &self,
        t: Transport,
        op: &str,
        chunk: u64,
        batch: u32,
    ) -> anyhow::Result<Probe> {
        let mut p = self.probe(t, op, batch)?;
        if let Some(dir) = copy_direction(op) {
            p.attach_copy(self.floors.copy_probe(dir, chunk, self.plan.region)?);
        }
        Ok(p)
    }

    /// Attaches the floor measured by `probe` (alternating with the row) and prints the row.
    pub fn push_probed(&mut self, t: Transport, row: Row, probe: Probe) {
        self.push_with(t, row, Some(probe))
    }

    /// Attaches a floor measured now and prints the row.
    pub fn push(&mut self, t: Transport, row: Row) {
        self.push_with(t, row, None)
    }

    fn push_with(&mut self, t: Transport, mut row: Row, probe: Option<Probe>) {
        if let Some(api) = self.api {
            row.api = api.into();
        }
        let row = match self.with_floor(t, row.clone(), probe) {
            Ok(r) => r,
            Err(e) => row.note(format!("floor not measured: {e:#}")),
        };
        table::row(&mut self.out, &row);
        self.rows.push(row);
    }

    /// Prints and keeps a Redis row (its comparison is attached by the caller).
    pub fn push_redis(&mut self, mut row: Row) {
        row.api = "redis".into();
        table::row(&mut self.out, &row);
        self.redis.push(row);
    }

    pub fn section(&mut self, title: &str) {
        table::section(&mut self.out, title);
    }

    /// The row's floor: a ping-pong of its exact message sizes (times its round trips), plus
    /// a raw memcpy of every chunk it copies; for the first alloc, populating the pool; for a
    /// first retrieve, a round trip plus mapping the region.
    fn with_floor(&self, t: Transport, mut row: Row, probe: Option<Probe>) -> anyhow::Result<Row> {
        if row.is_skipped() {
            return Ok(row);
        }
        let (floor_us, what, gbps) = match row.op.as_str() {
            // A connect (a handshake of a few round trips and the eager mapping of what is
            // live) has none; processes reading their own memory are a floor themselves; runs
            // alternating with one process are judged against those.
            "connect" | "read_own" | ALTERNATING => return Ok(row),
            "first_alloc" => {
                let p = self.floors.map("populate", row.chunk_bytes)?;
                (
                    p.p50_us,
                    format!("mmap+populate {}", size(row.chunk_bytes)),
                    None,
                )
            }
            _ => self.round_trip_floor(t, &row, probe)?,
        };
        row.floor_us = Some(round3(floor_us));
        row.floor_gbps = gbps;
        row.floor = what;
        if floor_us > 0.0 {
            row.ratio = Some(round4(row.p50_us / floor_us));
        }
        Ok(row)
    }

    /// The floor of a row made of round trips: µs, what it is in words, and the copy
    /// bandwidth when the row copies chunks.
    fn round_trip_floor(
        &self,
        t: Transport,
        row: &Row,
        probe: Option<Probe>,
    ) -> anyhow::Result<(f64, String, Option<f64>)> {
        let op = row.op.as_str();
        let w = wire::wire_of(op, row.batch as usize, &key_of(0), &self.region)
            .with_context(|| format!("no wire shape for {op}"))?;
        let why = format!(
            "{} {} {} x{} {}",
            row.api,
            op,
            size(row.chunk_bytes),
            row.batch,
            t.name()
        );
        let mut copy_samples = None;
        let (rtt, how) = match probe {
            Some(p) if p.samples.summary().n > 0 && p.sizes() == (w.req, w.resp) => {
                copy_samples = p.copy.as_ref().map(|c| c.samples.clone());
                (
                    self.floors.record(t, w.req, w.resp, &p.samples, &why),
                    "alternating",
                )
            }
            _ => (self.floors.rtt(t, w.req, w.resp, &why)?, "after"),
        };
        let mut us = rtt.p50_us * w.trips as f64;
        let mut what = format!("rtt {}B/{}B ({how})", w.req, w.resp);
        let mut gbps = None;
        if let Some(dir) = copy_direction(op) {
            // The copies sampled alternating with the row; else one measured now.
            let alternating = copy_samples
                .map(|s| s.summary())
                .filter(|m| m.n > 0 && m.p50_us > 0.0);
            let (copy_us, copy_gbps, how) = match alternating {
                Some(m) => (
                    m.p50_us,
                    round3(row.chunk_bytes as f64 / (m.p50_us * 1e3)),
                    "alternating",
                ),
                None => {
                    let c = self.floors.copy(dir, row.chunk_bytes, self.plan.region)?;
                    (c.p50_us, c.gbps, "measured once")
                }
            };
            let n = row.batch.max(1) as f64;
            us += copy_us * n;
            what.push_str(&format!(
                " + {}x memcpy {dir} {} ({how})",
                n,
                size(row.chunk_bytes)
            ));
            gbps = Some(copy_gbps);
        }
        if op == "first_retrieve_1gib" {
            let m = self.floors.map("map", GIB)?;
            us += m.p50_us;
            what.push_str(" + mmap 1G");
        }
        Ok((us, what, gbps))
    }
}

/// Which way a row's chunks are copied, if it copies any: into shared memory (stores) or out
/// of it (`retrieve_copy`).
fn copy_direction(op: &str) -> Option<&'static str> {
    match op {
        "store" | "store_existing" | "batch_store" => Some("into"),
        "retrieve_copy" => Some("out"),
        _ => None,
    }
}
