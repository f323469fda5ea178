#!/usr/bin/env python3
"""The speed-under-load goals of `maru bench --quick` reports, as a Markdown table.

    python3 benchmarks/goals.py run1.json [run2.json ...]

Each cell is the range over the runs given (one value for one run); every ratio is taken
within its own run, against that run's floors: the 64-byte blocking round trip of its
transport, the memcpy measured alternating with the row, two busy-polling peers, and as many
processes reading their own memory.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Iterable

Row = dict[str, Any]
TRANSPORTS = (("unix", "Unix socket"), ("tcp", "TCP"))
# The note of the process row whose clients may use every CPU (maru-bench concurrency.rs).
EVERY_CPU = "one process per client, on every CPU"
# The op of the row whose ratio comes from runs alternating with one process (concurrency.rs).
ALTERNATING = "retrieve_alternating"
GIB = 1 << 30


def find(rows: list[Row], **want: Any) -> Row | None:
    for r in rows:
        if all(r.get(k) == v for k, v in want.items()):
            return r
    return None


def rtt(rep: dict[str, Any], t: str) -> float:
    return rep["floor"]["uds_rtt_us" if t == "unix" else "tcp_rtt_us"]


def span(values: Iterable[float | None], fmt: str = "{:.2f}") -> str:
    vs = sorted(v for v in values if v is not None)
    if not vs:
        return "–"
    lo, hi = fmt.format(vs[0]), fmt.format(vs[-1])
    return lo if lo == hi else f"{lo}–{hi}"


def busy_p99(op: str, batch: int) -> Callable[[dict[str, Any], str], float | None]:
    def f(rep: dict[str, Any], t: str) -> float | None:
        r = find(rep["results"], op=op, api="python", transport=t, batch=batch, contended=True, note=None)
        return r["p99_us"] / rtt(rep, t) if r else None
    return f


def process_rows(rep: dict[str, Any], t: str, op: str,
                 every_cpu: bool = False) -> tuple[Row | None, Row | None]:
    """The one-process row of `op` (on the client's CPUs) and the row with the most processes
    (on the client's CPUs, or free to use every CPU)."""
    rows = [r for r in rep["results"] if r["op"] == op and r["processes"] and r["transport"] == t]
    one = next((r for r in rows if r["clients"] == 1 and r.get("note") != EVERY_CPU), None)
    placed = [r for r in rows if (r.get("note") == EVERY_CPU) == every_cpu]
    many = max(placed, key=lambda r: r["clients"], default=None)
    return one, many


def processes(rep: dict[str, Any], t: str, op: str = "retrieve",
              every_cpu: bool = False) -> float | None:
    one, many = process_rows(rep, t, op, every_cpu)
    if not one or not many or many is one:
        return None
    return many["ops_per_s"] / one["ops_per_s"]


def alternating(rep: dict[str, Any], t: str) -> float | None:
    """The most processes' keys/s against one process's: from runs alternating with one
    process where the report has them (one host speed for both), else from the rows."""
    r = find(rep["results"], op=ALTERNATING, transport=t)
    return r["ratio"] if r and r.get("ratio") is not None else processes(rep, t)


def processes_p99(rep: dict[str, Any], t: str) -> float | None:
    _, many = process_rows(rep, t, "retrieve")
    return many["p99_us"] / rtt(rep, t) if many else None


def store_share(note: str | None) -> Callable[[dict[str, Any], str], float | None]:
    def f(rep: dict[str, Any], t: str) -> float | None:
        r = find(rep["results"], op="store", api="python", transport=t, chunk_bytes=4 << 20,
                 contended=False, note=note)
        return r["gbps"] / r["floor_gbps"] if r and r.get("gbps") and r.get("floor_gbps") else None
    return f


def huge_connect(rep: dict[str, Any], t: str) -> float | None:
    rows = [r for r in rep["results"] if r["transport"] == t and r["chunk_bytes"] == GIB
            and "2 MiB pages" in (r.get("note") or "") and r.get("samples")]
    c, a = find(rows, op="connect"), find(rows, op="first_alloc")
    return (c["p50_us"] + a["p50_us"]) / 1e3 if c and a else None


def versus_spin(op: str) -> Callable[[dict[str, Any], str], float | None]:
    def f(rep: dict[str, Any], t: str) -> float | None:
        spin = find(rep["results"], op="pin", api="floor-spin", transport=t)
        r = find(rep["results"], op=op, api="python", transport=t, batch=1, chunk_bytes=4096,
                 contended=False, note=None)
        return r["p50_us"] / spin["p50_us"] if r and spin else None
    return f


GOALS: list[tuple[str, str, Callable[[dict[str, Any], str], float | None], str]] = [
    ("busy Python thread: `retrieve` p99 / round trip", "≤ 3", busy_p99("retrieve", 1), "{:.2f}"),
    ("busy Python thread: `exists` p99 / round trip", "≤ 3", busy_p99("exists", 1), "{:.2f}"),
    ("busy Python thread: `store` 4 KiB p99 / round trip", "≤ 3", busy_p99("store", 1), "{:.2f}"),
    ("busy Python thread: `batch_exists(256)` p99 / round trip", "≤ 4", busy_p99("batch_exists", 256), "{:.2f}"),
    ("busy Python thread: `batch_retrieve(256)` p99 / round trip", "≤ 4", busy_p99("batch_retrieve", 256), "{:.2f}"),
    ("32 client processes: keys/s / one process's (alternating runs)", "≥ 1.0", alternating, "{:.2f}"),
    ("the same from rows measured seconds apart", "–", processes, "{:.2f}"),
    ("the same for processes reading their own memory (floor)", "–",
     lambda rep, t: processes(rep, t, "read_own"), "{:.2f}"),
    ("the same 32 clients free to use every CPU (the server's too)", "–",
     lambda rep, t: processes(rep, t, every_cpu=True), "{:.2f}"),
    ("32 client processes: p99 / round trip", "≤ 10", processes_p99, "{:.2f}"),
    ("Python `store` 4 MiB: share of memcpy bandwidth", "≥ 0.85", store_share(None), "{:.2f}"),
    ("the same with write-behind", "≥ 0.85", store_share("write_behind"), "{:.2f}"),
    ("connect + first alloc, 1 GiB pool on 2 MiB pages, ms", "≤ 150", huge_connect, "{:.0f}"),
    ("Python `retrieve` p50 / two busy-polling peers", "≤ 1.3", versus_spin("retrieve"), "{:.2f}"),
    ("Python `pin` (a round trip) p50 / two busy-polling peers", "≤ 1.3", versus_spin("pin"), "{:.2f}"),
]


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    reps = [json.load(open(p)) for p in paths]
    head = ["goal", "target"] + [name for _, name in TRANSPORTS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, target, f, fmt in GOALS:
        cells = [span((f(rep, t) for rep in reps), fmt) for t, _ in TRANSPORTS]
        print("| " + " | ".join([name, target] + cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
