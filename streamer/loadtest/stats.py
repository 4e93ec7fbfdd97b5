"""Bounded latency recording for long load tests."""

from __future__ import annotations

import math
import random

__all__ = ["LatencyRecorder"]


class LatencyRecorder:
    """Percentiles over a uniform reservoir sample of at most ``capacity`` latencies.

    A load test of thousands of players for an hour records millions of latencies; a fixed
    reservoir keeps memory constant while every sample still has the same chance to count.
    """

    def __init__(self, capacity: int = 100_000, *, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._capacity = capacity
        self._samples: list[float] = []
        self._count = 0
        self._max = 0.0
        self._rng = random.Random(seed)

    @property
    def count(self) -> int:
        return self._count

    @property
    def max_s(self) -> float:
        return self._max

    def add(self, seconds: float) -> None:
        self._count += 1
        if seconds > self._max:
            self._max = seconds
        if len(self._samples) < self._capacity:
            self._samples.append(seconds)
            return
        slot = self._rng.randrange(self._count)
        if slot < self._capacity:
            self._samples[slot] = seconds

    def percentile_ms(self, q: float) -> float:
        """The ``q``-th percentile (0..100) in milliseconds; 0.0 with no samples."""
        if not self._samples:
            return 0.0
        ordered = sorted(self._samples)
        # Nearest rank: the reported p99 is a latency some request actually saw.
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1] * 1000.0
