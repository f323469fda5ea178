"""Real vLLM engines (CPU build, tiny dummy-weight model) sharing prefill KV through a real
``maru up``, each engine in a process of its own.

Four processes, two at a time (engine start dominates, so each runs several scenarios):

* round 1 — A: connector in namespace ``main``, chunked prefill (96-token steps), computes and
  stores prompts P, R and S.  C: no connector, the baseline for every prompt.
* round 2 — B: a fresh process in ``main``: P again (loaded), Pp sharing P's first 3 chunks
  (only those load), R with one chunk deleted between lookup and load (reported, recomputed),
  S after another client overwrote its chunks with random bytes (negative control), P with a
  ``cache_salt`` (no hits).  D: namespace ``other``, vLLM's engine in a separate process
  (the connector loaded there by module path): P must miss and be stored anew.

Proof that KV came from Maru does not rest on outputs alone: the connector's counters, the
server's key and pin counts (``maru stats --json``, from another process) and the negative
control, whose loaded bytes are garbage, all have to agree.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import start_maru_up

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vllm_tinymodel  # noqa: E402

T = 64  # tokens per chunk (two 32-token blocks)
LOGPROB_TOL = 1e-4

rng = random.Random(20261201)
P = [rng.randrange(3, 1000) for _ in range(5 * T + 10)]
PP = P[: 3 * T] + [rng.randrange(3, 1000) for _ in range(150)]
R = [rng.randrange(3, 1000) for _ in range(4 * T + 5)]
S = [rng.randrange(3, 1000) for _ in range(4 * T + 5)]
DELETED_CHUNK = 1


def _launch(tmp: Path, name: str, plan: dict[str, Any]) -> tuple[subprocess.Popen[bytes], Path, Path]:
    plan = {**plan, "out": str(tmp / f"{name}.json")}
    plan_path = tmp / f"{name}.plan.json"
    plan_path.write_text(json.dumps(plan))
    log = tmp / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "vllm_engine_child.py"), str(plan_path)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    return proc, log, Path(plan["out"])


def _wait(children: dict[str, tuple[subprocess.Popen[bytes], Path, Path]], timeout: float = 480) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    out = {}
    for name, (proc, log, result) in children.items():
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p, _, _ in children.values():
                p.kill()
            pytest.fail(f"engine {name} did not finish in {timeout:.0f} s:\n{log.read_text()[-6000:]}")
        if rc != 0:
            pytest.fail(f"engine {name} exited with {rc}:\n{log.read_text()[-8000:]}")
        out[name] = json.loads(result.read_text())
    return out


def _gen(name: str, prompt: list[int], **extra: Any) -> dict[str, Any]:
    return {"op": "generate", "name": name, "prompt": prompt, **extra}


@pytest.fixture(scope="module")
def run() -> Any:
    up = start_maru_up()
    tmp = Path(tempfile.mkdtemp(prefix="maru-vllm-"))
    try:
        model = str(vllm_tinymodel.write_config(tmp / "model"))
        url = up.unix_url
        base = {"model": model, "server_url": url}

        def conn(ns: str) -> dict[str, Any]:
            return {"maru_server_url": url, "maru_kv_chunk_tokens": T, "maru_namespace": ns, "maru_pool_size": "64M"}

        children = {
            "A": _launch(
                tmp,
                "A",
                {
                    **base,
                    "connector": conn("main"),
                    "engine": {"max_num_batched_tokens": 96},
                    "steps": [_gen("P", P), _gen("R", R), _gen("S", S)],
                },
            ),
            "C": _launch(
                tmp,
                "C",
                {**base, "connector": None, "steps": [_gen("P", P), _gen("Pp", PP), _gen("R", R), _gen("S", S)]},
            ),
        }
        r1 = _wait(children)
        after_a = up.stats()
        children = {
            "B": _launch(
                tmp,
                "B",
                {
                    **base,
                    "connector": conn("main"),
                    "steps": [
                        _gen("P", P),
                        _gen("Pp", PP),
                        _gen("R", R, delete_chunk=DELETED_CHUNK),
                        {"op": "corrupt", "name": "corrupt", "prompt": S},
                        _gen("S", S),
                        _gen("Psalt", P, salt="tenant-b"),
                    ],
                },
            ),
            "D": _launch(
                tmp, "D", {**base, "connector": conn("other"), "multiprocessing": True, "steps": [_gen("P", P)]}
            ),
        }
        r2 = _wait(children)
        yield {**r1, **r2, "after_a": after_a, "after_all": up.stats(), "tmp": tmp}
    finally:
        up.stop()
        shutil.rmtree(up.dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _same_logprobs(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= LOGPROB_TOL for k in a)


def _step(run: Any, engine: str, name: str) -> dict[str, Any]:
    s: dict[str, Any] = run[engine]["steps"][name]
    return s


def test_a_stores_every_complete_chunk_of_a_chunked_prefill(run: Any) -> None:
    chunks = {"P": len(P) // T, "R": len(R) // T, "S": len(S) // T}
    for name, n in chunks.items():
        c = _step(run, "A", name)["connector"]
        assert (c["stored_chunks"], c["hit_chunks"], c["store_errors"]) == (n, 0, 0), (name, c)
    assert run["after_a"]["keys"] == sum(chunks.values())
    assert run["after_a"]["pinned_keys"] == 0


def test_b_loads_the_prompt_a_computed(run: Any) -> None:
    c = _step(run, "B", "P")["connector"]
    # The last token is always computed: all 5 chunks (320 tokens) of a 330-token prompt.
    assert c["hit_tokens"] == 5 * T, c
    assert (c["loaded_chunks"], c["loaded_tokens"], c["load_errors"]) == (5, 5 * T, 0), c
    assert c["stored_chunks"] == 0 and c["unpinned_keys"] == c["pinned_keys"] == 5, c


def test_b_matches_the_baseline_without_connector(run: Any) -> None:
    b, c = _step(run, "B", "P"), _step(run, "C", "P")
    assert _same_logprobs(b["logprobs"], c["logprobs"]), (b["logprobs"], c["logprobs"])
    assert b["tokens"] == c["tokens"]
    assert _step(run, "A", "P")["tokens"] == c["tokens"]


def test_server_saw_the_loads_from_another_process(run: Any) -> None:
    before, after = run["after_a"]["ops"], run["after_all"]["ops"]

    def count(ops: dict[str, Any], op: str) -> int:
        return int(ops.get(op, {}).get("count", 0))

    for op in ("batch_pin", "batch_lookup", "batch_unpin"):
        assert count(after, op) > count(before, op), op
    # Which chunks exist (the scheduler's lookups, the worker's checks before a store) comes
    # from the server's key index in shared memory: no round trip.
    assert count(after, "batch_exists") == count(before, "batch_exists")


def test_shared_prefix_loads_only_the_shared_chunks(run: Any) -> None:
    c = _step(run, "B", "Pp")["connector"]
    assert (c["hit_chunks"], c["hit_tokens"], c["loaded_chunks"]) == (3, 3 * T, 3), c
    assert c["stored_chunks"] == len(PP) // T - 3, c
    assert _same_logprobs(_step(run, "B", "Pp")["logprobs"], _step(run, "C", "Pp")["logprobs"])


def test_chunk_deleted_between_lookup_and_load_is_reported_and_recomputed(run: Any) -> None:
    s = _step(run, "B", "R")
    c = s["connector"]
    assert s["deleted"] == [True], s
    assert (c["hit_chunks"], c["load_errors"], c["load_error_blocks"]) == (4, 1, T // 32), c
    assert c["loaded_chunks"] == 3, c
    # vLLM recomputed from the failed block and the connector stored the missing chunk again.
    assert c["stored_chunks"] == 1 and c["store_skipped_chunks"] >= 1, c
    assert _same_logprobs(s["logprobs"], _step(run, "C", "R")["logprobs"])
    assert s["tokens"] == _step(run, "C", "R")["tokens"]


def test_negative_control_overwritten_chunks_change_the_output(run: Any) -> None:
    assert _step(run, "B", "corrupt")["replaced"] == len(S) // T
    s = _step(run, "B", "S")
    assert s["connector"]["loaded_chunks"] == len(S) // T, s["connector"]
    base = _step(run, "C", "S")["logprobs"]
    assert not _same_logprobs(s["logprobs"], base), (s["logprobs"], base)
    # A's own S, computed and never loaded, does match.
    assert _same_logprobs(_step(run, "A", "S")["logprobs"], base)


def test_cache_salt_separates_requests(run: Any) -> None:
    c = _step(run, "B", "Psalt")["connector"]
    assert (c["hit_chunks"], c["hit_tokens"], c["stored_chunks"]) == (0, 0, len(P) // T), c
    assert _same_logprobs(_step(run, "B", "Psalt")["logprobs"], _step(run, "C", "P")["logprobs"])


def test_namespaces_never_share_and_the_engine_process_connector_works(run: Any) -> None:
    """D (namespace ``other``, connector inside vLLM's engine process) ran the prompt A stored:
    it must have missed and stored its own copy. The server's key count says so: every other
    change to it is accounted for by B's own counters."""
    b = {k: sum(s.get("connector", {}).get(k, 0) for s in run["B"]["steps"].values()) for k in ("stored_chunks",)}
    deleted = sum(_step(run, "B", "R")["deleted"])
    d_stored = run["after_all"]["keys"] - run["after_a"]["keys"] - b["stored_chunks"] + deleted
    assert d_stored == len(P) // T, (run["after_a"]["keys"], run["after_all"]["keys"], b, deleted)
    assert _same_logprobs(_step(run, "D", "P")["logprobs"], _step(run, "C", "P")["logprobs"])


def test_no_pins_or_requests_left_behind(run: Any) -> None:
    assert run["after_all"]["pinned_keys"] == 0
    for engine in ("A", "B"):
        assert run[engine]["tracked_requests"] == 0, engine
