"""The scheduler side: which leading chunks of a prompt Maru holds, pinned until loaded, and
which chunks each step completes.

Lookup (``get_num_new_matched_tokens``) costs one ``batch_exists`` round trip for the
prompt's chunks (every rank's and part's key) and one ``batch_pin`` for the leading present
ones, so they cannot be deleted or evicted before the worker loads them. Pins belong to the
session that took them, so this side also releases them: those of a load once the step that
carried it has run (the next step's scheduling, or the one after with async scheduling),
those of a request that ends before its load (``request_finished``) or loads fewer tokens
than matched at once. Pins are leases; they are renewed while requests hold them.

vLLM must compute at least the prompt's last token, so a hit stops one block short of a
prompt that is all hits; a chunk may then load only some of its blocks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .geometry import ChunkGeometry
from .keys import KeyScheme, multimodal_items, request_salt
from .metadata import LoadChunk, LoadRequest, MaruConnectorMetadata, StoreChunk, StoreRequest
from .stats import Counters

__all__ = ["SchedulerSide", "batched"]

logger = logging.getLogger(__name__)

#: The server's largest batch.
MAX_BATCH = 4096

#: How often held pins are renewed: well inside the server's default pin TTL (30 s).
PIN_RENEW_SECONDS = 10.0


def batched(fn: Callable[[list[str]], list[bool]], keys: Sequence[str]) -> list[bool]:
    """`fn` over `keys` in batches the server accepts."""
    out: list[bool] = []
    for i in range(0, len(keys), MAX_BATCH):
        out.extend(fn(list(keys[i : i + MAX_BATCH])))
    return out


@dataclass
class _Request:
    request: Any
    hashes: list[bytes]
    #: Keys pinned for this request and not yet handed to the worker, per chunk.
    pinned: list[list[str]] | None = None
    #: Tokens vLLM already had when it asked (its own prefix cache), block aligned.
    local_tokens: int = 0
    pending_load: list[LoadChunk] | None = None
    block_ids: list[int] = field(default_factory=list)
    #: Pins of loads handed to the worker: (the step that carries the load, its keys).
    loading: list[tuple[int, list[str]]] = field(default_factory=list)


class SchedulerSide:
    def __init__(
        self, handler: Any, geometry: ChunkGeometry, keys: KeyScheme, counters: Counters, *, steps_in_flight: int = 1
    ) -> None:
        self._h = handler
        self._g = geometry
        self._k = keys
        self._c = counters
        self._reqs: dict[str, _Request] = {}
        #: Pins belong to this handler's session, so this side releases them; a load handed
        #: out with step s has run once step s + steps_in_flight is being scheduled (one step
        #: at a time, or two with vLLM's async scheduling).
        self._steps_in_flight = steps_in_flight
        self._step = 0
        self._renewed = time.monotonic()

    # -- lookup --------------------------------------------------------------------------

    def _state(self, request: Any) -> _Request:
        st = self._reqs.get(request.request_id)
        if st is None:
            hashes = self._k.chunk_hashes(
                list(request.prompt_token_ids or []), request_salt(request), multimodal_items(request)
            )
            st = self._reqs[request.request_id] = _Request(request=request, hashes=hashes)
        return st

    def _loadable_tokens(self, request: Any) -> int:
        """Tokens that may come from outside: whole blocks before the prompt's last token."""
        n = len(request.prompt_token_ids or [])
        return max(0, (n - 1) // self._g.block_size * self._g.block_size)

    def _lookup(self, st: _Request, max_chunks: int) -> None:
        chunk_keys = [self._k.all_keys(h) for h in st.hashes[:max_chunks]]
        flat = [k for ks in chunk_keys for k in ks]
        try:
            present = batched(self._h.batch_exists, flat)
        except Exception as e:
            logger.error("Maru lookup failed, request %s recomputes its prompt: %s", st.request.request_id, e)
            self._c.add(lookups=1, miss_chunks=len(chunk_keys))
            st.pinned = []
            return
        per = len(chunk_keys[0]) if chunk_keys else 0
        leading = 0
        while leading < len(chunk_keys) and all(present[leading * per : (leading + 1) * per]):
            leading += 1
        held: list[list[str]] = []
        if leading:
            want = [k for ks in chunk_keys[:leading] for k in ks]
            try:
                pinned = batched(self._h.batch_pin, want)
            except Exception as e:
                logger.error("Maru pin failed, request %s recomputes its prompt: %s", st.request.request_id, e)
                pinned = [False] * len(want)
            # A key deleted between the two round trips ends the hit at its chunk.
            ok = 0
            while ok < leading and all(pinned[ok * per : (ok + 1) * per]):
                ok += 1
            extra = [k for k, p in zip(want[ok * per :], pinned[ok * per :], strict=True) if p]
            self._c.add(pinned_keys=sum(pinned))
            self._unpin(extra)
            held = chunk_keys[:ok]
            leading = ok
        st.pinned = held
        self._c.add(lookups=1, hit_chunks=leading, miss_chunks=len(chunk_keys) - leading)

    def _unpin(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        try:
            released = batched(self._h.batch_unpin, keys)
            self._c.add(unpinned_keys=sum(released))
        except Exception as e:
            logger.error("Maru unpin of %d keys failed (they stay pinned until deleted by hand): %s", len(keys), e)

    def _release_loaded(self, st: _Request, upto_step: int | None = None) -> None:
        """Gives back the pins of loads handed out with steps up to `upto_step` (all: None)."""
        done = [keys for step, keys in st.loading if upto_step is None or step <= upto_step]
        st.loading = [(step, keys) for step, keys in st.loading if upto_step is not None and step > upto_step]
        self._unpin([k for keys in done for k in keys])

    def _keep_leases(self) -> None:
        """Pins are leases (the server's --pin-ttl): renewed while requests wait for their loads."""
        now = time.monotonic()
        if now - self._renewed < PIN_RENEW_SECONDS:
            return
        self._renewed = now
        if any(st.pinned or st.loading for st in self._reqs.values()):
            try:
                self._h.renew_pins()
            except Exception as e:
                logger.error("renewing Maru pins failed (they expire at the server's pin TTL): %s", e)

    def _release(self, st: _Request, keep: range = range(0)) -> None:
        """Gives back the pins of chunks outside `keep`."""
        if not st.pinned:
            return
        drop = [k for c, ks in enumerate(st.pinned) if c not in keep for k in ks]
        st.pinned = [ks if c in keep else [] for c, ks in enumerate(st.pinned)]
        self._unpin(drop)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        st = self._state(request)
        limit = self._loadable_tokens(request)
        t = self._g.chunk_tokens
        if st.pinned is None:
            self._lookup(st, max_chunks=-(-limit // t))
        assert st.pinned is not None
        matched = min(sum(1 for ks in st.pinned if ks) * t, limit)
        new = matched - num_computed_tokens
        if new <= 0:
            self._release(st)
            st.pinned = None
            return 0, False
        st.local_tokens = num_computed_tokens
        return new, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        ids = blocks.get_block_ids()
        if ids:
            st.block_ids = list(ids[0])
        if num_external_tokens <= 0 or not st.pinned:
            self._release(st)
            st.pinned = None
            return
        start, end = st.local_tokens, st.local_tokens + num_external_tokens
        t, bs, bpc = self._g.chunk_tokens, self._g.block_size, self._g.blocks_per_chunk
        first_chunk, last_chunk = start // t, -(-end // t)
        plan = []
        for c in range(first_chunk, last_chunk):
            b0 = max(start, c * t) // bs
            b1 = min(end, (c + 1) * t) // bs
            if len(st.block_ids) < b1:
                # vLLM allocates blocks for every computed token; a shorter list would leave
                # blocks vLLM counts as loaded unwritten.
                raise RuntimeError(
                    f"request {request.request_id} has {len(st.block_ids)} blocks for {end} external+local tokens"
                )
            plan.append(LoadChunk(chunk_hash=st.hashes[c], first_block=b0 - c * bpc, block_ids=st.block_ids[b0:b1]))
        st.pending_load = plan
        self._release(st, keep=range(first_chunk, last_chunk))
        self._c.add(hit_tokens=num_external_tokens)

    # -- per step ------------------------------------------------------------------------

    def _completed_chunks(self, st: _Request, computed: int, scheduled: int) -> list[StoreChunk]:
        """Chunks whose last token is computed in this step."""
        t, bpc = self._g.chunk_tokens, self._g.blocks_per_chunk
        end = computed + scheduled
        out = []
        for c in range(computed // t, min(end // t, len(st.hashes))):
            if (c + 1) * t <= computed:
                continue
            blocks = st.block_ids[c * bpc : (c + 1) * bpc]
            if len(blocks) != bpc:
                logger.error(
                    "request %s has %d blocks, chunk %d needs %d; not stored",
                    st.request.request_id,
                    len(st.block_ids),
                    c,
                    (c + 1) * bpc,
                )
                break
            out.append(StoreChunk(chunk_hash=st.hashes[c], block_ids=blocks, num_tokens=t))
        return out

    def _take_load(self, st: _Request, req_id: str, meta: MaruConnectorMetadata) -> None:
        if st.pending_load is None:
            return
        meta.loads.append(LoadRequest(req_id=req_id, chunks=st.pending_load))
        st.loading.append((self._step, [k for ks in st.pinned or [] for k in ks]))
        st.pending_load = None
        st.pinned = None

    def build_connector_meta(self, scheduler_output: Any) -> MaruConnectorMetadata:
        self._step += 1
        for st in self._reqs.values():
            if st.loading:
                self._release_loaded(st, upto_step=self._step - self._steps_in_flight)
        self._keep_leases()
        meta = MaruConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            self._take_load(st, new.req_id, meta)
            chunks = self._completed_chunks(st, new.num_computed_tokens, scheduled.get(new.req_id, 0))
            if chunks:
                meta.stores.append(StoreRequest(req_id=new.req_id, chunks=chunks))
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set()) or set()
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                st.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            self._take_load(st, req_id, meta)
            chunks = self._completed_chunks(st, cached.num_computed_tokens[i], scheduled.get(req_id, 0))
            if chunks:
                meta.stores.append(StoreRequest(req_id=req_id, chunks=chunks))
        for req_id in getattr(scheduler_output, "preempted_req_ids", None) or ():
            st = self._reqs.get(req_id)
            if st is not None:
                st.block_ids = []
        return meta

    def request_finished(self, request: Any) -> None:
        st = self._reqs.pop(request.request_id, None)
        if st is not None:
            self._release(st)
            self._release_loaded(st)

    def shutdown(self) -> None:
        for st in self._reqs.values():
            self._release(st)
            self._release_loaded(st)
        self._reqs.clear()

    @property
    def tracked_requests(self) -> int:
        return len(self._reqs)
