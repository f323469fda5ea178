"""Reads without a round trip from the metadata server's key index, through the public
``maru`` package: ``exists``, ``batch_exists(512)`` and ``batch_retrieve_into`` of 4 KiB
chunks, the last against a plain copy of the same bytes in this process (one contiguous
``memoryview`` copy: the memcpy floor), and ``batch_retrieve_into`` of 1 MiB chunks from pages
and into buffers far larger than the cache (where copies of 64 KiB and more stream). ``maru bench --only index`` runs it against its own
index-enabled daemons; the last line printed is a JSON document.

    python benchmarks/index_bench.py --server unix:///path/server.sock [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from maru import MaruConfig, MaruHandler

KIB = 1024
MIB = 1024 * KIB
CHUNK = 4 * KIB
perf = time.perf_counter_ns


def p50_us(samples: list[int]) -> float:
    return round(statistics.median(samples) / 1000, 3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    iters = 2000 if args.quick else 20000
    batch_iters = 200 if args.quick else 2000

    h = MaruHandler(MaruConfig(server_url=args.server, chunk_size_bytes=CHUNK, pool_size=8 * 1024 * KIB))
    h.connect()
    if not h.reads_index():
        raise SystemExit("the handler does not read the server's key index")
    keys = [f"index-bench-{i}" for i in range(512)]
    data = bytes(range(256)) * (CHUNK // 256)
    h.batch_store(keys, [memoryview(data)] * len(keys))
    missing = [f"index-bench-missing-{i}" for i in range(512)]

    out: dict[str, object] = {"chunk_bytes": CHUNK}

    def time_each(n: int, fn) -> list[int]:  # type: ignore[no-untyped-def]
        for i in range(min(n, 100)):
            fn(i)
        samples = []
        for i in range(n):
            t0 = perf()
            fn(i)
            samples.append(perf() - t0)
        return samples

    out["exists_p50_us"] = p50_us(time_each(iters, lambda i: h.exists(keys[i % 512])))
    out["exists_miss_p50_us"] = p50_us(time_each(iters, lambda i: h.exists(missing[i % 512])))
    out["batch_exists_512_p50_us"] = p50_us(time_each(batch_iters, lambda _: h.batch_exists(keys)))
    assert all(h.batch_exists(keys)) and not any(h.batch_exists(missing))

    for b in (32, 512):
        ks = keys[:b]
        bufs = [bytearray(CHUNK) for _ in ks]
        got = h.batch_retrieve_into(ks, bufs)
        assert got == [CHUNK] * b and all(bytes(x) == data for x in bufs)
        src = memoryview(bytearray(data * b))
        dst = memoryview(bytearray(CHUNK * b))

        def copy(_: int) -> None:
            dst[:] = src

        into = time_each(batch_iters, lambda _: h.batch_retrieve_into(ks, bufs))
        plain = time_each(batch_iters, copy)
        moved = CHUNK * b
        gbps = moved / statistics.median(into)
        floor = moved / statistics.median(plain)
        out[f"batch_retrieve_into_{b}_p50_us"] = p50_us(into)
        out[f"batch_retrieve_into_{b}_gbps"] = round(gbps, 2)
        out[f"memcpy_{b}_gbps"] = round(floor, 2)
        out[f"batch_retrieve_into_{b}_vs_memcpy"] = round(gbps / floor, 3)

    # Calls of 4 chunks of 1 MiB, taken in turn from 64 MiB of pages into 256 MiB of buffers:
    # neither the pages nor the destinations are in the cache, as with a load into a host pool
    # much larger than it. (Short calls: a median of calls that a busy host's scheduler rarely
    # interrupts.)
    big = MaruHandler(MaruConfig(server_url=args.server, chunk_size_bytes=MIB, pool_size=64 * MIB))
    big.connect()
    big_keys = [f"index-bench-big-{i}" for i in range(64)]
    big_data = bytes(range(256)) * (MIB // 256)
    big.batch_store(big_keys, [memoryview(big_data)] * len(big_keys))
    dests = [bytearray(MIB) for _ in range(256)]
    assert big.batch_retrieve_into(big_keys[:4], dests[:4]) == [MIB] * 4 and bytes(dests[3]) == big_data

    def cold_copy(i: int) -> None:
        k, d = 4 * i % len(big_keys), 4 * i % len(dests)
        big.batch_retrieve_into(big_keys[k : k + 4], dests[d : d + 4])

    cold = time_each(iters // 2, cold_copy)
    out["batch_retrieve_into_4x1m_cold_gbps"] = round(4 * MIB / statistics.median(cold), 2)
    for k in big_keys:
        big.delete(k)
    big.close()
    del dests

    buf = bytearray(CHUNK)
    out["retrieve_into_p50_us"] = p50_us(time_each(iters, lambda i: h.retrieve_into(keys[i % 512], buf)))
    for k in keys:
        h.delete(k)
    h.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
