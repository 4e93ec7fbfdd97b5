"""Journal segment numbers never reuse one the drops record still lists as pending.

A clean close leaves the last deleted segments pending in ``state/journal_drops.json``;
the next open settles them. If that write failed, the record kept them pending, numbering
restarted at 1, and a new segment with a pending number read as "still on disk" at the
following open: the deletion was forgotten and a later restore judged nothing lost.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from streamer import RegionRestored, TileSet, open_world
from streamer.config import Config, RuntimeSettings, ScrubSettings, StorageSettings
from streamer.errors import StorageUnavailable
from streamer.format.region import region_key
from streamer.recovery.incidents import IncidentLog
from streamer.runtime import journal_drops
from streamer.runtime.journal_drops import read_drops
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world
from tests.test_world_recovery import next_event

CFG = Config(
    runtime=RuntimeSettings(flush_interval_ms=60_000, journal_segment_bytes=4096),
    storage=StorageSettings(fsync=False),
    scrub=ScrubSettings(interval_s=0),
)


def rot(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tmp = path.with_name("rot")
    tmp.write_bytes(bytes(data))
    tmp.replace(path)


async def test_a_pending_segment_number_is_not_reused_when_its_record_is_not_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = tmp_path / "w"
    store = await LocalStore.open(live, fsync=False)
    await create_world(store, seed=23)
    await store.aclose()
    async with open_world(live, CFG) as world:
        await world.submit([TileSet(tick=1, x=1, y=1, tile=11)])
        await world.snapshot()
        await world.submit([TileSet(tick=2, x=2, y=1, tile=22)])
    store = await LocalStore.open(live, fsync=False)
    record = await read_drops(store)
    assert record is not None
    pending = [p.seq for p in record.pending]
    await store.aclose()
    assert pending  # the flush at close deleted the segment holding tick 2

    real_open = journal_drops.DropLog.open

    async def open_unwritable(self: journal_drops.DropLog, on_disk: object) -> None:
        async def refuse(key: str, data: bytes) -> str:
            raise StorageUnavailable("no space left (simulated)", key=key)

        monkeypatch.setattr(self._store, "put_atomic", refuse)
        try:
            await real_open(self, on_disk)  # type: ignore[arg-type]
        finally:
            monkeypatch.undo()

    monkeypatch.setattr(journal_drops.DropLog, "open", open_unwritable)
    async with open_world(live, CFG) as world:
        monkeypatch.setattr(journal_drops.DropLog, "open", real_open)
        for t in range(3, 40):  # another region pins every segment it writes
            await world.submit([TileSet(tick=t, x=600 + i, y=1, tile=5) for i in range(60)])
        await world.submit([TileSet(tick=40, x=3, y=1, tile=33)])
        numbers = sorted(int(p.stem) for p in (live / "journal").glob("*.wal"))
        assert min(numbers) > max(pending)
        crashed = tmp_path / "crashed"
        shutil.copytree(live, crashed, ignore=shutil.ignore_patterns(".lock"))
    rot(crashed / region_key(0, 0))
    async with open_world(crashed, CFG) as world:
        async with world.events() as events:
            chunk = await world.chunk(0, 0)
            restored = await next_event(events, RegionRestored)
    assert isinstance(restored, RegionRestored) and "1 < t <= 2" in restored.lost
    assert int(chunk.tiles[1, 3]) == 33  # still in the journal: re-applied
    store = await LocalStore.open(crashed, fsync=False)
    kinds = [i.kind for i in (await IncidentLog(store).read()).incidents]
    await store.aclose()
    assert "data_loss" in kinds
