//! Round-trip latency of the hot operations against an in-process server, next to a raw echo
//! over the same kind of socket, so the server's own cost shows as the difference. Ignored by
//! default (timing belongs in release builds):
//! `cargo test --release -p maru-server --test latency -- --ignored --nocapture`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use common::*;
use maru_proto::*;

fn p50(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6
}

/// p50 of a 64-byte echo over a Unix socket (the floor any server sits on).
fn echo_p50(dir: &std::path::Path, n: usize) -> f64 {
    let path = dir.join("echo.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut b = [0u8; 64];
        while s.read_exact(&mut b).is_ok() {
            if s.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut c = UnixStream::connect(&path).unwrap();
    let mut b = [7u8; 64];
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        c.write_all(&b).unwrap();
        c.read_exact(&mut b).unwrap();
        times.push(t0.elapsed());
    }
    drop(c);
    t.join().unwrap();
    p50(times)
}

#[test]
#[ignore = "timing; run in release with --nocapture"]
fn hot_path_latency_over_unix_socket() {
    const KEYS: u64 = 100_000;
    const N: usize = 20_000;
    let c = InProcessCluster::with(|_, _| {}, |dir, s| s.unix = Some(dir.join("s.sock")));
    let url = ServerUrl::Unix(c.dir.path().join("s.sock"));
    let mut w = Client::connect(&url, "writer");
    let region = w.region(64 * MIB - 2 * MIB).handle.region_id;
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(1000) {
        let keys: Vec<String> = chunk.iter().map(|i| format!("key-{i:08}")).collect();
        let entries = keys
            .iter()
            .zip(chunk)
            .map(|(k, i)| RegisterEntry {
                key: k.as_bytes(),
                region_id: region,
                offset: (i % 1000) * 4096,
                len: 4096,
            })
            .collect();
        w.call(&Request::BatchRegister(entries)).unwrap();
    }
    let mut r = Client::connect(&url, "reader");
    let mut measure = |name: &str, f: &mut dyn FnMut(&mut Client, u64)| {
        let mut times = Vec::with_capacity(N);
        for i in 0..N as u64 {
            let t0 = Instant::now();
            f(&mut r, i);
            times.push(t0.elapsed());
        }
        let v = p50(times);
        println!("{name:>24}: p50 {v:6.2} µs");
        v
    };
    let echo = echo_p50(c.dir.path(), N);
    println!("{:>24}: p50 {echo:6.2} µs", "raw UDS echo (64 B)");
    let exists = measure("exists", &mut |c, i| {
        let k = format!("key-{:08}", (i * 7919) % KEYS);
        assert!(c.bool(&Request::Exists { key: k.as_bytes() }));
    });
    measure("lookup", &mut |c, i| {
        let k = format!("key-{:08}", (i * 7919) % KEYS);
        assert!(c.lookup(k.as_bytes()).is_some());
    });
    measure("batch_exists(32)", &mut |c, i| {
        let keys: Vec<String> = (0..32)
            .map(|j| format!("key-{:08}", (i * 32 + j) % KEYS))
            .collect();
        let keys: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        c.call(&Request::BatchExists { keys }).unwrap();
    });
    println!("{:>24}: {:+.2} µs over the echo", "exists", exists - echo);
}
