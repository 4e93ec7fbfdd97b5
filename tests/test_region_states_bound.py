"""More regions in play than the clean region states kept in memory.

Installing a region state evicts clean ones beyond the bound; a call that needed more
regions than that at once used to evict its own and load them again forever: a replay
after a crash never finished, one batch across many regions never returned.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import streamer.runtime.world as world_module
from streamer import TileSet, open_world
from streamer.config import Config, RuntimeSettings
from streamer.storage.faultfs import SimulatedFileSystem
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world

KEPT = 4
REGIONS = 3 * KEPT + 1
CONF = Config(runtime=RuntimeSettings(flush_interval_ms=600_000, terrain_processes=0))


@pytest.fixture(autouse=True)
def _few_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(world_module, "_CLEAN_REGIONS_KEPT", KEPT)


async def new_world(path: Path) -> SimulatedFileSystem:
    fs = SimulatedFileSystem()
    store = await LocalStore.open(path, fs=fs)
    await create_world(store, seed=5, region_size=1)  # a region is one chunk
    await store.aclose()
    return fs


def edits(tick: int) -> list[TileSet]:
    return [TileSet(tick=tick, x=64 * i + 1, y=1, tile=tick + i) for i in range(REGIONS)]


async def assert_holds(world: world_module.World, tick: int) -> None:
    for i in range(REGIONS):
        chunk = await world.chunk(i, 0)
        assert int(chunk.tiles[1, 1]) == tick + i, i


async def test_one_batch_across_more_regions_than_are_kept(tmp_path: Path) -> None:
    fs = await new_world(tmp_path)
    async with open_world(tmp_path, CONF, fs=fs) as world:
        with anyio.fail_after(30):
            await world.submit(edits(1))
        await assert_holds(world, 1)
        await world.flush()
        # Once clean, the bound applies again at the next install.
        await world.chunk(REGIONS + 5, 0)
        assert len(world._regions) <= KEPT


async def test_replay_of_more_regions_than_are_kept(tmp_path: Path) -> None:
    fs = await new_world(tmp_path)
    async with open_world(tmp_path, CONF, fs=fs) as world:
        await world.submit(edits(1))
        crashed = fs.durable_image()  # a power loss: only the journal holds them
    with anyio.fail_after(30):
        async with open_world(tmp_path, CONF, fs=crashed) as world:
            assert world.stats().replayed_deltas == REGIONS
            await assert_holds(world, 1)
