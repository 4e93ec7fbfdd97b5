"""Batched world flushes (``_FlushPath._flush_regions``): batches, per-region failures, snapshots.

A flush splits the dirty regions into lanes of batches: ``lanes = 1`` if
``flush_concurrency < 2``, else ``max(2, ceil(flush_concurrency / 16))``, and batches of
``flush_concurrency // lanes`` regions (at most 16). Each batch is written with one
``LocalStore.put_many_atomic`` call (one worker-thread hop, one directory fsync). These
tests spy on the real store through class-level monkeypatches (the world builds its own
``LocalStore``), inject faults at the store's blocking helpers or in memory, and read
region files back from disk. No assertion depends on timing: short sleeps only give a
wrong ordering the chance to show, and ``anyio.fail_after`` only guards against a hang.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from streamer import Feature, FeatureAdd, IntegrityError, StorageUnavailable, TileSet, open_world
from streamer.config import Config, RuntimeSettings, ScrubSettings, StorageSettings
from streamer.coords import CHUNK_SIZE
from streamer.errors import StorageError
from streamer.format.region import decode_region, region_key
from streamer.runtime.world import World
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world

SEED = 11
#: Chunks per region side (``create_world``'s default).
RS = 8
REGION_TILES = RS * CHUNK_SIZE
#: 40 regions around the origin (negative coordinates included).
REGIONS: list[tuple[int, int]] = [(rx, ry) for ry in range(-2, 3) for rx in range(-4, 4)]
#: Hang guard only.
GUARD = 10


def cfg(
    *, fsync: bool = False, flush_concurrency: int = 16, flush_interval_ms: int = 3_600_000
) -> Config:
    # By default an interval of an hour: only explicit flush() (and close) writes regions.
    return Config(
        runtime=RuntimeSettings(
            flush_interval_ms=flush_interval_ms, flush_concurrency=flush_concurrency
        ),
        storage=StorageSettings(fsync=fsync),
        scrub=ScrubSettings(interval_s=0),
    )


async def new_world(path: Path) -> Path:
    store = await LocalStore.open(path, fsync=False)
    await create_world(store, seed=SEED, region_size=RS)
    await store.aclose()
    return path


def chunk_of(region: tuple[int, int]) -> tuple[int, int]:
    """The chunk of ``region`` every test edit lands in (its lowest corner chunk)."""
    return region[0] * RS, region[1] * RS


def tile_value(i: int, tick: int) -> int:
    return 1000 + 100 * tick + i


def edits(regions: Sequence[tuple[int, int]], tick: int) -> list[TileSet | FeatureAdd]:
    """Per region: one tile edit and one feature, both in the region's corner chunk."""
    out: list[TileSet | FeatureAdd] = []
    for i, (rx, ry) in enumerate(regions):
        x0, y0 = rx * REGION_TILES, ry * REGION_TILES
        out.append(TileSet(tick=tick, x=x0 + tick, y=y0 + 5, tile=tile_value(i, tick)))
        feature = Feature(id=f"f-{i}-{tick}", kind="well", x=x0 + 20 + tick, y=y0 + 20)
        out.append(FeatureAdd(tick=tick, feature=feature))
    return out


async def check_edits(
    world: World, regions: Sequence[tuple[int, int]], ticks: Iterable[int]
) -> None:
    """Every edit of ``ticks`` reads back, each feature exactly once."""
    ticks = list(ticks)
    for i, region in enumerate(regions):
        c = await world.chunk(*chunk_of(region))
        for t in ticks:
            assert int(c.tiles[5, t]) == tile_value(i, t), (region, t)
            assert [f.id for f in c.features].count(f"f-{i}-{t}") == 1, (region, t)


def lpt_on_disk(root: Path, region: tuple[int, int]) -> int | None:
    """The region file's ``last_processed_tick`` (None: no file)."""
    key = region_key(*region)
    p = root / key
    if not p.exists():
        return None
    rf = decode_region(p.read_bytes(), rx=region[0], ry=region[1], path=key)
    return rf.header.last_processed_tick


def lpts(root: Path, regions: Iterable[tuple[int, int]]) -> dict[tuple[int, int], int | None]:
    return {r: lpt_on_disk(root, r) for r in regions}


class PutSpy:
    """Class-level spy on ``LocalStore.put_many_atomic``: every call's keys, the items in
    flight at once, optional gates (hold call ``i``) and injected errors (call ``i`` raises)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[list[str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.active = 0
        self.entered = 0
        self.entered_changed = anyio.Event()
        self.gates: dict[int, anyio.Event] = {}
        self.raises: dict[int, Exception] = {}
        orig = LocalStore.put_many_atomic
        spy = self

        async def put_many_atomic(
            self: LocalStore, items: Sequence[tuple[str, bytes]]
        ) -> list[str | StorageError]:
            i = len(spy.calls)
            spy.calls.append([key for key, _ in items])
            spy.in_flight += len(items)
            spy.max_in_flight = max(spy.max_in_flight, spy.in_flight)
            spy.active += 1
            spy.entered += 1
            spy.entered_changed.set()
            spy.entered_changed = anyio.Event()
            try:
                gate = spy.gates.get(i)
                if gate is not None:
                    await gate.wait()
                exc = spy.raises.get(i)
                if exc is not None:
                    raise exc
                return await orig(self, items)
            finally:
                spy.active -= 1
                spy.in_flight -= len(items)

        monkeypatch.setattr(LocalStore, "put_many_atomic", put_many_atomic)

    async def wait_entered(self, n: int) -> None:
        while self.entered < n:
            await self.entered_changed.wait()

    @property
    def keys(self) -> list[str]:
        return [key for call in self.calls for key in call]


# -- 1. batching ----------------------------------------------------------------------------


async def test_one_flush_writes_40_regions_in_five_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flush_concurrency=16: batches of 8, so 40 regions take 5 put_many_atomic calls and 5
    directory fsyncs of ``regions``; every region is written exactly once."""
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg(fsync=True)) as world:
        await world.submit(edits(REGIONS, 1))
        assert world.stats().dirty_regions == len(REGIONS)
        spy = PutSpy(monkeypatch)
        synced: list[str] = []
        orig_sync_dir = LocalStore._sync_dir

        def sync_dir(self: LocalStore, path: str) -> None:
            synced.append(path)
            orig_sync_dir(self, path)

        monkeypatch.setattr(LocalStore, "_sync_dir", sync_dir)
        flushes = world.stats().flushes
        with anyio.fail_after(GUARD):
            await world.flush()
        assert len(spy.calls) == 5  # ceil(40 / 8)
        assert all(0 < len(call) <= 8 for call in spy.calls), spy.calls
        assert sorted(spy.keys) == sorted(region_key(*r) for r in REGIONS)  # each once
        # At most flush_concurrency regions in flight (two lanes of 8).
        assert spy.max_in_flight <= 16
        assert synced.count("regions") == 5, synced
        assert world.stats().flushes == flushes + len(REGIONS)
        assert world.stats().flush_errors == 0
        assert world.stats().dirty_regions == 0
        assert set(lpts(tmp_path, REGIONS).values()) == {1}
        await check_edits(world, REGIONS, [1])
    monkeypatch.undo()
    async with open_world(tmp_path, cfg()) as world:
        assert world.stats().replayed_deltas == 0  # all of it came from the region files
        await check_edits(world, REGIONS, [1])


@pytest.mark.parametrize(("fc", "size"), [(1, 1), (3, 1), (5, 2), (17, 8), (40, 13)])
async def test_batch_size_follows_flush_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fc: int, size: int
) -> None:
    """Regions go in lanes of ``flush_concurrency // lanes`` (two lanes, more once a lane
    would pass 16 regions), so never more than ``flush_concurrency`` are in flight."""
    await new_world(tmp_path)
    regions = REGIONS[:5] if fc == 1 else REGIONS
    async with open_world(tmp_path, cfg(flush_concurrency=fc)) as world:
        await world.submit(edits(regions, 1))
        spy = PutSpy(monkeypatch)
        with anyio.fail_after(GUARD):
            await world.flush()
        assert len(spy.calls) == -(-len(regions) // size)
        assert max(len(call) for call in spy.calls) == size
        assert sorted(spy.keys) == sorted(region_key(*r) for r in regions)
        assert spy.max_in_flight <= fc
        if fc == 1:
            assert spy.max_in_flight == 1
        await check_edits(world, regions, [1])


# -- 2. one region's write fails ------------------------------------------------------------


async def test_one_failed_write_fails_that_region_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await new_world(tmp_path)
    bad = REGIONS[13]
    bad_key = region_key(*bad)
    async with open_world(tmp_path, cfg()) as world:
        await world.submit(edits(REGIONS, 1))
        await world.flush()
        assert set(lpts(tmp_path, REGIONS).values()) == {1}
        await world.submit(edits(REGIONS, 2))

        injected: list[str] = []
        orig_create_temp = LocalStore._create_temp

        def create_temp(self: LocalStore, key: str) -> tuple[str, int]:
            if key == bad_key and not injected:
                injected.append(key)
                raise OSError(errno.EIO, "injected I/O error")
            return orig_create_temp(self, key)

        monkeypatch.setattr(LocalStore, "_create_temp", create_temp)
        spy = PutSpy(monkeypatch)
        errors = world.stats().flush_errors
        with anyio.fail_after(GUARD), pytest.raises(StorageUnavailable) as caught:
            await world.flush()
        assert injected == [bad_key]
        assert not isinstance(caught.value, BaseExceptionGroup)
        assert caught.value.key == bad_key
        assert world.stats().flush_errors == errors + 1
        assert len(spy.calls) == 5  # the failure did not split or retry the batch
        # Every other region's file advanced; the failed one kept its old file.
        on_disk = lpts(tmp_path, REGIONS)
        assert on_disk[bad] == 1
        assert {r: t for r, t in on_disk.items() if r != bad} == {r: 2 for r in REGIONS if r != bad}
        # Its deltas are still queued (and journaled): reads see them.
        assert world.stats().dirty_regions == 1
        await check_edits(world, REGIONS, [1, 2])

        with anyio.fail_after(GUARD):
            await world.flush()  # the fault fired once: this writes it
        assert lpt_on_disk(tmp_path, bad) == 2
        assert spy.calls[5:] == [[bad_key]]
        assert world.stats().dirty_regions == 0
        assert world.stats().flush_errors == errors + 1
    monkeypatch.undo()
    async with open_world(tmp_path, cfg()) as world:
        assert world.stats().replayed_deltas == 0
        await check_edits(world, REGIONS, [1, 2])


async def test_failed_region_is_not_lost_if_closed_before_the_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failed region's deltas stay journaled: a crash-free close retries (final flush);
    even without it (store refusing at close), reopening replays them."""
    await new_world(tmp_path)
    bad = REGIONS[0]
    bad_key = region_key(*bad)
    orig_create_temp = LocalStore._create_temp

    def create_temp(self: LocalStore, key: str) -> tuple[str, int]:
        if key == bad_key:
            raise OSError(errno.EIO, "injected I/O error")
        return orig_create_temp(self, key)

    monkeypatch.setattr(LocalStore, "_create_temp", create_temp)
    with pytest.raises(StorageUnavailable):
        async with open_world(tmp_path, cfg()) as world:
            await world.submit(edits(REGIONS[:10], 1))
            with pytest.raises(StorageUnavailable):
                await world.flush()
            # aclose's final flush fails on the same region and re-raises.
    monkeypatch.undo()
    assert lpt_on_disk(tmp_path, bad) is None
    assert set(lpts(tmp_path, REGIONS[1:10]).values()) == {1}
    async with open_world(tmp_path, cfg()) as world:
        assert world.stats().replayed_deltas > 0  # the bad region's deltas, from the journal
        await check_edits(world, REGIONS[:10], [1])
        await world.flush()
        assert lpt_on_disk(tmp_path, bad) == 1
    async with open_world(tmp_path, cfg()) as world:
        assert world.stats().replayed_deltas == 0
        await check_edits(world, REGIONS[:10], [1])


# -- 3. a whole batch fails -----------------------------------------------------------------


async def test_batch_wide_failure_fails_its_regions_only_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg()) as world:
        await world.submit(edits(REGIONS, 1))
        await world.flush()
        await world.submit(edits(REGIONS, 2))
        spy = PutSpy(monkeypatch)
        spy.raises[0] = StorageUnavailable("injected: store gone for this batch")
        errors = world.stats().flush_errors
        with anyio.fail_after(GUARD), pytest.raises(StorageUnavailable) as caught:
            await world.flush()
        assert not isinstance(caught.value, BaseExceptionGroup)
        assert "injected" in str(caught.value)
        assert len(spy.calls) == 5  # the other lanes' batches still ran
        failed = {k for k in spy.calls[0]}
        assert len(failed) == 8
        assert world.stats().flush_errors == errors + 8  # each region of that batch
        assert world.stats().dirty_regions == 8
        on_disk = lpts(tmp_path, REGIONS)
        assert {region_key(*r) for r, t in on_disk.items() if t == 1} == failed
        assert {region_key(*r) for r, t in on_disk.items() if t == 2} == (
            {region_key(*r) for r in REGIONS} - failed
        )
        await check_edits(world, REGIONS, [1, 2])

        with anyio.fail_after(GUARD):
            await world.flush()
        assert sorted(spy.keys[40:]) == sorted(failed)
        assert set(lpts(tmp_path, REGIONS).values()) == {2}
        assert world.stats().dirty_regions == 0
    monkeypatch.undo()
    async with open_world(tmp_path, cfg()) as world:
        assert world.stats().replayed_deltas == 0
        await check_edits(world, REGIONS, [1, 2])


# -- 4. a fold fails ------------------------------------------------------------------------


async def test_fold_integrity_error_fails_that_region_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored chunk payload that does not decode fails its region's fold (IntegrityError);
    the other regions of the same batch and of the other batches are written."""
    await new_world(tmp_path)
    bad = REGIONS[5]
    ck = chunk_of(bad)
    async with open_world(tmp_path, cfg()) as world:
        await world.submit(edits(REGIONS, 1))
        await world.flush()
    async with open_world(tmp_path, cfg()) as world:
        # Reopened: the bad chunk's payload was never checked, so the flush's in-memory
        # upgrade looks at it too (and must leave the error to the fold).
        await world.submit(edits(REGIONS, 2))
        state = world._regions[bad]
        good_payload = state.chunks[ck]
        assert ck not in state.checked
        state.chunks[ck] = b"garbage, not a chunk record"
        spy = PutSpy(monkeypatch)
        errors = world.stats().flush_errors
        with anyio.fail_after(GUARD), pytest.raises(IntegrityError) as caught:
            await world.flush()
        assert not isinstance(caught.value, BaseExceptionGroup)
        assert world.stats().flush_errors == errors + 1
        assert region_key(*bad) not in spy.keys
        assert sorted(spy.keys) == sorted(region_key(*r) for r in REGIONS if r != bad)
        on_disk = lpts(tmp_path, REGIONS)
        assert on_disk[bad] == 1
        assert all(t == 2 for r, t in on_disk.items() if r != bad)
        assert world.stats().dirty_regions == 1

        state.chunks[ck] = good_payload  # "repaired": the next flush folds the same deltas
        with anyio.fail_after(GUARD):
            await world.flush()
        assert lpt_on_disk(tmp_path, bad) == 2
        await check_edits(world, REGIONS, [1, 2])
    monkeypatch.undo()
    async with open_world(tmp_path, cfg()) as world:
        assert world.stats().replayed_deltas == 0
        await check_edits(world, REGIONS, [1, 2])


# -- 5. snapshots pause flushing ------------------------------------------------------------


async def test_taking_every_flush_token_waits_for_the_batches_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``Snapshotter._paused`` does (take every token of ``_flush_limiter``) waits for
    the batches inside ``put_many_atomic``; while it holds them no batch writes; no deadlock."""
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg()) as world:
        await world.submit(edits(REGIONS, 1))
        spy = PutSpy(monkeypatch)
        gate = anyio.Event()
        spy.gates[0] = gate
        spy.gates[1] = gate
        limiter = world._flush_limiter
        total = int(limiter.total_tokens)
        log: list[str] = []
        paused = anyio.Event()
        resume = anyio.Event()
        flushed = anyio.Event()
        writes_in_pause: list[int] = []

        async def flush() -> None:
            await world.flush()
            log.append("flushed")
            flushed.set()

        async def pause() -> None:
            borrowers: list[object] = []
            try:
                for _ in range(total):
                    b = object()
                    await limiter.acquire_on_behalf_of(b)
                    borrowers.append(b)
                log.append("paused")
                writes_in_pause.append(spy.active)
                entered = spy.entered
                paused.set()
                await resume.wait()
                writes_in_pause.append(spy.entered - entered)
            finally:
                for b in borrowers:
                    limiter.release_on_behalf_of(b)
                log.append("resumed")

        try:
            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(flush)
                    await spy.wait_entered(2)  # both lanes are inside put_many_atomic
                    assert spy.active == 2
                    assert limiter.borrowed_tokens == 2  # one token per batch, not per region
                    tg.start_soon(pause)
                    # The pauser takes the free tokens, then has to wait for the batches'.
                    while limiter.statistics().tasks_waiting == 0:
                        await anyio.sleep(0.001)
                    assert limiter.borrowed_tokens == total
                    await anyio.sleep(0.02)
                    assert not paused.is_set() and not flushed.is_set()
                    log.append("gate")
                    gate.set()
                    await paused.wait()
                    # Paused: no batch is inside the store, and none starts while paused.
                    await anyio.sleep(0.02)
                    assert not flushed.is_set()
                    resume.set()
        finally:
            # On a failed assertion: let everything finish, or closing the world (its final
            # flush is shielded) would wait at the gate forever.
            gate.set()
            resume.set()
        assert writes_in_pause == [0, 0]
        assert log.index("gate") < log.index("paused") < log.index("resumed")
        assert log.index("resumed") < log.index("flushed")  # 40 regions: batches left
        assert sorted(spy.keys) == sorted(region_key(*r) for r in REGIONS)
        assert limiter.borrowed_tokens == 0
        await check_edits(world, REGIONS, [1])


# -- 6. _flush_region (live migration's single-region flush) --------------------------------


async def test_flush_concurrency_bounds_every_flush_of_the_world_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two flushes at once (the timer's and flush(), say), each in two lanes of two: at most
    ``flush_concurrency`` (4) regions are being written at any moment, not 4 per flush."""
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg(flush_concurrency=4)) as world:
        await world.submit(edits(REGIONS[:16], 1))
        queues = sorted(world._queues.regions.values(), key=lambda q: q.key)
        assert len(queues) == 16
        spy = PutSpy(monkeypatch)
        gate = anyio.Event()
        for i in range(16):
            spy.gates[i] = gate
        try:
            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:
                    for half in (queues[::2], queues[1::2]):
                        tg.start_soon(world._flush_regions, [(q, True) for q in half])
                    await spy.wait_entered(2)
                    # Room for a third batch to get in, if it could (without the bound, all
                    # four lanes' first batches do, well within this).
                    with anyio.move_on_after(2):
                        await spy.wait_entered(3)
                    assert spy.entered == 2
                    assert spy.in_flight == 4 and spy.active == 2
                    gate.set()
        finally:
            gate.set()
        assert spy.max_in_flight == 4
        assert sorted(spy.keys) == sorted(region_key(*q.key) for q in queues)
        assert world._flush_slots.free == 4
    assert set(lpts(tmp_path, REGIONS[:16]).values()) == {1}


async def test_a_busy_region_does_not_hold_up_the_rest_of_its_batch(tmp_path: Path) -> None:
    """One region's flush lock is held (live migration of its file, say): the other regions
    of its batch are written meanwhile, and the busy one once the lock is free."""
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg(flush_concurrency=4)) as world:
        await world.submit(edits(REGIONS, 1))
        busy = sorted(REGIONS)[1]  # inside the first batch, not at its head
        lock = world._flush_lock(busy)
        await lock.acquire()
        flushed = anyio.Event()

        async def flush() -> None:
            await world.flush()
            flushed.set()

        try:
            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(flush)
                    others = [r for r in REGIONS if r != busy]
                    while any(v != 1 for v in lpts(tmp_path, others).values()):
                        await anyio.sleep(0.005)
                    assert lpt_on_disk(tmp_path, busy) is None
                    assert not flushed.is_set()
                    lock.release()
                    await flushed.wait()
        finally:
            if lock.locked():
                lock.release()
        assert set(lpts(tmp_path, REGIONS).values()) == {1}
        await check_edits(world, REGIONS, [1])


async def test_flush_region_reports_whether_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await new_world(tmp_path)
    region = REGIONS[7]
    async with open_world(tmp_path, cfg()) as world:
        await world.submit(edits([region], 1))
        journal = world._journal
        assert journal is not None
        await journal.barrier()
        q = world._queues.get(region)
        assert q is not None and q.entries
        spy = PutSpy(monkeypatch)
        # A routine flush leaves the newest tick open while the region is being written to.
        assert await world._flush_region(q, False) is False
        assert spy.calls == [] and lpt_on_disk(tmp_path, region) is None
        assert q.entries and not q.flushing
        # Forced: the newest tick is folded.
        assert await world._flush_region(q, True) is True
        assert spy.calls == [[region_key(*region)]]
        assert lpt_on_disk(tmp_path, region) == 1
        assert not q.entries and not q.flushing
        # Nothing left to fold: nothing written.
        assert await world._flush_region(q, True) is False
        assert len(spy.calls) == 1
        c = await world.chunk(*chunk_of(region))
        assert int(c.tiles[5, 1]) == tile_value(0, 1)
        # A failed write raises that region's error (and reports nothing written).
        await world.submit(edits([region], 2))
        await journal.barrier()
        spy.raises[1] = StorageUnavailable("injected")
        with pytest.raises(StorageUnavailable):
            await world._flush_region(q, True)
        assert q.entries and not q.flushing
        assert lpt_on_disk(tmp_path, region) == 1
        assert await world._flush_region(q, True) is True
        assert lpt_on_disk(tmp_path, region) == 2


# -- 7. the periodic scheduler uses the same batches ----------------------------------------


async def test_scheduler_flushes_in_batches_and_retries_a_failed_region(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without flush(): the scheduler writes the idle regions in batches of at most 8, and a
    region whose write failed is counted, kept and written by a later round."""
    await new_world(tmp_path)
    bad = REGIONS[21]
    bad_key = region_key(*bad)
    injected: list[str] = []
    orig_create_temp = LocalStore._create_temp

    def create_temp(self: LocalStore, key: str) -> tuple[str, int]:
        if key == bad_key and not injected:
            injected.append(key)
            raise OSError(errno.EIO, "injected I/O error")
        return orig_create_temp(self, key)

    async with open_world(tmp_path, cfg(flush_interval_ms=20)) as world:
        monkeypatch.setattr(LocalStore, "_create_temp", create_temp)
        spy = PutSpy(monkeypatch)
        await world.submit(edits(REGIONS, 1))
        with anyio.fail_after(GUARD):
            while world.stats().dirty_regions or spy.keys.count(bad_key) < 2:
                await anyio.sleep(0.005)
        assert injected == [bad_key]
        assert world.stats().flush_errors == 1
        assert all(0 < len(call) <= 8 for call in spy.calls), spy.calls
        # Each region written once, the failed one once more; batched, not one call each.
        assert sorted(spy.keys) == sorted([bad_key, *(region_key(*r) for r in REGIONS)])
        assert len(spy.calls) < len(REGIONS)
        assert set(lpts(tmp_path, REGIONS).values()) == {1}
    monkeypatch.undo()
    async with open_world(tmp_path, cfg()) as world:
        assert world.stats().replayed_deltas == 0
        await check_edits(world, REGIONS, [1])


# -- 6. freeing folded deltas ---------------------------------------------------------------


async def test_folded_entries_are_freed_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush hands the entries it folded to a worker thread to free: freeing a hundred
    thousand deltas on the event loop stalled every acknowledgement for tens of ms. The
    queues keep nothing of them, and what was folded reads back (also after a reopen)."""
    import threading

    from streamer.runtime import flushing
    from streamer.runtime.queues import QueuedEntries

    await new_world(tmp_path)
    released: list[tuple[int, int]] = []  # (thread ident, entries) per call
    orig = flushing._release_in_thread

    def spy(garbage: list[QueuedEntries]) -> None:
        released.append((threading.get_ident(), sum(len(items) for items in garbage)))
        for items in garbage:
            for seg in items.segments:
                # The FIFO handed over holds the last reference (+ seg, + the argument):
                # freeing it here frees the deltas, not just a copy of the references.
                assert sys.getrefcount(seg) == 3
        orig(garbage)
        assert garbage == []  # every FIFO handed over was emptied

    monkeypatch.setattr(flushing, "_release_in_thread", spy)
    loop_thread = threading.get_ident()
    async with open_world(tmp_path, cfg()) as world:
        # A few entries are freed on the loop (cheaper than the hop)...
        await world.submit(edits(REGIONS[:1], 1))
        await world.flush()
        assert released == []
        # ... many in a worker thread (the threshold lowered so this test stays small).
        monkeypatch.setattr(flushing, "_RELEASE_IN_THREAD", 10)  # per batch of 8 regions: 48
        batches = [edits(REGIONS, tick) for tick in (2, 3, 4)]
        for batch in batches:
            await world.submit(batch)
        with anyio.fail_after(GUARD):
            await world.flush()
        assert released, "the flush freed its folded entries on the event loop"
        assert all(ident != loop_thread for ident, _ in released)
        # Every folded delta went through the release, none twice.
        assert sum(n for _, n in released) == sum(len(b) for b in batches)
        assert all(not q.entries for q in world._queues.regions.values())
        await check_edits(world, REGIONS, [2, 3, 4])
        await check_edits(world, REGIONS[:1], [1])
    monkeypatch.undo()
    async with open_world(tmp_path, cfg()) as world:
        assert world.stats().replayed_deltas == 0
        await check_edits(world, REGIONS, [2, 3, 4])
        await check_edits(world, REGIONS[:1], [1])


async def test_big_folds_go_to_the_thread_without_inline_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fold of more than ``_FOLD_INLINE_MAX_ITEMS`` entries is not started on the event
    loop (it could not finish there; its first steps would only delay acknowledgements); a
    small one still runs inline. Both write what was queued."""
    import threading

    from streamer.runtime import flushing

    await new_world(tmp_path)
    from streamer.runtime.regionstate import advance as orig

    calls: list[tuple[bool, int | None]] = []  # (on the loop thread, max_steps)
    loop_thread = threading.get_ident()

    def spy(steps: object, **kw: object) -> object:
        calls.append((threading.get_ident() == loop_thread, kw.get("max_steps")))  # type: ignore[arg-type]
        return orig(steps, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(flushing, "advance", spy)
    monkeypatch.setattr(flushing, "_FOLD_INLINE_MAX_ITEMS", 10)
    region = REGIONS[0]
    x0, y0 = region[0] * REGION_TILES, region[1] * REGION_TILES
    async with open_world(tmp_path, cfg()) as world:
        await world.submit([TileSet(tick=1, x=x0 + i % 64, y=y0, tile=100 + i) for i in range(11)])
        await world.flush()
        assert calls and not any(on_loop for on_loop, _ in calls), calls
        calls.clear()
        await world.submit([TileSet(tick=2, x=x0 + i, y=y0 + 1, tile=200 + i) for i in range(10)])
        await world.flush()
        assert (True, flushing._FOLD_INLINE_STEPS) in calls, calls
        c = await world.chunk(*chunk_of(region))
        assert [int(v) for v in c.tiles[0, :11]] == [100 + i for i in range(11)]
        assert [int(v) for v in c.tiles[1, :10]] == [200 + i for i in range(10)]
    monkeypatch.undo()
    async with open_world(tmp_path, cfg()) as world:
        assert world.stats().replayed_deltas == 0
        c = await world.chunk(*chunk_of(region))
        assert [int(v) for v in c.tiles[0, :11]] == [100 + i for i in range(11)]


async def test_a_fold_of_something_other_than_the_queue_is_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the queue's prefix changed under a fold (a bug), the flush of that region fails
    before its file is written; the other regions of the batch are written."""
    from streamer.runtime.flushing import _FlushPath

    await new_world(tmp_path)
    bad, good = REGIONS[0], REGIONS[1]
    async with open_world(tmp_path, cfg()) as world:
        await world.submit(edits([bad, good], 1))
        await world.flush()
        await world.submit(edits([bad, good], 2))
        spy = PutSpy(monkeypatch)
        orig = _FlushPath._fold

        async def fold(self: World, jobs: list[Any]) -> None:
            await orig(self, jobs)
            for job in jobs:
                if job.q.key == bad:
                    job.q.entries.drop_prefix(1)  # what no code path may do during a fold

        monkeypatch.setattr(_FlushPath, "_fold", fold)
        with pytest.raises(AssertionError, match="other than its queue"):
            await world.flush()
        assert region_key(*bad) not in spy.keys and region_key(*good) in spy.keys
        assert lpts(tmp_path, [bad, good]) == {bad: 1, good: 2}
        monkeypatch.undo()
        world._queues.regions[bad].entries.clear()  # the test's own damage, not to be closed


def test_release_in_thread_empties_what_it_is_given() -> None:
    from streamer.runtime.flushing import _release_in_thread
    from streamer.runtime.queues import Queued, QueuedEntries

    fifo = QueuedEntries()
    for seg in range(50):
        fifo.extend_segment(
            tuple(Queued(seg, (0, 0), TileSet(tick=seg, x=i, y=0, tile=1)) for i in range(64))
        )
    assert len(fifo) == 50 * 64
    garbage = [fifo, QueuedEntries()]
    _release_in_thread(garbage)
    assert garbage == [] and len(fifo) == 0 and not list(fifo)


def test_tiles_helper_sanity() -> None:
    """The edit helpers address the chunk they claim to (a broken helper would make the
    read-back checks vacuous)."""
    for region in REGIONS:
        (tile, feature) = edits([region], 3)
        assert isinstance(tile, TileSet) and isinstance(feature, FeatureAdd)
        cx, cy = chunk_of(region)
        assert (tile.x // CHUNK_SIZE, tile.y // CHUNK_SIZE) == (cx, cy)
        assert (tile.x - cx * CHUNK_SIZE, tile.y - cy * CHUNK_SIZE) == (3, 5)
        f = feature.feature
        assert (f.x // CHUNK_SIZE, f.y // CHUNK_SIZE) == (cx, cy)
    assert np.uint16(tile_value(39, 9)) == tile_value(39, 9)
