"""Compatibility import path: ``maru_handler.memory.types.MemoryInfo`` / ``MappedRegion``."""

from maru import AllocHandle, MemoryInfo
from maru.types import MappedRegion

__all__ = ["AllocHandle", "MappedRegion", "MemoryInfo"]
