"""Connector statistics: what was looked up, loaded, stored and lost.

``MaruKVConnectorStats`` is the ``KVConnectorStats`` vLLM collects from the worker and the
scheduler each step (``get_kv_connector_stats``), sums across workers (``aggregate``) and logs
(``reduce``, e.g. ``KV Transfer metrics: hit_chunks=...``). ``Counters`` keeps both the interval
vLLM drains and running totals (``totals()``) for operators and tests.
"""

from __future__ import annotations

import threading
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

__all__ = ["COUNTERS", "Counters", "MaruKVConnectorStats"]

#: Every counter, in the order it is reported.
COUNTERS = (
    # scheduler: lookups of requests' prompts
    "lookups",
    "hit_chunks",
    "miss_chunks",
    "hit_tokens",
    "pinned_keys",
    "unpinned_keys",
    # worker: loads
    "loaded_chunks",
    "loaded_tokens",
    "loaded_bytes",
    "load_errors",
    "load_error_blocks",
    "load_seconds",
    "load_retrieve_seconds",
    # worker: stores
    "stored_chunks",
    "stored_tokens",
    "stored_bytes",
    "store_skipped_chunks",
    "store_errors",
    "store_seconds",
    # worker: host memory registered for device DMA (0 on CPU, where no DMA is needed)
    "dma_registered_regions",
    "dma_registered_bytes",
)
#: Static facts rather than activity: aggregated with max, ignored by is_empty.
_GAUGES = ("dma_needed",)


def _zero() -> dict[str, float]:
    return {k: 0 for k in (*COUNTERS, *_GAUGES)}


class MaruKVConnectorStats(KVConnectorStats):
    """Counters of one interval (a plain dict of numbers, so it pickles between processes)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.data = _zero()

    def reset(self) -> None:
        self.data = _zero()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            if k in _GAUGES:
                self.data[k] = max(self.data.get(k, 0), v)
            else:
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k: self.data.get(k, 0) for k in (*COUNTERS, *_GAUGES)}
        secs = out["load_seconds"]
        out["load_GBps"] = round(out["loaded_bytes"] / secs / 1e9, 3) if secs else 0.0
        looked = out["hit_chunks"] + out["miss_chunks"]
        out["hit_rate"] = round(out["hit_chunks"] / looked, 4) if looked else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(k, 0) for k in COUNTERS)


class Counters:
    """Interval and running totals, safe to bump from vLLM's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interval = _zero()
        self._total = _zero()

    def add(self, **deltas: float) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._interval[k] += v
                self._total[k] += v

    def set_gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._interval[name] = value
            self._total[name] = value

    def drain(self) -> MaruKVConnectorStats | None:
        """The interval so far (None when nothing happened), and a fresh interval."""
        with self._lock:
            data, self._interval = self._interval, _zero()
            for g in _GAUGES:
                self._interval[g] = data[g]
        stats = MaruKVConnectorStats(data=data)
        return None if stats.is_empty() else stats

    def totals(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._total)
