"""Pages of an SGLang host KV pool as tensors over the pool's own memory.

One Maru value holds one host page: all its layers, K then V for MHA (the page's bytes in
the order of ``get_data_page(index, flat=False)``, which is also what the pool's flat pages
hold). A page-first MHA page is two contiguous runs (K and V); the view over it is one strided
tensor, so one ``copy_`` moves a whole page between the pool and shared memory.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from typing import Any

import torch

__all__ = ["HostPages", "ZERO_COPY_LAYOUTS", "shm_tensor", "writable_bytes"]

#: Layouts whose pages are a few contiguous runs, copied by ``batch_get_v1``/``batch_set_v1``.
ZERO_COPY_LAYOUTS = ("page_first", "page_first_direct")

_read_only_lock = threading.Lock()
_read_only_done = False


def _absorb_read_only_warning() -> None:
    # torch warns once per process when it wraps a read-only buffer. Other instances' pages
    # are mapped read-only on purpose and only ever read here, so the one warning is taken
    # once, silenced, instead of surfacing on SGLang's first prefetch.
    global _read_only_done
    with _read_only_lock:
        if _read_only_done:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            torch.frombuffer(memoryview(b"\0"), dtype=torch.uint8)
        _read_only_done = True


def shm_tensor(buf: memoryview, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """A tensor of `shape` over the first bytes of `buf` (no copy)."""
    if not _read_only_done:
        _absorb_read_only_warning()
    count = 1
    for d in shape:
        count *= d
    return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)


def writable_bytes(t: torch.Tensor) -> memoryview | None:
    """The memory of a contiguous CPU tensor as a writable byte buffer (no copy), for
    copy-out reads straight into it; None for any other tensor. The buffer is valid while
    the tensor's storage lives (a host pool keeps its pages for its own lifetime)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return None
    n = t.numel() * t.element_size()
    if n == 0:
        return None
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


class HostPages:
    """The page geometry of one registered host pool."""

    def __init__(self, pool: Any) -> None:
        if getattr(pool, "kv_buffer", None) is None:
            raise ValueError(
                f"{type(pool).__name__} has no KV buffer of its own (a logical pool); "
                "MaruStorage stores pools that hold their pages"
            )
        probe = pool.get_data_page(0, flat=False)
        if not isinstance(probe, torch.Tensor) or probe.device.type != "cpu":
            raise ValueError(f"{type(pool).__name__}.get_data_page does not give a CPU tensor")
        if probe.untyped_storage().data_ptr() != pool.kv_buffer.untyped_storage().data_ptr():
            raise ValueError(
                f"{type(pool).__name__}.get_data_page copies; MaruStorage needs a view of the pool"
            )
        self.pool = pool
        self.layout: str = pool.layout
        self.dtype: torch.dtype = probe.dtype
        self.shape: torch.Size = probe.shape
        self.nbytes: int = probe.numel() * probe.element_size()
        # Host indices count logical slots; with decode context parallelism a logical page
        # is several physical ones (get_data_page maps it).
        self.indices_per_page: int = int(getattr(pool, "logical_page_size", pool.page_size))

    @property
    def zero_copy(self) -> bool:
        return self.layout in ZERO_COPY_LAYOUTS

    def starts(self, host_indices: torch.Tensor, n_pages: int) -> list[int] | None:
        """The first host index of each of `n_pages` pages, or None if the indices do not
        cover exactly that many pages."""
        if host_indices is None or host_indices.numel() != n_pages * self.indices_per_page:
            return None
        return host_indices[:: self.indices_per_page].tolist()

    def page(self, start: int) -> torch.Tensor:
        """The page that begins at host index `start`, as a view of the pool."""
        return self.pool.get_data_page(start, flat=False)
