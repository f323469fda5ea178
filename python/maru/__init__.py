"""Maru: KV-cache chunks shared in memory between inference processes, zero copy.

    from maru import MaruConfig, MaruHandler

    config = MaruConfig(server_url="tcp://localhost:5555")
    with MaruHandler(config) as handler:
        handle = handler.alloc(size=len(data))
        handle.buf[: len(data)] = data
        handler.store(key=12345, handle=handle)
        result = handler.retrieve(key=12345)  # MemoryInfo; result.view is a memoryview
"""

from ._maru import (
    AllocHandle,
    MaruError,
    MaruHandle,
    MemoryInfo,
    OwnedRegionManager,
    PagedMemoryAllocator,
    __version__,
)
from ._maru import MaruHandler as MaruHandler
from .config import MIB, MaruConfig
from .types import MappedRegion

__all__ = [
    "AllocHandle",
    "MappedRegion",
    "MaruConfig",
    "MaruError",
    "MaruHandle",
    "MaruHandler",
    "MemoryInfo",
    "MIB",
    "OwnedRegionManager",
    "PagedMemoryAllocator",
    "__version__",
]
