"""What MaruStorage counts, and the metrics object SGLang's scheduler logs.

Every failure the backend turns into a per-key False (or a 0 from ``batch_exists``) is counted
here and logged at warning level, so a store that silently stopped serving shows up both in
the log and in ``get_stats()``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sglang.srt.observability.metrics_collector import StorageMetrics

__all__ = ["Counters", "MaruStorageMetrics"]

logger = logging.getLogger("maru_sglang")

#: Counter names, in the order get_stats lists them.
COUNTERS = (
    "exists_queried",  # keys asked by batch_exists / exists
    "exists_found",  # of those, found (the leading run for batch_exists)
    "read_hits",  # keys copied out of shared memory
    "read_misses",  # keys asked for that were not there (or not pinned in time)
    "size_mismatches",  # keys whose stored size is not the page size: not loaded
    "written",  # keys copied into shared memory and registered
    "already_present",  # keys a write found present and left alone
    "skipped_not_writer",  # MLA writes left to the writer rank
    "failed_keys",  # keys answered False because of an error
    "pins_taken",
    "pins_released",  # after the copy that needed them
    "pins_expired",  # released because no read came within maru_pin_ttl_s
    "pages_left_taken",  # pages of an uncertain failed store, kept until close
    "cleared",  # keys deleted by clear()
    "reconnects",
)

_LOG_EVERY_S = 1.0


class Counters:
    """Thread-safe counters plus per-operation error counts, with rate-limited warnings."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n = dict.fromkeys(COUNTERS, 0)
        self._errors: dict[str, int] = {}
        self._last_log: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._n[name] += n

    def error(self, op: str, exc: BaseException | str, keys: int) -> None:
        """Counts a failed operation that made `keys` keys answer False, and logs it (at
        most once a second per operation; the line says how many were not logged)."""
        now = time.monotonic()
        with self._lock:
            self._errors[op] = self._errors.get(op, 0) + 1
            self._n["failed_keys"] += keys
            if now - self._last_log.get(op, -_LOG_EVERY_S) < _LOG_EVERY_S:
                self._suppressed[op] = self._suppressed.get(op, 0) + 1
                return
            self._last_log[op] = now
            suppressed = self._suppressed.pop(op, 0)
        detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        logger.warning("maru_sglang: %s failed for %d key(s): %s%s", op, keys, detail, more)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._n)
            out["errors"] = dict(self._errors)
        return out


@dataclass
class MaruStorageMetrics(StorageMetrics):
    """SGLang's storage metrics (pages and bandwidth per prefetch and backup batch, drained
    at each call) plus Maru's cumulative counters and the pins held now."""

    maru: dict[str, Any] = field(default_factory=dict)
