"""Which chunks each player needs, and in what order to load them.

A player *holds* every chunk within Chebyshev ``view_radius`` of the chunk it stands in, and
keeps holding it until it is more than ``view_radius + hysteresis`` away: a player pacing
across a chunk border does not load and release the same row over and over.

Holds are refcounted across players, so :class:`InterestChange` reports only global
transitions: ``load`` lists chunks no player held before (pin + prefetch them), ``release``
chunks no player holds any more (unpin + cancel their prefetch). Each key appears in ``load``
once until it appears in ``release``, so the caller's pin counts stay balanced.

Load priorities are comparable across players (lower = sooner):
``ring * RING_STRIDE + direction`` where ``ring`` is the Chebyshev distance from the player's
chunk and ``direction`` in ``[0, 2 * DIRECTION_STEPS]`` is 0 straight ahead along the last
movement, ``DIRECTION_STEPS`` sideways (or when the player has not moved) and
``2 * DIRECTION_STEPS`` straight behind; the player's own chunk has priority 0. The ``load``
list is sorted by priority, then by Euclidean distance, then by key, so it is deterministic.

Priorities are relative to where the player stands, so when it enters another chunk the
chunks it already held are ranked again (``rerank``): some of their loads may still be
pending, and the chunk it now stands in must not wait behind the one it left. That costs one
pass over the player's held set per chunk crossed, no more than the crossing already does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable
from typing import TypeAlias

from streamer.coords import chunk_of
from streamer.runtime.chunk import ChunkKey

__all__ = ["DIRECTION_STEPS", "RING_STRIDE", "InterestChange", "InterestTracker"]

#: Direction buckets on each side of "sideways"; finer buckets would not change load order
#: within one ring in any way a player could notice.
DIRECTION_STEPS = 8
#: Priority distance between two rings; larger than any direction term so rings never mix.
RING_STRIDE = 2 * DIRECTION_STEPS + 1

PlayerId: TypeAlias = Hashable

_FRESH, _SHARED, _HELD = 0, 1, 2


@dataclasses.dataclass(frozen=True, slots=True)
class InterestChange:
    #: Chunks newly needed by some player and held by no one before, nearest and most ahead
    #: first, with their load priority.
    load: list[tuple[ChunkKey, int]]
    #: Chunks no player holds any more.
    release: list[ChunkKey]
    #: Chunks this player newly holds that another player already held: not to be pinned
    #: again, but if still queued their load priority may be raised to this.
    shared: list[tuple[ChunkKey, int]] = dataclasses.field(default_factory=list)
    #: Chunks this player held already, with their priority from its new chunk (reported
    #: only when it entered another chunk), in the same order as ``load``.
    rerank: list[tuple[ChunkKey, int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True)
class _Player:
    center: ChunkKey
    x: int
    y: int
    #: Last non-zero movement in tiles; (0, 0) until the player first moves.
    heading: tuple[int, int]
    held: set[ChunkKey]


def _chebyshev(a: ChunkKey, b: ChunkKey) -> int:
    return max(abs(a[0] - b[0]), abs(a[1] - b[1]))


def _priority(dx: int, dy: int, heading: tuple[int, int], heading_len: float) -> int:
    """Load priority of the chunk ``(dx, dy)`` chunks from the player's (module docstring)."""
    ring = max(abs(dx), abs(dy))
    if ring == 0:
        return 0  # the player's own chunk is the most urgent load there is
    direction = DIRECTION_STEPS
    if heading_len > 0:
        cos = (dx * heading[0] + dy * heading[1]) / (math.hypot(dx, dy) * heading_len)
        direction = round((1.0 - cos) * DIRECTION_STEPS)
    return ring * RING_STRIDE + direction


class InterestTracker:
    """Per-player interest sets with hysteresis and cross-player refcounts.

    Positions are world tile coordinates; a player's chunk is ``chunk_of(x, y)``.
    """

    def __init__(self, view_radius: int, hysteresis: int = 1) -> None:
        if view_radius < 0 or hysteresis < 0:
            raise ValueError("view_radius and hysteresis must be >= 0")
        self._radius = view_radius
        self._keep = view_radius + hysteresis
        self._players: dict[PlayerId, _Player] = {}
        self._refs: dict[ChunkKey, int] = {}

    @property
    def view_radius(self) -> int:
        return self._radius

    @property
    def hysteresis(self) -> int:
        return self._keep - self._radius

    def update(
        self,
        player_id: PlayerId,
        x: int,
        y: int,
        rerank_if: Callable[[ChunkKey], bool] | None = None,
    ) -> InterestChange:
        """Move ``player_id`` (new or known) to tile ``(x, y)``; report global changes.

        ``rerank_if``: which of the chunks the player already holds to re-rank (the world
        passes "still waiting to load": ranking loaded ones is wasted work, three times the
        cost of the rest of a crossing); all of them if ``None``.
        """
        center = chunk_of(x, y)
        player = self._players.get(player_id)
        if player is None:
            player = _Player(center=center, x=x, y=y, heading=(0, 0), held=set())
            self._players[player_id] = player
        else:
            if (x, y) != (player.x, player.y):
                player.heading = (x - player.x, y - player.y)
            player.x, player.y = x, y
            if center == player.center and player.held:
                # Same chunk: the held set cannot change, whatever the heading now is.
                return InterestChange(load=[], release=[])
            player.center = center

        release: list[ChunkKey] = []
        keep = self._keep
        for key in [k for k in player.held if _chebyshev(k, center) > keep]:
            player.held.discard(key)
            if self._decref(key):
                release.append(key)

        heading = player.heading
        heading_len = math.hypot(*heading)
        cx, cy = center
        # (priority, distance², key, kind), kind: _FRESH, _SHARED or _HELD.
        ranked: list[tuple[int, int, ChunkKey, int]] = []
        for key in player.held:
            if rerank_if is not None and not rerank_if(key):
                continue
            dx, dy = key[0] - cx, key[1] - cy
            prio = _priority(dx, dy, heading, heading_len)
            ranked.append((prio, dx * dx + dy * dy, key, _HELD))
        r = self._radius
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                key = (cx + dx, cy + dy)
                if key in player.held:
                    continue
                player.held.add(key)
                refs = self._refs.get(key, 0)
                self._refs[key] = refs + 1
                kind = _FRESH if refs == 0 else _SHARED
                prio = _priority(dx, dy, heading, heading_len)
                ranked.append((prio, dx * dx + dy * dy, key, kind))
        ranked.sort()
        return InterestChange(
            load=[(key, prio) for prio, _, key, kind in ranked if kind == _FRESH],
            release=release,
            shared=[(key, prio) for prio, _, key, kind in ranked if kind == _SHARED],
            rerank=[(key, prio) for prio, _, key, kind in ranked if kind == _HELD],
        )

    def drop(self, player_id: PlayerId) -> list[ChunkKey]:
        """Forget ``player_id``; returns the chunks no other player holds (sorted). Idempotent."""
        player = self._players.pop(player_id, None)
        if player is None:
            return []
        return sorted(key for key in player.held if self._decref(key))

    def pinned_keys(self) -> frozenset[ChunkKey]:
        """Every chunk some player holds."""
        return frozenset(self._refs)

    def held_by(self, player_id: PlayerId) -> frozenset[ChunkKey]:
        player = self._players.get(player_id)
        return frozenset(player.held) if player is not None else frozenset()

    def holders(self, key: ChunkKey) -> int:
        """How many players hold ``key``."""
        return self._refs.get(key, 0)

    def __len__(self) -> int:
        return len(self._players)

    def _decref(self, key: ChunkKey) -> bool:
        """Drop one hold; True when it was the last."""
        count = self._refs[key] - 1
        if count:
            self._refs[key] = count
            return False
        del self._refs[key]
        return True
