"""``EntityMove`` in ``World.submit``: resolved against pending batches, never outliving
the failure of one it was resolved against; load errors reach the caller as themselves."""

from __future__ import annotations

import errno
import logging
import threading
from pathlib import Path

import anyio
import pytest

from streamer import Character, EntityMove, EntityUpsert, TileSet, open_world
from streamer.config import Config, RuntimeSettings
from streamer.errors import RegionInactive, StorageUnavailable
from streamer.runtime.chunk import ChunkKey
from streamer.runtime.world import World
from streamer.schema.deltas import AnyDelta
from streamer.storage.faultfs import SimulatedFileSystem
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world

CONF = Config(runtime=RuntimeSettings(flush_interval_ms=60_000, terrain_processes=0))


async def new_world(path: Path) -> SimulatedFileSystem:
    fs = SimulatedFileSystem()
    store = await LocalStore.open(path, fs=fs)
    await create_world(store, seed=5)
    await store.aclose()
    return fs


class Outcomes(dict[object, BaseException | None]):
    """Each submit's outcome by a name of the test's choosing: None, or what it raised."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self._world = world

    async def submit(self, name: object, delta: AnyDelta) -> None:
        try:
            await self._world.submit([delta])
            self[name] = None
        except Exception as exc:
            self[name] = exc


class _HeldWrite:
    """Holds the next file write (the journal's: nothing else writes here) until released,
    then lets it fail with EIO or go through."""

    def __init__(self, fs: SimulatedFileSystem, *, fail: bool) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self._real = fs.write
        self._armed = True
        self._fail = fail
        fs.write = self._write  # type: ignore[method-assign]

    def _write(self, handle: int, data: bytes | memoryview) -> None:
        if self._armed:
            self._armed = False
            self.started.set()
            self.release.wait(30)
            if self._fail:
                raise OSError(errno.EIO, "EIO")
        self._real(handle, data)


async def _upsert_then_move(world: World, held: _HeldWrite) -> Outcomes:
    """Batch 1 upserts ``ghost`` and is held in its journal write; batch 2 moves ghost
    meanwhile. Returns each batch's outcome."""
    res = Outcomes(world)

    ghost = Character(id="ghost", x=5, y=5)
    move = EntityMove(tick=2, entity_id="ghost", from_x=5, from_y=5, to_x=600, to_y=5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(res.submit, 1, EntityUpsert(tick=1, character=ghost))
        await anyio.to_thread.run_sync(held.started.wait, 30)
        tg.start_soon(res.submit, 2, move)
        # Batch 2 has gone as far as it can while batch 1 is being written.
        await anyio.wait_all_tasks_blocked()
        held.release.set()
    return res


async def test_a_move_resolved_while_its_entity_is_pending_fails_with_that_batch(
    tmp_path: Path,
) -> None:
    """/tmp/review_submit/overlay_fail.py: batch 1 creating ``ghost`` fails (EIO); batch 2,
    moving ghost, was resolved against it: it is withdrawn before it is written."""
    fs = await new_world(tmp_path)
    async with open_world(tmp_path, CONF, fs=fs) as world:
        await world.chunk(0, 0)  # source and target cached: batch 2 needs no load
        await world.chunk(9, 0)
        res = await _upsert_then_move(world, _HeldWrite(fs, fail=True))
        assert isinstance(res[1], StorageUnavailable)
        err = res[2]
        assert isinstance(err, StorageUnavailable)
        assert "resolved against batch" in str(err) and "which failed" in str(err)
        assert [e.id for e in (await world.chunk(9, 0)).entities if e.id == "ghost"] == []
        assert [e.id for e in (await world.chunk(0, 0)).entities if e.id == "ghost"] == []
    async with open_world(tmp_path, CONF, fs=fs) as world:
        for key in [(0, 0), (9, 0)]:
            assert "ghost" not in [e.id for e in (await world.chunk(*key)).entities]


async def test_a_move_resolved_against_a_pending_batch_applies_once_both_are_durable(
    tmp_path: Path,
) -> None:
    fs = await new_world(tmp_path)
    async with open_world(tmp_path, CONF, fs=fs) as world:
        await world.chunk(0, 0)
        await world.chunk(9, 0)
        res = await _upsert_then_move(world, _HeldWrite(fs, fail=False))
        assert res == {1: None, 2: None}
        assert [e.id for e in (await world.chunk(9, 0)).entities if e.id == "ghost"] == ["ghost"]
        assert [e.id for e in (await world.chunk(0, 0)).entities if e.id == "ghost"] == []
        await world.flush()
    async with open_world(tmp_path, CONF, fs=fs) as world:
        assert "ghost" in [e.id for e in (await world.chunk(9, 0)).entities]
        assert "ghost" not in [e.id for e in (await world.chunk(0, 0)).entities]


def step(tick: int, entity: str, x0: int, x1: int) -> EntityMove:
    """A move along y=5 from x0 to x1."""
    return EntityMove(tick=tick, entity_id=entity, from_x=x0, from_y=5, to_x=x1, to_y=5)


async def test_pipelined_moves_of_one_entity_keep_their_tick_order(tmp_path: Path) -> None:
    """A shard server starts its submits in tick order without awaiting each: a move of an
    entity with a pending change must not wait, or later ticks overtake it and it is
    refused for going backwards (/tmp/review2_rt/pipelined_move.py)."""
    fs = await new_world(tmp_path)
    async with open_world(tmp_path, CONF, fs=fs) as world:
        await world.chunk(0, 0)
        await world.submit([EntityUpsert(tick=1, character=Character(id="e", x=5, y=5))])
        res = Outcomes(world)

        async with anyio.create_task_group() as tg:
            tg.start_soon(res.submit, 10, step(10, "e", 5, 6))
            await anyio.sleep(0)
            tg.start_soon(res.submit, 11, step(11, "e", 6, 7))
            await anyio.sleep(0)
            tg.start_soon(res.submit, 12, TileSet(tick=12, x=10, y=10, tile=3))
        assert res == {10: None, 11: None, 12: None}
        (e,) = [c for c in (await world.chunk(0, 0)).entities if c.id == "e"]
        assert (e.x, e.y) == (7, 5)


async def test_a_failure_withdraws_every_batch_resolved_against_it(tmp_path: Path) -> None:
    """Batch 1 creates ``ghost`` and fails; batch 2 moves it (resolved against 1), batch 3
    moves it again (resolved against 2): both withdrawn, nothing of ghost anywhere."""
    fs = await new_world(tmp_path)
    async with open_world(tmp_path, CONF, fs=fs) as world:
        await world.chunk(0, 0)
        held = _HeldWrite(fs, fail=True)
        res = Outcomes(world)

        async with anyio.create_task_group() as tg:
            ghost = Character(id="ghost", x=5, y=5)
            tg.start_soon(res.submit, 1, EntityUpsert(tick=1, character=ghost))
            await anyio.to_thread.run_sync(held.started.wait, 30)
            tg.start_soon(res.submit, 2, step(2, "ghost", 5, 6))
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(res.submit, 3, step(3, "ghost", 6, 7))
            await anyio.wait_all_tasks_blocked()
            held.release.set()
        assert all(isinstance(res[n], StorageUnavailable) for n in (1, 2, 3)), res
        assert "ghost" not in [c.id for c in (await world.chunk(0, 0)).entities]
        # The journal goes on: a later, independent batch is written.
        await world.submit([EntityUpsert(tick=4, character=Character(id="other", x=5, y=5))])
    async with open_world(tmp_path, CONF, fs=fs) as world:
        ids = [c.id for c in (await world.chunk(0, 0)).entities]
        assert "ghost" not in ids and "other" in ids


@pytest.mark.parametrize(
    "error",
    [
        StorageUnavailable("chunk load failed: EIO", key="regions/r.0.0.region"),
        RegionInactive(0, 0, "quarantined"),
    ],
)
async def test_a_source_chunk_load_error_reaches_the_caller_unwrapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """/tmp/review_submit/move_err2.py: not an ExceptionGroup around it."""
    fs = await new_world(tmp_path)
    async with open_world(tmp_path, CONF, fs=fs) as world:

        async def failing_get(key: ChunkKey, priority: int = 0) -> None:
            raise error

        monkeypatch.setattr(world._loader, "get", failing_get)
        move = EntityMove(tick=2, entity_id="e", from_x=5, from_y=5, to_x=600, to_y=5)
        with pytest.raises(type(error)) as info:
            await world.submit([move])
        assert info.value is error


async def test_several_source_chunk_load_errors_raise_one_and_log_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fs = await new_world(tmp_path)
    async with open_world(tmp_path, CONF, fs=fs) as world:
        errors = {
            (0, 0): StorageUnavailable("EIO", key="regions/r.0.0.region"),
            (0, 1): StorageUnavailable("EIO", key="regions/r.0.1.region"),
        }

        async def failing_get(key: ChunkKey, priority: int = 0) -> None:
            raise errors[key]

        monkeypatch.setattr(world._loader, "get", failing_get)
        moves = [
            EntityMove(tick=2, entity_id="a", from_x=5, from_y=5, to_x=6, to_y=6),
            EntityMove(tick=2, entity_id="b", from_x=5, from_y=70, to_x=6, to_y=70),
        ]
        with caplog.at_level(logging.WARNING), pytest.raises(StorageUnavailable) as info:
            await world.submit(moves)
        raised = info.value
        assert raised in errors.values()
        # The other load may have been cancelled before it failed; if it failed, it is logged.
        other = next(e for e in errors.values() if e is not raised)
        logged = [r.getMessage() for r in caplog.records if "failed to load" in r.getMessage()]
        assert logged in (
            [],
            [f"submit: another EntityMove source chunk failed to load: {other!r}"],
        )


async def test_a_withdrawn_batch_does_not_release_an_in_flight_batchs_tick(
    tmp_path: Path,
) -> None:
    """/tmp/review3/withdraw_fifo.py: B1 (creating ghost) fails, B2 (moving it) is withdrawn,
    B17 (an unrelated edit at B1's tick, queued between them) is still on its way. A flush
    meanwhile must not seal B17's tick: acknowledged, it must survive a power loss."""
    fs = await new_world(tmp_path)
    async with open_world(tmp_path, CONF, fs=fs) as world:
        await world.chunk(0, 0)
        await world.submit([TileSet(tick=10, x=1, y=1, tile=7)])
        q = world._queues.regions[(0, 0)]
        res = Outcomes(world)
        first = _HeldWrite(fs, fail=True)
        async with anyio.create_task_group() as tg:
            ghost = Character(id="ghost", x=5, y=5)
            tg.start_soon(res.submit, "B1", EntityUpsert(tick=10, character=ghost))
            await anyio.to_thread.run_sync(first.started.wait, 30)
            tg.start_soon(res.submit, "B17", TileSet(tick=10, x=2, y=2, tile=9))
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(res.submit, "B2", step(11, "ghost", 5, 6))
            await anyio.wait_all_tasks_blocked()
            second = _HeldWrite(fs, fail=False)  # holds B17's write
            first.release.set()
            await anyio.to_thread.run_sync(second.started.wait, 30)
            assert q.cutoff(full=True, idle_s=0, now=0) is None  # B17's tick is not sealed
            await world._flush_region(q, True)
            second.release.set()
        assert res["B17"] is None
        assert isinstance(res["B1"], StorageUnavailable)
        assert isinstance(res["B2"], StorageUnavailable)
        image = fs.durable_image()  # a power loss right after B17 was acknowledged
    async with open_world(tmp_path, CONF, fs=image) as world:
        assert int((await world.chunk(0, 0)).tiles[2, 2]) == 9
