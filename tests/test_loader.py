from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.errors import WorldClosed
from streamer.runtime.chunk import Chunk, ChunkKey
from streamer.runtime.loader import ChunkLoader

_TILES = np.zeros((64, 64), dtype=np.uint16)
_TILES.flags.writeable = False


class Boom(Exception):
    pass


class FakeLoad:
    """Records every load_batch call; optionally blocks on a gate and fails chosen keys."""

    def __init__(self, gate: anyio.Event | None = None) -> None:
        self.calls: list[list[ChunkKey]] = []
        self.gate = gate
        self.fail_batch_with: BaseException | None = None
        self.fail_keys: set[ChunkKey] = set()
        self.entered = anyio.Event()

    async def __call__(self, keys: list[ChunkKey]) -> Mapping[ChunkKey, Chunk | Exception]:
        self.calls.append(list(keys))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        else:
            await anyio.lowlevel.checkpoint()
        if self.fail_batch_with is not None:
            exc, self.fail_batch_with = self.fail_batch_with, None
            raise exc
        return {k: Boom(str(k)) if k in self.fail_keys else Chunk(k[0], k[1], _TILES) for k in keys}

    @property
    def loaded(self) -> list[ChunkKey]:
        return [k for call in self.calls for k in call]


@asynccontextmanager
async def running(loader: ChunkLoader) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        loader.run(tg)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


async def settle(predicate: object = None, rounds: int = 5000) -> None:
    """Let other tasks run; bounded by scheduler turns, never by wall-clock time."""
    for _ in range(rounds):
        if callable(predicate) and predicate():
            return
        await anyio.lowlevel.checkpoint()
    if callable(predicate):
        raise AssertionError("condition not reached")


async def test_single_flight_hundred_getters() -> None:
    fake = FakeLoad()
    loader = ChunkLoader(fake, workers=4)
    results: list[Chunk] = []

    async def reader() -> None:
        results.append(await loader.get((3, 4)))

    async with running(loader):
        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(reader)
    assert fake.calls == [[(3, 4)]]
    assert len(results) == 100 and all(r is results[0] for r in results)
    s = loader.stats()
    assert (s.requests, s.loads, s.batches, s.joined) == (100, 1, 1, 99)


@pytest.mark.parametrize("workers", [1, 4])
async def test_batching(workers: int) -> None:
    fake = FakeLoad()
    loader = ChunkLoader(fake, workers=workers, max_batch=16)
    keys = [(i, -i) for i in range(100)]
    got: dict[ChunkKey, Chunk] = {}

    async def reader(k: ChunkKey) -> None:
        got[k] = await loader.get(k)

    async with anyio.create_task_group() as tg:
        for k in keys:
            tg.start_soon(reader, k)
        await settle(lambda: loader.queue_depth == 100)
        async with running(loader):
            await settle(lambda: len(got) == 100)
    assert len(fake.calls) == math.ceil(100 / 16)
    assert all(len(c) <= 16 for c in fake.calls)
    assert sorted(fake.loaded) == sorted(keys)
    assert all(got[k].key == k for k in keys)
    assert loader.stats().batches == len(fake.calls)


async def test_requests_in_one_tick_share_a_batch() -> None:
    fake = FakeLoad()
    loader = ChunkLoader(fake, workers=1, max_batch=64)
    async with running(loader):
        await settle(rounds=5)  # the worker is idle, waiting for work
        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(loader.get, (i, 0))
    assert len(fake.calls) == 1 and len(fake.calls[0]) == 40


async def test_priority_order() -> None:
    fake = FakeLoad()
    loaded = anyio.Event()
    seen: list[ChunkKey] = []

    def on_loaded(key: ChunkKey, chunk: Chunk) -> None:
        assert chunk.key == key
        seen.append(key)
        if len(seen) == 6:
            loaded.set()

    loader = ChunkLoader(fake, workers=1, max_batch=1, on_loaded=on_loaded)
    # Lower value first; equal priorities keep arrival order.
    for key, prio in [((0, 0), 5), ((1, 0), 1), ((2, 0), 9), ((3, 0), 1), ((4, 0), 0), ((5, 0), 7)]:
        assert loader.prefetch(key, prio)
    # A get on a queued key moves it up.
    async with anyio.create_task_group() as tg:
        tg.start_soon(loader.get, (2, 0), -1)
        await settle(lambda: loader.stats().joined == 1)
        async with running(loader):
            await loaded.wait()
    assert fake.loaded == [(2, 0), (4, 0), (1, 0), (3, 0), (0, 0), (5, 0)]
    assert seen == fake.loaded


async def test_batch_band_keeps_far_keys_out_of_urgent_batch() -> None:
    fake = FakeLoad()
    loader = ChunkLoader(fake, workers=1, max_batch=16, batch_band=2)
    for i, prio in enumerate([0, 1, 2, 3, 10, 11]):
        loader.prefetch((i, 0), prio)
    async with running(loader):
        await settle(lambda: loader.stats().loads == 6)
    assert fake.calls == [[(0, 0), (1, 0), (2, 0)], [(3, 0)], [(4, 0), (5, 0)]]


async def test_cancelled_waiter_does_not_break_others() -> None:
    gate = anyio.Event()
    fake = FakeLoad(gate)
    loader = ChunkLoader(fake, workers=2)
    results: list[Chunk] = []
    queued_victim, loading_victim = anyio.CancelScope(), anyio.CancelScope()

    async def reader(scope: anyio.CancelScope) -> None:
        with scope:
            results.append(await loader.get((1, 1)))

    async with anyio.create_task_group() as tg:
        for scope in (anyio.CancelScope(), queued_victim, anyio.CancelScope(), loading_victim):
            tg.start_soon(reader, scope)
        await settle(lambda: loader.stats().joined == 3)
        queued_victim.cancel()  # while the load is still queued
        await settle(rounds=10)
        assert loader.queue_depth == 1
        async with running(loader):
            await fake.entered.wait()
            loading_victim.cancel()  # while the load is in progress
            await settle(rounds=10)
            gate.set()
            await settle(lambda: len(results) == 2)
    assert fake.calls == [[(1, 1)]]
    assert all(r.key == (1, 1) for r in results)


async def test_sole_waiter_cancelled_while_queued_drops_load() -> None:
    fake = FakeLoad()
    loader = ChunkLoader(fake, workers=1)
    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def reader() -> None:
            with scope:
                await loader.get((7, 7))

        tg.start_soon(reader)
        await settle(lambda: loader.queue_depth == 1)
        scope.cancel()
        await settle(lambda: loader.queue_depth == 0)
    async with running(loader):
        chunk = await loader.get((8, 8))
    assert chunk.key == (8, 8)
    assert fake.loaded == [(8, 8)]
    assert loader.stats().cancelled == 1


async def test_error_reaches_every_waiter_then_retry_works() -> None:
    gate = anyio.Event()
    fake = FakeLoad(gate)
    fake.fail_batch_with = Boom("disk on fire")
    loader = ChunkLoader(fake, workers=1)
    errors: list[BaseException] = []

    async def reader() -> None:
        try:
            await loader.get((2, 2))
        except Boom as exc:
            errors.append(exc)

    async with running(loader):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(reader)
            await fake.entered.wait()
            await settle(lambda: loader.stats().joined == 4)
            gate.set()
        assert len(errors) == 5 and all(isinstance(e, Boom) for e in errors)
        assert not loader.is_pending((2, 2))  # the failure is not remembered
        chunk = await loader.get((2, 2))
    assert chunk.key == (2, 2)
    assert fake.calls == [[(2, 2)], [(2, 2)]]
    s = loader.stats()
    assert (s.errors, s.loads) == (1, 1)


async def test_per_key_error_fails_only_that_key() -> None:
    fake = FakeLoad()
    fake.fail_keys = {(0, 1)}
    loader = ChunkLoader(fake, workers=1)
    outcome: dict[ChunkKey, str] = {}

    async def reader(k: ChunkKey) -> None:
        try:
            await loader.get(k)
            outcome[k] = "ok"
        except Boom:
            outcome[k] = "boom"

    async with anyio.create_task_group() as tg:
        for k in [(0, 0), (0, 1), (0, 2)]:
            tg.start_soon(reader, k)
        await settle(lambda: loader.queue_depth == 3)
        async with running(loader):
            await settle(lambda: len(outcome) == 3)
    assert len(fake.calls) == 1
    assert outcome == {(0, 0): "ok", (0, 1): "boom", (0, 2): "ok"}


async def test_missing_key_in_result_is_an_error() -> None:
    async def lossy(keys: list[ChunkKey]) -> dict[ChunkKey, Chunk]:
        await anyio.lowlevel.checkpoint()
        return {}

    loader = ChunkLoader(lossy, workers=1)
    async with running(loader):
        with pytest.raises(Exception, match="returned nothing"):
            await loader.get((1, 2))


async def test_cancel_queued_prefetch_is_never_loaded() -> None:
    fake = FakeLoad()
    loader = ChunkLoader(fake, workers=1)
    assert loader.prefetch((1, 0), 1)
    assert loader.prefetch((2, 0), 2)
    assert loader.prefetch((3, 0), 3)
    assert loader.cancel((1, 0))
    assert not loader.cancel((1, 0))
    assert not loader.cancel((9, 9))
    assert loader.queue_depth == 2
    async with anyio.create_task_group() as tg:
        # A prefetch that someone also awaits is not dropped by cancel().
        tg.start_soon(loader.get, (3, 0))
        await settle(lambda: loader.stats().joined == 1)
        assert not loader.cancel((3, 0))
        async with running(loader):
            await settle(lambda: loader.stats().loads == 2)
    assert sorted(fake.loaded) == [(2, 0), (3, 0)]
    assert loader.stats().cancelled == 1


async def test_bounded_queue() -> None:
    fake = FakeLoad()
    loader = ChunkLoader(fake, workers=1, max_queued=2)
    assert loader.prefetch((0, 0))
    assert loader.prefetch((1, 0))
    assert not loader.prefetch((2, 0))  # deferred: not queued, but not lost either
    assert loader.prefetch((0, 0), -5)  # already queued: joins, not refused
    got: list[Chunk] = []

    async def reader() -> None:
        got.append(await loader.get((3, 0)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await settle(rounds=20)
        assert loader.queue_depth == 2 and not got  # waiting for room
        assert loader.deferred == 1
        async with running(loader):
            await settle(lambda: len(got) == 1 and loader.stats().loads == 4)
    assert sorted(fake.loaded) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert loader.stats().rejected == 1


async def test_stopping_the_loader_fails_outside_waiters() -> None:
    gate = anyio.Event()
    fake = FakeLoad(gate)
    loader = ChunkLoader(fake, workers=1)
    errors: list[BaseException] = []

    async def reader(k: ChunkKey) -> None:
        try:
            await loader.get(k)
        except WorldClosed as exc:
            errors.append(exc)

    async with anyio.create_task_group() as outside:
        async with anyio.create_task_group() as inner:
            loader.run(inner)
            outside.start_soon(reader, (0, 0))
            await fake.entered.wait()  # (0, 0) is mid-load
            loader.prefetch((5, 5))
            outside.start_soon(reader, (1, 1))
            await settle(lambda: loader.queue_depth >= 1)
            inner.cancel_scope.cancel()
    assert len(errors) == 2
    with pytest.raises(WorldClosed):
        await loader.get((0, 0))
    s = loader.stats()
    assert (s.queue_depth, s.inflight) == (0, 0)


async def test_latency_percentiles_are_reported() -> None:
    loader = ChunkLoader(FakeLoad(), workers=1)
    assert loader.latency_percentiles().samples == 0
    async with running(loader):
        for i in range(10):
            await loader.get((i, 0))
    lat = loader.latency_percentiles()
    assert lat.samples == 10
    assert 0 <= lat.p50_ms <= lat.p99_ms


_request = st.tuples(
    st.tuples(st.integers(0, 7), st.integers(0, 3)),  # key
    st.sampled_from(["get", "prefetch", "get-cancelled"]),
    st.integers(-3, 3),  # priority
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bursts=st.lists(st.lists(_request, min_size=1, max_size=40), min_size=1, max_size=3),
    workers=st.integers(1, 4),
    max_batch=st.integers(1, 8),
)
def test_every_request_loaded_once_per_burst(
    bursts: list[list[tuple[ChunkKey, str, int]]], workers: int, max_batch: int
) -> None:
    async def scenario() -> None:
        fake = FakeLoad()
        loader = ChunkLoader(fake, workers=workers, max_batch=max_batch)
        async with running(loader):
            for burst in bursts:
                fake.calls.clear()
                gate = anyio.Event()
                fake.gate = gate
                results: list[tuple[ChunkKey, Chunk]] = []
                scopes: list[anyio.CancelScope] = []

                async def reader(
                    k: ChunkKey,
                    prio: int,
                    scope: anyio.CancelScope,
                    out: list[tuple[ChunkKey, Chunk]],
                ) -> None:
                    with scope:
                        out.append((k, await loader.get(k, prio)))

                async with anyio.create_task_group() as tg:
                    for key, kind, prio in burst:
                        if kind == "prefetch":
                            loader.prefetch(key, prio)
                        else:
                            scope = anyio.CancelScope()
                            if kind == "get-cancelled":
                                scopes.append(scope)
                            tg.start_soon(reader, key, prio, scope, results)
                    await settle(rounds=5)
                    for scope in scopes:
                        scope.cancel()
                    await settle(rounds=5)
                    # Loads finish only once every request of the burst is outstanding.
                    gate.set()
                await settle(lambda: loader.queue_depth == 0 and loader.inflight == 0)

                counts = Counter(fake.loaded)
                assert all(n == 1 for n in counts.values()), counts
                must_load = {k for k, kind, _ in burst if kind != "get-cancelled"}
                assert must_load <= set(counts)
                assert set(counts) <= {k for k, _, _ in burst}
                surviving_gets = sum(1 for _, kind, _ in burst if kind == "get")
                assert len(results) >= surviving_gets
                assert all(chunk.key == k for k, chunk in results)

    anyio.run(scenario)


async def test_mass_cancel_and_reprioritise_keeps_order() -> None:
    fake = FakeLoad()
    loader = ChunkLoader(fake, workers=1, max_batch=1)
    for i in range(500):
        assert loader.prefetch((i, 0), 1000 + i)
    for i in range(500):
        if i % 5:
            assert loader.cancel((i, 0))
    kept = [(i, 0) for i in range(0, 500, 5)]
    # Re-prioritise the survivors to reverse their order (each leaves a stale heap entry).
    for n, key in enumerate(kept):
        assert loader.prefetch(key, 500 - n)
        assert loader.prefetch(key, 10_000)  # joining never lowers the priority
    assert loader.queue_depth == len(kept)
    async with running(loader):
        await settle(lambda: loader.stats().loads == len(kept))
    assert fake.loaded == kept[::-1]


@pytest.mark.parametrize(
    ("retry_after", "retry_max"),
    [(-0.1, 30.0), (2.0, 1.0)],
    ids=["negative-retry", "max-below-first"],
)
def test_bad_retry_settings_are_refused(retry_after: float, retry_max: float) -> None:
    with pytest.raises(ValueError, match="retry_after"):
        ChunkLoader(FakeLoad(), workers=1, retry_after=retry_after, retry_max=retry_max)
