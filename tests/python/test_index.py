"""Reads from the metadata server's key index in shared memory, from Python, against the real
daemons: exists / batch_exists / prefix_len without a round trip, retrieve_into and
batch_retrieve_into into writable buffers, typed errors, and a full index refusing a store.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator

import pytest

from maru import MaruConfig, MaruHandler
from maru.errors import InvalidArgumentError, InvalidKeyError, PoolExhaustedError
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


def test_batches_take_any_iterable_of_any_key_form(handler: MaruHandler, key: Callable[[str], str]) -> None:
    chunk = handler.get_chunk_size()
    s, b = key("s"), key("b").encode()
    n = int.from_bytes(key("n").encode()[:6], "little")  # an int key: its decimal string
    for i, k in enumerate((s, b, n)):
        assert handler.store(k, data=memoryview(value(i, chunk)))
    missing = key("missing")
    expect = [True, True, True, False]
    assert handler.batch_exists([s, b, n, missing]) == expect
    assert handler.batch_exists((s, b, n, missing)) == expect
    assert handler.batch_exists(k for k in [s, b, n, missing]) == expect
    assert handler.batch_exists([str(n).encode(), s.encode()]) == [True, True], "the same keys as bytes"
    assert handler.batch_exists([s + "x", b + b"x"]) == [False, False], "negative control"

    bufs = (bytearray(chunk), bytearray(chunk), bytearray(chunk), bytearray(chunk))
    got = handler.batch_retrieve_into(iter([s, b, n, missing]), bufs)
    assert got == [chunk, chunk, chunk, None]
    assert [bytes(x) for x in bufs[:3]] == [value(i, chunk) for i in range(3)]
    assert handler.batch_retrieve_into([], []) == []


def test_batch_argument_errors_are_typed(handler: MaruHandler, key: Callable[[str], str]) -> None:
    chunk = handler.get_chunk_size()
    k = key("e")
    assert handler.store(k, data=memoryview(value(0, chunk)))
    with pytest.raises(InvalidArgumentError, match=r"buffers\[1\] must be a writable .* not bytes"):
        handler.batch_retrieve_into([k, k], [bytearray(chunk), bytes(chunk)])
    with pytest.raises(InvalidArgumentError, match="buffers must be an iterable"):
        handler.batch_retrieve_into([k], 7)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="keys must be an iterable of keys, not int"):
        handler.batch_exists(7)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError, match="empty"):
        handler.batch_exists([k, ""])
    with pytest.raises(InvalidKeyError, match="str, bytes or int, not float"):
        handler.batch_retrieve_into([k, 1.5], [bytearray(chunk), bytearray(chunk)])  # type: ignore[list-item]
    # Destinations that share bytes would let one key's copy overwrite another's.
    big = bytearray(2 * chunk)
    with pytest.raises(InvalidArgumentError, match=r"buffers\[0\] and buffers\[2\] share memory"):
        handler.batch_retrieve_into(
            [k, k, k], [memoryview(big)[chunk:], bytearray(chunk), memoryview(big)[chunk // 2 :]]
        )
    assert handler.batch_retrieve_into([k, k], [memoryview(big)[:chunk], memoryview(big)[chunk:]]) == [chunk, chunk]
    # A refused call leaves the buffers it had acquired released: they can be resized.
    buf = bytearray(chunk)
    with pytest.raises(InvalidArgumentError):
        handler.batch_retrieve_into([k, k], [buf, b"read-only"])
    buf.extend(b"x")
    assert len(buf) == chunk + 1


def test_a_batch_copy_reads_the_keys_passed_while_other_threads_change_the_list(
    handler: MaruHandler, key: Callable[[str], str]
) -> None:
    # Copies over 64 KiB release the GIL: the keys must stay the ones the call was given even
    # when another thread replaces the list's items (and frees their strings) meanwhile.
    chunk = handler.get_chunk_size()
    names = [key(f"c{i}") for i in range(8)]
    for i, k in enumerate(names):
        assert handler.store(k, data=memoryview(value(i, chunk)))
    keys = list(names)
    bufs = [bytearray(chunk) for _ in names]
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            # Fresh string objects each time (not interned): the old ones are freed at once.
            keys[:] = ["".join(["gone-", str(i)]) for i in range(len(names))]
            keys[:] = ["".join(["", k]) for k in names]

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(300):
            snapshot = list(keys)
            got = handler.batch_retrieve_into(keys, bufs)
            assert got in ([chunk] * len(names), [None] * len(names)), got
            if got[0] is not None:
                assert [bytes(x) for x in bufs] == [value(i, chunk) for i in range(len(names))]
            assert len(snapshot) == len(names)
    finally:
        stop.set()
        t.join()


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
