"""Load testing: simulated players driving an open world, and what they measured.

``streamer demo`` and ``streamer run`` are thin CLI wrappers around :class:`Demo`.
"""

from __future__ import annotations

from streamer.loadtest.driver import (
    MAX_DURATION_S,
    MAX_PLAYERS,
    Demo,
    DemoOptions,
    DemoSummary,
    LiveStats,
    ensure_world,
    peak_rss_mib,
)
from streamer.loadtest.players import EditLedger, Metrics, PlayerSettings, SimPlayer, TickClock
from streamer.loadtest.stats import LatencyRecorder

__all__ = [
    "MAX_DURATION_S",
    "MAX_PLAYERS",
    "Demo",
    "DemoOptions",
    "DemoSummary",
    "EditLedger",
    "LatencyRecorder",
    "LiveStats",
    "Metrics",
    "PlayerSettings",
    "SimPlayer",
    "TickClock",
    "ensure_world",
    "peak_rss_mib",
]
