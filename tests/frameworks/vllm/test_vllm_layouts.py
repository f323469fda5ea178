"""Block addressing checked against vLLM's own layout code, below the GPU kernel.

Every attention backend class that imports on this CPU-only machine declares the KV layouts
its kernels read (``supported_kv_cache_layouts``). For each backend and layout the caches are
built exactly as vLLM's model runner builds them (``compute_layout_strides``,
``KVCacheTensor``, ``create_kv_cache_views`` over one raw buffer), then blocks of one cache
are copied through a page into another cache at other block ids. The logical views must then
agree block for block, untouched blocks must stay untouched, and a layout declared wrongly
(same shape, other strides) must be refused.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from maru_vllm.layouts import (
    BlockLayout,
    UnsupportedLayout,
    declared_layout_name,
    detect_layout,
    gather_blocks,
    scatter_blocks,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheTensor,
    MLAAttentionSpec,
    compute_layout_strides,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm_sim import detect_for_spec

BLOCK, BLOCKS, LAYERS = 32, 6, 3


def _importable_backends() -> dict[str, Any]:
    out = {}
    for member in AttentionBackendEnum:
        path = str(member.value)
        if ".amd." in path or "rocm" in path.lower():
            # ROCm backends' modules import vLLM's C extension a second time, and a CPU build
            # aborts the whole process on the duplicate operator registration.
            continue
        try:
            cls = member.get_class()
        except Exception:
            continue  # needs a GPU library this machine does not have
        try:
            if cls.is_sparse():
                continue  # sparse MLA pages are packed, not position-addressed: refused at start
        except Exception:
            continue
        out[member.name] = cls
    return out


BACKENDS = _importable_backends()


def _backend_class(name: str) -> Any:
    try:
        return AttentionBackendEnum[name].get_class()
    except Exception:
        return None


def _spec(mla: bool, dtype: torch.dtype = torch.float16) -> Any:
    if mla:
        return MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=96, dtype=dtype)
    return FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=dtype)


def _caches(
    spec: Any, layout: KVCacheLayout, kernel_block: int | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-layer views over one raw int8 buffer, the way vLLM's model runner makes them."""
    layer_stride, block_stride, *_ = compute_layout_strides(spec, BLOCKS, LAYERS, layout)
    names = [f"model.layers.{i}.attn" for i in range(LAYERS)]
    size = spec.page_size_bytes * BLOCKS * LAYERS
    tensor = KVCacheTensor(size=size, layers=names, layer_stride=layer_stride, block_stride=block_stride)
    raw = torch.zeros(size, dtype=torch.int8)
    views = create_kv_cache_views(raw, spec, BLOCKS, layout, tensor, kernel_block_size=kernel_block)
    return raw, dict(zip(names, views, strict=True))


def _detect(spec: Any, caches: dict[str, torch.Tensor], layout_name: str, backend: Any) -> BlockLayout:
    return detect_for_spec(spec, caches, layout_name, backend, BLOCKS, BLOCK)


def _through_page(
    bl: BlockLayout, src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], src_ids: list[int], dst_ids: list[int]
) -> bytes:
    """Saves `src_ids` of every layer into one page and loads it into `dst_ids` (as the
    worker does), returning the page."""
    n = len(src_ids)
    page = torch.empty(LAYERS * n * bl.block_bytes, dtype=torch.uint8)
    for i, name in enumerate(src):
        part = page[i * n * bl.block_bytes : (i + 1) * n * bl.block_bytes].view(bl.dtype).view(n, *bl.block_shape)
        torch.index_select(bl.blocks(src[name]), 0, torch.tensor(src_ids), out=part)
    for i, name in enumerate(dst):
        part = page[i * n * bl.block_bytes : (i + 1) * n * bl.block_bytes].view(bl.dtype).view(n, *bl.block_shape)
        bl.blocks(dst[name]).index_copy_(0, torch.tensor(dst_ids), part)
    return page.numpy().tobytes()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (random bytes include NaNs, which never compare equal)."""
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def _cases() -> list[tuple[str, str]]:
    cases = []
    for name, cls in BACKENDS.items():
        supported = cls.supported_kv_cache_layouts()
        for layout in supported if supported is not None else list(KVCacheLayout):
            cases.append((name, layout.name))
    return cases


def test_backends_of_every_family_import_here() -> None:
    """The parametrised test below covers CPU, GPU and MLA backends, not a lucky subset."""
    assert {"CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION", "TRITON_MLA", "CPU_MLA"} <= BACKENDS.keys()


@pytest.mark.parametrize(("backend_name", "layout_name"), _cases())
def test_blocks_round_trip_below_the_gpu_kernel(backend_name: str, layout_name: str) -> None:
    backend = BACKENDS[backend_name]
    spec = _spec(backend.is_mla())
    layout = KVCacheLayout[layout_name]
    src_raw, src = _caches(spec, layout)
    src_raw.copy_(torch.randint(-128, 127, src_raw.shape, dtype=torch.int8))
    dst_raw, dst = _caches(spec, layout)
    bl = _detect(spec, src, layout_name, backend)
    assert bl.name == layout_name and bl.block_bytes == spec.page_size_bytes
    page = _through_page(bl, src, dst, src_ids=[4, 1], dst_ids=[2, 5])
    for name in src:
        assert _same(dst[name][2], src[name][4]) and _same(dst[name][5], src[name][1]), name
        for b in (0, 1, 3, 4):
            assert not dst[name][b].view(torch.int16).any(), (name, b)
    if layout.is_block_contiguous and layout.is_layer_compact:
        # The page holds each block's bytes exactly as memory has them: a plain copy.
        first = src["model.layers.0.attn"]
        start = first[4].data_ptr() - src_raw.data_ptr()
        assert page[: spec.page_size_bytes] == src_raw[start : start + spec.page_size_bytes].numpy().tobytes()


@pytest.mark.parametrize("layout_name", ["LBHNC", "LHBNC", "BLNHC"])
@pytest.mark.parametrize("ids", [[1, 2, 3, 4], [5, 0, 3], [2, 3, 0, 1]], ids=["run", "scattered", "two-runs"])
def test_the_connectors_block_copies_match_indexed_copies(layout_name: str, ids: list[int]) -> None:
    """The connector copies runs of consecutive blocks as slices and scattered ones with
    indexed copies; both must move exactly the blocks asked for."""
    spec = _spec(False)
    src_raw, src = _caches(spec, KVCacheLayout[layout_name])
    src_raw.copy_(torch.randint(-128, 127, src_raw.shape, dtype=torch.int8))
    _, dst = _caches(spec, KVCacheLayout[layout_name])
    bl = _detect(spec, src, layout_name, BACKENDS["FLASH_ATTN"])
    for name in src:
        page = torch.empty((len(ids), *bl.block_shape), dtype=bl.dtype)
        gather_blocks(bl.blocks(src[name]), ids, page)
        assert _same(page, bl.blocks(src[name])[ids])
        targets = [(b + 1) % BLOCKS for b in ids]
        scatter_blocks(bl.blocks(dst[name]), targets, page)
        for b_src, b_dst in zip(ids, targets, strict=True):
            assert _same(dst[name][b_dst], src[name][b_src])
        assert not dst[name][[b for b in range(BLOCKS) if b not in targets]].view(torch.int16).any()


@pytest.mark.parametrize("declared", ["LBHNC", "LHBNC", "BLHNC"])
def test_a_layout_declared_wrongly_is_refused(declared: str) -> None:
    """Same [B, H, N, C] shape, other strides: only the strides tell, and they must."""
    spec = _spec(False)
    _, caches = _caches(spec, KVCacheLayout.LBNHC)
    with pytest.raises(UnsupportedLayout, match="memory order"):
        _detect(spec, caches, declared, BACKENDS["FLASH_ATTN"])


def test_a_layout_the_backend_does_not_read_is_refused() -> None:
    spec = _spec(False)
    _, caches = _caches(spec, KVCacheLayout.LBNHC)
    with pytest.raises(UnsupportedLayout, match="CPU_ATTN reads"):
        _detect(spec, caches, "LBNHC", BACKENDS["CPU_ATTN"])


def test_the_cpu_layout_is_blocks_heads_tokens_then_k_and_v() -> None:
    """vLLM's CPU cache [blocks, kv_heads, block, 2*head]: a page block holds head 0's K|V
    rows for every token, then head 1's (the original connector sliced it as GPU layout)."""
    spec = _spec(False, torch.float32)
    raw, caches = _caches(spec, KVCacheLayout.LBHNC)
    view = caches["model.layers.0.attn"]
    assert tuple(view.shape) == (BLOCKS, 2, BLOCK, 128)
    view.copy_(torch.arange(view.numel(), dtype=torch.float32).view(view.shape))
    bl = _detect(spec, caches, "LBHNC", BACKENDS["CPU_ATTN"])
    block = bl.blocks(view)[3].reshape(-1)
    assert torch.equal(block, view[3].reshape(-1))
    assert block[128].item() == view[3, 0, 1, 0].item()  # token 1 of head 0 follows token 0's K|V


def test_split_kernel_blocks() -> None:
    """A 32-token scheduler block made of two 16-token kernel blocks moves as one block."""
    spec = _spec(False)
    src_raw, src = _caches(spec, KVCacheLayout.LBHNC, kernel_block=16)
    assert src["model.layers.0.attn"].shape[0] == 2 * BLOCKS
    src_raw.copy_(torch.randint(-128, 127, src_raw.shape, dtype=torch.int8))
    _, dst = _caches(spec, KVCacheLayout.LBHNC, kernel_block=16)
    bl = _detect(spec, src, "LBHNC", BACKENDS["FLASH_ATTN"])
    assert bl.kernel_blocks == 2
    _through_page(bl, src, dst, src_ids=[1], dst_ids=[4])
    for name in src:
        assert _same(dst[name][8:10], src[name][2:4])


def test_a_cache_that_does_not_match_the_spec_is_refused() -> None:
    spec = _spec(False)
    _, caches = _caches(spec, KVCacheLayout.LBHNC)
    other = FullAttentionSpec(block_size=BLOCK, num_kv_heads=4, head_size=32, dtype=torch.float16)
    with pytest.raises(UnsupportedLayout, match="does not match the KV spec"):
        _detect(other, caches, "LBHNC", BACKENDS["FLASH_ATTN"])


def test_unknown_layout_names_are_refused() -> None:
    with pytest.raises(UnsupportedLayout, match="unknown"):
        declared_layout_name(resolved_layout="LNBHC", backend=None, block_size=BLOCK, num_kv_heads=2, head_size=64)


# -- vLLM versions before standardised layouts: get_kv_cache_shape + get_kv_cache_stride_order --


class _LegacyFlashAttention:
    """FlashAttention's historical shape: K and V outermost."""

    @staticmethod
    def get_name() -> str:
        return "FLASH_ATTN"

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, cache_dtype_str: str = "auto"
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_size)


class _LegacyFlashInferHND(_LegacyFlashAttention):
    """FlashInfer's historical shape, stored head-major (HND stride order)."""

    @staticmethod
    def get_name() -> str:
        return "FLASHINFER"

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, cache_dtype_str: str = "auto"
    ) -> tuple[int, ...]:
        return (num_blocks, 2, block_size, num_kv_heads, head_size)

    @staticmethod
    def get_kv_cache_stride_order() -> tuple[int, ...]:
        return (0, 1, 3, 2, 4)


class _LegacyTorchSDPA(_LegacyFlashAttention):
    """The old CPU backend: K and V planes of flattened blocks."""

    @staticmethod
    def get_name() -> str:
        return "TORCH_SDPA"

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, cache_dtype_str: str = "auto"
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size * num_kv_heads * head_size)


def _legacy_case(
    backend: Any, num_kv_heads: int, head_size: int
) -> tuple[str, BlockLayout, torch.Tensor, torch.Tensor]:
    name = declared_layout_name(
        resolved_layout=None, backend=backend, block_size=BLOCK, num_kv_heads=num_kv_heads, head_size=head_size
    )
    shape = backend.get_kv_cache_shape(BLOCKS, BLOCK, num_kv_heads, head_size)
    order = getattr(backend, "get_kv_cache_stride_order", lambda: tuple(range(len(shape))))()
    # As old model runners allocated: contiguous in stride order, then permuted back.
    inverse = [order.index(i) for i in range(len(order))]

    def make() -> torch.Tensor:
        return torch.zeros([shape[i] for i in order], dtype=torch.float16).permute(inverse)

    src, dst = make(), make()
    src.copy_(torch.randn(src.shape).to(torch.float16))  # finite values: torch.equal works
    page_bytes = math.prod(shape) // BLOCKS * 2
    bl = detect_layout(
        {"l0": src},
        layout_name=name,
        backend=backend,
        num_blocks=BLOCKS,
        block_size=BLOCK,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        num_heads=num_kv_heads,
        content_bytes=0,
        block_bytes=page_bytes,
    )
    return name, bl, src, dst


# FlashInferMLASparseSM90Backend is the one backend of this vLLM that still has a legacy
# get_kv_cache_shape ([blocks, block, latent]).
@pytest.mark.parametrize(
    "backend",
    [_LegacyFlashAttention, _LegacyFlashInferHND, _LegacyTorchSDPA, _backend_class("FLASHINFER_MLA_SPARSE_SM90")],
)
def test_legacy_layouts_round_trip(backend: Any) -> None:
    if backend is None:
        pytest.skip("FlashInferMLASparseSM90Backend does not import on this machine")
    mla = "MLA" in backend.get_name()
    heads, head = (1, 96) if mla else (2, 64)  # 2 heads: the K/V dim and the heads have equal sizes
    name, bl, src, dst = _legacy_case(backend, heads, head)
    assert name.startswith("legacy:" + backend.get_name())
    n = 2
    page = torch.empty(n * bl.block_bytes, dtype=torch.uint8).view(bl.dtype).view(n, *bl.block_shape)
    torch.index_select(bl.blocks(src), 0, torch.tensor([5, 0]), out=page)
    bl.blocks(dst).index_copy_(0, torch.tensor([1, 3]), page)
    block_dim = bl.perm[0]
    assert torch.equal(dst.select(block_dim, 1), src.select(block_dim, 5))
    assert torch.equal(dst.select(block_dim, 3), src.select(block_dim, 0))
    assert not dst.select(block_dim, 2).any()


def test_legacy_layout_with_the_wrong_stride_order_is_refused() -> None:
    shape = _LegacyFlashInferHND.get_kv_cache_shape(BLOCKS, BLOCK, 2, 64)
    nhd = torch.zeros(shape, dtype=torch.float16)  # contiguous NHD, but the backend says HND
    name = declared_layout_name(
        resolved_layout=None, backend=_LegacyFlashInferHND, block_size=BLOCK, num_kv_heads=2, head_size=64
    )
    with pytest.raises(UnsupportedLayout, match="memory order"):
        detect_layout(
            {"l0": nhd},
            layout_name=name,
            backend=_LegacyFlashInferHND,
            num_blocks=BLOCKS,
            block_size=BLOCK,
            num_kv_heads=2,
            head_size=64,
            num_heads=2,
            content_bytes=0,
            block_bytes=2 * BLOCK * 2 * 64 * 2,
        )
