"""One real vLLM engine (CPU build, tiny dummy-weight model) running several scenarios in
sequence, so the ~40 s engine start is paid once per process:

    python vllm_engine_child.py PLAN.json

PLAN holds the model directory, the connector's extra config (null: no connector), whether
vLLM runs its engine in a separate process, and a list of steps:

* ``{"op": "generate", "name", "prompt", "salt"?, "delete_chunk"?}`` — greedy generation;
  records the tokens, the first token's top-5 logprobs, the time to first token and (when the
  connector runs in this process) what the connector counted during the call. With
  ``delete_chunk: k`` the scheduler's pins of chunk k end (as when their lease runs out) right
  after its lookup took them, and another Maru client deletes the keys: between lookup and load.
* ``{"op": "corrupt", "name", "prompt"}`` — another Maru client replaces every stored chunk
  of `prompt` with random bytes of the same size.

The result document is written to ``PLAN["out"]``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _connectors() -> tuple[Any, Any]:
    from maru_vllm.connector import live_connectors

    sched = work = None
    for c in live_connectors():
        if c._scheduler is not None:
            sched = c
        if c._worker is not None:
            work = c
    return sched, work


def _totals() -> dict[str, float]:
    out: dict[str, float] = {}
    for c in _connectors():
        if c is not None:
            for k, v in c.totals().items():
                out[k] = out.get(k, 0) + v
    return out


def _side_handler(url: str) -> Any:
    from maru import MaruConfig, MaruHandler

    h = MaruHandler(MaruConfig(server_url=url, pool_size=64 << 20, chunk_size_bytes=4 << 20, auto_connect=False))
    if not h.connect():
        raise RuntimeError(f"cannot connect to {url}")
    return h


def _chunk_keys(prompt: list[int], salt: str | None) -> list[list[str]]:
    from maru_vllm.keys import request_salt

    sched, _ = _connectors()
    ks = sched.key_scheme

    class _R:
        cache_salt = salt
        lora_request = None

    return [ks.all_keys(h) for h in ks.chunk_hashes(prompt, request_salt(_R()))]


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if plan.get("multiprocessing") else "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Spawned engine and worker processes import the test modules too.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, str(HERE))
    import vllm_tinyloader
    from maru_vllm.launch import cpu_engine, kv_transfer_config
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = dict(block_size=32, max_model_len=4096, max_num_batched_tokens=512, max_num_seqs=4)
    engine.update(plan.get("engine", {}))
    kv = None
    if plan.get("connector") is not None:
        kv = kv_transfer_config(plan["connector"])
    t0 = time.perf_counter()
    llm = cpu_engine(
        plan["model"],
        kv,
        load_format=vllm_tinyloader.LOAD_FORMAT,
        worker_extension_cls="vllm_tinyloader.Extension",
        seed=0,
        **engine,
    )
    started = time.perf_counter() - t0
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=5, detokenize=False)
    # The first generation of an engine pays one-off warm-up; a prompt shorter than a chunk
    # keeps it out of the store.
    llm.generate([TokensPrompt(prompt_token_ids=list(range(3, 23)))], SamplingParams(max_tokens=1), use_tqdm=False)
    side = _side_handler(plan["server_url"]) if plan.get("server_url") else None
    results: dict[str, Any] = {"engine_start_s": started, "steps": {}}
    for step in plan["steps"]:
        name = step["name"]
        if step["op"] == "corrupt":
            replaced = 0
            for keys in _chunk_keys(step["prompt"], step.get("salt")):
                for key in keys:
                    info = side.retrieve(key)
                    size = len(info.view)
                    if not side.delete(key):
                        raise RuntimeError(f"could not delete {key} (pinned?)")
                    side.store(key, data=os.urandom(size))
                    replaced += 1
            side.flush()
            results["steps"][name] = {"replaced": replaced}
            continue
        hook = None
        if step.get("delete_chunk") is not None:
            sched, _ = _connectors()
            victim = _chunk_keys(step["prompt"], step.get("salt"))[step["delete_chunk"]]
            original = sched._scheduler.get_num_new_matched_tokens
            deleted: list[bool] = []

            def hooked(
                request: Any,
                num_computed: int,
                _orig: Any = original,
                _victim: list[str] = victim,
                _deleted: list[bool] = deleted,
                _sched: Any = sched._scheduler_handler,
            ) -> tuple[int, bool]:
                out = _orig(request, num_computed)
                if out[0] and not _deleted:
                    for key in _victim:
                        # The pin ends as if its lease ran out; then another client deletes.
                        _sched.unpin(key)
                        _deleted.append(side.delete(key))
                return out

            sched._scheduler.get_num_new_matched_tokens = hooked
            hook = (sched, original, deleted)
        before = _totals()
        t1 = time.perf_counter()
        prompt = TokensPrompt(prompt_token_ids=step["prompt"])
        if step.get("salt") is not None:
            prompt["cache_salt"] = step["salt"]
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        elapsed = time.perf_counter() - t1
        after = _totals()
        first = out.outputs[0].logprobs[0]
        rec: dict[str, Any] = {
            "tokens": list(out.outputs[0].token_ids),
            "logprobs": {str(t): lp.logprob for t, lp in first.items()},
            "seconds": elapsed,
            "connector": {k: after.get(k, 0) - before.get(k, 0) for k in after},
        }
        if hook is not None:
            sched, original, deleted = hook
            sched._scheduler.get_num_new_matched_tokens = original
            rec["deleted"] = deleted
        results["steps"][name] = rec
    sched, _ = _connectors()
    if sched is not None:
        results["tracked_requests"] = sched._scheduler.tracked_requests
    if side is not None:
        side.close()
    Path(plan["out"]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
