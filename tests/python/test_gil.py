"""The GIL policy, both ways:

- a call blocked on a slow server, and a large batch, let other Python threads run;
- a single retrieve never gives the GIL away when its reply comes quickly, so it stays at
  round-trip speed (no 5 ms switch-interval stalls) while another Python thread burns CPU.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from maru import MaruConfig, MaruHandler
from conftest import KIB, MIB, Cluster, ConfigFactory
from fakeserver import FakeServer


def run_while_counting(work: Callable[[], Any]) -> tuple[Any, float, float, int]:
    """Runs `work` in a thread while this thread spins; returns (result or exception,
    how long `work` took, the longest gap between two iterations of this thread, and the
    number of iterations this thread made meanwhile)."""
    out: dict[str, Any] = {}

    def target() -> None:
        t0 = time.perf_counter()
        try:
            out["result"] = work()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["result"] = e
        out["took"] = time.perf_counter() - t0

    t = threading.Thread(target=target)
    last = time.perf_counter()
    max_gap = 0.0
    iterations = 0
    t.start()
    while t.is_alive():
        now = time.perf_counter()
        max_gap = max(max_gap, now - last)
        last = now
        iterations += 1
    t.join()
    return out["result"], out["took"], max_gap, iterations


@pytest.fixture
def stalled(tmp_path: Path) -> Any:
    region = tmp_path / "region"
    with open(region, "wb") as f:
        f.truncate(2 * MIB)
    fake = FakeServer("stall", region=(region, 2 * MIB))
    yield fake
    fake.close()


def test_a_call_blocked_on_a_stalled_server_lets_other_threads_run(stalled: FakeServer) -> None:
    h = MaruHandler(
        MaruConfig(server_url=stalled.url, pool_size=2 * MIB, chunk_size_bytes=64 * KIB, timeout_ms=1000, eager_map=False)
    )
    assert h.connected, "the fake server hands out a region"
    result, took, gap, n = run_while_counting(lambda: h.exists("k"))
    assert isinstance(result, TimeoutError), result
    assert "exists" in str(result) and "1000 ms" in str(result)
    assert 0.9 < took < 5, took
    # Held GIL: this thread would have been frozen for the whole second.
    assert gap < 0.25, f"main thread stalled {gap * 1e3:.0f} ms during a {took * 1e3:.0f} ms call"
    assert n > 1000
    # Writes wait the same way (store takes the write lock, then waits for the reply).
    result, took, gap, _ = run_while_counting(lambda: h.store("k", b"v"))
    assert isinstance(result, TimeoutError), result
    assert gap < 0.25
    # The server may still register a timed-out store, so its page is not reused.
    assert h.allocator is not None and h.allocator.num_allocated == 1
    # The timed-out connection is kept (the session lives on it), beside the watcher's.
    assert stalled.connections() == 2, "a timed-out connection must be kept, not replaced"
    # close() says goodbye to the stalled server: bounded, and also without freezing others.
    result, took, gap, _ = run_while_counting(h.close)
    assert result is None and took < 5 and gap < 0.25


def test_connect_to_a_server_that_stalls_after_hello(tmp_path: Path) -> None:
    fake = FakeServer("stall", region=None)  # never answers RequestRegion
    try:
        h = MaruHandler(MaruConfig(server_url=fake.url, timeout_ms=800, auto_connect=False))
        result, took, gap, _ = run_while_counting(h.connect)
        assert result is False and 0.7 < took < 5
        assert gap < 0.25
        with pytest.raises(RuntimeError, match="request_region"):
            h.exists("k")
    finally:
        fake.close()


def test_a_large_batch_lets_other_threads_run(make_config: ConfigFactory, handlers: list[MaruHandler]) -> None:
    chunk = MIB
    n = 192
    h = MaruHandler(make_config(pool_size=n * chunk, chunk_size_bytes=chunk))
    handlers.append(h)
    # 192 MiB of distinct source pages: the copies read cold memory, so they dominate the call.
    source = memoryview(b"\x5a" * (n * chunk))
    items = [source[i * chunk : (i + 1) * chunk] for i in range(n)]
    keys = [f"gil-batch-{os.getpid()}-{i}" for i in range(n)]
    windows: list[tuple[float, float]] = []

    def batch() -> None:
        for round_ in range(2):
            ks = [f"{k}-{round_}" for k in keys]
            t0 = time.perf_counter()
            ok = h.batch_store(ks, items)
            windows.append((t0, time.perf_counter()))
            assert ok == [True] * n
            for k in ks:
                h.delete(k)

    # This thread notes when it runs; inside each batch_store call it must keep running.
    stamps: list[float] = []
    t = threading.Thread(target=batch)
    t.start()
    while t.is_alive():
        stamps.append(time.perf_counter())
    t.join()
    assert len(windows) == 2
    for t0, t1 in windows:
        inside = [t0] + [x for x in stamps if t0 < x < t1] + [t1]
        gap = max(b - a for a, b in zip(inside, inside[1:]))
        took = t1 - t0
        # Holding the GIL through the copies would leave no stamp inside the window at all.
        assert took > 0.01, f"batch too quick ({took * 1e3:.1f} ms) to tell anything"
        assert gap < took / 2, f"this thread stalled {gap * 1e3:.1f} ms of a {took * 1e3:.1f} ms batch"


def test_single_retrieves_stay_fast_while_another_thread_burns_cpu(
    make_config: ConfigFactory, handlers: list[MaruHandler], cluster: Cluster
) -> None:
    h = MaruHandler(make_config(server_url=cluster.unix_url))
    handlers.append(h)
    k = f"gil-p99-{os.getpid()}"
    h.store(k, b"x" * 4096)
    stop = threading.Event()

    def burn() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    for _ in range(200):  # warm up: connections, mappings, caches
        h.retrieve(k)
    burner = threading.Thread(target=burn)
    burner.start()
    try:
        lat = []
        for _ in range(3000):
            t0 = time.perf_counter_ns()
            info = h.retrieve(k)
            lat.append(time.perf_counter_ns() - t0)
            assert info is not None
    finally:
        stop.set()
        burner.join()
    lat.sort()
    p50, p99 = lat[len(lat) // 2] / 1e6, lat[len(lat) * 99 // 100] / 1e6
    print(f"retrieve with a busy thread: p50 {p50 * 1e3:.1f} us, p99 {p99 * 1e3:.1f} us")
    # Releasing the GIL around each round trip would put p50 near the 5 ms switch interval.
    assert p50 < 0.5, f"p50 {p50:.3f} ms"
    assert p99 < 2.0, f"p99 {p99:.3f} ms (p50 {p50:.3f} ms, mean {statistics.mean(lat) / 1e6:.3f} ms)"
