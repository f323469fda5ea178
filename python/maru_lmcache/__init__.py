"""Maru for LMCache: the memory allocator LMCache's ``MaruBackend`` builds its chunks in.

LMCache (0.5.6 and later) ships ``lmcache.v1.storage_backend.maru_backend.MaruBackend``,
which imports ``from maru_lmcache import CxlMemoryAdapter``. The adapter hands LMCache
``MemoryObj``s whose tensors are Maru's shared-memory pages, so a chunk LMCache writes is
already in the pool and a chunk it reads is read in place.

Importing this package needs neither torch nor LMCache; ``CxlMemoryAdapter`` needs both
(the ``maru`` package itself never imports torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapter import CxlMemoryAdapter

__all__ = ["CxlMemoryAdapter"]


def __getattr__(name: str) -> Any:
    if name == "CxlMemoryAdapter":
        try:
            from .adapter import CxlMemoryAdapter
        except ImportError as e:
            raise ImportError(
                f"maru_lmcache.CxlMemoryAdapter needs torch and lmcache installed ({e})"
            ) from e
        return CxlMemoryAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
