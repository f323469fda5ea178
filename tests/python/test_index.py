"""Reads from the metadata server's key index in shared memory, from Python, against the real
daemons: exists / batch_exists / prefix_len without a round trip, retrieve_into and
batch_retrieve_into into writable buffers, typed errors, and a full index refusing a store.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest

from maru import MaruConfig, MaruHandler
from maru.errors import InvalidArgumentError, PoolExhaustedError
from conftest import KIB, MIB, Cluster, new_dir


def value(tag: int, size: int) -> bytes:
    return bytes((tag + i) % 251 for i in range(size))


def test_reads_come_from_the_index(handler: MaruHandler, key: Callable[[str], str]) -> None:
    assert handler.reads_index()
    chunk = handler.get_chunk_size()
    ks = [key(f"k{i}") for i in range(4)]
    for i, k in enumerate(ks[:3]):
        assert handler.store(k, data=memoryview(value(i, chunk)))
    assert handler.exists(ks[0]) and not handler.exists(ks[3])
    assert handler.batch_exists(ks) == [True, True, True, False]
    assert handler.prefix_len(ks) == 3
    assert handler.prefix_len([ks[3], ks[0]]) == 0

    buf = bytearray(chunk)
    assert handler.retrieve_into(ks[1], buf) == chunk
    assert bytes(buf) == value(1, chunk)
    assert bytes(buf) != value(2, chunk)  # negative control
    assert handler.retrieve_into(ks[3], buf) is None

    bufs = [bytearray(chunk) for _ in ks]
    assert handler.batch_retrieve_into(ks, bufs) == [chunk, chunk, chunk, None]
    assert [bytes(b) for b in bufs[:3]] == [value(i, chunk) for i in range(3)]
    # Any writable buffer: a memoryview slice of a larger bytearray.
    big = bytearray(2 * chunk)
    assert handler.retrieve_into(ks[2], memoryview(big)[chunk:]) == chunk
    assert bytes(big[chunk:]) == value(2, chunk)

    assert handler.delete(ks[0])
    assert not handler.exists(ks[0])
    assert handler.retrieve_into(ks[0], buf) is None


def test_copy_out_errors_are_typed(handler: MaruHandler, key: Callable[[str], str]) -> None:
    chunk = handler.get_chunk_size()
    k = key("e")
    assert handler.store(k, data=memoryview(value(0, chunk)))
    with pytest.raises(InvalidArgumentError, match="writable"):
        handler.retrieve_into(k, bytes(chunk))
    with pytest.raises(InvalidArgumentError, match="buffer has 10 bytes"):
        handler.retrieve_into(k, bytearray(10))
    with pytest.raises(InvalidArgumentError, match="2 keys but 1 buffers"):
        handler.batch_retrieve_into([k, k], [bytearray(chunk)])
    with pytest.raises(InvalidArgumentError):
        handler.retrieve_into(k, 42)  # type: ignore[arg-type]


@pytest.fixture
def tiny_index_cluster() -> Iterator[Cluster]:
    d = new_dir("index")
    c = Cluster(d, pool_size=64 * MIB, server_args=["--index", str(d / "keys.index"), "--index-keys", "16"]).start()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_a_full_index_refuses_a_store(tiny_index_cluster: Cluster) -> None:
    h = MaruHandler(MaruConfig(server_url=tiny_index_cluster.unix_url, pool_size=4 * MIB, chunk_size_bytes=4 * KIB))
    try:
        stored = 0
        with pytest.raises(PoolExhaustedError, match="index"):
            while stored < 64:
                h.store(f"k{stored}", data=memoryview(value(stored, 4 * KIB)))
                stored += 1
        assert 0 < stored < 64
        assert not h.exists(f"k{stored}")
        assert h.exists("k0")
    finally:
        h.close()
