"""The producer/consumer example runs as two real processes against real daemons."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import Cluster, wait_until

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "python-producer-consumer"


def run(script: str, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, str(EXAMPLE / script), *args], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, f"{script} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_producer_and_consumer_share_chunks_across_processes(fresh_cluster: Cluster, tmp_path: Path) -> None:
    url = fresh_cluster.url("unix")
    manifest = tmp_path / "manifest.json"
    out = run("producer.py", "--server", url, "--chunks", "16", "--chunk-size", str(256 << 10), "--manifest", str(manifest))
    assert "producer: stored 16 chunks of 256 KiB" in out and "GB/s" in out
    # The producer has exited; its region lives on because keys reference it.
    assert fresh_cluster.server_stats()["keys"] == 16
    out = run("consumer.py", "--server", url, "--manifest", str(manifest), "--delete")
    assert "retrieved 16 chunks as zero-copy views" in out
    assert "read-only views: True" in out
    assert "every chunk matches the producer's manifest" in out
    # Deleting the last keys returned the producer's region to the pool.
    wait_until("the region to go back to the pool", lambda: fresh_cluster.rm_stats()["allocations"] == 0)
    assert fresh_cluster.server_stats()["keys"] == 0
