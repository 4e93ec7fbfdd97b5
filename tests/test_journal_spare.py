"""Preallocated journal segments when things go wrong: failures around the spare, segments
left behind by a crash or a failed delete, zeros where acknowledged frames were, and one
commit's pages persisted out of order. The cases came from a review of the change, each
reproduced first."""

from __future__ import annotations

import contextlib
import errno
import functools
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from streamer.errors import ChecksumMismatch, StorageUnavailable
from streamer.format.journal import encode_frame, scan_frames
from streamer.runtime.journal import (
    JOURNAL_DIR,
    MAX_COMMIT_BYTES,
    SPARE_NAME,
    Journal,
    JournalBatch,
    encode_batch,
    segment_name,
)
from streamer.schema.deltas import AnyDelta, TileSet
from streamer.storage.faultfs import SimulatedFileSystem
from tests.test_journal import _acknowledged, _rewrite, batch, run_sync, ticks_of


@contextlib.asynccontextmanager
async def _running(fs: SimulatedFileSystem, segment_bytes: int) -> AsyncIterator[Journal]:
    """A preallocating journal, its writer and keeper running and a spare ready; closed
    when the block ends."""
    j = Journal(fs, run_sync, segment_bytes=segment_bytes, preallocate=True)
    await j.open(ticks_of)
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        tg.start_soon(j.keep_spare)
        await _wait_ready(j)
        yield j
        j.begin_close()
    await j.aclose()


def _frame(seq: int) -> bytes:
    deltas: list[AnyDelta] = [TileSet(tick=seq, x=0, y=0, tile=1)]
    return encode_frame(encode_batch(JournalBatch(seq=seq, deltas=deltas)))


def _segments_on_disk(fs: SimulatedFileSystem, *contents: bytes) -> None:
    """Segments 1, 2, ... holding ``contents``, synced, their names durable."""
    fs.makedirs(JOURNAL_DIR)
    for seq, data in enumerate(contents, start=1):
        h = fs.create(segment_name(seq))
        fs.write(h, data)
        fs.fsync(h)
        fs.close(h)
    fs.fsync_dir(JOURNAL_DIR)


async def _wait_ready(j: Journal) -> None:
    with anyio.fail_after(10):
        while not j.stats().spare_ready:
            await anyio.sleep(0.001)


async def test_an_unacknowledged_commit_persisted_out_of_order_is_a_torn_tail() -> None:
    """Power loss during one commit's fdatasync over preallocated zeros: the device persisted
    the commit's second 4 KiB page but not its first. Nothing of it was acknowledged, so
    this is a torn tail (an append cannot leave this shape: its size commits after the
    data), and the intact frames after the hole are discarded with it."""
    fs = SimulatedFileSystem()
    async with _running(fs, 1 << 20) as j:
        await _acknowledged(j, range(1, 4))  # acknowledged, durable
        assert j.stats().segments_preallocated == 1
        acked = fs.durable_image()
        # One group of many batches (not awaited one by one: they share one commit).
        pend = []
        for t in range(4, 400):
            b = batch(j, t)
            pend.append(j.append(b, ticks_of(b)))
        for p in pend:
            await p.wait()
    name = segment_name(1)
    before = acked.read(name)
    acked_len = scan_frames(before).valid_length
    after = fs.read(name)  # the full group, as it was in the page cache
    page = (acked_len // 4096 + 1) * 4096
    assert scan_frames(after).valid_length > page + 4096
    # Pages before `page` keep their old (durable) content, the rest of the group landed.
    torn = before[:page] + after[page : page + 4096] + before[page + 4096 :]
    _rewrite(acked, name, torn)
    assert scan_frames(torn).frames_after_tear > 0
    replay = await Journal(acked, run_sync, preallocate=True).open(ticks_of)
    assert [d.tick for b in replay.batches for d in b.deltas] == [1, 2, 3]


async def test_intact_frames_beyond_one_commit_after_a_hole_are_damage() -> None:
    """The same hole, but intact frames more than one commit's bytes (MAX_COMMIT_BYTES)
    after it: no single commit wrote them, so they were acknowledged; open refuses."""
    fs = SimulatedFileSystem()
    frames = [_frame(t) for t in range(1, 40_000)]
    data = b"".join(frames)
    hole = len(frames[0])  # the second frame's first bytes are gone
    segment = data[:hole] + bytes(64) + data[hole + 64 :]
    assert len(segment) - hole > MAX_COMMIT_BYTES
    _segments_on_disk(fs, segment + bytes(4096))  # zeros after: a preallocated segment
    with pytest.raises(ChecksumMismatch, match="acknowledged"):
        await Journal(fs, run_sync, preallocate=True).open(ticks_of)
    assert fs.size(segment_name(1)) == len(segment) + 4096  # nothing cut


@pytest.mark.parametrize("op", ["replace", "open_write"])
async def test_a_spare_that_cannot_be_taken_costs_no_commit(op: str) -> None:
    """Preallocation only ever costs speed: when the spare cannot be renamed or opened, the
    segment is created as without it (under a new name, as a failed open may leave a file
    of zeros under the first)."""
    fs = SimulatedFileSystem()
    async with _running(fs, 4096) as j:
        fs.inject(op, errno.EIO, path_contains="spare.zero" if op == "replace" else ".wal")
        await _acknowledged(j, range(1, 3))
        assert j.stats().segments_preallocated == 0
    replay = await Journal(fs.durable_image(), run_sync, preallocate=True).open(ticks_of)
    assert [d.tick for b in replay.batches for d in b.deltas] == [1, 2]


async def test_zeros_after_the_frames_of_an_older_segment_are_damage_not_padding() -> None:
    """Acknowledged frames at the end of an older segment read back as zeros (lost writes):
    an older segment is trimmed when closed, so that is damage; open refuses and cuts
    nothing."""
    fs = SimulatedFileSystem()
    seg1 = b"".join(_frame(s) for s in (1, 2, 3))
    lost = len(_frame(3))
    _segments_on_disk(fs, seg1[:-lost] + bytes(lost), _frame(4))
    with pytest.raises(ChecksumMismatch, match="acknowledged"):
        await Journal(fs, run_sync, preallocate=True).open(ticks_of)
    assert fs.size(segment_name(1)) == len(seg1)  # the evidence is kept


class _CrashBeforeDeletingSeg1(SimulatedFileSystem):
    """collect()'s rename/unlink of segment 1 waits (its thread hop being slow) until the test
    releases it; the power-loss image is taken right then, before it takes effect."""

    image: SimulatedFileSystem | None = None

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.blocked = threading.Event()
        self.release = threading.Event()

    def _hold(self, path: str) -> None:
        if path == segment_name(1) and self.image is None:
            self.blocked.set()
            self.release.wait(10)
            self.image = self.durable_image()

    def replace(self, src: str, dst: str) -> None:
        self._hold(src)
        super().replace(src, dst)

    def unlink(self, path: str) -> None:
        self._hold(path)
        super().unlink(path)


@pytest.mark.parametrize("spare_first", [False, True])
async def test_power_loss_before_a_passed_segment_is_deleted_keeps_the_world_openable(
    spare_first: bool,
) -> None:
    """collect() closes a fully passed preallocated active segment, then deletes (or
    recycles) it on a thread after releasing the I/O lock; a batch arriving meanwhile opens
    segment 2 first. A power loss there leaves segment 1 before segment 2: it was trimmed
    when closed, so it opens as an ordinary older segment."""
    fs = _CrashBeforeDeletingSeg1()
    async with _running(fs, 1 << 16) as j:
        await _acknowledged(j, range(1, 4))  # segment 1, from the spare, padded
        if spare_first:
            await _wait_ready(j)
        async with anyio.create_task_group() as inner:
            inner.start_soon(functools.partial(j.collect, lambda r: 3, everything=True))
            with anyio.fail_after(5):
                while not fs.blocked.is_set():
                    await anyio.sleep(0.001)
            await _acknowledged(j, range(10, 11))  # opens segment 2, acknowledged
            fs.release.set()
    assert fs.image is not None
    assert segment_name(1).rpartition("/")[2] in fs.image.listdir(JOURNAL_DIR)
    replay = await Journal(fs.image, run_sync, preallocate=True).open(ticks_of)
    assert [b.seq for b in replay.batches][-1] == 4


async def test_a_failed_delete_of_a_passed_segment_keeps_the_world_openable() -> None:
    """collect() closes segment 1 and fails to delete it (StorageUnavailable, which is
    safe); the world goes on into segment 2 and closes; it reopens with both."""
    fs = SimulatedFileSystem()
    async with _running(fs, 1 << 16) as j:
        await _acknowledged(j, range(1, 4))
        await _wait_ready(j)  # spare ready again -> collect unlinks instead of recycling
        fs.inject("unlink", errno.EIO, path_contains="00000000000000000001.wal")
        with pytest.raises(StorageUnavailable):
            await j.collect(lambda r: 3, everything=True)
        await _acknowledged(j, range(4, 6))  # segment 2
    replay = await Journal(fs.durable_image(), run_sync, preallocate=True).open(ticks_of)
    assert [d.tick for b in replay.batches for d in b.deltas] == [1, 2, 3, 4, 5]


class _NoRenameBack(SimulatedFileSystem):
    """Renaming a segment back to the spare's name fails (a second fault in a row)."""

    def replace(self, src: str, dst: str) -> None:
        if dst == SPARE_NAME and src.endswith(".wal"):
            raise OSError(errno.EIO, "injected: rename back failed", src)
        super().replace(src, dst)


@pytest.mark.parametrize("fs_type", [SimulatedFileSystem, _NoRenameBack], ids=["back", "gone"])
async def test_a_spare_whose_segment_could_not_start_leaves_no_segment(
    fs_type: type[SimulatedFileSystem],
) -> None:
    """The writer renames the spare to segment 1 and the directory sync fails: that group
    fails and the file goes back to the spare's name, or, if that rename fails too, is
    unlinked, so no older segment of zeros alone (damage, to the scan) is left behind when
    segment 2's name becomes durable."""
    fs = fs_type()
    async with _running(fs, 1 << 16) as j:
        fs.inject("fsync_dir", errno.EIO, path_contains="journal")
        b = batch(j, 1)
        with pytest.raises(StorageUnavailable):
            await j.append(b, ticks_of(b)).wait()
        await _acknowledged(j, range(2, 4))
        image = fs.durable_image()
    assert segment_name(1).rpartition("/")[2] not in image.listdir(JOURNAL_DIR)
    replay = await Journal(image, run_sync, preallocate=True).open(ticks_of)
    assert [d.tick for b in replay.batches for d in b.deltas] == [2, 3]


async def test_an_older_segment_of_zeros_alone_is_damage() -> None:
    """Nothing the journal does leaves one (closed segments are cut, a spare that could not
    become a segment is renamed back or removed): a whole segment of zeros is acknowledged
    data gone."""
    fs = SimulatedFileSystem()
    _segments_on_disk(fs, bytes(300), _frame(2))
    with pytest.raises(ChecksumMismatch, match="acknowledged"):
        await Journal(fs, run_sync, preallocate=True).open(ticks_of)


class _ImageAfterFirstSpareSync(SimulatedFileSystem):
    image: SimulatedFileSystem | None = None

    def fdatasync(self, handle: int) -> None:
        super().fdatasync(handle)
        if self._handle(handle).path == SPARE_NAME and self.image is None:
            self.image = self.durable_image()


async def test_a_failed_collect_after_recycling_then_power_loss_still_opens() -> None:
    """collect() renames passed segment 1 onto the spare and its directory sync fails; the
    keeper then zero-fills that file. It syncs the directory first, so a power loss during
    the fill cannot leave segment 1's name on zeros followed by its old frames."""
    fs = _ImageAfterFirstSpareSync()
    j = Journal(fs, run_sync, segment_bytes=4 << 20, preallocate=True)
    await j.open(ticks_of)
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)  # no keeper yet (as after a failed try): no spare ready
        for t in range(1, 160):
            b = _batch_of(j, t, 400)
            await j.append(b, ticks_of(b)).wait()
        fs.inject("fsync_dir", errno.EIO, path_contains="journal")
        with pytest.raises(StorageUnavailable):
            await j.collect(functools.partial(_constant, 10**9))  # rotates, recycles
        tg.start_soon(j.keep_spare)
        with anyio.fail_after(20):
            while fs.image is None:
                await anyio.sleep(0.005)
        j.begin_close()
    await j.aclose()
    assert fs.image is not None
    # Every batch in segment 1 had been folded: the world opens.
    await Journal(fs.image, run_sync, preallocate=True).open(ticks_of)


async def _interval_journal(fs: SimulatedFileSystem, preallocate: bool) -> Journal:
    j = Journal(
        fs,
        run_sync,
        durability="interval",
        fsync_interval_ms=60_000,
        segment_bytes=1 << 20,
        preallocate=preallocate,
    )
    await j.open(ticks_of)
    return j


async def _two_batches_unsynced(j: Journal, tg: anyio.abc.TaskGroup) -> None:
    """Start the writer (and keeper) in ``tg``; acknowledge ticks 1 and 2, left unsynced."""
    tg.start_soon(j.run)
    tg.start_soon(j.keep_spare)
    if j._preallocate:
        await _ready(j)
    await _acknowledged(j, range(1, 3))
    assert j.stats().unsynced_bytes > 0


@pytest.mark.parametrize("preallocate", [False, True])
async def test_interval_mode_stops_when_a_sync_of_acknowledged_bytes_fails(
    preallocate: bool,
) -> None:
    """Interval mode: batches acknowledged unsynced, then the commit that carries the due
    sync fails. Those bytes may be gone; the journal stops rather than go on acknowledging
    (and never retries the sync on the same data)."""
    fs = SimulatedFileSystem()
    j = await _interval_journal(fs, preallocate)
    async with anyio.create_task_group() as tg:
        await _two_batches_unsynced(j, tg)
        j._last_sync -= 1000  # the interval is due, as under steady load
        fs.inject("fdatasync", errno.EIO, path_contains=".wal")
        b = batch(j, 3)
        with pytest.raises(StorageUnavailable):
            await j.append(b, ticks_of(b)).wait()
        assert j.broken
        with pytest.raises(StorageUnavailable, match="unusable"):
            j.append(batch(j, 4), ticks_of(batch(j, 4)))
        image = fs.durable_image()
        j.begin_close()
    await j.aclose()
    await Journal(image, run_sync, preallocate=True).open(ticks_of)  # what did persist opens


@pytest.mark.parametrize("due", [False, True], ids=["write-alone", "write-with-due-sync"])
@pytest.mark.parametrize("preallocate", [False, True])
async def test_interval_mode_goes_on_after_a_failed_write(preallocate: bool, due: bool) -> None:
    """Interval mode: batches acknowledged unsynced, then a commit's write fails (ENOSPC).
    The acknowledged bytes before it are intact in the page cache: the failed batch alone
    fails, the cut back to them syncs them, and the journal goes on acknowledging."""
    fs = SimulatedFileSystem()
    j = await _interval_journal(fs, preallocate)
    async with anyio.create_task_group() as tg:
        await _two_batches_unsynced(j, tg)
        if due:
            j._last_sync -= 1000
        fs.inject("write", errno.ENOSPC, path_contains=".wal")  # once
        b = batch(j, 3)
        with pytest.raises(StorageUnavailable, match=r"ENOSPC|No space"):
            await j.append(b, ticks_of(b)).wait()
        await j.barrier()  # the waiter hears of the failure before the segment is cut
        assert not j.broken
        assert j.stats().unsynced_bytes == 0
        # Acknowledged before the failure: durable now, without waiting for the interval.
        replay = await Journal(fs.durable_image(), run_sync, preallocate=True).open(ticks_of)
        assert [x.deltas[0].tick for x in replay.batches] == [1, 2]
        await _acknowledged(j, range(4, 6))
        j.begin_close()
    await j.aclose()
    replay = await Journal(fs.durable_image(), run_sync, preallocate=True).open(ticks_of)
    assert [x.deltas[0].tick for x in replay.batches] == [1, 2, 4, 5]


class _MidSyncFS(SimulatedFileSystem):
    """At the start of every segment sync, the torn images a power loss there could leave
    (12 seeds of the page model), each with the highest tick a completed sync covered."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, SimulatedFileSystem, int]] = []
        self.durable_upto = 0

    def fdatasync(self, handle: int) -> None:
        path = self._handle(handle).path
        if path.endswith(".wal"):
            for seed in range(12):
                image = self.durable_image(torn=True, rng=random.Random(seed))
                self.images.append((f"sync of {path}, seed {seed}", image, self.durable_upto))
        super().fdatasync(handle)


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _constant(value: int, _region: tuple[int, int]) -> int:
    return value


def _batch_of(j: Journal, tick: int, n: int) -> JournalBatch:
    deltas: list[AnyDelta] = [TileSet(tick=tick, x=i % 500, y=0, tile=7) for i in range(n)]
    return JournalBatch(seq=j.next_seq(), deltas=deltas)


async def _every_image_opens(fs: _MidSyncFS) -> None:
    assert fs.images
    for where, image, upto in fs.images:
        try:  # opened as the journal that wrote it: preallocating
            replay = await Journal(image, run_sync, preallocate=True).open(ticks_of)
        except ChecksumMismatch as exc:
            raise AssertionError(f"{where}: a healthy journal refused: {exc}") from None
        ticks = {d.tick for b in replay.batches for d in b.deltas}
        lost = [t for t in range(1, upto + 1) if t not in ticks]
        assert not lost, f"{where}: synced ticks lost: {lost[:5]}"


async def _ready(j: Journal) -> None:
    with anyio.fail_after(30):
        while not j.stats().spare_ready:
            await anyio.sleep(0.001)


async def test_interval_mode_never_leaves_more_than_one_commit_in_flight() -> None:
    """A burst of ~2.5 MiB in interval mode: commits of up to 1 MiB are acknowledged before
    their sync; what is unsynced is synced before the next commit would take it past
    MAX_COMMIT_BYTES, so a power loss inside any sync leaves a tail the scan can judge."""
    fs = _MidSyncFS()
    j = Journal(
        fs,
        _inline,
        durability="interval",
        fsync_interval_ms=60_000,
        segment_bytes=8 << 20,
        preallocate=True,
        collect_run_sync=_inline,
    )
    await j.open(ticks_of)
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        tg.start_soon(j.keep_spare)
        await _ready(j)
        fs.images.clear()
        pending = []
        for t in range(1, 2600):
            b = _batch_of(j, t, 40)  # ~1 KiB a frame
            pending.append(j.append(b, ticks_of(b)))
        for p in pending:
            await p.wait()
        assert j.stats().fsyncs >= 2  # synced on the way, not only at close
        j.begin_close()
    await j.aclose()
    await _every_image_opens(fs)


@pytest.mark.parametrize("segment_kib", [64, 68])
async def test_a_commit_crossing_the_segment_size_still_has_zeros_after_it(
    segment_kib: int,
) -> None:
    """Sync mode, commits of five ~3.7 KiB batches: the one that crosses segment_bytes is
    still written inside the spare (segment_bytes + MAX_COMMIT_BYTES + a page long)."""
    fs = _MidSyncFS()
    j = Journal(
        fs, _inline, segment_bytes=segment_kib << 10, preallocate=True, collect_run_sync=_inline
    )
    await j.open(ticks_of)
    tick = 0
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        tg.start_soon(j.keep_spare)
        for _ in range(6):
            await _ready(j)
            pending = []
            for _ in range(5):
                tick += 1
                b = _batch_of(j, tick, 150)
                pending.append(j.append(b, ticks_of(b)))
            for p in pending:
                await p.wait()
            fs.durable_upto = tick
        assert j.stats().segments_preallocated >= 2  # it did rotate
        j.begin_close()
    await j.aclose()
    await _every_image_opens(fs)


async def test_a_failed_sync_leaves_an_older_segment_cut_to_what_was_acknowledged() -> None:
    """A commit's fdatasync fails in a preallocated segment: that batch fails, the segment
    is cut back to the acknowledged bytes and abandoned, and the next batch goes to a new
    one. A power loss then finds the older segment without zeros after its frames."""
    fs = SimulatedFileSystem()
    async with _running(fs, 1 << 20) as j:
        await _acknowledged(j, range(1, 4))
        fs.inject("fdatasync", errno.EIO, path_contains=".wal")  # once
        b = batch(j, 4)
        with pytest.raises(StorageUnavailable):
            await j.append(b, ticks_of(b)).wait()
        await _acknowledged(j, range(5, 6))
        assert len(j.segment_seqs()) == 2
        image = fs.durable_image()
    replay = await Journal(image, run_sync, preallocate=True).open(ticks_of)
    assert [d.tick for b in replay.batches for d in b.deltas] == [1, 2, 3, 5]


async def test_without_preallocation_damage_before_a_zero_tail_is_refused() -> None:
    """An appended journal (the default): 8 batches synced, a bit of frame 2 rots, and a
    crash leaves a page of zeros at the end (a file system that persisted the size before
    the data). That is not the preallocated last-commit shape: open refuses, as before."""
    fs = SimulatedFileSystem()
    j = Journal(fs, run_sync)  # preallocate=False
    await j.open(ticks_of)
    async with anyio.create_task_group() as tg:
        tg.start_soon(j.run)
        await _acknowledged(j, range(1, 9))
        j.begin_close()
    await j.aclose()
    seg = segment_name(1)
    full = fs.read(seg)
    bad = bytearray(full)
    bad[len(full) // 8 + 20] ^= 0x01
    image = fs.durable_image()
    _rewrite(image, seg, bytes(bad) + bytes(4096))
    with pytest.raises(ChecksumMismatch, match="acknowledged"):
        await Journal(image, run_sync).open(ticks_of)
    # The same bytes, judged for a preallocating journal: its torn last commit.
    preallocating = Journal(image, run_sync, preallocate=True)
    assert [b.seq for b in (await preallocating.open(ticks_of)).batches] == [1]
