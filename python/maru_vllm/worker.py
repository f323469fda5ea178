"""The worker side: copies chunks between vLLM's KV blocks and Maru pages.

Load (``start_load_kv``, before the forward pass: loads are synchronous): one
``batch_retrieve`` for every chunk of the step, then per chunk and layer a copy from the page
into the request's blocks (``layouts.scatter_blocks``: one memcpy per run of consecutive block
ids for block-contiguous layouts). The views hold their pages only while they are copied; the
pins that kept the keys since the lookup belong to the scheduler's session, which releases
them once the step has run (scheduler.py). A chunk that is missing, the wrong size
or fails to copy is never skipped quietly: its blocks go to
``take_failed_blocks`` (vLLM's ``get_block_ids_with_load_errors``), so vLLM recomputes from
there, and nothing of that request is stored in the same step (its forward pass read the
blocks that failed).

Store (``save_kv_layer`` per layer, ``wait_for_save`` at the end of the step): the step's
completed chunks are checked with one ``batch_exists`` (a chunk that exists is skipped), a page
is allocated per part, each layer's blocks are copied straight into it, and the part is
registered with a write-behind ``store`` once its last layer is in. ``wait_for_save`` copies
any layer vLLM did not hand over, then ``flush()``es, so every chunk of the step is visible to
other instances when it returns.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .dma import DmaRegistrar
from .geometry import ChunkGeometry
from .keys import KeyScheme
from .layouts import BlockLayout, gather_blocks, scatter_blocks
from .metadata import LoadRequest, MaruConnectorMetadata, StoreChunk
from .scheduler import MAX_BATCH, batched
from .stats import Counters

__all__ = ["WorkerSide"]

logger = logging.getLogger(__name__)


_MADV_POPULATE_READ = 22


def _populate_read(region: memoryview) -> None:
    """Fills this process's page tables for a read-only mapping (Linux >= 5.14; a no-op
    elsewhere), so later copies from it take no page faults."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        start = _page(region).data_ptr()
        aligned = start & ~4095
        libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(start + region.nbytes - aligned), _MADV_POPULATE_READ)
    except Exception as e:  # a missed prefault only costs page faults later
        logger.debug("prefaulting a Maru region failed: %s", e)


def _page(buf: Any) -> torch.Tensor:
    """A uint8 tensor over a page's memoryview (read-only views of other instances' pages
    are only ever read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=torch.uint8)


class _MalformedKeys:
    """Keys whose value cannot be a chunk of this geometry, to delete so that a recompute can
    store the chunk right. The scheduler's pins (its session's, not this handler's) keep such
    a key until the scheduler lets go of the load, so a delete that finds it pinned is tried
    again at the start of later steps, a bounded number of times."""

    ATTEMPTS = 16

    def __init__(self, handler: Any) -> None:
        self._h = handler
        self._pending: dict[str, int] = {}

    def add(self, keys: list[str]) -> None:
        for k in keys:
            self._pending.setdefault(k, self.ATTEMPTS)

    def delete_now(self) -> None:
        for key, left in list(self._pending.items()):
            try:
                status = self._h.delete_status(key)
            except Exception as e:
                logger.warning("deleting the malformed Maru key %s failed: %s", key, e)
                status = "pinned"
            if status != "pinned" or left <= 1:
                if status == "pinned":
                    logger.warning("the malformed Maru key %s stayed pinned; left in place", key)
                del self._pending[key]
            else:
                self._pending[key] = left - 1


@dataclass
class _PendingChunk:
    chunk: StoreChunk
    keys: list[str]
    #: Parts this step stores (parts that exist already are left out).
    todo: set[int]
    pages: dict[int, Any] = field(default_factory=dict)
    layers_done: dict[int, set[int]] = field(default_factory=dict)
    failed: bool = False


class WorkerSide:
    def __init__(
        self,
        handler: Any,
        geometry: ChunkGeometry,
        keys: KeyScheme,
        tp_rank: int,
        layout: BlockLayout,
        kv_caches: dict[str, torch.Tensor],
        counters: Counters,
        dma: DmaRegistrar,
    ) -> None:
        missing = [n for n in geometry.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"KV caches of layers {missing} were not registered")
        self._h = handler
        self._g = geometry
        self._k = keys
        self._rank = tp_rank
        self._layout = layout
        self._blocks = [layout.blocks(kv_caches[n]) for n in geometry.layer_names]
        self._layer_index = {n: i for i, n in enumerate(geometry.layer_names)}
        self._device = kv_caches[geometry.layer_names[0]].device
        self._c = counters
        self._dma = dma
        self._failed_blocks: set[int] = set()
        self._failed_reqs: set[str] = set()
        self._step: MaruConnectorMetadata | None = None
        self._pending: list[_PendingChunk] = []
        self._save_seconds = 0.0
        self._store_failures = 0
        self._prefaulted: set[int] = set()
        self._malformed = _MalformedKeys(handler)

    # -- load ----------------------------------------------------------------------------

    def _prefault(self, info: Any) -> None:
        """The first time a region of another instance shows up, its whole mapping is
        prefaulted in the background: mapping a region is cheap but every first read of one
        of its 4 KiB pages faults, which costs more than copying the page. Later loads from
        the region then copy at memory speed."""
        region = getattr(info.view, "obj", None)
        rid = info.region_id
        if region is None or rid is None or rid in self._prefaulted:
            return
        self._prefaulted.add(rid)
        whole = memoryview(region)
        if not whole.readonly:
            return  # our own regions are populated when mapped
        threading.Thread(target=_populate_read, args=(whole,), name=f"maru-prefault-{rid}", daemon=True).start()

    def _register_for_dma(self, info: Any) -> None:
        if not self._dma.decision.register:
            return
        region = getattr(info.view, "obj", None) or info.view
        buf = memoryview(region)
        if self._dma.ensure(int(info.region_id), _page(buf).data_ptr(), buf.nbytes, read_only=buf.readonly):
            self._c.set_gauge("dma_registered_regions", self._dma.registered_regions)

    def _copy_in(self, parts: Sequence[Any], first_block: int, block_ids: list[int]) -> None:
        g, bl = self._g, self._layout
        n = len(block_ids)
        for p, info in enumerate(parts):
            self._prefault(info)
            self._register_for_dma(info)
            page = _page(info.view)
            for layer in g.part_layers(p):
                off = g.layer_offset(layer) + first_block * g.block_bytes
                src = page[off : off + n * g.block_bytes].view(bl.dtype).view(n, *bl.block_shape)
                scatter_blocks(self._blocks[layer], block_ids, src)

    def load(self, loads: list[LoadRequest]) -> None:
        self._malformed.delete_now()
        if not loads:
            return
        t0 = time.perf_counter()
        g = self._g
        plan = []
        flat: list[str] = []
        for req in loads:
            for ch in req.chunks:
                plan.append((req.req_id, ch, len(flat)))
                flat.extend(self._k.rank_keys(ch.chunk_hash, self._rank))
        try:
            infos: list[Any] = []
            for i in range(0, len(flat), MAX_BATCH):
                infos.extend(self._h.batch_retrieve(flat[i : i + MAX_BATCH]))
        except Exception as e:
            logger.error("Maru retrieve of %d keys failed; their blocks are reported as load errors: %s", len(flat), e)
            infos = [None] * len(flat)
        self._c.add(load_retrieve_seconds=time.perf_counter() - t0)
        # Keys whose value cannot be a chunk of this geometry (the key says it is): deleted
        # after the unpin, so the recompute can store the chunk right.
        malformed: list[str] = []
        for req_id, ch, i in plan:
            parts = infos[i : i + g.num_parts]
            n = len(ch.block_ids)
            problem = None
            for p, info in enumerate(parts):
                if info is None:
                    problem = f"part {p} is missing"
                elif len(info.view) != g.part_bytes(p):
                    problem = f"part {p} is {len(info.view)} bytes, expected {g.part_bytes(p)}"
                    malformed.append(flat[i + p])
                if problem:
                    break
            if problem is None:
                try:
                    self._copy_in(parts, ch.first_block, ch.block_ids)
                except Exception as e:
                    problem = f"copy failed: {e}"
            if problem is None:
                self._c.add(
                    loaded_chunks=1, loaded_tokens=n * g.block_size, loaded_bytes=n * g.block_bytes * g.num_layers
                )
                continue
            logger.warning(
                "Maru chunk %s of request %s did not load (%s): %d blocks reported to vLLM for recomputation",
                ch.chunk_hash.hex()[:12],
                req_id,
                problem,
                n,
            )
            self._failed_blocks.update(ch.block_ids)
            self._failed_reqs.add(req_id)
            self._c.add(load_errors=1, load_error_blocks=n)
        if self._device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        # The scheduler releases the pins once the step is done; views are dropped here.
        self._malformed.add(malformed)
        self._c.add(load_seconds=time.perf_counter() - t0)

    def take_failed_blocks(self) -> set[int]:
        out, self._failed_blocks = self._failed_blocks, set()
        return out

    # -- store ---------------------------------------------------------------------------

    def _begin_step(self, meta: MaruConnectorMetadata) -> None:
        self._step = meta
        self._pending = []
        seen: set[bytes] = set()
        candidates = []
        for req in meta.stores:
            if req.req_id in self._failed_reqs:
                # Its forward pass read blocks that failed to load: what it computed is wrong.
                continue
            for ch in req.chunks:
                if ch.chunk_hash not in seen:
                    seen.add(ch.chunk_hash)
                    candidates.append(ch)
        if not candidates:
            return
        keys = [self._k.rank_keys(ch.chunk_hash, self._rank) for ch in candidates]
        try:
            present = batched(self._h.batch_exists, [k for ks in keys for k in ks])
        except Exception as e:
            logger.error("Maru exists check failed; %d chunks are not stored this step: %s", len(candidates), e)
            self._c.add(store_errors=len(candidates))
            return
        parts = self._g.num_parts
        for i, (ch, ks) in enumerate(zip(candidates, keys, strict=True)):
            todo = {p for p in range(parts) if not present[i * parts + p]}
            if not todo:
                self._c.add(store_skipped_chunks=1)
                continue
            self._pending.append(_PendingChunk(chunk=ch, keys=ks, todo=todo))

    def _copy_out(self, pend: _PendingChunk, layer: int) -> None:
        g, bl = self._g, self._layout
        part = g.part_of_layer(layer)
        handle = pend.pages.get(part)
        if handle is None:
            handle = pend.pages[part] = self._h.alloc(g.part_bytes(part))
        page = _page(handle.buf)
        dst = page[g.layer_offset(layer) : g.layer_offset(layer) + g.layer_chunk_bytes]
        dst = dst.view(bl.dtype).view(g.blocks_per_chunk, *bl.block_shape)
        gather_blocks(self._blocks[layer], pend.chunk.block_ids, dst)
        done = pend.layers_done.setdefault(part, set())
        done.add(layer)
        if len(done) == len(g.part_layers(part)):
            if self._device.type == "cuda":
                torch.cuda.current_stream().synchronize()
            self._h.store(pend.keys[part], handle=handle)
            del pend.pages[part]
            pend.todo.discard(part)
            self._c.add(stored_bytes=g.part_bytes(part))
            if not pend.todo:
                self._c.add(stored_chunks=1, stored_tokens=pend.chunk.num_tokens)

    def _save(self, pend: _PendingChunk, layer: int) -> None:
        if pend.failed or self._g.part_of_layer(layer) not in pend.todo:
            return
        if layer in pend.layers_done.get(self._g.part_of_layer(layer), ()):
            return
        try:
            self._copy_out(pend, layer)
        except Exception as e:
            pend.failed = True
            self._c.add(store_errors=1)
            self._store_failures += 1
            # Counted every time; logged at the 1st, 2nd, 4th, 8th... failure (a full pool
            # fails every store until space comes back).
            if self._store_failures & (self._store_failures - 1) == 0:
                logger.warning(
                    "Maru store of chunk %s failed (%d store failures so far; later requests recompute): %s",
                    pend.chunk.chunk_hash.hex()[:12],
                    self._store_failures,
                    e,
                )
            self._free_pages(pend)

    def _free_pages(self, pend: _PendingChunk) -> None:
        for handle in pend.pages.values():
            try:
                self._h.free(handle)
            except Exception as e:
                logger.warning("freeing an unstored Maru page failed: %s", e)
        pend.pages.clear()

    def save_layer(self, layer_name: str, meta: MaruConnectorMetadata) -> None:
        if not meta.stores:
            return
        t0 = time.perf_counter()
        if self._step is not meta:
            self._begin_step(meta)
        layer = self._layer_index.get(layer_name)
        if layer is not None:
            for pend in self._pending:
                self._save(pend, layer)
        self._save_seconds += time.perf_counter() - t0

    def finish_step(self) -> None:
        """End of step: stores what is left, flushes, forgets the step's failures."""
        t0 = time.perf_counter()
        had_work = self._step is not None
        try:
            for pend in self._pending:
                for layer in range(self._g.num_layers):
                    self._save(pend, layer)
            if self._pending:
                try:
                    self._h.flush()
                except Exception as e:
                    self._c.add(store_errors=1)
                    logger.error("Maru registrations of this step failed (their chunks are recomputed later): %s", e)
        finally:
            self._pending = []
            self._step = None
            self._failed_reqs.clear()
            spent = self._save_seconds + time.perf_counter() - t0
            self._save_seconds = 0.0
            if had_work:
                self._c.add(store_seconds=spent)

    def close(self) -> None:
        self._malformed.delete_now()
        for pend in self._pending:
            self._free_pages(pend)
        self._pending = []
        try:
            self._h.flush()
        except Exception as e:
            logger.warning("Maru flush at shutdown failed: %s", e)
        self._dma.close()
