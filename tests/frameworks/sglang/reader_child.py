"""The reading SGLang instance of test_cross_process.py, in a process of its own.

argv: <dir of sglang_kit> <server url> <json: page hashes by group>. Builds fresh host pools,
creates MaruStorage backends through SGLang's factory, loads with batch_exists +
batch_get_v1, and prints one JSON document: hit counts, per-key results and page digests.
"""

import json
import sys

sys.path.insert(0, sys.argv[1])

import sglang_kit as kit  # noqa: E402

url = sys.argv[2]
hashes = json.loads(sys.argv[3])
report = {}
backends = []


def load(name, pool, keys, **kw):
    b = kit.create_backend(kit.storage_config(url, **kw), pool)
    backends.append(b)
    out = kit.alloc_pages(pool, len(keys))
    hits = b.batch_exists(keys)
    ok = b.batch_get_v1(keys, out)
    report[name] = {"hits": hits, "ok": ok, "digests": kit.digests(pool, out), "maru": b.get_stats().maru}


load("mha_tp0", kit.mha_host_pool("page_first"), hashes["mha"], tp_rank=0, tp_size=2)
load("mha_tp1", kit.mha_host_pool("page_first"), hashes["mha"], tp_rank=1, tp_size=2)
load(
    "mha_direct",
    kit.mha_host_pool("page_first_direct"),
    hashes["direct"],
    tp_rank=0,
    tp_size=2,
    layout="page_first_direct",
)
load("mla_tp1", kit.mla_host_pool("page_first"), hashes["mla"], mla=True, tp_rank=1, tp_size=2)
load("ns_alpha", kit.mha_host_pool("page_first"), hashes["ns"], namespace="alpha")
load("ns_beta", kit.mha_host_pool("page_first"), hashes["ns"], namespace="beta")
for b in backends:
    b.close()
print(json.dumps(report))
