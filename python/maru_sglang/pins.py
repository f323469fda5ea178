"""The pins one MaruStorage holds at the server, each with a lease.

SGLang asks ``batch_exists`` on one thread and reads the pages with ``batch_get_v1`` on
another, later, and sometimes never: a prefetch can be cancelled, or cut to the shortest hit
of all TP ranks. Pins the reader never uses must not hold keys forever, so each pin expires
``ttl`` seconds after it was taken and is then released by whichever call sweeps next.

Server pins are counted, not owned: two pins on one key need two unpins. The table therefore
keeps one lease per pin taken, and a reader takes (removes) one lease per key it reads, so an
expiring lease never releases a pin that a copy in progress relies on.

This module does no I/O; callers send the pins and unpins it tells them to.
"""

from __future__ import annotations

import threading
import time
from collections import deque

__all__ = ["PinLeases"]


class PinLeases:
    def __init__(self, ttl_s: float, clock=time.monotonic) -> None:
        self._ttl = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        # Per key, the deadlines of the pins held on it, oldest first.
        self._by_key: dict[str, deque[float]] = {}
        # Every lease in the order taken (so in deadline order): the sweep's queue. An entry
        # whose pin was taken by a reader is skipped when it comes up.
        self._order: deque[tuple[float, str]] = deque()
        self._held = 0

    @property
    def held(self) -> int:
        """Pins held now."""
        return self._held

    def add(self, keys: list[str]) -> None:
        """Records one pin on each of `keys`, just taken at the server."""
        deadline = self._clock() + self._ttl
        with self._lock:
            for k in keys:
                self._by_key.setdefault(k, deque()).append(deadline)
                self._order.append((deadline, k))
            self._held += len(keys)

    def take(self, keys: list[str]) -> list[bool]:
        """For each key, whether a pin was held on it; a held one is handed to the caller
        (who unpins it after use) and no longer expires here."""
        out = []
        with self._lock:
            for k in keys:
                q = self._by_key.get(k)
                if q:
                    q.popleft()
                    if not q:
                        del self._by_key[k]
                    self._held -= 1
                    out.append(True)
                else:
                    out.append(False)
        return out

    def expired(self) -> list[str]:
        """Removes the pins whose lease has run out and returns their keys (one entry per
        pin) for the caller to unpin."""
        now = self._clock()
        out: list[str] = []
        with self._lock:
            while self._order and self._order[0][0] <= now:
                deadline, k = self._order.popleft()
                q = self._by_key.get(k)
                # The key's oldest held pin is at most this old only if this lease's pin is
                # still held (readers take the oldest first).
                if q and q[0] <= deadline:
                    q.popleft()
                    if not q:
                        del self._by_key[k]
                    self._held -= 1
                    out.append(k)
        return out

    def drain(self) -> list[str]:
        """Removes every pin (one entry per pin) for the caller to unpin."""
        with self._lock:
            out = [k for k, q in self._by_key.items() for _ in q]
            self._by_key.clear()
            self._order.clear()
            self._held = 0
        return out
