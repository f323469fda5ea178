"""Two SGLang instances on one host share one L3: this process writes pages from its host pools
with batch_set_v1, another process (reader_child.py) loads them into its own host pools with
batch_exists + batch_get_v1, and the bytes match page for page."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import sglang_kit as kit
from conftest import run_child

HERE = Path(__file__).resolve().parent


def test_pages_written_by_one_process_load_into_another_processs_host_pool(maru_up):
    url = maru_up.unix_url
    hashes = {
        "mha": kit.page_hashes("x-mha", 6),
        "mla": kit.page_hashes("x-mla", 4),
        "ns": kit.page_hashes("x-ns", 2),
    }
    # page_first_direct pages under the same page hashes: the format in the key keeps them apart.
    hashes["direct"] = hashes["mha"][:3]
    made = []

    def write(group, pool, seed, **kw):
        b = kit.create_backend(kit.storage_config(url, **kw), pool)
        made.append(b)
        idx = kit.alloc_pages(pool, len(hashes[group]))
        kit.fill_pages(pool, idx, seed)
        assert b.batch_set_v1(hashes[group], idx) == [True] * len(hashes[group]), group
        return b, kit.digests(pool, idx)

    try:
        mha, mha_digests = write("mha", kit.mha_host_pool("page_first"), 21, tp_rank=0, tp_size=2)
        _, direct_digests = write(
            "direct",
            kit.mha_host_pool("page_first_direct"),
            22,
            tp_rank=0,
            tp_size=2,
            layout="page_first_direct",
        )
        _, mla_digests = write("mla", kit.mla_host_pool("page_first"), 23, mla=True, tp_rank=0, tp_size=2)
        _, ns_digests = write("ns", kit.mha_host_pool("page_first"), 24, namespace="alpha")
        assert maru_up.stats()["keys"] == 6 + 3 + 4 + 2

        # Negative control: bytes changed in shared memory after the store are what the other
        # process loads, so its pages come from shared memory and nowhere else.
        view = mha.handler.retrieve(mha.keys.key(hashes["mha"][4])).view
        view[:64] = bytes(x ^ 0x5A for x in view[:64])
        altered = hashlib.sha256(bytes(view)).hexdigest()
        assert altered != mha_digests[4]

        # The child reads over TCP, this process wrote over the Unix socket.
        child = run_child(
            "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
            str(HERE / "reader_child.py"),
            str(HERE),
            maru_up.tcp_url,
            json.dumps(hashes),
        )
        report = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        for b in made:
            b.close()

    tp0 = report["mha_tp0"]
    assert tp0["hits"] == 6 and tp0["ok"] == [True] * 6
    assert tp0["digests"][:4] + tp0["digests"][5:] == mha_digests[:4] + mha_digests[5:]
    assert tp0["digests"][4] == altered, "the altered page loads as altered"

    assert report["mha_tp1"]["hits"] == 0 and report["mha_tp1"]["ok"] == [False] * 6, (
        "TP rank 1 holds other heads"
    )

    direct = report["mha_direct"]
    assert direct["ok"] == [True] * 3 and direct["digests"] == direct_digests
    assert direct["digests"] != mha_digests[:3]

    mla = report["mla_tp1"]
    assert mla["hits"] == 4 and mla["ok"] == [True] * 4 and mla["digests"] == mla_digests, (
        "rank 1 reads rank 0's MLA pages"
    )

    assert report["ns_alpha"]["ok"] == [True] * 2 and report["ns_alpha"]["digests"] == ns_digests
    assert report["ns_beta"]["hits"] == 0 and report["ns_beta"]["ok"] == [False] * 2

    for name, r in report.items():
        assert r["maru"]["failed_keys"] == 0 and not r["maru"]["errors"], (name, r["maru"])
    s = maru_up.stats()
    assert s["pinned_keys"] == 0, "the reader released every pin"
    assert s["keys"] == 15, "reads add no keys"
    # The reader's loads reached the server: asked (`batch_lookup`), or viewed in its hold lane
    # and told as hits with its next request (`hit`, at the latest with its goodbye).
    loads = s["ops"].get("batch_lookup", {}).get("count", 0) + s["ops"].get("hit", {}).get("count", 0)
    assert loads >= 4, s["ops"]
