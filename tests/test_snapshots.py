"""Snapshots on a real directory: create, list, verify, find a good copy, rotate, restore."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from streamer.errors import SnapshotError, UnknownSnapshot
from streamer.format.checksum import hex64, xxh3
from streamer.format.journal import encode_frame
from streamer.format.manifest import MANIFEST_KEY, decode_manifest
from streamer.format.region import encode_region, region_key
from streamer.recovery.check import CheckReport
from streamer.recovery.incidents import IncidentLog
from streamer.recovery.lineage import write_lineage
from streamer.recovery.snapshots import (
    RESTORE_MARKER_KEY,
    create_snapshot,
    find_valid_copy,
    finish_interrupted_restore,
    is_valid_snapshot,
    list_snapshots,
    restore_snapshot,
    scan_snapshots,
    snapshot_check,
    snapshot_file_key,
    stage_copies,
    verify_snapshot,
    world_keys,
)
from streamer.storage.base import BlobStore
from streamer.storage.local import LocalStore
from streamer.storage.memory import MemoryStore
from streamer.worlddir import create_world

JOURNAL = "journal/00000000000000000001.wal"


def region_bytes(rx: int, ry: int, tick: int, payload: bytes = b"edits") -> bytes:
    return encode_region(
        rx=rx,
        ry=ry,
        last_processed_tick=tick,
        generation=tick,
        writer="test",
        encoding="msgpack",
        chunks={(rx * 8, ry * 8): payload + tick.to_bytes(4, "little")},
        region_size=8,
        written_at=1.0,
    )


async def make_world(
    store: BlobStore, regions: dict[tuple[int, int], int] | None = None
) -> dict[str, bytes]:
    await create_world(store, seed=7)
    for (rx, ry), tick in (regions or {(0, 0): 10, (1, 0): 20, (-1, 2): 5}).items():
        await store.put_atomic(region_key(rx, ry), region_bytes(rx, ry, tick))
    await store.put_atomic(JOURNAL, b"unfolded journal records")
    await store.put_atomic("players.idx", b"player index")
    await store.put_atomic("state/inactive.json", b"{}")
    return await world_state(store)


async def world_state(store: BlobStore) -> dict[str, bytes]:
    keys = await world_keys(store)
    return {k: b.data for k, b in zip(keys, await store.get_many(keys), strict=True) if b}


async def snapshot_state(store: BlobStore, sid: str) -> dict[str, bytes]:
    prefix = snapshot_file_key(sid, "")
    keys = await store.list(prefix)
    return {
        k[len(prefix) :]: b.data for k, b in zip(keys, await store.get_many(keys), strict=True) if b
    }


def corrupt_file(root: Path, key: str) -> None:
    """A changed file in a new inode (a tool that rewrote it)."""
    path = root / key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    tmp = path.with_name(path.name + ".rot")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)


@pytest.fixture
async def store(tmp_path):
    async with await LocalStore.open(tmp_path) as s:
        yield s


async def test_create_list_verify(store):
    state = await make_world(store)
    info = await create_snapshot(store, keep=5)
    assert info.reason == "manual" and not info.raw
    manifest = decode_manifest(state[MANIFEST_KEY])
    assert info.record_versions == manifest.record_versions
    assert info.world_id == manifest.world_id
    assert info.last_processed_tick == {
        region_key(0, 0): 10,
        region_key(1, 0): 20,
        region_key(-1, 2): 5,
    }
    assert {f.key for f in info.files} == set(state) and JOURNAL in state
    assert info.total_bytes == sum(len(v) for v in state.values())
    assert await snapshot_state(store, info.id) == state
    assert [s.id for s in await list_snapshots(store)] == [info.id]
    assert await verify_snapshot(store, info.id) == []
    assert await is_valid_snapshot(store, info)
    assert info.created_at.endswith("Z") and info.created_at[:4] == info.id[:4]


def rot_in_place(root: Path, key: str) -> None:
    """Bit rot inside the file's own inode, as the medium would do it: every hard link to
    that inode sees it."""
    with open(root / key, "r+b") as f:
        f.seek(os.path.getsize(root / key) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))


def reseal(path: Path, body: dict[str, object]) -> None:
    """Rewrite ``snapshot.json`` with ``body`` and a matching checksum."""
    body.pop("checksum", None)
    body["checksum"] = hex64(xxh3(msgspec.json.Encoder(order="sorted").encode(body)))
    path.write_bytes(msgspec.json.encode(body))


def inode(root: Path, key: str) -> int:
    return os.stat(root / key).st_ino


async def test_copies_never_share_an_inode_with_the_world(store, tmp_path):
    state = await make_world(store)
    first = await create_snapshot(store, keep=5)
    assert all(f.own for f in first.files)
    for key in state:
        assert inode(tmp_path, key) != inode(tmp_path, snapshot_file_key(first.id, key)), key
    # A second snapshot shares the first one's copies of unchanged regions, and only those.
    changed = region_key(1, 0)
    await store.put_atomic(changed, region_bytes(1, 0, 21))
    second = await create_snapshot(store, keep=5)
    for key in state:
        mine = inode(tmp_path, snapshot_file_key(second.id, key))
        assert mine != inode(tmp_path, key), key
        shared = mine == inode(tmp_path, snapshot_file_key(first.id, key))
        assert shared == (key.startswith("regions/") and key != changed), key
    assert await verify_snapshot(store, second.id) == []


async def test_bit_rot_in_a_world_file_leaves_its_snapshot_copies_intact(store, tmp_path):
    state = await make_world(store)
    await create_snapshot(store, keep=5)
    newest = await create_snapshot(store, keep=5)
    key = region_key(0, 0)
    rot_in_place(tmp_path, key)
    assert await verify_snapshot(store, newest.id) == []
    assert await find_valid_copy(store, key) == (newest.id, state[key])
    await restore_snapshot(store, newest.id, keep=5)
    assert (await store.get(key)).data == state[key]
    # The restored file is a copy too: rot in it again spares the snapshot.
    assert inode(tmp_path, key) != inode(tmp_path, snapshot_file_key(newest.id, key))


async def test_a_damaged_earlier_copy_is_not_shared_by_the_next_snapshot(store, tmp_path):
    state = await make_world(store)
    first = await create_snapshot(store, keep=5)
    key = region_key(-1, 2)
    rot_in_place(tmp_path, snapshot_file_key(first.id, key))
    second = await create_snapshot(store, keep=5)
    assert await verify_snapshot(store, second.id) == []
    assert (await store.get(snapshot_file_key(second.id, key))).data == state[key]
    assert [p.file for p in await verify_snapshot(store, first.id)] == [
        snapshot_file_key(first.id, key)
    ]


async def test_copies_of_older_snapshots_linked_to_the_world_are_not_reused(store, tmp_path):
    """Snapshots made before copies were their own hard-linked region files to the world's
    (no ``own`` flag): the next snapshot copies those regions rather than link to them."""
    await make_world(store)
    old = await create_snapshot(store, keep=5)
    manifest = f"snapshots/{old.id}/snapshot.json"
    legacy = msgspec.json.decode((tmp_path / manifest).read_bytes())
    for f in legacy["files"]:
        f.pop("own")
        if f["key"].startswith("regions/"):
            os.unlink(tmp_path / snapshot_file_key(old.id, f["key"]))
            os.link(tmp_path / f["key"], tmp_path / snapshot_file_key(old.id, f["key"]))
    legacy["checksum"] = ""
    reseal(tmp_path / manifest, legacy)
    assert not any(f.own for f in (await list_snapshots(store))[0].files)
    new = await create_snapshot(store, keep=5)
    for key in (region_key(0, 0), region_key(1, 0), region_key(-1, 2)):
        assert inode(tmp_path, snapshot_file_key(new.id, key)) != inode(tmp_path, key)


async def test_rotation_keeps_the_newest_and_sweeps_incomplete(store, tmp_path):
    await make_world(store)
    leftover = "snapshots/20000101T000000000000Z-abcdef/files/regions/r.0.0.region"
    await store.put_atomic(leftover, b"half a snapshot")
    ids = [(await create_snapshot(store, keep=3)).id for _ in range(5)]
    assert ids == sorted(ids)
    assert [s.id for s in await list_snapshots(store)] == ids[:1:-1]
    scan = await scan_snapshots(store)
    assert scan.incomplete == [] and scan.damaged == {}
    # Deleted snapshots leave no empty directories behind either.
    assert sorted(os.listdir(tmp_path / "snapshots")) == sorted([*ids[2:], "lineage.json"])


async def test_corrupt_source_region_is_refused(store, tmp_path):
    await make_world(store)
    before = await store.list("snapshots/")
    corrupt_file(tmp_path, region_key(1, 0))
    with pytest.raises(SnapshotError, match=r"regions/r\.1\.0\.region"):
        await create_snapshot(store, keep=5)
    assert await store.list("snapshots/") == before


async def test_corrupt_copy_is_detected_and_an_older_copy_found(store, tmp_path):
    await make_world(store)
    old = await create_snapshot(store, keep=5)
    key = region_key(0, 0)
    await store.put_atomic(key, region_bytes(0, 0, 11))
    new = await create_snapshot(store, keep=5)
    assert await find_valid_copy(store, key) == (new.id, region_bytes(0, 0, 11))

    corrupt_file(tmp_path, snapshot_file_key(new.id, key))
    problems = await verify_snapshot(store, new.id)
    assert [p.file for p in problems] == [snapshot_file_key(new.id, key)]
    assert problems[0].kind == "checksum"
    assert await find_valid_copy(store, key) == (old.id, region_bytes(0, 0, 10))
    # Unaffected files still come from the newest snapshot.
    assert (await find_valid_copy(store, MANIFEST_KEY) or ("", b""))[0] == new.id
    assert await find_valid_copy(store, region_key(9, 9)) is None

    (tmp_path / snapshot_file_key(old.id, key)).unlink()
    assert await find_valid_copy(store, key) is None
    assert any(p.kind == "missing" for p in await verify_snapshot(store, old.id))


async def test_damaged_snapshot_json_is_reported(store, tmp_path):
    await make_world(store)
    info = await create_snapshot(store, keep=5)
    corrupt_file(tmp_path, f"snapshots/{info.id}/snapshot.json")
    scan = await scan_snapshots(store)
    assert scan.snapshots == [] and info.id in scan.damaged
    assert (await verify_snapshot(store, info.id))[0].kind in {"checksum", "malformed"}
    with pytest.raises(UnknownSnapshot):
        await verify_snapshot(store, "nope")


async def test_restore_makes_the_world_byte_identical(store, tmp_path):
    original = await make_world(store)
    target = await create_snapshot(store, keep=5)
    # Change everything a restore has to undo.
    await store.put_atomic(region_key(0, 0), region_bytes(0, 0, 99))
    await store.delete(region_key(1, 0))
    await store.put_atomic(region_key(5, 5), region_bytes(5, 5, 1))
    await store.put_atomic("journal/00000000000000000002.wal", b"newer segment")
    await store.put_atomic("state/inactive.json", b'{"r": 1}')
    await store.put_atomic("state/extra.json", b"x")
    changed = await world_state(store)

    result = await restore_snapshot(store, target.id, keep=5)
    assert await world_state(store) == original == await snapshot_state(store, target.id)
    assert await store.list(RESTORE_MARKER_KEY) == []
    assert result.snapshot == target.id and not result.pre_restore_raw
    pre = next(s for s in await list_snapshots(store) if s.id == result.pre_restore)
    assert pre.reason == "pre-restore"
    assert await snapshot_state(store, pre.id) == changed
    incidents = (await IncidentLog(store).read()).incidents
    assert [i.kind for i in incidents] == ["restored_from_snapshot"]
    assert incidents[0].details["snapshot"] == target.id
    assert incidents[0].details["pre_restore_snapshot"] == pre.id
    # Copied back, never linked: the world's files stay apart from the snapshot's.
    for key in original:
        assert inode(tmp_path, key) != inode(tmp_path, snapshot_file_key(target.id, key)), key
    assert await finish_interrupted_restore(store) is None


async def test_restore_with_corrupt_current_files_keeps_them_raw(store, tmp_path):
    original = await make_world(store)
    target = await create_snapshot(store, keep=5)
    await store.put_atomic(region_key(1, 0), region_bytes(1, 0, 21))
    corrupt_file(tmp_path, region_key(1, 0))
    damaged = (tmp_path / region_key(1, 0)).read_bytes()

    result = await restore_snapshot(store, target.id, keep=5)
    assert result.pre_restore_raw
    assert await world_state(store) == original
    pre = next(s for s in await list_snapshots(store) if s.id == result.pre_restore)
    assert pre.raw and pre.damaged_files == [region_key(1, 0)]
    assert (await snapshot_state(store, pre.id))[region_key(1, 0)] == damaged
    # Stored as copied, so it verifies at the storage level, but it is never restorable...
    assert await verify_snapshot(store, pre.id) == []
    assert not await is_valid_snapshot(store, pre)
    with pytest.raises(SnapshotError, match="raw"):
        await restore_snapshot(store, pre.id, keep=5)
    # ...and serves no copies: the world no longer descends from it (recovery/lineage.py).
    assert await find_valid_copy(store, region_key(1, 0)) == (target.id, original[region_key(1, 0)])
    assert (await find_valid_copy(store, region_key(0, 0)) or ("", b""))[0] == target.id
    # Were it an ancestor (a restore that crashed before committing), its damaged file would
    # still never be served, while its intact files would.
    await write_lineage(store, [pre.id, target.id])
    assert await find_valid_copy(store, region_key(1, 0)) == (target.id, original[region_key(1, 0)])
    assert (await find_valid_copy(store, region_key(0, 0)) or ("", b""))[0] == pre.id


async def test_restore_refuses_unknown_and_damaged_snapshots(store, tmp_path):
    await make_world(store)
    a = await create_snapshot(store, keep=5)
    with pytest.raises(UnknownSnapshot) as err:
        await restore_snapshot(store, "20990101T000000000000Z-000000", keep=5)
    assert err.value.available == [a.id] and a.id in str(err.value)
    corrupt_file(tmp_path, snapshot_file_key(a.id, JOURNAL))
    before = await world_state(store)
    with pytest.raises(SnapshotError, match="failed verification"):
        await restore_snapshot(store, a.id, keep=5)
    assert await world_state(store) == before
    assert len(await list_snapshots(store)) == 1  # no pre-restore snapshot for nothing


async def test_restore_never_rotates_its_target_away(store):
    original = await make_world(store)
    oldest = await create_snapshot(store, keep=2)
    await store.put_atomic(region_key(0, 0), region_bytes(0, 0, 50))
    await create_snapshot(store, keep=2)
    result = await restore_snapshot(store, oldest.id, keep=2)
    ids = [s.id for s in await list_snapshots(store)]
    assert ids == [result.pre_restore, oldest.id]
    assert await world_state(store) == original


async def test_snapshot_refused_while_a_restore_is_pending(store):
    await make_world(store)
    await store.put_atomic(RESTORE_MARKER_KEY, b"{}")
    with pytest.raises(SnapshotError, match="interrupted restore"):
        await create_snapshot(store, keep=5)
    with pytest.raises(SnapshotError, match="marker is damaged"):
        await finish_interrupted_restore(store)


async def test_memory_store_round_trip():
    store = MemoryStore()
    original = await make_world(store)
    a = await create_snapshot(store, keep=2)
    await store.put_atomic(region_key(0, 0), region_bytes(0, 0, 77))
    await store.delete(JOURNAL)
    b = await create_snapshot(store, keep=2)
    await create_snapshot(store, keep=2)
    assert a.id not in [s.id for s in await list_snapshots(store)]
    assert await find_valid_copy(store, region_key(0, 0)) is not None
    await restore_snapshot(store, b.id, keep=2)
    state = await world_state(store)
    assert JOURNAL not in state and state[region_key(0, 0)] == region_bytes(0, 0, 77)
    assert {k: v for k, v in state.items() if k != region_key(0, 0)} == {
        k: v for k, v in original.items() if k not in (region_key(0, 0), JOURNAL)
    }


async def test_snapshot_check(store, tmp_path):
    await make_world(store)
    manifest = decode_manifest((await store.get(MANIFEST_KEY)).data)
    report = CheckReport(world="w")
    await snapshot_check(1)(store, manifest, report)
    assert report.problems == [] and any("0 valid snapshot" in w for w in report.warnings)

    a = await create_snapshot(store, keep=5)
    report = CheckReport(world="w")
    await snapshot_check(1)(store, manifest, report)
    assert report.problems == [] and report.warnings == []

    corrupt_file(tmp_path, snapshot_file_key(a.id, region_key(0, 0)))
    report = CheckReport(world="w")
    await snapshot_check(1)(store, manifest, report)
    assert [p.file for p in report.problems] == [snapshot_file_key(a.id, region_key(0, 0))]
    assert any("fewer than the minimum of 1" in w for w in report.warnings)


async def test_rotation_never_trades_a_valid_snapshot_for_a_damaged_one(store, tmp_path):
    """keep=1, valid A and a newer B whose snapshot.json is damaged: a new snapshot whose copy
    fails must leave A in place; one that succeeds replaces B first, never A before it."""
    from unittest import mock

    from streamer.errors import StorageUnavailable
    from streamer.recovery import snapshots

    await make_world(store)
    a = await create_snapshot(store, keep=5)
    b = await create_snapshot(store, keep=5)
    corrupt_file(tmp_path, f"snapshots/{b.id}/snapshot.json")

    async def failing_copy(*args, **kwargs):
        raise StorageUnavailable("disk full", key="snapshots/x")

    with mock.patch.object(snapshots, "_copy_into", failing_copy):
        with pytest.raises(StorageUnavailable):
            await create_snapshot(store, keep=1)
    scan = await scan_snapshots(store)
    assert scan.ids == [a.id]  # the damaged one made room; the valid one survived
    assert await verify_snapshot(store, a.id) == []

    c = await create_snapshot(store, keep=1)
    assert (await scan_snapshots(store)).ids == [c.id]


async def test_a_preallocated_segment_is_copied_without_its_zero_padding(store):
    await make_world(store)
    frames = encode_frame(b"batch one") + encode_frame(b"batch two")
    live = "journal/00000000000000000003.wal"  # the newest: a live, preallocated segment
    await store.put_atomic(live, frames + bytes(64 * 1024))
    torn = "journal/00000000000000000002.wal"
    await store.put_atomic(torn, frames + b"\x01" + bytes(100))  # not padding: kept whole
    info = await create_snapshot(store, keep=5)
    sizes = {f.key: f.size for f in info.files}
    assert sizes[live] == len(frames)
    assert sizes[torn] == len(frames) + 101
    copied = await snapshot_state(store, info.id)
    assert copied[live] == frames
    assert await verify_snapshot(store, info.id) == []
    await restore_snapshot(store, info.id, keep=5)
    assert (await store.get(live)).data == frames


async def test_an_older_segments_zero_tail_is_copied_as_it_is(store):
    """Zeros at the end of an older segment are acknowledged frames gone: the snapshot keeps
    them, so a world restored from it shows the damage as the original does."""
    await make_world(store)
    older = "journal/00000000000000000001.wal"
    newer = "journal/00000000000000000002.wal"
    damaged = encode_frame(b"a") + encode_frame(b"b") + bytes(8192)
    await store.put_atomic(older, damaged)
    await store.put_atomic(newer, encode_frame(b"c"))
    info = await create_snapshot(store, keep=5)
    assert (await snapshot_state(store, info.id))[older] == damaged
    await restore_snapshot(store, info.id, keep=5)
    assert (await store.get(older)).data == damaged


async def test_staged_copies_are_linked_by_the_snapshot_then_removed(store, tmp_path):
    """A running world copies ahead (``stage_copies``) so its pause only links."""
    state = await make_world(store)
    first = await create_snapshot(store, keep=5)
    assert await stage_copies(store) == 0  # every region already has an own copy
    changed, rotted = region_key(1, 0), region_key(-1, 2)
    await store.put_atomic(changed, region_bytes(1, 0, 21))
    await store.put_atomic(rotted, region_bytes(-1, 2, 6))
    assert await stage_copies(store) == 2
    staged = {
        k.rsplit(".", 1)[0].removeprefix("snapshots/.staging/"): k
        for k in await store.list("snapshots/.staging/")
    }
    assert sorted(staged) == sorted([changed, rotted])
    ahead = inode(tmp_path, staged[changed])
    rot_in_place(tmp_path, staged[rotted])  # a bad staged copy is not used
    late = region_key(0, 0)
    await store.put_atomic(late, region_bytes(0, 0, 12))  # changed after staging
    # Leftovers are not snapshots: nothing lists, trims or checks them as one.
    assert [s.id for s in await list_snapshots(store)] == [first.id]
    second = await create_snapshot(store, keep=5)
    assert inode(tmp_path, snapshot_file_key(second.id, changed)) == ahead
    assert await verify_snapshot(store, second.id) == []
    held = await snapshot_state(store, second.id)
    assert held[late] == region_bytes(0, 0, 12) and held[rotted] == region_bytes(-1, 2, 6)
    assert await store.list("snapshots/.staging/") == []
    for key in state:
        assert inode(tmp_path, key) != inode(tmp_path, snapshot_file_key(second.id, key)), key
