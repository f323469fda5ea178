//! The server's memory per key and its batched registration rate, measured with the raw
//! protocol (no client bookkeeping in the way): one session registers N keys (1M in the
//! quick and full runs) in batches, pointing into one small region, and the embedded
//! process's anonymous memory is read before and after.

use std::time::{Duration, Instant};

use anyhow::bail;
use maru_proto::stats::ServerStats;
use maru_proto::{Hello, RegisterEntry, Request, Response, Role, ServerUrl};
use maru_transport::{local_identity, BlockingConn};
use serde::Serialize;

use crate::daemons::rss_anon_bytes;
use crate::plan::{key_of, next_key_ids, KEY_LEN};

/// Keys per registration request.
pub const BATCH: usize = 1024;

#[derive(Debug, Clone, Serialize)]
pub struct Registration {
    pub keys: u64,
    pub key_bytes: usize,
    pub batch: usize,
    /// Anonymous memory of the process running the server, before and after.
    pub rss_before: u64,
    pub rss_after: u64,
    /// `(rss_after - rss_before) / keys`; includes the key bytes themselves.
    pub bytes_per_key: Option<f64>,
    pub register_keys_per_s: f64,
    pub delete_keys_per_s: f64,
    pub note: String,
}

/// `server_pid`: the process the server runs in, when it is ours to read (embedded).
pub fn run(url: &str, n: usize, server_pid: Option<u32>) -> anyhow::Result<Registration> {
    let own_process = server_pid.is_some();
    let rss = || server_pid.and_then(rss_anon_bytes).unwrap_or(0);
    let url: ServerUrl = url.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut c = connect(&url, &format!("bench-registry-{}", std::process::id()))?;
    let region = match c.call(&Request::RequestRegion { size: 2 << 20 })? {
        Response::Region(r) => r,
        other => bail!("request_region answered {other:?}"),
    };
    let first = next_key_ids(n as u64);
    let rss_before = rss();

    let t0 = Instant::now();
    // Values of one byte: the keys share the region's pages, and the pool's usage counts each
    // key's length, so 4 KiB values would count gigabytes and the evictor would take keys
    // back before the count below.
    register_keys(&mut c, &region.handle, first, n, 1)?;
    let reg_time = t0.elapsed();
    let rss_after = rss();

    let stats = match c.call(&Request::Stats)? {
        Response::Stats(json) => serde_json::from_str::<ServerStats>(&json)?,
        other => bail!("stats answered {other:?}"),
    };
    if stats.keys < n as u64 {
        bail!(
            "the server holds {} keys after registering {n} (eviction: {:?})",
            stats.keys,
            stats.eviction
        );
    }

    let t1 = Instant::now();
    in_batches(first, n, |_, buf| {
        let keys: Vec<&[u8]> = buf.chunks(KEY_LEN).collect();
        let m = keys.len();
        match c.call(&Request::BatchDelete { keys })? {
            Response::BatchDelete(v) if v.len() == m => Ok(()),
            other => bail!("batch_delete answered {other:?}"),
        }
    })?;
    let del_time = t1.elapsed();
    let _ = c.call(&Request::ReturnRegion {
        region_id: region.handle.region_id,
    });
    let _ = c.call(&Request::Goodbye);

    let rate = |d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    Ok(Registration {
        keys: n as u64,
        key_bytes: KEY_LEN,
        batch: BATCH,
        rss_before,
        rss_after,
        bytes_per_key: own_process.then(|| rss_after.saturating_sub(rss_before) as f64 / n as f64),
        register_keys_per_s: rate(reg_time).round(),
        delete_keys_per_s: rate(del_time).round(),
        note: if own_process {
            format!("anonymous RSS of the embedded server's process, {n} keys of {KEY_LEN} bytes")
        } else {
            "bytes per key needs the embedded server (its process's memory); not measured \
             against --server"
                .into()
        },
    })
}

/// A client session on `url` named `id`, through the raw protocol.
pub(crate) fn connect(url: &ServerUrl, id: &str) -> anyhow::Result<BlockingConn> {
    let (host, pid, start_time) = local_identity();
    let hello = Hello {
        role: Role::Client,
        instance_id: id,
        host: &host,
        pid,
        start_time,
        session_token: None,
        namespace: "",
    };
    Ok(BlockingConn::connect(url, &hello, Duration::from_secs(30))?)
}

/// Registers the `n` keys from id `first` on into `region`, `len` bytes each, in batches of
/// [`BATCH`]; many keys per page (the server does not care, and what is measured is the
/// server's side).
pub(crate) fn register_keys(
    c: &mut BlockingConn,
    region: &maru_proto::Handle,
    first: u64,
    n: usize,
    len: u64,
) -> anyhow::Result<()> {
    let pages = (region.len / 4096).max(1);
    in_batches(first, n, |done, buf| {
        let m = buf.len() / KEY_LEN;
        let entries: Vec<RegisterEntry> = buf
            .chunks(KEY_LEN)
            .enumerate()
            .map(|(i, key)| RegisterEntry {
                key,
                region_id: region.region_id,
                offset: ((done + i) as u64 % pages) * 4096,
                len,
            })
            .collect();
        match c.call(&Request::BatchRegister(entries))? {
            Response::Bools(v) if v.iter().all(|&b| b) && v.len() == m => Ok(()),
            other => bail!("batch_register answered {other:?}"),
        }
    })
}

/// Calls `f(done, keys)` for the `n` keys from id `first` on, in batches of up to [`BATCH`]:
/// `done` keys came before the batch, whose keys are packed back to back in `keys`.
fn in_batches(
    first: u64,
    n: usize,
    mut f: impl FnMut(usize, &[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(BATCH * KEY_LEN);
    let mut done = 0usize;
    while done < n {
        let m = BATCH.min(n - done);
        buf.clear();
        for i in 0..m {
            buf.extend_from_slice(&key_of(first + (done + i) as u64));
        }
        f(done, &buf)?;
        done += m;
    }
    Ok(())
}
