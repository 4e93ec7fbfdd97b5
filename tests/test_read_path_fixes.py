"""Read-path regressions: region-state recency, per-file read errors, held-chunk priorities,
and prefetches that did not fit in the load queue."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

import streamer.runtime.world as world_mod
from streamer import open_world
from streamer.config import Config, RuntimeSettings, StorageSettings
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
