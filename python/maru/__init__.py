"""Maru: KV-cache chunks shared in memory between inference processes, zero copy.

    from maru import MaruConfig, MaruHandler

    config = MaruConfig(server_url="tcp://localhost:5555")
    with MaruHandler(config) as handler:
        handle = handler.alloc(size=len(data))
        handle.buf[: len(data)] = data
        handler.store(key=12345, handle=handle)
        result = handler.retrieve(key=12345)  # MemoryInfo; result.view is a memoryview
"""

from . import errors
from ._maru import (
    AllocHandle,
    MaruHandle,
    MemoryInfo,
    OwnedRegionManager,
    PagedMemoryAllocator,
    __version__,
)
from ._maru import MaruHandler as MaruHandler
from .config import MIB, MaruConfig
from .errors import (
    ConnectFailedError,
    ConnectionLostError,
    ForkedHandlerError,
    HandlerClosedError,
    InvalidArgumentError,
    InvalidKeyError,
    MapFailedError,
    MaruError,
    MaruTimeoutError,
    NotConnectedError,
    PermissionDeniedError,
    PoolExhaustedError,
    PoolUnhealthyError,
    ProtocolError,
    ServerBusyError,
    ServerError,
    ServerLostError,
    WrongPoolError,
)
from .types import MappedRegion

__all__ = [
    *errors.__all__,
    "AllocHandle",
    "MappedRegion",
    "MaruConfig",
    "MaruHandle",
    "MaruHandler",
    "MemoryInfo",
    "MIB",
    "OwnedRegionManager",
    "PagedMemoryAllocator",
    "__version__",
]
