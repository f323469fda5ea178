"""Views hold their page (docs/ARCHITECTURE.md §8), from Python, against the real daemons.

While any memoryview (or tensor) over a retrieved view lives, its page is not reused, even
after its key is deleted and its owner stores again; once the last one is released, the page
goes back to its owner. Across processes too: a reader's read-only view keeps the writer's
bytes.
"""

from __future__ import annotations

import gc
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from maru import MaruConfig, MaruHandler
from conftest import KIB, MIB, Cluster, running_cluster, wait_until

CHUNK = 64 * KIB


@pytest.fixture
def one_region_cluster() -> Iterator[Cluster]:
    """A pool with room for exactly one 2 MiB region (32 pages of 64 KiB)."""
    with running_cluster("holds", pool_size=2 * MIB) as c:
        yield c


def owner_config(url: str) -> MaruConfig:
    return MaruConfig(server_url=url, pool_size=2 * MIB, chunk_size_bytes=CHUNK, auto_expand=False)


def stores(h: MaruHandler, key: str) -> bool:
    """Whether `key` could be stored now (False while the pool is full)."""
    try:
        return h.store(key, data=b"x")
    except ValueError:
        return False


def fill(h: MaruHandler, prefix: str) -> int:
    """Stores and pins keys until the pool is full; returns how many fit.

    Pinned, so that a store on the full pool cannot make room by evicting them: what is left
    to take is exactly the pages nobody holds.
    """
    limit = 4 * h.get_region_page_count(h.get_owned_region_ids()[0]) if h.get_owned_region_ids() else 1024
    for n in range(limit):
        key = f"{prefix}-{n}"
        try:
            h.store(key, data=b"B" * 4)
        except ValueError:
            return n
        assert h.pin(key)
    raise AssertionError(f"{limit} stores never filled the pool")


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_view_outlives_its_key_and_its_page_comes_back_after(one_region_cluster: Cluster, transport: str) -> None:
    h = MaruHandler(owner_config(one_region_cluster.url(transport)))
    try:
        assert h.store("a", data=b"AAAA")
        info = h.retrieve("a")
        assert info is not None and info.generation
        assert h.delete("a")
        stored = fill(h, "b")
        assert bytes(info.view) == b"AAAA", "the held page was reused"
        assert stored == h.get_region_page_count(h.get_owned_region_ids()[0]) - 1
        view = info.view
        del info
        gc.collect()
        # A memoryview over the view still holds the page.
        with pytest.raises(ValueError, match="exhausted"):
            h.store("c", data=b"CCCC")
        assert bytes(view) == b"AAAA"
        view.release()
        del view
        assert h.store("c", data=b"CCCC"), "the released page came back to its owner"
        again = h.retrieve("c")
        assert again is not None and bytes(again.view) == b"CCCC"
    finally:
        h.close()


def test_free_of_a_stored_handle_waits_for_the_view(one_region_cluster: Cluster) -> None:
    url = one_region_cluster.tcp_url
    with MaruHandler(owner_config(url)) as owner, MaruHandler(MaruConfig(server_url=url, chunk_size_bytes=CHUNK)) as reader:
        handle = owner.alloc(4)
        handle.buf[:4] = b"MINE"
        assert owner.store("k", handle=handle)
        info = reader.retrieve("k")
        assert info is not None
        owner.free(handle)
        assert not owner.exists("k")
        fill(owner, "other")
        assert bytes(info.view) == b"MINE"
        del info
        gc.collect()
        # The release travels with the reader's next request or its watcher's next tick.
        wait_until("the page to come back once the view was gone", lambda: stores(owner, "late"), timeout=10)


def test_batch_views_hold_their_pages_until_released(one_region_cluster: Cluster) -> None:
    h = MaruHandler(owner_config(one_region_cluster.tcp_url))
    try:
        keys = [f"k{i}" for i in range(4)]
        for i, k in enumerate(keys):
            assert h.store(k, data=bytes([65 + i]) * 4)
        infos = h.batch_retrieve(keys)
        assert all(h.delete(k) for k in keys)
        fill(h, "filler")
        assert [bytes(i.view) for i in infos if i is not None] == [b"AAAA", b"BBBB", b"CCCC", b"DDDD"]
        del infos
        gc.collect()
        wait_until("the pages to come back", lambda: stores(h, "after"), timeout=10)
    finally:
        h.close()


READER = r"""
import hashlib, sys
from maru import MaruConfig, MaruHandler

url, key = sys.argv[1], sys.argv[2]
h = MaruHandler(MaruConfig(server_url=url, chunk_size_bytes=65536))
info = h.retrieve(key)
assert info is not None and info.view.readonly
print(hashlib.sha256(info.view).hexdigest(), flush=True)
sys.stdin.readline()  # the writer deletes the key and fills the pool meanwhile
print(hashlib.sha256(info.view).hexdigest(), flush=True)
"""


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_another_processes_view_keeps_the_bytes_after_delete_and_reuse(one_region_cluster: Cluster, transport: str) -> None:
    url = one_region_cluster.url(transport)
    a = MaruHandler(owner_config(url))
    try:
        data = os.urandom(CHUNK)
        assert a.store("shared", data=data)
        b = subprocess.Popen(
            [sys.executable, "-c", READER, url, "shared"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert b.stdout is not None and b.stdin is not None
            before = b.stdout.readline().strip()
            assert before == hashlib.sha256(data).hexdigest(), b.stderr.read() if b.stderr else ""
            assert a.delete("shared")
            # C, a third handler, and A itself write everything the pool has.
            with MaruHandler(MaruConfig(server_url=url, pool_size=2 * MIB, chunk_size_bytes=CHUNK)) as c:
                with pytest.raises(ValueError):
                    c.store("c", data=b"C" * CHUNK)  # no room for a region of its own
            fill(a, "reuse")
            b.stdin.write("go\n")
            b.stdin.flush()
            after = b.stdout.readline().strip()
            assert after == before, "another process's view changed under it"
            assert b.wait(timeout=30) == 0
        finally:
            if b.poll() is None:
                b.kill()
                b.wait()
        # B is gone: its hold went with its session, and A gets the page back.
        wait_until("B's page to come back", lambda: stores(a, "after-b"), timeout=10)
    finally:
        a.close()


def test_a_forked_childs_drop_of_an_inherited_view_leaves_the_parents_hold(one_region_cluster: Cluster) -> None:
    url = one_region_cluster.unix_url
    with MaruHandler(owner_config(url)) as owner, MaruHandler(MaruConfig(server_url=url, chunk_size_bytes=CHUNK)) as reader:
        # The reader maps the owner's region with its first view; the next is held in its lane.
        assert owner.store("first", data=b"FFFF")
        first = reader.retrieve("first")
        assert first is not None
        del first
        assert owner.store("a", data=b"AAAA")
        info = reader.retrieve("a")
        assert info is not None and bytes(info.view) == b"AAAA"
        pid = os.fork()
        if pid == 0:
            # The child's copy of the view goes: the lane is shared memory, the claim the parent's.
            del info
            gc.collect()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert owner.delete("a") and owner.delete("first")
        fill(owner, "b")
        assert bytes(info.view) == b"AAAA", "the parent's view lost its page to the child's drop"
