"""LMCache's Maru backend built the way LMCache builds it, for the tests of this directory.

``CreateStorageBackends`` (LMCache's storage-backend factory) gets an ``LMCacheEngineConfig``
with ``maru_path="maru://HOST:PORT"`` and no local CPU backend, so the only backend is
``MaruBackend`` and its memory allocator is ``maru_lmcache.CxlMemoryAdapter``. Puts run on an
asyncio loop in a thread of its own, as in LMCache's engine.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.pin_monitor import PinMonitor
from lmcache.v1.storage_backend import CreateStorageBackends

#: A small model: 4 layers, 2 KV heads of 64 dims, fp16, 16-token chunks (32 KiB each).
LAYERS, HEADS, HEAD_DIM, TOKENS = 4, 2, 64, 16
DTYPE = torch.float16
MODEL = "maru-test-model"


@dataclass
class Backend:
    """A MaruBackend from LMCache's factory, with the loop its puts run on."""

    backend: Any
    metadata: LMCacheMetadata
    loop: asyncio.AbstractEventLoop

    @property
    def handler(self) -> Any:
        return self.backend._handler

    @property
    def allocator(self) -> Any:
        return self.backend.get_memory_allocator()

    def shape(self, tokens: int = TOKENS) -> torch.Size:
        return self.metadata.get_shapes(tokens)[0]

    def key(self, chunk_hash: int, model: str = MODEL) -> CacheEngineKey:
        return CacheEngineKey(model, self.metadata.world_size, self.metadata.worker_id, chunk_hash, DTYPE)

    def run(self, coro: Any, timeout: float = 30) -> Any:
        """Runs a coroutine on the backend's loop and waits for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def allocated_pages(self) -> int:
        manager = self.handler.owned_region_manager
        return int(manager.get_stats()["total_allocated_pages"]) if manager is not None else 0


def engine_config(url: str, pool_mib: float = 4, **extra: Any) -> LMCacheEngineConfig:
    """LMCache's configuration of a Maru backend at `url` (tcp://HOST:PORT is written as
    LMCache's maru://HOST:PORT; unix:///PATH passes through LMCache as it is)."""
    return LMCacheEngineConfig.from_defaults(
        chunk_size=TOKENS,
        maru_path=url if url.startswith("unix://") else "maru://" + url.removeprefix("tcp://"),
        maru_pool_size=pool_mib / 1024,
        max_local_cpu_size=0,
        extra_config={"maru_timeout_ms": 5000, **extra},
    )


def engine_metadata(
    layers: int = LAYERS, heads: int = HEADS, head_dim: int = HEAD_DIM, tokens: int = TOKENS,
    world_size: int = 1, worker_id: int = 0,
) -> LMCacheMetadata:
    return LMCacheMetadata(
        model_name=MODEL, world_size=world_size, local_world_size=world_size, worker_id=worker_id,
        local_worker_id=worker_id,
        kv_dtype=DTYPE, kv_shape=(layers, 2, tokens, heads, head_dim), role="worker", chunk_size=tokens,
    )


@contextmanager
def maru_backend(
    url: str, pool_mib: float = 4, metadata: LMCacheMetadata | None = None, close: bool = True, **extra: Any
) -> Iterator[Backend]:
    """LMCache's MaruBackend on the server at `url`, closed (by LMCache's close) on exit."""
    metadata = metadata or engine_metadata()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="lmcache-loop", daemon=True)
    thread.start()
    try:
        config = engine_config(url, pool_mib, **extra)
        # LMCache's engine creates the pin monitor before its backends; pins of retrieved
        # chunks report to it.
        PinMonitor.GetOrCreate(config)
        backends = CreateStorageBackends(config, metadata, loop, dst_device="cpu")
        assert list(backends) == ["MaruBackend"], f"LMCache built {list(backends)}"
        b = Backend(backends["MaruBackend"], metadata, loop)
        try:
            yield b
        finally:
            if close:
                b.backend.close()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def fill(obj: Any, seed: int) -> bytes:
    """Writes seeded random KV into the object's tensor (LMCache's copy from the GPU) and
    returns the bytes written."""
    g = torch.Generator().manual_seed(seed)
    t = obj.tensor
    t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    return bytes(t.contiguous().view(torch.uint8).numpy())


def tensor_bytes(obj: Any) -> bytes:
    return bytes(obj.tensor.contiguous().view(torch.uint8).numpy())


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mapping_base(handler: Any, region_id: int) -> int:
    """Address where the handler maps region `region_id` (read-only for other instances'
    regions), taken from the handler's own buffer view, not from the adapter's tensors."""
    view = handler.get_buffer_view(region_id, 0, 1)
    assert view is not None, f"region {region_id} is not mapped"
    if not view.readonly:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return int(torch.frombuffer(view, dtype=torch.uint8).data_ptr())
