"""The write-ahead journal: group commit, torn tails, segment rotation/deletion, interval mode."""

from __future__ import annotations

import errno
import functools
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from streamer.config import Config, RuntimeSettings, StorageSettings
from streamer.errors import StorageUnavailable, WorldClosed
from streamer.format.journal import scan_frames
from streamer.format.region import decode_region, region_key
from streamer.runtime.journal import (
    JOURNAL_DIR,
    SPARE_NAME,
    Journal,
    JournalBatch,
    JournalStats,
    segment_name,
)
from streamer.runtime.world import open_world
from streamer.schema.deltas import TileSet
from streamer.storage.faultfs import SimulatedCrash, SimulatedFileSystem
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world


async def run_sync(fn: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(fn, *args)


def ticks_of(batch: JournalBatch) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    for d in batch.deltas:
        assert isinstance(d, TileSet)
        region = (d.x // 512, d.y // 512)
        out[region] = max(out.get(region, -1), d.tick)
    return out


def batch(j: Journal, tick: int, x: int = 0, tile: int = 1) -> JournalBatch:
    return JournalBatch(seq=j.next_seq(), deltas=[TileSet(tick=tick, x=x, y=0, tile=tile)])


def fsyncs(fs: SimulatedFileSystem) -> int:
    return sum(1 for op in fs.ops if op.name in ("fsync", "fdatasync") and op.path.endswith(".wal"))


async def test_group_commit_shares_fsyncs() -> None:
    fs = SimulatedFileSystem()
    durable: list[int] = []
    j = Journal(fs, run_sync, on_durable=lambda bs: durable.extend(b.seq for b in bs))
    await j.open(ticks_of)

    async def submit(i: int) -> None:
        b = batch(j, i + 1, x=i)
        await j.append(b, ticks_of(b)).wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        async with anyio.create_task_group() as clients:
            for i in range(100):
                clients.start_soon(submit, i)
        j.begin_close()
    await j.aclose()
    assert sorted(durable) == list(range(1, 101))
    # One fsync per group commit (plus closing): concurrency collapses 100 into a handful.
    assert j.stats().commits <= 10
    assert fsyncs(fs) <= 11
    replay = await Journal(fs.durable_image(), run_sync).open(ticks_of)
    assert [b.seq for b in replay.batches] == durable


async def test_acknowledged_batches_survive_power_loss_and_order_is_kept() -> None:
    fs = SimulatedFileSystem()
    j = Journal(fs, run_sync)
    await j.open(ticks_of)
    acked: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        for t in range(1, 21):
            b = batch(j, t)
            await j.append(b, ticks_of(b)).wait()
            acked.append(b.seq)
        # Power loss now: the writer never closes cleanly.
        image = fs.durable_image()
        j.begin_close()
    replay = await Journal(image, run_sync).open(ticks_of)
    assert [b.seq for b in replay.batches] == acked


async def _write_batches(fs: SimulatedFileSystem, n: int) -> list[JournalBatch]:
    j = Journal(fs, run_sync)
    await j.open(ticks_of)
    out = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        for t in range(1, n + 1):
            b = batch(j, t, tile=t)
            await j.append(b, ticks_of(b)).wait()
            out.append(b)
        j.begin_close()
    await j.aclose()
    return out


async def test_torn_tail_cut_at_every_offset_is_discarded_durably() -> None:
    fs = SimulatedFileSystem()
    written = await _write_batches(fs, 4)
    seg = segment_name(1)
    full = fs.read(seg)
    last_start = len(full) - (len(full) // 4)  # frames have equal size here
    assert len(full) % 4 == 0
    for cut in range(last_start, len(full) + 1):
        image = fs.durable_image()
        image.truncate(seg, cut)
        first = await Journal(image, run_sync).open(ticks_of)
        expect = 4 if cut == len(full) else 3
        assert [b.seq for b in first.batches] == [b.seq for b in written[:expect]]
        assert first.torn_bytes == (0 if cut == len(full) else cut - last_start)
        # The cut is durable: a second open (even after another power loss) sees no tail.
        second = await Journal(image.durable_image(), run_sync).open(ticks_of)
        assert [b.seq for b in second.batches] == [b.seq for b in first.batches]
        assert second.torn_bytes == 0


@pytest.mark.parametrize("preallocate", [False, True])
async def test_segments_rotate_and_are_deleted_once_regions_pass_them(preallocate: bool) -> None:
    fs = SimulatedFileSystem()
    j = Journal(fs, run_sync, segment_bytes=4096, preallocate=preallocate)
    await j.open(ticks_of)
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        # Region A (x=0) and region B (x=600) interleaved; ~120-byte frames.
        for t in range(1, 201):
            b = batch(j, t, x=0 if t % 2 else 600)
            await j.append(b, ticks_of(b)).wait()
        segs = j.segment_seqs()
        assert len(segs) >= 4
        on_disk = fs.listdir(JOURNAL_DIR)
        assert len(on_disk) == len(segs)

        # A is folded completely, B only up to tick 100: segments holding B ticks > 100 stay.
        lpt = {(0, 0): 200, (1, 0): 100}
        deleted = await j.collect(lambda r: lpt[r])
        assert 0 < deleted < len(segs)
        remaining = await Journal(fs.durable_image(), run_sync).open(ticks_of)
        kept_ticks = [
            d.tick
            for b in remaining.batches
            for d in b.deltas
            if isinstance(d, TileSet) and d.x == 600
        ]
        assert kept_ticks and min(kept_ticks) <= 101 and max(kept_ticks) == 200

        lpt[(1, 0)] = 200
        await j.collect(lambda r: lpt[r])
        # All passed, but the segment being written to holds less than COLLECT_ACTIVE_BYTES:
        # it stays (closing it would cost more I/O than it frees).
        assert j.segment_seqs() == [segs[-1]]
        recycled = j.stats().spares_recycled
        await j.collect(lambda r: lpt[r], everything=True)
        if preallocate:  # one passed segment became the spare (recycled), the rest are gone
            assert fs.listdir(JOURNAL_DIR) == [SPARE_NAME.rpartition("/")[2]]
            assert j.stats().spares_recycled == recycled + 1
        else:
            assert fs.listdir(JOURNAL_DIR) == []
        j.begin_close()
    await j.aclose()
    assert fs.listdir(JOURNAL_DIR) == []


async def test_interval_mode_acknowledges_before_fsync_and_fsyncs_periodically() -> None:
    fs = SimulatedFileSystem()
    j = Journal(fs, run_sync, durability="interval", fsync_interval_ms=20)
    await j.open(ticks_of)
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        for t in range(1, 11):
            b = batch(j, t)
            await j.append(b, ticks_of(b)).wait()
        assert j.stats().batches == 10
        # Written (a killed process keeps them) but mostly not fsynced yet.
        assert len((await Journal(fs, run_sync).open(ticks_of)).batches) == 10
        assert fsyncs(fs) < 10
        with anyio.fail_after(5):
            while j.stats().unsynced_bytes:
                await anyio.sleep(0.005)
        replay = await Journal(fs.durable_image(), run_sync).open(ticks_of)
        assert len(replay.batches) == 10
        j.begin_close()
    await j.aclose()


async def _acknowledge_then_kill(j: Journal, ticks: range) -> None:
    """Acknowledge ``ticks`` one batch each, then stop the writer as a SIGKILL would: no
    close, no last sync (the page cache, here the simulated file system, keeps the bytes)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        for t in ticks:
            b = batch(j, t)
            await j.append(b, ticks_of(b)).wait()
        tg.cancel_scope.cancel()


async def _reopen_acknowledge_power_loss(
    again: Journal, fs: SimulatedFileSystem, replayed: list[int], tick: int
) -> list[int]:
    """Open ``again`` (it must replay ``replayed``), acknowledge one batch at ``tick``, close
    it, then lose power: the ticks that survive."""
    assert [b.deltas[0].tick for b in (await again.open(ticks_of)).batches] == replayed
    async with anyio.create_task_group() as tg:
        tg.start_soon(again.run)
        b = batch(again, tick)
        await again.append(b, ticks_of(b)).wait()
        again.begin_close()
    await again.aclose()  # syncs in interval mode too
    assert again.stats().unsynced_bytes == 0
    after = await Journal(fs.durable_image(), run_sync).open(ticks_of)
    return [b.deltas[0].tick for b in after.batches]


@pytest.mark.parametrize("durability", ["sync", "interval"])
async def test_open_makes_what_it_replays_durable(durability: str) -> None:
    """Interval mode: acknowledged, not yet fsynced, then the process is killed. The reopened
    world replays those batches and acknowledges new ones after them; a power loss after that
    must not keep the new ones and lose the replayed ones before them (a gap in the ticks)."""
    fs = SimulatedFileSystem()
    j = Journal(fs, run_sync, durability="interval", fsync_interval_ms=3_600_000)
    await j.open(ticks_of)
    await _acknowledge_then_kill(j, range(1, 6))
    assert not [op for op in fs.ops if op.name in ("fsync", "fdatasync") and "0000" in op.path]

    again = Journal(fs, run_sync, durability=durability)  # type: ignore[arg-type]
    survived = await _reopen_acknowledge_power_loss(again, fs, [1, 2, 3, 4, 5], 6)
    assert survived == [1, 2, 3, 4, 5, 6]


async def test_reopening_after_a_failed_sync_makes_the_replayed_batches_durable() -> None:
    """Interval mode: the periodic sync fails (the journal stops; the kernel keeps the pages
    readable but clean) and the world is reopened in the same boot. Open replays them from
    the cache; an fsync of the same file would write nothing, so they must reach the disk
    another way before batch 4 is acknowledged."""
    fs = SimulatedFileSystem()
    await _broken_by_a_failed_sync(fs, due_commit=False)
    survived = await _reopen_acknowledge_power_loss(Journal(fs, run_sync), fs, [1, 2, 3], 4)
    assert survived == [1, 2, 3, 4]


async def test_reopening_with_fsync_on_makes_every_segment_written_without_it_durable() -> None:
    """Segments written with fsync off (never synced, several of them) are replayed by an
    open with fsync on, which then acknowledges durably: none of them may be lost after."""
    fs = SimulatedFileSystem()
    j = Journal(fs, run_sync, fsync=False, segment_bytes=40)
    await j.open(ticks_of)
    await _acknowledge_then_kill(j, range(1, 7))
    assert len([n for n in fs.listdir(JOURNAL_DIR) if n.endswith(".wal")]) >= 3
    again = Journal(fs, run_sync, segment_bytes=40)
    survived = await _reopen_acknowledge_power_loss(again, fs, list(range(1, 7)), 10)
    assert survived == [1, 2, 3, 4, 5, 6, 10]


async def _broken_by_a_failed_sync(fs: SimulatedFileSystem, *, due_commit: bool) -> None:
    """Interval mode: ticks 1-3 acknowledged unsynced, then a sync fails: the periodic one,
    or (``due_commit``) the one a commit carries, after which the journal also cuts the
    segment back (a truncate: the size persists, the dropped pages do not). The journal
    stops, and the process goes away, its page cache kept."""
    j = Journal(fs, run_sync, durability="interval", fsync_interval_ms=3_600_000)
    await j.open(ticks_of)
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        for t in (1, 2, 3):
            b = batch(j, t)
            await j.append(b, ticks_of(b)).wait()
        fs.inject("fdatasync", errno.EIO, path_contains=JOURNAL_DIR)  # once
        if due_commit:
            j._last_sync -= 10_000  # the interval is due
            b = batch(j, 4)
            with pytest.raises(StorageUnavailable):
                await j.append(b, ticks_of(b)).wait()
            await j.barrier()
        else:
            await j._sync_now()
        assert j.broken
        tg.cancel_scope.cancel()
    fs.restart()


@pytest.mark.parametrize("due", [True, False], ids=["due-commit", "periodic"])
async def test_a_crash_while_open_secures_the_newest_segment_never_refuses_the_next(
    due: bool,
) -> None:
    """Open makes the replayed batches durable; a power loss at any step of that (pages of a
    failed sync differ on disk from the cache, and may persist in any order) must leave a
    journal the next open accepts, replaying a prefix of what was acknowledged."""
    probe = SimulatedFileSystem()
    await _broken_by_a_failed_sync(probe, due_commit=due)
    before = len(probe.ops)
    await Journal(probe, run_sync).open(ticks_of)
    steps = len(probe.ops) - before
    assert steps >= 5  # create, write, fdatasync, replace, fsync_dir at least
    for k in range(steps + 1):
        fs = SimulatedFileSystem()
        await _broken_by_a_failed_sync(fs, due_commit=due)
        fs.crash_after(k)
        try:
            await Journal(fs, run_sync).open(ticks_of)
        except SimulatedCrash:
            pass
        for seed in range(8):
            image = fs.durable_image(torn=True, rng=random.Random(seed))
            replay = await Journal(image, run_sync).open(ticks_of)
            ticks = [b.deltas[0].tick for b in replay.batches]
            assert ticks == [1, 2, 3][: len(ticks)], (k, seed, ticks)
            if k == steps:  # the open finished: all of it is durable
                assert ticks == [1, 2, 3], (seed, ticks)


@pytest.mark.parametrize("close_fails", [False, True], ids=["close-ok", "close-fails-too"])
@pytest.mark.parametrize("due_commit", [False, True], ids=["periodic", "due-commit"])
async def test_open_without_room_for_the_copy_refuses_and_changes_nothing(
    due_commit: bool, close_fails: bool
) -> None:
    """No room to copy the newest segment: open refuses, naming the space it needs, rather
    than sync in place, which after a failed sync would make the segment's size durable over
    pages that never reached the disk (an older segment of zeros once the next one starts,
    refused by every later open). Freed space, it opens with everything. A close that fails
    after the failed write must not hide why."""
    fs = SimulatedFileSystem()
    await _broken_by_a_failed_sync(fs, due_commit=due_commit)
    seg = segment_name(1)
    before = fs.read(seg)
    fs.inject("write", errno.ENOSPC, path_contains=".copy")
    if close_fails:
        fs.inject("close", errno.EIO, path_contains=".copy")
    with pytest.raises(StorageUnavailable, match="no room to copy") as caught:
        await Journal(fs, run_sync).open(ticks_of)
    assert f"({len(before)} bytes)" in str(caught.value)
    assert fs.read(seg) == before
    assert not [n for n in fs.listdir(JOURNAL_DIR) if n.endswith(".copy")]
    survived = await _reopen_acknowledge_power_loss(Journal(fs, run_sync), fs, [1, 2, 3], 4)
    assert survived == [1, 2, 3, 4]


async def test_open_removes_a_copy_left_by_an_open_that_crashed() -> None:
    fs = SimulatedFileSystem()
    j = Journal(fs, run_sync)
    await j.open(ticks_of)
    await _acknowledge_then_kill(j, range(1, 3))
    left = segment_name(1) + ".copy"
    h = fs.create(left)
    fs.write(h, b"half a copy")
    fs.close(h)
    replay = await Journal(fs, run_sync).open(ticks_of)
    assert [b.deltas[0].tick for b in replay.batches] == [1, 2]
    assert fs.listdir(JOURNAL_DIR) == [segment_name(1).rpartition("/")[2]]


async def test_open_refuses_when_it_cannot_sync_what_it_replays() -> None:
    fs = SimulatedFileSystem()
    j = Journal(fs, run_sync, durability="interval", fsync_interval_ms=3_600_000)
    await j.open(ticks_of)
    await _acknowledge_then_kill(j, range(1, 4))
    fs.inject("fdatasync", errno.EIO, path_contains=JOURNAL_DIR, once=True)
    with pytest.raises(StorageUnavailable) as caught:
        await Journal(fs, run_sync).open(ticks_of)
    assert caught.value.key == JOURNAL_DIR
    assert "EIO" in str(caught.value) or "Input/output" in str(caught.value)
    assert "00000000000000000001.wal" in str(caught.value)
    # Nothing was cut or deleted: a later open (the fault gone) replays all of it.
    assert [b.deltas[0].tick for b in (await Journal(fs, run_sync).open(ticks_of)).batches] == [
        1,
        2,
        3,
    ]


async def test_open_without_fsync_syncs_nothing() -> None:
    fs = SimulatedFileSystem()
    j = Journal(fs, run_sync, fsync=False)
    await j.open(ticks_of)
    await _acknowledge_then_kill(j, range(1, 4))
    before = len(fs.ops)
    assert len((await Journal(fs, run_sync, fsync=False).open(ticks_of)).batches) == 3
    assert not [op for op in fs.ops[before:] if "sync" in op.name]


async def test_failed_write_fails_the_group_and_later_batches_still_commit() -> None:
    fs = SimulatedFileSystem()
    j = Journal(fs, run_sync)
    await j.open(ticks_of)
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        b1 = batch(j, 1)
        await j.append(b1, ticks_of(b1)).wait()
        fs.inject("fdatasync", errno.EIO, path_contains=JOURNAL_DIR)
        b2 = batch(j, 2)
        with pytest.raises(StorageUnavailable):
            await j.append(b2, ticks_of(b2)).wait()
        b3 = batch(j, 3)
        await j.append(b3, ticks_of(b3)).wait()
        j.begin_close()
    await j.aclose()
    replay = await Journal(fs.durable_image(), run_sync).open(ticks_of)
    assert [b.seq for b in replay.batches] == [b1.seq, b3.seq]


@pytest.mark.parametrize("preallocate", [False, True])
async def test_world_replay_after_torn_tail_is_exactly_once_and_lpt_never_regresses(
    tmp_path: Path, preallocate: bool
) -> None:
    fs = SimulatedFileSystem()
    cfg = Config(
        runtime=RuntimeSettings(
            flush_interval_ms=60_000,
            journal_segment_bytes=4096,
            journal_preallocate=preallocate,
        )
    )
    store = await LocalStore.open(tmp_path, fs=fs)
    await create_world(store, seed=3)
    async with open_world(tmp_path, cfg, fs=fs) as world:
        for t in range(1, 4):
            await world.submit([TileSet(tick=t, x=t, y=0, tile=100 + t)])
        await world.flush()
        await world._after_flush(everything=True)  # ticks 4-6 go to a segment of their own
        if preallocate:
            # The next segment is made from the spare only if the keeper has one ready
            # (otherwise it is appended, correctly, but the test needs the padding).
            journal = world._journal
            assert journal is not None
            with anyio.fail_after(30):
                while not journal.stats().spare_ready:
                    await anyio.sleep(0.01)
        for t in range(4, 7):
            await world.submit([TileSet(tick=t, x=t, y=0, tile=100 + t)])
        base = fs.durable_image()
        await world.flush()  # what happens to `fs` after the image no longer matters
    [seg] = [n for n in base.listdir(JOURNAL_DIR) if n.endswith(".wal")]
    seg_path = f"{JOURNAL_DIR}/{seg}"
    on_disk = base.read(seg_path)
    # A preallocated segment is written in place over zeros: its unwritten rest is padding.
    full = on_disk[: scan_frames(on_disk).valid_length]
    assert (len(on_disk) > len(full)) == preallocate
    frame = len(full) // 3
    assert len(full) == 3 * frame

    def lpt(image: SimulatedFileSystem) -> int:
        rf = decode_region(image.read(region_key(0, 0)), rx=0, ry=0, path="r")
        return rf.header.last_processed_tick

    for cut in range(2 * frame, len(full) + 1):
        image = base.durable_image()
        if preallocate:  # a torn in-place write: the frame's start, then the old zeros
            _rewrite(image, seg_path, on_disk[:cut] + bytes(len(on_disk) - cut))
        else:  # a torn append: the frame's start, then the end of the file
            image.truncate(seg_path, cut)
        expected = {t: 100 + t for t in range(1, 6 if cut < len(full) else 7)}
        before = lpt(image)
        for _ in range(2):
            async with open_world(tmp_path, cfg, fs=image) as world:
                row = (await world.chunk(0, 0)).tiles[0]
                got = {t: int(row[t]) for t in range(1, 7) if int(row[t]) >= 100}
                assert got == expected
            after = lpt(image)
            assert after >= before
            before = after
            image = image.durable_image()


async def test_world_counts_fsyncs_through_one_group_commit(tmp_path: Path) -> None:
    fs = SimulatedFileSystem()
    store = await LocalStore.open(tmp_path, fs=fs)
    await create_world(store, seed=3)
    cfg = Config(
        runtime=RuntimeSettings(flush_interval_ms=60_000), storage=StorageSettings(fsync=True)
    )
    async with open_world(tmp_path, cfg, fs=fs) as world:
        before = fsyncs(fs)
        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(world.submit, [TileSet(tick=1, x=i, y=i, tile=7)])
        journal_fsyncs = fsyncs(fs) - before
        assert journal_fsyncs <= 10
        assert world.stats().journal_fsyncs == journal_fsyncs


async def test_replay_skips_records_a_region_already_folded(tmp_path: Path) -> None:
    """A segment kept alive by a lagging region must not re-apply another region's old deltas
    over newer state whose own segment is already gone (exactly-once, not just at-least-once)."""
    fs = SimulatedFileSystem()
    store = await LocalStore.open(tmp_path, fs=fs)
    await create_world(store, seed=3)
    conf = Config(runtime=RuntimeSettings(flush_interval_ms=60_000, journal_segment_bytes=4096))
    async with open_world(tmp_path, conf, fs=fs) as world:
        padding = [TileSet(tick=1, x=i % 64, y=1 + i // 64, tile=5) for i in range(400)]
        # Segment 1: region A's old value, region B's delta, enough bytes to rotate.
        await world.submit(
            [TileSet(tick=1, x=0, y=0, tile=1), TileSet(tick=1, x=600, y=0, tile=9), *padding]
        )
        # Segment 2: region A's newer value.
        await world.submit([TileSet(tick=2, x=0, y=0, tile=2)])
        assert world.stats().journal_segments == 2
        # Fold region A only: segment 2 is passed and deleted, segment 1 stays for region B.
        await world._flush_region(world._queues.regions[(0, 0)], True)
        await world._after_flush(everything=True)
        assert world.stats().journal_segments == 1
        image = fs.durable_image()
    async with open_world(tmp_path, conf, fs=image) as world:
        assert int((await world.chunk(0, 0)).tiles[0, 0]) == 2
        assert int((await world.chunk(9, 0)).tiles[0, 600 % 64]) == 9


def _rewrite(image: SimulatedFileSystem, path: str, data: bytes) -> None:
    image.unlink(path)
    h = image.create(path)
    image.write(h, data)
    image.fsync(h)
    image.close(h)
    image.fsync_dir("journal")


async def test_damage_before_intact_records_refuses_to_open_and_cuts_nothing() -> None:
    """A bit flip inside an early frame is not a torn tail: acknowledged batches follow it.

    Cutting there would silently drop them, so the journal refuses to open, names the file,
    and leaves the segment exactly as it found it (for salvage or a deliberate decision)."""
    from streamer.errors import ChecksumMismatch

    fs = SimulatedFileSystem()
    await _write_batches(fs, 4)
    seg = segment_name(1)
    full = fs.read(seg)
    frame = len(full) // 4
    for offset in (0, 5, frame // 2, frame + frame // 2):
        image = fs.durable_image()
        bad = bytearray(full)
        bad[offset] ^= 0x01
        _rewrite(image, seg, bytes(bad))
        with pytest.raises(ChecksumMismatch) as info:
            await Journal(image, run_sync).open(ticks_of)
        assert seg in str(info.value)
        assert "intact records after the damage" in str(info.value)
        assert image.read(seg) == bytes(bad)  # nothing truncated
        # Its advice, followed, keeps every batch before the damage.
        keep = offset - offset % frame
        assert f"truncate it to {keep} bytes" in str(info.value)
        image.truncate(seg, keep)
        replay = await Journal(image, run_sync).open(ticks_of)
        assert [b.deltas[0].tick for b in replay.batches] == [1, 2, 3, 4][: keep // frame]


async def test_damage_in_an_older_segment_refuses_to_open() -> None:
    from streamer.errors import ChecksumMismatch

    fs = SimulatedFileSystem()
    await _write_batches(fs, 2)
    image = fs.durable_image()
    seg = segment_name(1)
    data = image.read(seg)
    _rewrite(image, seg, data[:-3])  # the end of an older segment is gone
    h = image.create(segment_name(2))  # a newer segment exists
    image.fsync(h)
    image.close(h)
    image.fsync_dir("journal")
    with pytest.raises(ChecksumMismatch, match="refuses to open"):
        await Journal(image, run_sync).open(ticks_of)


async def test_failed_directory_fsync_of_a_new_segment_leaks_no_handle() -> None:
    fs = SimulatedFileSystem()
    j = Journal(fs, run_sync)
    await j.open(ticks_of)
    fs.inject("fsync_dir", errno.EIO, path_contains=JOURNAL_DIR)  # once
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        b1 = batch(j, 1)
        with pytest.raises(StorageUnavailable):
            await j.append(b1, ticks_of(b1)).wait()
        assert fs._handles == {}  # the segment created for b1 was closed, not leaked
        # ... and removed: an empty file nobody tracks would never be collected.
        assert fs.listdir(JOURNAL_DIR) == []
        b2 = batch(j, 2)
        await j.append(b2, ticks_of(b2)).wait()
        j.begin_close()
    await j.aclose()
    assert fs.listdir(JOURNAL_DIR) == [segment_name(2).rpartition("/")[2]]
    replay = await Journal(fs.durable_image(), run_sync).open(ticks_of)
    assert [b.seq for b in replay.batches] == [b2.seq]


class _SlowUnlink(SimulatedFileSystem):
    """Unlinking a journal segment blocks until released (a big file freed by a slow disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def unlink(self, path: str) -> None:
        if path.startswith(JOURNAL_DIR):
            self.entered.set()
            assert self.release.wait(30)
        super().unlink(path)


async def _acknowledged(j: Journal, ticks: range) -> None:
    """One batch per tick, each awaited until acknowledged."""
    for t in ticks:
        b = batch(j, t)
        await j.append(b, ticks_of(b)).wait()


async def _journal_with_dead_segments(fs: SimulatedFileSystem) -> Journal:
    j = Journal(fs, run_sync, segment_bytes=4096)
    await j.open(ticks_of)
    return j


async def test_acknowledgements_do_not_wait_for_segment_deletion() -> None:
    """Collection unlinks passed segments outside the writer's lock: a batch submitted while
    an unlink is stuck is still written, fsynced and acknowledged."""
    fs = _SlowUnlink()
    j = await _journal_with_dead_segments(fs)
    deleted: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        await _acknowledged(j, range(1, 101))
        before = j.segment_seqs()
        assert len(before) >= 3

        async def collect() -> None:
            deleted.append(await j.collect(lambda r: 100))

        tg.start_soon(collect)
        assert await anyio.to_thread.run_sync(fs.entered.wait, 10)  # an unlink is in progress
        late = batch(j, 101)
        with anyio.fail_after(10):  # with the unlink under the writer's lock: never
            await j.append(late, ticks_of(late)).wait()
        assert not deleted  # the collection is still stuck
        fs.release.set()
        with anyio.fail_after(10):
            while not deleted:
                await anyio.sleep(0.01)
        j.begin_close()
    await j.aclose()
    assert deleted[0] >= 2
    replay = await Journal(fs.durable_image(), run_sync).open(ticks_of)
    assert replay.batches[-1].seq == late.seq
    assert len(fs.listdir(JOURNAL_DIR)) == len(j.segment_seqs())


async def test_a_pause_waits_for_a_collection_in_progress() -> None:
    """A snapshot's pause (``Journal.paused``) must not begin while passed segments are
    being unlinked (outside the writer's lock), nor let a collection begin during it."""
    fs = _SlowUnlink()
    j = await _journal_with_dead_segments(fs)
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        await _acknowledged(j, range(1, 101))
        on_disk = fs.listdir(JOURNAL_DIR)
        seen_in_pause: list[list[str]] = []

        async def collect() -> None:
            await j.collect(lambda r: 100)

        async def snapshot() -> None:
            async with j.paused():
                seen_in_pause.append(fs.listdir(JOURNAL_DIR))

        tg.start_soon(collect)
        assert await anyio.to_thread.run_sync(fs.entered.wait, 10)  # unlinking, stuck
        tg.start_soon(snapshot)
        await anyio.sleep(0.1)
        assert not seen_in_pause  # the pause waits for the collection
        fs.release.set()
        with anyio.fail_after(10):
            while not seen_in_pause:
                await anyio.sleep(0.01)
        # The copy would see the journal after the collection, never halfway through it.
        assert len(seen_in_pause[0]) < len(on_disk)
        assert seen_in_pause[0] == fs.listdir(JOURNAL_DIR)

        # And a collection asked for during a pause waits for its end.
        await _acknowledged(j, range(101, 201))
        before = fs.listdir(JOURNAL_DIR)
        done: list[int] = []

        async def collect_again() -> None:
            done.append(await j.collect(lambda r: 200))

        async with j.paused():
            tg.start_soon(collect_again)
            await anyio.sleep(0.1)
            assert not done and fs.listdir(JOURNAL_DIR) == before
        with anyio.fail_after(10):
            while not done:
                await anyio.sleep(0.01)
        assert done[0] >= 1
        j.begin_close()
    await j.aclose()


async def test_a_world_acknowledges_while_its_journal_deletes_segments(tmp_path: Path) -> None:
    """Through ``open_world``: the journal writes on one thread of its own, so deleting
    passed segments must not take that thread (nor its lock) while a flush collects them."""
    fs = _SlowUnlink()
    store = await LocalStore.open(tmp_path, fs=fs)
    await create_world(store, seed=3)
    conf = Config(runtime=RuntimeSettings(flush_interval_ms=60_000, journal_segment_bytes=4096))
    async with open_world(tmp_path, conf, fs=fs) as world:
        for t in range(1, 6):
            await world.submit([TileSet(tick=t, x=i % 64, y=i // 64, tile=t) for i in range(200)])
        assert world.stats().journal_segments >= 3
        async with anyio.create_task_group() as tg:
            tg.start_soon(world.flush)
            assert await anyio.to_thread.run_sync(
                fs.entered.wait, 10
            )  # collecting, stuck in an unlink
            with anyio.fail_after(10):  # on the writer's thread or under its lock: never
                await world.submit([TileSet(tick=6, x=1, y=1, tile=42)])
            fs.release.set()
        assert world.stats().journal.segments_deleted >= 2
        assert int((await world.chunk(0, 0)).tiles[1, 1]) == 42


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    """Runs the blocking call in place: the op sequence is the same at every run."""
    return fn(*args)


def _constant(value: int, _region: tuple[int, int]) -> int:
    return value


def _crashed(exc: BaseException) -> bool:
    """A simulated crash, and what it did to the batches it stopped (failed as closed)."""
    if isinstance(exc, BaseExceptionGroup):
        return any(_crashed(e) for e in exc.exceptions) and all(
            _crashed(e) or isinstance(e, WorldClosed) for e in exc.exceptions
        )
    return isinstance(exc, SimulatedCrash)


def _inline_preallocated(fs: SimulatedFileSystem) -> Journal:
    """A preallocating journal of 4 KiB segments whose blocking calls run in place and whose
    keeper never sleeps on the wall clock: the same operations at every run."""
    return Journal(
        fs,
        _inline,
        segment_bytes=4096,
        collect_run_sync=_inline,
        preallocate=True,
        spare_pause_s=0,
    )


async def _preallocated_workload(
    fs: SimulatedFileSystem, acked: list[int], passed: list[int]
) -> JournalStats:
    """240 acknowledged batches over segments of 4 KiB, from 81 on made from zero-filled
    spares, the first one a recycled segment; passed segments are collected as they fill."""
    j = _inline_preallocated(fs)
    await j.open(ticks_of)
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        for t in range(1, 241):
            if t == 81:
                # Until now segments were created as they were needed, and the collection
                # at 80 recycled a passed one into the spare: the keeper zero-fills it.
                tg.start_soon(j.keep_spare)
            segments = j.segment_seqs()
            b = batch(j, t)
            await j.append(b, ticks_of(b)).wait()
            acked.append(t)
            if t == 80 or (t > 80 and j.segment_seqs()[-1] != segments[-1]):
                passed.append(t - 10)
                await j.collect(functools.partial(_constant, t - 10))
            await anyio.sleep(0)  # lets the keeper run between commits
        j.begin_close()
    await j.aclose()
    return j.stats()


async def test_power_loss_at_every_operation_of_a_preallocated_journal() -> None:
    done: list[int] = []
    full = SimulatedFileSystem()
    stats = await _preallocated_workload(full, done, [])
    assert done == list(range(1, 241))
    assert stats.segments_preallocated >= 3 and stats.spares_recycled >= 1
    # A clean close leaves no spare and no padding behind.
    left = full.listdir(JOURNAL_DIR)
    assert left and all(n.endswith(".wal") for n in left)
    for n in left:
        assert scan_frames(full.read(f"{JOURNAL_DIR}/{n}")).padding == 0
    total = len(full.ops)
    for k in range(total):
        for torn in (False, True):
            fs = SimulatedFileSystem()
            fs.crash_after(k)
            acked: list[int] = []
            passed: list[int] = []
            try:
                await _preallocated_workload(fs, acked, passed)
            except BaseException as exc:
                if not _crashed(exc):
                    raise
            image = fs.durable_image(torn=torn, rng=random.Random(k))
            replay = await Journal(image, run_sync).open(ticks_of)
            ticks = [d.tick for b in replay.batches for d in b.deltas]
            where = f"crash after op {k} ({fs.crashed_op}), torn={torn}"
            assert ticks == sorted(set(ticks)), where  # in order, each once
            horizon = passed[-1] if passed else 0
            missing = [t for t in acked if t > horizon and t not in ticks]
            assert not missing, f"{where}: acknowledged batches lost: {missing}"
            assert all(1 <= t <= 240 for t in ticks), where
            # Reopening again finds the same (the cut tail and the padding are gone).
            again = await Journal(image.durable_image(), run_sync).open(ticks_of)
            assert [b.seq for b in again.batches] == [b.seq for b in replay.batches], where


async def test_a_spare_that_cannot_be_made_costs_speed_only() -> None:
    fs = SimulatedFileSystem()
    fs.inject("write", errno.ENOSPC, path_contains="spare")  # once
    j = _inline_preallocated(fs)
    await j.open(ticks_of)
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        tg.start_soon(j.keep_spare)
        await anyio.sleep(0)  # the keeper's first try fails
        assert not j.stats().spare_ready
        await _acknowledged(j, range(1, 3))  # the first segment is created unfilled ...
        assert j.stats().segments_preallocated == 0
        for _ in range(20):  # ... and opening it asked for a spare again
            await anyio.sleep(0)
        assert j.stats().spare_ready
        await _acknowledged(j, range(3, 120))  # rotates into segments made from spares
        assert j.stats().segments_preallocated >= 1
        j.begin_close()
    await j.aclose()
    replay = await Journal(fs.durable_image(), run_sync).open(ticks_of)
    assert [d.tick for b in replay.batches for d in b.deltas] == list(range(1, 120))


async def test_withdrawing_a_dependent_never_fails_a_batch_twice() -> None:
    """A batch whose dependency failed is withdrawn from the queue (``Journal.withdraw``, the
    world's EntityMove rule). When the failed write's segment cannot even be cut back, the
    whole queue fails at once; withdrawing a dependent then must not fail it a second time
    (its hook would release its queue reservations twice)."""
    fs = SimulatedFileSystem()
    failed: list[int] = []
    j = Journal(fs, run_sync)

    def on_failed(batches: Any) -> None:
        for b in batches:
            failed.append(b.seq)
            if b.seq == first.seq:
                j.withdraw(dependent.seq, StorageUnavailable("depends on a failed batch"))

    j.on_failed = on_failed
    await j.open(ticks_of)
    started, release = threading.Event(), threading.Event()
    real_write = fs.write

    def held_write(handle: int, data: bytes | memoryview) -> None:
        started.set()
        release.wait(30)
        raise OSError(errno.EIO, "EIO")

    fs.write = held_write  # type: ignore[method-assign]
    fs.inject("truncate", errno.EIO, path_contains=".wal")
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        held = batch(j, 1)
        j.append(held, ticks_of(held))
        await anyio.to_thread.run_sync(started.wait, 30)
        # Queued behind the held write: the dependency and its dependent.
        first, dependent = batch(j, 2), batch(j, 3)
        waits = [j.append(b, ticks_of(b)) for b in (first, dependent)]
        release.set()
        for w in waits:
            with pytest.raises(StorageUnavailable):
                await w.wait()
        fs.write = real_write  # type: ignore[method-assign]
        tg.cancel_scope.cancel()
    assert sorted(failed) == [held.seq, first.seq, dependent.seq]  # each exactly once
    assert j.broken
