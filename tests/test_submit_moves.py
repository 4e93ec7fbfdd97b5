"""``EntityMove`` in ``World.submit``: load errors reach the caller as themselves."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from streamer import EntityMove, open_world
from streamer.config import Config, RuntimeSettings
from streamer.errors import RegionInactive, StorageUnavailable
from streamer.runtime.chunk import ChunkKey
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
