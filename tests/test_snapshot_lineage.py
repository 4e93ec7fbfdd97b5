"""Only snapshots the world descends from serve copies to the recovery ladder.

After a restore (or a failed migration's rollback) and after a regenerate, the snapshots
taken in between hold a state the operator abandoned; a region restored from one would
bring it back and hide what was acknowledged since (recovery/lineage.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from streamer.format.manifest import decode_manifest
from streamer.format.region import region_key
from streamer.recovery.check import CheckReport
from streamer.recovery.incidents import IncidentLog
from streamer.recovery.lineage import LINEAGE_KEY, read_lineage
from streamer.recovery.rebuild import regenerate_world
from streamer.recovery.snapshots import (
    create_snapshot,
    current_lineage,
    find_valid_copy,
    list_snapshots,
    restore_snapshot,
    snapshot_check,
)
from streamer.storage.local import LocalStore
from tests.test_snapshots import make_world, region_bytes

KEY = region_key(0, 0)


@pytest.fixture
async def store(tmp_path):
    async with await LocalStore.open(tmp_path) as s:
        yield s


async def put_region(store: LocalStore, tick: int) -> bytes:
    data = region_bytes(0, 0, tick)
    await store.put_atomic(KEY, data)
    return data


async def test_each_snapshot_descends_from_the_ones_before(store):
    await make_world(store)
    a = await create_snapshot(store, keep=5)
    b = await create_snapshot(store, keep=5)
    assert a.ancestors == [] and b.ancestors == [a.id]
    assert await read_lineage(store) == [b.id, a.id]


async def test_after_a_restore_the_abandoned_snapshots_serve_no_copies(store):
    await make_world(store)
    kept = await put_region(store, 1)
    s1 = await create_snapshot(store, keep=5)
    await put_region(store, 5)
    abandoned = await create_snapshot(store, keep=5)  # the state the operator rolls back
    result = await restore_snapshot(store, s1.id, keep=5)
    assert await read_lineage(store) == [s1.id]
    # Newest first, the pre-restore and the abandoned snapshot both hold tick 5: skipped.
    ids = [s.id for s in await list_snapshots(store)]
    assert ids[:3] == [result.pre_restore, abandoned.id, s1.id]
    assert await find_valid_copy(store, KEY) == (s1.id, kept)
    # A snapshot of the new timeline descends from s1 and is preferred.
    newer = await put_region(store, 2)
    s3 = await create_snapshot(store, keep=5)
    assert s3.ancestors == [s1.id]
    assert await find_valid_copy(store, KEY) == (s3.id, newer)


async def test_restoring_back_to_an_abandoned_state_makes_it_the_ancestor_again(store):
    await make_world(store)
    await put_region(store, 1)
    s1 = await create_snapshot(store, keep=5)
    later = await put_region(store, 5)
    s2 = await create_snapshot(store, keep=5)
    pre = (await restore_snapshot(store, s1.id, keep=5)).pre_restore
    assert pre is not None
    await restore_snapshot(store, s2.id, keep=10)  # the operator changes their mind
    assert await read_lineage(store) == [s2.id, s1.id]
    assert await find_valid_copy(store, KEY) == (s2.id, later)


async def test_after_a_regenerate_no_earlier_snapshot_serves_copies(store):
    await make_world(store)
    await create_snapshot(store, keep=5)
    manifest = decode_manifest((await store.get("world.json")).data)
    await regenerate_world(store, manifest, incidents=IncidentLog(store), keep=5)
    assert await read_lineage(store) == []
    assert await find_valid_copy(store, "world.json") is None
    fresh = await create_snapshot(store, keep=5)
    assert fresh.ancestors == []
    assert (await find_valid_copy(store, "world.json") or ("",))[0] == fresh.id


async def test_a_world_without_lineage_counts_every_snapshot(store):
    """Worlds snapshotted before lineage was recorded keep the old rule."""
    await make_world(store)
    await put_region(store, 1)
    a = await create_snapshot(store, keep=5)
    newest = await put_region(store, 5)
    b = await create_snapshot(store, keep=5)
    await store.delete(LINEAGE_KEY)
    assert await find_valid_copy(store, KEY) == (b.id, newest)
    c = await create_snapshot(store, keep=5)
    assert c.ancestors == [b.id, a.id]


def damage_lineage(root: Path) -> None:
    path = root / LINEAGE_KEY
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


async def test_a_damaged_lineage_is_rebuilt_from_the_last_restore(store, tmp_path, caplog):
    await make_world(store)
    kept = await put_region(store, 1)
    s1 = await create_snapshot(store, keep=5)
    await put_region(store, 5)
    await create_snapshot(store, keep=5)  # abandoned by the restore below
    await restore_snapshot(store, s1.id, keep=5)
    damage_lineage(tmp_path)
    with caplog.at_level(logging.ERROR, logger="streamer.recovery.snapshots"):
        assert await find_valid_copy(store, KEY) == (s1.id, kept)
    assert any("lineage rebuilt" in r.getMessage() for r in caplog.records)
    report = CheckReport(world="w")
    await snapshot_check(1)(store, decode_manifest((await store.get("world.json")).data), report)
    assert any("snapshots/lineage.json is damaged" in w for w in report.warnings)
    # A snapshot taken since the restore decides, and the next snapshot rewrites the file.
    s3 = await create_snapshot(store, keep=10)
    assert s3.ancestors == [s1.id] and await read_lineage(store) == [s3.id, s1.id]
    damage_lineage(tmp_path)
    assert await current_lineage(store) == [s3.id, s1.id]


async def test_a_damaged_lineage_after_a_regenerate_serves_nothing(store, tmp_path):
    await make_world(store)
    await create_snapshot(store, keep=5)
    manifest = decode_manifest((await store.get("world.json")).data)
    await regenerate_world(store, manifest, incidents=IncidentLog(store), keep=5)
    damage_lineage(tmp_path)
    assert await current_lineage(store) == []
    assert await find_valid_copy(store, "world.json") is None


async def test_a_copy_above_the_damaged_files_tick_is_never_served(store):
    """Whatever the lineage says: a region's tick only grows along its history."""
    await make_world(store)
    low = await put_region(store, 1)
    s1 = await create_snapshot(store, keep=5)
    await put_region(store, 50)
    await create_snapshot(store, keep=5)
    assert await find_valid_copy(store, KEY, tick_at_most=10) == (s1.id, low)
    assert await find_valid_copy(store, KEY, tick_at_most=0) is None


async def test_the_rebuild_orders_by_snapshot_ids_not_by_a_clock_that_stepped_back(
    store, tmp_path, monkeypatch
):
    import streamer.recovery.incidents as incidents_module

    await make_world(store)
    kept = await put_region(store, 1)
    s1 = await create_snapshot(store, keep=5)
    await put_region(store, 5)
    # The clock stepped back: the restore's incident is stamped before every snapshot.
    monkeypatch.setattr(
        incidents_module,
        "_id_and_time",
        lambda: ("20000101T000000000000Z-abcdef", "2000-01-01T00:00:00.000000Z"),
    )
    await restore_snapshot(store, s1.id, keep=5)
    monkeypatch.undo()
    damage_lineage(tmp_path)
    assert await current_lineage(store) == [s1.id]
    assert await find_valid_copy(store, KEY) == (s1.id, kept)
