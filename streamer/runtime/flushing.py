"""The flush machinery of :class:`~streamer.runtime.world.World`.

Flush workers fold region queues into new region files (``regionstate.fold_steps``, run on
the event loop in short slices) and advance ``lastProcessedTick``; afterwards passed journal
segments are deleted and the player index is written. ``_flush_scheduler`` runs in the
world's task group and flushes regions that are due (idle long enough, urgent under
back-pressure, or holding lazily upgraded records); ``flush()`` folds everything now.

``_FlushPath`` is a mixin of ``World``; the world state it uses is declared below and set up
in ``World.__init__``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import anyio.to_thread

from streamer.config import RuntimeSettings
from streamer.errors import IntegrityError, StreamerError
from streamer.format.manifest import WorldManifest
from streamer.format.region import region_key
from streamer.runtime.cache import ChunkCache
from streamer.runtime.flush_slots import FlushSlots
from streamer.runtime.journal import Journal
from streamer.runtime.live_migrate import upgrade_in_memory
from streamer.runtime.players import PLAYERS_KEY, PlayerIndex
from streamer.runtime.queues import DeltaQueues, QueuedEntries, RegionKey, RegionQueue
from streamer.runtime.regionstate import (
    ChunkKey,
    FoldResult,
    FoldSteps,
    FreshChunk,
    RegionState,
    advance,
    fold_steps,
    fresh_chunks,
)
from streamer.schema.codec import ChunkCodec
from streamer.storage.local import LocalStore
from streamer.worldgen import TerrainGenerator

#: The world's logger: flush failures are logged as before the split.
log = logging.getLogger("streamer.runtime.world")

#: Chunks ``upgrade_in_memory`` looks at between two event-loop checkpoints of a flush.
_UPGRADE_STEP = 4

#: Most regions a lane of a flush folds and writes at once (a batch: one fold pass, one
#: write hop and one directory fsync); more concurrency means more lanes.
_FLUSH_BATCH = 16

#: How much of a batch's folding may run on the event loop before the rest moves to a
#: thread: steps per fold (each at most ``regionstate._STEP_ITEMS`` items or one chunk; a
#: fold of a few edited chunks takes a dozen) and time for the whole batch.
_FOLD_INLINE_STEPS = 32
_FOLD_INLINE_S = 0.001
#: A fold of more queued entries than this goes to the thread at once: it could not finish
#: within the loop's budget anyway, and its first steps there only delay the batch's
#: acknowledgements (each flush of busy regions cost them 1-1.5 ms at its start).
_FOLD_INLINE_MAX_ITEMS = 2048
#: A fold thread works this long, then sleeps ``_GIL_SLEEP_S`` so the loop can take the GIL
#: (a bare ``sleep(0)`` is not enough: the thread usually takes it back before the loop's
#: thread has woken up).
_GIL_WORK_S = 0.0001
_GIL_SLEEP_S = 0.00005
#: Folded entries freed in a worker thread from this many on (fewer free on the loop in
#: well under a millisecond, cheaper than the thread hop).
_RELEASE_IN_THREAD = 4096


class _GilPause:
    """``advance``'s pause in a fold thread: every ``_GIL_WORK_S`` of work, sleep a moment."""

    __slots__ = ("_due",)

    def __init__(self) -> None:
        self._due = time.perf_counter() + _GIL_WORK_S

    def __call__(self) -> None:
        if time.perf_counter() >= self._due:
            time.sleep(_GIL_SLEEP_S)
            self._due = time.perf_counter() + _GIL_WORK_S


def _release_in_thread(garbage: list[QueuedEntries]) -> None:
    """Drop folded queue entries (in a worker thread), a segment at a time.

    A flush's folded entries are often the last references to a hundred thousand deltas
    and more; freeing them is a cascade of deallocations that holds the GIL until it ends
    (25 ms for 8 busy regions, measured). On the event loop that stalled every
    acknowledgement; here a segment (one submitted batch's part for the region, usually tens
    of deltas) frees at a time and ``_GilPause`` lets the loop in between.
    """
    pause = _GilPause()
    while garbage:
        segments = garbage.pop().release()
        while segments:
            segments.pop()  # the segment's last reference: its entries are freed here
            pause()


def _finish_in_thread(jobs: Sequence[_Job]) -> None:
    """Run each job's remaining fold steps (in a worker thread), one GIL pause for all."""
    pause = _GilPause()
    for job in jobs:
        assert job.steps is not None
        try:
            job.result = advance(job.steps, pause=pause)
        except Exception as err:  # IntegrityError, SchemaError: that region fails alone
            job.error = err


async def _acquire_token(limiter: anyio.CapacityLimiter, borrower: object) -> None:
    """``limiter.acquire_on_behalf_of(borrower)``, without the loop trips when one is free."""
    try:
        limiter.acquire_on_behalf_of_nowait(borrower)
    except anyio.WouldBlock:
        await limiter.acquire_on_behalf_of(borrower)


@dataclass(slots=True)
class _Outcome:
    """What a batched flush did: regions written, and regions that failed (and why)."""

    written: set[RegionKey] = field(default_factory=set)
    failed: dict[RegionKey, Exception] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class _Job:
    """One region's part of a batched flush."""

    q: RegionQueue
    full: bool
    state: RegionState | None = None
    #: ``q.take`` was called (and ``q.flushing`` set): there is something to write.
    taken: bool = False
    items: QueuedEntries = field(default_factory=QueuedEntries)
    upgraded: set[ChunkKey] = field(default_factory=set)
    fresh: dict[ChunkKey, FreshChunk] | None = None
    steps: FoldSteps | None = None
    result: FoldResult | None = None
    error: Exception | None = None


class _FlushPath:
    """``World``'s flush machinery: ``flush``, the scheduler and per-region folds."""

    # World state, set up in ``World.__init__``.
    _rt: RuntimeSettings
    _journal: Journal | None
    _store: LocalStore | None
    _manifest: WorldManifest | None
    _gen: TerrainGenerator | None
    _codec: ChunkCodec | None
    _writer_id: str
    _region_size: int
    _queues: DeltaQueues
    _regions: OrderedDict[RegionKey, RegionState]
    _cache: ChunkCache
    _players: PlayerIndex
    _flush_locks: dict[RegionKey, anyio.Lock]
    _flush_wake: anyio.Event
    _flush_limiter: anyio.CapacityLimiter
    _flush_slots: FlushSlots
    _fold_limiter: anyio.CapacityLimiter
    _cpu_limiter: anyio.CapacityLimiter
    _flushes: int
    _flush_errors: int
    # World methods.
    _check_open: Callable[[], None]
    _ensure_regions: Callable[[Iterable[RegionKey]], Awaitable[dict[RegionKey, Exception]]]
    _region_failed: Callable[[RegionKey, Exception], None]

    def _flush_lock(self, key: RegionKey) -> anyio.Lock:
        """The region's flush lock (held by a fold and write of it, live migration of its
        file, recovery). A free one is taken without a trip through the event loop: a batch
        takes one per region."""
        lock = self._flush_locks.get(key)
        if lock is None:
            lock = self._flush_locks[key] = anyio.Lock(fast_acquire=True)
        return lock

    # -- flushing -------------------------------------------------------------------------

    async def flush(self) -> None:
        """Fold every acknowledged delta into its region file and drop passed journal segments.

        Seals every tick queued so far (later deltas for those regions need higher ticks).
        The segment being written to is dropped with them only once it holds
        ``Journal.COLLECT_ACTIVE_BYTES`` (1 MiB), and at close: dropping a small one costs
        more I/O than it frees (its replay after a crash skips what was folded).

        :raises StorageUnavailable, IntegrityError: a region could not be written; its deltas
            stay journaled and queued, nothing is lost.
        :raises WorldClosed: the world is closed.
        """
        self._check_open()
        await self._flush_all()
        await self._after_flush()

    async def _flush_all(self) -> None:
        journal = self._journal
        assert journal is not None
        await journal.barrier()
        todo = [q for q in self._queues.regions.values() if q.entries]
        seen = {q.key for q in todo}
        for key, state in list(self._regions.items()):
            if state.upgraded and key not in seen:
                todo.append(self._queues.add(key, state.lpt))
        errors = list((await self._flush_regions([(q, True) for q in todo])).failed.values())
        self._flush_errors += len(errors)
        for err in errors[1:]:
            log.error("flush of a region failed too: %s", err)
        if errors:
            raise errors[0]

    async def _flush_region(self, q: RegionQueue, full: bool) -> bool:
        """Fold what ``q`` may fold now into a new region file. True if a file was written.

        :raises StreamerError: the region could not be flushed (nothing of it is lost).
        """
        outcome = await self._flush_regions([(q, full)])
        if q.key in outcome.failed:
            raise outcome.failed[q.key]
        return q.key in outcome.written

    async def _flush_regions(self, jobs: Sequence[tuple[RegionQueue, bool]]) -> _Outcome:
        """Flush regions (``(queue, full)`` each) in batches.

        A batch of up to ``_FLUSH_BATCH`` regions is prepared on the loop, folded (short
        folds on the loop, the rest in one thread hop), written with one
        ``put_many_atomic`` (one hop, one directory fsync) and installed. Batches run in
        lanes, so one batch folds while another is written; ``flush_concurrency`` bounds
        the regions in flight of every call together (``FlushSlots``: ``flush()``, the
        scheduler and live migration each make their own calls). One region's failure fails
        it alone.
        """
        outcome = _Outcome()
        pending = list(jobs)
        if not pending:
            return outcome
        # At most ``flush_concurrency`` regions in flight, in two lanes (one folds while
        # the other writes) or more once a lane would exceed ``_FLUSH_BATCH`` regions.
        fc = self._rt.flush_concurrency
        lanes = 1 if fc < 2 else max(2, -(-fc // _FLUSH_BATCH))
        size = fc // lanes
        batches = [pending[i : i + size] for i in range(0, len(pending), size)]

        async def lane() -> None:
            while batches:
                busy = await self._flush_batch(batches.pop(0), outcome)
                if busy:
                    batches.append(busy)  # after the others: their locks may be free by then

        if len(batches) == 1:
            await lane()
        else:
            async with anyio.create_task_group() as tg:
                for _ in range(min(lanes, len(batches))):
                    tg.start_soon(lane)
        return outcome

    async def _flush_batch(
        self, batch: Sequence[tuple[RegionQueue, bool]], outcome: _Outcome
    ) -> list[tuple[RegionQueue, bool]]:
        """Flush the regions of ``batch`` whose flush locks are free; return the others.

        A region whose lock is held (live migration of its file, recovery, another flush)
        must not hold up the rest. Only when every lock is taken does the batch wait, for
        the first, holding none: no batch ever waits while holding a lock, so none deadlock.
        """
        ordered = sorted(batch, key=lambda j: j[0].key)
        busy: list[tuple[RegionQueue, bool]] = []
        held: list[anyio.Lock] = []
        jobs: list[_Job] = []
        token = object()
        have_token = False
        slots = 0
        try:
            for q, full in ordered:
                lock = self._flush_lock(q.key)
                try:
                    lock.acquire_nowait()
                except anyio.WouldBlock:
                    busy.append((q, full))
                    continue
                held.append(lock)
                jobs.append(_Job(q, full))
            if not jobs:
                q, full = busy.pop(0)
                lock = self._flush_lock(q.key)
                await lock.acquire()
                held.append(lock)
                jobs.append(_Job(q, full))
            # Regions in flight across every flush of the world, then one flush token per
            # batch: a snapshot takes them all to pause flushing, and a batch never waits
            # for a second one.
            slots = await self._flush_slots.take(len(jobs))
            await _acquire_token(self._flush_limiter, token)
            have_token = True
            for phase in (self._prepare, self._fold, self._write):
                try:
                    await phase(jobs)
                except Exception as err:
                    # A failure of the batch as a whole (the store closed, a bug) fails each
                    # of its regions that had something to write (all, if it came while
                    # preparing); it must not reach the other lanes as a group error.
                    for job in jobs:
                        if job.taken or phase == self._prepare:
                            job.error = job.error or err
                    break
            for job in jobs:
                if job.result is not None and job.error is None:
                    try:
                        self._install(job)
                    except Exception as err:  # a bug; the file is written, a re-fold repeats it
                        job.error = err
                        continue
                    outcome.written.add(job.q.key)
        finally:
            for job in jobs:
                if job.taken:
                    job.q.flushing = False
            if have_token:
                self._flush_limiter.release_on_behalf_of(token)
            if slots:
                self._flush_slots.give(slots)
            for lock in held:
                lock.release()
            outcome.failed.update((job.q.key, job.error) for job in jobs if job.error)
            # Installed jobs' entries left the queue: these are their last references. A
            # failed job's entries are still queued (and shared), nothing to free there.
            garbage = [job.items for job in jobs if job.items and job.q.key in outcome.written]
            for job in jobs:
                job.items = QueuedEntries()
        if sum(map(len, garbage)) >= _RELEASE_IN_THREAD:
            # After the locks: other batches may take these regions meanwhile (this lane's
            # next batch waits, as it waits for any hop of this one).
            await anyio.to_thread.run_sync(_release_in_thread, garbage)
        return busy

    async def _prepare(self, jobs: list[_Job]) -> None:
        """Region states, cutoffs, in-memory upgrades and generator output for each job."""
        missing = [job.q.key for job in jobs if job.q.key not in self._regions]
        if missing:
            for key, err in (await self._ensure_regions(missing)).items():
                for job in jobs:
                    if job.q.key == key:
                        job.error = err
        now = time.monotonic()
        idle_s = self._rt.flush_interval_ms / 1000
        codec = self._codec
        for job in jobs:
            if job.error is not None:
                continue
            q = job.q
            state = self._regions.get(q.key)
            if state is None:  # left memory during an earlier job's checkpoint
                lost = (await self._ensure_regions([q.key])).get(q.key)
                if lost is not None:
                    job.error = lost
                    continue
                state = self._regions[q.key]
            job.state = state
            cutoff = q.cutoff(full=job.full, idle_s=idle_s, now=now)
            job.upgraded = set(state.upgraded)
            if cutoff is None and not job.upgraded:
                continue  # nothing to write
            job.items = q.take(cutoff) if cutoff is not None else QueuedEntries()
            job.taken = True
            q.flushing = True
            if job.items and codec is not None:
                # Old chunks the fold will touch are upgraded here, on the loop: a load of
                # one while the fold is in a thread then finds it current (migrated once).
                # Chunks built or folded before (``checked``) and those current when the
                # region loaded (``current``) hold current payloads: not looked at. Without
                # the latter, the first flush after opening peeked at every chunk it folds
                # on the loop, and that burst (8 ms for 16 busy regions) kept the journal's
                # thread from the GIL long enough to delay acknowledgements by 20 ms. A few
                # chunks per step, so acknowledgements interleave; a load in between that
                # upgrades a chunk itself leaves it current for us.
                checked, current = state.checked, state.current
                todo = [
                    c
                    for c in q.per_chunk
                    if c not in job.upgraded and c not in checked and c not in current
                ]
                for i in range(0, len(todo), _UPGRADE_STEP):
                    if i:
                        await anyio.lowlevel.checkpoint()
                    job.upgraded |= upgrade_in_memory(state, todo[i : i + _UPGRADE_STEP], codec)
        # Chunks edited for the first time start from generator output: numpy work of
        # milliseconds (a region's defaults), done in one thread hop for the batch. Every
        # queued chunk, not only this fold's: walking the items costs more.
        new = {
            job.q.key: [ck for ck in job.q.per_chunk if ck not in job.state.chunks]
            for job in jobs
            if job.taken and job.state is not None
        }
        if any(new.values()):
            gen = self._gen
            assert gen is not None
            rs = self._region_size

            def generate() -> dict[RegionKey, dict[ChunkKey, FreshChunk] | Exception]:
                out: dict[RegionKey, dict[ChunkKey, FreshChunk] | Exception] = {}
                for key, keys in new.items():
                    try:
                        out[key] = fresh_chunks(gen, keys, rs)
                    except Exception as err:  # a bug or bad parameters: this region fails
                        out[key] = err
                return out

            made = await anyio.to_thread.run_sync(generate, limiter=self._cpu_limiter)
            for job in jobs:
                got = made.get(job.q.key)
                if isinstance(got, Exception):
                    job.error = got
                elif got:
                    job.fresh = got

    async def _fold(self, jobs: list[_Job]) -> None:
        """Fold each prepared job: a few steps on the loop, the rest in one thread hop."""
        gen, codec, manifest = self._gen, self._codec, self._manifest
        assert gen is not None and codec is not None and manifest is not None
        later: list[_Job] = []
        async with self._fold_limiter:
            # One budget for the batch: the loop spends at most ~1 ms on its folds before the
            # rest (of this fold and of every later one) goes to the thread.
            until = time.perf_counter() + _FOLD_INLINE_S
            for job in jobs:
                if not job.taken or job.error is not None or job.state is None:
                    continue
                state = job.state
                job.steps = fold_steps(
                    state.chunks,
                    key=state.key,
                    generation=state.generation,
                    lpt=state.lpt,
                    items=job.items,
                    upgraded=frozenset(job.upgraded),
                    codec=codec,
                    gen=gen,
                    writer=self._writer_id,
                    encoding=manifest.encoding,
                    region_size=self._region_size,
                    fresh=job.fresh,
                )
                if len(job.items) > _FOLD_INLINE_MAX_ITEMS or time.perf_counter() >= until:
                    later.append(job)
                    continue
                try:
                    job.result = advance(job.steps, max_steps=_FOLD_INLINE_STEPS, until=until)
                except Exception as err:
                    job.error = err
                    continue
                if job.result is None:
                    later.append(job)
            if later:
                await anyio.to_thread.run_sync(_finish_in_thread, later)

    async def _write(self, jobs: list[_Job]) -> None:
        """Write every folded job's file in one hop (``put_many_atomic``)."""
        for job in jobs:
            # Before anything is written: a file folded from something other than the queue's
            # prefix must never reach the disk (a bug; the queue stays as it was).
            if job.result is not None and not job.q.entries.is_prefix(job.items):
                job.error = AssertionError(
                    f"region {job.q.key}: flush folded something other than its queue"
                )
        ready = [job for job in jobs if job.result is not None and job.error is None]
        if not ready:
            return
        store = self._store
        assert store is not None
        files: list[tuple[str, bytes]] = []
        for job in ready:
            assert job.result is not None
            files.append((region_key(*job.q.key), job.result.data))
        results = await store.put_many_atomic(files)
        for job, res in zip(ready, results, strict=True):
            if not isinstance(res, str):
                job.error = res

    def _install(self, job: _Job) -> None:
        """Make a written fold the region's state; the queue drops what it folded.

        Only once the new file is durable: a cancelled or failed write leaves the queue as
        it was, so the next flush folds the same deltas again.
        """
        state, result, q = job.state, job.result, job.q
        assert state is not None and result is not None
        upgraded = job.upgraded
        chunks = result.chunks
        # Chunks a load upgraded in memory while the fold ran keep their upgraded payload
        # (unless the fold rewrote them); still marked, they are written at the next flush.
        for ck in state.upgraded - upgraded - result.changed:
            if ck in state.chunks:
                chunks[ck] = state.chunks[ck]
        state.chunks = chunks
        state.generation = result.generation
        state.lpt = result.lpt
        state.upgraded -= upgraded
        state.checked |= result.changed
        for chunk in q.folded(job.items, result.lpt, counts=result.counts):
            self._cache.mark_clean(chunk)
        self._flushes += 1

    def _flush_failed(self, q: RegionQueue, err: Exception) -> None:
        # The deltas stay journaled and queued; the region is retried after the interval.
        self._flush_errors += 1
        q.dirty_since = time.monotonic()
        log.error("flush of region %s failed (will retry): %s", q.key, err, exc_info=err)
        if isinstance(err, IntegrityError):
            self._region_failed(q.key, err)

    async def _after_flush(self, *, everything: bool = False) -> None:
        """Drop passed journal segments (``Journal.collect``; ``everything``: the segment
        being written to as well, whatever its size, as the close does) and write the player
        index if it changed."""
        journal = self._journal
        store = self._store
        assert journal is not None and store is not None

        def lpt_of(region: RegionKey) -> int:
            q = self._queues.regions.get(region)
            # A region without a queue was clean when forgotten: it passed all it journaled.
            return q.lpt if q is not None else sys.maxsize

        await journal.collect(lpt_of, everything=everything)
        if self._players.dirty:
            version, data = self._players.snapshot()
            await store.put_atomic(PLAYERS_KEY, data)
            self._players.written(version)

    async def _flush_scheduler(self) -> None:
        interval = self._rt.flush_interval_ms / 1000
        tick = min(max(interval / 4, 0.005), 0.25)
        while True:
            with anyio.move_on_after(tick):
                await self._flush_wake.wait()
            self._flush_wake = anyio.Event()
            due = self._queues.due(time.monotonic(), interval)
            due_keys = {q.key for q in due}
            for key, state in list(self._regions.items()):
                if state.upgraded and key not in due_keys:
                    due.append(self._queues.add(key, state.lpt))
            if not due:
                continue
            failed = (await self._flush_regions([(q, q.urgent) for q in due])).failed
            for q in due:
                if q.key in failed:
                    self._flush_failed(q, failed[q.key])
            try:
                await self._after_flush()
            except StreamerError as err:
                log.error("after-flush housekeeping failed (will retry): %s", err)
