"""Young-generation collections at a steady pace, so none grows into a long pause.

CPython collects the young generation once its allocation count passes 700, but every
freed container lowers that count, whichever generation it lived in. Under a steady write
load the world frees many older containers (futures, events, coroutines and routing lists
of batches in flight, which a collection promotes; queue segments a flush folded), so the
count stays low while the young generation grows: at 200,000 deltas/s it held 3,000-8,000
objects and 200-250k references (mostly queued 64-delta segment tuples) when a collection
finally ran, a 10-17 ms pause of the event loop in every thread (measured with
``gc.callbacks`` and a loop-lag probe). Collecting the young generation every 10 ms keeps
each pass well under a millisecond: loop lags over 3 ms fell from 7-12 to 1-2 per 6 s and
the worst from 11-21 ms to 3-9 ms (``docs/performance.md``).

The pacer only runs what the interpreter runs anyway, at a steadier rate, and never when
the application has switched the collector off (``gc.disable()``). The collector is one
per process: with several worlds open, a pacer skips its pass when another one collected
within the last half interval.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Awaitable, Callable

import anyio

#: When any pacer in this process last collected (``time.monotonic``).
_last_collect = [float("-inf")]


class YoungGcPacer:
    """Collect generation 0 every ``interval_s`` while anything was allocated since."""

    def __init__(
        self,
        interval_s: float,
        *,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        collect: Callable[[int], int] = gc.collect,
        enabled: Callable[[], bool] = gc.isenabled,
        young_count: Callable[[], int] = lambda: gc.get_count()[0],
        clock: Callable[[], float] = time.monotonic,
        last_collect: list[float] = _last_collect,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._interval = interval_s
        self._sleep = sleep
        self._collect = collect
        self._enabled = enabled
        self._young_count = young_count
        self._clock = clock
        self._last = last_collect
        #: Collections this pacer ran (``WorldStats.gc_young_collections``).
        self.collections = 0

    async def run(self) -> None:
        """Pace collections until cancelled (run it in a task group)."""
        while True:
            await self._sleep(self._interval)
            # Nothing allocated since the last pass (an idle world), the collector off, or
            # another world's pacer just collected: there is nothing this pass would shorten.
            now = self._clock()
            if (
                self._young_count() > 0
                and self._enabled()
                and now - self._last[0] >= self._interval / 2
            ):
                self._collect(0)
                self._last[0] = now
                self.collections += 1
