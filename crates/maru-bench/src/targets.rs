//! The targets a run is judged by, each a measured value against a limit: single calls near
//! the floor, batches within a few round trips, stores near memcpy bandwidth, a lazy first
//! retrieve under a millisecond, the server's memory per key and registration rate, and
//! Redis beaten on metadata. Printed as MET or MISSED and kept in the report.

use serde::Serialize;

use crate::concurrency::{ALTERNATING, EVERY_CPU, PAIRS};
use crate::plan::{KIB, MIB};
use crate::registry::Registration;
use crate::report::FloorReport;
use crate::stats::{round3, Row};
use crate::table::{listing, opt, size, Out};

#[derive(Debug, Serialize)]
pub struct Target {
    pub target: String,
    pub api: String,
    pub transport: String,
    pub value: f64,
    pub limit: f64,
    pub met: bool,
    pub detail: String,
}

impl Target {
    /// A target met when `value <= limit`.
    fn at_most(target: String, api: &str, transport: &str, value: f64, limit: f64) -> Target {
        Target {
            target,
            api: api.into(),
            transport: transport.into(),
            value,
            limit,
            met: value <= limit,
            detail: String::new(),
        }
    }

    /// A target met when `value >= limit`.
    fn at_least(target: String, api: &str, transport: &str, value: f64, limit: f64) -> Target {
        Target {
            met: value >= limit,
            ..Target::at_most(target, api, transport, value, limit)
        }
    }

    fn detail(mut self, detail: String) -> Target {
        self.detail = detail;
        self
    }
}

/// Judges the rows of a run (`rows`, and `redis` as compared with Maru's) against the targets.
pub fn check(
    rows: &[Row],
    redis: &[Row],
    floor: &FloorReport,
    reg: Option<&Registration>,
) -> Vec<Target> {
    let mut out = Vec::new();
    // The targets are for the Python API; without Python rows, the Rust rows stand in.
    let api = if rows.iter().any(|r| r.api == "python") {
        "python"
    } else {
        "rust"
    };
    // Rows with a note are variants (e.g. `store` with write-behind); the targets are judged
    // on the plain rows, and on the write-behind store separately below.
    let find_note =
        |op: &str, chunk: u64, batch: u32, transport: &str, contended: bool, note: Option<&str>| {
            rows.iter().find(|r| {
                r.api == api
                    && r.note.as_deref() == note
                    && r.op == op
                    && r.chunk_bytes == chunk
                    && r.batch == batch
                    && r.transport == transport
                    && r.contended == contended
                    && r.clients == 1
                    && !r.processes
                    && !r.is_skipped()
            })
        };
    let find = |op: &str, chunk: u64, batch: u32, transport: &str, contended: bool| {
        find_note(op, chunk, batch, transport, contended, None)
    };
    for transport in ["tcp", "unix"] {
        let raw = if transport == "tcp" {
            floor.tcp_rtt_us
        } else {
            floor.uds_rtt_us
        };
        for (op, limit) in [("retrieve", 1.25), ("exists", 1.25), ("store", 1.5)] {
            if let Some(r) = find(op, 4 * KIB, 1, transport, false) {
                if let Some(ratio) = r.ratio {
                    let target = format!("{op} 4K p50 <= {limit}x floor");
                    out.push(
                        Target::at_most(target, api, transport, ratio, limit).detail(format!(
                            "p50 {:.2} us vs floor {}",
                            r.p50_us,
                            opt(r.floor_us, 2)
                        )),
                    );
                }
            }
            if let Some(r) = find(op, 4 * KIB, 1, transport, true) {
                if let Some(f) = r.floor_us {
                    let target = format!("{op} 4K contended p99 <= 3x floor");
                    let v = round3(r.p99_us / f);
                    out.push(
                        Target::at_most(target, api, transport, v, 3.0)
                            .detail(format!("p99 {:.2} us vs floor {f:.2}", r.p99_us)),
                    );
                }
            }
        }
        for op in ["batch_exists", "batch_retrieve"] {
            if let Some(r) = find(op, 4 * KIB, 256, transport, false) {
                let target = format!("{op}(256) p50 <= 4x one 64 B round trip");
                let v = round3(r.p50_us / raw);
                out.push(
                    Target::at_most(target, api, transport, v, 4.0)
                        .detail(format!("p50 {:.2} us vs rtt {raw:.2}", r.p50_us)),
                );
            }
        }
        for (chunk, note) in [
            (MIB, None),
            (4 * MIB, None),
            (MIB, Some("write_behind")),
            (4 * MIB, Some("write_behind")),
        ] {
            if let Some(r) = find_note("store", chunk, 1, transport, false, note) {
                if let (Some(g), Some(f)) = (r.gbps, r.floor_gbps) {
                    let how = note.map(|n| format!(" ({n})")).unwrap_or_default();
                    let target = format!("store {}{how} >= 85% of memcpy bandwidth", size(chunk));
                    out.push(
                        Target::at_least(target, api, transport, round3(g / f), 0.85)
                            .detail(format!("{g:.2} GB/s vs memcpy {f:.2}")),
                    );
                }
            }
        }
        many_processes(&mut out, rows, transport);
        if let Some(r) = rows
            .iter()
            .find(|r| r.op == "first_retrieve_1gib" && r.transport == transport && !r.is_skipped())
        {
            let target = "first retrieve from an unmapped 1 GiB region <= 1 ms".to_owned();
            out.push(
                Target::at_most(target, &r.api, transport, r.p50_us / 1e3, 1.0)
                    .detail(format!("p50 {:.1} us, p99 {:.1} us", r.p50_us, r.p99_us)),
            );
        }
    }
    if let Some(reg) = reg {
        if let Some(bpk) = reg.bytes_per_key {
            // The target is the server's overhead beyond the key's own bytes; the measurement
            // includes them, so they are taken off here.
            let overhead = bpk - reg.key_bytes as f64;
            let target = "server overhead per key (beyond the key bytes) <= 100".to_owned();
            out.push(
                Target::at_most(target, "server", "-", round3(overhead), 100.0).detail(format!(
                    "{} keys of {} bytes: {:.1} bytes per key in all",
                    reg.keys, reg.key_bytes, bpk
                )),
            );
        }
        let target = "batched registration >= 1M keys/s".to_owned();
        out.push(
            Target::at_least(target, "server", "-", reg.register_keys_per_s, 1e6)
                .detail(format!("batches of {}", reg.batch)),
        );
    }
    for r in redis.iter().filter(|r| r.chunk_bytes == 64) {
        if let Some(ratio) = r.ratio {
            let target = format!("faster than Redis {} x{} (metadata)", r.op, r.batch);
            out.push(Target {
                // Strictly faster: a tie is not a win.
                met: ratio < 1.0,
                ..Target::at_most(target, "rust", &r.transport, ratio, 1.0)
                    .detail(format!("redis {:.2} us vs {}", r.p50_us, r.floor))
            });
        }
    }
    out
}

/// The most client processes a run has, each its own handler: their keys/s together against
/// one process's (in runs alternating with one process, where the run has them), and that
/// ratio against the floor's (as many processes reading their own memory on the same CPUs,
/// without Maru); then the same processes free to use every CPU against one process's.
fn many_processes(out: &mut Vec<Target>, rows: &[Row], transport: &str) {
    let find = |op: &str, n: u32, every_cpu: bool| {
        rows.iter().find(|r| {
            r.op == op
                && r.processes
                && r.clients == n
                && r.transport == transport
                && (r.note.as_deref() == Some(EVERY_CPU)) == every_cpu
                && !r.is_skipped()
        })
    };
    let of = |op: &str, n: u32| find(op, n, false);
    let Some(n) = rows
        .iter()
        .filter(|r| r.op == "retrieve" && r.processes && r.transport == transport)
        .map(|r| r.clients)
        .max()
        .filter(|&n| n > 1)
    else {
        return;
    };
    let (Some(one), Some(many)) = (of("retrieve", 1), of("retrieve", n)) else {
        return;
    };
    let judge = |out: &mut Vec<Target>, placed: &str, ratio: f64, detail: String| {
        let target = format!("{n} client processes{placed}: keys/s >= 1.0x one process's");
        out.push(Target::at_least(target, "rust", transport, ratio, 1.0).detail(detail));
        ratio
    };
    let apart = |many: &Row| format!("{:.0} vs {:.0} keys/s", many.ops_per_s, one.ops_per_s);
    let against_one = |out: &mut Vec<Target>, placed: &str, many: &Row| {
        let ratio = round3(many.ops_per_s / one.ops_per_s.max(1.0));
        judge(out, placed, ratio, apart(many))
    };
    // Runs alternating with one process, when there are: their ratio saw the host at one
    // speed (rows measured seconds apart may not have).
    let alternating = rows.iter().find(|r| {
        r.op == ALTERNATING && r.clients == n && r.transport == transport && !r.is_skipped()
    });
    let ratio = match alternating.and_then(|r| r.ratio) {
        Some(ratio) => judge(
            out,
            "",
            ratio,
            format!(
                "runs alternating with one process, median of {PAIRS} pairs; measured apart: {}",
                apart(many)
            ),
        ),
        None => against_one(out, "", many),
    };
    if let (Some(f1), Some(fm)) = (of("read_own", 1), of("read_own", n)) {
        let floor = round3(fm.ops_per_s / f1.ops_per_s.max(1.0));
        let target = format!("{n} client processes: keys/s ratio >= the floor's");
        out.push(
            Target::at_least(target, "rust", transport, ratio, floor).detail(format!(
                "{n} processes reading their own memory: {floor:.3}x one"
            )),
        );
    }
    if let Some(spread) = find("retrieve", n, true) {
        against_one(out, " on every CPU", spread);
    }
}

/// Prints the targets' table.
pub fn print(out: &mut Out, targets: &[Target]) {
    listing(out, "Targets", targets, |t| {
        format!(
            "{} {:<58} {:<6} {:<5} {:>10.3} (limit {:>8.3})  {}",
            if t.met { "MET   " } else { "MISSED" },
            t.target,
            t.api,
            t.transport,
            t.value,
            t.limit,
            t.detail
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Summary;

    fn floor() -> FloorReport {
        FloorReport {
            tcp_rtt_us: 20.0,
            uds_rtt_us: 10.0,
            memcpy_gbps: 10.0,
            memcpy_out_gbps: 10.0,
            rtt: Vec::new(),
            memcpy: Vec::new(),
            map: Vec::new(),
        }
    }

    fn row(op: &str, transport: &str, batch: u32, p50_us: f64) -> Row {
        let s = Summary {
            p50_us,
            p99_us: p50_us * 2.0,
            ops_per_s: 1e6 / p50_us,
            n: 100,
        };
        Row::new(op, transport, 4 * KIB, batch, &s)
    }

    #[test]
    fn limits_are_judged_in_their_direction() {
        let mut exists = row("exists", "unix", 1, 12.0);
        exists.ratio = Some(1.2);
        let mut retrieve = row("retrieve", "unix", 1, 14.0);
        retrieve.ratio = Some(1.4);
        let batch = row("batch_exists", "tcp", 256, 100.0);
        let mut redis_get = row("GET", "unix", 1, 20.0);
        redis_get.chunk_bytes = 64;
        redis_get.ratio = Some(1.0);
        let t = check(&[exists, retrieve, batch], &[redis_get], &floor(), None);
        let by = |name: &str| {
            t.iter()
                .find(|t| t.target.starts_with(name))
                .unwrap_or_else(|| panic!("no target {name}"))
        };
        assert!(by("exists 4K p50").met);
        assert!(!by("retrieve 4K p50").met);
        assert_eq!(by("batch_exists(256)").value, 5.0);
        assert!(!by("batch_exists(256)").met);
        assert!(!by("faster than Redis GET").met, "a tie is not a win");
    }

    #[test]
    fn many_processes_are_judged_against_one_and_against_the_floor() {
        let procs = |op: &str, n: u32, p50_us: f64| {
            let mut r = row(op, "unix", 1, p50_us);
            r.clients = n;
            r.processes = true;
            r
        };
        // 32 processes: 0.9x one process's keys/s; reading their own memory, 0.8x.
        let rows = [
            procs("retrieve", 1, 1.0),
            procs("retrieve", 32, 1.0 / 0.9),
            procs("read_own", 1, 0.5),
            procs("read_own", 32, 0.5 / 0.8),
        ];
        let t = check(&rows, &[], &floor(), None);
        let by = |name: &str| t.iter().find(|t| t.target.contains(name)).unwrap();
        let one = by("1.0x one process");
        assert_eq!((one.value, one.met), (0.9, false));
        let against = by("the floor's");
        assert_eq!(
            (against.value, against.limit, against.met),
            (0.9, 0.8, true)
        );
        // Without the floor's rows, no floor target; without a row on every CPU, no target
        // for it.
        let t = check(&rows[..2], &[], &floor(), None);
        assert!(!t.iter().any(|t| t.target.contains("the floor's")));
        assert!(!t.iter().any(|t| t.target.contains("every CPU")));
        // The same processes on every CPU, 1.7x one: judged on their own, and never taken for
        // the row on the client's CPUs.
        let mut spread = procs("retrieve", 32, 1.0 / 1.7);
        spread.note = Some(EVERY_CPU.into());
        let t = check(
            &[spread, rows[0].clone(), rows[1].clone()],
            &[],
            &floor(),
            None,
        );
        let by = |name: &str| t.iter().find(|t| t.target.contains(name)).unwrap();
        assert_eq!(by("on every CPU").value, 1.7);
        assert_eq!(by("processes: keys/s >= 1.0x").value, 0.9);
        // Runs alternating with one process, 0.95x: their ratio is the one judged, against one
        // process and against the floor.
        let mut alt = procs(ALTERNATING, 32, 1.0);
        alt.ratio = Some(0.95);
        let mut with_alt = rows.to_vec();
        with_alt.push(alt);
        let t = check(&with_alt, &[], &floor(), None);
        let by = |name: &str| t.iter().find(|t| t.target.contains(name)).unwrap();
        let one = by("1.0x one process");
        assert_eq!((one.value, one.met), (0.95, false));
        assert!(one.detail.contains("alternating"), "{}", one.detail);
        assert_eq!(by("the floor's").value, 0.95);
        assert_eq!(
            t.iter().filter(|t| t.target.contains("1.0x one")).count(),
            1
        );
    }
}
