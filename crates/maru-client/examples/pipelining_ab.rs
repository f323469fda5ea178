//! Pipelining against a connection per call, side by side in one process over the Unix
//! socket of an in-process server: the p50 of a lone caller's round trip (pin, unpin), in
//! blocks that alternate between a handler with `use_async_rpc` and one without (a shared
//! machine's noise then hits both alike), and the calls/s of 4 and 32 threads sharing one
//! handler. `cargo run --release -p maru-client --example pipelining_ab [rounds]`

use std::sync::{Arc, Barrier};
use std::time::Instant;

use maru_client::{MaruConfig, MaruHandler, MIB};
use maru_testkit::InProcessCluster;

fn handler(url: &str, pipelined: bool) -> MaruHandler {
    let h = MaruHandler::new(MaruConfig {
        server_url: url.to_owned(),
        pool_size: 4 * MIB,
        chunk_size_bytes: 64 * 1024,
        use_async_rpc: pipelined,
        ..MaruConfig::default()
    })
    .unwrap();
    h.connect().unwrap();
    h
}

fn p50(v: &mut [u64]) -> f64 {
    v.sort_unstable();
    v[v.len() / 2] as f64 / 1000.0
}

/// Calls/s of `threads` threads, each making `calls` pin+unpin round trips on `h`.
fn throughput(h: &Arc<MaruHandler>, threads: usize, calls: usize) -> f64 {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (h, barrier) = (h.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..calls {
                    assert!(h.pin(b"k").unwrap());
                    assert!(h.unpin(b"k").unwrap());
                }
            })
        })
        .collect();
    barrier.wait();
    let t = Instant::now();
    for w in workers {
        w.join().unwrap();
    }
    (threads * calls * 2) as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(20, |a| a.parse().expect("rounds"));
    let c = InProcessCluster::with(|_, _| {}, |_, s| s.tcp = None);
    let url = c.url().to_string();
    let modes = [(true, "pipelined"), (false, "per-call")];
    let hs: Vec<Arc<MaruHandler>> = modes
        .iter()
        .map(|(p, _)| Arc::new(handler(&url, *p)))
        .collect();
    hs[0].store_bytes(b"k", b"", b"v").unwrap();
    let mut lat = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, h) in hs.iter().enumerate() {
            for _ in 0..1000 {
                let t = Instant::now();
                h.pin(b"k").unwrap();
                lat[i].push(t.elapsed().as_nanos() as u64);
                let t = Instant::now();
                h.unpin(b"k").unwrap();
                lat[i].push(t.elapsed().as_nanos() as u64);
            }
        }
    }
    let (a, b) = (p50(&mut lat[0]), p50(&mut lat[1]));
    println!(
        "lone caller p50: pipelined {a:.2} us, per-call {b:.2} us, ratio {:.3}",
        a / b
    );
    for threads in [4, 32] {
        let mut rates = [Vec::new(), Vec::new()];
        for _ in 0..3 {
            for (i, h) in hs.iter().enumerate() {
                rates[i].push(throughput(h, threads, 2000 / threads.min(8)));
            }
        }
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|r| format!("{:.0}", r))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "{threads} threads calls/s: pipelined {} | per-call {}",
            fmt(&rates[0]),
            fmt(&rates[1])
        );
    }
    for h in &hs {
        h.close();
    }
}
