"""Fair limits at the metadata server: ``--max-clients`` counts handlers (sessions), not
connections; operator tools have slots of their own; connections that never say hello
cannot keep a real client out."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from maru import MaruConfig, MaruHandler, ServerBusyError, _maru

from conftest import MIB, Cluster, running_cluster

MAX_CLIENTS = 300


@pytest.fixture
def limited() -> Iterator[Cluster]:
    with running_cluster("limits", pool_size=1024 * MIB, server_args=["--max-clients", str(MAX_CLIENTS)]) as c:
        yield c


def small(url: str) -> MaruConfig:
    # One 2 MiB region each; eager_map off so 300 handlers do not map each other's regions.
    return MaruConfig(server_url=url, pool_size=2 * MIB, chunk_size_bytes=64 * 1024, eager_map=False, timeout_ms=10_000)


def stats_within(url: str, seconds: float) -> dict[str, object]:
    t = time.monotonic()
    doc: dict[str, object] = json.loads(_maru.server_stats(url, timeout_ms=int(seconds * 1000)))
    assert time.monotonic() - t < seconds
    return doc


def test_max_clients_counts_handlers_and_stats_answer_at_the_limit(limited: Cluster) -> None:
    handlers = []
    try:
        for i in range(MAX_CLIENTS):
            h = MaruHandler(small(limited.tcp_url))
            h.store(f"limits-{i}", b"x")  # every handler has its pooled and watch connections
            handlers.append(h)
        # Every one of them has at least two connections, so a limit on connections would
        # have stopped at half.
        doc = stats_within(limited.tcp_url, 5)
        clients = [c for c in doc["clients"] if c["connected"]]  # type: ignore[union-attr, index]
        assert len(clients) >= MAX_CLIENTS
        with pytest.raises(ServerBusyError, match="300 clients"):
            MaruHandler(small(limited.tcp_url))
        # A handler at the limit still opens more connections of its own (concurrent calls).
        busy = handlers[0]
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                for _ in range(50):
                    assert busy.exists("limits-0")
            except BaseException as e:  # collected for the assertion below
                errors.append(e)

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        # The operator's view works at the limit, twice over (maru stats and maru top).
        stats_within(limited.tcp_url, 5)
        stats_within(limited.unix_url, 5)
        # One handler leaves: one more fits.
        handlers.pop().close()
        deadline = time.monotonic() + 10
        while True:
            try:
                handlers.append(MaruHandler(small(limited.tcp_url)))
                break
            except ServerBusyError:
                assert time.monotonic() < deadline, "the freed slot never came back"
                time.sleep(0.05)
    finally:
        for h in handlers:
            h.close()


def test_idle_sockets_that_never_say_hello_do_not_lock_anyone_out(limited: Cluster) -> None:
    host, port = limited.tcp_url.removeprefix("tcp://").rsplit(":", 1)
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        # A real client connects, and does its work, while all 300 still sit there; so does
        # the operator's statistics call. Each is bounded well under the handshake timeout.
        t = time.monotonic()
        h = MaruHandler(small(limited.tcp_url))
        h.store("behind-idle", b"v")
        assert h.exists("behind-idle")
        took = time.monotonic() - t
        assert took < 2.5, f"the new client waited {took:.2f} s"
        stats_within(limited.tcp_url, 2.5)
        h.close()
        # The idle ones are closed by the server: the oldest to make room, the rest after the
        # short pre-hello deadline.
        closed = 0
        for s in idle:
            s.settimeout(10)
            try:
                if s.recv(1) == b"":
                    closed += 1
            except OSError:
                closed += 1
        assert closed == len(idle)
    finally:
        for s in idle:
            s.close()
