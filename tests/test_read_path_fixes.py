"""Read-path regressions: region-state recency, per-file read errors, held-chunk priorities,
and prefetches that did not fit in the load queue."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

import streamer.runtime.world as world_mod
from streamer import StorageUnavailable, open_world
from streamer.config import Config, RuntimeSettings, StorageSettings
from streamer.runtime.chunk import Chunk
from streamer.storage.base import Blob
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world

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
        calls: list[list[str]] = []
        inner = store.get_many

        async def spy(keys: Sequence[str]) -> list[Blob | None]:
            calls.append(list(keys))
            return await inner(keys)

        monkeypatch.setattr(store, "get_many", spy)
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
        calls: list[list[str]] = []
        inner = store.get_many

        async def spy(keys: Sequence[str]) -> list[Blob | None]:
            calls.append(list(keys))
            return await inner(keys)

        monkeypatch.setattr(store, "get_many", spy)
        async with anyio.create_task_group() as tg:
            for cx in (0, 8, 16):
                tg.start_soon(world.chunk, cx, 0)
        assert len(calls) == 1 and len(calls[0]) == 3
