//! Redis side by side: what a user would pick instead. A `redis-server` started here
//! ([`Redis`]), persistence off; metadata as SET / GET / EXISTS / MGET of 64-byte values, and
//! the data path as SET / GET of the chunk itself (what LMCache's Redis backend does). The
//! client (`conn`) waits for replies the way Maru's client does and adds as little as it can,
//! so the comparison is the servers and the data path, not the client libraries. Each Redis
//! row is measured in blocks alternating with the matching Maru call.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::context::Bench;
use crate::floor::{copy_iters, Transport};
use crate::plan::keys;
use crate::rows::{handler, prefill, refs, FreshStores};
use crate::stats::{round3, Row, Samples};
use crate::table::{listing, opt, size, Out};

mod conn;
mod server;

use conn::RedisConn;
pub use server::{available, Redis};

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
    const WARMUP: usize = 3;
    let (mut rs, mut ms) = (Samples::with_capacity(n), Samples::with_capacity(n));
    let mut i = 0;
    while i < n + WARMUP {
        let end = (i + BLOCK).min(n + WARMUP);
        for j in i..end {
            let r = redis(j)?;
            if j >= WARMUP {
                rs.push(r);
            }
        }
        for j in i..end {
            let m = maru(j)?;
            if j >= WARMUP {
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
        size(if chunk == 64 { 4096 } else { chunk }),
        m.p50_us
    );
    row.floor_us = Some(round3(m.p50_us));
    if row.p50_us > 0.0 {
        row.ratio = Some(round3(m.p50_us / row.p50_us));
    }
    b.push_redis(row);
    Ok(())
}

fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Duration)> {
    let t0 = Instant::now();
    let v = f()?;
    Ok((v, t0.elapsed()))
}

/// Runs one command, untimed.
fn command(c: &mut RedisConn, args: &[&[u8]]) -> anyhow::Result<()> {
    Ok(c.call(args, &mut Vec::new())?)
}

/// Times one command whose reply carries no value (SET, EXISTS).
fn call(c: &mut RedisConn, args: &[&[u8]], out: &mut Vec<u8>) -> anyhow::Result<Duration> {
    out.clear();
    Ok(timed(|| Ok(c.call(args, out)?))?.1)
}

/// Times a GET or MGET and checks that its reply carries `len` value bytes in all.
fn fetch(
    c: &mut RedisConn,
    args: &[&[u8]],
    out: &mut Vec<u8>,
    len: usize,
) -> anyhow::Result<Duration> {
    let d = call(c, args, out)?;
    if out.len() != len {
        bail!("redis returned {} value bytes instead of {len}", out.len());
    }
    Ok(d)
}

/// Measures the Redis rows on each transport, each against the matching Maru call on the
/// Maru server of the same transport (`urls`, in the order of `transports`).
pub fn run(
    b: &mut Bench,
    r: &Redis,
    transports: &[Transport],
    urls: &[String],
) -> anyhow::Result<()> {
    for (&t, url) in transports.iter().zip(urls) {
        let mut c = r.connect(t)?;
        metadata_rows(b, t, url, &mut c)?;
        for &chunk in &b.plan.sizes.clone() {
            data_rows(b, t, url, &mut c, chunk)?;
        }
        command(&mut c, &[b"FLUSHALL"])?;
    }
    Ok(())
}

/// Metadata: 64-byte values against Maru's key operations on 4 KiB chunks.
fn metadata_rows(b: &mut Bench, t: Transport, url: &str, c: &mut RedisConn) -> anyhow::Result<()> {
    let small = vec![0x61u8; 64];
    let region = b.plan.region;
    let n = b.plan.iters;
    let h = handler(url, 4096, region, true)?;
    let page = vec![0x63u8; 4096];
    let ks = keys(256);
    let stored = prefill(&h, 256, &page)?;
    let key = |i: usize| ks[i % ks.len()].as_slice();
    let maru_key = |i: usize| stored[i % stored.len()].as_slice();
    let mut out = Vec::new();

    // Stores leave room for the 256 prefilled keys.
    let mut stores = FreshStores::new(&h, (region / 4096) as usize, 256, n + 3);
    paired(
        b,
        t,
        "SET",
        64,
        1,
        "store",
        n,
        |i| call(c, &[b"SET", key(i), &small], &mut out),
        |_| stores.store(&page),
    )?;
    stores.finish()?;
    for k in &ks {
        command(c, &[b"SET", k, &small])?;
    }
    paired(
        b,
        t,
        "GET",
        64,
        1,
        "retrieve",
        n,
        |i| fetch(c, &[b"GET", key(i)], &mut out, 64),
        |i| Ok(timed(|| Ok(h.retrieve(maru_key(i))?))?.1),
    )?;
    paired(
        b,
        t,
        "EXISTS",
        64,
        1,
        "exists",
        n,
        |i| call(c, &[b"EXISTS", key(i)], &mut out),
        |i| Ok(timed(|| Ok(h.exists(maru_key(i))?))?.1),
    )?;
    for &m in &[32usize, 256] {
        let mut mget: Vec<&[u8]> = vec![b"MGET"];
        mget.extend(ks.iter().take(m).map(|k| k.as_slice()));
        let mk: Vec<&[u8]> = stored.iter().take(m).map(|k| k.as_slice()).collect();
        paired(
            b,
            t,
            "MGET",
            64,
            m as u32,
            "batch_retrieve",
            b.plan.batch_iters,
            |_| fetch(c, &mget, &mut out, 64 * m),
            |_| Ok(timed(|| Ok(h.batch_retrieve(&mk)?))?.1),
        )?;
    }
    h.batch_delete(&refs(&stored))?;
    h.close();
    Ok(())
}

/// The data path: the chunk itself goes through Redis; Maru writes it into shared memory
/// (store) and copies it out (retrieve_copy).
fn data_rows(
    b: &mut Bench,
    t: Transport,
    url: &str,
    c: &mut RedisConn,
    chunk: u64,
) -> anyhow::Result<()> {
    let region = b.plan.region;
    let h = handler(url, chunk, region, true)?;
    let pages = (region / chunk) as usize;
    let data = vec![0x62u8; chunk as usize];
    let iters = copy_iters(b.plan.iters, chunk);
    let ks = keys(16);
    let key = |i: usize| ks[i % ks.len()].as_slice();
    let mut out = Vec::new();

    let mut stores = FreshStores::new(&h, pages, 1, iters + 3);
    paired(
        b,
        t,
        "SET",
        chunk,
        1,
        "store",
        iters,
        |i| call(c, &[b"SET", key(i), &data], &mut out),
        |_| stores.store(&data),
    )?;
    stores.finish()?;
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
        |i| fetch(c, &[b"GET", key(i)], &mut out, chunk as usize),
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
    h.batch_delete(&refs(&stored))?;
    h.close();
    let mut del: Vec<&[u8]> = vec![b"DEL"];
    del.extend(refs(&ks));
    command(c, &del)?;
    Ok(())
}

/// The Maru row a Redis row is compared with: `(op, chunk_bytes, batch)`.
fn maru_match(redis: &Row) -> Option<(&'static str, u64, u32)> {
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

/// Redis rows carry their alternating Maru measurement (see `paired`); rows without one get
/// the matching Maru row of this run (Rust client, same transport).
pub fn compare(maru: &[Row], redis: Vec<Row>) -> Vec<Row> {
    redis
        .into_iter()
        .map(|mut r| {
            if r.ratio.is_some() {
                return r;
            }
            let Some((op, chunk, batch)) = maru_match(&r) else {
                return r;
            };
            let m = maru.iter().find(|m| {
                m.api == "rust"
                    && m.op == op
                    && m.chunk_bytes == chunk
                    && m.batch == batch
                    && m.transport == r.transport
                    && m.clients == 1
                    && !m.is_skipped()
            });
            r.floor = format!("maru {op} {} x{batch}", size(chunk));
            if let Some(m) = m {
                r.floor_us = Some(m.p50_us);
                r.floor.push_str(&format!(" {:.2} us", m.p50_us));
                if r.p50_us > 0.0 {
                    r.ratio = Some(round3(m.p50_us / r.p50_us));
                }
            }
            r
        })
        .collect()
}

/// Prints the Maru / Redis table.
pub fn print_comparison(out: &mut Out, rows: &[Row]) {
    let title = "Maru / Redis (p50; below 1.00 Maru is faster)";
    listing(out, title, rows, |r| {
        format!(
            "{:<7} {:<5} {:>5} x{:<4} redis {:>9.2} us   vs {:<36} ratio {}",
            r.op,
            r.transport,
            size(r.chunk_bytes),
            r.batch,
            r.p50_us,
            r.floor,
            opt(r.ratio, 2)
        )
    });
}
