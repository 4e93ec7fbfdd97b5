"""incidents.log: round trip, torn tails at every offset, damaged lines, crash points."""

from __future__ import annotations

import random

import anyio
import msgspec
import pytest

from streamer.format.checksum import hex64, xxh3
from streamer.format.manifest import WorldManifest
from streamer.recovery.check import CheckReport
from streamer.recovery.incidents import (
    INCIDENTS_KEY,
    TORN_MARK,
    IncidentLog,
    check_incident_log,
)
from streamer.storage.base import BlobStore
from streamer.storage.faultfs import SimulatedCrash, SimulatedFileSystem
from streamer.storage.local import LocalStore
from streamer.storage.memory import MemoryStore


def sim_store(fs: SimulatedFileSystem | None = None) -> LocalStore:
    return LocalStore("/sim", fs=fs if fs is not None else SimulatedFileSystem())


def put_raw(fs: SimulatedFileSystem, data: bytes) -> None:
    h = fs.create(INCIDENTS_KEY)
    fs.write(h, data)
    fs.fsync(h)
    fs.close(h)
    fs.fsync_dir("")


async def record_three(log: IncidentLog) -> list[str]:
    a = await log.record(
        "checksum_failure",
        region=(0, -3),
        file="regions/r.0.-3.region",
        details={"expected": "00ff", "actual": "ff00", "tuple": (1, 2)},
        action="restored from snapshot",
    )
    b = await log.record("data_loss", details={"missing": ["characters"]}, action="reported")
    c = await log.record("scrub_alert", action="")
    return [a.id, b.id, c.id]


@pytest.mark.parametrize("kind", ["local", "memory"])
async def test_round_trip(tmp_path, kind):
    store: BlobStore = await LocalStore.open(tmp_path) if kind == "local" else MemoryStore()
    log = IncidentLog(store)
    assert (await log.read()).incidents == []
    ids = await record_three(log)
    scan = await log.read()
    assert [i.id for i in scan.incidents] == ids
    assert scan.damaged_lines == [] and not scan.torn_tail
    first = scan.incidents[0]
    assert first.kind == "checksum_failure"
    assert first.region == (0, -3)
    assert first.file == "regions/r.0.-3.region"
    assert first.details == {"expected": "00ff", "actual": "ff00", "tuple": [1, 2]}
    assert first.time.endswith("Z")
    # Each line is a self-verifying JSON object whose checksum covers everything else.
    data = (await store.get(INCIDENTS_KEY)).data
    for line in data.splitlines():
        obj = msgspec.json.decode(line)
        stored = obj.pop("checksum")
        assert stored == hex64(xxh3(msgspec.json.encode(obj, order="sorted")))
        assert set(obj) == {"id", "time", "kind", "region", "file", "details", "action"}


async def test_refuses_unknown_kind_and_unencodable_details():
    log = IncidentLog(MemoryStore())
    with pytest.raises(ValueError, match="unknown incident kind"):
        await log.record("checksum_failur")
    with pytest.raises(ValueError, match="JSON"):
        await log.record("data_loss", details={"x": object()})
    assert (await log.read()).incidents == []


async def test_torn_last_line_at_every_offset():
    fs = SimulatedFileSystem()
    log = IncidentLog(sim_store(fs))
    await record_three(log)
    full = fs.read(INCIDENTS_KEY)
    start = full.rstrip(b"\n").rfind(b"\n") + 1  # first byte of line 3
    last_len = len(full) - start
    checked = 0
    for cut in range(start + 1, len(full)):
        fs2 = SimulatedFileSystem()
        put_raw(fs2, full[:cut])
        log2 = IncidentLog(sim_store(fs2))
        scan = await log2.read()
        if cut == len(full) - 1:
            # Only the newline is missing: the line is complete and verifies.
            assert len(scan.incidents) == 3 and not scan.torn_tail
        else:
            assert scan.torn_tail, cut
            assert scan.damaged_lines == [3] and scan.torn_lines == [3]
            assert scan.lost_lines == []
            assert len(scan.incidents) == 2
        new = await log2.record("scrub_alert", details={"cut": cut})
        after = await log2.read()
        assert not after.torn_tail
        assert after.lost_lines == []
        assert [i.id for i in after.incidents[:2]] == [i.id for i in scan.incidents[:2]]
        assert after.incidents[-1] == new
        assert fs2.read(INCIDENTS_KEY).endswith(b"\n")
        checked += 1
    assert checked == last_len - 1


async def test_torn_tail_on_memory_store_is_terminated_before_the_next_append():
    store = MemoryStore()
    log = IncidentLog(store)
    await record_three(log)
    full = (await store.get(INCIDENTS_KEY)).data
    await store.put_atomic(INCIDENTS_KEY, full[:-10])
    assert (await log.read()).torn_tail
    await log.record("scrub_alert")
    scan = await log.read()
    assert len(scan.incidents) == 3 and scan.torn_lines == [3] and scan.lost_lines == []
    assert TORN_MARK in (await store.get(INCIDENTS_KEY)).data


async def test_damaged_middle_line_is_reported_and_later_lines_read():
    store = MemoryStore()
    log = IncidentLog(store)
    ids = await record_three(log)
    ids.append((await log.record("region_inactive", region=(2, 2))).id)
    lines = (await store.get(INCIDENTS_KEY)).data.split(b"\n")
    damaged = bytearray(lines[1])
    damaged[len(damaged) // 2] ^= 0x01
    lines[1] = bytes(damaged)
    await store.put_atomic(INCIDENTS_KEY, b"\n".join(lines))
    scan = await log.read()
    assert scan.damaged_lines == [2] and scan.lost_lines == [2]
    assert not scan.torn_tail and scan.torn_lines == []
    assert [i.id for i in scan.incidents] == [ids[0], ids[2], ids[3]]

    report = CheckReport(world="w")
    await check_incident_log(store, _manifest(), report)
    assert len(report.problems) == 1
    assert report.problems[0].file == INCIDENTS_KEY and "line(s) (2)" in report.problems[0].fault


async def test_check_treats_a_crash_fragment_as_a_warning():
    store = MemoryStore()
    log = IncidentLog(store)
    await record_three(log)
    data = (await store.get(INCIDENTS_KEY)).data
    await store.put_atomic(INCIDENTS_KEY, data[:-5])
    report = CheckReport(world="w")
    await check_incident_log(store, _manifest(), report)
    assert report.problems == []
    assert any("crash fragment" in w for w in report.warnings)


def _manifest() -> WorldManifest:
    return WorldManifest(
        world_id="w",
        seed=1,
        generator="g",
        generator_version=1,
        generator_params={},
        record_versions={},
        created_at=0.0,
    )


async def _record_until_crash(fs: SimulatedFileSystem, n: int) -> list[str]:
    log = IncidentLog(sim_store(fs))
    acked: list[str] = []
    try:
        for i in range(n):
            acked.append((await log.record("scrub_alert", details={"i": i})).id)
    except SimulatedCrash:
        pass
    return acked


async def test_crash_at_every_step_of_record():
    n = 3
    probe = SimulatedFileSystem()
    await _record_until_crash(probe, n)
    total = len(probe.ops)
    assert total == 3 * n + 1  # create once; write, fsync and fsync_dir per append
    points = 0
    for k in range(total + 1):
        for torn in (False, True):
            fs = SimulatedFileSystem()
            fs.crash_after(k)
            acked = await _record_until_crash(fs, n)
            assert (len(acked) == n) == (k >= total)
            image = fs.durable_image(torn=torn, rng=random.Random(k))
            log = IncidentLog(sim_store(image))
            scan = await log.read()
            ids = [i.id for i in scan.incidents]
            # Every acknowledged incident survives, in order; anything extra is the one
            # whose append was cut short (it may or may not have reached the disk).
            assert ids[: len(acked)] == acked, (k, torn)
            assert len(ids) <= len(acked) + 1
            assert scan.lost_lines == []
            again = await log.record("scrub_alert", details={"after": k})
            rescan = await log.read()
            assert rescan.incidents[-1] == again and rescan.lost_lines == []
            assert [i.id for i in rescan.incidents][: len(acked)] == acked
            points += 1
    assert points == 2 * (total + 1)


async def test_fsync_failure_is_not_acknowledged():
    fs = SimulatedFileSystem()
    log = IncidentLog(sim_store(fs))
    await log.record("scrub_alert")
    fs.inject("fsync", 5, path_contains=INCIDENTS_KEY)
    from streamer.errors import StorageUnavailable

    with pytest.raises(StorageUnavailable, match="incident"):
        await log.record("data_loss")
    assert len((await IncidentLog(sim_store(fs.durable_image())).read()).incidents) == 1


@pytest.mark.parametrize("op", ["write", "fsync"])
async def test_an_append_after_a_failed_one_survives_a_power_loss(op):
    """The failed line's bytes stay in the page cache (a failed sync leaves its pages clean,
    not on disk): the next append must not land after them, or a power loss leaves a hole
    and the acknowledged incident after it unreadable."""
    from streamer.errors import StorageUnavailable

    fs = SimulatedFileSystem()
    log = IncidentLog(sim_store(fs))
    first = await log.record("scrub_alert")
    fs.inject(op, 5, path_contains=INCIDENTS_KEY)
    with pytest.raises(StorageUnavailable, match="incident"):
        await log.record("data_loss")
    third = await log.record("region_inactive", region=(1, 2))
    for image in (fs.durable_image(), fs.durable_image(torn=True)):
        scan = await IncidentLog(sim_store(image)).read()
        assert [i.id for i in scan.incidents] == [first.id, third.id]
        assert scan.damaged_lines == []
    assert [i.id for i in (await log.read()).incidents] == [first.id, third.id]


@pytest.mark.parametrize("op", ["write", "fsync"])
async def test_a_failed_first_append_leaves_no_file_whose_name_is_not_durable(op):
    """The log's first append fails: the file it created goes, so the next append creates
    it again and syncs its directory entry (else that incident vanishes with the name)."""
    from streamer.errors import StorageUnavailable

    fs = SimulatedFileSystem()
    log = IncidentLog(sim_store(fs))
    fs.inject(op, 5, path_contains=INCIDENTS_KEY)
    with pytest.raises(StorageUnavailable, match="incident"):
        await log.record("data_loss")
    assert not fs.exists(INCIDENTS_KEY)
    second = await log.record("scrub_alert")
    scan = await IncidentLog(sim_store(fs.durable_image())).read()
    assert [i.id for i in scan.incidents] == [second.id]


async def test_a_failed_directory_sync_does_not_leave_the_next_incident_nameless():
    """The first append's directory sync fails (the line is written and synced, the name is
    not durable): the next append must still make the name durable."""
    from streamer.errors import StorageUnavailable

    fs = SimulatedFileSystem()
    log = IncidentLog(sim_store(fs))
    fs.inject("fsync_dir", 5)
    with pytest.raises(StorageUnavailable, match="incident"):
        await log.record("data_loss")
    second = await log.record("scrub_alert")
    ids = [i.id for i in (await IncidentLog(sim_store(fs.durable_image())).read()).incidents]
    assert ids[-1] == second.id


async def test_an_unreadable_log_is_never_taken_for_a_missing_one(monkeypatch):
    """Only "no such file" means a new log: any other error reading its size fails the
    append and leaves the log alone (a failed append of a file taken as new removes it)."""
    from streamer.errors import StorageUnavailable

    fs = SimulatedFileSystem()
    log = IncidentLog(sim_store(fs))
    first = await log.record("scrub_alert")
    real_size = SimulatedFileSystem.size

    def failing_size(self: SimulatedFileSystem, path: str) -> int:
        if path == INCIDENTS_KEY:
            raise OSError(5, "Input/output error", path)
        return real_size(self, path)

    # As os.path.exists does on a stat error (EIO, EACCES): "absent".
    monkeypatch.setattr(SimulatedFileSystem, "exists", lambda self, path: False)
    monkeypatch.setattr(SimulatedFileSystem, "size", failing_size)
    fs.inject("write", 5, path_contains=INCIDENTS_KEY)
    with pytest.raises(StorageUnavailable, match="incident"):
        await log.record("data_loss")
    monkeypatch.undo()
    assert [i.id for i in (await log.read()).incidents] == [first.id]


@pytest.mark.parametrize("kind", ["local", "memory"])
async def test_concurrent_appends_all_survive(tmp_path, kind):
    store: BlobStore = await LocalStore.open(tmp_path) if kind == "local" else MemoryStore()
    logs = [IncidentLog(store), IncidentLog(store)]
    ids: list[str] = []

    async def one(i: int) -> None:
        ids.append((await logs[i % 2].record("scrub_alert", details={"i": i})).id)

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(one, i)
    scan = await logs[0].read()
    assert sorted(i.id for i in scan.incidents) == sorted(ids)
    assert scan.damaged_lines == []
