"""One engine's connector sides driven the way vLLM's scheduler and model runner drive them,
without vLLM's engine: real vLLM KV specs and cache views, a real Maru server, fake requests.

``Instance.prefill(tokens, blocks, step=...)`` runs a prompt through lookup, allocation,
metadata, load, per-layer saves and the end-of-step flush, step by step like chunked prefill,
and returns what each step did. Used by the tests that need many instances and exact control
(pins, deletions between lookup and load, parts, TP ranks) at in-process speed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from maru import MaruConfig, MaruHandler
from maru_vllm.dma import DmaRegistrar, decide
from maru_vllm.geometry import ChunkGeometry
from maru_vllm.keys import KeyScheme
from maru_vllm.layouts import detect_layout
from maru_vllm.metadata import MaruConnectorMetadata
from maru_vllm.scheduler import SchedulerSide
from maru_vllm.stats import Counters
from maru_vllm.worker import WorkerSide
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    compute_layout_strides,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

BLOCK = 32
NUM_BLOCKS = 64
LAYERS = 3
_ids = itertools.count()


def kv_cache_config(layers: int = LAYERS, spec: Any = None) -> KVCacheConfig:
    spec = spec or FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float32)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    layer_stride, block_stride, *_ = compute_layout_strides(spec, NUM_BLOCKS, layers, KVCacheLayout.LBHNC)
    tensor = KVCacheTensor(
        size=layer_stride * layers, layers=names, layer_stride=layer_stride, block_stride=block_stride
    )
    return KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[tensor],
        kv_cache_groups=[KVCacheGroupSpec(names, spec)],
        kv_cache_layout="LBHNC",
    )


@dataclass
class Request:
    prompt_token_ids: list[int]
    cache_salt: str | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    lora_request: Any = None
    mm_features: list[Any] = field(default_factory=list)


@dataclass
class _Blocks:
    ids: list[int]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (self.ids,)


@dataclass
class _NewReq:
    req_id: str
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int


@dataclass
class _Cached:
    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[Any] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    resumed_req_ids: set[str] = field(default_factory=set)


@dataclass
class _Output:
    scheduled_new_reqs: list[_NewReq]
    scheduled_cached_reqs: _Cached
    num_scheduled_tokens: dict[str, int]
    preempted_req_ids: set[str] = field(default_factory=set)


def detect_for_spec(
    spec: Any, caches: dict[str, torch.Tensor], layout_name: str, backend: Any, num_blocks: int, block_size: int
) -> Any:
    """detect_layout with the geometry taken from a KV cache spec, as the connector does."""
    return detect_layout(
        caches,
        layout_name=layout_name,
        backend=backend,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=spec.num_kv_heads,
        head_size=spec.head_size,
        num_heads=spec.num_heads,
        content_bytes=spec.state_content_size_bytes,
        block_bytes=spec.page_size_bytes,
    )


def handler(url: str, page: int, pool: int = 64 << 20, write_behind: bool = False) -> MaruHandler:
    h = MaruHandler(
        MaruConfig(
            server_url=url,
            pool_size=max(pool, page),
            chunk_size_bytes=page,
            auto_connect=False,
            write_behind=write_behind,
        )
    )
    assert h.connect()
    return h


class Instance:
    """A scheduler side and a TP rank's worker side on their own handlers and KV cache."""

    def __init__(
        self,
        url: str,
        *,
        chunk_tokens: int = 64,
        page_size: int | None = None,
        namespace: str = "",
        tp_rank: int = 0,
        tp_size: int = 1,
        config: KVCacheConfig | None = None,
    ) -> None:
        self.config = config or kv_cache_config()
        self.geometry = ChunkGeometry.from_kv_cache_config(self.config, chunk_tokens, page_size)
        self.keys = KeyScheme.build(
            chunk_tokens=chunk_tokens,
            tp_size=tp_size,
            num_parts=self.geometry.num_parts,
            namespace=namespace,
            model="sim",
            layout="LBHNC",
        )
        self.counters = Counters()
        self.sched_handler = handler(url, 4096)
        self.scheduler = SchedulerSide(self.sched_handler, self.geometry, self.keys, self.counters)
        spec = self.config.kv_cache_groups[0].kv_cache_spec
        tensor = self.config.kv_cache_tensors[0]
        self.raw = torch.zeros(tensor.size, dtype=torch.int8)
        names = self.config.kv_cache_groups[0].layer_names
        self.kv = dict(
            zip(names, create_kv_cache_views(self.raw, spec, NUM_BLOCKS, KVCacheLayout.LBHNC, tensor), strict=True)
        )
        layout = detect_for_spec(spec, self.kv, "LBHNC", CPUAttentionBackend, NUM_BLOCKS, BLOCK)
        self.worker_handler = handler(url, page_size or self.geometry.part_bytes(0), write_behind=True)
        self.worker = WorkerSide(
            self.worker_handler,
            self.geometry,
            self.keys,
            tp_rank,
            layout,
            self.kv,
            self.counters,
            DmaRegistrar(decide("cpu", cudart_available=False), None),
        )

    def fill(self, block_ids: list[int], seed: int) -> None:
        """Stands in for the forward pass: writes recognisable KV into `block_ids`."""
        g = torch.Generator().manual_seed(seed)
        for view in self.kv.values():
            for b in block_ids:
                view[b].copy_(torch.randn(view[b].shape, generator=g))

    def lookup(self, req: Request, local: int = 0) -> int:
        return self.scheduler.get_num_new_matched_tokens(req, local)[0]

    def prefill(
        self, req: Request, blocks: list[int], *, step: int | None = None, seed: int = 0, after_lookup: Any = None
    ) -> list[dict[str, Any]]:
        """Runs `req`'s prompt to its end; `step` caps the tokens per step (chunked prefill).
        The forward pass writes KV (``fill``) into blocks it computes. Returns, per step, the
        metadata and the load errors."""
        n = len(req.prompt_token_ids)
        ext = self.lookup(req)
        if after_lookup is not None:
            after_lookup()
        self.scheduler.update_state_after_alloc(req, _Blocks(blocks), ext)
        computed, steps, first = ext, [], True
        while computed < n:
            todo = n - computed if step is None else min(step, n - computed)
            if first:
                out = _Output([_NewReq(req.request_id, (blocks,), computed)], _Cached(), {req.request_id: todo})
            else:
                out = _Output([], _Cached([req.request_id], [None], [computed]), {req.request_id: todo})
            meta = self.scheduler.build_connector_meta(out)
            steps.append(self._run_step(meta, blocks, computed, todo, seed))
            failed = steps[-1]["failed_blocks"]
            if failed:
                # vLLM truncates the request at its first failed block and recomputes from there.
                computed = min(blocks.index(b) for b in failed) * BLOCK
            else:
                computed += todo
            first = False
        self.scheduler.request_finished(req)
        return steps

    def _run_step(
        self, meta: MaruConnectorMetadata, blocks: list[int], computed: int, todo: int, seed: int
    ) -> dict[str, Any]:
        self.worker.load(meta.loads)
        failed = self.worker.take_failed_blocks()
        first, last = computed // BLOCK, -(-(computed + todo) // BLOCK)
        self.fill([b for b in blocks[first:last]], seed * 1000 + first)
        for name in self.kv:
            self.worker.save_layer(name, meta)
        self.worker.finish_step()
        return {"meta": meta, "failed_blocks": failed, "totals": self.counters.totals()}

    def close(self) -> None:
        self.scheduler.shutdown()
        self.worker.close()
        self.worker_handler.close()
        self.sched_handler.close()
