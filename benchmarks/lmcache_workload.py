"""An LMCache-shaped load through the public ``maru`` package: many reader processes serving
requests while a writer process stores MiB-sized chunks from several threads.

Per request a reader does what LMCache's Maru backend does for a prompt whose prefix is
cached: ``batch_pin`` of the request's chunk keys (the lookup that pins; a prefix of them may
be missing), ``batch_retrieve`` of the pinned prefix, a copy of each chunk out of shared memory
(what the load to the GPU does), and ``batch_unpin``. A quarter of the requests end in keys
that were never stored (a partial prefix hit). Meanwhile the writer's threads store fresh
chunks of the same size and delete the ones they stored a while ago (the pool stays bounded).

Every chunk carries its key's number at its head and tail; a reader checks both after its
copy, so a wrong answer is counted, not assumed away.

``maru bench --only lmcache`` runs it against its own daemons and passes the run's floors
(a 64-byte round trip, memcpy out of shared memory): each request's floor is three round
trips plus the copy of its hit chunks at that bandwidth. The last line printed is a JSON
document.

    python benchmarks/lmcache_workload.py --server unix:///path/server.sock [--quick|--smoke]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import statistics
import struct
import sys
import threading
import time

from maru import MaruConfig, MaruHandler

MIB = 1024 * 1024
perf = time.perf_counter_ns
MARK = struct.Struct("<Q")
WORKING_SET = 64
# How long children may take to connect, and a run to end, before the run is called failed.
READY_TIMEOUT_S = 120.0


def chunk_bytes(n: int, size: int) -> bytearray:
    b = bytearray(size)
    MARK.pack_into(b, 0, n)
    MARK.pack_into(b, size - MARK.size, n)
    return b


def working_key(i: int) -> str:
    return f"lmcache@llama3-8b@tp1@0@shape-{i:08x}"


def missing_key(i: int) -> str:
    return f"lmcache@llama3-8b@tp1@0@never-{i:08x}"


def reader(server: str, size: int, per_request: int, seconds: float, seed: int, ready, go, out) -> None:  # type: ignore[no-untyped-def]
    try:
        h = MaruHandler(MaruConfig(server_url=server, chunk_size_bytes=size, pool_size=size))
        h.connect()
    except Exception as e:  # reported to the parent, which fails the run
        out.put({"error": f"reader could not connect: {e!r}"})
        ready.set()
        return
    rng = random.Random(seed)
    dst = memoryview(bytearray(size * per_request))
    latencies: list[int] = []
    wrong = hits = misses = 0
    ready.set()
    go.wait(READY_TIMEOUT_S)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = rng.randrange(WORKING_SET - per_request + 1)
        ids = list(range(start, start + per_request))
        keys = [working_key(i) for i in ids]
        if rng.random() < 0.25:
            half = per_request // 2
            keys[half:] = [missing_key(rng.randrange(1 << 30)) for _ in keys[half:]]
        t0 = perf()
        pinned = h.batch_pin(keys)
        hit = 0
        while hit < len(pinned) and pinned[hit]:
            hit += 1
        views = h.batch_retrieve(keys[:hit]) if hit else []
        for j, v in enumerate(views):
            if v is None:
                wrong += 1
                continue
            d = dst[j * size : (j + 1) * size]
            d[:] = v.view
            if MARK.unpack_from(d, 0)[0] != ids[j] or MARK.unpack_from(d, size - MARK.size)[0] != ids[j]:
                wrong += 1
        if hit:
            h.batch_unpin(keys[:hit])
        latencies.append(perf() - t0)
        hits += hit
        misses += per_request - hit
    h.close()
    out.put({"latencies": latencies, "wrong": wrong, "hits": hits, "misses": misses})


def writer(server: str, size: int, threads: int, seconds: float, ready, go, out) -> None:  # type: ignore[no-untyped-def]
    try:
        h = MaruHandler(MaruConfig(server_url=server, chunk_size_bytes=size, pool_size=64 * size))
        h.connect()
    except Exception as e:
        out.put({"error": f"writer could not connect: {e!r}"})
        ready.set()
        return
    stored = [0] * threads
    errors: list[str] = []

    def loop(t: int) -> None:
        data = chunk_bytes(0, size)
        ring: list[str] = []
        n = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            key = f"lmcache@llama3-8b@tp1@{t + 1}@w{n:08x}"
            MARK.pack_into(data, 0, n)
            try:
                h.store(key, data=memoryview(data))
            except Exception as e:
                errors.append(repr(e))
                return
            ring.append(key)
            if len(ring) > 8:
                h.delete(ring.pop(0))
            n += 1
            stored[t] += 1

    ready.set()
    go.wait(READY_TIMEOUT_S)
    ts = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    h.close()
    out.put({"stored": sum(stored), "errors": errors})


def run_once(ctx, args, processes: int, floor_us: float | None) -> dict[str, object]:  # type: ignore[no-untyped-def]
    out = ctx.Queue()
    go = ctx.Event()
    children = []
    readies = []
    for p in range(processes):
        ready = ctx.Event()
        readies.append(ready)
        children.append(
            ctx.Process(
                target=reader,
                args=(args.server, args.chunk, args.per_request, args.seconds, p, ready, go, out),
            )
        )
    ready = ctx.Event()
    readies.append(ready)
    children.append(ctx.Process(target=writer, args=(args.server, args.chunk, 2, args.seconds, ready, go, out)))
    for c in children:
        c.start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    for r in readies:
        if not r.wait(max(0.0, deadline - time.monotonic())):
            for c in children:
                c.kill()
            raise SystemExit(f"{processes} readers: a child did not connect within {READY_TIMEOUT_S} s")
    t0 = time.monotonic()
    go.set()
    results = [out.get(timeout=args.seconds + READY_TIMEOUT_S) for _ in children]
    wall = time.monotonic() - t0
    for c in children:
        c.join(READY_TIMEOUT_S)
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise SystemExit("; ".join(failed))
    lat = sorted(x for r in results for x in r.get("latencies", []))
    if not lat:
        raise SystemExit(f"{processes} readers served no request in {args.seconds} s")
    w = next(r for r in results if "stored" in r)
    if w["errors"]:
        raise SystemExit(f"writer failed: {w['errors'][0]}")
    p50 = lat[len(lat) // 2] / 1000
    p99 = lat[min(len(lat) - 1, len(lat) * 99 // 100)] / 1000
    row: dict[str, object] = {
        "processes": processes,
        "requests": len(lat),
        "requests_per_s": round(len(lat) / wall, 1),
        "p50_us": round(p50, 2),
        "p99_us": round(p99, 2),
        "chunks_hit": sum(int(r.get("hits", 0)) for r in results),
        "chunks_missed": sum(int(r.get("misses", 0)) for r in results),
        "wrong": sum(int(r.get("wrong", 0)) for r in results),
        "stores": w["stored"],
        "store_gbps": round(int(w["stored"]) * args.chunk / wall / 1e9, 3),
    }
    if floor_us:
        row["floor_us"] = round(floor_us, 2)
        row["p50_vs_floor"] = round(p50 / floor_us, 2)
        row["p99_vs_floor"] = round(p99 / floor_us, 2)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--chunk", type=int, default=MIB, help="chunk bytes (default 1 MiB)")
    ap.add_argument("--per-request", type=int, default=None, help="chunks per request")
    ap.add_argument("--processes", default=None, help="reader process counts, comma-separated")
    ap.add_argument("--rtt-us", type=float, default=None, help="this run's 64-byte round trip")
    ap.add_argument("--memcpy-gbps", type=float, default=None, help="this run's memcpy out of shm")
    args = ap.parse_args()
    if args.smoke:
        counts, args.seconds, default_n = [1, 2], 0.3, 4
    elif args.quick:
        counts, args.seconds, default_n = [1, 4, 16], 2.0, 16
    else:
        counts, args.seconds, default_n = [1, 4, 16, 32], 5.0, 16
    if args.processes:
        counts = [int(x) for x in args.processes.split(",")]
    args.per_request = args.per_request or default_n
    if not 2 <= args.per_request <= WORKING_SET:
        raise SystemExit(f"--per-request must be in 2..{WORKING_SET}")

    # The working set every reader draws its requests from.
    h = MaruHandler(MaruConfig(server_url=args.server, chunk_size_bytes=args.chunk, pool_size=WORKING_SET * args.chunk))
    h.connect()
    for i in range(WORKING_SET):
        h.store(working_key(i), data=memoryview(chunk_bytes(i, args.chunk)))

    # Three round trips (pin, retrieve, unpin) and the copy of the chunks a request hits,
    # on average 7/8 of them (a quarter of the requests hit only half).
    floor_us = None
    if args.rtt_us and args.memcpy_gbps:
        hit_bytes = args.per_request * args.chunk * 7 / 8
        floor_us = 3 * args.rtt_us + hit_bytes / (args.memcpy_gbps * 1e3)
    ctx = mp.get_context("spawn")
    rows = [run_once(ctx, args, p, floor_us) for p in counts]
    base = float(rows[0]["requests_per_s"])  # type: ignore[arg-type]
    for r in rows:
        r["throughput_vs_one"] = round(float(r["requests_per_s"]) / base, 2) if base else None  # type: ignore[arg-type]
    for i in range(WORKING_SET):
        h.delete(working_key(i))
    h.close()
    print(
        json.dumps(
            {
                "chunk_bytes": args.chunk,
                "chunks_per_request": args.per_request,
                "seconds_per_row": args.seconds,
                "writer_threads": 2,
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
