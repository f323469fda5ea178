"""Fixtures that run the REAL daemons: ``maru-resource-manager`` and ``maru-server``.

Binaries are taken from ``$MARU_BIN_DIR``, else ``<repo>/target/release``, else
``<repo>/target/debug``. Each cluster gets its own directory under /dev/shm (pool file,
state directory, Unix socket, ready files, logs), listens on 127.0.0.1 port 0, and is torn
down with SIGTERM (SIGKILL if it does not exit).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from maru import MaruConfig, MaruHandler, _maru

REPO = Path(__file__).resolve().parents[2]
KIB = 1024
MIB = 1024 * 1024
SHM = Path("/dev/shm")


def bin_dir() -> Path:
    env = os.environ.get("MARU_BIN_DIR")
    candidates = [Path(env)] if env else [REPO / "target" / "release", REPO / "target" / "debug"]
    for d in candidates:
        if (d / "maru-server").is_file() and (d / "maru-resource-manager").is_file():
            return d
    raise RuntimeError(
        f"maru-server / maru-resource-manager not found in {[str(c) for c in candidates]}; "
        "build them with `cargo build --release --bins` or set MARU_BIN_DIR"
    )


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> dict[str, Any]:
    """The JSON a daemon writes to its ready file once it listens."""
    name = Path(str(proc.args[0] if isinstance(proc.args, list) else proc.args)).name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            doc: dict[str, Any] = json.loads(path.read_text())
            return doc
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.01)
    raise RuntimeError(f"{name} not ready after {timeout}s: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class Cluster:
    """A resource manager and a metadata server, as separate processes."""

    dir: Path
    pool_size: int = 1024 * MIB
    server_port: int = 0
    rm_addr: str = ""
    tcp_url: str = ""
    unix_url: str = ""
    #: Extra arguments of the metadata server (e.g. ["--max-clients", "300"]).
    server_args: list[str] = field(default_factory=list)
    #: Extra arguments of the resource manager (e.g. ["--metrics-port", "0"]).
    rm_args: list[str] = field(default_factory=list)
    #: The resource manager's ready document (its addresses).
    rm_ready: dict[str, Any] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> Cluster:
        bins = bin_dir()
        rm_log = self.dir / "rm.log"
        rm = subprocess.Popen(
            [
                str(bins / "maru-resource-manager"),
                "--port", "0",
                "--state-dir", str(self.dir / "state"),
                "--pool", f"shm:{self.dir / 'pool'}:{self.pool_size // MIB}M",
                "--ready-file", str(self.dir / "rm.ready"),
                "--log-level", "warn",
                *self.rm_args,
            ],
            stdout=rm_log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.procs.append(rm)
        self.rm_ready = wait_for_file(self.dir / "rm.ready", rm, rm_log)
        self.rm_addr = self.rm_ready["tcp"]
        srv_log = self.dir / "server.log"
        sock = self.dir / "server.sock"
        srv = subprocess.Popen(
            [
                str(bins / "maru-server"),
                "--port", str(self.server_port),
                "--unix", str(sock),
                "--rm-address", self.rm_addr,
                "--ready-file", str(self.dir / "server.ready"),
                "--log-level", "warn",
                *self.server_args,
            ],
            stdout=srv_log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.procs.append(srv)
        ready = wait_for_file(self.dir / "server.ready", srv, srv_log)
        self.tcp_url = f"tcp://{ready['tcp']}"
        self.unix_url = f"unix://{sock}"
        return self

    def url(self, transport: str = "tcp") -> str:
        return self.unix_url if transport == "unix" else self.tcp_url

    def rm_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = json.loads(_maru.rm_stats(f"tcp://{self.rm_addr}"))
        return stats

    def server_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = json.loads(_maru.server_stats(self.tcp_url))
        return stats

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop(p)
        self.procs.clear()


def wait_until(what: str, cond: Any, timeout: float = 15.0) -> None:
    """Polls `cond` until it holds; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def new_dir(tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"maru-pytest-{tag}-", dir=SHM))


@contextmanager
def running_cluster(tag: str, **options: Any) -> Iterator[Cluster]:
    """A started cluster in a fresh directory named after `tag`, stopped and removed on exit;
    `options` are :class:`Cluster` fields (pool_size, server_args, ...)."""
    d = new_dir(tag)
    c = Cluster(d, **options).start()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    with running_cluster("session") as c:
        yield c


@pytest.fixture
def fresh_cluster() -> Iterator[Cluster]:
    """A cluster of its own, for tests that count regions at the resource manager."""
    with running_cluster("fresh", pool_size=256 * MIB) as c:
        yield c


@pytest.fixture(params=["tcp", "unix"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


ConfigFactory = Callable[..., MaruConfig]


@pytest.fixture
def make_config(cluster: Cluster) -> ConfigFactory:
    """MaruConfig for the session cluster: small pages and pool so tests stay fast."""

    def make(**kw: Any) -> MaruConfig:
        kw.setdefault("server_url", cluster.tcp_url)
        kw.setdefault("pool_size", 4 * MIB)
        kw.setdefault("chunk_size_bytes", 64 * KIB)
        kw.setdefault("timeout_ms", 5000)
        return MaruConfig(**kw)

    return make


@pytest.fixture
def handlers() -> Iterator[list[MaruHandler]]:
    """Handlers created by a test, closed after it."""
    made: list[MaruHandler] = []
    yield made
    for h in made:
        h.close()


@pytest.fixture
def handler(make_config: ConfigFactory, handlers: list[MaruHandler], transport: str, cluster: Cluster) -> MaruHandler:
    h = MaruHandler(make_config(server_url=cluster.url(transport)))
    assert h.connected, "handler did not connect"
    handlers.append(h)
    return h


@pytest.fixture
def key() -> Callable[[str], str]:
    """Unique keys per test (the session cluster is shared)."""
    prefix = uuid.uuid4().hex[:12]
    return lambda name: f"{prefix}-{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_python(code: str, *args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a separate interpreter (same venv)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, **kw
    )
