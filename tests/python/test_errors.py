"""One error taxonomy: every kind of failure raises its own class under ``MaruError``, which
also derives from the built-in the documented API names; misused arguments are refused at
the call, with a message that names the argument."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import maru
from maru import AllocHandle, MaruConfig, MaruHandler, MemoryInfo, errors

from conftest import KIB, MIB, Cluster, ConfigFactory, free_port, wait_until
from fakeserver import FakeServer

Key = Callable[[str], str]

#: Each class, and the built-ins it must also be.
HIERARCHY: dict[type[Exception], tuple[type[BaseException], ...]] = {
    errors.InvalidArgumentError: (ValueError, TypeError),
    errors.InvalidKeyError: (errors.InvalidArgumentError, ValueError, TypeError),
    errors.PoolExhaustedError: (ValueError,),
    errors.PoolUnhealthyError: (ValueError,),
    errors.NotConnectedError: (RuntimeError,),
    errors.HandlerClosedError: (RuntimeError,),
    errors.ForkedHandlerError: (RuntimeError,),
    errors.MaruTimeoutError: (TimeoutError,),
    errors.ConnectFailedError: (ConnectionError,),
    errors.ServerBusyError: (errors.ConnectFailedError, ConnectionError),
    errors.ConnectionLostError: (ConnectionError,),
    errors.ServerLostError: (errors.ConnectionLostError, ConnectionError),
    errors.PermissionDeniedError: (PermissionError,),
    errors.ProtocolError: (),
    errors.MapFailedError: (OSError,),
    errors.WrongPoolError: (RuntimeError,),
    errors.ServerError: (RuntimeError,),
}


def test_one_hierarchy_with_the_documented_builtins() -> None:
    assert set(HIERARCHY) | {maru.MaruError} == {getattr(errors, n) for n in errors.__all__}
    for cls, bases in HIERARCHY.items():
        assert issubclass(cls, maru.MaruError) and issubclass(cls, RuntimeError), cls
        for b in bases:
            assert issubclass(cls, b), (cls, b)
        assert getattr(maru, cls.__name__) is cls, "exported from maru"
        e = cls("message")
        assert str(e) == "message" and e.code and e.op == ""
    # Every Maru error is a RuntimeError (as the package's errors always were); kinds that are
    # not the same failure are not caught by each other's built-in.
    assert issubclass(maru.MaruError, RuntimeError)
    assert not issubclass(errors.NotConnectedError, ValueError)
    assert not issubclass(errors.PoolExhaustedError, TimeoutError)


def raised(call: Callable[[], Any]) -> BaseException:
    try:
        call()
    except BaseException as e:  # the exception is what the test looks at
        return e
    pytest.fail("no exception")


# --- one test per kind -------------------------------------------------------------------


def test_pool_exhausted_is_one_class_on_every_path(make_config: ConfigFactory, handlers: list[MaruHandler], key: Key) -> None:
    h = MaruHandler(make_config(pool_size=2 * MIB, chunk_size_bytes=MIB, auto_expand=False))
    handlers.append(h)
    pages = [h.alloc(MIB) for _ in range(2)]
    e = raised(lambda: h.alloc(1))
    assert type(e) is errors.PoolExhaustedError and isinstance(e, ValueError), e
    assert "exhausted" in str(e) and e.op == "alloc"
    e = raised(lambda: h.store(key("full"), b"x"))
    assert type(e) is errors.PoolExhaustedError, e
    for p in pages:
        h.free(p)
    assert h.store(key("room again"), b"x")


def test_pool_exhausted_at_the_server_is_the_same_class(fresh_cluster: Cluster) -> None:
    # The pool has 256 MiB: a first region of 512 MiB cannot be had (connect takes none).
    h = MaruHandler(MaruConfig(server_url=fresh_cluster.tcp_url, pool_size=512 * MIB))
    e = raised(lambda: h.alloc(1))
    assert isinstance(e, errors.PoolExhaustedError) and e.code == "PoolExhausted", repr(e)
    e = raised(lambda: h.store("k", b"v"))
    assert isinstance(e, errors.PoolExhaustedError), repr(e)
    h.close()


def test_invalid_key(handler: MaruHandler) -> None:
    for bad, words in [("", "empty"), ("k" * 1025, "1025 bytes"), (b"", "empty"), (1.5, "float"), (None, "NoneType")]:
        e = raised(lambda: handler.exists(bad))
        assert type(e) is errors.InvalidKeyError, (bad, e)
        assert "key" in str(e) and words in str(e), str(e)
        assert isinstance(e, TypeError) and isinstance(e, ValueError)
    e = raised(lambda: handler.batch_exists(["ok", "k" * 2000]))
    assert type(e) is errors.InvalidKeyError
    assert handler.exists("k" * 1024) is False, "the longest key the protocol carries is fine"


def test_not_connected(make_config: ConfigFactory) -> None:
    h = MaruHandler(make_config(auto_connect=False))
    e = raised(lambda: h.exists("k"))
    assert type(e) is errors.NotConnectedError and isinstance(e, RuntimeError)
    assert "connect()" in str(e)


def test_closed(make_config: ConfigFactory) -> None:
    h = MaruHandler(make_config())
    h.close()
    for call in [lambda: h.exists("k"), lambda: h.alloc(1), h.connect]:
        e = raised(call)
        assert type(e) is errors.HandlerClosedError and isinstance(e, RuntimeError), e


def test_timeout(tmp_path: Path) -> None:
    region = tmp_path / "region"
    region.write_bytes(b"\0" * (2 * MIB))
    fake = FakeServer("stall", region=(region, 2 * MIB))
    try:
        h = MaruHandler(MaruConfig(server_url=fake.url, pool_size=2 * MIB, timeout_ms=300, eager_map=False))
        t = time.monotonic()
        e = raised(lambda: h.exists("k"))
        assert type(e) is errors.MaruTimeoutError and isinstance(e, TimeoutError), e
        assert time.monotonic() - t < 5 and "300 ms" in str(e)
        h.close()
    finally:
        fake.close()


def test_connect_failed() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    # auto_connect: no half-made handler.
    e = raised(lambda: MaruHandler(MaruConfig(server_url=url, timeout_ms=500)))
    assert type(e) is errors.ConnectFailedError and isinstance(e, ConnectionError), e
    assert "cannot connect" in str(e) and e.op == "connect"
    # An explicit connect() keeps the documented bool; the reason comes with later calls.
    h = MaruHandler(MaruConfig(server_url=url, timeout_ms=500, auto_connect=False))
    assert h.connect() is False and not h.connected
    e = raised(lambda: h.exists("k"))
    assert type(e) is errors.NotConnectedError and "last connect failed" in str(e)


def test_connection_lost(tmp_path: Path) -> None:
    region = tmp_path / "region"
    region.write_bytes(b"\0" * (2 * MIB))
    fake = FakeServer("stall", region=(region, 2 * MIB))
    h = MaruHandler(MaruConfig(server_url=fake.url, pool_size=2 * MIB, timeout_ms=2000, eager_map=False))
    # Every connection of the handler ends under it, and nothing listens any more.
    for conn in [*fake.conns, fake.listener]:
        conn.shutdown(socket.SHUT_RDWR)
    fake.close()
    e = raised(lambda: h.exists("k"))
    assert isinstance(e, errors.ConnectionLostError) and isinstance(e, ConnectionError), e
    h.close()


def test_server_lost(fresh_cluster: Cluster) -> None:
    h = MaruHandler(MaruConfig(server_url=fresh_cluster.tcp_url, pool_size=2 * MIB))
    fresh_cluster.procs[-1].kill()  # the metadata server
    fresh_cluster.procs[-1].wait(timeout=10)
    wait_until("the handler to notice", lambda: not h.connected)
    e = raised(lambda: h.exists("k"))
    assert type(e) is errors.ServerLostError and isinstance(e, errors.ConnectionLostError), e
    assert "close()" in str(e)
    h.close()


@pytest.mark.parametrize(
    ("code", "name", "cls"),
    [
        (12, "BadToken", errors.PermissionDeniedError),
        (10, "NotOwner", errors.PermissionDeniedError),
        (2, "UnsupportedVersion", errors.ProtocolError),
        (5, "NotHandshaken", errors.ProtocolError),
        (6, "InvalidArgument", errors.InvalidArgumentError),
        (7, "KeyTooLong", errors.InvalidKeyError),
        (13, "PoolExhausted", errors.PoolExhaustedError),
        (22, "PoolUnhealthy", errors.PoolUnhealthyError),
        (20, "Storage", errors.ServerError),
        (21, "Internal", errors.ServerError),
    ],
)
def test_server_refusals_by_code(tmp_path: Path, code: int, name: str, cls: type[Exception]) -> None:
    region = tmp_path / "region"
    region.write_bytes(b"\0" * (2 * MIB))
    fake = FakeServer("error", region=(region, 2 * MIB), error_code=code)
    try:
        h = MaruHandler(MaruConfig(server_url=fake.url, pool_size=2 * MIB, chunk_size_bytes=64 * KIB, eager_map=False))
        e = raised(lambda: h.exists("k"))
        assert type(e) is cls and e.code == name and e.op == "exists", repr(e)
        assert "fake failure" in str(e)
        h.close()
    finally:
        fake.close()


def test_map_failed(tmp_path: Path) -> None:
    fake = FakeServer("stall", region=(tmp_path / "no-such-region-file", 2 * MIB))
    try:
        h = MaruHandler(MaruConfig(server_url=fake.url, pool_size=2 * MIB, eager_map=False, timeout_ms=500))
        e = raised(lambda: h.alloc(1))
        assert type(e) is errors.MapFailedError and isinstance(e, OSError), repr(e)
        assert "No such file" in str(e)
        h.close()
    finally:
        fake.close()


def test_wrong_pool(fresh_cluster: Cluster, cluster: Cluster, tmp_path: Path) -> None:
    """A handler whose pool_path names another pool's file (the session cluster's pool), or a
    file with no pool header, maps nothing: WrongPoolError, and the resource manager's table
    is as it was. Its own pool under another name works."""

    def observe() -> tuple[int, int]:
        return fresh_cluster.rm_stats()["allocations"], fresh_cluster.server_stats()["keys"]

    ours = fresh_cluster.rm_stats()["pools"][0]["uuid"]
    before = observe()
    plain = tmp_path / "not-a-pool"
    with open(plain, "wb") as f:
        f.truncate(256 * MIB)
    for wrong, words in [(cluster.dir / "pool", "is pool UUID"), (plain, "no pool header")]:
        cfg = MaruConfig(server_url=fresh_cluster.tcp_url, pool_size=2 * MIB, chunk_size_bytes=64 * KIB, pool_path=str(wrong))
        h = MaruHandler(cfg)
        e = raised(lambda: h.store("k", data=b"value"))
        assert type(e) is errors.WrongPoolError and e.code == "WrongPool", repr(e)
        assert words in str(e) and str(wrong) in str(e) and ours in str(e), str(e)
        h.close()
        assert observe() == before
    own = fresh_cluster.dir / "cxl0"  # another name for the same memory (same file system)
    own.hardlink_to(fresh_cluster.dir / "pool")
    h = MaruHandler(MaruConfig(server_url=fresh_cluster.tcp_url, pool_size=2 * MIB, chunk_size_bytes=64 * KIB, pool_path=str(own)))
    h.store("k", data=b"value")
    assert h.retrieve("k") is not None
    h.close()


def test_server_busy(tmp_path: Path) -> None:
    import shutil

    from conftest import new_dir

    d = new_dir("busy")
    c = Cluster(d, pool_size=64 * MIB, server_args=["--max-clients", "1"]).start()
    try:
        a = MaruHandler(MaruConfig(server_url=c.tcp_url, pool_size=2 * MIB))
        e = raised(lambda: MaruHandler(MaruConfig(server_url=c.tcp_url, pool_size=2 * MIB)))
        assert type(e) is errors.ServerBusyError and e.code == "TooManyClients", repr(e)
        assert isinstance(e, errors.ConnectFailedError) and "--max-clients" in str(e)
        a.close()
        # The server frees the slot once it has seen the last of a's connections end.
        deadline = time.monotonic() + 10
        while True:
            try:
                MaruHandler(MaruConfig(server_url=c.tcp_url, pool_size=2 * MIB)).close()
                break
            except errors.ServerBusyError:
                assert time.monotonic() < deadline, "the slot never came back"
                time.sleep(0.02)
    finally:
        c.stop()
        shutil.rmtree(d, ignore_errors=True)


# --- arguments are checked at the call ---------------------------------------------------


def test_alloc_sizes(handler: MaruHandler) -> None:
    before = handler.allocator.num_allocated if handler.allocator else 0
    chunk = handler.get_chunk_size()
    for bad, words in [(0, "got 0"), (-1, "got -1"), (2**63, str(2**63)), (2**70, str(2**70)), (chunk + 1, f"got {chunk + 1}")]:
        e = raised(lambda: handler.alloc(bad))
        assert type(e) is errors.InvalidArgumentError, (bad, e)
        assert "size" in str(e) and words in str(e), str(e)
    for bad in [1.5, "1", None, True]:
        e = raised(lambda: handler.alloc(bad))  # type: ignore[arg-type]
        assert type(e) is errors.InvalidArgumentError and "size must be an int" in str(e), e
    after = handler.allocator.num_allocated if handler.allocator else 0
    assert after == before, "a refused alloc took no page"
    assert handler.alloc(chunk).size == chunk


def test_free_needs_a_handle(handler: MaruHandler) -> None:
    for bad in [None, 3, "handle"]:
        e = raised(lambda: handler.free(bad))  # type: ignore[arg-type]
        assert type(e) is errors.InvalidArgumentError and "free: handle" in str(e), e
    e = raised(lambda: handler.free(AllocHandle(None, 999999, 0, 1)))
    assert isinstance(e, ValueError), "an untracked page is a ValueError, as documented"


def test_store_takes_exactly_one_source(handler: MaruHandler, key: Key) -> None:
    page = handler.alloc(3)
    page.buf[:3] = b"abc"
    info = MemoryInfo(memoryview(b"xyz"))
    for kwargs, words in [
        (dict(data=b"x", handle=page), "not data and handle"),
        (dict(info=info, data=b"x"), "not info and data"),
        (dict(info=info, handle=page), "not info and handle"),
        (dict(info=page, data=b"x"), "not info and data"),
        (dict(handle=page, prefix=b"hdr"), "prefix"),
        (dict(info=page, prefix=b"hdr"), "prefix"),
        (dict(), "needs data, info or handle"),
        (dict(data=b""), "empty"),
        (dict(data=12), "store: data must be"),
        (dict(data=b"x", prefix=12), "store: prefix must be"),
    ]:
        e = raised(lambda: handler.store(key("one-source"), **kwargs))
        assert type(e) is errors.InvalidArgumentError, (kwargs, e)
        assert words in str(e), (kwargs, str(e))
    assert not handler.exists(key("one-source")), "no refused call stored anything"
    assert handler.store(key("one-source"), handle=page)


def test_storing_a_handle_twice(handler: MaruHandler, key: Key) -> None:
    page = handler.alloc(2)
    page.buf[:2] = b"hi"
    assert handler.store(key("twice"), handle=page)
    assert handler.store(key("twice"), handle=page), "the same page under the same key: done already"
    e = raised(lambda: handler.store(key("other"), handle=page))
    assert type(e) is errors.InvalidArgumentError and "another key" in str(e), e
    info = handler.retrieve(key("twice"))
    assert info is not None and bytes(info.view) == b"hi"


def test_batch_store_arguments(handler: MaruHandler, key: Key) -> None:
    page = handler.alloc(1)
    for call, words in [
        (lambda: handler.batch_store([key("a")], [b"x"], handles=[page]), "not both"),
        (lambda: handler.batch_store([key("a"), key("b")], [b"x"]), "do not match"),
        (lambda: handler.batch_store([key("a")], [page], [b"hdr"]), "prefixes[0]"),
        (lambda: handler.batch_store([key("a")], [b""]), "infos[0] is empty"),
        (lambda: handler.batch_store([key("a")], [7]), "infos[0] must be"),
        (lambda: handler.batch_store([key("a")], handles=[None]), "handles[0]"),
        (lambda: handler.batch_store(5, [b"x"]), "keys must be an iterable"),
    ]:
        e = raised(call)
        assert isinstance(e, errors.InvalidArgumentError), (words, e)
        assert words in str(e), (words, str(e))
    assert not handler.exists(key("a"))


def test_config_errors_are_invalid_arguments() -> None:
    e = raised(lambda: MaruConfig(pool_size=0))
    assert type(e) is errors.InvalidArgumentError and "pool_size" in str(e)
    e = raised(lambda: MaruHandler(object()))  # type: ignore[arg-type]
    assert type(e) is errors.InvalidArgumentError and "config has no server_url" in str(e)
