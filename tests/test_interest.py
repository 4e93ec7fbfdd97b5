from __future__ import annotations

import random

from streamer.runtime.chunk import ChunkKey
from streamer.runtime.interest import RING_STRIDE, InterestTracker


def tile(cx: int, cy: int) -> tuple[int, int]:
    """Centre tile of chunk (cx, cy)."""
    return cx * 64 + 32, cy * 64 + 32


def square(cx: int, cy: int, r: int) -> set[ChunkKey]:
    return {(cx + dx, cy + dy) for dx in range(-r, r + 1) for dy in range(-r, r + 1)}


def ring(key: ChunkKey, center: ChunkKey) -> int:
    return max(abs(key[0] - center[0]), abs(key[1] - center[1]))


def test_first_update_loads_view_nearest_first() -> None:
    t = InterestTracker(view_radius=2, hysteresis=1)
    change = t.update("p", *tile(10, -3))
    keys = [k for k, _ in change.load]
    assert set(keys) == square(10, -3, 2)
    assert len(keys) == 25
    assert keys[0] == (10, -3)
    rings = [ring(k, (10, -3)) for k in keys]
    assert rings == sorted(rings)
    prios = [p for _, p in change.load]
    assert prios == sorted(prios)
    # Within a ring, edge-centres (closer) come before corners when not moving.
    ring1 = keys[1:9]
    assert set(ring1[:4]) == {(11, -3), (9, -3), (10, -2), (10, -4)}
    assert change.release == []
    assert t.pinned_keys() == square(10, -3, 2)


def test_negative_coordinates_use_floor_division() -> None:
    t = InterestTracker(view_radius=0, hysteresis=0)
    change = t.update("p", -1, -65)
    assert change.load == [((-1, -2), 0)]


def test_direction_of_travel_breaks_ties() -> None:
    t = InterestTracker(view_radius=3, hysteresis=0)
    t.update("p", *tile(0, 0))
    change = t.update("p", *tile(1, 0))  # moving +x: a new column at x = 4 enters
    keys = [k for k, _ in change.load]
    assert set(keys) == {(4, y) for y in range(-3, 4)}
    # All in ring 3; straight ahead first, then fanning out, corners last.
    assert keys[0] == (4, 0)
    assert set(keys[1:3]) == {(4, 1), (4, -1)}
    assert set(keys[-2:]) == {(4, 3), (4, -3)}
    prios = [p for _, p in change.load]
    assert all(3 * RING_STRIDE <= p < 4 * RING_STRIDE for p in prios)
    assert set(change.release) == {(-3, y) for y in range(-3, 4)}


def test_direction_orders_a_fresh_view_ahead_before_behind() -> None:
    t = InterestTracker(view_radius=2, hysteresis=0)
    t.update("p", *tile(0, 0))
    change = t.update("p", *tile(100, 100))  # teleport diagonally
    load = dict(change.load)
    assert change.load[0] == ((100, 100), 0)
    # Same ring, ahead beats behind.
    assert load[(101, 101)] < load[(99, 99)]
    assert load[(101, 101)] < load[(101, 99)] < load[(99, 99)]
    # Ring always dominates direction.
    assert load[(99, 99)] < load[(102, 102)]


def test_priorities_follow_the_latest_heading() -> None:
    t = InterestTracker(view_radius=1, hysteresis=0)
    t.update("p", *tile(0, 0))
    x, y = tile(0, 0)
    t.update("p", x, y - 10)  # within the same chunk: heading is now -y, no change
    change = t.update("p", x, y - 64)
    assert change.load[0][0] == (0, -2)


def test_hysteresis_prevents_churn() -> None:
    t = InterestTracker(view_radius=2, hysteresis=1)
    first = t.update("p", *tile(0, 0))
    assert len(first.load) == 25
    over = t.update("p", *tile(1, 0))
    assert {k for k, _ in over.load} == {(3, y) for y in range(-2, 3)}
    assert over.release == []  # column x = -2 is 3 away: within radius + hysteresis
    loads = releases = 0
    for i in range(20):
        change = t.update("p", *tile(i % 2, 0))
        loads += len(change.load)
        releases += len(change.release)
    assert (loads, releases) == (0, 0)
    assert t.pinned_keys() == {(x, y) for x in range(-2, 4) for y in range(-2, 3)}
    # Moving one more chunk puts column -2 at distance 4 > 3: released now.
    change = t.update("p", *tile(2, 0))
    assert set(change.release) == {(-2, y) for y in range(-2, 3)}
    assert {k for k, _ in change.load} == {(4, y) for y in range(-2, 3)}


def test_zero_hysteresis_releases_immediately() -> None:
    t = InterestTracker(view_radius=1, hysteresis=0)
    t.update("p", *tile(0, 0))
    change = t.update("p", *tile(1, 0))
    assert set(change.release) == {(-1, -1), (-1, 0), (-1, 1)}


def test_shared_chunks_are_refcounted() -> None:
    t = InterestTracker(view_radius=1, hysteresis=0)
    a = t.update("a", *tile(0, 0))
    b = t.update("b", *tile(1, 0))
    assert len(a.load) == 9
    # b only loads the column nobody held; the overlap is reported as shared.
    assert {k for k, _ in b.load} == {(2, -1), (2, 0), (2, 1)}
    assert {k for k, _ in b.shared} == square(0, 0, 1) & square(1, 0, 1)
    assert t.holders((1, 0)) == 2

    released = t.drop("a")
    assert set(released) == {(-1, -1), (-1, 0), (-1, 1)}
    assert t.pinned_keys() == square(1, 0, 1)
    assert t.drop("a") == []

    # b walking away releases the rest, each exactly once.
    change = t.update("b", *tile(10, 0))
    assert set(change.release) == square(1, 0, 1)
    assert t.pinned_keys() == square(10, 0, 1)


def test_moving_away_from_a_shared_chunk_keeps_it_for_the_other_player() -> None:
    t = InterestTracker(view_radius=1, hysteresis=0)
    t.update("a", *tile(0, 0))
    t.update("b", *tile(0, 0))
    change = t.update("a", *tile(5, 5))
    assert change.release == []
    assert len(change.load) == 9
    assert t.drop("b") and t.pinned_keys() == square(5, 5, 1)


def test_random_walks_keep_refcounts_balanced() -> None:
    rng = random.Random(7)
    r, h = 2, 1
    t = InterestTracker(view_radius=r, hysteresis=h)
    players = [f"p{i}" for i in range(6)]
    pos = {p: (rng.randrange(-3, 3), rng.randrange(-3, 3)) for p in players}
    outstanding: set[ChunkKey] = set()  # loaded and not yet released, as the world would pin

    def apply(load: list[ChunkKey], release: list[ChunkKey]) -> None:
        assert not (set(load) & outstanding), "loaded twice without a release"
        outstanding.update(load)
        assert set(release) <= outstanding, "released something never loaded"
        outstanding.difference_update(release)

    for _ in range(500):
        p = rng.choice(players)
        if rng.random() < 0.05:
            apply([], t.drop(p))
        cx, cy = pos[p]
        cx, cy = cx + rng.randrange(-1, 2), cy + rng.randrange(-1, 2)
        pos[p] = (cx, cy)
        change = t.update(p, *tile(cx, cy))
        apply([k for k, _ in change.load], change.release)
        assert square(cx, cy, r) <= t.held_by(p)
        assert all(ring(k, (cx, cy)) <= r + h for k in t.held_by(p))
        assert t.pinned_keys() == outstanding
    for p in players:
        apply([], t.drop(p))
    assert outstanding == set() and t.pinned_keys() == frozenset()
