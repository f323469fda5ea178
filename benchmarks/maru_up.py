"""The daemons a benchmark script runs against: its own ``maru up`` on a temporary pool,
on ports the OS picks, stopped and removed when the run ends (bench.py, lmcache_backend.py
and vllm_ttft.py import it from this directory)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def maru_up(
    maru: str,
    *,
    pool_size: str,
    prefix: str,
    parent: str = "/dev/shm",
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[tuple[dict[str, Any], Path]]:
    """Starts `maru up` with a `pool_size` pool in a fresh directory under `parent`; yields
    its ready document (addresses) and that directory (its log is ``up.log`` there), which
    is removed when the daemons have stopped. Exits the script when they do not start."""
    who = os.path.basename(sys.argv[0])
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    ready, log = work / "ready.json", work / "up.log"
    proc = subprocess.Popen(
        [maru, "up", "--port", "0", "--rm-port", "0", "--pool-size", pool_size, "--pool-dir", str(work),
         "--state-dir", str(work / "state"), "--ready-file", str(ready), "--log-level", "warn"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=preexec_fn,
    )
    try:
        deadline = time.monotonic() + 30
        doc = None
        while doc is None:
            if proc.poll() is not None:
                sys.exit(f"{who}: maru up exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                doc = json.loads(ready.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                if time.monotonic() > deadline:
                    sys.exit(f"{who}: maru up was not ready within 30 s")
                time.sleep(0.02)
        yield doc, work
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
