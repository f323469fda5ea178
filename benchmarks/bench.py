#!/usr/bin/env python3
"""Maru benchmark through the public Python API (``from maru import MaruConfig, MaruHandler``).

Measures the single-client rows of ``maru bench`` the way users call Maru — store (``store(key,
data)`` of a new key: Maru copies the value into a fresh page), store of an existing key, retrieve (view only), retrieve + copy
out, exists (hit, miss), delete, pin, unpin, batch_store / batch_retrieve / batch_exists of 32
and 256 keys — over TCP and the Unix socket, and the metadata rows again while another Python
thread burns CPU (``contended``: the GIL switch interval is 5 ms, so any call that gives the
GIL away mid-round-trip shows up in p99).

Standalone it starts its own ``maru up`` (``target/release/maru`` or the ``maru`` console
script) on a temporary pool under /dev/shm and ports chosen by the OS, and asks
``maru bench --only floor`` for the raw round trips of this machine; its ratios are then
against the 64-byte ping-pong (``maru bench``, which runs this script for its Python rows,
recomputes them against ping-pongs of each row's exact message sizes).

    python benchmarks/bench.py --quick                 # table
    python benchmarks/bench.py --quick --json -        # JSON report on stdout
    python benchmarks/bench.py --server unix:///dev/shm/maru/maru-5555.sock

Rows have the shape of ``maru bench --json``: op, transport, chunk_bytes, batch, clients,
contended, p50_us, p99_us, ops_per_s, gbps (+ samples, note, ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from maru import MaruConfig, MaruHandler
from maru_up import maru_up

KIB = 1024
MIB = 1024 * KIB
SIZES = [4 * KIB, 64 * KIB, MIB, 4 * MIB]
# The owned region of each handler: as in `maru bench`, large enough that big chunks rotate
# over memory that is not all in cache.
REGION = 64 * MIB
WARMUP = 3
PLANS = {
    # mode: (calls per single-key row, calls per batch row)
    "smoke": (100, 10),
    "quick": (1000, 100),
    "full": (20000, 2000),
}
REPO = Path(__file__).resolve().parent.parent


class Keys:
    """LMCache-like keys, 40 bytes, unique within this run (and apart from maru bench's)."""

    def __init__(self) -> None:
        self.base = random.getrandbits(31) << 32 | 1 << 63
        self.n = 0

    def take(self, n: int) -> list[str]:
        out = [f"lmcache@llama3-8b@tp1@0@{self.base + self.n + i:016x}" for i in range(n)]
        self.n += n
        return out


KEYS = Keys()
perf = time.perf_counter_ns


def summarize(ns: list[int], batch: int) -> dict[str, Any]:
    s = sorted(ns)
    n = len(s)
    if n == 0:
        return {"p50_us": 0.0, "p99_us": 0.0, "ops_per_s": 0.0, "samples": 0}
    total = sum(s)
    return {
        "p50_us": round(s[n // 2] / 1e3, 3),
        "p99_us": round(s[min(n - 1, int(n * 0.99))] / 1e3, 3),
        "ops_per_s": round(n * 1e9 / total * max(batch, 1)) if total else 0.0,
        "samples": n,
    }


def row(
    op: str,
    transport: str,
    chunk: int,
    batch: int,
    contended: bool,
    ns: list[int],
    moved: int | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    r: dict[str, Any] = {
        "op": op,
        "transport": transport,
        "chunk_bytes": chunk,
        "batch": batch,
        "clients": 1,
        "contended": contended,
    }
    r.update(summarize(ns, batch))
    r["gbps"] = round(moved / (r["p50_us"] * 1e3), 3) if moved and r["p50_us"] > 0 else None
    r["note"] = note
    return r


BLOCK = 50


class FloorLink:
    """Floor blocks from a parent `maru bench --floor-pipe`: before each block of BLOCK calls
    this script asks the parent for as many ping-pongs of the row's wire sizes (on stdout) and
    waits until they are done (on stdin). Floor and row thus alternate in blocks and see the
    same minutes of the machine, as the Rust rows do."""

    on = False

    def block(self, ident: tuple[str, str, int, int, bool, str], n: int) -> None:
        if not self.on:
            return
        t, op, chunk, batch, contended, note = ident
        sys.stdout.write(f"FLOOR {t} {op} {chunk} {batch} {int(contended)} {n} {note}".rstrip() + "\n")
        sys.stdout.flush()
        if sys.stdin.readline().strip() != "OK":
            raise RuntimeError("the parent maru bench did not run the floor block")


FLOOR = FloorLink()


def measure(n: int, fn: Callable[[int], int], ident: tuple[str, str, int, int, bool, str]) -> list[int]:
    """Runs fn(i) n + WARMUP times in blocks alternating with floor blocks; fn returns the
    nanoseconds of the part it times."""
    out = []
    total = n + WARMUP
    for start in range(0, total, BLOCK):
        end = min(total, start + BLOCK)
        FLOOR.block(ident, end - start)
        for i in range(start, end):
            d = fn(i)
            if i >= WARMUP:
                out.append(d)
    return out


@contextmanager
def burner(on: bool) -> Iterator[None]:
    """Another Python thread burning CPU (holding the GIL whenever it can)."""
    if not on:
        yield
        return
    stop = threading.Event()

    def burn() -> None:
        x = 0
        while not stop.is_set():
            for _ in range(1000):
                x = (x * 3 + 1) & 0xFFFF

    t = threading.Thread(target=burn, daemon=True)
    t.start()
    time.sleep(0.02)  # let it take the GIL at least once
    try:
        yield
    finally:
        stop.set()
        t.join()


def handler(url: str, chunk: int, write_behind: bool = False) -> MaruHandler:
    return MaruHandler(
        MaruConfig(
            server_url=url,
            pool_size=max(REGION, chunk),
            chunk_size_bytes=chunk,
            auto_expand=False,
            timeout_ms=10000,
            write_behind=write_behind,
        )
    )


def prefill(h: MaruHandler, n: int, data: memoryview) -> list[str]:
    keys = KEYS.take(n)
    for i in range(0, n, 256):
        part = keys[i : i + 256]
        h.batch_store(part, [data] * len(part))
    return keys


def transport_of(url: str) -> str:
    return "unix" if url.startswith("unix://") else "tcp"


def rows_for(url: str, iters: int, batch_iters: int, log: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    t = transport_of(url)
    out: list[dict[str, Any]] = []

    def add(r: dict[str, Any]) -> None:
        out.append(r)
        log(r)

    def m(
        op: str,
        chunk: int,
        batch: int,
        contended: bool,
        n: int,
        fn: Callable[[int], int],
        moved: int | None = None,
        note: str | None = None,
    ) -> dict[str, Any]:
        ident = (t, op, chunk, batch, contended, note or "")
        return row(op, t, chunk, batch, contended, measure(n, fn, ident), moved, note)

    for chunk in SIZES:
        h = handler(url, chunk)
        pages = REGION // chunk
        data = memoryview(b"\x42" * chunk)
        n = min(iters, max(20, (256 * MIB) // chunk))

        def store_rows(contended: bool, held: int, hh: MaruHandler = h, note: str | None = None) -> None:
            """`held`: pages other keys of this handler occupy meanwhile."""
            live: list[str] = []
            fresh = iter(KEYS.take(n + WARMUP))

            def store(_: int) -> int:
                if len(live) >= pages - held:
                    for k in live:
                        hh.delete(k)
                    live.clear()
                key = next(fresh)
                t0 = perf()
                hh.store(key, data)
                d = perf() - t0
                live.append(key)
                return d

            with burner(contended):
                r = m("store", chunk, 1, contended, n, store, chunk, note)
            for k in live:
                hh.delete(k)
            add(r)

        store_rows(False, 0)
        # The same stream of stores with write-behind registration (MaruConfig.write_behind):
        # each store returns once its registration is sent; the reply is collected later.
        with handler(url, chunk, write_behind=True) as wb:
            store_rows(False, 0, wb, "write_behind")

        existing = prefill(h, 1, data)[0]

        def store_existing(_: int) -> int:
            t0 = perf()
            h.store(existing, data)
            return perf() - t0

        add(m("store_existing", chunk, 1, False, n, store_existing, chunk))
        h.delete(existing)

        stored = prefill(h, max(1, min(pages - 2, 256)), data)

        def retrieve(i: int) -> int:
            k = stored[i % len(stored)]
            t0 = perf()
            mi = h.retrieve(k)
            d = perf() - t0
            assert mi is not None
            return d

        add(m("retrieve", chunk, 1, False, iters, retrieve))
        dst = bytearray(chunk)

        def retrieve_copy(i: int) -> int:
            k = stored[i % len(stored)]
            t0 = perf()
            mi = h.retrieve(k)
            dst[:] = mi.view  # type: ignore[union-attr]
            return perf() - t0

        add(m("retrieve_copy", chunk, 1, False, n, retrieve_copy, chunk))

        if chunk == 4 * KIB:
            missing = KEYS.take(256)

            def exists(i: int) -> int:
                t0 = perf()
                ok = h.exists(stored[i % len(stored)])
                d = perf() - t0
                assert ok
                return d

            def exists_miss(i: int) -> int:
                t0 = perf()
                ok = h.exists(missing[i % len(missing)])
                d = perf() - t0
                assert not ok
                return d

            def pin(_: int) -> int:
                t0 = perf()
                ok = h.pin(stored[0])
                d = perf() - t0
                assert ok and h.unpin(stored[0])
                return d

            def unpin(_: int) -> int:
                assert h.pin(stored[0])
                t0 = perf()
                ok = h.unpin(stored[0])
                d = perf() - t0
                assert ok
                return d

            add(m("exists", chunk, 1, False, iters, exists))
            add(m("exists_miss", chunk, 1, False, iters, exists_miss))
            add(m("pin", chunk, 1, False, iters, pin))
            add(m("unpin", chunk, 1, False, iters, unpin))

            pending: list[str] = []

            def delete(_: int) -> int:
                if not pending:
                    pending.extend(prefill(h, min(4096, pages - len(stored) - 8), data))
                k = pending.pop()
                t0 = perf()
                ok = h.delete(k)
                d = perf() - t0
                assert ok
                return d

            add(m("delete", chunk, 1, False, iters, delete))
            for k in pending:
                h.delete(k)

            for b in (32, 256):
                live: list[str] = []

                def batch_store(_: int, b: int = b, live: list[str] = live) -> int:
                    if len(live) + b > pages - 512:
                        for k in live:
                            h.delete(k)
                        live.clear()
                    ks = KEYS.take(b)
                    infos = [data] * b
                    t0 = perf()
                    h.batch_store(ks, infos)
                    d = perf() - t0
                    live.extend(ks)
                    return d

                add(m("batch_store", chunk, b, False, batch_iters, batch_store, chunk * b))
                for k in live:
                    h.delete(k)
                ks = prefill(h, b, data)

                def batch_retrieve(_: int, ks: list[str] = ks) -> int:
                    t0 = perf()
                    r = h.batch_retrieve(ks)
                    d = perf() - t0
                    assert r[-1] is not None
                    return d

                def batch_exists(_: int, ks: list[str] = ks) -> int:
                    t0 = perf()
                    r = h.batch_exists(ks)
                    d = perf() - t0
                    assert r[-1]
                    return d

                add(m("batch_retrieve", chunk, b, False, batch_iters, batch_retrieve))
                add(m("batch_exists", chunk, b, False, batch_iters, batch_exists))
                if b == 256:
                    # The same metadata rows with another Python thread burning CPU.
                    with burner(True):
                        add(m("batch_retrieve", chunk, b, True, batch_iters, batch_retrieve))
                        add(m("batch_exists", chunk, b, True, batch_iters, batch_exists))
                for k in ks:
                    h.delete(k)

            with burner(True):
                add(m("retrieve", chunk, 1, True, iters, retrieve))
                add(m("exists", chunk, 1, True, iters, exists))
            store_rows(True, len(stored))

        for k in stored:
            h.delete(k)
        h.close()
    return out


def find_maru(explicit: str | None) -> str:
    for cand in (explicit, os.environ.get("MARU_BIN"), str(REPO / "target/release/maru")):
        if cand and Path(cand).is_file():
            return cand
    found = shutil.which("maru")
    if found:
        return found
    sys.exit("bench.py: no maru executable (build with cargo build --release, or pass --maru PATH)")


ALL_CPUS = sorted(os.sched_getaffinity(0))


def pinned(cpus: set[int]) -> Callable[[], None]:
    """A preexec_fn that pins the child to cpus."""
    return lambda: os.sched_setaffinity(0, cpus)


@contextmanager
def spinners(on: bool) -> Iterator[None]:
    """One SCHED_IDLE busy loop per CPU, as `maru bench` runs: a halted vCPU takes tens of
    microseconds to wake, which would land on random round trips. They yield at once to any
    real work."""
    procs = []
    if on:
        for c in ALL_CPUS:
            def pre(c: int = c) -> None:
                os.sched_setaffinity(0, {c})
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

            procs.append(subprocess.Popen(["sh", "-c", "while :; do :; done"], preexec_fn=pre))
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def floors(maru: str, mode: str) -> dict[str, Any] | None:
    args = [maru, "bench", "--only", "floor", "--json", "-"]
    if mode != "full":
        args.append("--quick")
    try:
        # It places itself (client and echo threads on the CPUs this script uses for itself
        # and for `maru up`), so it starts unpinned.
        out = subprocess.run(
            args, check=True, capture_output=True, text=True, timeout=120, preexec_fn=pinned(set(ALL_CPUS))
        ).stdout
        return json.loads(out)["floor"]
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
        print(f"bench.py: no floors ({e})", file=sys.stderr)
        return None


def fmt_row(r: dict[str, Any]) -> str:
    op = r["op"] + ("*" if r["contended"] else "")
    gbps = f"{r['gbps']:.2f}" if r.get("gbps") else "-"
    ratio = f"{r['ratio']:.2f}" if r.get("ratio") else "-"
    return (
        f"{op:<20} {'python':<6} {r['transport']:<5} {r['chunk_bytes'] // KIB:>5}K {r['batch']:>5} "
        f"{r['p50_us']:>10.2f} {r['p99_us']:>10.2f} {r['ops_per_s']:>12.0f} {gbps:>7} {ratio:>6}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", action="append", default=[], help="URL of a running server (repeatable)")
    ap.add_argument("--quick", action="store_true", help="fewer samples (well under a minute)")
    ap.add_argument("--smoke", action="store_true", help="the fewest samples that produce every row")
    ap.add_argument("--json", metavar="PATH|-", help="write the JSON report here (- for stdout)")
    ap.add_argument("--transport", choices=["tcp", "unix", "both"], default="both")
    ap.add_argument("--maru", help="maru executable for `maru up` and the floors")
    ap.add_argument("--pool-dir", default="/dev/shm", help="where the temporary pool goes")
    ap.add_argument("--no-floor", action="store_true", help="do not measure floors (maru bench does)")
    ap.add_argument("--quiet", action="store_true", help="no table, only the JSON report")
    ap.add_argument("--floor-pipe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--let-cpus-idle", action="store_true", help="standalone: no SCHED_IDLE spinners")
    a = ap.parse_args()
    mode = "smoke" if a.smoke else "quick" if a.quick else "full"
    FLOOR.on = a.floor_pipe
    iters, batch_iters = PLANS[mode]
    log_to = sys.stderr if a.json == "-" else sys.stdout

    def log(r: dict[str, Any]) -> None:
        if not a.quiet:
            print(fmt_row(r), file=log_to, flush=True)

    def run(urls: list[str], maru: str | None) -> dict[str, Any]:
        urls = [u for u in urls if a.transport in ("both", transport_of(u))]
        floor = None if a.no_floor or maru is None else floors(maru, mode)
        results: list[dict[str, Any]] = []
        for u in urls:
            if not a.quiet:
                print(f"== python, {transport_of(u)} ({u}); * = another thread burning CPU", file=log_to, flush=True)
            results.extend(rows_for(u, iters, batch_iters, log))
        if floor:
            for r in results:
                rtt = floor["tcp_rtt_us"] if r["transport"] == "tcp" else floor["uds_rtt_us"]
                r["ratio"] = round(r["p50_us"] / rtt, 3) if rtt else None
                r["floor_us"] = rtt
                r["floor"] = "64 B ping-pong (maru bench --only floor)"
        return {"mode": mode, "api": "python", "floor": floor, "results": results}

    if a.server:
        report = run(a.server, None if a.no_floor else find_maru(a.maru))
    else:
        # As `maru bench --placement spread`: the daemons on the second CPU, this process (and
        # the thread that burns CPU in the contended rows) on the first.
        maru = find_maru(a.maru)
        client, server = {ALL_CPUS[0]}, {ALL_CPUS[min(1, len(ALL_CPUS) - 1)]}
        with spinners(not a.let_cpus_idle), maru_up(
            maru, pool_size="1G", prefix="maru-bench-py-", parent=a.pool_dir, preexec_fn=pinned(server)
        ) as (ready, _):
            os.sched_setaffinity(0, client)
            report = run([u for u in (ready.get("tcp"), ready.get("unix")) if u], maru)
    if a.floor_pipe:
        # One line, after the FLOOR requests on the same stream.
        print("REPORT " + json.dumps(report), flush=True)
    elif a.json == "-":
        json.dump(report, sys.stdout, indent=1)
        print()
    elif a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
