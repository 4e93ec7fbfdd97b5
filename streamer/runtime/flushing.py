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
from collections.abc import Awaitable, Callable, Iterable

import anyio
import anyio.lowlevel
import anyio.to_thread

from streamer.config import RuntimeSettings
from streamer.errors import IntegrityError, StreamerError
from streamer.format.manifest import WorldManifest
from streamer.runtime.cache import ChunkCache
from streamer.runtime.journal import Journal
from streamer.runtime.live_migrate import upgrade_in_memory
from streamer.runtime.players import PLAYERS_KEY, PlayerIndex
from streamer.runtime.queues import DeltaQueues, QueuedEntries, RegionKey, RegionQueue
from streamer.runtime.regionstate import (
    FoldResult,
    FoldSteps,
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

#: How much of a fold may run on the event loop before the rest of it moves to a thread:
#: steps (each at most ``regionstate._STEP_ITEMS`` items or one chunk) and time. The step
#: count decides in the common case; the time is a bound for heavy chunks. Time alone would
#: not do: busy I/O threads taking turns at the GIL stretch a 60 µs fold past any budget.
_FOLD_INLINE_STEPS = 8
_FOLD_INLINE_S = 0.001
#: A fold thread works this long, then sleeps ``_GIL_SLEEP_S`` so the loop can take the GIL
#: (a bare ``sleep(0)`` is not enough: the thread usually takes it back before the loop's
#: thread has woken up).
_GIL_WORK_S = 0.0001
_GIL_SLEEP_S = 0.00005


class _GilPause:
    """``advance``'s pause in a fold thread: every ``_GIL_WORK_S`` of work, sleep a moment."""

    __slots__ = ("_due",)

    def __init__(self) -> None:
        self._due = time.perf_counter() + _GIL_WORK_S

    def __call__(self) -> None:
        if time.perf_counter() >= self._due:
            time.sleep(_GIL_SLEEP_S)
            self._due = time.perf_counter() + _GIL_WORK_S


def _finish_in_thread(steps: FoldSteps) -> FoldResult:
    result = advance(steps, pause=_GilPause())
    assert result is not None  # no bound given: it ran to the end
    return result


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
    _fold_limiter: anyio.CapacityLimiter
    _cpu_limiter: anyio.CapacityLimiter
    _flushes: int
    _flush_errors: int
    # World methods.
    _check_open: Callable[[], None]
    _ensure_regions: Callable[[Iterable[RegionKey]], Awaitable[dict[RegionKey, Exception]]]
    _region_failed: Callable[[RegionKey, Exception], None]

    # -- flushing -------------------------------------------------------------------------

    async def flush(self) -> None:
        """Fold every acknowledged delta into its region file and drop passed journal segments.

        Seals every tick queued so far (later deltas for those regions need higher ticks).

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
        errors: list[Exception] = []

        async def one(q: RegionQueue) -> None:
            # One region's failure must neither cancel the others' flushes nor reach the
            # caller wrapped in an ExceptionGroup (flush() documents plain errors).
            try:
                await self._flush_region(q, True)
            except Exception as err:
                self._flush_errors += 1
                errors.append(err)

        async with anyio.create_task_group() as tg:
            for q in todo:
                tg.start_soon(one, q)
        for err in errors[1:]:
            log.error("flush of a region failed too: %s", err)
        if errors:
            raise errors[0]

    async def _flush_region(self, q: RegionQueue, full: bool) -> bool:
        """Fold what ``q`` may fold now into a new region file. True if a file was written."""
        key = q.key
        lock = self._flush_locks.setdefault(key, anyio.Lock())
        async with lock, self._flush_limiter:
            state = self._regions.get(key)
            if state is None:
                failed = await self._ensure_regions([key])
                if failed:
                    raise failed[key]
                state = self._regions[key]
            cutoff = q.cutoff(
                full=full, idle_s=self._rt.flush_interval_ms / 1000, now=time.monotonic()
            )
            upgraded = frozenset(state.upgraded)
            if cutoff is None and not upgraded:
                return False
            items = q.take(cutoff) if cutoff is not None else QueuedEntries()
            q.flushing = True
            try:
                if items and self._codec is not None:
                    # Old chunks the fold will touch are upgraded here, on the loop: a load of
                    # one during the fold's thread hop then finds it current (migrated once).
                    # Chunks built or folded before (``checked``) hold current payloads: not
                    # looked at. A few chunks per step, so acknowledgements interleave; a load
                    # in between that upgrades a chunk itself leaves it current for us.
                    checked = state.checked
                    todo = [c for c in q.per_chunk if c not in upgraded and c not in checked]
                    for i in range(0, len(todo), _UPGRADE_STEP):
                        if i:
                            await anyio.lowlevel.checkpoint()
                        upgraded |= upgrade_in_memory(
                            state, todo[i : i + _UPGRADE_STEP], self._codec
                        )
                gen, codec = self._gen, self._codec
                assert gen is not None and codec is not None and self._manifest is not None
                # Chunks edited for the first time start from generator output: numpy work
                # of milliseconds (a region's defaults), done in a thread before the fold.
                # Every queued chunk, not only this fold's: walking the items costs more.
                new = [ck for ck in q.per_chunk if ck not in state.chunks]
                fresh = None
                if new:
                    fresh = await anyio.to_thread.run_sync(
                        fresh_chunks, gen, new, self._region_size, limiter=self._cpu_limiter
                    )
                steps = fold_steps(
                    state.chunks,
                    key=key,
                    generation=state.generation,
                    lpt=state.lpt,
                    items=items,
                    upgraded=upgraded,
                    codec=codec,
                    gen=gen,
                    writer=self._writer_id,
                    encoding=self._manifest.encoding,
                    region_size=self._region_size,
                    fresh=fresh,
                )
                result = await self._run_fold(steps)
                store = self._store
                assert store is not None
                await store.put_atomic(state.path, result.data)
            finally:
                q.flushing = False
            # Installed only once the new file is durable; a cancelled or failed write leaves
            # the queue as it was, so the next flush folds the same deltas again.
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
            for chunk in q.folded(items, result.lpt, counts=result.counts):
                self._cache.mark_clean(chunk)
            self._flushes += 1
            return True

    async def _run_fold(self, steps: FoldSteps) -> FoldResult:
        """Run a fold: on the event loop while it is short, in a worker thread once it is not.

        Most folds (a few edited chunks) finish within the first slice, with no thread hop.
        A long one continues in a thread that sleeps a moment every ``_GIL_WORK_S`` of work,
        handing the GIL back: on the loop, back-to-back slices would keep it from every
        thread (the journal's included) for up to the interpreter's 5 ms switch interval
        at each of their syscalls; a thread that never lets go would do the same to the loop.
        """
        async with self._fold_limiter:
            until = time.perf_counter() + _FOLD_INLINE_S
            result = advance(steps, max_steps=_FOLD_INLINE_STEPS, until=until)
            if result is not None:
                return result
            return await anyio.to_thread.run_sync(_finish_in_thread, steps)

    async def _flush_one(self, q: RegionQueue, full: bool) -> None:
        try:
            await self._flush_region(q, full)
        except Exception as err:
            # The deltas stay journaled and queued; the region is retried after the interval.
            self._flush_errors += 1
            q.dirty_since = time.monotonic()
            log.error("flush of region %s failed (will retry): %s", q.key, err, exc_info=True)
            if isinstance(err, IntegrityError):
                self._region_failed(q.key, err)

    async def _after_flush(self) -> None:
        journal = self._journal
        store = self._store
        assert journal is not None and store is not None

        def lpt_of(region: RegionKey) -> int:
            q = self._queues.regions.get(region)
            # A region without a queue was clean when forgotten: it passed all it journaled.
            return q.lpt if q is not None else sys.maxsize

        await journal.collect(lpt_of)
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
            async with anyio.create_task_group() as tg:
                for q in due:
                    tg.start_soon(self._flush_one, q, q.urgent)
            try:
                await self._after_flush()
            except StreamerError as err:
                log.error("after-flush housekeeping failed (will retry): %s", err)
