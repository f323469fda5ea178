//! Connect time (handshake and the eager mapping of live regions: a handler takes no region
//! until it allocates) and the first allocation after it (the owned region carved by the
//! resource manager, mapped and populated for writing) — with 100 MiB and 1 GiB pools, on
//! 4 KiB pages (tmpfs) and on 2 MiB pages (a hugetlbfs: the machine's, or one mounted for the
//! run when it runs as root).

use anyhow::Context;
use maru_client::{MaruConfig, MaruHandler};
use maru_shm::HugePageMount;

use crate::context::Bench;
use crate::daemons::{hugetlbfs_mount, Embedded};
use crate::floor::Transport;
use crate::plan::{GIB, MIB};
use crate::stats::{Row, Samples};

fn connect_rows(b: &mut Bench, t: Transport, url: &str, page_note: &str) -> anyhow::Result<()> {
    for &pool in &b.plan.connect_pools.clone() {
        let n = if pool >= GIB {
            b.plan.connect_samples.div_ceil(3).max(2)
        } else {
            b.plan.connect_samples
        };
        let mut s = Samples::with_capacity(n);
        let mut first = Samples::with_capacity(n);
        for _ in 0..n {
            let h = MaruHandler::new(MaruConfig {
                server_url: url.to_owned(),
                pool_size: pool,
                timeout_ms: 30_000,
                ..MaruConfig::default()
            })?;
            s.time(|| h.connect())
                .with_context(|| format!("connect with a {pool}-byte pool"))?;
            let page = first
                .time(|| h.alloc(4096))
                .with_context(|| format!("first alloc with a {pool}-byte pool"))?;
            let _ = h.free(page.page());
            h.close();
            // The previous handler's region is given back (and its pages dropped) after close
            // returns; let that finish so the next connect does not share the CPU with it.
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        for (op, samples) in [("connect", &s), ("first_alloc", &first)] {
            b.push(
                t,
                Row::new(op, t.name(), pool, 1, &samples.summary())
                    .note(format!("chunk_bytes is the pool size; {page_note}")),
            );
        }
    }
    Ok(())
}

pub fn run(b: &mut Bench, t: Transport, url: &str) -> anyhow::Result<()> {
    connect_rows(b, t, url, "4 KiB pages (tmpfs)")
}

/// The same rows on 2 MiB pages: a second embedded pair on a hugetlbfs — the machine's, or,
/// as root, a private one with pages reserved for this run (given back after it).
pub fn run_huge(b: &mut Bench, transports: &[Transport]) -> anyhow::Result<()> {
    let largest = b
        .plan
        .connect_pools
        .iter()
        .copied()
        .max()
        .unwrap_or(100 * MIB);
    let pool = largest + 64 * MIB;
    let private;
    let (mount, page_note) = match hugetlbfs_mount() {
        Some(m) => (m, "2 MiB pages (hugetlbfs)".to_owned()),
        None => match HugePageMount::reserve(&std::env::temp_dir(), pool) {
            Ok(m) => {
                private = m;
                // Untimed: a fresh reservation may be memory the VM never touched.
                private
                    .warm()
                    .context("touching the reserved 2 MiB pages")?;
                let note = format!(
                    "2 MiB pages (a private hugetlbfs, {} pages reserved and touched for the run)",
                    private.pages()
                );
                (private.path().to_owned(), note)
            }
            Err(why) => {
                for &t in transports {
                    for &p in &b.plan.connect_pools.clone() {
                        for op in ["connect", "first_alloc"] {
                            b.push(
                                t,
                                Row::skipped(
                                    op,
                                    t.name(),
                                    p,
                                    &format!("2 MiB pages: no hugetlbfs mount, and {why}"),
                                ),
                            );
                        }
                    }
                }
                return Ok(());
            }
        },
    };
    let e = Embedded::start(&mount, pool, "huge")
        .with_context(|| format!("embedded daemons on {}", mount.display()))?;
    for &t in transports {
        let url = match t {
            Transport::Tcp => e.tcp_url.clone(),
            Transport::Unix => e.unix_url.clone(),
        };
        connect_rows(b, t, &url, &page_note)?;
    }
    // The daemons go before the mount they use.
    drop(e);
    Ok(())
}
