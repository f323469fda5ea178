"""Every MaruHandler method and property against the real daemons (TCP and Unix socket),
including the error paths."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

import maru
from maru import AllocHandle, MaruConfig, MaruError, MaruHandler, MemoryInfo
from conftest import KIB, MIB, Cluster, ConfigFactory, free_port
from fakeserver import FakeServer

Key = Callable[[str], str]


def test_alloc_store_retrieve_zero_copy(handler: MaruHandler, key: Key) -> None:
    data = b"hello world"
    handle = handler.alloc(size=len(data))
    assert isinstance(handle, AllocHandle)
    assert isinstance(handle.buf, memoryview) and not handle.buf.readonly
    assert len(handle.buf) == handle.size == len(data)
    handle.buf[: len(data)] = data
    assert handler.store(key=key("a"), handle=handle) is True
    result = handler.retrieve(key=key("a"))
    assert isinstance(result, MemoryInfo)
    assert bytes(result.view) == data
    assert (result.region_id, result.page_index) == (handle.region_id, handle.page_index)
    assert not result.view.readonly, "own pages are writable"
    # Same memory, not a copy: a write through the handle shows in the retrieved view.
    handle.buf[0:5] = b"HELLO"
    assert bytes(result.view[:5]) == b"HELLO"
    assert handler.retrieve(key("missing")) is None


def test_store_copy_forms_and_prefix(handler: MaruHandler, key: Key) -> None:
    assert handler.store(key("mv"), memoryview(b"from memoryview"))
    assert handler.store(key("info"), MemoryInfo(memoryview(b"from info")))
    assert handler.store(key("data"), data=memoryview(b"from data"))
    assert handler.store(key("bytes"), b"plain bytes", b"HDR|")
    assert handler.store(key("kw"), data=bytearray(b"payload"), prefix=b"meta:")
    for k, want in [
        ("mv", b"from memoryview"),
        ("info", b"from info"),
        ("data", b"from data"),
        ("bytes", b"HDR|plain bytes"),
        ("kw", b"meta:payload"),
    ]:
        got = handler.retrieve(key(k))
        assert got is not None and bytes(got.view) == want, k


def test_large_copy_and_int_keys(handler: MaruHandler) -> None:
    big = os.urandom(64 * KIB - 16)  # > 64 KiB with the prefix: the GIL-released path
    k = int.from_bytes(os.urandom(6), "little")
    assert handler.store(key=k, data=big, prefix=b"0123456789abcdef")
    assert handler.exists(key=k) and handler.exists(key=str(k))
    got = handler.retrieve(key=k)
    assert got is not None and bytes(got.view) == b"0123456789abcdef" + big
    assert handler.delete(key=k)


def test_deduplication_keeps_the_first_value_and_frees_the_page(handler: MaruHandler, key: Key) -> None:
    assert handler.store(key("dup"), b"first")
    alloc = handler.allocator
    assert alloc is not None
    before = alloc.num_allocated
    assert handler.store(key("dup"), b"second") is True
    h = handler.alloc(6)
    h.buf[:] = b"third!"
    assert handler.store(key("dup"), handle=h) is True
    assert alloc.num_allocated == before, "the duplicate's pages were freed"
    got = handler.retrieve(key("dup"))
    assert got is not None and bytes(got.view) == b"first"
    with pytest.raises(ValueError):
        handler.free(h)  # already freed by the deduplicated store


def test_exists_delete_pin_unpin(handler: MaruHandler, key: Key) -> None:
    assert not handler.exists(key("k"))
    handler.store(key("k"), b"v")
    assert handler.exists(key("k"))
    assert handler.pin(key("k")) is True
    assert handler.pin(key("absent")) is False
    assert handler.delete(key("k")) is False, "pinned keys stay"
    assert handler.exists(key("k"))
    assert handler.unpin(key("k")) is True
    assert handler.unpin(key("k")) is False
    assert handler.delete(key("k")) is True
    assert handler.delete(key("k")) is False
    assert not handler.exists(key("k"))


def test_batches(handler: MaruHandler, key: Key) -> None:
    h = handler.alloc(4)
    h.buf[:] = b"zero"
    keys = [key(f"b{i}") for i in range(4)]
    infos: list[Any] = [MemoryInfo(memoryview(b"info")), memoryview(b"mview"), h, b"bytes"]
    assert handler.batch_store(keys, infos, [None, b"P:", None, b"Q:"]) == [True] * 4
    got = handler.batch_retrieve(keys + [key("none")])
    assert [None if g is None else bytes(g.view) for g in got] == [b"info", b"P:mview", b"zero", b"Q:bytes", None]
    assert handler.batch_exists(keys + [key("none")]) == [True] * 4 + [False]
    assert handler.batch_pin(keys[:2] + [key("none")]) == [True, True, False]
    assert handler.batch_unpin(keys[:3]) == [True, True, False]
    assert handler.batch_store(keys[:2], [b"x", b"y"]) == [True, True], "dedup reports success"
    with pytest.raises(ValueError):
        handler.batch_store(keys[:2], [b"x"])
    with pytest.raises(ValueError):
        handler.batch_store(keys[:2], [b"x", b"y"], [b"only one"])
    # Over the 4096-per-message protocol limit: several round trips, same results.
    many = [key(f"m{i}") for i in range(4100)]
    assert handler.batch_exists(many) == [False] * 4100


def test_batch_store_alloc_handles_like_lmcache(handler: MaruHandler, key: Key) -> None:
    handles = [handler.alloc(8) for _ in range(16)]
    for i, h in enumerate(handles):
        h.buf[:] = i.to_bytes(8, "little")
    keys = [key(f"h{i}") for i in range(16)]
    assert handler.batch_store(keys, handles) == [True] * 16
    for i, info in enumerate(handler.batch_retrieve(keys)):
        assert info is not None and int.from_bytes(info.view, "little") == i
        assert info.page_index == handles[i].page_index


def test_free(handler: MaruHandler, key: Key) -> None:
    handler.free(handler.alloc(10))  # the first alloc brings the first region
    alloc = handler.allocator
    assert alloc is not None
    before = alloc.num_allocated
    h = handler.alloc(10)
    assert alloc.num_allocated == before + 1
    handler.free(h)
    assert alloc.num_allocated == before
    with pytest.raises(ValueError):
        handler.free(h)
    # A handle the caller builds from region id and page index (LMCache does).
    h2 = handler.alloc(10)
    handler.free(AllocHandle(None, h2.region_id, h2.page_index, 10))
    assert alloc.num_allocated == before
    with pytest.raises(ValueError):
        handler.free(AllocHandle(None, 987654, 0, 1))
    # Free after store (eviction) takes the key away too.
    h3 = handler.alloc(3)
    h3.buf[:] = b"abc"
    handler.store(key("evict"), handle=h3)
    handler.free(h3)
    assert not handler.exists(key("evict"))


def test_argument_errors(handler: MaruHandler, key: Key) -> None:
    chunk = handler.get_chunk_size()
    with pytest.raises(ValueError):
        handler.alloc(chunk + 1)
    with pytest.raises(ValueError):
        handler.alloc(-1)
    with pytest.raises(ValueError):
        handler.store(key("big"), b"x" * (chunk + 1))
    with pytest.raises(ValueError):
        handler.store(key("big"), b"x" * chunk, prefix=b"p")
    with pytest.raises(ValueError):
        handler.store(key("nothing"))
    with pytest.raises(ValueError):
        handler.exists("k" * 2000)
    with pytest.raises(TypeError):
        handler.exists(3.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        handler.store(key("obj"), object())  # type: ignore[arg-type]


def test_pool_exhausted_without_auto_expand(make_config: ConfigFactory, handlers: list[MaruHandler]) -> None:
    h = MaruHandler(make_config(pool_size=4 * 64 * KIB, auto_expand=False))
    handlers.append(h)
    assert h.get_owned_region_ids() == [], "connect takes no region"
    held = [h.alloc(1)]
    pages = h.get_region_page_count(h.get_owned_region_ids()[0])
    assert pages is not None and pages >= 4
    held += [h.alloc(1) for _ in range(pages - 1)]
    with pytest.raises(ValueError, match="exhausted"):
        h.alloc(1)
    with pytest.raises(ValueError):
        h.store("exhausted-store", b"x")
    h.free(held[0])
    h.alloc(1)


def test_auto_expand_and_region_callbacks(make_config: ConfigFactory, handlers: list[MaruHandler]) -> None:
    h = MaruHandler(make_config(pool_size=2 * MIB, expand_size=2 * MIB))
    handlers.append(h)
    seen: list[tuple[int, int]] = []
    h.set_on_region_added(lambda rid, pages: seen.append((rid, pages)))
    assert seen == [], "no region before the first alloc"
    held = [h.alloc(1)]
    first = h.get_owned_region_ids()
    assert len(first) == 1 and seen == [(first[0], h.get_region_page_count(first[0]))], "reported"
    pages = seen[0][1]
    held += [h.alloc(1) for _ in range(pages)]
    ids = h.get_owned_region_ids()
    assert len(ids) == 2 and len(seen) == 2 and seen[1][0] == ids[1]
    assert held[-1].region_id == ids[1]
    h.set_on_region_added(None)
    for x in held:
        h.free(x)
    mgr = h.owned_region_manager
    assert mgr is not None
    st = mgr.get_stats()
    assert st["num_regions"] == 2 and st["total_allocated_pages"] == 0


def test_introspection_and_compat_properties(handler: MaruHandler, key: Key) -> None:
    assert handler.connected is True
    assert isinstance(handler.instance_id, str) and handler.instance_id
    assert handler.get_chunk_size() == 64 * KIB
    handler.free(handler.alloc(1))  # the first alloc brings the first region
    ids = handler.get_owned_region_ids()
    assert len(ids) == 1
    ph = handler.pool_handle
    assert ph is not None and ph.region_id == ids[0]
    assert ph.length >= 4 * MIB and isinstance(ph.auth_token, bytes) and len(ph.auth_token) == 32
    a = handler.allocator
    assert a is not None
    assert a.chunk_size == 64 * KIB and a.page_count == handler.get_region_page_count(ids[0])
    free_before = a.num_free_pages
    h = handler.alloc(1)
    assert a.num_free_pages == free_before - 1 and a.num_allocated >= 1
    assert a.get_stats()["page_count"] == a.page_count
    mgr = handler.owned_region_manager
    assert mgr is not None
    assert mgr.get_region_ids() == ids and mgr.get_first_region_id() == ids[0]
    assert mgr.is_owned(ids[0]) and not mgr.is_owned(ids[0] + 10_000)
    ms = mgr.get_stats()
    for field in ("num_regions", "total_pool_size", "total_page_count", "total_free_pages", "total_allocated_pages", "regions"):
        assert field in ms
    # A writable view over our own region, None outside it or for unknown regions.
    v = handler.get_buffer_view(ids[0], h.page_index * 64 * KIB, 1)
    assert v is not None and not v.readonly
    assert handler.get_buffer_view(ids[0], ph.length, 1) is None
    assert handler.get_buffer_view(123456789, 0, 1) is None
    assert handler.get_region_page_count(123456789) is None
    handler.free(h)
    assert handler.healthcheck() is True


def test_get_stats_shape(handler: MaruHandler, key: Key) -> None:
    handler.store(key("s"), b"12345")
    st = handler.get_stats()
    assert st["kv_manager"]["total_entries"] >= 1 and st["kv_manager"]["total_size"] >= 5
    am = st["allocation_manager"]
    assert am["num_allocations"] >= 1 and am["total_allocated"] >= 4 * MIB and am["active_clients"] >= 1
    sr = st["store_regions"]
    assert sr["num_regions"] == 1 and sr["total_allocated_pages"] >= 1
    assert st["allocator"]["page_count"] == sr["regions"][0]["page_count"]
    assert st["server"]["pools"], "the server reports the resource manager's pools"


def test_not_connected_and_closed_raise_runtime_error(make_config: ConfigFactory, key: Key) -> None:
    h = MaruHandler(make_config(auto_connect=False))
    assert h.connected is False
    assert h.pool_handle is None and h.allocator is None and h.owned_region_manager is None
    assert h.get_owned_region_ids() == []
    assert h.healthcheck() is False
    calls: list[Callable[[], Any]] = [
        lambda: h.alloc(1),
        lambda: h.store(key("x"), b"x"),
        lambda: h.retrieve(key("x")),
        lambda: h.exists(key("x")),
        lambda: h.delete(key("x")),
        lambda: h.pin(key("x")),
        lambda: h.unpin(key("x")),
        lambda: h.get_stats(),
        lambda: h.batch_exists([key("x")]),
        lambda: h.batch_retrieve([key("x")]),
        lambda: h.batch_store([key("x")], [b"x"]),
        lambda: h.batch_pin([key("x")]),
        lambda: h.batch_unpin([key("x")]),
        lambda: h.free(AllocHandle(None, 1, 0, 1)),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="not connected"):
            call()
    assert h.connect() is True and h.connected
    assert h.connect() is True, "connect is idempotent"
    h.close()
    assert h.connected is False
    for call in calls:
        with pytest.raises(RuntimeError, match="closed"):
            call()
    with pytest.raises(RuntimeError, match="closed"):
        h.connect()
    h.close()  # idempotent


def test_connect_failure_returns_false_with_the_reason(make_config: ConfigFactory) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(maru.ConnectFailedError, match="refused"):
        MaruHandler(make_config(server_url=url, timeout_ms=500))
    h = MaruHandler(make_config(server_url=url, timeout_ms=500, auto_connect=False))
    assert h.connected is False
    assert h.connect() is False
    with pytest.raises(RuntimeError, match="refused"):
        h.exists("k")


def test_context_manager_and_auto_connect(make_config: ConfigFactory, key: Key) -> None:
    with MaruHandler(make_config()) as h:
        assert h.connected
        h.store(key("cm"), b"x")
    assert not h.connected
    with pytest.raises(RuntimeError):
        h.exists(key("cm"))
    lazy = MaruHandler(make_config(auto_connect=False))
    assert not lazy.connected
    with lazy as h2:
        assert h2 is lazy and not h2.connected, "auto_connect=False: the context does not connect"
        assert h2.connect()
    assert not lazy.connected


def test_handlers_sharing_an_instance_id_are_separate_sessions(
    make_config: ConfigFactory, handlers: list[MaruHandler], key: Callable[[str], str]
) -> None:
    a = MaruHandler(make_config(instance_id="shared-id-test"))
    handlers.append(a)
    b = MaruHandler(make_config(instance_id="shared-id-test"))
    handlers.append(b)
    assert a.connected and b.connected, "an instance id is a label, not a lock"
    assert b.store(key("from-b"), b"B")
    assert a.pin(key("from-b"))
    assert not b.unpin(key("from-b")), "a's pin is not b's"
    b.close()
    assert a.delete_status(key("from-b")) == "pinned", "a's pin outlives b's session"
    assert a.unpin(key("from-b")) and a.delete(key("from-b"))


def test_server_errors_become_maru_error(tmp_path: Any) -> None:
    region = tmp_path / "region"
    with open(region, "wb") as f:
        f.truncate(2 * MIB)
    fake = FakeServer("error", region=(region, 2 * MIB))
    try:
        h = MaruHandler(maru.MaruConfig(server_url=fake.url, pool_size=2 * MIB, chunk_size_bytes=64 * KIB, eager_map=False))
        assert h.connected
        with pytest.raises(MaruError) as e:
            h.exists("k")
        assert e.value.code == "Internal" and "fake failure" in str(e.value)
        with pytest.raises(MaruError):
            h.store("k", b"v")
        assert h.allocator is not None and h.allocator.num_allocated == 0, "failed store freed its page"
        h.close()
    finally:
        fake.close()


def test_views_survive_close(make_config: ConfigFactory, key: Key) -> None:
    h = MaruHandler(make_config())
    h.store(key("v"), b"survivor" * 100)
    info = h.retrieve(key("v"))
    handle = h.alloc(16)
    region_view = h.get_buffer_view(h.get_owned_region_ids()[0], 0, 64)
    h.close()
    assert info is not None and bytes(info.view) == b"survivor" * 100
    handle.buf[:4] = b"safe"
    assert bytes(handle.buf[:4]) == b"safe"
    assert region_view is not None and len(bytes(region_view)) == 64


def test_cluster_transport_variants(cluster: Cluster, make_config: ConfigFactory, key: Key) -> None:
    with MaruHandler(make_config(server_url=cluster.unix_url)) as u, MaruHandler(make_config()) as t:
        u.store(key("uds"), b"via unix socket")
        got = t.retrieve(key("uds"))
        assert got is not None and bytes(got.view) == b"via unix socket"
        assert got.view.readonly, "another instance's page is read-only"
        with pytest.raises(TypeError):
            got.view[0:1] = b"X"


@pytest.mark.parametrize("busy_poll", [True, False])
def test_both_reply_waits_work_on_both_transports(
    cluster: Cluster, make_config: ConfigFactory, key: Key, busy_poll: bool
) -> None:
    for url in (cluster.unix_url, cluster.tcp_url):
        with MaruHandler(make_config(server_url=url, busy_poll=busy_poll)) as h:
            k = key(f"wait-{url[:3]}")
            assert h.store(k, b"w" * 100)
            for _ in range(200):
                got = h.retrieve(k)
                assert got is not None and bytes(got.view) == b"w" * 100
                assert h.exists(k)
                assert not h.exists(k + "-missing")


def test_a_config_object_without_maru_extensions_is_accepted(make_config: ConfigFactory, key: Key) -> None:
    class OriginalConfig:
        """Only the original Maru's fields, as another package's config object would have."""

        def __init__(self, c: Any) -> None:
            for name in (
                "server_url",
                "instance_id",
                "pool_size",
                "chunk_size_bytes",
                "auto_connect",
                "timeout_ms",
                "use_async_rpc",
                "max_inflight",
                "eager_map",
                "auto_expand",
                "expand_size",
            ):
                setattr(self, name, getattr(c, name))

    with MaruHandler(OriginalConfig(make_config())) as h:  # type: ignore[arg-type]
        assert h.store(key("orig"), b"x")
        assert h.exists(key("orig"))


def test_write_behind_store_flush_and_dedup(make_config: ConfigFactory, handlers: list[MaruHandler], key: Key) -> None:
    w = MaruHandler(make_config(write_behind=True))
    handlers.append(w)
    r = MaruHandler(make_config())
    handlers.append(r)
    keys = [key(f"wb{i}") for i in range(50)]
    for _ in range(2):  # 100 stores: more than the 64 registrations in flight
        for i, k in enumerate(keys):
            assert w.store(k, data=bytes([i]) * 1000) is True
    # Its own reads wait for its registrations; others see them after flush().
    got = w.retrieve(keys[-1])
    assert got is not None and bytes(got.view) == bytes([49]) * 1000
    w.flush()
    assert all(r.batch_exists(keys))
    # Every key was stored twice: the second pages went back, the first values stayed.
    assert w.get_stats()["store_regions"]["total_allocated_pages"] == len(keys)
    first = r.retrieve(keys[0])
    assert first is not None and bytes(first.view) == bytes([0]) * 1000
    # Without write-behind flush() has nothing to do.
    r.flush()


def test_write_behind_failure_is_reported_not_lost(fresh_cluster: Cluster, key: Key) -> None:
    w = MaruHandler(
        MaruConfig(server_url=fresh_cluster.tcp_url, pool_size=4 * MIB, chunk_size_bytes=64 * KIB, write_behind=True)
    )
    assert w.store(key("before"), data=b"x") and w.flush() is None
    fresh_cluster.stop()
    # With the server gone a store fails at once, or its failure comes from flush().
    failures = 0
    try:
        w.store(key("after"), data=b"y")
    except (MaruError, RuntimeError, TimeoutError):
        failures += 1
    try:
        w.flush()
    except (MaruError, RuntimeError, TimeoutError):
        failures += 1
    assert failures >= 1, "a store the server never saw was reported as stored"
    w.close()


@pytest.mark.parametrize("use_async_rpc", [True, False])
def test_threads_of_one_handler_get_their_own_replies(
    make_config: ConfigFactory, handlers: list[MaruHandler], transport: str, cluster: Cluster, key: Key, use_async_rpc: bool
) -> None:
    """Pipelined on one shared connection (the waits release the GIL) or a connection each:
    every thread's calls get their own answers."""
    h = MaruHandler(make_config(server_url=cluster.url(transport), use_async_rpc=use_async_rpc))
    handlers.append(h)
    keys = [key(f"mux-{i}") for i in range(16)]
    for i, k in enumerate(keys):
        assert h.store(k, bytes([i]) * 100)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for n in range(150):
                i = (t * 5 + n) % len(keys)
                view = h.retrieve(keys[i])
                assert view is not None and bytes(view.view) == bytes([i]) * 100
                assert h.pin(keys[i]) and h.unpin(keys[i])
                assert not h.pin(key(f"missing-{t}-{n}"))
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads), "a thread hangs"
    assert errors == []
