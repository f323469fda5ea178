"""Compatibility import path: ``maru_handler.memory.AllocHandle`` and friends."""

from maru import AllocHandle, MemoryInfo, OwnedRegionManager, PagedMemoryAllocator

from .types import MappedRegion

__all__ = ["AllocHandle", "MappedRegion", "MemoryInfo", "OwnedRegionManager", "PagedMemoryAllocator"]
