"""Every acknowledged delta a recovery cannot give back is reported: a journal gap in the
middle (deleted segments), ``check --repair``, a failed ``data_loss`` append, a damaged
header, an inactivated region's journaled deltas; and the record of deleted journal
segments (``state/journal_drops.json``) is exact at every crash point of a collection."""

from __future__ import annotations

import errno
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest

from streamer import RegionInactiveEvent, RegionRestored, TileSet, open_world
from streamer.config import Config, RuntimeSettings, ScrubSettings, StorageSettings
from streamer.errors import StorageUnavailable
from streamer.format.region import region_key
from streamer.recovery.incidents import Incident, IncidentLog
from streamer.recovery.repair import repair_world
from streamer.runtime.journal import JOURNAL_DIR, Journal, JournalBatch
from streamer.runtime.journal_drops import DROPS_KEY, read_drops
from streamer.schema.deltas import TileSet as TileSetDelta
from streamer.storage.faultfs import SimulatedCrash, SimulatedFileSystem
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world
from streamer.worldgen import TerrainGenerator
from tests.test_journal import run_sync, ticks_of
from tests.test_world_recovery import next_event

SEED = 23
A = (0, 0)  # tiles (0..511, 0..511)
B = (1, 0)  # tiles (512..1023, 0..511)
CFG = Config(
    runtime=RuntimeSettings(flush_interval_ms=60_000),
    storage=StorageSettings(fsync=False),
    scrub=ScrubSettings(interval_s=0),
)


async def new_world(path: Path) -> Path:
    store = await LocalStore.open(path, fsync=False)
    await create_world(store, seed=SEED)
    await store.aclose()
    return path


def corrupt(path: Path, region: tuple[int, int], offset: int | None = None) -> None:
    """Flip a byte (the middle of the file by default) in a new inode, as bit rot would."""
    f = path / region_key(*region)
    data = bytearray(f.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0xFF
    tmp = f.with_name(f.name + ".rot")
    tmp.write_bytes(bytes(data))
    tmp.replace(f)


async def incidents(path: Path) -> list[Incident]:
    store = await LocalStore.open(path, fsync=False)
    try:
        return (await IncidentLog(store).read()).incidents
    finally:
        await store.aclose()


def default_tile(x: int, y: int) -> int:
    return int(TerrainGenerator(SEED).chunk_tiles(x // 64, y // 64)[y % 64, x % 64])


async def gap_world(tmp_path: Path) -> Path:
    """gap.py: snapshot at tick 1; A@2 folded and its segment deleted; A@3 kept in a segment
    that B@3 pins; a crash copy with A's file damaged."""
    live = await new_world(tmp_path / "live")
    async with open_world(live, CFG) as w:
        await w.submit([TileSet(tick=1, x=1, y=1, tile=11)])
        await w.snapshot()
        await w.submit([TileSet(tick=2, x=2, y=1, tile=22)])
        await w._flush_region(w._queues.regions[A], True)
        await w._after_flush(everything=True)
        # Tick 2 left with its segment (the next one may be open already, empty).
        assert not [p for p in (live / JOURNAL_DIR).glob("*.wal") if p.stat().st_size]
        await w.submit([TileSet(tick=3, x=3, y=1, tile=33), TileSet(tick=3, x=600, y=1, tile=5)])
        await w._flush_region(w._queues.regions[A], True)
        await w._after_flush(everything=True)
        crashed = tmp_path / "crashed"
        shutil.copytree(live, crashed, ignore=shutil.ignore_patterns(".lock"))
    return crashed


async def covered_world(tmp_path: Path) -> Path:
    """Snapshot at tick 1; A@2 folded into A's file, but its segment kept because B@2 pins
    it: the journal holds every delta above the snapshot. A crash copy, undamaged."""
    live = await new_world(tmp_path / "live")
    async with open_world(live, CFG) as w:
        await w.submit([TileSet(tick=1, x=1, y=1, tile=11)])
        await w.snapshot()
        await w.submit([TileSet(tick=2, x=2, y=1, tile=22), TileSet(tick=2, x=600, y=1, tile=5)])
        await w._flush_region(w._queues.regions[A], True)
        await w._after_flush(everything=True)  # B pins the segment: nothing is deleted
        crashed = tmp_path / "crashed"
        shutil.copytree(live, crashed, ignore=shutil.ignore_patterns(".lock"))
    return crashed


# -- finding 1: a gap in the middle of the journal -----------------------------------------


async def test_a_deleted_segment_between_the_snapshot_and_the_journal_is_reported(
    tmp_path: Path,
) -> None:
    crashed = await gap_world(tmp_path)
    corrupt(crashed, A)
    async with open_world(crashed, CFG) as w:
        async with w.events() as events:
            c = await w.chunk(0, 0)
            ev = await next_event(events, RegionRestored)
        assert isinstance(ev, RegionRestored) and ev.reapplied == 1
        assert "1 < t <= 2" in ev.lost
        assert int(c.tiles[1, 3]) == 33  # tick 3 came back from the journal
        assert int(c.tiles[1, 2]) == default_tile(2, 1)  # tick 2 did not: reported
    loss = [i for i in await incidents(crashed) if i.kind == "data_loss"]
    assert len(loss) == 1 and loss[0].region == A
    assert loss[0].details["lost_ticks"] == [1, 2]
    assert loss[0].id in ev.incidents


async def test_a_gap_is_reported_even_when_the_damaged_header_does_not_verify(
    tmp_path: Path,
) -> None:
    crashed = await gap_world(tmp_path)
    corrupt(crashed, A, offset=12)  # inside the header: its tick is unreadable
    async with open_world(crashed, CFG) as w:
        async with w.events() as events:
            await w.chunk(0, 0)
            ev = await next_event(events, RegionRestored)
    assert isinstance(ev, RegionRestored) and "1 < t <= 2" in ev.lost
    kinds = {i.kind: i for i in await incidents(crashed)}
    assert kinds["restored_from_snapshot"].details["damaged_last_processed_tick"] is None
    assert kinds["data_loss"].details["lost_ticks"] == [1, 2]


async def test_nothing_is_reported_lost_when_the_journal_holds_every_later_delta(
    tmp_path: Path,
) -> None:
    crashed = await covered_world(tmp_path)
    corrupt(crashed, A, offset=12)
    async with open_world(crashed, CFG) as w:
        async with w.events() as events:
            c = await w.chunk(0, 0)
            ev = await next_event(events, RegionRestored)
    assert isinstance(ev, RegionRestored) and ev.reapplied == 1 and ev.lost == ""
    assert int(c.tiles[1, 2]) == 22
    assert "data_loss" not in {i.kind for i in await incidents(crashed)}


# -- finding 4a: without a usable record the loss is "unknown", never "" ---------------------


@pytest.mark.parametrize("record", ["missing", "damaged"])
async def test_without_a_usable_record_the_loss_is_unknown_and_open_is_not_blocked(
    tmp_path: Path, record: str, caplog: pytest.LogCaptureFixture
) -> None:
    live = await new_world(tmp_path / "live")
    async with open_world(live, CFG) as w:
        await w.submit([TileSet(tick=1, x=1, y=1, tile=11)])
        await w.snapshot()
        await w.submit([TileSet(tick=2, x=2, y=1, tile=22), TileSet(tick=2, x=600, y=1, tile=5)])
        await w._flush_region(w._queues.regions[A], True)
        crashed = tmp_path / "crashed"
        shutil.copytree(live, crashed, ignore=shutil.ignore_patterns(".lock"))
    drops = crashed / DROPS_KEY
    if record == "missing":  # a world from before the record
        drops.unlink(missing_ok=True)
    else:
        drops.write_bytes(drops.read_bytes().replace(b'"epoch":"', b'"epoch":"0'))
    corrupt(crashed, A, offset=12)  # header unreadable: no tick to compare either
    caplog.set_level(logging.WARNING)
    async with open_world(crashed, CFG) as w:
        async with w.events() as events:
            await w.chunk(0, 0)
            ev = await next_event(events, RegionRestored)
    assert isinstance(ev, RegionRestored) and ev.lost.startswith("unknown:")
    if record == "damaged":
        assert any("does not verify" in r.getMessage() for r in caplog.records)


# -- finding 2: check --repair -------------------------------------------------------------


async def test_check_repair_records_the_loss_beyond_the_journal(tmp_path: Path) -> None:
    path = await new_world(tmp_path / "w")
    async with open_world(path, CFG) as w:
        await w.submit([TileSet(tick=1, x=1, y=1, tile=11)])
        await w.snapshot()
        await w.submit([TileSet(tick=2, x=2, y=1, tile=22)])
    corrupt(path, A)  # the clean close folded tick 2 and deleted its segment
    store = await LocalStore.open(path, fsync=False)
    try:
        rep = await repair_world(store, where=str(path))
    finally:
        await store.aclose()
    assert rep.ok and [a.outcome for a in rep.actions] == ["restored"]
    loss = [i for i in await incidents(path) if i.kind == "data_loss"]
    assert len(loss) == 1 and loss[0].details["lost_ticks"] == [1, 2]
    assert loss[0].id in rep.actions[0].incidents
    assert "1 < t <= 2" in rep.actions[0].detail


async def test_check_repair_is_not_ok_when_a_loss_cannot_be_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full when the data_loss incident is written: the region is restored and the
    loss logged, but the repair must not report ok (the operator's check would go green)."""
    import streamer.recovery.journal_loss as journal_loss_module

    async def full(*args: object, **kwargs: object) -> None:
        raise StorageUnavailable("no space left (simulated)", key="incidents.log")

    path = await new_world(tmp_path / "w")
    async with open_world(path, CFG) as w:
        await w.submit([TileSet(tick=1, x=1, y=1, tile=11)])
        await w.snapshot()
        await w.submit([TileSet(tick=2, x=2, y=1, tile=22)])
    corrupt(path, A)
    monkeypatch.setattr(journal_loss_module, "record_loss", full)
    store = await LocalStore.open(path, fsync=False)
    try:
        rep = await repair_world(store, where=str(path))
    finally:
        await store.aclose()
    assert [a.outcome for a in rep.actions] == ["restored"]
    assert rep.actions[0].unrecorded_loss and "DATA LOST" in rep.actions[0].detail
    assert not rep.ok


async def test_check_repair_reports_nothing_lost_when_the_journal_covers_it(
    tmp_path: Path,
) -> None:
    crashed = await covered_world(tmp_path)
    corrupt(crashed, A)
    store = await LocalStore.open(crashed, fsync=False)
    try:
        rep = await repair_world(store, where=str(crashed))
    finally:
        await store.aclose()
    assert rep.ok and "holds every later delta" in rep.actions[0].detail
    assert "data_loss" not in {i.kind for i in await incidents(crashed)}
    async with open_world(crashed, CFG) as w:
        assert int((await w.chunk(0, 0)).tiles[1, 2]) == 22


# -- finding 3: a data_loss incident that cannot be appended --------------------------------


async def test_a_loss_whose_incident_cannot_be_appended_is_still_logged_and_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = await new_world(tmp_path / "w")
    async with open_world(path, CFG) as w:
        await w.submit([TileSet(tick=1, x=1, y=1, tile=11), TileSet(tick=1, x=601, y=1, tile=1)])
        await w.snapshot()
        await w.submit([TileSet(tick=2, x=2, y=1, tile=22), TileSet(tick=2, x=602, y=1, tile=2)])
    corrupt(path, A)
    corrupt(path, B)

    real = IncidentLog.record

    async def no_room(self: IncidentLog, kind: str, **kw: Any) -> Incident:
        if kind == "data_loss":
            raise StorageUnavailable("cannot append incident: No space left on device")
        return await real(self, kind, **kw)

    monkeypatch.setattr(IncidentLog, "record", no_room)
    caplog.set_level(logging.WARNING)
    async with open_world(path, CFG) as w:
        async with w.events() as events:
            # Both regions in one load batch: A's failed append must not stop B's ladder.
            failed = await w._ensure_regions([A, B])
            first = await next_event(events, RegionRestored)
            second = await next_event(events, RegionRestored)
        assert failed == {}
        assert w.stats().recovery.regions_restored == 2
        assert int((await w.chunk(0, 0)).tiles[1, 1]) == 11
    regions = set()
    for ev in (first, second):
        assert isinstance(ev, RegionRestored) and "1 < t <= 2" in ev.lost
        regions.add(ev.region)
    assert regions == {A, B}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    for region in (A, B):
        assert any(
            f"region {region} restored" in m and "could NOT be recorded" in m and "1 < t <= 2" in m
            for m in errors
        ), errors


async def test_a_failing_ladder_for_one_region_does_not_skip_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = await new_world(tmp_path / "w")
    async with open_world(path, CFG) as w:
        await w.submit([TileSet(tick=1, x=1, y=1, tile=11), TileSet(tick=1, x=601, y=1, tile=1)])
        await w.snapshot()
    corrupt(path, A)
    corrupt(path, B)
    real = IncidentLog.record

    async def a_fails(self: IncidentLog, kind: str, **kw: Any) -> Incident:
        if kw.get("region") == A:
            raise StorageUnavailable("cannot append incident: No space left on device")
        return await real(self, kind, **kw)

    monkeypatch.setattr(IncidentLog, "record", a_fails)
    async with open_world(path, CFG) as w:
        failed = await w._ensure_regions([A, B])
        assert set(failed) == {A} and isinstance(failed[A], StorageUnavailable)
        assert int((await w.chunk(9, 0)).tiles[1, 601 % 64]) == 1  # B was restored
    monkeypatch.setattr(IncidentLog, "record", real)
    assert {
        (i.kind, i.region) for i in await incidents(path) if i.kind == "restored_from_snapshot"
    } == {("restored_from_snapshot", B)}


# -- finding 4b: an inactivated region's journaled deltas ----------------------------------


async def test_journaled_deltas_of_an_inactivated_region_are_counted_in_the_loss(
    tmp_path: Path,
) -> None:
    live = await new_world(tmp_path / "live")
    async with open_world(live, CFG) as w:
        await w.submit([TileSet(tick=1, x=1, y=1, tile=11)])
        await w._flush_region(w._queues.regions[A], True)  # file lpt 1, no snapshot
        await w.submit([TileSet(tick=2, x=2, y=1, tile=22)])
        await w.submit([TileSet(tick=3, x=3, y=1, tile=33)])
        crashed = tmp_path / "crashed"
        shutil.copytree(live, crashed, ignore=shutil.ignore_patterns(".lock"))
    corrupt(crashed, A)
    async with open_world(crashed, CFG) as w:
        async with w.events() as events:
            ev = await next_event(events, RegionInactiveEvent)
    assert isinstance(ev, RegionInactiveEvent)
    assert "2 journaled delta(s) above tick 1 (ticks 2 to 3) are dropped" in ev.reason
    loss = next(i for i in await incidents(crashed) if i.kind == "data_loss")
    assert loss.details["journal_deltas_dropped"] == {"count": 2, "first_tick": 2, "last_tick": 3}
    assert "2 journaled delta(s) above tick 1 (ticks 2 to 3)" in loss.details["lost"]


# -- the record of deleted segments: crash windows -----------------------------------------


TICKS = range(1, 121)


def region_of_tick(t: int) -> tuple[int, int]:
    return A if t % 2 else B


async def filled_journal(fs: SimulatedFileSystem) -> Journal:
    """Regions A (odd ticks) and B (even) interleaved over several small segments."""
    j = Journal(fs, run_sync, segment_bytes=2048)
    await j.open(ticks_of)
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        for t in TICKS:
            b = JournalBatch(
                seq=j.next_seq(), deltas=[TileSetDelta(tick=t, x=0 if t % 2 else 600, y=0, tile=1)]
            )
            await j.append(b, ticks_of(b)).wait()
        tg.cancel_scope.cancel()
    return j


async def collect_twice(j: Journal) -> None:
    lpt = {A: 119, B: 60}  # B's segments above 60 stay
    await j.collect(lambda r: lpt[r])
    lpt[B] = 90
    await j.collect(lambda r: lpt[r])


async def check_exact(image: SimulatedFileSystem) -> None:
    """After reopening: a tick is missing from the journal iff the record says a segment
    holding it (or a higher tick of its region) was deleted; nothing over, nothing under."""
    replay = await Journal(image, run_sync).open(ticks_of)
    kept = {d.tick for b in replay.batches for d in b.deltas}
    record = await read_drops(LocalStore(".", fs=image))
    assert record is not None and not record.pending  # open settled what a crash left
    for region in (A, B):
        missing = [t for t in TICKS if region_of_tick(t) == region and t not in kept]
        assert record.dropped_through(region) == max(missing, default=-1), (region, missing)


async def test_the_record_of_deleted_segments_is_exact_at_every_crash_point() -> None:
    probe = SimulatedFileSystem()
    j = await filled_journal(probe)
    before = len(probe.ops)
    await collect_twice(j)
    steps = len(probe.ops) - before
    assert steps >= 10
    await check_exact(probe.durable_image())
    for k in range(steps + 1):
        fs = SimulatedFileSystem()
        j = await filled_journal(fs)
        fs.crash_after(k)
        try:
            await collect_twice(j)
        except SimulatedCrash:
            pass
        await check_exact(fs.durable_image(torn=True, rng=random.Random(k)))
        fs.restart()  # a process kill: the page cache survives
        await check_exact(fs)


async def test_a_record_that_cannot_be_written_is_removed_before_segments_go() -> None:
    fs = SimulatedFileSystem()
    j = await filled_journal(fs)
    assert await read_drops(LocalStore(".", fs=fs)) is not None
    fs.inject("create", errno.ENOSPC, path_contains="journal_drops", once=False)
    assert await j.collect(lambda r: 200) > 0
    # Gone rather than stale: a restore now says "unknown", never "nothing".
    assert await read_drops(LocalStore(".", fs=fs)) is None
    fs.clear_faults()
    await j.collect(lambda r: 200, everything=True)
    assert fs.listdir(JOURNAL_DIR) == []


async def test_segments_stay_when_the_record_can_be_neither_written_nor_removed() -> None:
    fs = SimulatedFileSystem()
    j = await filled_journal(fs)
    segments = fs.listdir(JOURNAL_DIR)
    fs.inject("create", errno.ENOSPC, path_contains="journal_drops", once=False)
    fs.inject("replace", errno.EIO, path_contains="journal_drops", once=False)
    with pytest.raises(StorageUnavailable):
        await j.collect(lambda r: 200)
    assert fs.listdir(JOURNAL_DIR) == segments


async def test_reading_a_regions_journal_ticks_holds_one_segment_at_a_time(
    tmp_path: Path,
) -> None:
    """Recovery reads the journal of a closed world; segments are up to 64 MiB each."""
    from streamer.recovery.journal_loss import read_region_ticks

    cfg = Config(
        runtime=RuntimeSettings(flush_interval_ms=60_000, journal_segment_bytes=4096),
        storage=StorageSettings(fsync=False),
        scrub=ScrubSettings(interval_s=0),
    )
    path = await new_world(tmp_path / "w")
    async with open_world(path, cfg) as w:
        for t in range(1, 40):  # another region pins every segment, so none is deleted
            await w.submit([TileSet(tick=t, x=600 + i, y=1, tile=5) for i in range(60)])
            await w.submit([TileSet(tick=t, x=1, y=1, tile=t)])
        crashed = tmp_path / "crashed"
        shutil.copytree(path, crashed, ignore=shutil.ignore_patterns(".lock"))
    reads: list[int] = []
    store = await LocalStore.open(crashed, fsync=False)
    real = store.get_many

    async def counting(keys: Any) -> Any:
        reads.append(len(keys))
        return await real(keys)

    store.get_many = counting  # type: ignore[method-assign]
    try:
        found = await read_region_ticks(store, A, 8)
    finally:
        await store.aclose()
    assert len(found.segments) > 3 and reads == [1] * len(found.segments)
    assert sorted(set(found.ticks)) == list(range(1, 40))


def test_a_drops_record_from_a_newer_release_reads_as_damage() -> None:
    """Like damage, it starts a new epoch (losses then read unknown) instead of blocking the
    journal; an older release's own record round-trips."""
    import msgspec

    from streamer.errors import MalformedFile
    from streamer.format.sealed import seal
    from streamer.runtime.journal_drops import decode_drops, encode_drops, new_record

    record = new_record()
    assert decode_drops(encode_drops(record)) == record
    newer = msgspec.structs.replace(record, schemaVersion=2)
    with pytest.raises(MalformedFile, match="newer than this streamer reads"):
        decode_drops(seal(newer, compact=True))
