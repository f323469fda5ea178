"""LMCache memory objects over Maru pages, and the address that names a page."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import torch
from lmcache.v1.memory_management import MemoryObjMetadata, TensorMemoryObj

if TYPE_CHECKING:
    from .adapter import CxlMemoryAdapter

__all__ = ["PageMemoryObj", "PageState", "decode_address", "encode_address"]

_PAGE_BITS = 32
_PAGE_MASK = (1 << _PAGE_BITS) - 1


def encode_address(region_id: int, page_index: int) -> int:
    """The ``MemoryObjMetadata.address`` of a page: region id above, page index in the low
    32 bits (LMCache logs it decoded, and integer addresses serialise as they are)."""
    if not 0 <= page_index <= _PAGE_MASK or region_id < 0:
        raise ValueError(f"page ({region_id}, {page_index}) has no address")
    return (region_id << _PAGE_BITS) | page_index


def decode_address(address: int) -> tuple[int, int]:
    """``(region_id, page_index)`` of an address made by `encode_address`."""
    return address >> _PAGE_BITS, address & _PAGE_MASK


class PageState(enum.Enum):
    """Who a page belongs to, as far as LMCache's memory object knows."""

    #: Allocated for LMCache and not yet handed to a store: LMCache owns it.
    ALLOCATED = "allocated"
    #: Handed to a store: once the key is registered, the key owns the page and only
    #: deleting the key frees it. If the store fails, LMCache drops its reference and the
    #: page goes back.
    STORING = "storing"
    #: Given back to the handler.
    RELEASED = "released"
    #: A view of a stored page (this instance's or another's): nothing to give back.
    BORROWED = "borrowed"


class PageMemoryObj(TensorMemoryObj):
    """A ``TensorMemoryObj`` whose tensor is a Maru page in shared memory (no copy).

    LMCache frees a memory object through its parent allocator when the last reference and
    pin are dropped, and again when the object is garbage collected while still valid. The
    adapter is the parent, and the page's state decides what freeing means.
    """

    def __init__(
        self,
        raw_data: torch.Tensor,
        metadata: MemoryObjMetadata,
        adapter: CxlMemoryAdapter,
        region_id: int,
        page_index: int,
        state: PageState,
    ) -> None:
        super().__init__(raw_data, metadata, parent_allocator=adapter)
        self.adapter = adapter
        self.region_id = region_id
        self.page_index = page_index
        self.page_state = state

    def __del__(self) -> None:
        # TensorMemoryObj.__del__ frees every valid object it collects and warns about
        # references still counted. A stored chunk keeps one reference for good (LMCache's
        # backend holds it so the page is not reclaimed), and its page belongs to the key;
        # only a page LMCache dropped before storing goes back.
        try:
            self.adapter.collected(self)
        except Exception:  # noqa: BLE001 - nothing may escape a finaliser
            pass
