"""LMCache 0.5.6's own Maru backend (``lmcache.v1.storage_backend.maru_backend``) on Maru.

The backend is built by LMCache's storage-backend factory from an ``LMCacheEngineConfig``
with ``maru_path``, against a real ``maru up``; it imports ``maru`` and
``maru_lmcache.CxlMemoryAdapter`` unchanged. LMCache's vLLM connector does not run on vLLM's
CPU backend (it finds no CPU connector and falls back to recomputing), so LMCache is
exercised here at its storage-backend level: the calls its storage manager makes
(allocate, put, contains, get, pin, remove, close). Effects are checked at the store
(``maru stats --json``, another handler) and in shared memory, not only in return values.
"""

from __future__ import annotations

import gc
import json
import shutil
import threading
import time

import pytest
import torch
from conftest import REPO, MaruUp, run_child, start_maru_up
from lmcache_harness import (
    TOKENS,
    digest,
    engine_metadata,
    fill,
    mapping_base,
    maru_backend,
    tensor_bytes,
)

from maru import MaruConfig, MaruHandler
from maru_lmcache import CxlMemoryAdapter
from maru_lmcache.layout import page_stride

MIB = 1024 * 1024


def keys_at_store(up: MaruUp) -> tuple[int, int]:
    """(keys, pinned keys) as the operator sees them."""
    s = up.stats()
    return int(s["keys"]), int(s["pinned_keys"])


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_lmcaches_factory_builds_the_backend_on_maru(maru_up: MaruUp, transport: str) -> None:
    url = maru_up.tcp_url if transport == "tcp" else maru_up.unix_url
    with maru_backend(url, maru_instance_id="lmcache-worker-0", maru_eager_map=False) as b:
        assert b.handler.get_stats()["server"]["version"]
        assert type(b.backend).__name__ == "MaruBackend"
        assert isinstance(b.allocator, CxlMemoryAdapter)
        assert b.handler.connected and b.handler.instance_id == "lmcache-worker-0"
        # maru_pool_size (GB) becomes the handler's region, taken at the first allocation (a
        # worker that only reads takes none); the chunk is one full KV chunk.
        assert b.handler.get_chunk_size() == 2 * 4 * TOKENS * 2 * 64 * 2
        def worker_bytes() -> int:
            clients = {c["instance_id"]: c for c in maru_up.stats()["clients"]}
            assert clients["lmcache-worker-0"]["connected"]
            return int(clients["lmcache-worker-0"]["bytes"])

        assert worker_bytes() == 0
        obj = b.backend.allocate(b.shape(), torch.float16)
        assert obj is not None
        assert worker_bytes() == 4 * MIB
        obj.ref_count_down()  # an object never put: its page goes back to the allocator
    clients = {c["instance_id"]: c for c in maru_up.stats()["clients"]}
    assert not clients.get("lmcache-worker-0", {"connected": False})["connected"], "close() said goodbye"


def test_tensor_parallel_workers_without_an_instance_id_each_get_their_own(maru_up: MaruUp) -> None:
    """Without maru_instance_id, LMCache passes instance_id=None: every worker's handler
    gets a fresh id, and each worker stores and finds its own rank's chunks."""
    with maru_backend(maru_up.tcp_url, metadata=engine_metadata(world_size=2, worker_id=0)) as w0, \
            maru_backend(maru_up.tcp_url, metadata=engine_metadata(world_size=2, worker_id=1)) as w1:
        assert w0.handler.instance_id != w1.handler.instance_id
        for rank, b in enumerate((w0, w1)):
            obj = b.backend.allocate(b.shape(), torch.float16)
            fill(obj, seed=rank)
            b.backend.submit_put_task(b.key(7), obj).result(10)
        assert keys_at_store(maru_up) == (2, 0), "one key per rank: the keys carry the worker id"
        assert w0.backend.contains(w0.key(7)) and w1.backend.contains(w1.key(7))


def test_tensor_parallel_workers_sharing_maru_instance_id_both_connect(maru_up: MaruUp) -> None:
    """One maru_instance_id for the whole tensor-parallel group: the id is a label, each
    worker's handler is a session of its own."""
    with maru_backend(maru_up.tcp_url, metadata=engine_metadata(world_size=2, worker_id=0),
                      maru_instance_id="tp-group") as w0, \
            maru_backend(maru_up.tcp_url, metadata=engine_metadata(world_size=2, worker_id=1),
                         maru_instance_id="tp-group") as w1:
        for rank, b in enumerate((w0, w1)):
            obj = b.backend.allocate(b.shape(), torch.float16)
            fill(obj, seed=rank)
            b.backend.submit_put_task(b.key(8), obj).result(10)
        assert keys_at_store(maru_up) == (2, 0)


def test_put_contains_get_pin_remove_close(maru_up: MaruUp) -> None:
    with maru_backend(maru_up.tcp_url) as b:
        pages_before = b.allocated_pages()
        # allocate: the MemoryObj's tensor is the shared page itself.
        obj = b.backend.allocate(b.shape(), torch.float16)
        assert obj is not None and obj.tensor.shape == b.shape()
        rid, pid = CxlMemoryAdapter.decode_address(obj.metadata.address)
        base = mapping_base(b.handler, rid)
        stride = page_stride(b.handler.get_chunk_size())
        assert obj.tensor.data_ptr() == base + pid * stride, "the tensor is a view of the page"
        assert b.allocated_pages() == pages_before + 1
        data = fill(obj, seed=1)
        k = b.key(1)
        # put (single): LMCache's future completes once the key is registered.
        assert b.backend.submit_put_task(k, obj).result(10) is None
        obj.ref_count_down()  # the storage manager's reference, as batched_put drops it
        assert keys_at_store(maru_up) == (1, 0)
        # put (batched), with a last chunk of fewer tokens.
        objs = b.backend.batched_allocate(b.shape(), torch.float16, 2)
        assert objs is not None and len(objs) == 2
        short = b.backend.allocate(b.shape(TOKENS // 2), torch.float16)
        assert short is not None
        objs.append(short)
        datas = [fill(o, seed=10 + i) for i, o in enumerate(objs)]
        ks = [b.key(10 + i) for i in range(3)]
        (future,) = b.backend.batched_submit_put_task(ks, objs)
        assert future.result(10) is None
        for o in objs:
            o.ref_count_down()
        assert keys_at_store(maru_up) == (4, 0)
        s = maru_up.stats()
        assert s["bytes"] == 3 * len(data) + len(datas[2]) and len(datas[2]) == len(data) // 2
        assert b.allocated_pages() == pages_before + 4, "registering moved no bytes into new pages"

        # contains, without and with pin; a pinned key survives remove.
        missing = b.key(999)
        assert b.backend.contains(k) and not b.backend.contains(missing)
        assert b.backend.contains(k, pin=True)
        assert keys_at_store(maru_up) == (4, 1)
        assert b.backend.remove(k) is False and b.backend.contains(k)
        assert b.backend.batched_contains([k, *ks]) == 4
        assert b.backend.batched_contains([ks[0], missing, ks[2]]) == 1, "hits are a prefix"
        assert b.backend.batched_contains(ks, pin=True) == 3
        assert keys_at_store(maru_up) == (4, 4)

        # get, blocking and batched: the bytes are the page's, read in place.
        got = b.backend.get_blocking(k)
        assert got is not None and tensor_bytes(got) == data
        assert got.tensor.data_ptr() == obj.tensor.data_ptr() and got.get_ref_count() == 1
        got.ref_count_down()
        batch = b.backend.batched_get_blocking([*ks, missing])
        assert batch[-1] is None
        assert [tensor_bytes(o) for o in batch[:3]] == datas
        assert batch[2].tensor.shape == b.shape(TOKENS // 2), "a short chunk comes back short"
        prefetched = b.run(b.backend.batched_get_non_blocking("lookup-1", [k, *ks, missing]))
        assert len(prefetched) == 4 and all(o.is_pinned for o in prefetched)
        assert tensor_bytes(prefetched[3]) == datas[2]
        for o in prefetched:
            o.unpin()
            o.ref_count_down()

        # unpin, then remove: the key goes and its page returns to the handler.
        assert b.backend.unpin(k)
        b.backend.batched_unpin(ks)
        assert keys_at_store(maru_up) == (4, 0)
        assert b.backend.remove(k) and not b.backend.contains(k)
        assert keys_at_store(maru_up) == (3, 0)
        assert b.allocated_pages() == pages_before + 3
        assert b.backend.get_blocking(k) is None
    assert keys_at_store(maru_up) == (3, 0), "closing keeps stored chunks for other instances"


def test_a_failed_put_and_a_dropped_allocation_give_the_page_back(maru_up: MaruUp) -> None:
    with maru_backend(maru_up.tcp_url) as b:
        pages_before = b.allocated_pages()
        obj = b.backend.allocate(b.shape(), torch.float16)
        fill(obj, seed=2)
        # A key the server refuses (longer than 1024 bytes): LMCache's future carries the
        # error and its reference is dropped.
        bad = b.key(2, model="m" * 1100)
        future = b.backend.submit_put_task(bad, obj)
        with pytest.raises(ValueError):
            future.result(10)
        obj.ref_count_down()
        assert b.allocated_pages() == pages_before, "the page of the failed put is free again"
        assert keys_at_store(maru_up) == (0, 0)
        # An allocation LMCache drops without storing is collected with its page.
        dropped = b.backend.allocate(b.shape(), torch.float16)
        assert dropped is not None and b.allocated_pages() == pages_before + 1
        del dropped, obj
        gc.collect()
        assert b.allocated_pages() == pages_before
        # A stored chunk whose objects are all collected stays stored.
        kept = b.backend.allocate(b.shape(), torch.float16)
        data = fill(kept, seed=3)
        b.backend.submit_put_task(b.key(3), kept).result(10)
        kept.ref_count_down()
        del kept
        gc.collect()
        assert b.allocated_pages() == pages_before + 1
        got = b.backend.get_blocking(b.key(3))
        assert got is not None and tensor_bytes(got) == data


READER = r"""
import json, sys, warnings
sys.path.insert(0, sys.argv[1])
import torch
from lmcache_harness import maru_backend, tensor_bytes, digest, mapping_base, fill
from maru_lmcache import CxlMemoryAdapter
from maru_lmcache.layout import page_stride

url, hashes = sys.argv[2], [int(h) for h in sys.argv[3].split(",")]
out = {}
with maru_backend(url, maru_eager_map=False) as b:
    keys = [b.key(h) for h in hashes]
    out["contains"] = b.backend.batched_contains(keys)
    one = b.backend.get_blocking(keys[0])
    batch = b.backend.batched_get_blocking(keys)
    out["digests"] = [digest(tensor_bytes(o)) for o in [one, *batch[1:]]]
    rid, pid = CxlMemoryAdapter.decode_address(one.metadata.address)
    view = b.handler.get_buffer_view(rid, 0, 1)
    out["readonly"] = view.readonly
    out["in_place"] = one.tensor.data_ptr() - mapping_base(b.handler, rid) == pid * page_stride(b.handler.get_chunk_size())
    # A chunk of its own, left for the parent after this process is gone.
    mine = b.backend.allocate(b.shape(), torch.float16)
    out["mine"] = digest(fill(mine, seed=77))
    b.backend.submit_put_task(b.key(77), mine).result(10)
print(json.dumps(out))
"""


def test_another_process_reads_the_stored_tensor_in_place(maru_up: MaruUp) -> None:
    here = str(REPO / "tests" / "frameworks" / "lmcache")
    with maru_backend(maru_up.tcp_url) as b:
        objs = b.backend.batched_allocate(b.shape(), torch.float16, 2)
        datas = [fill(o, seed=40 + i) for i, o in enumerate(objs)]
        b.backend.batched_submit_put_task([b.key(40), b.key(41)], objs)[0].result(10)
        # Negative control: bytes changed in shared memory after the put are what the other
        # process reads, so it reads this page and no copy of it.
        objs[0].tensor[0, 0, 0, :8] = torch.arange(8, dtype=torch.float16)
        altered = tensor_bytes(objs[0])
        assert altered != datas[0]
        r = run_child(READER, here, maru_up.tcp_url, "40,41", timeout=180)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["contains"] == 2
        assert out["digests"] == [digest(altered), digest(datas[1])]
        assert out["readonly"] and out["in_place"], "the reader's tensor is its read-only mapping of the page"
        # The reader's own chunk outlives the reader.
        got = b.backend.get_blocking(b.key(77))
        assert got is not None and digest(tensor_bytes(got)) == out["mine"]
        assert keys_at_store(maru_up) == (3, 0)


def test_a_full_pool_makes_allocate_return_none() -> None:
    up = start_maru_up(16 * MIB)
    try:
        # 256-token chunks of 4 layers x 2 heads x 64: 512 KiB each; 2 MiB regions.
        meta = engine_metadata(tokens=256)
        with maru_backend(up.tcp_url, pool_mib=2, metadata=meta) as b:
            held = []
            while True:
                obj = b.backend.allocate(b.shape(256), torch.float16)
                if obj is None:
                    break
                held.append(obj)
                assert len(held) <= 32, "more pages than the pool holds"
            assert len(held) == 16 * MIB // (512 * 1024), "every page of the pool was handed out"
            # The regions the handler added on the way were picked up, each page a view of
            # its own region's mapping.
            regions = b.handler.get_owned_region_ids()
            assert len(regions) == 8
            stride = page_stride(b.handler.get_chunk_size())
            for o in held:
                rid, pid = CxlMemoryAdapter.decode_address(o.metadata.address)
                assert o.tensor.data_ptr() == mapping_base(b.handler, rid) + pid * stride
            assert {CxlMemoryAdapter.decode_address(o.metadata.address)[0] for o in held} == set(regions)
            # LMCache's other allocators answer a full pool with None, and so does this one,
            # for a batch too, taking no page.
            assert b.backend.batched_allocate(b.shape(256), torch.float16, 2) is None
            assert b.allocated_pages() == len(held)
            # The pages are usable: store them all, then free one by removing its key.
            for o in held:
                fill(o, seed=len(held))
            ks = [b.key(500 + i) for i in range(len(held))]
            b.backend.batched_submit_put_task(ks, held)[0].result(30)
            for o in held:
                o.ref_count_down()  # the storage manager's reference, as batched_put drops it
            # Every page stored puts the pool past its high watermark: the server's evictor
            # takes keys down to the low one, and their pages come back to this allocator.
            deadline = time.monotonic() + 10
            while int(up.stats()["keys"]) > 0.8 * len(held) and time.monotonic() < deadline:
                time.sleep(0.01)
            kept = int(up.stats()["keys"])
            assert 0 < kept <= 0.8 * len(held), kept
            again = None
            while again is None and time.monotonic() < deadline:
                again = b.backend.allocate(b.shape(256), torch.float16)
            assert again is not None, "an evicted key's page is allocatable again"
            # Larger than a page: None too, as LMCache's allocators answer.
            assert b.backend.allocate(b.shape(512), torch.float16) is None
    finally:
        up.stop()
        shutil.rmtree(up.dir, ignore_errors=True)


def test_close_with_puts_in_flight_loses_nothing_acknowledged(maru_up: MaruUp) -> None:
    n = 48
    with maru_backend(maru_up.tcp_url, close=False) as b:
        objs = b.backend.batched_allocate(b.shape(), torch.float16, n)
        datas = [fill(o, seed=100 + i) for i, o in enumerate(objs)]
        # Hold the loop so that every put is still in flight when close() is called.
        gate = threading.Event()
        b.loop.call_soon_threadsafe(gate.wait, 30)
        futures = [b.backend.submit_put_task(b.key(100 + i), o) for i, o in enumerate(objs[: n // 2])]
        futures += b.backend.batched_submit_put_task([b.key(100 + i) for i in range(n // 2, n)], objs[n // 2 :])
        for o in objs:
            o.ref_count_down()
        assert len(b.backend.put_tasks) == n
        closer = threading.Thread(target=b.backend.close)
        closer.start()
        closer.join(0.3)
        assert closer.is_alive(), "close() waits for the puts in flight"
        gate.set()
        closer.join(30)
        assert not closer.is_alive()
        assert all(f.done() and f.exception() is None for f in futures)
        assert not b.handler.connected
    assert int(maru_up.stats()["keys"]) == n
    with MaruHandler(MaruConfig(server_url=maru_up.tcp_url, pool_size=4 * MIB, chunk_size_bytes=64 * 1024)) as reader:
        got = reader.batch_retrieve([b.key(100 + i).to_string() for i in range(n)])
        assert [bytes(g.view) if g is not None else None for g in got] == datas


def test_the_adapter_refuses_what_it_cannot_name(maru_up: MaruUp) -> None:
    with maru_backend(maru_up.tcp_url) as b:
        a = b.allocator
        assert CxlMemoryAdapter.decode_address(CxlMemoryAdapter.encode_address(7, 3)) == (7, 3)
        with pytest.raises(ValueError):
            CxlMemoryAdapter.encode_address(1, 1 << 32)
        obj = b.backend.allocate(b.shape(), torch.float16)
        data = fill(obj, seed=9)
        rid, pid = CxlMemoryAdapter.decode_address(obj.metadata.address)
        b.backend.submit_put_task(b.key(9), obj).result(10)
        with pytest.raises(ValueError, match="storing"):
            a.create_store_handle(obj)  # a page is stored once
        got = b.backend.get_blocking(b.key(9))
        with pytest.raises(ValueError, match="borrowed"):
            a.create_store_handle(got)
        token = len(data) // TOKENS
        pages = b.handler.get_region_page_count(rid)
        assert a.get_by_location(rid, pages, len(data), token) is None, "past the region"
        assert a.get_by_location(10**6, 0, len(data), token) is None, "an unknown region"
        assert a.get_by_location(rid, pid, token + 1, token) is None, "not a whole number of tokens"
        part = a.get_by_location(rid, pid, 3 * token, token)
        assert part is not None and part.tensor.shape[2] == 3 and tensor_bytes(part) == data[: 3 * token]
        # Freeing twice gives the page back once.
        spare = b.backend.allocate(b.shape(), torch.float16)
        before = b.allocated_pages()
        a.free(spare)
        a.free(spare)
        assert b.allocated_pages() == before - 1
        a.close()
        assert b.backend.allocate(b.shape(), torch.float16) is None, "a closed adapter allocates nothing"


def test_a_second_put_of_a_stored_key_keeps_the_first_and_frees_nothing_twice(maru_up: MaruUp) -> None:
    with maru_backend(maru_up.tcp_url) as b:
        base = b.allocated_pages()
        first = b.backend.allocate(b.shape(), torch.float16)
        data = fill(first, seed=20)
        b.backend.submit_put_task(b.key(20), first).result(10)
        second = b.backend.allocate(b.shape(), torch.float16)
        fill(second, seed=21)
        b.backend.submit_put_task(b.key(20), second).result(10)
        assert keys_at_store(maru_up) == (1, 0)
        assert b.allocated_pages() == base + 1, "the duplicate's page went back"
        # That page is handed out again while LMCache still holds the duplicate's object;
        # dropping the object must not free the page under its new owner.
        third = b.backend.allocate(b.shape(), torch.float16)
        assert CxlMemoryAdapter.decode_address(third.metadata.address) == CxlMemoryAdapter.decode_address(
            second.metadata.address
        )
        second.ref_count_down()
        del second
        gc.collect()
        assert b.allocated_pages() == base + 2
        fill(third, seed=22)
        b.backend.submit_put_task(b.key(22), third).result(10)
        got = b.backend.batched_get_blocking([b.key(20), b.key(22)])
        assert tensor_bytes(got[0]) == data and tensor_bytes(got[1]) == tensor_bytes(third)
