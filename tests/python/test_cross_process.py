"""Across processes: A writes, a separate interpreter reads through zero-copy views.

Process A (a child interpreter) stores N chunks of random bytes and reports their hashes.
This interpreter (B) retrieves each one through the view, compares hashes, checks the views
are read-only, keeps reading after A has closed (deferred freeing), then deletes every key and
waits for the resource manager to report A's region freed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from maru import MaruConfig, MaruHandler
from conftest import KIB, MIB, Cluster, wait_until

N = 48
CHUNK = 128 * KIB

WRITER = r"""
import hashlib, json, os, sys
from maru import MaruConfig, MaruHandler

url, n, chunk, behind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
h = MaruHandler(MaruConfig(server_url=url, pool_size=n * chunk, chunk_size_bytes=chunk, write_behind=behind))
assert h.connected
hashes = {}
for i in range(n):
    data = os.urandom(chunk - i)          # every chunk a different length too
    key = f"xproc-{os.getpid()}-{i}"
    if i % 2:
        handle = h.alloc(size=len(data))  # zero copy: write straight into shared memory
        handle.buf[: len(data)] = data
        assert h.store(key=key, handle=handle)
    else:
        assert h.store(key, data=data)    # copy in
    hashes[key] = hashlib.sha256(data).hexdigest()
    if behind and i == 0:
        assert h.exists(key), "a handler sees its own write-behind store at once"
h.flush()  # write-behind: every key is registered before B is told about it
print(json.dumps({"hashes": hashes, "regions": h.get_owned_region_ids()}), flush=True)
assert sys.stdin.readline().strip() == "close"
h.close()
print("closed", flush=True)
"""


@pytest.mark.parametrize("write_behind", [False, True], ids=["sync", "write_behind"])
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_process_b_reads_what_process_a_wrote(fresh_cluster: Cluster, transport: str, write_behind: bool) -> None:
    url = fresh_cluster.url(transport)
    a = subprocess.Popen(
        [sys.executable, "-c", WRITER, url, str(N), str(CHUNK), "1" if write_behind else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert a.stdout is not None and a.stdin is not None
        line = a.stdout.readline()
        assert line, f"writer failed: {a.stderr.read() if a.stderr else ''}"
        report = json.loads(line)
        hashes: dict[str, str] = report["hashes"]
        a_regions: list[int] = report["regions"]
        assert len(hashes) == N

        b = MaruHandler(MaruConfig(server_url=url, pool_size=2 * MIB, chunk_size_bytes=64 * KIB, eager_map=False))
        assert b.connected
        assert fresh_cluster.rm_stats()["allocations"] == len(a_regions), "a reader takes no region"

        infos = {k: b.retrieve(k) for k in hashes}
        for k, info in infos.items():
            assert info is not None, k
            assert info.region_id in a_regions
            assert info.view.readonly, "another instance's region is mapped read-only"
            assert hashlib.sha256(info.view).hexdigest() == hashes[k], k
        some = next(iter(infos.values()))
        assert some is not None
        with pytest.raises(TypeError):
            some.view[0:1] = b"\0"
        assert b.batch_retrieve(list(hashes))[0] is not None

        # A closes: its region stays while keys reference it (deferred freeing).
        a.stdin.write("close\n")
        a.stdin.flush()
        assert a.stdout.readline().strip() == "closed"
        assert a.wait(timeout=30) == 0
        for k, info in infos.items():
            assert info is not None and hashlib.sha256(info.view).hexdigest() == hashes[k], "deferred freeing"
        again = b.retrieve(next(iter(hashes)))
        assert again is not None and again.view.readonly
        assert fresh_cluster.rm_stats()["allocations"] == len(a_regions), "A's region is still referenced"

        # B deletes every key. Its views still hold their pages, so A's region stays until
        # they are released; then nothing references it and it goes back to the pool.
        assert all(b.delete(k) for k in hashes)
        for k, info in infos.items():
            assert info is not None and hashlib.sha256(info.view).hexdigest() == hashes[k], "held"
        assert fresh_cluster.rm_stats()["allocations"] == len(a_regions), "held pages keep the region"
        del infos, again, some, info
        wait_until("A's region to be freed", lambda: fresh_cluster.rm_stats()["allocations"] == 0)
        pools = b.get_stats()["server"]["pools"]
        assert pools and pools[0]["regions"] == 0
        b.close()
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
