"""Pure-Python value types of the compatibility API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["MappedRegion"]


@dataclass
class MappedRegion:
    """A mapped region as the original's mapper describes it: id, handle and size, plus a
    memoryview of the whole region when one is attached."""

    region_id: int
    handle: Any = None
    size: int = 0
    _buffer_view: memoryview | None = field(default=None, repr=False)

    @property
    def is_mapped(self) -> bool:
        return self._buffer_view is not None

    def get_buffer_view(self, offset: int, size: int) -> memoryview | None:
        """A zero-copy slice, or None if unmapped or out of range."""
        if self._buffer_view is None or offset < 0 or size < 0 or offset + size > len(self._buffer_view):
            return None
        return self._buffer_view[offset : offset + size]

    def read_bytes(self, offset: int, size: int) -> bytes:
        view = self.get_buffer_view(offset, size)
        if view is None:
            raise RuntimeError(f"Region {self.region_id} is not mapped")
        return bytes(view)

    def release(self) -> None:
        if self._buffer_view is not None:
            try:
                self._buffer_view.release()
            except ValueError:
                pass
            self._buffer_view = None
