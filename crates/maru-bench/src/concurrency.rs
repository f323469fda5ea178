//! Many clients at once: 1, 4 and 32 client threads sharing one handler (what a
//! multi-threaded inference server does), and as many client processes (one handler each).
//! Each client retrieves 4 KiB chunks; the rows give the aggregate ops/s and the p99 over all
//! clients' calls. Beside each process row, its floor: as many processes reading their own
//! memory on the same CPUs, which measures what sharing the CPUs costs without Maru. The most
//! processes run once more free to use every CPU, the daemons' too, as clients spread over a
//! host's cores do (reads from the key index do not need the server).

use std::sync::{Arc, Barrier};
use std::time::Instant;

use anyhow::bail;

use crate::context::Bench;
use crate::floor::Transport;
use crate::plan::KIB;
use crate::rows::{handler, prefill, refs};
use crate::stats::{round3, Row, Samples, Summary};
use crate::worker::{warm, LoopResult, Spec, Worker};

pub fn run(b: &mut Bench, t: Transport, url: &str) -> anyhow::Result<()> {
    let owner = handler(url, 4 * KIB, 8 << 20, true)?;
    let data = vec![7u8; 4096];
    let stored = prefill(&owner, 256, &data)?;
    for &n in &b.plan.clients.clone() {
        // Every client makes the same calls, enough that a process's own work (reads from the
        // index take well under a microsecond) outlasts its start-up.
        let iters = b.plan.conc_iters * 32;
        // Threads of one process, one shared handler.
        let shared = Arc::new(handler(url, 4 * KIB, 2 << 20, true)?);
        warm(&shared, refs(&stored))?;
        let barrier = Arc::new(Barrier::new(n as usize + 1));
        let keys = Arc::new(stored.clone());
        let threads: Vec<_> = (0..n as usize)
            .map(|c| {
                let (h, barrier, keys) = (shared.clone(), barrier.clone(), keys.clone());
                std::thread::spawn(move || -> anyhow::Result<(Instant, Instant, Vec<u64>)> {
                    let mut ns = Vec::with_capacity(iters);
                    barrier.wait();
                    let began = Instant::now();
                    for i in 0..iters {
                        let key = &keys[(c * 31 + i) % keys.len()];
                        let t0 = Instant::now();
                        if h.retrieve(key)?.is_none() {
                            bail!("retrieve of a stored key found nothing");
                        }
                        ns.push(t0.elapsed().as_nanos() as u64);
                    }
                    Ok((began, Instant::now(), ns))
                })
            })
            .collect();
        barrier.wait();
        // The wall time spans the clients' own first start to last end: this thread may be
        // scheduled out past the barrier while the clients already run (it was, once).
        let mut span: Option<(Instant, Instant)> = None;
        let mut s = Samples::with_capacity(iters * n as usize);
        for th in threads {
            match th.join() {
                Ok(r) => {
                    let (began, ended, ns) = r?;
                    s.extend(&ns);
                    span = Some(match span {
                        None => (began, ended),
                        Some((b0, e0)) => (b0.min(began), e0.max(ended)),
                    });
                }
                Err(_) => bail!("a client thread panicked"),
            }
        }
        if let Some((began, ended)) = span {
            s.set_wall(ended - began);
        }
        shared.close();
        let mut row = Row::new("retrieve", t.name(), 4 * KIB, 1, &s.summary());
        row.clients = n;
        b.push(t, row.note("threads sharing one handler"));

        // Processes, one handler each.
        let readers = Spec::Loop {
            url: url.to_owned(),
            keys: stored
                .iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect(),
            iters,
        };
        let mut row = Row::new(
            "retrieve",
            t.name(),
            4 * KIB,
            1,
            &processes(b, n, &readers)?,
        );
        row.clients = n;
        row.processes = true;
        b.push(t, row.note("one process per client"));
        // The same number of processes reading their own memory instead, on the same CPUs:
        // what sharing a CPU among that many processes costs by itself (switches, caches),
        // the floor of the row above's ratio to one process.
        let spec = Spec::Floor { iters };
        let mut row = Row::new("read_own", t.name(), 4 * KIB, 1, &processes(b, n, &spec)?);
        row.clients = n;
        row.processes = true;
        b.push(
            t,
            row.note("floor: processes reading 4 KiB of their own memory, no Maru"),
        );
        if Some(&n) == b.plan.clients.iter().max() {
            let s = crate::cpu::on_every_cpu(|| processes(b, n, &readers))?;
            let mut row = Row::new("retrieve", t.name(), 4 * KIB, 1, &s);
            row.clients = n;
            row.processes = true;
            b.push(t, row.note(EVERY_CPU));
            // The ratio to one process once more, from runs that alternate one process and
            // `n`: rows measured seconds apart can meet a host at different speeds (a VM's
            // core moves between clock steps about 1.5x apart), adjacent runs mostly at one.
            let (s, ratio) = alternating(b, n, &readers)?;
            let mut row = Row::new(ALTERNATING, t.name(), 4 * KIB, 1, &s);
            row.clients = n;
            row.processes = true;
            row.ratio = Some(round3(ratio));
            row.floor = format!("one process, runs alternating: median of {PAIRS} pairs");
            b.push(
                t,
                row.note("one process per client, keys/s against one process's"),
            );
        }
    }
    owner.batch_delete(&refs(&stored))?;
    owner.close();
    Ok(())
}

/// The note of the process row whose clients may use every CPU.
pub const EVERY_CPU: &str = "one process per client, on every CPU";

/// The op of the row whose ratio is the most processes' keys/s against one process's in
/// alternating runs ([`alternating`]).
pub const ALTERNATING: &str = "retrieve_alternating";

/// Runs of `n` processes in [`alternating`], each between two runs of one process.
pub const PAIRS: usize = 3;

/// One process, then `n`, one, `n`, ... ([`PAIRS`] runs of `n`, each between two of one):
/// the median over the runs of `n` of their keys/s against the mean of the two runs of one
/// around them, and the samples of the run of `n` that gave it.
fn alternating(b: &Bench, n: u32, spec: &Spec) -> anyhow::Result<(Summary, f64)> {
    let mut ones = vec![processes(b, 1, spec)?];
    let mut many = Vec::with_capacity(PAIRS);
    for _ in 0..PAIRS {
        many.push(processes(b, n, spec)?);
        ones.push(processes(b, 1, spec)?);
    }
    let mut ratios: Vec<(f64, usize)> = many
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let one = (ones[i].ops_per_s + ones[i + 1].ops_per_s) / 2.0;
            (m.ops_per_s / one.max(1.0), i)
        })
        .collect();
    ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, i) = ratios[PAIRS / 2];
    Ok((many.swap_remove(i), ratio))
}

/// Runs `n` worker processes of `spec` at once: their samples, over the span of their own
/// loops (first begin to last end).
fn processes(b: &Bench, n: u32, spec: &Spec) -> anyhow::Result<Summary> {
    let mut workers = (0..n)
        .map(|_| Worker::spawn(&b.launcher, spec))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for w in &mut workers {
        w.expect_ready()?;
    }
    for w in &mut workers {
        w.send("go")?;
    }
    for w in &mut workers {
        w.expect("done")?;
    }
    for w in &mut workers {
        w.send("report")?;
    }
    let mut s = Samples::with_capacity(spec.iters() * n as usize);
    let (mut began, mut ended) = (u64::MAX, 0);
    for w in &mut workers {
        let r: LoopResult = serde_json::from_str(&w.line()?)?;
        s.extend(&r.ns);
        began = began.min(r.began);
        ended = ended.max(r.ended);
    }
    s.set_wall(std::time::Duration::from_nanos(ended.saturating_sub(began)));
    for w in workers {
        w.finish()?;
    }
    Ok(s.summary())
}
