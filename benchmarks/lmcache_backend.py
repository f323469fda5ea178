#!/usr/bin/env python3
"""LMCache's own Maru backend on Maru: put and get of one KV chunk against a raw memcpy.

One chunk is 256 tokens of a Llama-3-8B-shaped model (32 layers x 8 KV heads x 128 dims,
fp16, K and V): 32 MiB. The backend is LMCache 0.5.6's ``MaruBackend``, built by LMCache's
storage-backend factory (``CreateStorageBackends``) from an ``LMCacheEngineConfig`` with
``maru_path``, over ``maru_lmcache.CxlMemoryAdapter``. Rows, sampled round-robin so that
every row sees the same minutes of machine load:

- ``memcpy``: the chunk copied between two private tensors (the floor of any put or load),
  sampled next to every other row so each row also has a ratio to its neighbouring copy;
- ``put``: allocate + copy the chunk into the MemoryObj (what LMCache's GPU->CPU copy
  does) + ``submit_put_task`` until its future completes (the key is registered), and its
  parts ``put.allocate``, ``put.copy``, ``put.register``;
- ``MaruHandler.store``: the registration call the backend makes on its worker thread,
  called directly (what ``put.register`` costs without LMCache's event loop and threads);
- ``get``: ``get_blocking`` (a MemoryObj over the stored page, no bytes moved);
- ``get+copy``: ``get_blocking`` + copying the chunk out (what a load to the GPU does);
- ``get+copy (other instance)``: the same from a second backend with its own handler, which
  maps the writer's region read-only; the page was read by that instance before (the
  writer's freed page is the next one it allocates);
- ``get+copy (other instance, first read)``: a page that instance has never read: its
  mapping is not populated, so the copy takes a page fault per 4 KiB.

Needs torch and lmcache (``scripts/frameworks.sh vllm`` prints such a Python). Standalone it
starts ``maru up`` (``target/release/maru``) on a temporary pool under /dev/shm.

    PY=$(./scripts/frameworks.sh vllm | awk '{print $2}')
    $PY benchmarks/lmcache_backend.py                    # table on stdout
    $PY benchmarks/lmcache_backend.py --json out.json --iters 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.pin_monitor import PinMonitor
from lmcache.v1.storage_backend import CreateStorageBackends
from maru_up import maru_up

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
LAYERS, KV_HEADS, HEAD_DIM, TOKENS = 32, 8, 128, 256
MODEL = "llama-3-8b-shaped"
#: Pages of the writer's region (32 MiB each).
PAGES = 32
perf = time.perf_counter_ns


@contextmanager
def backend(url: str, pool_gib: float) -> Iterator[Any]:
    """LMCache's MaruBackend from its factory, with the event loop its puts run on."""
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=TOKENS, maru_path="maru://" + url.removeprefix("tcp://"), maru_pool_size=pool_gib,
        max_local_cpu_size=0, extra_config={"maru_timeout_ms": 10000},
    )
    metadata = LMCacheMetadata(
        model_name=MODEL, world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=torch.float16, kv_shape=(LAYERS, 2, TOKENS, KV_HEADS, HEAD_DIM), role="worker",
        chunk_size=TOKENS,
    )
    PinMonitor.GetOrCreate(config)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        b = CreateStorageBackends(config, metadata, loop, dst_device="cpu")["MaruBackend"]
        b.bench_shape = metadata.get_shapes()[0]
        try:
            yield b
        finally:
            b.close()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def timed_read(reader: Any, key: Any, dst: torch.Tensor) -> int:
    """Nanoseconds `reader` takes to get `key` and copy it into `dst`; the chunk is released
    after the clock stops."""
    t0 = perf()
    got = reader.get_blocking(key)
    assert got is not None
    dst.copy_(got.tensor)
    took = perf() - t0
    got.ref_count_down()
    return took


def run(url: str, iters: int, warmup: int) -> dict[str, Any]:
    # op -> [(ns, ns of the memcpy sampled next to it)]
    samples: dict[str, list[tuple[int, int]]] = {k: [] for k in (
        "memcpy", "put", "put.allocate", "put.copy", "put.register", "MaruHandler.store", "get", "get+copy",
        "get+copy (other instance)", "get+copy (other instance, first read)",
    )}
    with backend(url, PAGES * 32 / 1024) as writer, backend(url, 0.25) as reader:
        shape = writer.bench_shape
        src = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.float16)
        dst = torch.empty_like(src)
        dst.copy_(src)  # first touch of the private destination
        nbytes = src.numel() * src.element_size()
        for i in range(warmup + iters):
            keep = i >= warmup
            key = CacheEngineKey(MODEL, 1, 0, 10_000 + i, torch.float16)

            t0 = perf()
            dst.copy_(src)
            t1 = perf()
            memcpy = t1 - t0

            t0 = perf()
            obj = writer.allocate(shape, torch.float16)
            t1 = perf()
            assert obj is not None, "the pool is full"
            obj.tensor.copy_(src)
            t2 = perf()
            writer.submit_put_task(key, obj).result(30)
            t3 = perf()
            obj.ref_count_down()
            put = (t1 - t0, t2 - t1, t3 - t2)

            direct_key = CacheEngineKey(MODEL, 1, 0, 50_000 + i, torch.float16).to_string()
            direct = writer.allocate(shape, torch.float16)
            handle = writer.memory_allocator.create_store_handle(direct)
            t0 = perf()
            writer._handler.store(direct_key, handle)
            store = perf() - t0
            writer._handler.delete(direct_key)

            t0 = perf()
            got = writer.get_blocking(key)
            t1 = perf()
            assert got is not None
            got2 = writer.get_blocking(key)
            dst.copy_(got2.tensor)
            t2 = perf()
            get, get_copy = t1 - t0, t2 - t1
            assert torch.equal(dst, src)
            got.ref_count_down()
            got2.ref_count_down()

            other_ns = timed_read(reader, key, dst)
            assert writer.remove(key)
            if keep:
                for op, ns in (
                    ("memcpy", memcpy), ("put", sum(put)), ("put.allocate", put[0]), ("put.copy", put[1]),
                    ("put.register", put[2]), ("MaruHandler.store", store), ("get", get), ("get+copy", get_copy),
                    ("get+copy (other instance)", other_ns),
                ):
                    samples[op].append((ns, memcpy))
        # Pages the reader has never touched: store chunks on distinct pages, read each once.
        # The page of the loop above is the next to be allocated; hold it.
        read_before = writer.allocate(shape, torch.float16)
        stored = []
        for j in range(min(iters, PAGES - 2)):
            key = CacheEngineKey(MODEL, 1, 0, 90_000 + j, torch.float16)
            obj = writer.allocate(shape, torch.float16)
            assert obj is not None, "the pool is full"
            obj.tensor.copy_(src)
            writer.submit_put_task(key, obj).result(30)
            obj.ref_count_down()
            stored.append(key)
            t0 = perf()
            dst.copy_(src)
            t1 = perf()
            samples["get+copy (other instance, first read)"].append((timed_read(reader, key, dst), t1 - t0))
        for key in stored:
            writer.remove(key)
        read_before.ref_count_down()
    memcpy_p50 = statistics.median(ns for ns, _ in samples["memcpy"])
    rows = []
    for op, pairs in samples.items():
        s = sorted(ns for ns, _ in pairs)
        p50 = statistics.median(s)
        rows.append({
            "op": op, "chunk_bytes": nbytes, "samples": len(s),
            "p50_us": p50 / 1e3, "p90_us": s[min(len(s) - 1, int(len(s) * 0.9))] / 1e3,
            "gbps": nbytes / p50 if op not in ("get", "put.allocate", "put.register", "MaruHandler.store") else None,
            "x_memcpy": p50 / memcpy_p50,
            # Each sample over the memcpy taken next to it: steadier than p50 over p50 when
            # the machine's load drifts during the run.
            "x_memcpy_paired": statistics.median(ns / m for ns, m in pairs),
        })
    return {"rows": rows, "chunk_bytes": nbytes}


def table(report: dict[str, Any]) -> str:
    lines = [
        f"chunk: {TOKENS} tokens x {LAYERS} layers x {KV_HEADS} KV heads x {HEAD_DIM} dims, fp16, K+V "
        f"= {report['chunk_bytes'] / MIB:.0f} MiB; load {report['machine']['load_start']} -> "
        f"{report['machine']['load_end']} on {report['machine']['cpus']} CPUs",
        "",
        "| row | p50 | p90 | GB/s at p50 | × memcpy (p50 / p50) | × memcpy (paired) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        gbps = f"{r['gbps']:.1f}" if r["gbps"] is not None else ""
        lines.append(
            f"| {r['op']} | {r['p50_us']:,.0f} µs | {r['p90_us']:,.0f} µs | {gbps} | {r['x_memcpy']:.2f} "
            f"| {r['x_memcpy_paired']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", help="a running maru server (tcp://host:port); default: start maru up")
    ap.add_argument("--maru", default=os.environ.get("MARU_BIN", str(REPO / "target" / "release" / "maru")))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", help="write the report here (- for stdout)")
    a = ap.parse_args()
    load_start = os.getloadavg()
    if a.server:
        report = run(a.server, a.iters, a.warmup)
    else:
        # 2G: the writer's 1 GiB region + the reader's 256 MiB.
        with maru_up(a.maru, pool_size="2G", prefix="maru-bench-lmcache-") as (ready, _):
            report = run(ready["tcp"], a.iters, a.warmup)
    report["machine"] = {
        "cpus": os.cpu_count(),
        "load_start": " ".join(f"{x:.2f}" for x in load_start),
        "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    report["command"] = " ".join(sys.argv)
    if a.json == "-":
        print(json.dumps(report, indent=1))
        print(table(report), file=sys.stderr)
        return
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    print(table(report))


if __name__ == "__main__":
    main()
