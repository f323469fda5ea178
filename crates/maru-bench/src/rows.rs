//! Single-client rows through the Rust client (`maru_client::MaruHandler`), per transport:
//! store (alloc + write + store of a new key), store of an existing key, retrieve (view
//! only), retrieve + copy out, exists (hit, miss), delete, pin, unpin, and the batch forms.
//! Blocks of calls alternate with blocks of floor ping-pongs of the same wire sizes (see
//! [`Bench::probe`]).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use maru_client::{MaruConfig, MaruHandler, StoreItem, StoreOutcome};

use crate::context::Bench;
use crate::cpu;
use crate::floor::{copy_iters, Transport};
use crate::plan::{keys, KIB};
use crate::stats::{Row, Samples};

/// A connected handler with pages of `chunk` bytes in one owned region of `region` bytes.
pub fn handler(url: &str, chunk: u64, region: u64, eager_map: bool) -> anyhow::Result<MaruHandler> {
    let h = MaruHandler::new(MaruConfig {
        server_url: url.to_owned(),
        pool_size: region.max(chunk),
        chunk_size_bytes: chunk,
        eager_map,
        // The rows recycle their pages themselves; growing would hide a leak.
        auto_expand: false,
        timeout_ms: 10_000,
        ..MaruConfig::default()
    })?;
    h.connect()
        .with_context(|| format!("cannot connect to {url}"))?;
    Ok(h)
}

pub fn refs(v: &[Vec<u8>]) -> Vec<&[u8]> {
    v.iter().map(|k| k.as_slice()).collect()
}

/// Stores of new keys into fresh pages, one per call of a timed row. Once these stores leave
/// at most `headroom` of the region's pages untaken (room the caller keeps for keys of its
/// own), the keys stored so far are deleted (untimed) so their pages come back; a growing
/// region would hide a leak.
pub struct FreshStores<'h> {
    h: &'h MaruHandler,
    pages: usize,
    headroom: usize,
    live: Vec<Vec<u8>>,
    fresh: std::vec::IntoIter<Vec<u8>>,
}

impl<'h> FreshStores<'h> {
    /// `calls` stores through `h`, whose owned region holds `pages` pages.
    pub fn new(h: &'h MaruHandler, pages: usize, headroom: usize, calls: usize) -> Self {
        FreshStores {
            h,
            pages,
            headroom,
            live: Vec::with_capacity(pages),
            fresh: keys(calls).into_iter(),
        }
    }

    /// alloc + write + store of `data` under a new key; returns how long those three took.
    pub fn store(&mut self, data: &[u8]) -> anyhow::Result<Duration> {
        if self.live.len() + self.headroom >= self.pages {
            self.recycle()?;
        }
        let key = self.fresh.next().context("out of keys")?;
        let h = self.h;
        let (outcome, d) = timed(|| {
            let page = h.alloc(data.len() as u64)?;
            page.write_at(0, data)?;
            Ok(h.store_handle(&key, &page)?)
        })?;
        if outcome != StoreOutcome::Stored {
            bail!("store of a new key was deduplicated");
        }
        self.live.push(key);
        Ok(d)
    }

    fn recycle(&mut self) -> anyhow::Result<()> {
        self.h.batch_delete(&refs(&self.live))?;
        self.live.clear();
        Ok(())
    }

    /// Deletes the keys still stored.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.recycle()
    }
}

/// Stores `n` fresh keys of `chunk` bytes (untimed set-up for the read rows).
pub fn prefill(h: &MaruHandler, n: usize, data: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let ks = keys(n);
    for part in ks.chunks(256) {
        let items: Vec<(&[u8], StoreItem)> = part
            .iter()
            .map(|k| (k.as_slice(), StoreItem::Bytes { prefix: &[], data }))
            .collect();
        h.batch_store(&items)?;
    }
    Ok(ks)
}

/// Times `n` calls of `f` and pushes the row. `f(i)` does its untimed set-up and returns the
/// duration of the part it times. The floor — ping-pongs of `op`'s wire sizes — is measured
/// in blocks that alternate with blocks of the row's calls, so both see the same minutes of
/// the machine, while each keeps its own rhythm (a strict call-by-call alternation makes
/// every server wake-up follow another thread's, a pattern no client produces).
#[allow(clippy::too_many_arguments)]
fn measure(
    b: &mut Bench,
    t: Transport,
    op: &str,
    chunk: u64,
    batch: u32,
    bytes_per_call: Option<u64>,
    n: usize,
    mut f: impl FnMut(usize) -> anyhow::Result<Duration>,
) -> anyhow::Result<()> {
    let mut probe = b.probe_row(t, op, chunk, batch)?;
    let mut s = Samples::with_capacity(n);
    let total = n + WARMUP;
    let mut i = 0;
    while i < total {
        let end = (i + BLOCK).min(total);
        for _ in i..end {
            probe.tick()?;
        }
        for j in i..end {
            let d = f(j)?;
            // The first calls of a row pay for cold caches and lazily grown buffers.
            if j >= WARMUP {
                s.push(d);
            }
        }
        i = end;
    }
    probe.samples.drop_first(WARMUP);
    if let Some(c) = &mut probe.copy {
        c.samples.drop_first(WARMUP);
    }
    let mut row = Row::new(op, t.name(), chunk, batch, &s.summary());
    if let Some(bytes) = bytes_per_call {
        row = row.with_bytes(bytes);
    }
    b.push_probed(t, row, probe);
    Ok(())
}

/// Calls per block of the alternation between a row and its floor.
const BLOCK: usize = 50;
const WARMUP: usize = 3;

fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Duration)> {
    let t0 = Instant::now();
    let v = f()?;
    Ok((v, t0.elapsed()))
}

pub fn run(b: &mut Bench, t: Transport, url: &str) -> anyhow::Result<()> {
    let region = b.plan.region;
    for &chunk in &b.plan.sizes.clone() {
        let h = handler(url, chunk, region, true)?;
        let pages = (region / chunk) as usize;
        let data = vec![0x42u8; chunk as usize];
        let iters = copy_iters(b.plan.iters, chunk);

        // store: alloc + write + store of a new key; pages are recycled (untimed) when the
        // region is full.
        let mut stores = FreshStores::new(&h, pages, 0, iters + WARMUP);
        measure(b, t, "store", chunk, 1, Some(chunk), iters, |_| {
            stores.store(&data)
        })?;
        stores.finish()?;

        // store of an existing key: the same three steps; the server says "existed" and the
        // client frees the page again (write-once keys).
        let existing = prefill(&h, 1, &data)?;
        measure(b, t, "store_existing", chunk, 1, Some(chunk), iters, |_| {
            let (outcome, d) = timed(|| {
                let page = h.alloc(chunk)?;
                page.write_at(0, &data)?;
                Ok(h.store_handle(&existing[0], &page)?)
            })?;
            if outcome != StoreOutcome::Deduplicated {
                bail!("store of an existing key was not deduplicated");
            }
            Ok(d)
        })?;
        h.batch_delete(&refs(&existing))?;

        // retrieve (view only) and retrieve + copy out, over a set of stored keys.
        let stored = prefill(&h, pages.saturating_sub(2).clamp(1, 256), &data)?;
        measure(b, t, "retrieve", chunk, 1, None, b.plan.iters, |i| {
            let (view, d) = timed(|| Ok(h.retrieve(&stored[i % stored.len()])?))?;
            if view.is_none() {
                bail!("retrieve of a stored key found nothing");
            }
            Ok(d)
        })?;

        let mut out = vec![0u8; chunk as usize];
        measure(b, t, "retrieve_copy", chunk, 1, Some(chunk), iters, |i| {
            let ((), d) = timed(|| {
                let view = h
                    .retrieve(&stored[i % stored.len()])?
                    .context("stored key not found")?;
                view.mapping()
                    .read_at(view.offset(), &mut out[..view.len()])?;
                Ok(())
            })?;
            Ok(d)
        })?;
        std::hint::black_box(&out);

        if chunk == 4 * KIB {
            key_ops(b, t, &h, &stored, &data)?;
            diagnostics(b, t, url, &h, &stored)?;
            batches(b, t, &h, pages, &data)?;
        }
        h.batch_delete(&refs(&stored))?;
        h.close();
    }
    Ok(())
}

/// exists (hit and miss), delete, pin and unpin on 4 KiB chunks.
fn key_ops(
    b: &mut Bench,
    t: Transport,
    h: &MaruHandler,
    stored: &[Vec<u8>],
    data: &[u8],
) -> anyhow::Result<()> {
    let n = b.plan.iters;
    let chunk = 4 * KIB;
    measure(b, t, "exists", chunk, 1, None, n, |i| {
        let (found, d) = timed(|| Ok(h.exists(&stored[i % stored.len()])?))?;
        if !found {
            bail!("exists of a stored key said no");
        }
        Ok(d)
    })?;
    let missing = keys(256);
    measure(b, t, "exists_miss", chunk, 1, None, n, |i| {
        let (found, d) = timed(|| Ok(h.exists(&missing[i % missing.len()])?))?;
        if found {
            bail!("exists of a missing key said yes");
        }
        Ok(d)
    })?;

    // pin and unpin alternate on one key; each row times its own call.
    let key = &stored[0];
    measure(b, t, "pin", chunk, 1, None, n, |_| {
        let (ok, d) = timed(|| Ok(h.pin(key)?))?;
        if !ok || !h.unpin(key)? {
            bail!("pin/unpin of a stored key failed");
        }
        Ok(d)
    })?;
    measure(b, t, "unpin", chunk, 1, None, n, |_| {
        if !h.pin(key)? {
            bail!("pin of a stored key failed");
        }
        let (ok, d) = timed(|| Ok(h.unpin(key)?))?;
        if !ok {
            bail!("unpin of a pinned key failed");
        }
        Ok(d)
    })?;

    // delete: keys stored beforehand in rounds that fit the free pages (untimed).
    let room = h
        .owned_regions()
        .iter()
        .map(|r| r.free_pages as usize)
        .sum::<usize>()
        .clamp(1, 4096);
    let mut pending: Vec<Vec<u8>> = Vec::new();
    measure(b, t, "delete", chunk, 1, None, n, |_| {
        if pending.is_empty() {
            pending = prefill(h, room, data)?;
        }
        let key = pending.pop().context("no key to delete")?;
        let (status, d) = timed(|| Ok(h.delete(&key)?))?;
        if status != maru_client::DeleteStatus::Deleted {
            bail!("delete of a stored key: {status:?}");
        }
        Ok(d)
    })?;
    h.batch_delete(&refs(&pending))?;
    Ok(())
}

/// Where the time of a call goes, as extra rows (not targets). `pin` and `unpin` of the same
/// key in turn (calls that always make a round trip: `exists` reads the key index), back to
/// back — not
/// alternating with floor ping-pongs every 50 calls — in blocks of 100 calls that rotate
/// between: the raw floor (echo ping-pong of the same sizes, api `floor`), the plain
/// blocking RPC of maru-transport (api `raw`: the server and the socket, no
/// GIL-aware wait), the handler as configured by default (api `rust-b2b`: its grace is a busy
/// poll), a handler whose grace sleeps in `ppoll` (api `rust-sleep`, `busy_poll: false`), and
/// that one with the thread's timer slack raised to 4 ms (api `rust-slack`: its `ppoll` then
/// needs no timer of its own; see docs/PERFORMANCE.md), and the echo ping-pong
/// awaited by spinning on a non-blocking `recv` (api `floor-busy`: the floor of a caller that
/// never sleeps), and the same against an echo thread that spins too (api `floor-spin`: two
/// peers that both busy-poll, as Maru's client and server do — the floor the default handler
/// should be compared with). Every row's ratio is against the (blocking) floor blocks of the
/// same rotation.
fn diagnostics(
    b: &mut Bench,
    t: Transport,
    url: &str,
    h: &MaruHandler,
    stored: &[Vec<u8>],
) -> anyhow::Result<()> {
    const BLOCK: usize = 100;
    let n = b.plan.iters.max(BLOCK);
    let parsed: maru_proto::ServerUrl = url.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    // A session of its own: pins need one (an administrator's connection only reads).
    let mut raw = crate::registry::connect(&parsed, "bench-raw")?;
    let sleeping = MaruHandler::new(MaruConfig {
        server_url: url.to_owned(),
        pool_size: 4 * KIB,
        chunk_size_bytes: 4 * KIB,
        timeout_ms: 10_000,
        busy_poll: false,
        ..MaruConfig::default()
    })?;
    sleeping.connect()?;
    let mut probe = b.probe(t, "pin", 1)?;
    let (req, resp) = probe.sizes();
    let mut spinning = b.floors.spinning_probe(t, req, resp)?;
    let mut samples: [Samples; 6] = Default::default();
    // Call i pins key i / 2 when i is even and unpins it when odd, so no pin outlives a block.
    let key_of = |i: usize| &stored[(i / 2) % stored.len()];
    let pin_or_unpin = |h: &MaruHandler, i: usize| -> anyhow::Result<Duration> {
        let key = key_of(i);
        let (ok, d) = timed(|| {
            Ok(if i.is_multiple_of(2) {
                h.pin(key)?
            } else {
                h.unpin(key)?
            })
        })?;
        if !ok {
            bail!("pin or unpin of a stored key answered false");
        }
        Ok(d)
    };
    for _ in 0..n / BLOCK {
        for _ in 0..BLOCK {
            probe.tick()?;
        }
        for i in 0..BLOCK {
            let key = key_of(i);
            let req = if i.is_multiple_of(2) {
                maru_proto::Request::Pin { key }
            } else {
                maru_proto::Request::Unpin { key }
            };
            let (resp, d) = timed(|| Ok(raw.call(&req)?))?;
            if resp != maru_proto::Response::Bool(true) {
                bail!("raw pin or unpin answered {resp:?}");
            }
            samples[0].push(d);
        }
        for i in 0..BLOCK {
            samples[1].push(pin_or_unpin(h, i)?);
        }
        for i in 0..BLOCK {
            samples[2].push(pin_or_unpin(&sleeping, i)?);
        }
        let old = cpu::set_timer_slack_ns(4_000_000);
        for i in 0..BLOCK {
            samples[3].push(pin_or_unpin(&sleeping, i)?);
        }
        cpu::set_timer_slack_ns(old);
        for _ in 0..BLOCK {
            samples[4].push(probe.busy_round_trip()?);
        }
        for _ in 0..BLOCK {
            samples[5].push(spinning.busy_round_trip()?);
        }
    }
    sleeping.close();
    let _ = raw.call(&maru_proto::Request::Goodbye);
    let floor = probe.samples.clone();
    for (api, s) in [
        "raw",
        "rust-b2b",
        "rust-sleep",
        "rust-slack",
        "floor-busy",
        "floor-spin",
    ]
    .iter()
    .zip(samples)
    {
        let mut p = b.probe(t, "pin", 1)?;
        p.samples = floor.clone();
        b.api = Some(api);
        let row = Row::new("pin", t.name(), 4 * KIB, 1, &s.summary())
            .note("pin and unpin in turn, back to back, blocks of 100 rotating with the floor");
        b.push_probed(t, row, p);
    }
    b.api = None;
    Ok(())
}

/// batch_store, batch_retrieve and batch_exists of 32 and 256 keys of 4 KiB chunks.
fn batches(
    b: &mut Bench,
    t: Transport,
    h: &MaruHandler,
    pages: usize,
    data: &[u8],
) -> anyhow::Result<()> {
    let chunk = 4 * KIB;
    for &n in &[32usize, 256] {
        let calls = b.plan.batch_iters;
        // batch_store: n copies into fresh pages and one registration round trip.
        let mut live: Vec<Vec<u8>> = Vec::new();
        measure(
            b,
            t,
            "batch_store",
            chunk,
            n as u32,
            Some(chunk * n as u64),
            calls,
            |_| {
                if live.len() + n > pages.saturating_sub(512) {
                    h.batch_delete(&refs(&live))?;
                    live.clear();
                }
                let ks = keys(n);
                let items: Vec<(&[u8], StoreItem)> = ks
                    .iter()
                    .map(|k| (k.as_slice(), StoreItem::Bytes { prefix: &[], data }))
                    .collect();
                let (out, d) = timed(|| Ok(h.batch_store(&items)?))?;
                if out.iter().any(|o| *o != StoreOutcome::Stored) {
                    bail!("batch_store of new keys deduplicated some");
                }
                live.extend(ks);
                Ok(d)
            },
        )?;
        h.batch_delete(&refs(&live))?;

        let stored = prefill(h, n, data)?;
        let r = refs(&stored);
        measure(b, t, "batch_retrieve", chunk, n as u32, None, calls, |_| {
            let (views, d) = timed(|| Ok(h.batch_retrieve(&r)?))?;
            if views.iter().any(|v| v.is_none()) {
                bail!("batch_retrieve missed a stored key");
            }
            Ok(d)
        })?;
        measure(b, t, "batch_exists", chunk, n as u32, None, calls, |_| {
            let (found, d) = timed(|| Ok(h.batch_exists(&r)?))?;
            if found.iter().any(|f| !f) {
                bail!("batch_exists missed a stored key");
            }
            Ok(d)
        })?;
        h.batch_delete(&r)?;
    }
    Ok(())
}
