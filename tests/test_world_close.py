"""Closing a world whose final flush fails still makes the journal durable."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from streamer import TileSet, open_world
from streamer.config import Config, RuntimeSettings
from streamer.errors import StorageUnavailable
from streamer.storage.faultfs import SimulatedFileSystem
from tests.test_world_lifecycle import new_world, tile

INTERVAL = Config(
    runtime=RuntimeSettings(
        flush_interval_ms=600_000, durability="interval", fsync_interval_ms=60_000
    )
)


async def test_failed_final_flush_still_fsyncs_and_closes_the_journal(tmp_path: Path) -> None:
    """In "interval" mode a submit returns before its fsync. If the final flush then fails,
    close must still drain and fsync the journal: the delta comes back at the next open."""
    fs = SimulatedFileSystem()
    await new_world(tmp_path, fs)
    world = open_world(tmp_path, INTERVAL, fs=fs)
    with pytest.raises(StorageUnavailable):
        async with world:
            await world.submit([TileSet(tick=1, x=5, y=5, tile=55)])
            fs.inject("replace", errno.EIO, path_contains="regions/", once=False)
    fs.clear_faults()
    async with open_world(tmp_path, INTERVAL, fs=fs.durable_image()) as again:
        assert await tile(again, 5, 5) == 55
