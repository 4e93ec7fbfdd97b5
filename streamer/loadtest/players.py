"""Simulated players: a random walk with momentum, tile edits and their own character.

Each :class:`SimPlayer` runs as one task and behaves like the part of a shard server that
serves one player: it moves, tells the world where it is (``update_interest``), awaits the
chunk it steps into, submits tile edits and now and then moves its character. It is a
closed loop: a slow ``submit`` or chunk load slows that player down, as it would a real
shard tick.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio

from streamer.coords import chunk_of
from streamer.errors import DeltaError, WorldClosed
from streamer.loadtest.stats import LatencyRecorder
from streamer.runtime.world import World
from streamer.schema.deltas import Delta, EntityMove, EntityUpsert, TileSet
from streamer.schema.records import Character

__all__ = ["EditLedger", "Metrics", "PlayerSettings", "SimPlayer", "TickClock"]

#: Attempts at one batch whose tick lost a race (see :meth:`SimPlayer._submit`).
_TICK_ATTEMPTS = 4


class TickClock:
    """Ticks shared by every simulated player: strictly increasing across all of them.

    The world refuses a tick at or below a region's lastProcessedTick, and a demo run again
    on the same world must start above everything the last run wrote. Wall-clock
    microseconds give both without reading any state back; ``max(last + 1, now)`` keeps the
    sequence strictly increasing even when many ticks are taken within one microsecond.
    """

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, time.time_ns() // 1000)
        return self._last


class EditLedger:
    """What the world must hold after the run: the newest acknowledged tile per position.

    A position whose newest submit did not end in an acknowledgement (cancelled, failed with
    a storage error) is *doubtful*: the journal may or may not have it, so it is never
    offered as a sample to verify. At most ``capacity`` positions are tracked so a long run
    stays bounded in memory; edits to untracked positions are simply not sampled.
    """

    def __init__(self, capacity: int = 50_000) -> None:
        self._capacity = capacity
        self._acked: dict[tuple[int, int], tuple[int, int]] = {}
        self._inflight: dict[tuple[int, int], int] = {}
        self._doubtful: set[tuple[int, int]] = set()

    def _tracked(self, pos: tuple[int, int]) -> bool:
        return pos in self._acked or pos in self._inflight or len(self._acked) < self._capacity

    def begin(self, tiles: Sequence[TileSet]) -> None:
        for t in tiles:
            pos = (t.x, t.y)
            if self._tracked(pos):
                self._inflight[pos] = self._inflight.get(pos, 0) + 1

    def _end(self, pos: tuple[int, int]) -> bool:
        n = self._inflight.get(pos)
        if n is None:
            return False
        if n <= 1:
            del self._inflight[pos]
        else:
            self._inflight[pos] = n - 1
        return True

    def acked(self, tiles: Sequence[TileSet]) -> None:
        for t in tiles:
            pos = (t.x, t.y)
            if self._end(pos):
                current = self._acked.get(pos)
                if current is None or t.tick > current[0]:
                    self._acked[pos] = (t.tick, t.tile)

    def rejected(self, tiles: Sequence[TileSet]) -> None:
        """The world refused the batch before journaling it: it is certainly not there."""
        for t in tiles:
            self._end((t.x, t.y))

    def unknown(self, tiles: Sequence[TileSet]) -> None:
        """The batch may or may not be durable (cancelled mid-submit, storage error)."""
        for t in tiles:
            pos = (t.x, t.y)
            if self._end(pos):
                self._doubtful.add(pos)

    def sample(self, n: int, rng: random.Random) -> list[tuple[int, int, int]]:
        """Up to ``n`` ``(x, y, tile)`` the world must hold: certain positions only."""
        certain = sorted(
            p for p in self._acked if p not in self._doubtful and p not in self._inflight
        )
        picked = rng.sample(certain, min(n, len(certain)))
        return [(x, y, self._acked[(x, y)][1]) for x, y in sorted(picked)]


@dataclass
class Metrics:
    """Counters every player adds to; read by the progress display and the summary."""

    chunk_ready: LatencyRecorder = field(default_factory=LatencyRecorder)
    ack: LatencyRecorder = field(default_factory=lambda: LatencyRecorder(seed=1))
    chunk_waits: int = 0
    chunk_steps: int = 0
    deltas_acked: int = 0
    submits: int = 0
    tick_retries: int = 0
    character_moves: int = 0
    steps: int = 0
    players_active: int = 0
    last_tick: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PlayerSettings:
    #: Seconds between two steps (the simulated shard tick).
    step_s: float = 0.05
    #: Mean walking speed in tiles per step; the speed wanders around it.
    speed: float = 3.0
    #: Standard deviation of the heading change per step, in radians (lower = more momentum).
    turn_sigma: float = 0.15
    #: Chance per step of submitting a batch of tile edits.
    edit_chance: float = 0.5
    max_batch: int = 8
    #: Tiles around the player an edit may land on.
    reach: int = 4
    #: Steps between two moves of the player's character.
    move_every: int = 10
    tiles: tuple[int, int] = (1, 63)


class SimPlayer:
    def __init__(
        self,
        player_id: str,
        *,
        world: World,
        clock: TickClock,
        ledger: EditLedger,
        metrics: Metrics,
        rng: random.Random,
        start: tuple[float, float],
        settings: PlayerSettings,
        bound_tiles: int,
    ) -> None:
        self.player_id = player_id
        self.character_id = f"demo-{player_id}"
        self._world = world
        self._clock = clock
        self._ledger = ledger
        self._m = metrics
        self._rng = rng
        self._s = settings
        self._bound = bound_tiles
        self.fx, self.fy = start
        self._heading = rng.uniform(0.0, 2 * math.pi)
        self._speed = settings.speed
        self._chunk: tuple[int, int] | None = None
        #: Where the world holds our character as of the last acknowledged submit; ``None``
        #: when that is uncertain (a character submit failed), so we stop moving it.
        self._char_at: tuple[int, int] | None = None

    @property
    def position(self) -> tuple[int, int]:
        return math.floor(self.fx), math.floor(self.fy)

    async def run(self, stop: anyio.Event, deadline: float) -> None:
        """Walk and edit until ``deadline`` (``time.monotonic``) or until ``stop`` is set."""
        m = self._m
        m.players_active += 1
        try:
            await self._place_character()
            step = 0
            next_at = time.monotonic()
            while not stop.is_set() and time.monotonic() < deadline:
                self._walk()
                await self._observe()
                if self._rng.random() < self._s.edit_chance:
                    await self._edit()
                step += 1
                if step % self._s.move_every == 0:
                    await self._move_character()
                m.steps += 1
                # Fixed rate without catch-up bursts: a player that fell behind just goes on.
                next_at = max(next_at + self._s.step_s, time.monotonic())
                with anyio.move_on_after(max(0.0, next_at - time.monotonic())):
                    await stop.wait()
        finally:
            m.players_active -= 1
            with contextlib.suppress(WorldClosed):
                # Its view need not stay pinned once the player is gone.
                self._world.drop_interest(self.player_id)

    # -- movement -------------------------------------------------------------------------

    def _walk(self) -> None:
        rng, s = self._rng, self._s
        # Momentum: the heading and speed drift a little each step instead of jumping.
        self._heading += rng.gauss(0.0, s.turn_sigma)
        self._speed = min(2 * s.speed, max(0.25 * s.speed, self._speed + rng.gauss(0.0, 0.2)))
        nx = self.fx + math.cos(self._heading) * self._speed
        ny = self.fy + math.sin(self._heading) * self._speed
        if self._bound > 0:
            # Bounce off the world's edge (tiles must satisfy |x|, |y| < bound).
            edge = self._bound - 1 - self._s.reach
            if abs(nx) > edge:
                self._heading = math.pi - self._heading
                nx = max(-edge, min(edge, nx))
            if abs(ny) > edge:
                self._heading = -self._heading
                ny = max(-edge, min(edge, ny))
        self.fx, self.fy = nx, ny

    async def _observe(self) -> None:
        x, y = self.position
        key = chunk_of(x, y)
        t0 = time.perf_counter()
        self._world.update_interest(self.player_id, x, y)
        self._m.chunk_steps += 1
        if key == self._chunk:
            return
        # A shard cannot simulate a player on a chunk it does not have: wait for it. The
        # latency counts from the moment the world learned where the player is.
        await self._world.chunk(*key)
        self._m.chunk_ready.add(time.perf_counter() - t0)
        self._m.chunk_waits += 1
        self._chunk = key

    # -- writes ---------------------------------------------------------------------------

    async def _submit(self, build: Callable[[int], list[Delta]]) -> list[Delta] | None:
        """Submit ``build(tick)``; return the acknowledged batch.

        Another player's batch may take a later tick but reach a region first (ours waited
        for that region to load); the world then refuses ours as going backwards, before
        journaling anything. A fresh tick fixes that, as a shard would re-stamp the edit.
        """
        m = self._m
        for attempt in range(_TICK_ATTEMPTS):
            tick = self._clock.next()
            batch = build(tick)
            tiles = [d for d in batch if isinstance(d, TileSet)]
            self._ledger.begin(tiles)
            t0 = time.perf_counter()
            try:
                await self._world.submit(batch)
            except DeltaError:
                self._ledger.rejected(tiles)
                if attempt == _TICK_ATTEMPTS - 1:
                    raise
                m.tick_retries += 1
                continue
            except BaseException:
                self._ledger.unknown(tiles)
                raise
            m.ack.add(time.perf_counter() - t0)
            self._ledger.acked(tiles)
            m.submits += 1
            m.deltas_acked += len(batch)
            m.last_tick[self.player_id] = tick
            return batch
        return None

    async def _edit(self) -> None:
        rng, s = self._rng, self._s
        x, y = self.position
        want = rng.randint(1, s.max_batch)
        spots: set[tuple[int, int]] = set()
        while len(spots) < want:
            spots.add((x + rng.randint(-s.reach, s.reach), y + rng.randint(-s.reach, s.reach)))
        values = [rng.randint(*s.tiles) for _ in spots]

        def build(tick: int) -> list[Delta]:
            return [
                TileSet(tick=tick, x=px, y=py, tile=v)
                for (px, py), v in zip(sorted(spots), values, strict=True)
            ]

        await self._submit(build)

    async def _place_character(self) -> None:
        found = await self._world.find_player(self.player_id)
        if found is not None:
            # Pick up where an earlier run left this player, so the world keeps one character.
            self.fx, self.fy = found.x + 0.5, found.y + 0.5
            self._char_at = (found.x, found.y)
            return
        x, y = self.position
        character = Character(id=self.character_id, x=x, y=y, player_id=self.player_id)

        def build(tick: int) -> list[Delta]:
            return [EntityUpsert(tick=tick, character=character)]

        if await self._submit_character(build):
            self._char_at = (x, y)

    async def _move_character(self) -> None:
        src = self._char_at
        dst = self.position
        if src is None or src == dst:
            return

        def build(tick: int) -> list[Delta]:
            return [
                EntityMove(
                    tick=tick,
                    entity_id=self.character_id,
                    from_x=src[0],
                    from_y=src[1],
                    to_x=dst[0],
                    to_y=dst[1],
                )
            ]

        if await self._submit_character(build):
            self._char_at = dst
            self._m.character_moves += 1

    async def _submit_character(self, build: Callable[[int], list[Delta]]) -> bool:
        try:
            return await self._submit(build) is not None
        except BaseException:
            self._char_at = None
            raise
