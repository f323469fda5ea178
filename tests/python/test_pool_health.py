"""A pool whose file is deleted under a running resource manager: noticed at the next
allocation and by the periodic check, reported in the statistics (``maru stats`` too), the
metrics and the log, and every new region is refused with that reason."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from maru import MaruConfig, MaruHandler, PoolUnhealthyError

from conftest import MIB, Cluster, running_cluster, wait_until


@pytest.fixture
def pool_cluster() -> Iterator[Cluster]:
    with running_cluster("health", pool_size=64 * MIB, rm_args=["--metrics-port", "0"]) as c:
        yield c


def config(c: Cluster) -> MaruConfig:
    return MaruConfig(server_url=c.tcp_url, pool_size=2 * MIB, chunk_size_bytes=MIB, eager_map=False)


def maru_stats(c: Cluster) -> str:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("maru")), "stats", "--server", c.tcp_url],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_deleted_pool_file_is_reported_and_refuses_new_regions(pool_cluster: Cluster) -> None:
    c = pool_cluster
    writer = MaruHandler(config(c))
    writer.store("health-0", b"a")
    writer.store("health-1", b"b")  # both pages of its one region are taken
    assert "UNHEALTHY" not in maru_stats(c)

    (c.dir / "pool").unlink()
    # At allocation: no wait for the periodic check.
    t = time.monotonic()
    newcomer = MaruHandler(config(c))  # connecting takes no region
    with pytest.raises(PoolUnhealthyError) as e:
        newcomer.store("health-new", b"n")
    assert time.monotonic() - t < 2
    newcomer.close()
    assert "was deleted" in str(e.value) and e.value.code == "PoolUnhealthy"
    assert isinstance(e.value, ValueError)
    # The writer's alloc needs a new region: the same reason reaches it.
    with pytest.raises(PoolUnhealthyError, match="was deleted") as e:
        writer.alloc(10)
    assert "no new region could be had" in str(e.value) and e.value.op == "alloc"
    # What it already has keeps working.
    info = writer.retrieve("health-0")
    assert info is not None and bytes(info.view) == b"a"

    rm = c.rm_stats()
    assert "was deleted" in rm["pools"][0]["problem"]
    server = c.server_stats()
    assert "was deleted" in server["pools"][0]["problem"]
    shown = maru_stats(c)
    assert "UNHEALTHY" in shown and "was deleted" in shown, shown
    metrics = urllib.request.urlopen(f"http://{c.rm_ready['metrics']}/metrics", timeout=10).read().decode()
    assert f'maru_pool_healthy{{pool="{c.dir / "pool"}"}} 0' in metrics, metrics
    log = (c.dir / "rm.log").read_text()
    assert "was deleted" in log and "no new regions come from it" in log
    assert log.count("no new regions come from it") == 1, "logged once, not on every check"
    writer.close()


def test_the_periodic_check_notices_without_any_allocation(pool_cluster: Cluster) -> None:
    c = pool_cluster
    assert c.rm_stats()["pools"][0].get("problem") is None
    (c.dir / "pool").unlink()
    wait_until("the periodic check", lambda: "was deleted" in (c.rm_stats()["pools"][0].get("problem") or ""))
    json.dumps(c.rm_stats())  # still a well-formed document
