"""Where one block of one layer lives in a registered KV tensor.

vLLM lays KV out differently per backend and version:

* vLLM with standardised layouts: every layer's cache is a logical ``[B, H, N, C]`` view
  (blocks, KV heads or 1 for MLA, tokens of a block, content: K then V for attention, the
  latent for MLA) whose strides follow one ``KVCacheLayout`` (``LBHNC``, ``LBNHC``,
  ``LHBNC``, ``BLHNC``, ``BLNHC``, ``BHLNC``). The CPU backend's
  ``[blocks, kv_heads, block, 2*head]`` is ``LBHNC``.
* Older vLLM: each backend's ``get_kv_cache_shape`` (FlashAttention
  ``[2, B, N, H, D]``, FlashInfer and Triton ``[B, 2, N, H, D]``, MLA ``[B, N, latent]``, ...)
  permuted by ``get_kv_cache_stride_order``.

Nothing here is guessed from one shape. The layout is *declared* by vLLM (the engine's resolved
``kv_cache_layout``, or the backend's shape and stride-order functions), checked against the
attention backend (it must read that layout) and the KV spec (heads, tokens, content bytes),
and then every registered tensor must match it: shape, dtype size, and the stride order. Any
disagreement raises ``UnsupportedLayout`` at start.

The result is a :class:`BlockLayout`: a permutation that puts the block dimension first and
the rest in memory order, so ``blocks(tensor)[b]`` is block ``b`` of that layer and a page
holds blocks in the order memory has them (a plain copy for block-contiguous layouts). The
declared name is part of the chunk keys: chunks of different layouts never mix.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BlockLayout",
    "UnsupportedLayout",
    "declared_layout_name",
    "detect_layout",
    "gather_blocks",
    "scatter_blocks",
    "standard_layouts",
]

LEGACY_PREFIX = "legacy:"


class UnsupportedLayout(ValueError):
    """The registered KV tensors do not match a layout this connector can copy."""


@dataclass(frozen=True)
class BlockLayout:
    """How to address the blocks of one layer's KV tensor."""

    #: The declared layout (key material), e.g. ``LBHNC`` or ``legacy:FLASH_ATTN:...``.
    name: str
    #: Tensor dims: the block dim first, then the others in memory order.
    perm: tuple[int, ...]
    #: Kernel blocks per scheduler block (vLLM may split a block for its kernels).
    kernel_blocks: int
    #: Shape of one scheduler block in page order: ``(kernel_blocks, *inner)``.
    block_shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        return math.prod(self.block_shape) * torch.empty((), dtype=self.dtype).element_size()

    def blocks(self, tensor: torch.Tensor) -> torch.Tensor:
        """A view ``[num_blocks, *block_shape]`` of `tensor` (no copy)."""
        v = tensor.permute(self.perm)
        return v.unflatten(0, (v.shape[0] // self.kernel_blocks, self.kernel_blocks))


def standard_layouts() -> dict[str, Any]:
    """vLLM's ``KVCacheLayout`` members by name; empty on a vLLM without them."""
    try:
        from vllm.v1.kv_cache_layout import KVCacheLayout
    except ImportError:
        return {}
    return {m.name: m for m in KVCacheLayout}


def _backend_name(backend: Any) -> str:
    try:
        return str(backend.get_name())
    except Exception:
        return getattr(backend, "__name__", type(backend).__name__)


def _legacy_shape(
    backend: Any, num_blocks: int, block_size: int, num_heads: int, head_size: int, cache_dtype: str
) -> tuple[int, ...]:
    try:
        shape = backend.get_kv_cache_shape(num_blocks, block_size, num_heads, head_size, cache_dtype_str=cache_dtype)
    except TypeError:
        shape = backend.get_kv_cache_shape(num_blocks, block_size, num_heads, head_size)
    return tuple(int(s) for s in shape)


def _legacy_stride_order(backend: Any, ndim: int) -> tuple[int, ...]:
    fn = getattr(backend, "get_kv_cache_stride_order", None)
    if fn is None:
        return tuple(range(ndim))
    try:
        order = tuple(int(i) for i in fn())
    except (NotImplementedError, TypeError):
        return tuple(range(ndim))
    if sorted(order) != list(range(ndim)):
        raise UnsupportedLayout(
            f"{_backend_name(backend)}.get_kv_cache_stride_order() = {order} is not a permutation of {ndim} dims"
        )
    return order


def _legacy_block_dim(
    backend: Any, block_size: int, num_heads: int, head_size: int, cache_dtype: str
) -> tuple[int, tuple[int, ...]]:
    """The dim of get_kv_cache_shape that grows with the number of blocks (probed with two
    block counts) and the shape for a reference count, so the role of a dim is learnt from
    the backend, not inferred from sizes that may coincide."""
    a = _legacy_shape(backend, 7, block_size, num_heads, head_size, cache_dtype)
    b = _legacy_shape(backend, 11, block_size, num_heads, head_size, cache_dtype)
    grows = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    if len(a) != len(b) or len(grows) != 1 or a[grows[0]] != 7 or b[grows[0]] != 11:
        raise UnsupportedLayout(
            f"{_backend_name(backend)}.get_kv_cache_shape has no single block dimension ({a} for 7 blocks, {b} for 11)"
        )
    return grows[0], a


def declared_layout_name(
    *,
    resolved_layout: str | None,
    backend: Any,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
    cache_dtype: str = "auto",
) -> str:
    """The layout vLLM says it uses, as a name the scheduler and the worker agree on.

    `resolved_layout` is the engine's ``kv_cache_layout`` (vLLM with standardised layouts);
    without one, the backend's legacy shape and stride order name it."""
    if resolved_layout is not None:
        known = standard_layouts()
        if resolved_layout not in known:
            raise UnsupportedLayout(
                f"KV cache layout {resolved_layout!r} is unknown (known: {sorted(known) or 'none in this vLLM'})"
            )
        return resolved_layout
    if backend is None or not hasattr(backend, "get_kv_cache_shape"):
        raise UnsupportedLayout(
            "vLLM resolved no KV cache layout and the attention backend "
            f"{_backend_name(backend) if backend is not None else '(none)'} has no get_kv_cache_shape"
        )
    dim, shape = _legacy_block_dim(backend, block_size, num_kv_heads, head_size, cache_dtype)
    pattern = ",".join("B" if i == dim else str(s) for i, s in enumerate(shape))
    order = ",".join(str(i) for i in _legacy_stride_order(backend, len(shape)))
    return f"{LEGACY_PREFIX}{_backend_name(backend)}[{pattern}]order[{order}]"


def _memory_order(t: torch.Tensor) -> list[int]:
    """Dims of `t` (size > 1) from outermost to innermost, by stride."""
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]
    return sorted(dims, key=lambda d: -t.stride(d))


def _check_strides(t: torch.Tensor, physical: Sequence[int], what: str) -> None:
    """`t`'s memory order must be `physical` (ignoring size-1 dims), nested without overlap,
    with the innermost dim dense."""
    expected = [d for d in physical if t.shape[d] > 1]
    actual = _memory_order(t)
    if actual != expected:
        raise UnsupportedLayout(
            f"{what}: the tensor's memory order is {actual} (shape {tuple(t.shape)}, strides {t.stride()}), "
            f"but the declared layout puts its dims in the order {expected}"
        )
    if expected and t.stride(expected[-1]) != 1:
        raise UnsupportedLayout(f"{what}: innermost dim {expected[-1]} has stride {t.stride(expected[-1])}, not 1")
    for outer, inner in zip(expected, expected[1:], strict=False):
        if t.stride(outer) < t.stride(inner) * t.shape[inner]:
            raise UnsupportedLayout(
                f"{what}: dims {outer} and {inner} overlap (strides {t.stride()}, shape {tuple(t.shape)})"
            )


def _standard(
    t: torch.Tensor,
    *,
    layout_name: str,
    num_blocks: int,
    num_heads: int,
    block_size: int,
    content_bytes: int,
    backend: Any,
    what: str,
) -> BlockLayout:
    layout = standard_layouts()[layout_name]
    supported = None
    if backend is not None and hasattr(backend, "supported_kv_cache_layouts"):
        supported = backend.supported_kv_cache_layouts()
    if supported is not None and layout not in supported:
        raise UnsupportedLayout(
            f"{what}: the attention backend {_backend_name(backend)} reads {[m.name for m in supported]}, "
            f"not the declared layout {layout_name}"
        )
    if t.dim() != 4:
        raise UnsupportedLayout(
            f"{what}: expected a 4-D [B, H, N, C] view for layout {layout_name}, got shape {tuple(t.shape)}"
        )
    if t.shape[0] % num_blocks != 0:
        raise UnsupportedLayout(f"{what}: {t.shape[0]} blocks is not a multiple of the {num_blocks} scheduler blocks")
    ratio = t.shape[0] // num_blocks
    if block_size % ratio != 0:
        raise UnsupportedLayout(f"{what}: {ratio} kernel blocks per block does not divide the block size {block_size}")
    if content_bytes % t.element_size() != 0:
        raise UnsupportedLayout(f"{what}: content of {content_bytes} bytes is not a whole number of {t.dtype} elements")
    expected = (num_blocks * ratio, num_heads, block_size // ratio, content_bytes // t.element_size())
    if tuple(t.shape) != expected:
        raise UnsupportedLayout(
            f"{what}: shape {tuple(t.shape)} does not match the KV spec's [B, H, N, C] = {expected} "
            f"for layout {layout_name}"
        )
    physical = [i - 1 for i in layout.stride_order if i != 0]
    # Split blocks (ratio > 1): a scheduler block's kernel blocks are neighbours in the B
    # dim, so the B dim keeps the scheduler block's place in memory.
    _check_strides(t, physical, what)
    perm = (0, *(d for d in physical if d != 0))
    return BlockLayout(
        name=layout_name,
        perm=perm,
        kernel_blocks=ratio,
        block_shape=(ratio, *(t.shape[d] for d in perm[1:])),
        dtype=t.dtype,
    )


def _legacy(
    t: torch.Tensor,
    *,
    layout_name: str,
    num_blocks: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    cache_dtype: str,
    backend: Any,
    what: str,
) -> BlockLayout:
    if backend is None or not hasattr(backend, "get_kv_cache_shape"):
        raise UnsupportedLayout(f"{what}: layout {layout_name} needs the backend's get_kv_cache_shape")
    dim, _ = _legacy_block_dim(backend, block_size, num_kv_heads, head_size, cache_dtype)
    expected = _legacy_shape(backend, num_blocks, block_size, num_kv_heads, head_size, cache_dtype)
    if tuple(t.shape) != expected:
        raise UnsupportedLayout(
            f"{what}: shape {tuple(t.shape)} does not match {_backend_name(backend)}.get_kv_cache_shape = {expected}"
        )
    order = _legacy_stride_order(backend, t.dim())
    _check_strides(t, order, what)
    perm = (dim, *(d for d in order if d != dim))
    return BlockLayout(
        name=layout_name,
        perm=perm,
        kernel_blocks=1,
        block_shape=(1, *(t.shape[d] for d in perm[1:])),
        dtype=t.dtype,
    )


def detect_layout(
    tensors: dict[str, torch.Tensor],
    *,
    layout_name: str,
    backend: Any,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
    num_heads: int,
    content_bytes: int,
    block_bytes: int,
    cache_dtype: str = "auto",
) -> BlockLayout:
    """Checks every registered tensor against the declared layout and returns the one
    BlockLayout they share.

    `num_heads` / `content_bytes` are the spec's H and C (bytes) of the standardised view;
    `num_kv_heads` / `head_size` are what legacy shape functions take; `block_bytes` is the
    spec's bytes per layer and block, which the layout must reproduce exactly."""
    if not tensors:
        raise UnsupportedLayout("no KV cache tensors were registered")
    found: BlockLayout | None = None
    for name, t in tensors.items():
        what = f"KV cache of layer {name}"
        if not isinstance(t, torch.Tensor):
            raise UnsupportedLayout(
                f"{what} is a {type(t).__name__}, not a tensor (several caches per layer are not supported)"
            )
        # What both kinds of layout are checked with.
        common: dict[str, Any] = dict(
            layout_name=layout_name, num_blocks=num_blocks, block_size=block_size, backend=backend, what=what
        )
        if layout_name.startswith(LEGACY_PREFIX):
            bl = _legacy(t, num_kv_heads=num_kv_heads, head_size=head_size, cache_dtype=cache_dtype, **common)
        elif layout_name in standard_layouts():
            bl = _standard(t, num_heads=num_heads, content_bytes=content_bytes, **common)
        else:
            raise UnsupportedLayout(f"KV cache layout {layout_name!r} is unknown")
        if bl.block_bytes != block_bytes:
            raise UnsupportedLayout(
                f"{what}: a block of layout {layout_name} is {bl.block_bytes} bytes, the KV spec says {block_bytes}"
            )
        if found is not None and found != bl:
            raise UnsupportedLayout(f"{what} is laid out as {bl}, unlike the other layers ({found})")
        found = bl
    assert found is not None
    return found


def _runs(ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(position in `ids`, first id, length) of each run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for pos, b in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == b:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((pos, b, 1))
    return runs


def _memmove(dst: torch.Tensor, src: torch.Tensor) -> None:
    # One libc memmove: no intra-op thread pool to wake (on a busy host, torch's parallel
    # copy of a half-MiB block run costs more in thread hand-offs than in bytes).
    ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.nbytes)


def _move(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[...] = src`` for two views of the same shape and dtype."""
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"block copy between {tuple(src.shape)} {src.dtype} and {tuple(dst.shape)} {dst.dtype}")
    if dst.device.type == "cpu" and src.device.type == "cpu":
        if dst.is_contiguous() and src.is_contiguous():
            _memmove(dst, src)
            return
        if dst[0].is_contiguous() and src[0].is_contiguous():
            for i in range(dst.shape[0]):
                _memmove(dst[i], src[i])
            return
    dst.copy_(src, non_blocking=True)


def gather_blocks(blocks: torch.Tensor, ids: Sequence[int], out: torch.Tensor) -> None:
    """``out[i] = blocks[ids[i]]`` (`blocks` from :meth:`BlockLayout.blocks`).

    Runs of consecutive ids copy as slices: for block-contiguous layouts one memcpy per run,
    per block otherwise; blocks whose bytes are not contiguous go through torch."""
    for pos, first, n in _runs(ids):
        _move(out[pos : pos + n], blocks[first : first + n])


def scatter_blocks(blocks: torch.Tensor, ids: Sequence[int], src: torch.Tensor) -> None:
    """``blocks[ids[i]] = src[i]``."""
    for pos, first, n in _runs(ids):
        _move(blocks[first : first + n], src[pos : pos + n])
