"""The connector's scheduler and worker sides against a real ``maru up``, several instances in
one test, driven the way vLLM drives them (vllm_sim.py). The real-engine tests (test_vllm_sharing.py)
show the same behaviour inside vLLM; these pin down the exact rules at in-process speed."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import MaruUp
from maru_vllm.geometry import ChunkGeometry, UnsupportedKVCache
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec
from vllm_sim import BLOCK, Instance, Request, handler, kv_cache_config

T = 64
rng = random.Random(7)


def tokens(n: int) -> list[int]:
    return [rng.randrange(3, 30000) for _ in range(n)]


@pytest.fixture
def url(maru_up: MaruUp) -> str:
    return maru_up.unix_url


@pytest.fixture
def make(url: str) -> Iterator[Any]:
    made: list[Instance] = []

    def _make(**kw: Any) -> Instance:
        inst = Instance(url, **kw)
        made.append(inst)
        return inst

    yield _make
    for inst in made:
        inst.close()


def stats(url: str) -> dict[str, Any]:
    h = handler(url, 4096)
    try:
        doc: dict[str, Any] = h.get_stats()["server"]
        return doc
    finally:
        h.close()


def blocks_equal(a: Instance, a_ids: list[int], b: Instance, b_ids: list[int]) -> bool:
    return all(torch.equal(a.kv[n][a_ids], b.kv[n][b_ids]) for n in a.kv)


def test_chunks_stored_by_one_instance_load_into_another(url: str, make: Any) -> None:
    a, b = make(), make()
    prompt = tokens(3 * T + 10)
    a.prefill(Request(prompt), list(range(0, 7)), seed=1)
    assert a.counters.totals()["stored_chunks"] == 3
    assert stats(url)["keys"] == 3
    req = Request(prompt)
    steps = b.prefill(req, list(range(20, 27)), seed=2)
    loads = steps[0]["meta"].loads
    assert [len(c.block_ids) for c in loads[0].chunks] == [2, 2, 2]
    assert blocks_equal(a, list(range(0, 6)), b, list(range(20, 26)))
    t = b.counters.totals()
    assert (t["hit_chunks"], t["loaded_chunks"], t["loaded_tokens"], t["stored_chunks"]) == (3, 3, 3 * T, 0)
    assert stats(url)["pinned_keys"] == 0


def test_lookup_counts_only_the_leading_chunks(url: str, make: Any) -> None:
    a, b = make(), make()
    prompt = tokens(4 * T + 1)
    a.prefill(Request(prompt), list(range(9)))
    second = a.keys.all_keys(a.keys.chunk_hashes(prompt)[1])
    side = handler(url, 4096)
    assert all(side.delete(k) for k in second)
    side.close()
    req = Request(prompt)
    assert b.lookup(req) == T  # chunk 0 only: chunks 2 and 3 exist, but after a gap
    b.scheduler.request_finished(req)
    assert stats(url)["pinned_keys"] == 0


def test_a_prompt_of_whole_chunks_loads_up_to_its_last_block(url: str, make: Any) -> None:
    """vLLM computes the last token itself, so the last block of an all-hit prompt stays out."""
    a, b = make(), make()
    prompt = tokens(2 * T)
    a.prefill(Request(prompt), list(range(4)))
    steps = b.prefill(Request(prompt), list(range(10, 14)))
    chunks = steps[0]["meta"].loads[0].chunks
    assert [(c.first_block, c.block_ids) for c in chunks] == [(0, [10, 11]), (0, [12])]
    assert blocks_equal(a, [0, 1, 2], b, [10, 11, 12])


def test_local_prefix_hits_load_only_the_rest(url: str, make: Any) -> None:
    a, b = make(), make()
    prompt = tokens(3 * T + 5)
    a.prefill(Request(prompt), list(range(7)))
    req = Request(prompt)
    # vLLM's own prefix cache already holds the first 3 blocks (96 tokens).
    assert b.scheduler.get_num_new_matched_tokens(req, 3 * BLOCK)[0] == 3 * T - 3 * BLOCK
    from vllm_sim import _Blocks, _Cached, _NewReq, _Output

    b.scheduler.update_state_after_alloc(req, _Blocks(list(range(30, 37))), 3 * T - 3 * BLOCK)
    meta = b.scheduler.build_connector_meta(
        _Output([_NewReq(req.request_id, (list(range(30, 37)),), 3 * T)], _Cached(), {req.request_id: 5})
    )
    assert [(c.first_block, c.block_ids) for c in meta.loads[0].chunks] == [(1, [33]), (0, [34, 35])]
    # Chunk 0 is not loaded, so its pins were given back at once; the rest go with the load.
    assert stats(url)["pinned_keys"] == 2
    b.worker.load(meta.loads)
    b.worker.finish_step()
    # The pins are the scheduler's session's: it gives them back when it schedules the next
    # step, by which time the step that carried the load has run.
    assert stats(url)["pinned_keys"] == 2
    b.scheduler.build_connector_meta(_Output([], _Cached([req.request_id], [None], [3 * T + 5]), {}))
    assert stats(url)["pinned_keys"] == 0
    b.scheduler.request_finished(req)


def test_pins_hold_chunks_until_the_request_ends(url: str, make: Any) -> None:
    a, b = make(), make()
    prompt = tokens(2 * T + 3)
    a.prefill(Request(prompt), list(range(5)))
    req = Request(prompt)
    assert b.lookup(req) == 2 * T
    assert stats(url)["pinned_keys"] == 2
    side = handler(url, 4096)
    first = a.keys.all_keys(a.keys.chunk_hashes(prompt)[0])
    assert not side.delete(first[0]), "a pinned chunk must not be deletable"
    side.close()
    b.scheduler.request_finished(req)  # finished (aborted) before its load was scheduled
    assert stats(url)["pinned_keys"] == 0


def test_a_chunk_deleted_between_lookup_and_load_is_a_load_error(url: str, make: Any) -> None:
    a, b = make(), make()
    shared = tokens(3 * T)
    a.prefill(Request(shared + tokens(7)), list(range(7)), seed=3)
    victim = a.keys.all_keys(a.keys.chunk_hashes(shared)[1])
    side = handler(url, 4096)

    def evict() -> None:
        # B's pins end as if their lease ran out; then another client deletes the chunk.
        for k in victim:
            assert b.sched_handler.unpin(k) and side.delete(k)

    # B's prompt has a fourth chunk of its own, computed in the step whose load fails.
    blocks = list(range(40, 49))
    steps = b.prefill(Request(shared + tokens(T + 7)), blocks, seed=4, after_lookup=evict)
    side.close()
    assert steps[0]["failed_blocks"] == {42, 43}
    t = steps[0]["totals"]
    assert (t["loaded_chunks"], t["load_errors"], t["load_error_blocks"]) == (2, 1, 2)
    # The fourth chunk completed in that step but was computed over failed blocks: not stored.
    assert [len(r.chunks) for r in steps[0]["meta"].stores] == [1] and t["stored_chunks"] == 0
    # vLLM recomputes from block 2; that step stores the lost chunk and the fourth, not chunk 2.
    t = b.counters.totals()
    assert (t["stored_chunks"], t["store_skipped_chunks"]) == (2, 1)
    assert stats(url)["keys"] == 4 and stats(url)["pinned_keys"] == 0


def test_a_chunk_of_the_wrong_size_is_a_load_error(url: str, make: Any) -> None:
    a, b = make(), make()
    prompt = tokens(2 * T + 1)
    a.prefill(Request(prompt), list(range(5)))
    key = a.keys.all_keys(a.keys.chunk_hashes(prompt)[0])[0]
    side = handler(url, 1 << 20)
    assert side.delete(key)
    side.store(key, data=b"\0" * 1000)
    side.close()
    steps = b.prefill(Request(prompt), list(range(10, 15)))
    assert steps[0]["failed_blocks"] == {10, 11}
    t = b.counters.totals()
    # The malformed value is deleted, so the recompute stores the chunk properly.
    assert (t["load_errors"], t["stored_chunks"]) == (1, 1)
    c = make()
    c.prefill(Request(prompt), list(range(20, 25)))
    assert c.counters.totals()["loaded_chunks"] == 2


def test_chunks_that_exist_at_save_time_are_not_stored_again(url: str, make: Any) -> None:
    """B misses at lookup, A stores the same chunks meanwhile: B's save finds them and skips."""
    a, b = make(), make()
    prompt = tokens(2 * T + 9)
    b.prefill(Request(prompt), list(range(10, 15)), after_lookup=lambda: a.prefill(Request(prompt), list(range(5))))
    t = b.counters.totals()
    assert (t["miss_chunks"], t["stored_chunks"], t["store_skipped_chunks"]) == (2, 0, 2)
    assert a.counters.totals()["stored_chunks"] == 2 and stats(url)["keys"] == 2


def test_chunked_prefill_stores_each_chunk_once(url: str, make: Any) -> None:
    a = make()
    prompt = tokens(4 * T + 20)
    steps = a.prefill(Request(prompt), list(range(9)), step=48)
    stored = [c.chunk_hash for s in steps for r in s["meta"].stores for c in r.chunks]
    assert len(stored) == len(set(stored)) == 4
    t = a.counters.totals()
    assert (t["stored_chunks"], t["store_skipped_chunks"], t["store_errors"]) == (4, 0, 0)


def test_small_pages_split_a_chunk_into_parts(url: str, make: Any) -> None:
    geometry = ChunkGeometry.from_kv_cache_config(kv_cache_config(), T, None)
    page = 2 * geometry.layer_chunk_bytes  # two of the three layers per page
    a, b = make(page_size=page), make(page_size=page)
    assert a.geometry.num_parts == 2
    prompt = tokens(2 * T + 3)
    a.prefill(Request(prompt), list(range(5)), seed=5)
    assert stats(url)["keys"] == 4
    b.prefill(Request(prompt), list(range(10, 15)), seed=6)
    assert blocks_equal(a, [0, 1, 2, 3], b, [10, 11, 12, 13])
    # A chunk missing one part is not present at all.
    side = handler(url, 4096)
    assert side.delete(a.keys.key(a.keys.chunk_hashes(prompt)[0], 0, 1))
    side.close()
    req = Request(prompt)
    assert b.lookup(req) == 0
    b.scheduler.request_finished(req)


def test_namespaces_never_see_each_other(url: str, make: Any) -> None:
    a, b = make(namespace="team-a"), make(namespace="team-b")
    prompt = tokens(2 * T + 3)
    a.prefill(Request(prompt), list(range(5)))
    req = Request(prompt)
    assert b.lookup(req) == 0
    b.scheduler.request_finished(req)
    assert b.counters.totals()["miss_chunks"] == 2


def test_a_chunk_loads_only_when_every_tp_rank_stored_it(url: str, make: Any) -> None:
    r0, r1 = make(tp_rank=0, tp_size=2), make(tp_rank=1, tp_size=2)
    prompt = tokens(2 * T + 3)
    r0.prefill(Request(prompt), list(range(5)))
    req = Request(prompt)
    assert r1.lookup(req) == 0, "rank 1's shard is missing"
    r1.scheduler.request_finished(req)
    r1.prefill(Request(prompt), list(range(5)))
    assert stats(url)["keys"] == 4
    req = Request(prompt)
    assert r0.lookup(req) == 2 * T
    r0.scheduler.request_finished(req)


def test_kv_caches_it_cannot_share_are_refused_at_start() -> None:
    base = kv_cache_config()
    spec = base.kv_cache_groups[0].kv_cache_spec
    with pytest.raises(UnsupportedKVCache, match="not a multiple of the block size"):
        ChunkGeometry.from_kv_cache_config(base, 48, None)
    with pytest.raises(UnsupportedKVCache, match="cannot hold one layer"):
        ChunkGeometry.from_kv_cache_config(base, T, 4096)
    two = KVCacheConfig(
        num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[base.kv_cache_groups[0], base.kv_cache_groups[0]]
    )
    with pytest.raises(UnsupportedKVCache, match="2 KV cache groups"):
        ChunkGeometry.from_kv_cache_config(two, T, None)
    sw = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float32, sliding_window=128)
    with pytest.raises(UnsupportedKVCache, match="SlidingWindowSpec"):
        ChunkGeometry.from_kv_cache_config(KVCacheConfig(8, [], [KVCacheGroupSpec(["l"], sw)]), T, None)
    windowed = FullAttentionSpec(
        block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float32, sliding_window=128
    )
    with pytest.raises(UnsupportedKVCache, match="sliding_window"):
        ChunkGeometry.from_kv_cache_config(KVCacheConfig(8, [], [KVCacheGroupSpec(["l"], windowed)]), T, None)
    assert ChunkGeometry.from_kv_cache_config(base, T, None).num_parts == 1 and spec.block_size == BLOCK
