"""Fixtures for the framework suites: real `maru up` daemons for tests that run inside the
frameworks' own virtual environments (see scripts/frameworks.sh).

The `maru` binary is taken from ``$MARU_BIN_DIR``, else ``<repo>/target/release``. Each
daemon gets its own directory under /dev/shm (pool, state, socket, ready file, log), binds
127.0.0.1 on OS-chosen ports and is stopped with SIGTERM (SIGKILL if it does not exit).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


def maru_binary() -> Path:
    env = os.environ.get("MARU_BIN_DIR")
    d = Path(env) if env else REPO / "target" / "release"
    path = d / "maru"
    if not path.is_file():
        raise RuntimeError(f"{path} not found; build it with `cargo build --release --bins` or set MARU_BIN_DIR")
    return path


@dataclass
class MaruUp:
    """One `maru up` process: a resource manager and a metadata server on a shm pool."""

    dir: Path
    proc: subprocess.Popen[bytes]
    tcp: str
    unix: str | None
    rm: str

    @property
    def tcp_url(self) -> str:
        # The ready file gives URLs (tcp://host:port); a bare host:port works too.
        return self.tcp if self.tcp.startswith("tcp://") else f"tcp://{self.tcp}"

    @property
    def unix_url(self) -> str:
        assert self.unix, "maru up runs without a Unix socket"
        return self.unix if self.unix.startswith("unix://") else f"unix://{self.unix}"

    def stats(self) -> dict[str, Any]:
        """`maru stats --json` of this server (the operator's view, from another process)."""
        out = subprocess.run(
            [str(maru_binary()), "stats", "--server", self.tcp_url, "--json"],
            capture_output=True, text=True, timeout=30, check=True,
        )
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def start_maru_up(pool_size: int = 512 * MIB, *extra: str) -> MaruUp:
    d = Path(tempfile.mkdtemp(prefix="maru-fw-", dir="/dev/shm"))
    log = d / "up.log"
    ready = d / "ready.json"
    proc = subprocess.Popen(
        [
            str(maru_binary()), "up",
            "--port", "0", "--rm-port", "0",
            "--pool-size", f"{pool_size // MIB}M",
            "--pool-dir", str(d / "pool"), "--state-dir", str(d / "state"),
            "--ready-file", str(ready), "--log-level", "warn", *extra,
        ],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"maru up exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            doc = json.loads(ready.read_text())
            break
        except (FileNotFoundError, json.JSONDecodeError):
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"maru up not ready after 30 s: {log.read_text()[-2000:]}") from None
            time.sleep(0.02)
    return MaruUp(dir=d, proc=proc, tcp=doc["tcp"], unix=doc.get("unix"), rm=doc.get("rm", ""))


@pytest.fixture
def maru_up() -> Iterator[MaruUp]:
    """A `maru up` of the test's own (512 MiB pool)."""
    up = start_maru_up()
    try:
        yield up
    finally:
        up.stop()
        shutil.rmtree(up.dir, ignore_errors=True)


def run_child(code: str, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a separate interpreter of the same (framework) venv; fails the test
    with the child's output if it exits non-zero."""
    full_env = {**os.environ, **(env or {})}
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=full_env)
    if r.returncode != 0:
        pytest.fail(f"child exited with {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-8000:]}")
    return r
