"""``CxlMemoryAdapter``: LMCache's ``MemoryAllocatorInterface`` over a ``MaruHandler``'s pages.

Every memory object this adapter hands out is a slice of a Maru page, viewed as a torch
tensor over the handler's own mapping of the pool: LMCache's KV copy into the object writes
the shared page, registering the key afterwards moves no bytes, and a read returns a tensor
over the stored page itself.

Life of a page, as LMCache's ``MaruBackend`` drives it:

- ``allocate`` takes a page from the handler (a new region from the server when the owned
  ones are full; the handler's region-added callback maps it here). A full pool returns
  None, as LMCache's own allocators do, and LMCache then stores fewer chunks.
- ``create_store_handle`` names the page for ``MaruHandler.store``. A registered key owns
  its page; ``MaruBackend.remove`` deletes the key and the handler frees the page.
- A store that fails drops LMCache's last reference: the page goes back to the handler. So
  does a page LMCache allocated and dropped without storing.
- ``get_by_location`` returns a new object over a stored page (of any instance; other
  instances' pages are mapped read-only, so LMCache only reads them, as it does).
"""

from __future__ import annotations

import threading
import warnings

import torch
from lmcache.logging import init_logger
from lmcache.utils import get_size_bytes
from lmcache.v1.memory_management import (
    MemoryAllocatorInterface,
    MemoryFormat,
    MemoryObj,
    MemoryObjMetadata,
)

from maru import AllocHandle, MaruHandler

from .layout import page_stride
from .page import PageMemoryObj, PageState, decode_address, encode_address

__all__ = ["CxlMemoryAdapter"]

logger = init_logger(__name__)

_EMPTY = memoryview(b"")


class CxlMemoryAdapter(MemoryAllocatorInterface):
    """LMCache memory objects over the pages of a connected ``MaruHandler``.

    ``shapes``/``dtypes``/``fmt`` describe a full chunk (what ``get_by_location`` returns
    for a full page); ``chunk_size`` is the page size in bytes (the handler's chunk size).
    Thread-safe: LMCache allocates on its worker threads and stores on its event loop.
    """

    def __init__(
        self,
        handler: MaruHandler,
        shapes: list[torch.Size],
        dtypes: list[torch.dtype],
        fmt: MemoryFormat,
        chunk_size: int,
    ) -> None:
        shapes, dtypes = self._adapt_shapes_and_dtypes(shapes, dtypes)
        handler_chunk = handler.get_chunk_size()
        full = get_size_bytes(shapes, dtypes)
        if not 0 < chunk_size <= handler_chunk:
            raise ValueError(f"chunk_size {chunk_size} must be in 1..{handler_chunk} (the handler's chunk size)")
        if full > chunk_size:
            raise ValueError(f"a full chunk ({shapes}, {dtypes}) is {full} bytes, more than a page ({chunk_size})")
        self._handler = handler
        self._shapes = shapes
        self._dtypes = dtypes
        self._fmt = fmt
        self._chunk_size = chunk_size
        self._full_size = full
        self._stride = page_stride(handler_chunk)
        self._lock = threading.Lock()
        # region id -> (the mapped pages as one uint8 tensor, page count)
        self._regions: dict[int, tuple[torch.Tensor, int]] = {}
        self._closed = False
        # Replayed at once for the regions the handler owns; later fired for every region it
        # adds when its pages run out.
        handler.set_on_region_added(self._on_region_added)

    # ---------------------------------------------------------------- addresses

    @staticmethod
    def encode_address(region_id: int, page_index: int) -> int:
        return encode_address(region_id, page_index)

    @staticmethod
    def decode_address(address: int) -> tuple[int, int]:
        """``(region_id, page_index)`` of a memory object's ``metadata.address``."""
        return decode_address(address)

    # ---------------------------------------------------------------- regions

    def _on_region_added(self, region_id: int, page_count: int) -> None:
        self._map_region(region_id, page_count)

    def _map_region(self, region_id: int, page_count: int) -> tuple[torch.Tensor, int] | None:
        """The region's pages as one tensor over the handler's mapping (no copy)."""
        view = self._handler.get_buffer_view(region_id, 0, page_count * self._stride) if page_count > 0 else None
        if view is None:
            logger.error("[Maru] region %d (%d pages) is not mapped by the handler", region_id, page_count)
            return None
        with warnings.catch_warnings():
            # Other instances' regions are mapped read-only; torch warns that it cannot mark
            # a tensor read-only. LMCache only reads the chunks it retrieves.
            warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
            tensor = torch.frombuffer(view, dtype=torch.uint8)
        entry = (tensor, page_count)
        with self._lock:
            if self._closed:
                return None
            self._regions[region_id] = entry
        logger.debug("[Maru] region %d mapped: %d pages of %d bytes", region_id, page_count, self._stride)
        return entry

    def _region(self, region_id: int) -> tuple[torch.Tensor, int] | None:
        entry = self._regions.get(region_id)
        if entry is not None:
            return entry
        # Another instance's region (or an owned one whose callback has not run yet).
        page_count = self._handler.get_region_page_count(region_id)
        if page_count is None:
            return None
        return self._map_region(region_id, page_count)

    # ---------------------------------------------------------------- MemoryAllocatorInterface

    def allocate(
        self,
        shapes: torch.Size | list[torch.Size],
        dtypes: torch.dtype | list[torch.dtype],
        fmt: MemoryFormat = MemoryFormat.UNDEFINED,
        allocator_type: str | None = None,
    ) -> MemoryObj | None:
        """A memory object over a fresh page, or None when no page can be had (pool full,
        chunk larger than a page, handler closed), as LMCache's allocators do."""
        shapes, dtypes = self._adapt_shapes_and_dtypes(shapes, dtypes)
        size = get_size_bytes(shapes, dtypes)
        if not 0 < size <= self._chunk_size:
            logger.error("[Maru] cannot allocate %d bytes: a page holds %d", size, self._chunk_size)
            return None
        if self._closed:
            return None
        try:
            handle = self._handler.alloc(size)
        except ValueError as e:  # pool exhausted
            logger.debug("[Maru] allocate: no page: %s", e)
            return None
        except (RuntimeError, TimeoutError) as e:  # closed, connection lost, server slow
            logger.warning("[Maru] allocate failed: %s", e)
            return None
        region_id, page_index = handle.region_id, handle.page_index
        entry = self._region(region_id)
        if entry is None or page_index >= entry[1]:
            logger.error("[Maru] allocate: page (%d, %d) is outside the mapped region", region_id, page_index)
            self._release(region_id, page_index)
            return None
        offset = page_index * self._stride
        metadata = MemoryObjMetadata(
            shape=shapes[0],
            dtype=dtypes[0],
            address=encode_address(region_id, page_index),
            phy_size=self._chunk_size,
            ref_count=1,
            pin_count=0,
            fmt=fmt,
            shapes=shapes,
            dtypes=dtypes,
        )
        return PageMemoryObj(
            entry[0][offset : offset + size], metadata, self, region_id, page_index, PageState.ALLOCATED
        )

    def batched_allocate(
        self,
        shapes: torch.Size | list[torch.Size],
        dtypes: torch.dtype | list[torch.dtype],
        batch_size: int,
        fmt: MemoryFormat = MemoryFormat.UNDEFINED,
        allocator_type: str | None = None,
    ) -> list[MemoryObj] | None:
        """``batch_size`` objects, or None (and no page taken) if any cannot be had."""
        objs: list[MemoryObj] = []
        for _ in range(batch_size):
            obj = self.allocate(shapes, dtypes, fmt, allocator_type)
            if obj is None:
                self.batched_free(objs)
                return None
            objs.append(obj)
        return objs

    def free(self, memory_obj: MemoryObj, allocator_type: str | None = None) -> None:
        """Called by LMCache when an object's last reference and pin are gone: its page goes
        back to the handler, and a key stored at it is deleted with it (LMCache gave the
        chunk up). A view of a stored page frees nothing."""
        # LMCache calls this while holding the object's lock, so its `metadata` property
        # (which takes that lock) is not read here.
        if not isinstance(memory_obj, PageMemoryObj):
            logger.warning("[Maru] free: %r was not allocated by this adapter", memory_obj)
            return
        with self._lock:
            if memory_obj.page_state not in (PageState.ALLOCATED, PageState.STORING):
                return
            memory_obj.page_state = PageState.RELEASED
        self._release(memory_obj.region_id, memory_obj.page_index)

    def batched_free(
        self,
        memory_objs: list[MemoryObj],
        allocator_type: str | None = None,
        update_stats: bool = True,
    ) -> None:
        for obj in memory_objs:
            self.free(obj, allocator_type)

    def collected(self, memory_obj: PageMemoryObj) -> None:
        """A memory object was garbage collected: a page that never reached a store goes
        back; a stored page stays with its key."""
        with self._lock:
            if memory_obj.page_state is not PageState.ALLOCATED:
                return
            memory_obj.page_state = PageState.RELEASED
        self._release(memory_obj.region_id, memory_obj.page_index)

    def _release(self, region_id: int, page_index: int) -> None:
        try:
            self._handler.free(AllocHandle(buf=_EMPTY, _region_id=region_id, _page_index=page_index, _size=0))
        except (ValueError, RuntimeError, TimeoutError) as e:
            # Closed handler (its pages are gone with it), a pinned key, or a page the
            # handler no longer tracks (a store that found its key already there).
            logger.debug("[Maru] page (%d, %d) not freed: %s", region_id, page_index, e)

    def close(self) -> None:
        """Stops following the handler's regions. Objects still alive stay readable."""
        self._handler.set_on_region_added(None)
        with self._lock:
            self._closed = True
            self._regions.clear()

    # ---------------------------------------------------------------- store and retrieve

    def create_store_handle(self, memory_obj: MemoryObj) -> AllocHandle:
        """The handle ``MaruHandler.store``/``batch_store`` registers the object's page with
        (its bytes are already in the page). ValueError for an object that is not a page
        this adapter allocated and has not stored."""
        if not isinstance(memory_obj, PageMemoryObj):
            raise ValueError(f"{memory_obj!r} was not allocated by CxlMemoryAdapter")
        with self._lock:
            if memory_obj.page_state is not PageState.ALLOCATED:
                raise ValueError(
                    f"page ({memory_obj.region_id}, {memory_obj.page_index}) cannot be stored: "
                    f"it is {memory_obj.page_state.value}"
                )
            memory_obj.page_state = PageState.STORING
        return AllocHandle(
            buf=_EMPTY,
            _region_id=memory_obj.region_id,
            _page_index=memory_obj.page_index,
            _size=memory_obj.get_size(),
        )

    def get_by_location(
        self,
        region_id: int,
        page_index: int,
        actual_size: int,
        single_token_size: int,
    ) -> MemoryObj | None:
        """A memory object over the stored page ``(region_id, page_index)`` holding
        ``actual_size`` bytes: a full chunk, or a last chunk of fewer tokens
        (``actual_size // single_token_size``). None if the page is not mapped or the size
        fits no chunk. Its reference count is 0: LMCache's backend takes the caller's."""
        entry = self._region(region_id)
        if entry is None:
            logger.debug("[Maru] get_by_location: region %d is not mapped", region_id)
            return None
        tensor, page_count = entry
        if not 0 <= page_index < page_count or not 0 < actual_size <= self._chunk_size:
            logger.error(
                "[Maru] get_by_location: page (%d, %d) of %d bytes is outside the region (%d pages of %d)",
                region_id, page_index, actual_size, page_count, self._chunk_size,
            )
            return None
        shapes = self._shapes
        if actual_size != self._full_size:
            shapes = self._partial_shapes(actual_size, single_token_size)
            if shapes is None:
                return None
        offset = page_index * self._stride
        metadata = MemoryObjMetadata(
            shape=shapes[0],
            dtype=self._dtypes[0],
            address=encode_address(region_id, page_index),
            phy_size=self._chunk_size,
            ref_count=0,
            pin_count=0,
            fmt=self._fmt,
            shapes=shapes,
            dtypes=self._dtypes,
        )
        return PageMemoryObj(
            tensor[offset : offset + actual_size], metadata, self, region_id, page_index, PageState.BORROWED
        )

    def _partial_shapes(self, actual_size: int, single_token_size: int) -> list[torch.Size] | None:
        """The chunk shapes with the token dimension cut to the tokens ``actual_size`` holds."""
        dim = self._fmt.token_dim()
        tokens = actual_size // single_token_size if single_token_size > 0 else 0
        shapes = []
        for shape in self._shapes:
            dims = list(shape)
            if dim >= len(dims):
                break
            dims[dim] = tokens
            shapes.append(torch.Size(dims))
        if tokens == 0 or len(shapes) != len(self._shapes) or get_size_bytes(shapes, self._dtypes) != actual_size:
            logger.error(
                "[Maru] a stored chunk of %d bytes is not a whole number of %d-byte tokens of %s",
                actual_size, single_token_size, self._shapes,
            )
            return None
        return shapes
