"""Real SGLang objects for the MaruStorage tests, built on CPU.

SGLang's host pools (MHATokenToKVPoolHost, MLATokenToKVPoolHost) mirror a device KV pool.
Their constructors take the device pool's buffer description; here the "device" buffers are
CPU tensors of the right geometry, which is all a host pool reads from them at construction.
The host pools themselves are SGLang's own classes: their kv_buffer, layouts, allocator,
get_data_page and page metadata are the real ones.

Imported by the test process and by the child processes it starts (one SGLang import each).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo, MLABufferInfo
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

LAYERS = 3
HEADS = 2
HEAD_DIM = 32
KV_LORA_RANK = 48
ROPE_DIM = 16
PAGE_SIZE = 4
DEVICE_TOKENS = 64
DTYPE = torch.bfloat16
MODEL = "test-org/tiny-model"
# No pipeline or context parallelism: one stage, one context rank.
_ONE_STAGE: dict[str, int] = dict(pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1)


def _ptrs(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.uint64)


def _host_pool_args(layout: str, ratio: float) -> dict[str, Any]:
    """What both host pools are given: a CPU pool of `ratio` times the device's tokens."""
    return dict(
        host_to_device_ratio=ratio,
        host_size=0,
        page_size=PAGE_SIZE,
        layout=layout,
        pin_memory=False,
        device="cpu",
        device_capacity_tokens=DEVICE_TOKENS,
        start_layer=0,
        end_layer=LAYERS,
    )


def _buffer_info_args() -> dict[str, Any]:
    """What both device buffer descriptions say alike: page size, dtype, a CPU device."""
    return dict(page_size=PAGE_SIZE, dtype=DTYPE, device=torch.device("cpu"))


def mha_host_pool(layout: str, ratio: float = 2.0) -> MHATokenToKVPoolHost:
    """SGLang's MHA host pool (page size 4, 3 layers, 2 heads of 32, bf16)."""
    k = tuple(torch.zeros(DEVICE_TOKENS, HEADS, HEAD_DIM, dtype=DTYPE) for _ in range(LAYERS))
    v = tuple(torch.zeros(DEVICE_TOKENS, HEADS, HEAD_DIM, dtype=DTYPE) for _ in range(LAYERS))
    info = MHABufferInfo(
        buffers=KVBuffers(k=k, v=v, k_data_ptrs=_ptrs(k), v_data_ptrs=_ptrs(v), layout=KVBufferLayout.NHD),
        head_num=HEADS,
        head_dim=HEAD_DIM,
        v_head_dim=HEAD_DIM,
        **_buffer_info_args(),
    )
    return MHATokenToKVPoolHost(info, **_host_pool_args(layout, ratio))


def mla_host_pool(layout: str, ratio: float = 2.0) -> MLATokenToKVPoolHost:
    """SGLang's MLA host pool (page size 4, 3 layers, latent 48 + rope 16, bf16)."""
    dim = KV_LORA_RANK + ROPE_DIM
    bufs = tuple(torch.zeros(DEVICE_TOKENS, 1, dim, dtype=DTYPE) for _ in range(LAYERS))
    info = MLABufferInfo(
        buffers=bufs,
        data_ptrs=_ptrs(bufs),
        layer_indices=tuple(range(LAYERS)),
        device_layer_num=LAYERS,
        kv_lora_rank=KV_LORA_RANK,
        qk_rope_head_dim=ROPE_DIM,
        kv_cache_dim=dim,
        **_buffer_info_args(),
    )
    return MLATokenToKVPoolHost(info, **_host_pool_args(layout, ratio), target_layer_num=LAYERS)


def storage_config(
    server_url: str,
    *,
    mla: bool = False,
    tp_rank: int = 0,
    tp_size: int = 1,
    layout: str = "page_first",
    **maru: Any,
) -> HiCacheStorageConfig:
    """The config SGLang's cache controller builds for `--hicache-storage-backend dynamic`
    with Maru's extra config (`maru` entries are added as ``maru_<name>``)."""
    extra: dict[str, Any] = {
        "backend_name": "maru",
        "module_path": "maru_sglang.maru_storage",
        "class_name": "MaruStorage",
        "interface_v1": 1,
        "maru_server_url": server_url,
        "maru_pool_size": "16M",
        "maru_timeout_ms": 1000,
    }
    extra.update({f"maru_{k}": v for k, v in maru.items()})
    return HiCacheStorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        **_ONE_STAGE,
        is_mla_model=mla,
        enable_storage_metrics=True,
        is_page_first_layout=layout == "page_first",
        model_name=MODEL,
        extra_config=extra,
    )


def create_backend(config: HiCacheStorageConfig, pool: Any) -> Any:
    """Exactly what HiCacheController.attach_storage_backend does: the factory, then the
    host pool registration."""
    backend = StorageBackendFactory.create_backend("dynamic", config, pool)
    backend.register_mem_pool_host(pool)
    return backend


def alloc_pages(pool: Any, n: int) -> torch.Tensor:
    """Host indices of `n` fresh pages from the pool's own allocator."""
    idx = pool.alloc(n * pool.page_size)
    assert idx is not None, "host pool full"
    return idx


def page_starts(pool: Any, host_indices: torch.Tensor) -> list[int]:
    return host_indices[:: pool.page_size].tolist()


def fill_pages(pool: Any, host_indices: torch.Tensor, seed: int) -> None:
    """Distinct pseudo-random values in every page (a function of `seed` and the page)."""
    for n, start in enumerate(page_starts(pool, host_indices)):
        page = pool.get_data_page(start, flat=False)
        g = torch.Generator().manual_seed(seed * 1000 + n)
        page.copy_(torch.randn(page.shape, generator=g).to(page.dtype))


def digests(pool: Any, host_indices: torch.Tensor) -> list[str]:
    """SHA-256 of each page's bytes, in page order."""
    out = []
    for start in page_starts(pool, host_indices):
        page = pool.get_data_page(start, flat=True)
        out.append(hashlib.sha256(page.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest())
    return out


def page_hashes(tag: str, n: int) -> list[str]:
    """Page keys as SGLang makes them (hex SHA-256 strings), one per page."""
    return [hashlib.sha256(f"{tag}-{i}".encode()).hexdigest() for i in range(n)]
