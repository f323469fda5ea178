"""Time to first token of a long prompt in real vLLM (CPU build): recomputed vs loaded from
Maru, and the connector's load time against a plain memcpy of the same KV bytes, in one run.

    ./scripts/frameworks.sh vllm            # prints the venv's python
    VENV_PY benchmarks/vllm_ttft.py [--tokens 4096] [--prompts 3] [--json out.json]

It starts its own ``maru up`` and three engine processes one after the other (never two at
once, so they do not share the CPUs), each with the same dummy-weight model:

* ``baseline``: no connector. TTFT of each prompt, computed from scratch.
* ``writer``: the connector; computes and stores each prompt (TTFT includes the stores).
* ``reader``: a fresh process with the connector; loads each prompt's KV from Maru, several
  times (``--repeat``). Per load: TTFT, the connector's load time (lookup excluded: the
  retrieve round trip and the copies into the KV blocks; the unpins overlap the forward pass)
  and the retrieve round trip on its own, and in the same process a memcpy of the same number
  of bytes between two ordinary buffers (one libc call, and torch's threaded copy), and the
  connector's block copies of those bytes from ordinary buffers into the same KV blocks (minus
  shared memory and round trips), each with caches flushed first as the load's are.

Every engine first runs one throw-away prompt of the same length (its first long prefill pays
one-off kernel set-up; the reader's is also its first load from the writer's region, whose
pages this process has not faulted in yet: reported on its own). TTFT is the wall time of
``generate(max_tokens=1)``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from maru_up import maru_up

REPO = Path(__file__).resolve().parents[1]
MODEL = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32000,
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "float32",
    "tie_word_embeddings": False,
}
CHUNK_TOKENS = 256


def _maru_binary() -> str:
    for candidate in (os.environ.get("MARU_BIN_DIR", ""), str(REPO / "target" / "release")):
        if candidate and (Path(candidate) / "maru").is_file():
            return str(Path(candidate) / "maru")
    found = shutil.which("maru", path=str(Path(sys.executable).parent))
    if found:
        return found
    raise SystemExit("no `maru` binary: build it (cargo build --release --bins) or set MARU_BIN_DIR")


# ---------------------------------------------------------------------------- child side


def _child(role: str, plan: dict[str, Any]) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "3")
    import torch
    from maru_vllm.launch import cpu_engine, kv_transfer_config
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    kv = None
    if role != "baseline":
        kv = kv_transfer_config(
            {
                "maru_server_url": plan["url"],
                "maru_kv_chunk_tokens": CHUNK_TOKENS,
                "maru_pool_size": "512M",
            }
        )
    n = plan["tokens"]
    llm = cpu_engine(
        plan["model"],
        kv,
        load_format="dummy",
        block_size=32,
        max_model_len=n + 64,
        max_num_batched_tokens=n + 64,
        max_num_seqs=1,
    )
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

    def ttft(tokens: list[int]) -> float:
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)
        return time.perf_counter() - t0

    worker = None
    if kv is not None:
        from maru_vllm.connector import live_connectors

        worker = next(c for c in live_connectors() if c._worker is not None)
    before = worker.totals() if worker else {}
    warmup = {"ttft_s": ttft(plan["warmup"])}
    if worker:
        after = worker.totals()
        warmup.update({k: after[k] - before[k] for k in ("loaded_bytes", "load_seconds")})
    rows = []
    counted = (
        "loaded_bytes",
        "load_seconds",
        "load_retrieve_seconds",
        "loaded_tokens",
        "stored_bytes",
        "store_seconds",
        "load_errors",
    )
    for prompt in plan["prompts"]:
        # The reader loads each prompt `repeat` times (vLLM's own prefix cache is off, so every
        # generation loads from Maru again): the first load of a prompt and steady state.
        for rep in range(plan["repeat"] if role == "reader" else 1):
            before = worker.totals() if worker else {}
            t = ttft(prompt)
            after = worker.totals() if worker else {}
            row: dict[str, Any] = {"ttft_s": t, "repetition": rep}
            for k in counted:
                if after:
                    row[k] = after[k] - before[k]
            if role == "reader":
                row.update(_copy_floors(worker, row["loaded_bytes"], torch))
            rows.append(row)
    return {"role": role, "rows": rows, "warmup": warmup}


def _copy_floors(conn: Any, nbytes: int, torch: Any) -> dict[str, float]:
    """Floors for the same number of bytes, in the same process, each the best of 5: one libc
    memcpy between two ordinary buffers, torch's (multi-threaded) copy of them, and the
    connector's own block copies (``scatter_blocks``) from ordinary buffers into the same KV
    blocks (its copy without shared memory and round trips). The connector reads chunks another
    process wrote long before, so each copy starts with caches flushed (a 256 MiB read); the
    memcpy is also measured hot (source and destination just touched) for reference."""
    import ctypes

    from maru_vllm.layouts import scatter_blocks

    w = conn._worker
    blocks = w._blocks
    per_layer_blocks = nbytes // (w._g.block_bytes * len(blocks))
    ids = list(range(1, 1 + per_layer_blocks))
    srcs = [torch.empty((per_layer_blocks, *w._layout.block_shape), dtype=w._layout.dtype).normal_() for _ in blocks]
    flat_src = torch.empty(nbytes, dtype=torch.uint8).random_()
    flat_dst = torch.empty(nbytes, dtype=torch.uint8).zero_()
    evict = torch.ones(256 << 20, dtype=torch.uint8)

    def cold() -> None:
        int(evict[::64].sum())  # one read per cache line

    def memcpy() -> None:
        ctypes.memmove(flat_dst.data_ptr(), flat_src.data_ptr(), nbytes)

    def torch_copy() -> None:
        flat_dst.copy_(flat_src)

    def block_copy() -> None:
        for b, src in zip(blocks, srcs, strict=True):
            scatter_blocks(b, ids, src)

    def best(fn: Any, flush: bool) -> float:
        out = float("inf")
        for _ in range(5):
            if flush:
                cold()
            t0 = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t0)
        return out

    return {
        "memcpy_s": best(memcpy, True),
        "memcpy_hot_s": best(memcpy, False),
        "torch_copy_s": best(torch_copy, True),
        "block_copy_s": best(block_copy, True),
    }


# ---------------------------------------------------------------------------- driver


def _run_child(role: str, plan: dict[str, Any], tmp: Path) -> dict[str, Any]:
    plan_path, out_path, log = tmp / f"{role}.plan.json", tmp / f"{role}.out.json", tmp / f"{role}.log"
    plan_path.write_text(json.dumps(plan))
    t0 = time.perf_counter()
    rc = subprocess.run(
        [sys.executable, __file__, "--child", role, str(plan_path), str(out_path)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        timeout=1800,
    ).returncode
    if rc != 0:
        raise SystemExit(f"{role} engine failed ({rc}):\n{log.read_text()[-6000:]}")
    doc: dict[str, Any] = json.loads(out_path.read_text())
    print(f"  {role}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="loads of each prompt in the reader")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        role, plan_path, out = args.child
        Path(out).write_text(json.dumps(_child(role, json.loads(Path(plan_path).read_text()))))
        return
    with maru_up(_maru_binary(), pool_size="2G", prefix="maru-ttft-") as (ready, tmp):
        (tmp / "model").mkdir()
        (tmp / "model" / "config.json").write_text(json.dumps(MODEL))
        rng = random.Random(4096)
        draw = lambda: [rng.randrange(3, MODEL["vocab_size"]) for _ in range(args.tokens)]  # noqa: E731
        plan = {
            "model": str(tmp / "model"),
            "url": ready["unix"],
            "tokens": args.tokens,
            "warmup": draw(),
            "prompts": [draw() for _ in range(args.prompts)],
            "repeat": args.repeat,
        }
        print(
            f"vllm_ttft: {args.tokens}-token prompts x {args.prompts}, model {MODEL['num_hidden_layers']} layers x "
            f"hidden {MODEL['hidden_size']}, fp32, chunks of {CHUNK_TOKENS} tokens",
            file=sys.stderr,
        )
        start = os.getloadavg()[0]
        results: dict[str, Any] = {role: _run_child(role, plan, tmp) for role in ("baseline", "writer", "reader")}
        results["loadavg"] = [start, os.getloadavg()[0]]
    report = summarize(results, args.tokens)
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps({"report": report, "raw": results}, indent=1))


def summarize(results: dict[str, Any], tokens: int) -> dict[str, Any]:
    def values(role: str, key: str) -> list[float]:
        return [r[key] for r in results[role]["rows"]]

    def med(role: str, key: str) -> float:
        return statistics.median(values(role, key))

    reader = results["reader"]["rows"]
    return {
        "tokens": tokens,
        "prompts": len(results["baseline"]["rows"]),
        "loads": len(reader),
        "ttft_recompute_s": med("baseline", "ttft_s"),
        "ttft_recompute_and_store_s": med("writer", "ttft_s"),
        "ttft_loaded_s": med("reader", "ttft_s"),
        "speedup": med("baseline", "ttft_s") / med("reader", "ttft_s"),
        "kv_bytes": med("reader", "loaded_bytes"),
        "loaded_tokens": med("reader", "loaded_tokens"),
        "load_s": med("reader", "load_seconds"),
        "load_best_s": min(values("reader", "load_seconds")),
        "retrieve_s": med("reader", "load_retrieve_seconds"),
        "first_load_s": results["reader"]["warmup"].get("load_seconds", 0.0),
        "first_load_bytes": results["reader"]["warmup"].get("loaded_bytes", 0),
        "memcpy_s": med("reader", "memcpy_s"),
        "memcpy_best_s": min(values("reader", "memcpy_s")),
        "memcpy_hot_s": med("reader", "memcpy_hot_s"),
        "torch_copy_s": med("reader", "torch_copy_s"),
        "block_copy_s": med("reader", "block_copy_s"),
        "load_vs_memcpy": med("reader", "load_seconds") / med("reader", "memcpy_s"),
        "load_vs_memcpy_best": min(values("reader", "load_seconds")) / min(values("reader", "memcpy_s")),
        "store_s": med("writer", "store_seconds"),
        "load_errors": sum(r["load_errors"] for r in reader),
        "loadavg_start": results["loadavg"][0],
        "loadavg_end": results["loadavg"][1],
    }


def render(r: dict[str, Any]) -> str:
    mb = r["kv_bytes"] / 1e6

    def ms(x: float) -> str:
        return f"{x * 1e3:.1f} ms"

    return "\n".join(
        [
            f"{r['tokens']}-token prompts: {r['prompts']} recomputed per engine, {r['loads']} loads; "
            f"1-minute load average {r['loadavg_start']:.1f} at start, {r['loadavg_end']:.1f} at end.",
            "",
            "| | median |",
            "|---|---|",
            f"| TTFT, recomputed (no connector) | {r['ttft_recompute_s'] * 1e3:.0f} ms |",
            f"| TTFT, recomputed and stored (writer) | {r['ttft_recompute_and_store_s'] * 1e3:.0f} ms |",
            f"| TTFT, loaded from Maru (reader) | {r['ttft_loaded_s'] * 1e3:.0f} ms |",
            f"| TTFT speed-up | {r['speedup']:.1f}x |",
            f"| KV loaded per prompt | {r['loaded_tokens']:.0f} tokens, {mb:.1f} MB |",
            f"| connector load (retrieve + copies; median, best) | {ms(r['load_s'])}, {ms(r['load_best_s'])} "
            f"({mb / 1e3 / r['load_s']:.1f} GB/s median) |",
            f"| of which the batch_retrieve round trip | {ms(r['retrieve_s'])} |",
            f"| memcpy of the same bytes, one libc call, caches flushed (median, best) | {ms(r['memcpy_s'])}, "
            f"{ms(r['memcpy_best_s'])} |",
            f"| the same memcpy with source and destination in cache | {ms(r['memcpy_hot_s'])} |",
            f"| torch's threaded copy of the same bytes, caches flushed | {ms(r['torch_copy_s'])} |",
            f"| the connector's block copies from private memory into the KV blocks, caches flushed | "
            f"{ms(r['block_copy_s'])} |",
            f"| load / memcpy (medians; bests) | {r['load_vs_memcpy']:.2f}; {r['load_vs_memcpy_best']:.2f} |",
            f"| the reader's first load (its warm-up prompt: the writer's region not yet faulted in) | "
            f"{ms(r['first_load_s'])} for {r['first_load_bytes'] / 1e6:.1f} MB |",
            f"| writer's store time per prompt (copies + registration) | {ms(r['store_s'])} |",
            f"| load errors | {r['load_errors']} |",
        ]
    )


if __name__ == "__main__":
    main()
