"""``MaruKVConnector``: vLLM instances share prefill KV through Maru, with no middleware.

    --kv-transfer-config '{"kv_connector": "MaruKVConnector",
                           "kv_connector_module_path": "maru_vllm.connector",
                           "kv_role": "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"maru_server_url": "unix:///dev/shm/maru/maru-5555.sock"}}'

vLLM creates one instance per role: the scheduler's (lookups and pins, ``scheduler.py``) and
one per worker (copies, ``worker.py``), in one process or in vLLM's engine and worker
processes. Both derive the same chunk geometry and keys from the engine's configuration
(``geometry.py``, ``keys.py``); the worker checks the registered KV tensors against the
layout vLLM declares (``layouts.py``) and refuses to start on anything it cannot copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .config import ConnectorConfig
from .dma import DmaRegistrar, cudart, decide
from .geometry import ChunkGeometry
from .keys import KeyScheme
from .layouts import declared_layout_name, detect_layout
from .metadata import MaruConnectorMetadata
from .scheduler import SchedulerSide
from .stats import Counters, MaruKVConnectorStats
from .worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["MaruKVConnector", "live_connectors"]

logger = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[MaruKVConnector] = weakref.WeakSet()

try:
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    _HOST = CacheHitSource.HOST
except ImportError:  # older vLLM: no per-source hit accounting
    _HOST = None


def live_connectors() -> list[MaruKVConnector]:
    """The connectors of this process (the scheduler's and the worker's when vLLM runs both
    in one process), for operators and tests."""
    return list(_LIVE)


def _model_identity(vllm_config: VllmConfig) -> dict[str, str]:
    mc = vllm_config.model_config
    hf = getattr(mc, "hf_text_config", None) or getattr(mc, "hf_config", None)
    try:
        hf_doc = json.dumps(hf.to_dict(), sort_keys=True, default=str) if hf is not None else ""
    except Exception:
        hf_doc = repr(hf)
    return {
        "model": str(mc.model),
        "revision": str(getattr(mc, "revision", None)),
        "quantization": str(getattr(mc, "quantization", None)),
        "dtype": str(mc.dtype),
        "hf_config": hashlib.blake2b(hf_doc.encode(), digest_size=16).hexdigest(),
    }


def _check_parallelism(vllm_config: VllmConfig) -> None:
    pc = vllm_config.parallel_config
    for name in ("pipeline_parallel_size", "decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(pc, name, 1) != 1:
            raise ValueError(
                f"MaruKVConnector does not support {name}={getattr(pc, name)} (tensor parallelism is supported)"
            )


def _resolved_layout(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> str | None:
    return getattr(kv_cache_config, "kv_cache_layout", None) or getattr(
        vllm_config.cache_config, "kv_cache_layout", None
    )


def _attention_backend(vllm_config: VllmConfig, layer_names: list[str] | None) -> Any:
    from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends

    backends = get_current_attn_backends(vllm_config, layer_names)
    if len(backends) != 1:
        raise ValueError(f"the KV layers use {len(backends)} attention backends {backends}; MaruKVConnector needs one")
    return backends[0]


class MaruKVConnector(KVConnectorBase_V1):
    """A ``KVConnectorBase_V1`` for both roles. See the module docstring for the flags and
    docs/VLLM.md for sharing, namespaces and failure behaviour."""

    if _HOST is not None:
        _cache_hit_source = _HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if kv_cache_config is None:
            raise ValueError("MaruKVConnector needs a vLLM that passes kv_cache_config to its KV connectors")
        _check_parallelism(vllm_config)
        self._cfg = ConnectorConfig.from_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        self._geometry = ChunkGeometry.from_kv_cache_config(
            kv_cache_config, self._cfg.chunk_tokens, self._cfg.page_size
        )
        spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
        resolved = _resolved_layout(vllm_config, kv_cache_config)
        self._layout_name = declared_layout_name(
            resolved_layout=resolved,
            backend=None if resolved is not None else _attention_backend(vllm_config, None),
            block_size=self._geometry.block_size,
            num_kv_heads=int(getattr(spec, "num_kv_heads", 1)),
            head_size=int(spec.head_size),
            cache_dtype=str(vllm_config.cache_config.cache_dtype),
        )
        self._tp_size = vllm_config.parallel_config.tensor_parallel_size
        self._keys = KeyScheme.build(
            chunk_tokens=self._geometry.chunk_tokens,
            tp_size=self._tp_size,
            num_parts=self._geometry.num_parts,
            namespace=self._cfg.namespace,
            layout=self._layout_name,
            layers=list(self._geometry.layer_names),
            layers_per_part=self._geometry.layers_per_part,
            cache_dtype=str(vllm_config.cache_config.cache_dtype),
            spec=dict(self._geometry.spec_fields),
            **_model_identity(vllm_config),
        )
        self.counters = Counters()
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            # Lookups and pins only: the smallest pool the server hands out.
            handler = self._connect("sched", pool_size=4096, page_size=4096, write_behind=False)
            async_scheduling = bool(getattr(vllm_config.scheduler_config, "async_scheduling", False))
            self._scheduler = SchedulerSide(
                handler, self._geometry, self._keys, self.counters, steps_in_flight=2 if async_scheduling else 1
            )
            self._scheduler_handler = handler
        _LIVE.add(self)
        logger.info(
            "MaruKVConnector (%s) on %s: %d-token chunks, %d part(s) of up to %d bytes, layout %s, namespace %r",
            role.name.lower(),
            self._cfg.server_url,
            self._geometry.chunk_tokens,
            self._geometry.num_parts,
            self._geometry.part_bytes(0),
            self._layout_name,
            self._cfg.namespace,
        )

    def _connect(self, suffix: str, *, pool_size: int, page_size: int, write_behind: bool) -> Any:
        from maru import MaruConfig, MaruHandler

        fields: dict[str, Any] = dict(
            server_url=self._cfg.server_url,
            pool_size=pool_size,
            chunk_size_bytes=page_size,
            auto_connect=False,
            eager_map=self._cfg.eager_map,
            timeout_ms=self._cfg.timeout_ms,
            write_behind=write_behind,
        )
        if self._cfg.instance_id is not None:
            fields["instance_id"] = f"{self._cfg.instance_id}-{suffix}"
        handler = MaruHandler(MaruConfig(**fields))
        if not handler.connect():
            raise RuntimeError(f"MaruKVConnector cannot connect to the Maru server at {self._cfg.server_url}")
        return handler

    # ==================================================================== properties

    @property
    def requires_kv_delivery(self) -> bool:
        # A cache: a save that does not happen is a later miss, never a lost hand-off.
        return False

    @property
    def geometry(self) -> ChunkGeometry:
        return self._geometry

    @property
    def key_scheme(self) -> KeyScheme:
        return self._keys

    @property
    def layout_name(self) -> str:
        return self._layout_name

    def totals(self) -> dict[str, Any]:
        """Running totals of this connector's statistics (never reset)."""
        return self.counters.totals()

    # ==================================================================== worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        g = self._geometry
        spec = self._kv_cache_config.kv_cache_groups[0].kv_cache_spec
        backend = _attention_backend(self._vllm_config, list(g.layer_names))
        layout = detect_layout(
            {n: kv_caches[n] for n in g.layer_names if n in kv_caches},
            layout_name=self._layout_name,
            backend=backend,
            num_blocks=self._kv_cache_config.num_blocks,
            block_size=g.block_size,
            num_kv_heads=int(getattr(spec, "num_kv_heads", 1)),
            head_size=int(spec.head_size),
            num_heads=int(getattr(spec, "num_heads", getattr(spec, "num_kv_heads", 1))),
            content_bytes=int(getattr(spec, "state_content_size_bytes", 0) or 0),
            block_bytes=g.block_bytes,
            cache_dtype=str(self._vllm_config.cache_config.cache_dtype),
        )
        device = kv_caches[g.layer_names[0]].device.type
        decision = decide(device, cudart_available=cudart() is not None)
        logger.info("MaruKVConnector: %s", decision.reason)
        self.counters.set_gauge("dma_needed", int(decision.needed))
        page = self._cfg.page_size or g.part_bytes(0)
        if self._cfg.pool_size < page:
            raise ValueError(f"maru_pool_size={self._cfg.pool_size} is smaller than one page of {page} bytes")
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
        handler = self._connect(f"w{rank}", pool_size=self._cfg.pool_size, page_size=page, write_behind=True)
        self._worker = WorkerSide(
            handler,
            g,
            self._keys,
            rank,
            layout,
            kv_caches,
            self.counters,
            DmaRegistrar(decision, cudart() if decision.register else None),
        )
        self._worker_handler = handler
        logger.info("MaruKVConnector: KV layout %s, blocks addressed as %s per layer", layout.name, layout.block_shape)

    def _worker_side(self) -> WorkerSide:
        if self._worker is None:
            raise RuntimeError("MaruKVConnector: KV caches were never registered on this worker")
        return self._worker

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, MaruConnectorMetadata)
        if meta.loads:
            self._worker_side().load(meta.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads are synchronous: start_load_kv returns with every layer in place.
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, MaruConnectorMetadata)
        if meta.stores:
            self._worker_side().save_layer(layer_name, meta)

    def wait_for_save(self) -> None:
        if self._worker is not None:
            self._worker.finish_step()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_failed_blocks() if self._worker is not None else set()

    def get_kv_connector_stats(self) -> MaruKVConnectorStats | None:
        return self.counters.drain()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> MaruKVConnectorStats:
        return MaruKVConnectorStats(data=dict(data)) if data else MaruKVConnectorStats()

    # ==================================================================== scheduler side

    def _scheduler_side(self) -> SchedulerSide:
        assert self._scheduler is not None, "scheduler-side call on a worker connector"
        return self._scheduler

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler_side().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._scheduler_side().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler_side().build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._scheduler_side().request_finished(request)
        return False, None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
            self._worker_handler.close()
        if self._scheduler is not None:
            self._scheduler.shutdown()
            self._scheduler = None
            self._scheduler_handler.close()
