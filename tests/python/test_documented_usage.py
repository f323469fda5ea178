"""The documented Python API's usage examples, verbatim, against a real server on
tcp://localhost:5555 (the examples' address), plus safety of views read after close() in a
separate interpreter (a dangling view would be a segfault there, not a failed assertion here)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from maru import MaruConfig, MaruHandler
from conftest import REPO, Cluster, run_python, running_cluster

# The usage example of the documented Python API (README.md, "Python quick start"), unchanged.
DOCUMENTED_USAGE = """
from maru import MaruConfig, MaruHandler

config = MaruConfig(server_url="tcp://localhost:5555", pool_size=1024 * 1024 * 100)
with MaruHandler(config) as handler:
    data = b"hello world"
    # Store: alloc → write → register
    handle = handler.alloc(size=len(data))
    handle.buf[:len(data)] = data
    handler.store(key=12345, handle=handle)
    # Retrieve (zero-copy memoryview into CXL memory)
    result = handler.retrieve(key=12345)
    # Check existence
    handler.exists(key=12345)
    # Delete
    handler.delete(key=12345)
"""

# The AllocHandle and MemoryInfo snippets, unchanged, inside a handler like the one above.
DOCUMENTED_SNIPPETS = """
from maru import MaruConfig, MaruHandler

config = MaruConfig(server_url="tcp://localhost:5555", pool_size=1024 * 1024 * 100)
with MaruHandler(config) as handler:
    data = b"x" * 1000
    # 1. Allocate a page
    handle = handler.alloc(size=1024 * 1024)
    # 2. Write directly to CXL memory (zero-copy)
    handle.buf[:len(data)] = data
    # 3. Register the key (only metadata is sent)
    handler.store(key=42, handle=handle)
    result = handler.retrieve(key=42)
    if result is not None:
        # result.view is a memoryview into CXL shared memory
        data = bytes(result.view)
        length = len(result.view)
    assert length == 1024 * 1024 and data[:1000] == b"x" * 1000
    assert handler.delete(key=42)
"""


def port_5555_free() -> bool:
    with socket.socket() as s:
        # As the server binds: connections in TIME_WAIT do not make the port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", 5555))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def server_on_5555() -> Iterator[None]:
    """A server on the examples' address: started here, or an already running Maru server."""
    if not port_5555_free():
        probe = MaruHandler(MaruConfig(server_url="tcp://localhost:5555", pool_size=2 << 20, chunk_size_bytes=1 << 20))
        ok = probe.connected
        probe.close()
        if not ok:
            pytest.skip("port 5555 is taken by something that is not a Maru server")
        yield
        return
    with running_cluster("usage", pool_size=512 << 20, server_port=5555):
        yield


def test_documented_usage_runs_verbatim(server_on_5555: None) -> None:
    r = run_python(DOCUMENTED_USAGE)
    assert r.returncode == 0, r.stderr


def test_documented_snippets_run_verbatim(server_on_5555: None) -> None:
    r = run_python(DOCUMENTED_SNIPPETS)
    assert r.returncode == 0, r.stderr


def test_quickstart_example_runs(server_on_5555: None) -> None:
    script = REPO / "examples" / "python-quickstart" / "quickstart.py"
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "hello world" in r.stdout


def test_reading_views_after_close_is_safe(cluster: Cluster) -> None:
    code = textwrap.dedent(
        f"""
        import gc
        from maru import MaruConfig, MaruHandler
        h = MaruHandler(MaruConfig(server_url={cluster.tcp_url!r}, pool_size=4 << 20, chunk_size_bytes=1 << 16))
        h.store("after-close", b"still here" * 1000)
        info = h.retrieve("after-close")
        handle = h.alloc(100)
        view = h.get_buffer_view(h.get_owned_region_ids()[0], 0, 4096)
        h.close()
        del h
        gc.collect()
        assert bytes(info.view) == b"still here" * 1000
        handle.buf[:5] = b"write"
        assert bytes(handle.buf[:5]) == b"write"
        assert len(bytes(view)) == 4096
        sliced = info.view[10:20]
        del info
        gc.collect()
        assert bytes(sliced) == b"still here"
        print("ok")
        """
    )
    r = run_python(code)
    assert r.returncode == 0, f"exit {r.returncode} (negative: killed by a signal): {r.stderr}"
    assert r.stdout.strip() == "ok"
