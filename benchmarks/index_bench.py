"""Reads without a round trip from the metadata server's key index, through the public
``maru`` package: ``exists``, ``batch_exists(512)`` and ``batch_retrieve_into`` of 4 KiB
chunks, the last against a plain copy of the same bytes in this process (one contiguous
``memoryview`` copy: the memcpy floor). ``maru bench --only index`` runs it against its own
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

    buf = bytearray(CHUNK)
    out["retrieve_into_p50_us"] = p50_us(time_each(iters, lambda i: h.retrieve_into(keys[i % 512], buf)))
    for k in keys:
        h.delete(k)
    h.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
