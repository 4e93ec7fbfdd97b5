"""The demo / load-test driver: N simulated players against one open world, then a summary.

::

    created = await ensure_world(path, config)
    async with open_world(path, config) as world:
        demo = Demo(world, DemoOptions(players=8, duration_s=10))
        summary = await demo.run(stop_event)

Bounded: the run ends at ``duration_s`` (players finish their current step, and anything
still hanging is cancelled ``grace_s`` later) or as soon as ``stop`` is set.
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio
import msgspec

from streamer.config import Config
from streamer.errors import StreamerError, WorldExists, WorldNotFound
from streamer.loadtest.players import EditLedger, Metrics, PlayerSettings, SimPlayer, TickClock
from streamer.runtime.world import World, WorldStats
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world, read_manifest

__all__ = [
    "MAX_DURATION_S",
    "MAX_PLAYERS",
    "Demo",
    "DemoOptions",
    "DemoSummary",
    "LiveStats",
    "ensure_world",
    "peak_rss_mib",
]

MAX_PLAYERS = 10_000
MAX_DURATION_S = 24 * 3600.0
#: Acknowledged edits the summary lists for verification after the run.
_VERIFY_SAMPLE = 32


@dataclass(frozen=True)
class DemoOptions:
    players: int = 8
    duration_s: float = 10.0
    #: Seeds the players' starting points, walks and edits (not the world's terrain).
    seed: int = 1
    #: Extra time after the deadline for players to finish an await before being cancelled.
    grace_s: float = 5.0
    player: PlayerSettings = field(default_factory=PlayerSettings)

    def __post_init__(self) -> None:
        if not 1 <= self.players <= MAX_PLAYERS:
            raise ValueError(f"players must be between 1 and {MAX_PLAYERS}, got {self.players}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(
                f"duration must be > 0 and <= {MAX_DURATION_S:.0f} s, got {self.duration_s}"
            )


class LiveStats(msgspec.Struct, frozen=True, kw_only=True):
    elapsed_s: float
    duration_s: float
    players_active: int
    chunk_loads: int
    deltas_acked: int
    flushes: int
    queue_depth: int
    cache_hit_rate: float


class DemoSummary(msgspec.Struct, kw_only=True):
    world: str
    created: bool = False
    players: int
    duration_s: float
    elapsed_s: float
    #: Ended early by the caller (Ctrl-C) rather than by the clock.
    interrupted: bool
    durability: str
    view_radius: int
    steps: int
    chunk_loads: int
    chunk_loads_per_s: float
    #: Times a player stepped into a chunk and waited for it (hits included).
    chunk_waits: int
    chunk_ready_p50_ms: float
    chunk_ready_p99_ms: float
    submits: int
    deltas_acked: int
    deltas_per_s: float
    ack_p50_ms: float
    ack_p99_ms: float
    ack_max_ms: float
    tick_retries: int
    character_moves: int
    flushes: int
    flushes_per_s: float
    flush_errors: int
    journal_fsyncs: int
    cache_hit_rate: float
    peak_rss_mib: float
    #: Newest acknowledged tick per player.
    last_tick: dict[str, int]
    #: ``[x, y, tile]`` the world must hold after the run (newest acknowledged edits there).
    verify: list[tuple[int, int, int]]


def peak_rss_mib(helpers: Sequence[int] = ()) -> float:
    """Peak resident memory of this process plus that of running ``helpers`` (the world's
    terrain processes and the journal's sync process: part of what the service costs,
    invisible to ``getrusage``)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    own = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
    return own + sum(_peak_kib(pid) for pid in helpers) / 1024


def _peak_kib(pid: int) -> int:
    """VmHWM of a running process in KiB; 0 if it is gone or this is not Linux."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def ensure_world(path: Path, config: Config) -> bool:
    """Create the world at ``path`` from ``config.world`` unless one is there; True if created.

    :raises IntegrityError, UnsupportedFormat: a world is there but its manifest is bad.
    """
    await anyio.to_thread.run_sync(partial(path.mkdir, parents=True, exist_ok=True))
    w = config.world
    async with await LocalStore.open(path, fsync=config.storage.fsync) as store:
        try:
            await read_manifest(store, where=str(path))
            return False
        except WorldNotFound:
            pass
        try:
            await create_world(
                store,
                seed=w.seed,
                region_size=w.region_size,
                encoding=w.encoding,
                bound_tiles=w.bound_tiles,
                where=str(path),
            )
        except WorldExists:
            return False  # created concurrently by someone else: use theirs
        return True


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _hit_rate(hits: int, misses: int) -> float:
    total = hits + misses
    return hits / total if total else 0.0


class Demo:
    """One run of simulated players against ``world``; see the module docstring."""

    def __init__(self, world: World, options: DemoOptions) -> None:
        self.world = world
        self.options = options
        self.metrics = Metrics()
        self._ledger = EditLedger()
        self._clock = TickClock()
        self._t0: float | None = None
        self._base: WorldStats | None = None
        self._scope: anyio.CancelScope | None = None
        self._aborted = False

    def abort(self) -> None:
        """Cancel the players now, mid-await (a second Ctrl-C); ``run`` still summarises."""
        self._aborted = True
        if self._scope is not None:
            self._scope.cancel()

    def live(self) -> LiveStats:
        """Counters since the run started, cheap enough to poll a few times a second."""
        s = self.world.stats()
        base = self._base or s
        elapsed = 0.0 if self._t0 is None else time.monotonic() - self._t0
        return LiveStats(
            elapsed_s=elapsed,
            duration_s=self.options.duration_s,
            players_active=self.metrics.players_active,
            chunk_loads=s.loader.loads - base.loader.loads,
            deltas_acked=self.metrics.deltas_acked,
            flushes=s.flushes - base.flushes,
            queue_depth=s.queue_depth,
            cache_hit_rate=_hit_rate(
                s.cache_hits - base.cache_hits, s.cache_misses - base.cache_misses
            ),
        )

    def _players(self) -> list[SimPlayer]:
        opts = self.options
        rng = random.Random(opts.seed)
        bound = self.world.manifest.bound_tiles
        # Spread so players meet now and then but mostly load their own chunks.
        spread = 256.0 * max(1.0, math.sqrt(opts.players))
        if bound > 0:
            spread = min(spread, max(0.0, bound - 1 - opts.player.reach - 1.0))
        out = []
        for i in range(opts.players):
            r = spread * math.sqrt(rng.random())
            a = rng.uniform(0.0, 2 * math.pi)
            out.append(
                SimPlayer(
                    f"p{i}",
                    world=self.world,
                    clock=self._clock,
                    ledger=self._ledger,
                    metrics=self.metrics,
                    rng=random.Random(opts.seed * 1_000_003 + i),
                    start=(r * math.cos(a), r * math.sin(a)),
                    settings=opts.player,
                    bound_tiles=bound,
                )
            )
        return out

    async def run(self, stop: anyio.Event | None = None) -> DemoSummary:
        """Drive the players until the duration is over or ``stop`` is set; summarise."""
        opts = self.options
        stop = stop if stop is not None else anyio.Event()
        players = self._players()
        self._base = self.world.stats()
        self._t0 = time.monotonic()
        deadline = self._t0 + opts.duration_s
        try:
            with anyio.move_on_after(opts.duration_s + opts.grace_s) as scope:
                self._scope = scope
                if self._aborted:
                    scope.cancel()
                async with anyio.create_task_group() as tg:
                    for p in players:
                        tg.start_soon(p.run, stop, deadline, name=f"player-{p.player_id}")
        except BaseExceptionGroup as group:
            # One clear error for the CLI instead of a task group's exception tree.
            leaf = _first_leaf(group)
            if isinstance(leaf, StreamerError):
                raise leaf from group
            raise
        finally:
            self._scope = None
        elapsed = time.monotonic() - self._t0
        stats = self.world.stats()
        helpers = [*stats.terrain_process_pids, stats.journal.sync_process_pid]
        helpers = [pid for pid in helpers if pid]
        peak = await anyio.to_thread.run_sync(peak_rss_mib, helpers)
        return self._summary(elapsed, interrupted=stop.is_set() or self._aborted, peak_mib=peak)

    def _summary(self, elapsed: float, *, interrupted: bool, peak_mib: float) -> DemoSummary:
        opts, m, world = self.options, self.metrics, self.world
        s = world.stats()
        base = self._base or s
        loads = s.loader.loads - base.loader.loads
        flushes = s.flushes - base.flushes
        per_s = 1.0 / elapsed if elapsed > 0 else 0.0
        rt = world.config.runtime
        return DemoSummary(
            world=str(world.path),
            players=opts.players,
            duration_s=opts.duration_s,
            elapsed_s=round(elapsed, 3),
            interrupted=interrupted,
            durability=rt.durability,
            view_radius=rt.view_radius,
            steps=m.steps,
            chunk_loads=loads,
            chunk_loads_per_s=loads * per_s,
            chunk_waits=m.chunk_waits,
            chunk_ready_p50_ms=m.chunk_ready.percentile_ms(50),
            chunk_ready_p99_ms=m.chunk_ready.percentile_ms(99),
            submits=m.submits,
            deltas_acked=m.deltas_acked,
            deltas_per_s=m.deltas_acked * per_s,
            ack_p50_ms=m.ack.percentile_ms(50),
            ack_p99_ms=m.ack.percentile_ms(99),
            ack_max_ms=m.ack.max_s * 1000.0,
            tick_retries=m.tick_retries,
            character_moves=m.character_moves,
            flushes=flushes,
            flushes_per_s=flushes * per_s,
            flush_errors=s.flush_errors - base.flush_errors,
            journal_fsyncs=s.journal_fsyncs - base.journal_fsyncs,
            cache_hit_rate=_hit_rate(
                s.cache_hits - base.cache_hits, s.cache_misses - base.cache_misses
            ),
            peak_rss_mib=peak_mib,
            last_tick=dict(sorted(m.last_tick.items())),
            verify=self._ledger.sample(_VERIFY_SAMPLE, random.Random(opts.seed)),
        )
