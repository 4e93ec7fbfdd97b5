"""The world-wide bound on regions being flushed (``runtime.flush_concurrency``).

Every flush call (the timer's, ``flush()``, live migration's) splits its regions into
batches and lanes of its own; these slots bound them together. A batch takes one slot per
region, all at once, before its flush token: it never waits for slots while holding a
token, and no slot holder waits for a region lock, so the two cannot deadlock.
"""

from __future__ import annotations

from collections import deque

import anyio

__all__ = ["FlushSlots"]


class FlushSlots:
    """``total`` slots, taken ``n`` at a time in arrival order (a batch that needs many is
    never starved by smaller ones that keep arriving)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiters: deque[tuple[int, anyio.Event]] = deque()

    async def take(self, n: int) -> int:
        """Wait for ``n`` slots (at most ``total``); return how many were taken."""
        n = max(1, min(n, self.total))
        if not self._waiters and self.free >= n:
            self.free -= n
            return n
        entry = (n, anyio.Event())
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry in self._waiters:
                self._waiters.remove(entry)
                self._grant()  # it may have been blocking the waiters behind it
            else:  # granted as it was cancelled: hand them on
                self.give(n)
            raise
        return n

    def give(self, n: int) -> None:
        self.free += n
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            n, event = self._waiters.popleft()
            self.free -= n
            event.set()
