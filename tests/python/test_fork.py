"""A handler connected before ``os.fork()``, used in the child: refused (default) or
reconnected (``reconnect_after_fork=True``); the parent's session is never touched.

Each test forks for real. The child reports what it saw through a pipe and leaves with
``os._exit`` (or a plain ``sys.exit`` for the exit path, which runs interpreter teardown);
the parent checks its own handler afterwards: it must still answer, and answer right. A
separate interpreter checks a child that leaves through the interpreter's own teardown.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
from collections.abc import Callable
from typing import Any

import pytest

import maru
from maru import ForkedHandlerError, MaruHandler

from conftest import Cluster, ConfigFactory, run_python

Key = Callable[[str], str]


def in_child(body: Callable[[], dict[str, Any]], *, exit_normally: bool = False, timeout: float = 30) -> dict[str, Any]:
    """Runs `body` in a forked child; returns the dict it produced (or its exception)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = body()
        except BaseException as e:  # the report is the test's evidence
            out = {"raised": type(e).__name__, "message": str(e)}
        os.write(w, json.dumps(out).encode())
        os.close(w)
        if exit_normally:
            # What an exit runs, short of leaving pytest's frames: collection and atexit.
            gc.collect()
            atexit._run_exitfuncs()
        os._exit(0)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        chunks.append(f.read())
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
    return dict(json.loads(b"".join(chunks) or b"{}"))


def parent_still_right(h: MaruHandler, key: Key) -> None:
    """The parent's handler answers, and its answers are its own."""
    for i in range(50):
        h.store(key(f"after-{i}"), f"v{i}".encode())
    for i in range(50):
        assert h.exists(key(f"after-{i}")), i
        info = h.retrieve(key(f"after-{i}"))
        assert info is not None and bytes(info.view) == f"v{i}".encode()
    assert not h.exists(key("never-stored"))
    assert h.healthcheck()


@pytest.mark.parametrize("exit_normally", [False, True])
def test_a_forked_child_is_refused_and_the_parent_keeps_its_session(
    make_config: ConfigFactory, handlers: list[MaruHandler], key: Key, exit_normally: bool
) -> None:
    h = MaruHandler(make_config())
    handlers.append(h)
    h.store(key("before"), b"parent")

    def child() -> dict[str, Any]:
        seen: dict[str, Any] = {"connected": h.connected}
        for name, call in [
            ("exists", lambda: h.exists(key("before"))),
            ("retrieve", lambda: h.retrieve(key("before"))),
            ("store", lambda: h.store(key("child"), b"x")),
            ("alloc", lambda: h.alloc(1)),
            ("get_stats", lambda: h.get_stats()),
        ]:
            try:
                call()
                seen[name] = "answered"
            except ForkedHandlerError as e:
                seen[name] = "ForkedHandlerError" if isinstance(e, RuntimeError) else "not a RuntimeError"
                seen["message"] = str(e)
        seen["healthcheck"] = h.healthcheck()
        h.close()  # must not say goodbye for the parent, nor shut its sockets down
        return seen

    seen = in_child(child, exit_normally=exit_normally)
    assert "raised" not in seen, seen
    assert seen["connected"] is False
    for name in ["exists", "retrieve", "store", "alloc", "get_stats"]:
        assert seen[name] == "ForkedHandlerError", (name, seen)
    assert "forked" in seen["message"] and "reconnect_after_fork" in seen["message"]
    assert seen["healthcheck"] is False
    assert h.connected
    parent_still_right(h, key)
    info = h.retrieve(key("before"))
    assert info is not None and bytes(info.view) == b"parent"
    assert not h.exists(key("child")), "the child's refused store reached the server"


FORK_AND_EXIT = '''
import os, sys
from maru import MaruConfig, MaruHandler
url, close_in_child = sys.argv[1], sys.argv[2] == "close"
h = MaruHandler(MaruConfig(server_url=url, pool_size=4 << 20, chunk_size_bytes=64 << 10))
h.store("fork-exit-before", b"before")
pid = os.fork()
if pid == 0:
    if close_in_child:
        h.close()
    sys.exit(0)  # the interpreter's own teardown, with the handler still referenced
_, status = os.waitpid(pid, 0)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
for i in range(100):
    h.store(f"fork-exit-{os.getpid()}-{i}", b"v%d" % i)
    assert bytes(h.retrieve(f"fork-exit-{os.getpid()}-{i}").view) == b"v%d" % i
assert not h.exists(f"fork-exit-{os.getpid()}-none")
assert h.healthcheck()
h.close()
print("parent fine")
'''


@pytest.mark.parametrize("how", ["exit", "close"])
def test_a_forked_child_leaving_through_interpreter_teardown_leaves_the_parent_working(cluster: Cluster, how: str) -> None:
    done = run_python(FORK_AND_EXIT, cluster.tcp_url, how, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "parent fine" in done.stdout
    assert "panic" not in done.stderr.lower() and "Exception" not in done.stderr, done.stderr


def test_reconnect_after_fork_gives_the_child_a_session_of_its_own(
    make_config: ConfigFactory, handlers: list[MaruHandler], key: Key
) -> None:
    h = MaruHandler(make_config(reconnect_after_fork=True))
    handlers.append(h)
    h.store(key("parent"), b"from-parent")
    parent_region = h.get_owned_region_ids()

    def child() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        seen["sees_parent_key"] = h.exists(key("parent"))
        info = h.retrieve(key("parent"))
        seen["parent_value"] = None if info is None else bytes(info.view).decode()
        h.store(key("child"), b"from-child")
        seen["own_regions"] = h.get_owned_region_ids()
        seen["connected"] = h.connected
        seen["exists_missing"] = h.exists(key("missing"))
        h.close()
        return seen

    seen = in_child(child)
    assert "raised" not in seen, seen
    assert seen["sees_parent_key"] is True and seen["parent_value"] == "from-parent"
    assert seen["connected"] is True and seen["exists_missing"] is False
    assert seen["own_regions"] and not set(seen["own_regions"]) & set(parent_region), (
        "the child must write into regions of its own session"
    )
    # The child's key is registered in its own session and visible to the parent.
    info = h.retrieve(key("child"))
    assert info is not None and bytes(info.view) == b"from-child"
    parent_still_right(h, key)
    assert h.get_owned_region_ids() == parent_region


def test_the_option_is_a_config_field() -> None:
    assert maru.MaruConfig().reconnect_after_fork is False
    with pytest.raises(maru.InvalidArgumentError, match="reconnect_after_fork"):
        maru.MaruConfig(reconnect_after_fork="yes")  # type: ignore[arg-type]
