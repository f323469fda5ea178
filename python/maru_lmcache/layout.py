"""Where a handler's pages lie in a region (no torch needed)."""

from __future__ import annotations

__all__ = ["PAGE_ALIGN", "page_stride"]

#: Page offsets are multiples of this: the server registers them in 4 KiB units.
PAGE_ALIGN = 4096


def page_stride(chunk_size_bytes: int) -> int:
    """Distance in bytes between two pages of a region: the chunk size rounded up to
    `PAGE_ALIGN`, as the handler lays them out (a 1 KiB chunk takes a 4 KiB page)."""
    if chunk_size_bytes <= 0:
        raise ValueError(f"chunk_size_bytes must be > 0, got {chunk_size_bytes}")
    return -(-chunk_size_bytes // PAGE_ALIGN) * PAGE_ALIGN
