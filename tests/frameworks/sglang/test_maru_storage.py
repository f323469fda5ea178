"""MaruStorage against the real SGLang 0.5.23 (its storage factory and host pools, on CPU) and
a real `maru up`. Effects are checked at the store (`maru stats --json`), not only in return
values. One SGLang import per process: this module's, and one child process that reads what
this process wrote (test_cross_process.py)."""

from __future__ import annotations

import logging
import time

import pytest
import sglang_kit as kit
import torch
from conftest import MaruUp
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage
from sglang.srt.observability.metrics_collector import StorageMetrics

from maru_sglang.maru_storage import MaruStorage


@pytest.fixture
def backends():
    """Backends made by a test, closed after it (their pins released, handlers closed)."""
    made: list[MaruStorage] = []

    def make(url: str, pool, **kw) -> MaruStorage:
        b = kit.create_backend(kit.storage_config(url, **kw), pool)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def wait_for(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def op_count(up: MaruUp, op: str) -> int:
    return int(up.stats()["ops"].get(op, {}).get("count", 0))


def stored(up: MaruUp, backends, host_pool, tag: str, n: int, seed: int, **kw):
    """`n` pages of a writer's page-first host pool (from `host_pool(layout)`) stored under
    new hashes, then a reader on a host pool of its own (connected after the store, so it
    maps the writer's region at connect)."""
    src, dst = host_pool("page_first"), host_pool("page_first")
    writer = backends(up.unix_url, src, **kw)
    hashes = kit.page_hashes(tag, n)
    idx = kit.alloc_pages(src, n)
    kit.fill_pages(src, idx, seed=seed)
    assert writer.batch_set_v1(hashes, idx) == [True] * n
    reader = backends(up.unix_url, dst, **kw)
    return writer, reader, src, dst, hashes, idx


def flip_stored_bytes(writer: MaruStorage, page_hash: str) -> memoryview:
    """Inverts the first 8 bytes of the writer's stored page, in shared memory; the view."""
    view = writer.handler.retrieve(writer.keys.key(page_hash)).view  # the writer's own page
    view[:8] = bytes(x ^ 0xFF for x in view[:8])
    return view


def test_the_dynamic_factory_builds_maru_storage_from_sglangs_extra_config(maru_up, backends):
    pool = kit.mha_host_pool("page_first")
    b = backends(
        maru_up.unix_url, pool, pool_size="8M", namespace="team-a", instance_id="sglang-x", tp_size=2
    )
    assert type(b) is MaruStorage and isinstance(b, HiCacheStorage)
    assert b.config.pool_size == 8 << 20 and b.config.namespace == "team-a"
    page_bytes = 2 * kit.LAYERS * kit.PAGE_SIZE * kit.HEADS * kit.HEAD_DIM * 2
    assert b.handler.get_chunk_size() == page_bytes, "a Maru page is one host page"
    assert b.handler.instance_id == "sglang-x-tp0", "each rank's handler gets its own instance id"
    clients = [c for c in maru_up.stats()["clients"] if c.get("connected", True)]
    assert any(c.get("instance_id") == "sglang-x-tp0" for c in clients), clients


def test_host_pools_the_zero_copy_path_cannot_serve_are_refused_at_registration(maru_up):
    lf = kit.mha_host_pool("layer_first")
    with pytest.raises(ValueError, match="page-first host layout"):
        kit.create_backend(kit.storage_config(maru_up.unix_url), lf)
    pf = kit.mha_host_pool("page_first")
    with pytest.raises(ValueError, match="maru_chunk_size_bytes"):
        kit.create_backend(kit.storage_config(maru_up.unix_url, chunk_size_bytes=1024), pf)
    with pytest.raises(ValueError, match="maru_pool_size"):
        kit.create_backend(kit.storage_config(maru_up.unix_url, pool_size="lots"), pf)


def test_set_get_and_batch_round_trips_return_the_stored_bytes(maru_up, backends):
    pool = kit.mha_host_pool("page_first")
    b = backends(maru_up.unix_url, pool)
    hashes = kit.page_hashes("rt", 5)
    pages = [torch.randn(64, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16) for i in range(5)]
    assert b.set(hashes[0], pages[0]) is True
    assert b.batch_set(hashes[1:], pages[1:]) is True
    assert maru_up.stats()["keys"] == 5

    assert torch.equal(b.get(hashes[0]).view(torch.bfloat16), pages[0]), "no target: a new tensor"
    target = torch.zeros(64, dtype=torch.bfloat16)
    assert b.get(hashes[1], target) is target and torch.equal(target, pages[1])
    targets = [torch.zeros(64, dtype=torch.bfloat16) for _ in range(5)]
    got = b.batch_get(hashes, targets)
    assert all(g is t for g, t in zip(got, targets))
    assert all(torch.equal(t, p) for t, p in zip(targets, pages))

    assert b.get(kit.page_hashes("nope", 1)[0]) is None
    assert b.batch_get([hashes[0], "0" * 64], None)[1] is None
    wrong = torch.zeros(32, dtype=torch.bfloat16)
    assert b.get(hashes[2], wrong) is None, "a stored size that is not the target's is not loaded"
    assert b.get_stats().maru["size_mismatches"] == 1

    assert b.set(hashes[0], pages[3]) is True, "present already: left alone"
    assert maru_up.stats()["keys"] == 5
    assert torch.equal(b.get(hashes[0]).view(torch.bfloat16), pages[0])
    assert b.get_stats().maru["already_present"] == 1
    assert maru_up.stats()["pinned_keys"] == 0, "reads release their pins"


def test_without_index_reads_batch_exists_pins_the_leading_present_keys_in_one_round_trip(maru_up, backends):
    pool = kit.mha_host_pool("page_first")
    b = backends(maru_up.unix_url, pool, index_reads=False)
    hashes = kit.page_hashes("ex", 5)
    idx = kit.alloc_pages(pool, 5)
    kit.fill_pages(pool, idx, seed=3)
    present = [0, 1, 3]
    ps = pool.page_size
    sel = torch.cat([idx[i * ps : (i + 1) * ps] for i in present])
    assert b.batch_set_v1([hashes[i] for i in present], sel) == [True] * 3

    before = op_count(maru_up, "batch_pin")
    assert b.batch_exists(hashes) == 2, "keys 0 and 1 lead; 3 comes after the gap"
    assert op_count(maru_up, "batch_pin") == before + 1, "one round trip"
    assert maru_up.stats()["pinned_keys"] == 2, "what batch_exists found is pinned; key 3 was released"
    assert b.batch_exists([hashes[2], hashes[0]]) == 0
    assert b.batch_exists([]) == 0
    assert b.exists(hashes[3]) and not b.exists(hashes[4])

    # The read that uses the pins releases them.
    assert b.batch_get_v1(hashes[:2], idx[: 2 * ps]) == [True, True]
    assert maru_up.stats()["pinned_keys"] == 0
    stats = b.get_stats().maru
    assert stats["pins_held"] == 0 and stats["pins_taken"] == stats["pins_released"] == 4


def test_pins_no_read_comes_for_expire(maru_up, backends):
    pool = kit.mha_host_pool("page_first")
    b = backends(maru_up.unix_url, pool, pin_ttl_s=0.2, index_reads=False)
    hashes = kit.page_hashes("ttl", 3)
    idx = kit.alloc_pages(pool, 3)
    kit.fill_pages(pool, idx, seed=4)
    assert b.batch_set_v1(hashes, idx) == [True] * 3
    assert b.batch_exists(hashes) == 3
    assert maru_up.stats()["pinned_keys"] == 3

    def released() -> bool:
        b.batch_exists(kit.page_hashes("absent", 1))  # any call sweeps expired leases
        return maru_up.stats()["pinned_keys"] == 0

    wait_for(released, "the expired pins to be released")
    assert b.get_stats().maru["pins_expired"] == 3

    off = backends(maru_up.unix_url, pool, pin_ttl_s=0, index_reads=False)
    before = op_count(maru_up, "batch_pin")
    assert off.batch_exists(hashes) == 3
    assert op_count(maru_up, "batch_pin") == before
    assert maru_up.stats()["pinned_keys"] == 0, "maru_pin_ttl_s 0: no pins"


def test_a_pinned_key_outlives_its_writers_delete_and_an_unpinned_one_that_vanished_is_false(
    maru_up, backends
):
    pool = kit.mha_host_pool("page_first")
    writer = backends(maru_up.unix_url, pool)
    reader = backends(maru_up.unix_url, pool, index_reads=False)
    unpinned = backends(maru_up.unix_url, pool, pin_ttl_s=0)
    idx = kit.alloc_pages(pool, 2)
    kit.fill_pages(pool, idx, seed=13)
    hashes = kit.page_hashes("held", 2)
    assert writer.batch_set_v1(hashes, idx) == [True, True]

    assert reader.batch_exists(hashes) == 2
    writer.clear()  # between the query and the read
    assert maru_up.stats()["keys"] == 2, "pinned keys are not deleted"
    out = kit.alloc_pages(pool, 2)
    assert reader.batch_get_v1(hashes, out) == [True, True]
    assert kit.digests(pool, out) == kit.digests(pool, idx)
    writer.clear()
    assert maru_up.stats()["keys"] == 0, "once read and unpinned, the delete goes through"

    again = kit.page_hashes("gone", 2)
    assert writer.batch_set_v1(again, idx) == [True, True]
    assert unpinned.batch_exists(again) == 2
    writer.clear()
    assert unpinned.batch_get_v1(again, out) == [False, False], "vanished: a clean miss"
    m = unpinned.get_stats().maru
    assert (m["read_misses"], m["failed_keys"], m["errors"]) == (2, 0, {})


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct"])
def test_v1_copies_pages_between_host_pools_and_a_key_missing_in_the_middle_is_false(
    maru_up, backends, layout
):
    src = kit.mha_host_pool(layout)
    dst = kit.mha_host_pool(layout)
    writer = backends(maru_up.unix_url, src, layout=layout)
    reader = backends(maru_up.unix_url, dst, layout=layout)
    ps = src.page_size
    hashes = kit.page_hashes(f"v1-{layout}", 4)
    idx = kit.alloc_pages(src, 4)
    kit.fill_pages(src, idx, seed=5)
    keep = torch.cat([idx[: 2 * ps], idx[3 * ps :]])
    ops = {op: op_count(maru_up, op) for op in ("batch_exists", "batch_register", "register")}
    assert writer.batch_set_v1(hashes[:2] + hashes[3:], keep) == [True] * 3
    assert maru_up.stats()["keys"] == 3
    after = {op: op_count(maru_up, op) for op in ops}
    assert after == {
        "batch_exists": ops["batch_exists"],
        "batch_register": ops["batch_register"] + 1,
        "register": ops["register"],
    }, "one registration for the batch; which keys are present comes from the key index"

    out = kit.alloc_pages(dst, 4)
    sentinel = kit.digests(dst, out)[2]
    assert reader.batch_get_v1(hashes, out) == [True, True, False, True]
    want, got = kit.digests(src, idx), kit.digests(dst, out)
    assert [got[0], got[1], got[3]] == [want[0], want[1], want[3]]
    assert got[2] == sentinel, "the missing page is left untouched"
    assert reader.get_stats().maru["read_misses"] == 1

    # Stored again: nothing is copied, the store keeps its three keys.
    assert writer.batch_set_v1(hashes[:2], idx[: 2 * ps]) == [True, True]
    assert maru_up.stats()["keys"] == 3
    assert maru_up.stats()["pinned_keys"] == 0


def test_the_copying_path_and_the_zero_copy_path_share_keys_and_bytes(maru_up, backends):
    pool = kit.mha_host_pool("page_first")
    b = backends(maru_up.unix_url, pool)
    hashes = kit.page_hashes("mix", 2)
    idx = kit.alloc_pages(pool, 2)
    kit.fill_pages(pool, idx, seed=6)
    starts = kit.page_starts(pool, idx)
    # SGLang's generic backup: flat pages from get_data_page, through batch_set.
    assert b.batch_set(hashes, [pool.get_data_page(s) for s in starts]) is True
    out = kit.alloc_pages(pool, 2)
    assert b.batch_get_v1(hashes, out) == [True, True]
    assert kit.digests(pool, out) == kit.digests(pool, idx)


def test_mla_pages_are_written_by_one_rank_and_read_by_every_rank(maru_up, backends):
    pool0, pool1 = kit.mla_host_pool("page_first"), kit.mla_host_pool("page_first")
    rank0 = backends(maru_up.unix_url, pool0, mla=True, tp_rank=0, tp_size=2)
    rank1 = backends(maru_up.unix_url, pool1, mla=True, tp_rank=1, tp_size=2)
    hashes = kit.page_hashes("mla", 3)
    idx1 = kit.alloc_pages(pool1, 3)
    kit.fill_pages(pool1, idx1, seed=7)
    assert rank1.batch_set_v1(hashes, idx1) == [True] * 3
    assert maru_up.stats()["keys"] == 0, "rank 1 leaves MLA writes to rank 0"
    assert rank1.get_stats().maru["skipped_not_writer"] == 3

    idx0 = kit.alloc_pages(pool0, 3)
    kit.fill_pages(pool0, idx0, seed=8)
    assert rank0.batch_set_v1(hashes, idx0) == [True] * 3
    assert maru_up.stats()["keys"] == 3, "one copy of each page for all ranks"
    assert rank1.batch_exists(hashes) == 3
    out1 = kit.alloc_pages(pool1, 3)
    assert rank1.batch_get_v1(hashes, out1) == [True] * 3
    assert kit.digests(pool1, out1) == kit.digests(pool0, idx0)


def test_mha_keys_carry_the_tp_rank_and_size(maru_up, backends):
    pool = kit.mha_host_pool("page_first")
    r0 = backends(maru_up.unix_url, pool, tp_rank=0, tp_size=2)
    r1 = backends(maru_up.unix_url, pool, tp_rank=1, tp_size=2)
    solo = backends(maru_up.unix_url, pool, tp_rank=0, tp_size=1)
    hashes = kit.page_hashes("tp", 2)
    idx = kit.alloc_pages(pool, 2)
    assert r0.batch_set_v1(hashes, idx) == [True, True]
    assert (r0.batch_exists(hashes), r1.batch_exists(hashes), solo.batch_exists(hashes)) == (2, 0, 0)


def test_two_namespaces_do_not_see_each_other(maru_up, backends):
    pool = kit.mha_host_pool("page_first")
    a = backends(maru_up.unix_url, pool, namespace="alpha")
    b = backends(maru_up.unix_url, pool, namespace="beta")
    hashes = kit.page_hashes("ns", 2)
    idx = kit.alloc_pages(pool, 2)
    kit.fill_pages(pool, idx, seed=9)
    assert a.batch_set_v1(hashes, idx) == [True, True]
    assert b.batch_exists(hashes) == 0
    out = kit.alloc_pages(pool, 2)
    assert b.batch_get_v1(hashes, out) == [False, False]
    kit.fill_pages(pool, idx, seed=10)
    assert b.batch_set_v1(hashes, idx) == [True, True], "the same hashes are new keys in beta"
    assert maru_up.stats()["keys"] == 4
    assert a.batch_get_v1(hashes, out) == [True, True]
    assert kit.digests(pool, out) != kit.digests(pool, idx), "alpha keeps its own bytes"


def test_bytes_altered_in_shared_memory_change_what_get_returns(maru_up, backends):
    writer, reader, src, dst, hashes, idx = stored(maru_up, backends, kit.mha_host_pool, "neg", 1, seed=11)
    view = flip_stored_bytes(writer, hashes[0])
    out = kit.alloc_pages(dst, 1)
    assert reader.batch_get_v1(hashes, out) == [True]
    got = dst.get_data_page(kit.page_starts(dst, out)[0], flat=True).view(torch.uint8)
    assert bytes(got[:8].tolist()) == bytes(view[:8]), "the reader copies what shared memory holds"
    assert kit.digests(dst, out) != kit.digests(src, idx)


def test_clear_deletes_only_this_instances_keys(maru_up, backends):
    pool = kit.mha_host_pool("page_first")
    mine = backends(maru_up.unix_url, pool)
    theirs = backends(maru_up.unix_url, pool)
    idx = kit.alloc_pages(pool, 3)
    kit.fill_pages(pool, idx, seed=12)
    assert mine.batch_set_v1(kit.page_hashes("mine", 3), idx) == [True] * 3
    assert theirs.batch_set_v1(kit.page_hashes("theirs", 2), idx[: 2 * pool.page_size]) == [True] * 2
    assert maru_up.stats()["keys"] == 5
    mine.clear()
    assert maru_up.stats()["keys"] == 2
    assert mine.batch_exists(kit.page_hashes("theirs", 2)) == 2
    assert mine.get_stats().maru["cleared"] == 3
    # The freed pages take new keys.
    assert mine.batch_set_v1(kit.page_hashes("again", 3), idx) == [True] * 3


def test_errors_from_maru_are_false_per_key_logged_and_counted(maru_up, backends, caplog):
    pool = kit.mha_host_pool("page_first")
    b = backends(maru_up.unix_url, pool)
    hashes = kit.page_hashes("err", 3)
    idx = kit.alloc_pages(pool, 3)
    assert b.batch_set_v1(hashes, idx) == [True] * 3
    maru_up.stop()  # the server goes away under the backend
    caplog.set_level(logging.WARNING, logger="maru_sglang")
    assert b.batch_exists(hashes) == 0
    assert b.batch_get_v1(hashes, idx) == [False] * 3
    assert b.batch_set_v1(kit.page_hashes("err2", 3), idx) == [False] * 3
    assert b.batch_get_v1(hashes, idx[:4]) == [False] * 3, "indices that do not cover the pages"
    metrics = b.get_stats()
    assert isinstance(metrics, StorageMetrics), "SGLang's scheduler asserts this type"
    assert metrics.maru["failed_keys"] >= 12
    assert {"batch_exists", "batch_get_v1", "batch_set_v1"} <= set(metrics.maru["errors"]), metrics.maru
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "maru_sglang"]
    assert any("batch_get_v1" in r.getMessage() for r in warned), [r.getMessage() for r in warned]


def test_storage_metrics_report_pages_and_bandwidth(maru_up, backends):
    pool = kit.mha_host_pool("page_first")
    b = backends(maru_up.unix_url, pool)
    hashes = kit.page_hashes("metrics", 2)
    idx = kit.alloc_pages(pool, 2)
    assert b.batch_set_v1(hashes, idx) == [True, True]
    assert b.batch_get_v1(hashes, idx) == [True, True]
    m = b.get_stats()
    assert m.backup_pgs == [2] and m.prefetch_pgs == [2]
    assert m.backup_bandwidth[0] > 0 and m.prefetch_bandwidth[0] > 0
    assert b.get_stats().prefetch_pgs == [], "per-batch lists are drained by each call"


READ_OPS = ("exists", "batch_exists", "pin", "batch_pin", "unpin", "batch_unpin", "lookup", "batch_lookup")


def read_round_trips(up: MaruUp) -> int:
    return sum(op_count(up, op) for op in READ_OPS)


def test_with_the_key_index_lookups_and_contiguous_page_copies_take_no_round_trip(maru_up, backends):
    writer, reader, src, dst, hashes, idx = stored(maru_up, backends, kit.mla_host_pool, "ix", 3, seed=21, mla=True)
    ps = src.page_size
    assert reader.handler.reads_index()

    before = read_round_trips(maru_up)
    assert reader.batch_exists(hashes + kit.page_hashes("ix-absent", 1)) == 3
    out = kit.alloc_pages(dst, 3)
    assert reader.batch_get_v1(hashes, out) == [True] * 3
    assert kit.digests(dst, out) == kit.digests(src, idx)
    assert read_round_trips(maru_up) == before, "lookups and copies came from shared memory"
    assert maru_up.stats()["pinned_keys"] == 0

    # Negative control: what the reader copies is what shared memory holds now.
    view = flip_stored_bytes(writer, hashes[0])
    assert reader.batch_get_v1(hashes[:1], out[:ps]) == [True]
    assert kit.digests(dst, out)[0] != kit.digests(src, idx)[0]
    del view

    # Gone between the lookup and the read: a clean miss, the host pages left as they were.
    assert reader.batch_exists(hashes) == 3
    writer.clear()
    untouched = kit.digests(dst, out)
    assert reader.batch_get_v1(hashes, out) == [False] * 3
    assert kit.digests(dst, out) == untouched
    m = reader.get_stats().maru
    assert (m["read_hits"], m["read_misses"], m["failed_keys"], m["errors"]) == (4, 3, 0, {})


def test_with_the_key_index_pages_in_two_runs_are_viewed_without_a_round_trip_or_pins(maru_up, backends):
    _, reader, src, dst, hashes, idx = stored(maru_up, backends, kit.mha_host_pool, "ix-mha", 2, seed=22)
    before = {op: op_count(maru_up, op) for op in ("batch_exists", "batch_pin", "batch_lookup", "batch_unpin")}
    assert reader.batch_exists(hashes) == 2
    out = kit.alloc_pages(dst, 2)
    assert reader.batch_get_v1(hashes, out) == [True, True]
    assert kit.digests(dst, out) == kit.digests(src, idx)
    after = {op: op_count(maru_up, op) for op in before}
    # The views came from the index, held in the reader's lane of the server's hold lanes.
    assert after == before, "no lookup, no pins"
    assert maru_up.stats()["pinned_keys"] == 0
