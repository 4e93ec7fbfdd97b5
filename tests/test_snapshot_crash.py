"""Power loss at every mutating file-system step of snapshot creation, rotation and restore.

Each run starts from the same durable world on a ``SimulatedFileSystem``, crashes before
step k (for every k), reboots from the durable image only (``LocalStore.open`` sweeps temp
files) and checks the promises:

- never zero valid snapshots when there was at least one before;
- never more than ``keep + 1`` complete snapshots;
- every complete snapshot verifies and holds exactly the world it was taken of;
- the world itself is never changed by taking a snapshot;
- a restore is all or nothing: after ``finish_interrupted_restore`` the world is exactly the
  target snapshot once the redo marker was durable, and untouched before.
"""

from __future__ import annotations

import pytest

from streamer.format.region import region_key
from streamer.recovery.incidents import IncidentLog
from streamer.recovery.lineage import read_lineage
from streamer.recovery.snapshots import (
    RESTORE_MARKER_KEY,
    create_snapshot,
    finish_interrupted_restore,
    restore_snapshot,
    scan_snapshots,
    stage_copies,
    verify_snapshot,
)
from streamer.storage.faultfs import SimulatedCrash, SimulatedFileSystem
from streamer.storage.local import LocalStore
from tests.test_snapshots import make_world, region_bytes, snapshot_state, world_state

ROOT = "/sim"
KEEP = 2


async def build_base() -> tuple[SimulatedFileSystem, dict[str, dict[str, bytes]], dict[str, bytes]]:
    """A world with KEEP complete snapshots of earlier states and one crash leftover."""
    fs = SimulatedFileSystem()
    store = await LocalStore.open(ROOT, fs=fs)
    expected: dict[str, dict[str, bytes]] = {}
    state = await make_world(store)
    for tick in (30, 40):
        expected[(await create_snapshot(store, keep=KEEP)).id] = state
        await store.put_atomic(region_key(0, 0), region_bytes(0, 0, tick))
        await store.put_atomic(f"journal/{tick:020d}.wal", b"segment %d" % tick)
        state = await world_state(store)
    await store.delete(region_key(-1, 2))
    state = await world_state(store)
    await store.put_atomic("snapshots/20000101T000000000000Z-dead00/files/players.idx", b"x")
    return fs.durable_image(), expected, state


async def check_snapshots(
    store: LocalStore, expected: dict[str, dict[str, bytes]], current: dict[str, bytes]
) -> None:
    scan = await scan_snapshots(store)
    assert scan.damaged == {}
    assert 1 <= len(scan.snapshots) <= KEEP + 1
    # The lineage names a new snapshot only once it is complete (a crash in between leaves
    # it out: one copy fewer to repair from). An incomplete one it names can only be an
    # older one that rotation was deleting (snapshot.json goes first): never served.
    lineage = await read_lineage(store) or []
    assert set(lineage) & set(scan.incomplete) <= set(expected)
    for info in scan.snapshots:
        assert await verify_snapshot(store, info.id) == [], info.id
        assert await snapshot_state(store, info.id) == expected.get(info.id, current), info.id


async def _take(store: LocalStore, staged: bool) -> None:
    """A snapshot as the CLI takes it, or as a running world does (copies staged first)."""
    if staged:
        await stage_copies(store)
    await create_snapshot(store, keep=KEEP)


@pytest.mark.parametrize("staged", [False, True], ids=["closed", "staged"])
async def test_crash_at_every_step_of_create_and_rotate(staged: bool) -> None:
    base, expected, current = await build_base()
    probe = base.durable_image()
    await _take(LocalStore(ROOT, fs=probe), staged)
    total = len(probe.ops)
    assert any(op.name == "link" for op in probe.ops)
    assert any(op.name == "rmdir" for op in probe.ops)  # rotation and the leftover sweep
    crashed = 0
    for k in range(total + 1):
        fs = base.durable_image()
        fs.crash_after(k)
        try:
            await _take(LocalStore(ROOT, fs=fs), staged)
        except SimulatedCrash:
            crashed += 1
        store = await LocalStore.open(ROOT, fs=fs.durable_image())
        await check_snapshots(store, expected, current)
        assert await world_state(store) == current
        # The next snapshot after the reboot cleans up whatever the crash left.
        await create_snapshot(store, keep=KEEP)
        scan = await scan_snapshots(store)
        assert len(scan.snapshots) == KEEP and scan.incomplete == []
        assert await store.list("snapshots/.staging/") == []
        await check_snapshots(store, expected, current)
    assert crashed == total > 50


async def _restore_base() -> tuple[SimulatedFileSystem, str, dict[str, bytes], dict[str, bytes]]:
    base, expected, current = await build_base()
    target = min(expected)  # the oldest: rotation must not take it
    return base, target, expected[target], current


async def test_crash_at_every_step_of_restore():
    base, target, target_state, current = await _restore_base()
    probe = base.durable_image()
    await restore_snapshot(LocalStore(ROOT, fs=probe), target, keep=KEEP)
    total = len(probe.ops)
    committed = 0
    for k in range(total + 1):
        fs = base.durable_image()
        fs.crash_after(k)
        done = True
        try:
            await restore_snapshot(LocalStore(ROOT, fs=fs), target, keep=KEEP)
        except SimulatedCrash:
            done = False
        assert done == (k >= total)
        store = await LocalStore.open(ROOT, fs=fs.durable_image())
        pending = RESTORE_MARKER_KEY in await store.list("state/")
        finished = await finish_interrupted_restore(store)
        assert (finished is not None) == pending
        state = await world_state(store)
        restored = [
            i
            for i in (await IncidentLog(store).read()).incidents
            if i.kind == "restored_from_snapshot"
        ]
        if pending or done:
            assert state == target_state, k
            committed += 1
        elif restored:
            # Crashed after the marker was already gone: the restore had completed.
            assert state == target_state, k
        else:
            assert state == current, k
        assert bool(restored) == (state == target_state)
        assert await verify_snapshot(store, target) == []
        scan = await scan_snapshots(store)
        assert target in scan.ids and len(scan.snapshots) <= KEEP + 1
        assert await store.list(RESTORE_MARKER_KEY) == []
    assert committed > 10


async def test_crash_at_every_step_of_finishing_an_interrupted_restore():
    base, target, target_state, current = await _restore_base()
    # Find a crash point inside the file replacement: the marker is durable, work remains.
    probe = base.durable_image()
    await restore_snapshot(LocalStore(ROOT, fs=probe), target, keep=KEEP)
    total = len(probe.ops)
    first_committed = None
    for k in range(total):
        fs = base.durable_image()
        fs.crash_after(k)
        try:
            await restore_snapshot(LocalStore(ROOT, fs=fs), target, keep=KEEP)
        except SimulatedCrash:
            pass
        image = fs.durable_image()
        if RESTORE_MARKER_KEY in await LocalStore(ROOT, fs=image).list("state/"):
            first_committed = k
            break
    assert first_committed is not None
    mid = first_committed + 1  # the marker is durable, no file replaced yet
    fs = base.durable_image()
    fs.crash_after(mid)
    try:
        await restore_snapshot(LocalStore(ROOT, fs=fs), target, keep=KEEP)
    except SimulatedCrash:
        pass
    interrupted = fs.durable_image()
    assert await world_state(LocalStore(ROOT, fs=interrupted)) == current

    probe2 = interrupted.durable_image()
    opened = await LocalStore.open(ROOT, fs=probe2)
    before = len(probe2.ops)
    assert await finish_interrupted_restore(opened) is not None
    steps = len(probe2.ops) - before
    for j in range(steps + 1):
        fs2 = interrupted.durable_image()
        store = await LocalStore.open(ROOT, fs=fs2)
        fs2.crash_after(j)
        try:
            await finish_interrupted_restore(store)
        except SimulatedCrash:
            pass
        again = await LocalStore.open(ROOT, fs=fs2.durable_image())
        await finish_interrupted_restore(again)
        assert await world_state(again) == target_state, j
        assert await again.list(RESTORE_MARKER_KEY) == []
        assert await verify_snapshot(again, target) == []
    assert steps > 10
