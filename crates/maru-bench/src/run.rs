//! One benchmark run, section by section: floors first, then the Rust rows, the Python rows,
//! across processes, concurrency, connect, Redis and the registry; then the comparison with
//! Redis, the targets and the report.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context};
use maru_proto::RegionInfo;

use crate::args::{BenchArgs, DaemonsArg, Section, TransportArg};
use crate::context::Bench;
use crate::daemons::{self, Embedded, Scratch};
use crate::floor::{Floors, Transport};
use crate::plan::{keys, Plan, GIB, KIB, MIB};
use crate::report::{loadavg, FloorReport, Machine, Report};
use crate::stats::round3;
use crate::table::{opt, Out};
use crate::worker::Launcher;
use crate::{
    concurrency, connect, cpu, cross, eviction, python, redis, registry, rows, targets, wire,
};

/// Runs the benchmark `args` describe (or, with `--worker`, one worker of another run).
///
/// `subcommand` is what selects the benchmark on this executable's command line (`["bench"]`
/// under `maru`, nothing under `maru-bench`): worker processes are this executable again.
pub fn run(args: BenchArgs, subcommand: &[&str]) -> anyhow::Result<()> {
    if let Some(spec) = &args.worker {
        return crate::worker::run(spec);
    }
    let launcher = Launcher::this_executable(subcommand)?;
    let started = Instant::now();
    let load_start = loadavg();
    daemons::install_interrupt_cleanup()?;
    let mode = if args.smoke {
        "smoke"
    } else if args.quick {
        "quick"
    } else {
        "full"
    };
    let mut plan = Plan::new(mode);
    if !args.sizes.is_empty() {
        plan.sizes = args.sizes.clone();
    }
    let on = |s: Section| args.only.is_empty() || args.only.contains(&s);
    let out: Out = if args.json.as_deref() == Some("-") {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    let spinners = (!args.let_cpus_idle).then(cpu::Spinners::start);
    let placement = cpu::place(args.placement);
    let scratch = Scratch::new(&args.pool_dir, "scratch")?;
    let floors = Floors::new(&scratch.path, plan.floor_iters, plan.map_samples);
    let mut notes = Vec::new();

    // The daemons: embedded unless a server was named.
    // Floors and the eviction simulation need no daemons.
    let floors_only = !args.only.is_empty()
        && args
            .only
            .iter()
            .all(|s| matches!(s, Section::Floor | Section::Eviction | Section::Index));
    let embedded = if args.server.is_empty() && !floors_only {
        // Room for the largest connect pool, the 1 GiB cross-process region and the rows'
        // own regions at once; sparse, so only what is populated takes memory.
        Some(cpu::on_server_side(|| match args.daemons {
            DaemonsArg::InProcess => Embedded::start(&args.pool_dir, 4 * GIB, "pool"),
            DaemonsArg::Process => {
                Embedded::start_process(&launcher, &args.pool_dir, 4 * GIB, "pool")
            }
        })?)
    } else {
        None
    };
    let mut urls: Vec<String> = match &embedded {
        Some(e) => vec![e.tcp_url.clone(), e.unix_url.clone()],
        None => args.server.clone(),
    };
    urls.retain(|u| match args.transport {
        TransportArg::Tcp => Transport::of_url(u) == Transport::Tcp,
        TransportArg::Unix => Transport::of_url(u) == Transport::Unix,
        TransportArg::Both => true,
    });
    let transports: Vec<Transport> = urls.iter().map(|u| Transport::of_url(u)).collect();

    let region = match urls.first() {
        Some(u) => probe_region(u).unwrap_or_else(|e| {
            notes.push(format!(
                "region probe failed ({e:#}); lookup sizes are estimated"
            ));
            wire::synthetic_region("/dev/shm/maru/maru-5555.pool")
        }),
        None => wire::synthetic_region("/dev/shm/maru/maru-5555.pool"),
    };
    let mut b = Bench {
        plan,
        floors,
        region,
        rows: Vec::new(),
        redis: Vec::new(),
        out,
        api: None,
        launcher,
    };
    let _ = writeln!(
        b.out,
        "maru bench ({mode}): {} CPUs{}, {placement}, load {load_start:.2}; servers: {}",
        cpu::cpu_count(),
        if args.let_cpus_idle {
            ""
        } else {
            " kept out of halt by SCHED_IDLE spinners"
        },
        if urls.is_empty() {
            "none".into()
        } else {
            urls.join(", ")
        }
    );

    // Headline floors first (64-byte ping-pong, 4 MiB memcpy), so even a floor-only run has
    // them.
    let tcp_rtt = b.floors.rtt(Transport::Tcp, 64, 64, "headline")?.p50_us;
    let uds_rtt = b.floors.rtt(Transport::Unix, 64, 64, "headline")?.p50_us;
    let memcpy_in = b.floors.copy("into", 4 * MIB, b.plan.region)?.gbps;
    let memcpy_out = b.floors.copy("out", 4 * MIB, b.plan.region)?.gbps;
    let _ = writeln!(
        b.out,
        "floors: tcp rtt {tcp_rtt:.2} us, uds rtt {uds_rtt:.2} us (64 B ping-pong p50); \
         memcpy 4 MiB into shm {memcpy_in:.2} GB/s, out {memcpy_out:.2} GB/s"
    );

    let per_transport = urls.iter().zip(transports.iter().copied());
    if on(Section::Rust) {
        for (u, t) in per_transport.clone() {
            b.section(&format!("Rust client, one client, {}", t.name()));
            rows::run(&mut b, t, u).with_context(|| format!("rust rows over {u}"))?;
        }
    }
    let located = if args.no_python {
        Err("--no-python".to_owned())
    } else {
        python::locate(args.python.as_deref())
    };
    if on(Section::Python) && !urls.is_empty() {
        b.section("Python package, one client (* = another Python thread burning CPU)");
        match &located {
            Ok((py, script)) => {
                if let Err(e) = python::run(&mut b, py, script, &urls, mode) {
                    note(&mut b, &mut notes, format!("python rows failed: {e:#}"));
                }
            }
            Err(why) => note(&mut b, &mut notes, format!("python rows skipped: {why}")),
        }
    }
    if on(Section::Cross) {
        for (u, t) in per_transport.clone() {
            b.section(&format!("Across processes, {}", t.name()));
            cross::run(&mut b, t, u).with_context(|| format!("cross-process rows over {u}"))?;
        }
    }
    if on(Section::Concurrency) {
        // The clients stay on the client side and the daemons on theirs, as in every row: a
        // deployment gives the server a core of its own (docs/PERFORMANCE.md has the rows with
        // clients on every CPU too).
        for (u, t) in per_transport.clone() {
            b.section(&format!("Concurrency (retrieve 4 KiB), {}", t.name()));
            concurrency::run(&mut b, t, u).with_context(|| format!("concurrency over {u}"))?;
        }
    }
    if on(Section::Connect) {
        for (u, t) in per_transport.clone() {
            b.section(&format!("Connect, {}", t.name()));
            connect::run(&mut b, t, u).with_context(|| format!("connect over {u}"))?;
        }
        if !transports.is_empty() {
            b.section("Connect on 2 MiB pages");
            if let Err(e) = connect::run_huge(&mut b, &transports) {
                notes.push(format!("2 MiB-page connect rows failed: {e:#}"));
            }
        }
    }
    if on(Section::Redis) && !transports.is_empty() {
        if args.no_redis {
            notes.push("redis skipped: --no-redis".into());
        } else if !redis::available() {
            let msg = "redis skipped: redis-server is not on PATH (Debian: apt-get install \
                       redis-server)";
            let _ = writeln!(b.out, "\n{msg}");
            notes.push(msg.into());
        } else {
            b.section("Redis side by side (same client style, persistence off)");
            let r = cpu::on_server_side(|| redis::Redis::start(&scratch.path))?;
            redis::run(&mut b, &r, &transports, &urls)?;
            drop(r);
        }
    }
    let mut registration = None;
    if on(Section::Registry) && !urls.is_empty() {
        let _ = writeln!(b.out, "\n== Server memory per key and batched registration");
        let n = b.plan.registry_keys;
        let reg = registry::run(&urls[0], n, embedded.as_ref().map(|e| e.pid))
            .context("registration benchmark")?;
        let _ = writeln!(
            b.out,
            "{} keys of {} bytes: {} bytes/key, {:.0} keys/s registered (batches of {}), {:.0} keys/s deleted",
            reg.keys,
            reg.key_bytes,
            opt(reg.bytes_per_key, 1),
            reg.register_keys_per_s,
            reg.batch,
            reg.delete_keys_per_s
        );
        registration = Some(reg);
    }
    let mut lmcache_report = None;
    if on(Section::Lmcache) && !urls.is_empty() {
        b.section("LMCache-shaped load (readers pin, retrieve, copy out, unpin; a writer stores)");
        let url = urls
            .iter()
            .find(|u| Transport::of_url(u) == Transport::Unix)
            .unwrap_or(&urls[0]);
        let t = Transport::of_url(url);
        let rtt = if t == Transport::Unix {
            uds_rtt
        } else {
            tcp_rtt
        };
        match &located {
            Ok((py, script)) => {
                match crate::lmcache::run(py, script, url, mode, rtt, memcpy_out, &mut b.out) {
                    Ok(mut v) => {
                        v["transport"] = t.name().into();
                        lmcache_report = Some(v);
                    }
                    Err(e) => note(
                        &mut b,
                        &mut notes,
                        format!("LMCache-shaped load failed: {e:#}"),
                    ),
                }
            }
            Err(why) => note(
                &mut b,
                &mut notes,
                format!("LMCache-shaped load skipped: {why}"),
            ),
        }
    }
    drop(embedded);
    let mut index_report = None;
    if on(Section::Index) {
        let _ = writeln!(
            b.out,
            "\n== Key index in shared memory: reads without a round trip, restart"
        );
        let r = crate::index::run(
            &args.pool_dir,
            b.plan.registry_keys,
            located
                .as_ref()
                .ok()
                .map(|(p, s)| (p.as_path(), s.as_path())),
            mode != "full",
            memcpy_out,
            &mut b.out,
        )
        .context("key index benchmark")?;
        index_report = Some(r);
    }
    let mut eviction_report = None;
    if on(Section::Eviction) {
        let _ = writeln!(
            b.out,
            "\n== Eviction policies against exact LRU, same traces"
        );
        eviction_report = Some(eviction::run(mode, &args.pool_dir, &mut b.out));
    }

    let redis_rows = redis::compare(&b.rows, std::mem::take(&mut b.redis));
    redis::print_comparison(&mut b.out, &redis_rows);
    let floor = FloorReport {
        tcp_rtt_us: tcp_rtt,
        uds_rtt_us: uds_rtt,
        memcpy_gbps: memcpy_in,
        memcpy_out_gbps: memcpy_out,
        rtt: b.floors.all_rtt(),
        memcpy: b.floors.all_copies(),
        map: b.floors.all_maps(),
    };
    let mut targets = targets::check(&b.rows, &redis_rows, &floor, registration.as_ref());
    if let Some(e) = &eviction_report {
        targets.extend(eviction::targets(e));
    }
    targets::print(&mut b.out, &targets);
    for n in &notes {
        let _ = writeln!(b.out, "note: {n}");
    }
    let report = Report {
        version: env!("CARGO_PKG_VERSION"),
        mode,
        machine: Machine::now(load_start, placement, !args.let_cpus_idle),
        floor,
        results: std::mem::take(&mut b.rows),
        bytes_per_key: registration.as_ref().and_then(|r| r.bytes_per_key),
        register_keys_per_s: registration.as_ref().map(|r| r.register_keys_per_s),
        registration,
        eviction: eviction_report,
        index: index_report,
        lmcache: lmcache_report,
        redis: redis_rows,
        notes,
        targets,
        elapsed_s: round3(started.elapsed().as_secs_f64()),
    };
    let _ = writeln!(
        b.out,
        "\nmaru bench: done in {:.1} s (load {:.2} -> {:.2})",
        report.elapsed_s, report.machine.load_start, report.machine.load_end
    );
    if let Some(path) = args.json.as_deref() {
        report.write(path)?;
    }
    drop(scratch);
    drop(spinners);
    Ok(())
}

/// Prints `msg` where the tables go and keeps it for the report's notes.
fn note(b: &mut Bench, notes: &mut Vec<String>, msg: String) {
    let _ = writeln!(b.out, "{msg}");
    notes.push(msg);
}

/// Reads the description of the region a freshly stored key lives in, as the server sends it
/// in lookups (its pool path and owner string set the size of every lookup reply).
fn probe_region(url: &str) -> anyhow::Result<RegionInfo> {
    let h = rows::handler(url, 4 * KIB, 2 * MIB, false)?;
    let k = keys(1).remove(0);
    h.store_bytes(&k, &[], &[1u8; 64])?;
    let parsed: maru_proto::ServerUrl = url.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut c =
        maru_transport::BlockingConn::connect_admin(&parsed, std::time::Duration::from_secs(10))?;
    let r = match c.call(&maru_proto::Request::Lookup { key: &k })? {
        maru_proto::Response::Lookup(Some(loc)) => loc.region,
        other => bail!("lookup answered {other:?}"),
    };
    let _ = c.call(&maru_proto::Request::Goodbye);
    h.delete(&k)?;
    h.close();
    Ok(r)
}
