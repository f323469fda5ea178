"""MaruStorage: SGLang HiCache's L3 in Maru's shared memory, shared by every instance on a host.

SGLang creates it through its dynamic storage backend::

    --enable-hierarchical-cache --hicache-mem-layout page_first \\
    --hicache-storage-backend dynamic \\
    --hicache-storage-backend-extra-config '{"backend_name": "maru",
        "module_path": "maru_sglang.maru_storage", "class_name": "MaruStorage",
        "interface_v1": 1, "maru_server_url": "unix:///dev/shm/maru/maru-5555.sock"}'

With ``interface_v1`` SGLang moves pages with ``batch_get_v1``/``batch_set_v1``: one ``copy_``
per page between the host pool and a Maru page, nothing in between. Without it SGLang's
generic path calls ``batch_get``/``batch_set`` with flat page tensors; both paths store the
same bytes under the same keys.

Where this host can read the server's key index (same host, the default), reads take no
round trip for lookups: ``batch_exists`` answers from the index, and ``batch_get_v1`` copies
contiguous pages (MLA) straight from shared memory into the host pool, checking each entry's
generation afterwards, and other pages (MHA's K and V runs) through one ``batch_retrieve``
whose views hold their pages while they are copied. A key gone in between is a clean False.
Otherwise reads run under pins: ``batch_exists`` pins what it finds in the same round trip,
``batch_get_v1`` pins whatever it was not handed, copies only pinned keys and unpins them
after the copy. See docs/SGLANG.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from maru import AllocHandle, InvalidArgumentError, MaruConfig, MaruError, MaruHandler

from .config import MaruSGLangConfig
from .keys import KeyScheme, rank_tag
from .pages import ZERO_COPY_LAYOUTS, HostPages, shm_tensor, writable_bytes
from .pins import PinLeases
from .stats import Counters, MaruStorageMetrics

__all__ = ["MaruStorage"]

logger = logging.getLogger("maru_sglang")

#: After a failed (re)connect, calls fail fast for this long before the next attempt.
RECONNECT_BACKOFF_S = 5.0


def _leading(flags: list[bool]) -> int:
    n = 0
    for f in flags:
        if not f:
            break
        n += 1
    return n


def _maybe_registered(exc: BaseException) -> bool:
    # After a timeout or a lost connection the server may have registered the keys, so their
    # pages must not be reused; a refusal or an argument error had no effect.
    return isinstance(exc, TimeoutError) or (
        isinstance(exc, MaruError) and getattr(exc, "code", "") in ("ConnectionLost", "BadReply")
    )


class MaruStorage(HiCacheStorage):
    """HiCache L3 storage in Maru shared memory (MHA and MLA host pools)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None) -> None:
        self.storage_config = storage_config
        extra = dict(storage_config.extra_config or {})
        self.config = MaruSGLangConfig.from_extra_config(extra)
        self.keys = KeyScheme(storage_config, self.config.namespace)
        self.is_mla = bool(storage_config.is_mla_model)
        writer = getattr(storage_config, "is_storage_writer", None)
        self.is_writer = (
            bool(writer) if writer is not None else (not self.is_mla or storage_config.tp_rank == 0)
        )
        # Read exactly as SGLang's cache controller reads it, so both agree on the path.
        self.interface_v1 = bool(extra.get("interface_v1", 0))
        self.counters = Counters()
        self._pins = PinLeases(self.config.pin_ttl_s) if self.config.pin_ttl_s > 0 else None
        self._metrics_on = bool(storage_config.enable_storage_metrics)
        self._metrics = MaruStorageMetrics()
        self._metrics_lock = threading.Lock()
        self._pages: HostPages | None = None
        self._chunk = self.config.chunk_size_bytes
        self._handler: MaruHandler | None = None
        self._handler_lock = threading.Lock()
        # Held by writes and clear(): clear frees every page this instance owns, which must
        # not catch a page between its alloc and its registration.
        self._write_lock = threading.Lock()
        self._next_connect = 0.0
        self._closed = False
        if self._chunk is not None:
            self._handler = self._connect(self._chunk)
        if not self.interface_v1:
            logger.info(
                "maru_sglang: interface_v1 is not set; SGLang uses the copying get/set path "
                '(add "interface_v1": 1 to the extra config for zero-copy batch_get_v1/batch_set_v1)'
            )

    # -- connection ------------------------------------------------------------------------

    @property
    def handler(self) -> MaruHandler | None:
        """The MaruHandler this backend uses (None until it connects)."""
        return self._handler

    def _connect(self, chunk: int) -> MaruHandler:
        c = self.config
        if c.pool_size < chunk:
            raise ValueError(f"maru_pool_size ({c.pool_size} bytes) is smaller than one page ({chunk} bytes)")
        kwargs: dict[str, Any] = dict(
            server_url=c.server_url,
            pool_size=c.pool_size,
            chunk_size_bytes=chunk,
            auto_connect=False,
            timeout_ms=c.timeout_ms,
            use_async_rpc=c.use_async_rpc,
            max_inflight=c.max_inflight,
            eager_map=c.eager_map,
        )
        if c.instance_id is not None:
            # An instance id is a label (each handler is a session of its own whatever its
            # id); the rank tag keeps each rank's line apart in `maru stats`.
            tag = rank_tag(self.storage_config)
            kwargs["instance_id"] = f"{c.instance_id}-{tag}" if tag else c.instance_id
        handler = MaruHandler(MaruConfig(**kwargs))
        if not handler.connect():
            raise RuntimeError(
                f"maru_sglang: cannot connect to the Maru server at {c.server_url} "
                "(is `maru up` running? see the warning above for the cause)"
            )
        logger.info(
            "maru_sglang: connected to %s (instance %s, page %d bytes, first region %d bytes, namespace %r)",
            c.server_url,
            handler.instance_id,
            chunk,
            c.pool_size,
            c.namespace,
        )
        return handler

    def _live_handler(self, op: str, keys: int) -> MaruHandler | None:
        """The connected handler; after the server was lost, a new one (at most one attempt
        per RECONNECT_BACKOFF_S). None, counted and logged, when there is none."""
        h = self._handler
        if h is not None and h.connected:
            return h
        with self._handler_lock:
            h = self._handler
            if h is not None and h.connected:
                return h
            if self._closed:
                self.counters.error(op, "MaruStorage is closed", keys)
                return None
            if self._chunk is None:
                self.counters.error(op, "no host pool registered yet and maru_chunk_size_bytes not set", keys)
                return None
            if h is not None:
                # The server died or shut down: this session, its pins and its pages are gone.
                logger.warning(
                    "maru_sglang: lost the Maru server at %s; reconnecting", self.config.server_url
                )
                h.close()
                self._handler = None
                if self._pins is not None:
                    self._pins.drain()
            now = time.monotonic()
            if now < self._next_connect:
                self.counters.error(op, "not connected (waiting to reconnect)", keys)
                return None
            try:
                self._handler = self._connect(self._chunk)
            except Exception as e:
                self._next_connect = now + RECONNECT_BACKOFF_S
                self.counters.error(op, e, keys)
                return None
            self.counters.add("reconnects")
            return self._handler

    # -- host pool -------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        pages = HostPages(mem_pool_host)
        if self.interface_v1 and not pages.zero_copy:
            raise ValueError(
                f"MaruStorage with interface_v1 needs a page-first host layout "
                f"(--hicache-mem-layout {' or '.join(ZERO_COPY_LAYOUTS)}), got {pages.layout!r}"
            )
        with self._handler_lock:
            if self._chunk is None:
                self._chunk = pages.nbytes
            if self._chunk < pages.nbytes:
                raise ValueError(
                    f"maru_chunk_size_bytes ({self._chunk}) is smaller than one host page "
                    f"({pages.nbytes} bytes); raise it or leave it unset (one page)"
                )
            if self._handler is None:
                self._handler = self._connect(self._chunk)
        self.keys.set_format(pages.layout, pages.dtype)
        self._pages = pages
        logger.info(
            "maru_sglang: host pool %s, layout %s, %s pages of %d bytes (%s, TP rank %d of %d%s)",
            type(mem_pool_host).__name__,
            pages.layout,
            pages.dtype,
            pages.nbytes,
            "MLA" if self.is_mla else "MHA",
            self.storage_config.tp_rank,
            self.storage_config.tp_size,
            "" if self.is_writer else ", reads only",
        )

    def _v1_pages(
        self, op: str, keys: list[str], host_indices: torch.Tensor
    ) -> tuple[HostPages, list[int]] | None:
        pages = self._pages
        if pages is None:
            self.counters.error(op, "no host pool registered", len(keys))
            return None
        if not pages.zero_copy:
            self.counters.error(op, f"host layout {pages.layout!r} is not page-first", len(keys))
            return None
        starts = pages.starts(host_indices, len(keys))
        if starts is None:
            got = None if host_indices is None else host_indices.numel()
            self.counters.error(
                op, f"{got} host indices for {len(keys)} pages of {pages.indices_per_page}", len(keys)
            )
            return None
        return pages, starts

    # -- pins ------------------------------------------------------------------------------

    def _unpin(self, h: MaruHandler, keys: list[str], counter: str) -> None:
        if not keys:
            return
        try:
            h.batch_unpin(keys)
            self.counters.add(counter, len(keys))
        except Exception as e:
            self.counters.error("unpin", e, 0)

    def _sweep(self, h: MaruHandler) -> None:
        if self._pins is not None:
            self._unpin(h, self._pins.expired(), "pins_expired")

    # -- reads and writes shared by both interfaces -----------------------------------------

    def _index_reads(self, h: MaruHandler) -> bool:
        """Whether reads go through the server's key index here: no round trip, no pin."""
        return self.config.index_reads and h.reads_index()

    def _read(
        self,
        op: str,
        full: list[str],
        copy: Callable[[int, memoryview], None],
        into: Callable[[int], memoryview | None] | None = None,
    ) -> list[bool]:
        """Copies each present key's value out: `copy(i, view)` from a view of its page, or,
        where `into(i)` gives key i's destination as contiguous bytes of the value's size,
        straight from shared memory into it. True for each key copied."""
        n = len(full)
        ok = [False] * n
        h = self._live_handler(op, n)
        if h is None:
            return ok
        self._sweep(h)
        try:
            if self._index_reads(h):
                self._read_from_index(op, h, full, copy, into, ok)
            else:
                self._read_pinned(op, h, full, copy, ok)
        except Exception as e:
            self.counters.error(op, e, n - sum(ok))
        hits = sum(ok)
        self.counters.add("read_hits", hits)
        self.counters.add("read_misses", n - hits)
        return ok

    def _read_from_index(
        self,
        op: str,
        h: MaruHandler,
        full: list[str],
        copy: Callable[[int, memoryview], None],
        into: Callable[[int], memoryview | None] | None,
        ok: list[bool],
    ) -> None:
        """Keys with a contiguous destination are copied out of the key index (the copy is
        checked against the entry's generation afterwards: a page deleted, evicted or
        reused meanwhile is a miss, never torn bytes); the others through one
        batch_retrieve, whose views hold their pages while they are copied."""
        dests = [into(i) if into is not None else None for i in range(len(full))]
        direct = [i for i, d in enumerate(dests) if d is not None]
        viewed = [i for i, d in enumerate(dests) if d is None]
        if direct:
            try:
                sizes = h.batch_retrieve_into([full[i] for i in direct], [dests[i] for i in direct])
            except InvalidArgumentError:
                # A value larger than its destination: the views' path tells which, per key.
                viewed, direct, sizes = sorted(viewed + direct), [], []
            for i, size in zip(direct, sizes, strict=True):
                want = len(dests[i])  # type: ignore[arg-type]
                if size is not None and size != want:
                    self.counters.add("size_mismatches")
                    self.counters.error(op, f"{full[i]} holds {size} bytes, the destination {want}", 1)
                ok[i] = size == want
        if viewed:
            self._copy_views(op, viewed, h.batch_retrieve([full[i] for i in viewed]), copy, ok)

    def _read_pinned(
        self, op: str, h: MaruHandler, full: list[str], copy: Callable[[int, memoryview], None], ok: list[bool]
    ) -> None:
        """The pin rule: every copy happens while this instance holds a pin on the key."""
        n = len(full)
        pinned = [False] * n
        try:
            if self._pins is not None:
                pinned = self._pins.take(full)
                need = [i for i in range(n) if not pinned[i]]
                if need:
                    got = h.batch_pin([full[i] for i in need])
                    self.counters.add("pins_taken", sum(got))
                    for i, g in zip(need, got, strict=True):
                        pinned[i] = g
                wanted = [i for i in range(n) if pinned[i]]
            else:
                wanted = list(range(n))
            if wanted:
                self._copy_views(op, wanted, h.batch_retrieve([full[i] for i in wanted]), copy, ok)
        finally:
            if self._pins is not None:
                self._unpin(h, [full[i] for i in range(n) if pinned[i]], "pins_released")

    def _copy_views(
        self, op: str, which: list[int], infos: list[Any], copy: Callable[[int, memoryview], None], ok: list[bool]
    ) -> None:
        for i, info in zip(which, infos, strict=True):
            if info is None:
                continue
            try:
                copy(i, info.view)
                ok[i] = True
            except Exception as e:
                self.counters.error(op, e, 1)

    def _write(self, op: str, full: list[str], source: Callable[[int], torch.Tensor]) -> list[bool]:
        """Stores `source(i)` under each key not present yet: one alloc'ed Maru page per key,
        filled with one copy_, all registered in one round trip. True for each key present
        afterwards."""
        n = len(full)
        if not self.is_writer:
            # MLA KV is the same on every TP rank; the writer rank stores it for all.
            self.counters.add("skipped_not_writer", n)
            return [True] * n
        h = self._live_handler(op, n)
        if h is None:
            return [False] * n
        with self._write_lock:
            try:
                ok = list(h.batch_exists(full))
            except Exception as e:
                self.counters.error(op, e, n)
                return [False] * n
            self.counters.add("already_present", sum(ok))
            todo: list[int] = []
            handles = []
            for i in range(n):
                if ok[i]:
                    continue
                try:
                    src = source(i)
                    handle = h.alloc(src.numel() * src.element_size())
                except Exception as e:
                    # Out of pages (or a page too large): the rest fails the same way.
                    self.counters.error(f"{op} (alloc)", e, sum(1 for j in range(i, n) if not ok[j]))
                    break
                try:
                    shm_tensor(handle.buf, src.dtype, src.shape).copy_(src)
                except Exception as e:
                    self._free(h, [handle])
                    self.counters.error(f"{op} (copy)", e, 1)
                    continue
                handles.append(handle)
                todo.append(i)
            if not todo:
                return ok
            try:
                h.batch_store([full[i] for i in todo], handles)
            except Exception as e:
                self.counters.error(op, e, len(todo))
                if _maybe_registered(e):
                    self.counters.add("pages_left_taken", len(handles))
                else:
                    self._free(h, handles)
                return ok
            for i in todo:
                ok[i] = True
            self.counters.add("written", len(todo))
            return ok

    def _free(self, h: MaruHandler, handles: list[Any]) -> None:
        for handle in handles:
            try:
                h.free(handle)
            except Exception as e:
                self.counters.error("free", e, 0)

    def _record(self, kind: str, pages: int, started: float) -> None:
        if not self._metrics_on or not pages or self._pages is None:
            return
        elapsed = max(time.perf_counter() - started, 1e-9)
        gb = pages * self._pages.nbytes / (1 << 30)
        with self._metrics_lock:
            getattr(self._metrics, f"{kind}_pgs").append(pages)
            getattr(self._metrics, f"{kind}_bandwidth").append(gb / elapsed)

    # -- zero-copy interface ---------------------------------------------------------------

    def _zero_copy(
        self,
        op: str,
        keys: list[str],
        host_indices: torch.Tensor,
        run: Callable[[HostPages, list[int]], list[bool]],
    ) -> list[bool]:
        """What both zero-copy calls share: `run(pages, starts)` once the host pool and
        indices fit, else (and on any error, counted) all False."""
        n = len(keys)
        try:
            found = self._v1_pages(op, keys, host_indices) if n else None
            if found is None:
                return [False] * n
            return run(*found)
        except Exception as e:
            self.counters.error(op, e, n)
            return [False] * n

    def batch_get_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Copies each key's page from shared memory straight into its host pool page."""

        def get(pages: HostPages, starts: list[int]) -> list[bool]:
            full = self.keys.keys(keys)
            started = time.perf_counter()

            def copy(i: int, view: memoryview) -> None:
                if len(view) != pages.nbytes:
                    self.counters.add("size_mismatches")
                    raise ValueError(f"{full[i]} holds {len(view)} bytes, a page is {pages.nbytes}")
                pages.page(starts[i]).copy_(shm_tensor(view, pages.dtype, pages.shape))

            ok = self._read("batch_get_v1", full, copy, lambda i: writable_bytes(pages.page(starts[i])))
            self._record("prefetch", sum(ok), started)
            return ok

        return self._zero_copy("batch_get_v1", keys, host_indices, get)

    def batch_set_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Copies each host page straight into a Maru page and registers them all."""

        def set_(pages: HostPages, starts: list[int]) -> list[bool]:
            started = time.perf_counter()
            ok = self._write("batch_set_v1", self.keys.keys(keys), lambda i: pages.page(starts[i]))
            self._record("backup", sum(ok), started)
            return ok

        return self._zero_copy("batch_set_v1", keys, host_indices, set_)

    # -- existence -------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        h = self._live_handler("exists", 1)
        if h is None:
            return False
        try:
            found = bool(h.exists(self.keys.key(key)))
        except Exception as e:
            self.counters.error("exists", e, 1)
            return False
        self.counters.add("exists_queried")
        self.counters.add("exists_found", int(found))
        return found

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many leading keys are present, in one round trip. With pins on, the query is a
        pin: each key found is pinned for the read that follows."""
        if not keys:
            return 0
        h = self._live_handler("batch_exists", len(keys))
        if h is None:
            return 0
        self._sweep(h)
        full = self.keys.keys(keys)
        # From the key index no pin is needed: the read that follows is a clean miss for a
        # key that is gone by then.
        pin = self._pins is not None and not self._index_reads(h)
        try:
            flags = h.batch_pin(full) if pin else h.batch_exists(full)
        except Exception as e:
            self.counters.error("batch_exists", e, len(keys))
            return 0
        n = _leading(flags)
        if pin:
            self._pins.add(full[:n])
            self.counters.add("pins_taken", sum(flags))
            # Keys found after the first gap are no use to SGLang (it loads a prefix).
            self._unpin(h, [k for k, f in zip(full[n:], flags[n:], strict=True) if f], "pins_released")
        self.counters.add("exists_queried", len(keys))
        self.counters.add("exists_found", n)
        return n

    # -- copying interface (SGLang's generic page path) ---------------------------------------

    def get(
        self, key: str, target_location: Any | None = None, target_sizes: Any | None = None
    ) -> torch.Tensor | None:
        targets = None if target_location is None else [target_location]
        return self.batch_get([key], targets)[0]

    def batch_get(
        self,
        keys: list[str],
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> list[torch.Tensor | None]:
        """Each key's value copied into its target tensor (same byte size), or into a new
        uint8 tensor without targets; None for a key not served."""
        n = len(keys)
        out: list[torch.Tensor | None] = [None] * n
        if not n:
            return out
        if target_locations is not None and len(target_locations) != n:
            self.counters.error("batch_get", f"{len(target_locations)} targets for {n} keys", n)
            return out
        full = self.keys.keys(keys)
        targets = [None] * n if target_locations is None else list(target_locations)
        out = list(targets)

        def copy(i: int, view: memoryview) -> None:
            target = targets[i]
            if target is None:
                out[i] = shm_tensor(view, torch.uint8, torch.Size([len(view)])).clone()
                return
            if len(view) != target.numel() * target.element_size():
                self.counters.add("size_mismatches")
                raise ValueError(
                    f"{full[i]} holds {len(view)} bytes, the target {target.numel() * target.element_size()}"
                )
            target.copy_(shm_tensor(view, target.dtype, target.shape))

        def into(i: int) -> memoryview | None:
            return None if targets[i] is None else writable_bytes(targets[i])

        ok = self._read("batch_get", full, copy, into)
        return [t if good else None for t, good in zip(out, ok, strict=True)]

    def set(
        self,
        key: str,
        value: Any | None = None,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        return self.batch_set([key], None if value is None else [value])

    def batch_set(
        self,
        keys: list[str],
        values: Any | None = None,
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        """Stores each tensor's bytes; True when every key is present afterwards."""
        n = len(keys)
        if not n:
            return True
        if values is None or len(values) != n or any(not isinstance(v, torch.Tensor) for v in values):
            self.counters.error("batch_set", f"needs one tensor per key ({n} keys)", n)
            return False
        return all(self._write("batch_set", self.keys.keys(keys), lambda i: values[i]))

    # -- lifecycle and statistics ------------------------------------------------------------

    def clear(self) -> None:
        """Deletes every key this instance wrote (its own pages; other instances' keys stay)
        and releases its pins."""
        h = self._live_handler("clear", 0)
        if h is None:
            return
        if self._pins is not None:
            self._unpin(h, self._pins.drain(), "pins_released")
        deleted = kept = 0
        with self._write_lock:
            for region_id in h.get_owned_region_ids():
                for page_index in range(h.get_region_page_count(region_id) or 0):
                    try:
                        h.free(AllocHandle(None, region_id, page_index, 0))
                        deleted += 1
                    except ValueError as e:
                        if "pinned" in str(e):
                            kept += 1  # another instance is reading it
                    except Exception as e:
                        self.counters.error("clear", e, 0)
                        kept += 1
        self.counters.add("cleared", deleted)
        logger.info(
            "maru_sglang: clear() deleted %d keys this instance wrote (%d pinned, kept)", deleted, kept
        )

    def get_stats(self) -> MaruStorageMetrics:
        with self._metrics_lock:
            out, self._metrics = self._metrics, MaruStorageMetrics()
        out.maru = self.counters.snapshot()
        out.maru["pins_held"] = self._pins.held if self._pins is not None else 0
        return out

    def close(self) -> None:
        """Releases this instance's pins and closes its handler. Idempotent."""
        with self._handler_lock:
            self._closed = True
            h, self._handler = self._handler, None
        if h is None:
            return
        if self._pins is not None and h.connected:
            self._unpin(h, self._pins.drain(), "pins_released")
        h.close()
