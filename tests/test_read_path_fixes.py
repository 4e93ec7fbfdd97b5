"""Read-path regressions: region-state recency, per-file read errors, held-chunk priorities,
and prefetches that did not fit in the load queue."""

from __future__ import annotations

import contextlib
import errno
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import anyio
import anyio.lowlevel
import numpy as np
import pytest

import streamer.runtime.world as world_mod
from streamer import StorageUnavailable, open_world
from streamer.config import Config, RuntimeSettings, StorageSettings
from streamer.runtime.chunk import Chunk, ChunkKey
from streamer.runtime.interest import DIRECTION_STEPS, RING_STRIDE, InterestTracker
from streamer.runtime.loader import ChunkLoader
from streamer.storage.base import Blob
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world
from tests.test_loader import running

SEED = 11


def cfg(**runtime: object) -> Config:
    rt: dict[str, object] = {"flush_interval_ms": 60_000, "terrain_processes": 0}
    rt.update(runtime)
    return Config(runtime=RuntimeSettings(**rt), storage=StorageSettings(fsync=False))  # type: ignore[arg-type]


async def new_world(path: Path) -> Path:
    store = await LocalStore.open(path, fsync=False)
    await create_world(store, seed=SEED)
    await store.aclose()
    return path


async def test_region_states_are_evicted_least_recently_used_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(world_mod, "_CLEAN_REGIONS_KEPT", 4)
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg()) as world:
        store = world._store
        assert store is not None
        reads: list[str] = []
        inner = store.get_many

        async def spy(keys: Sequence[str]) -> list[Blob | None]:
            reads.extend(keys)
            return await inner(keys)

        monkeypatch.setattr(store, "get_many", spy)
        for i in range(1, 9):
            await world.chunk(i - 1, 0)  # a new chunk of region (0, 0) before every other load
            await world.chunk(8 * i, 0)  # a different region each time
        assert reads.count("regions/r.0.0.region") == 1
        assert (0, 0) in world._regions
        assert len(world._regions) == 4


def spy_get_many(monkeypatch: pytest.MonkeyPatch, store: LocalStore) -> list[list[str]]:
    """Record the keys of every ``store.get_many`` call (one call is one thread hop)."""
    calls: list[list[str]] = []
    inner = store.get_many

    async def spy(keys: Sequence[str]) -> list[Blob | None]:
        calls.append(list(keys))
        return await inner(keys)

    monkeypatch.setattr(store, "get_many", spy)
    return calls


async def test_one_unreadable_region_file_fails_only_its_own_region(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg(load_workers=1)) as world:
        store = world._store
        assert store is not None
        real_read = store.fs.read

        def read(key: str, *args: object, **kwargs: object) -> bytes:
            if key == "regions/r.1.0.region":
                raise OSError(errno.EIO, "Input/output error")
            return real_read(key, *args, **kwargs)

        monkeypatch.setattr(store.fs, "read", read)
        calls = spy_get_many(monkeypatch, store)
        outcome: dict[tuple[int, int], object] = {}

        async def get(cx: int, cy: int) -> None:
            try:
                outcome[(cx, cy)] = await world.chunk(cx, cy)
            except StorageUnavailable as err:
                outcome[(cx, cy)] = err

        async with anyio.create_task_group() as tg:
            tg.start_soon(get, 0, 0)  # region (0, 0): healthy
            tg.start_soon(get, 8, 0)  # region (1, 0): EIO
        # Both regions were asked for in one get_many, as the scenario needs.
        assert sorted(calls[0]) == ["regions/r.0.0.region", "regions/r.1.0.region"]
        assert isinstance(outcome[(0, 0)], Chunk)
        bad = outcome[(8, 0)]
        assert isinstance(bad, StorageUnavailable)
        assert "r.1.0.region" in str(bad) and "EIO" in str(bad)
        assert (0, 0) in world._regions and (1, 0) not in world._regions


async def test_healthy_regions_are_read_in_one_get_many(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg(load_workers=1)) as world:
        store = world._store
        assert store is not None
        calls = spy_get_many(monkeypatch, store)
        async with anyio.create_task_group() as tg:
            for cx in (0, 8, 16):
                tg.start_soon(world.chunk, cx, 0)
        assert len(calls) == 1 and len(calls[0]) == 3


# -- loader: prefetches that found the queue full, and failed prefetches ----------------------

_TILES = np.zeros((64, 64), dtype=np.uint16)


class Boom(Exception):
    pass


class FakeLoad:
    """Records every load_batch call; fails a key while ``failures[key]`` is above zero."""

    def __init__(self) -> None:
        self.calls: list[list[ChunkKey]] = []
        self.failures: dict[ChunkKey, float] = {}
        #: Keys in the order their loads succeeded.
        self.succeeded: list[ChunkKey] = []

    async def __call__(self, keys: list[ChunkKey]) -> Mapping[ChunkKey, Chunk | Exception]:
        self.calls.append(list(keys))
        await anyio.lowlevel.checkpoint()
        out: dict[ChunkKey, Chunk | Exception] = {}
        for k in keys:
            if self.failures.get(k, 0) > 0:
                self.failures[k] -= 1
                out[k] = Boom(str(k))
            else:
                out[k] = Chunk(k[0], k[1], _TILES)
                self.succeeded.append(k)
        return out

    @property
    def loaded(self) -> list[ChunkKey]:
        return [k for call in self.calls for k in call]


async def settle(predicate: Callable[[], bool], rounds: int = 5000) -> None:
    """Let other tasks run until ``predicate`` holds; bounded by scheduler turns."""
    for _ in range(rounds):
        if predicate():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("condition not reached")


async def test_prefetches_beyond_a_full_queue_all_load_in_priority_order() -> None:
    fake = FakeLoad()
    loader = ChunkLoader(fake, workers=1, max_batch=1, max_queued=4)
    ring4 = [((i, 4), 70 + i) for i in range(4)]
    for key, prio in ring4:
        assert loader.prefetch(key, prio)
    # The queue is full: a late player's own chunk, and one of its far chunks.
    assert not loader.prefetch((50, 50), 0)
    assert not loader.prefetch((50, 54), 90)
    assert loader.is_pending((50, 50)) and loader.is_pending((50, 54))
    assert loader.queue_depth == 4 and loader.deferred == 2
    # What the scrubber's idle check and the terrain process's start look at.
    assert loader.backlog == 6
    async with running(loader):
        await settle(lambda: loader.stats().loads == 6)
    assert fake.loaded == [(50, 50), *(k for k, _ in ring4), (50, 54)]
    assert loader.deferred == 0 and loader.queue_depth == 0 and loader.backlog == 0


async def test_deferred_prefetch_priority_can_be_raised() -> None:
    fake = FakeLoad()
    loader = ChunkLoader(fake, workers=1, max_batch=1, max_queued=1)
    assert loader.prefetch((0, 0), 10)
    assert not loader.prefetch((1, 0), 20)
    assert not loader.prefetch((2, 0), 30)
    assert loader.prefetch((2, 0), 5)  # already pending (deferred): joins, raises priority
    async with running(loader):
        await settle(lambda: loader.stats().loads == 3)
    assert fake.loaded == [(2, 0), (0, 0), (1, 0)]


async def test_a_get_takes_over_a_deferred_prefetch() -> None:
    fake = FakeLoad()
    loader = ChunkLoader(fake, workers=1, max_queued=1)
    assert loader.prefetch((0, 0), 10)
    assert not loader.prefetch((1, 0), 20)
    async with running(loader):
        got = await loader.get((1, 0), 40)
        await settle(lambda: loader.stats().loads == 2)
    assert got.key == (1, 0)
    assert sorted(fake.loaded) == [(0, 0), (1, 0)]  # one load of (1, 0), not two
    assert loader.deferred == 0


async def test_cancel_forgets_a_deferred_prefetch() -> None:
    fake = FakeLoad()
    loader = ChunkLoader(fake, workers=1, max_queued=1)
    assert loader.prefetch((0, 0))
    assert not loader.prefetch((1, 0))
    assert loader.cancel((1, 0))
    assert not loader.is_pending((1, 0)) and loader.deferred == 0
    async with running(loader):
        await settle(lambda: loader.stats().loads == 1)
        for _ in range(50):
            await anyio.lowlevel.checkpoint()
    assert fake.loaded == [(0, 0)]
    assert loader.stats().cancelled == 1


async def test_failed_prefetch_is_retried_until_it_loads() -> None:
    fake = FakeLoad()
    fake.failures[(3, 3)] = 2
    loader = ChunkLoader(fake, workers=1, retry_after=0.0)
    assert loader.prefetch((3, 3), 7)
    async with running(loader):
        await settle(lambda: loader.stats().loads == 1)
    s = loader.stats()
    assert (s.errors, s.retries, s.loads) == (2, 2, 1)
    assert fake.loaded == [(3, 3)] * 3
    assert not loader.is_pending((3, 3))


async def test_a_waiting_retry_is_pending_and_a_get_does_not_wait_for_it() -> None:
    fake = FakeLoad()
    fake.failures[(3, 3)] = 1
    loader = ChunkLoader(fake, workers=1, retry_after=3600.0, retry_max=3600.0)
    assert loader.prefetch((3, 3))
    async with running(loader):
        await settle(lambda: loader.stats().errors == 1)
        assert loader.is_pending((3, 3)) and loader.deferred == 1
        chunk = await loader.get((3, 3))
    assert chunk.key == (3, 3)
    assert fake.loaded == [(3, 3), (3, 3)]
    assert loader.deferred == 0


async def test_a_retry_goes_back_to_the_prefetchs_own_priority() -> None:
    """A get raised the load to a direct read's rank; it failed and the get left: the retry
    must not keep that rank, ahead of every other prefetch."""
    fake = FakeLoad()
    fake.failures[(3, 3)] = 1
    loader = ChunkLoader(fake, workers=1, retry_after=3600.0, retry_max=3600.0)
    assert loader.prefetch((3, 3), 7)
    outcome: list[BaseException] = []

    async def read() -> None:
        try:
            await loader.get((3, 3), -1)
        except Exception as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        await anyio.wait_all_tasks_blocked()  # the get has joined the queued prefetch
        async with running(loader):
            await settle(lambda: loader.stats().errors == 1 and bool(outcome))
            assert loader._retrying[(3, 3)].priority == 7
    assert len(outcome) == 1


async def test_cancelled_prefetch_is_not_retried() -> None:
    fake = FakeLoad()
    fake.failures[(1, 1)] = math.inf
    fake.failures[(2, 2)] = math.inf
    loader = ChunkLoader(fake, workers=1, retry_after=0.0)
    assert loader.prefetch((1, 1))
    async with running(loader):
        await settle(lambda: loader.stats().errors >= 3)
        loader.cancel((1, 1))  # queued, deferred, waiting to retry or loading: all stop
        await settle(lambda: not loader.is_pending((1, 1)))
        calls = len(fake.calls)
        for _ in range(50):
            await anyio.lowlevel.checkpoint()
        assert len(fake.calls) == calls
        # Cancelled while its load is in progress: that load's failure is not retried either.
        assert loader.prefetch((2, 2))
        await settle(lambda: fake.loaded[-1:] == [(2, 2)])
        assert not loader.cancel((2, 2))  # loading: goes on
        await settle(lambda: not loader.is_pending((2, 2)))
        for _ in range(50):
            await anyio.lowlevel.checkpoint()
        assert fake.loaded.count((2, 2)) == 1
    assert loader.deferred == 0


async def wait_idle(loader: ChunkLoader, keys: Iterable[ChunkKey]) -> None:
    """Until none of ``keys`` is pending (bounded by turns; no timing is asserted)."""
    keys = list(keys)
    for _ in range(3000):
        if not any(loader.is_pending(k) for k in keys):
            return
        await anyio.sleep(0.01)
    raise AssertionError("loads still pending")


async def test_every_pinned_chunk_loads_when_prefetches_overflow_the_queue(
    tmp_path: Path,
) -> None:
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg(view_radius=2, load_workers=1)) as world:
        loader = world._loader
        loader._max_queued = 8  # stands in for 4096: 4 players x 25 chunks overflow it
        for i in range(4):
            world.update_interest(f"p{i}", i * 20 * 64 + 10, 10)
        pinned = world._interest.pinned_keys()
        assert len(pinned) == 100
        await wait_idle(loader, pinned)
        assert [k for k in pinned if k not in world._cache] == []


async def test_a_pinned_chunk_whose_load_failed_is_loaded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg(view_radius=1, load_workers=1)) as world:
        store = world._store
        assert store is not None
        real_read = store.fs.read
        failures = {"regions/r.0.0.region": 1}  # one transient EIO

        def read(key: str, *args: object, **kwargs: object) -> bytes:
            if failures.get(key, 0) > 0:
                failures[key] -= 1
                raise OSError(errno.EIO, "Input/output error")
            return real_read(key, *args, **kwargs)

        monkeypatch.setattr(store.fs, "read", read)
        world.update_interest("p", 3 * 64 + 10, 3 * 64 + 10)  # chunks (2..4, 2..4) of region 0,0
        pinned = world._interest.pinned_keys()
        await wait_idle(world._loader, pinned)
        assert failures["regions/r.0.0.region"] == 0  # the failure did happen
        assert [k for k in pinned if k not in world._cache] == []
        assert world.stats().loader.errors >= 1


# -- held chunks follow the player's new position --------------------------------------------


def test_entering_another_chunk_reranks_the_chunks_already_held() -> None:
    tracker = InterestTracker(view_radius=4, hysteresis=1)
    first = tracker.update("p", 10, 10)  # chunk (0, 0), standing still
    assert dict(first.load)[(0, 0)] == 0 and first.rerank == []
    assert tracker.update("p", 20, 10).rerank == []  # same chunk: nothing to re-rank
    moved = tracker.update("p", 3 * 64 + 10, 10)  # three chunks east, heading east
    rerank = dict(moved.rerank)
    # Every chunk still held from before is re-ranked, and only those.
    assert set(rerank) == tracker.held_by("p") - {k for k, _ in moved.load}
    assert rerank[(3, 0)] == 0  # where it stands now
    assert rerank[(4, 0)] == 1 * RING_STRIDE  # straight ahead, ring 1
    assert rerank[(2, 0)] == 1 * RING_STRIDE + 2 * DIRECTION_STEPS  # straight behind
    assert rerank[(0, 0)] == 3 * RING_STRIDE + 2 * DIRECTION_STEPS  # the chunk it left
    assert rerank[(-2, 0)] == 5 * RING_STRIDE + 2 * DIRECTION_STEPS  # kept by hysteresis
    # The same priorities as a fresh player at the new chunk with the same heading gets.
    fresh = InterestTracker(view_radius=4, hysteresis=1)
    fresh.update("q", 2 * 64 + 10, 10)
    same = dict(fresh.update("q", 3 * 64 + 10, 10).rerank)
    ranks = dict(moved.load) | rerank
    assert all(ranks[k] == prio for k, prio in same.items())
    assert [p for _, p in moved.rerank] == sorted(p for _, p in moved.rerank)
    # Only the chunks the caller says are still waiting to load are ranked.
    waiting = {(4, 0), (0, 0)}
    only = tracker.update("p", 4 * 64 + 10, 10, rerank_if=waiting.__contains__)
    assert {k for k, _ in only.rerank} == waiting


async def test_reprioritize_can_lower_a_prefetch_but_not_below_a_waiting_get() -> None:
    fake = FakeLoad()
    loader = ChunkLoader(fake, workers=1, max_batch=1, max_queued=3)
    assert loader.prefetch((0, 0), 0)
    assert loader.prefetch((1, 0), 5)
    assert loader.prefetch((2, 0), 6)
    assert not loader.prefetch((3, 0), 7)  # deferred
    assert loader.reprioritize((0, 0), 50)  # lowered
    assert loader.reprioritize((3, 0), 1)  # raised, while deferred
    assert not loader.reprioritize((9, 9), 0)  # not pending: nothing is queued
    assert not loader.is_pending((9, 9))
    async with anyio.create_task_group() as tg:
        tg.start_soon(loader.get, (2, 0), -1)
        await settle(lambda: loader.stats().joined == 1)
        assert loader.reprioritize((2, 0), 60)  # a get waits on it: keeps the get's -1
        async with running(loader):
            await settle(lambda: loader.stats().loads == 4)
    assert fake.loaded == [(2, 0), (3, 0), (1, 0), (0, 0)]


async def test_after_a_fast_move_the_chunk_a_player_stands_in_loads_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await new_world(tmp_path)
    config = cfg(view_radius=4, hysteresis=1, load_workers=1)
    async with open_world(tmp_path, config) as world:
        loader = world._loader
        order: list[ChunkKey] = []
        inner = loader._load_batch

        async def spy(keys: list[ChunkKey]) -> Mapping[ChunkKey, Chunk | Exception]:
            order.extend(keys)
            return await inner(keys)

        monkeypatch.setattr(loader, "_load_batch", spy)
        # p1 appears in chunk (0, 0) and, before any load starts, walks to chunk (3, 0).
        world.update_interest("p1", 10, 10)
        world.update_interest("p1", 3 * 64 + 10, 10)
        world.update_interest("p2", 40 * 64 + 10, 10)  # someone elsewhere
        assert loader._flights[(3, 0)].priority == 0
        mine = world._interest.held_by("p1")
        await wait_idle(loader, mine)
        p1_order = [k for k in order if k in mine]
        assert p1_order[0] == (3, 0)
        # Nearest first from where p1 is now: rings never go back down.
        rings = [max(abs(k[0] - 3), abs(k[1])) for k in p1_order]
        assert rings == sorted(rings)
        # Its own new chunk did not wait behind p2's chunks either.
        assert order.index((3, 0)) <= 1


@pytest.mark.parametrize("seed", range(20))
async def test_every_standing_prefetch_loads_through_a_small_queue_and_failures(
    seed: int,
) -> None:
    rng = random.Random(seed)
    fake = FakeLoad()
    loader = ChunkLoader(
        fake,
        workers=rng.randrange(1, 4),
        max_batch=rng.randrange(1, 6),
        max_queued=rng.randrange(1, 6),
        retry_after=0.0,
        retry_max=0.0,
    )
    standing: set[ChunkKey] = set()
    loaded_since: dict[ChunkKey, int] = {}

    async def reader(key: ChunkKey, prio: int) -> None:
        with contextlib.suppress(Boom):
            await loader.get(key, prio)

    async with running(loader), anyio.create_task_group() as tg:
        for _ in range(300):
            key, prio, op = (rng.randrange(12), 0), rng.randrange(-2, 30), rng.random()
            if op < 0.4:
                loader.prefetch(key, prio)
                standing.add(key)
                loaded_since[key] = len(fake.succeeded)
                if rng.random() < 0.2:
                    fake.failures[key] = rng.randrange(1, 3)
            elif op < 0.55:
                loader.cancel(key)
                standing.discard(key)
            elif op < 0.7:
                loader.reprioritize(key, prio)
            elif op < 0.8:
                tg.start_soon(reader, key, prio)
            if rng.random() < 0.5:
                await anyio.lowlevel.checkpoint()
            assert loader.queue_depth <= loader._max_queued
        await settle(lambda: not (loader.queue_depth or loader.inflight or loader.deferred))
    # Every prefetch still standing loaded after it was last asked for, failures or not.
    assert [k for k in standing if k not in fake.succeeded[loaded_since[k] :]] == []
    assert not loader._flights and loader.deferred == 0


async def test_a_get_waiting_for_room_does_not_wait_behind_deferred_prefetches() -> None:
    fake = FakeLoad()
    loader = ChunkLoader(fake, workers=1, max_batch=1, max_queued=2)
    assert loader.prefetch((0, 9), 50)
    assert loader.prefetch((1, 9), 51)
    for i in range(8):  # better ranked than the queue, but deferred: it is full
        assert not loader.prefetch((i, 0), i)
    got: list[Chunk] = []

    async def reader() -> None:
        got.append(await loader.get((7, 7), -1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await settle(lambda: loader._room_waiters == 1)
        async with running(loader):
            await settle(lambda: loader.stats().loads == 11)
    assert got[0].key == (7, 7)
    # One load from the queue makes room; the get's load is next.
    assert fake.loaded[:2] == [(0, 9), (7, 7)]
    assert fake.loaded[2:] == [*((i, 0) for i in range(8)), (1, 9)]
