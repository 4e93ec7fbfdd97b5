"""Prioritised, batched, single-flight chunk loading.

Requests (``get`` awaits, ``prefetch`` does not) become *flights*, one per key: every caller of
a key shares its flight, so N concurrent readers cause one load. Queued flights wait in a
heap ordered by ``(priority, arrival)``; ``workers`` loops each take up to ``max_batch`` of
the best ones and hand them to ``load_batch`` in ONE call, because the world turns one call
into one worker-thread hop (~85 µs each) — per-key hops would dominate the cost of a load.

Cancellation rules:

- A caller cancelled while awaiting ``get`` leaves the flight to the others. If nobody else
  awaits it, it is still queued and no prefetch asked for it, it is dropped unloaded.
- ``cancel(key)`` withdraws a prefetch; the load is dropped only if no ``get`` awaits it.
- A load already handed to ``load_batch`` always runs to completion (it shares a thread hop
  with other keys).
- When the workers are cancelled (the owning task group ends), a batch in progress is put
  back; once the last worker has stopped, every outstanding flight fails with
  :class:`~streamer.errors.WorldClosed`, so no caller outside that task group hangs.

Errors: an exception from ``load_batch`` fails every key of the batch; an ``Exception`` in the
returned mapping fails just that key. Every waiter of the key gets the error, and the next
``get`` loads again. A failed key that was prefetched (and not cancelled since) is tried again
after a backoff that doubles per failure (``retry_after`` up to ``retry_max``): its prefetch
still stands until ``cancel``, and nothing else would ask for it again.

The queue is bounded (``max_queued``) but a prefetch is never lost. One that finds the queue
full is *deferred*: kept as just ``(priority, key)`` in a second heap, and workers take from
both heaps in one priority order, so a late player's own chunk still loads before the ring-4
chunks queued ahead of it. Nothing is displaced and nothing needs re-offering; the deferred
keys are bounded by what the caller prefetched and has not cancelled (the world: its pinned
chunks). The bound still applies where it matters: to flights, each with an event and
waiters, so a flood of ``get`` calls waits for room.

Results are not kept here: the cache is the world's. ``on_loaded`` (called before waiters wake)
lets the world cache a chunk before anyone can miss it again and start a second load.
"""

from __future__ import annotations

import enum
import heapq
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import NamedTuple, TypeAlias

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from streamer.errors import StreamerError, WorldClosed
from streamer.runtime.chunk import Chunk, ChunkKey
from streamer.runtime.fastsync import event_factory

__all__ = ["ChunkLoader", "Latency", "LoadBatch", "LoaderStats", "OnLoaded"]

#: Loads many chunks at once. A key missing from the result fails that key; a value that is an
#: ``Exception`` fails just that key; raising fails the whole batch.
LoadBatch: TypeAlias = Callable[[list[ChunkKey]], Awaitable[Mapping[ChunkKey, Chunk | Exception]]]
#: Called synchronously with each loaded chunk before its waiters are woken.
OnLoaded: TypeAlias = Callable[[ChunkKey, Chunk], None]


class LoaderStats(msgspec.Struct, frozen=True, kw_only=True):
    #: Keys waiting in the queue (not yet handed to ``load_batch``).
    queue_depth: int
    #: Keys inside a ``load_batch`` call right now.
    inflight: int
    #: ``get`` calls.
    requests: int
    #: ``prefetch`` calls.
    prefetches: int
    #: Requests that joined a flight already queued or loading (single-flight savings).
    joined: int
    #: Keys loaded successfully.
    loads: int
    #: ``load_batch`` calls.
    batches: int
    #: Keys whose load failed.
    errors: int
    #: Queued flights dropped unloaded (``cancel`` or every waiter gone).
    cancelled: int
    #: Prefetches that found the queue full and were deferred (they still load, in order).
    rejected: int
    p50_ms: float
    p99_ms: float
    #: Prefetches waiting outside the full queue, or for their retry after failing.
    deferred: int = 0
    #: Failed prefetches scheduled to be tried again.
    retries: int = 0


class Latency(NamedTuple):
    """Request → ready latency over the most recent ``samples`` successful loads."""

    p50_ms: float
    p99_ms: float
    samples: int


class _State(enum.Enum):
    QUEUED = enum.auto()
    LOADING = enum.auto()
    DONE = enum.auto()


class _Flight:
    __slots__ = (
        "attempts",
        "chunk",
        "done",
        "error",
        "get_priority",
        "key",
        "prefetch_priority",
        "prefetched",
        "priority",
        "requested_at",
        "seq",
        "state",
        "traceback",
        "waiters",
    )

    def __init__(self, key: ChunkKey, priority: int, seq: int, done: anyio.Event) -> None:
        self.key = key
        self.priority = priority
        # Identifies this flight's live heap entry; older entries for the key are stale.
        self.seq = seq
        self.state = _State.QUEUED
        self.waiters = 0
        self.prefetched = False
        self.done = done
        self.chunk: Chunk | None = None
        self.error: BaseException | None = None
        self.traceback: TracebackType | None = None
        self.requested_at = time.perf_counter()
        #: Failed loads of this prefetch so far (sets the backoff of its next retry).
        self.attempts = 0
        #: Best priority a ``get`` asked for: ``reprioritize`` never demotes a load below it.
        self.get_priority: int | None = None
        #: The prefetch's own priority: a retry after a failure goes back to it, not to a
        #: ``get``'s (a direct read's rank would put the retry ahead of every prefetch).
        self.prefetch_priority: int | None = None


class _Deferred:
    """A prefetch waiting outside the queue: for room (``due == 0``) or for its retry."""

    __slots__ = ("attempts", "due", "priority", "requested_at", "seq")

    def __init__(self, priority: int, seq: int, attempts: int, due: float) -> None:
        self.priority = priority
        self.seq = seq
        self.attempts = attempts
        self.due = due
        self.requested_at = time.perf_counter()


class ChunkLoader:
    """Single-flight, prioritised, batched loader; see the module docstring.

    :param load_batch: loads a list of keys in one call (see :data:`LoadBatch`).
    :param workers: concurrent ``load_batch`` calls.
    :param max_batch: most keys per ``load_batch`` call.
    :param batch_band: if set, a batch only takes keys whose priority is within this much of
        the best queued key, so urgent loads do not wait behind a batch of distant ones.
    :param max_queued: queue bound. A ``prefetch`` beyond it is deferred (returns ``False``)
        and still loads in priority order; a ``get`` for a new key waits for room
        (back-pressure).
    :param on_loaded: called with each loaded chunk before its waiters wake.
    :param latency_window: how many recent latencies the percentiles are computed over.
    :param retry_after: seconds before a failed prefetch is tried again; doubles with each
        further failure, up to ``retry_max``.
    """

    def __init__(
        self,
        load_batch: LoadBatch,
        *,
        workers: int = 4,
        max_batch: int = 16,
        batch_band: int | None = None,
        max_queued: int = 4096,
        on_loaded: OnLoaded | None = None,
        latency_window: int = 2048,
        retry_after: float = 0.25,
        retry_max: float = 30.0,
    ) -> None:
        if workers < 1 or max_batch < 1 or max_queued < 1 or latency_window < 1:
            raise ValueError("workers, max_batch, max_queued and latency_window must be >= 1")
        if batch_band is not None and batch_band < 0:
            raise ValueError("batch_band must be >= 0")
        if retry_after < 0 or retry_max < retry_after:
            raise ValueError("need 0 <= retry_after <= retry_max")
        self._load_batch = load_batch
        self._workers = workers
        self._max_batch = max_batch
        self._batch_band = batch_band
        self._max_queued = max_queued
        self._on_loaded = on_loaded
        self._retry_after = retry_after
        self._retry_max = retry_max

        self._flights: dict[ChunkKey, _Flight] = {}
        #: Prefetches that found the queue full, in their own heap (see the module docstring).
        self._deferred: dict[ChunkKey, _Deferred] = {}
        self._deferred_heap: list[tuple[int, int, ChunkKey]] = []
        #: Failed prefetches waiting for their retry, and the earliest retry's time.
        self._retrying: dict[ChunkKey, _Deferred] = {}
        self._next_retry = math.inf
        #: Makes each flight's Event without anyio's backend lookup (see fastsync).
        self._new_event: Callable[[], anyio.Event] | None = None
        self._heap: list[tuple[int, int, ChunkKey]] = []
        self._stale = 0
        self._seq = 0
        self._queued = 0
        self._inflight = 0
        # One-shot events, replaced after being consumed (see _take_or_wait / _wait_for_room).
        self._work = anyio.Event()
        self._room = anyio.Event()
        self._started = False
        self._running = 0
        self._closed = False
        #: ``get`` calls waiting for room in the queue (see _take_batch).
        self._room_waiters = 0

        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._requests = 0
        self._prefetches = 0
        self._joined = 0
        self._loads = 0
        self._batches = 0
        self._errors = 0
        self._cancelled = 0
        self._rejected = 0
        self._retries = 0

    # -- lifecycle --------------------------------------------------------------------------

    def run(self, task_group: anyio.abc.TaskGroup) -> None:
        """Start the worker loops in ``task_group``; they run until it is cancelled.

        :raises RuntimeError: already started and not yet stopped.
        """
        if self._started:
            raise RuntimeError("ChunkLoader.run() called twice")
        self._started = True
        self._closed = False
        for i in range(self._workers):
            task_group.start_soon(self._worker, name=f"chunk-loader-{i}")

    async def serve(self) -> None:
        """Run the workers in a task group of their own until cancelled."""
        async with anyio.create_task_group() as tg:
            self.run(tg)

    # -- requests ---------------------------------------------------------------------------

    async def get(self, key: ChunkKey, priority: int = 0) -> Chunk:
        """Load ``key`` (or join its load in progress) and return it.

        A lower ``priority`` is served sooner; joining a queued load with a lower value moves
        it up.

        :raises WorldClosed: the loader stopped before the chunk was loaded.
        :raises Exception: whatever ``load_batch`` raised for this key.
        """
        self._requests += 1
        self._check_open()
        flight = self._flights.get(key)
        if flight is None:
            await self._wait_for_room()
            # Someone else may have queued the key while we waited.
            flight = self._flights.get(key)
        if flight is None:
            waiting = self._take_deferred(key)
            if waiting is None:
                flight = self._enqueue(key, priority)
            else:
                # A deferred prefetch, or one waiting for its retry: someone needs it now.
                self._joined += 1
                flight = self._enqueue(key, min(priority, waiting.priority))
                flight.prefetched = True
                flight.prefetch_priority = waiting.priority
                flight.attempts = waiting.attempts
        else:
            self._joined += 1
            self._raise_priority(flight, priority)
        if flight.get_priority is None or priority < flight.get_priority:
            flight.get_priority = priority
        flight.waiters += 1
        try:
            await flight.done.wait()
        finally:
            flight.waiters -= 1
            if flight.state is _State.QUEUED and flight.waiters == 0 and not flight.prefetched:
                self._drop(flight)
        if flight.error is not None:
            # Each waiter re-raises the shared exception with the traceback of the failed load,
            # not one that grows with every waiter (as asyncio.Future.result does).
            raise flight.error.with_traceback(flight.traceback)
        assert flight.chunk is not None
        return flight.chunk

    def prefetch(self, key: ChunkKey, priority: int = 0) -> bool:
        """Queue ``key`` for loading without waiting for it.

        Returns ``False`` if the queue is full and the key was not already pending: the key
        is then deferred, not dropped, and loads in priority order all the same. A prefetch
        stands until ``cancel``: if its load fails, it is tried again after a backoff.

        :raises WorldClosed: the loader has stopped.
        """
        self._prefetches += 1
        self._check_open()
        flight = self._flights.get(key)
        if flight is not None:
            self._joined += 1
            flight.prefetched = True
            if flight.prefetch_priority is None or priority < flight.prefetch_priority:
                flight.prefetch_priority = priority
            self._raise_priority(flight, priority)
            return True
        waiting = self._deferred.get(key) or self._retrying.get(key)
        if waiting is not None:
            self._joined += 1
            if priority < waiting.priority:
                self._set_deferred_priority(key, waiting, priority)
            return True
        if self._queued >= self._max_queued:
            self._rejected += 1
            self._defer(key, priority, attempts=0)
            return False
        flight = self._enqueue(key, priority)
        flight.prefetched = True
        flight.prefetch_priority = priority
        return True

    def reprioritize(self, key: ChunkKey, priority: int) -> bool:
        """Give ``key``'s pending prefetch ``priority``, better or worse than it had.

        For a requester whose ranking changed (a player moved) and who alone wants the key;
        ``prefetch`` only ever raises a priority, since other requesters may need it sooner.
        A ``get`` waiting for the key keeps the priority it asked for. Queues nothing: returns
        whether ``key`` was pending.
        """
        flight = self._flights.get(key)
        if flight is not None:
            if flight.prefetched:
                flight.prefetch_priority = priority
            if flight.state is _State.QUEUED:
                if flight.waiters and flight.get_priority is not None:
                    priority = min(priority, flight.get_priority)
                self._set_priority(flight, priority)
            return True
        entry = self._deferred.get(key) or self._retrying.get(key)
        if entry is None:
            return False
        if priority != entry.priority:
            self._set_deferred_priority(key, entry, priority)
        return True

    def cancel(self, key: ChunkKey) -> bool:
        """Withdraw a prefetch of ``key``. Returns whether a queued load was dropped.

        A load nobody awaits is dropped if still queued (or deferred); one already loading, or
        awaited by a ``get``, goes on, but is no longer retried if it fails.
        """
        flight = self._flights.get(key)
        if flight is None:
            if self._take_deferred(key) is None:
                return False
            self._cancelled += 1
            return True
        flight.prefetched = False
        if flight.state is not _State.QUEUED:
            return False
        if flight.waiters:
            return False
        self._drop(flight)
        return True

    def is_pending(self, key: ChunkKey) -> bool:
        """Whether ``key`` is queued, deferred, waiting to retry, or loading."""
        return key in self._flights or key in self._deferred or key in self._retrying

    # -- metrics ----------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def backlog(self) -> int:
        """Loads waiting to start: queued, or deferred past the full queue (not those
        waiting for a retry, which may wait for good on an inactive region)."""
        return self._queued + len(self._deferred)

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def deferred(self) -> int:
        """Prefetches waiting outside the full queue or for their retry."""
        return len(self._deferred) + len(self._retrying)

    def latency_percentiles(self) -> Latency:
        """p50/p99 of request → ready in ms over the recent window; NaN with no samples."""
        samples = sorted(self._latencies)
        n = len(samples)
        if n == 0:
            return Latency(math.nan, math.nan, 0)

        def rank(q: float) -> float:
            return samples[max(0, math.ceil(q * n) - 1)]

        return Latency(rank(0.50), rank(0.99), n)

    def stats(self) -> LoaderStats:
        latency = self.latency_percentiles()
        return LoaderStats(
            queue_depth=self._queued,
            inflight=self._inflight,
            requests=self._requests,
            prefetches=self._prefetches,
            joined=self._joined,
            loads=self._loads,
            batches=self._batches,
            errors=self._errors,
            cancelled=self._cancelled,
            rejected=self._rejected,
            p50_ms=latency.p50_ms,
            p99_ms=latency.p99_ms,
            deferred=self.deferred,
            retries=self._retries,
        )

    # -- queue ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise WorldClosed("chunk loader has stopped")

    async def _wait_for_room(self) -> None:
        while self._queued >= self._max_queued:
            if self._room.is_set():
                self._room = anyio.Event()
            self._room_waiters += 1
            try:
                await self._room.wait()
            finally:
                self._room_waiters -= 1
            self._check_open()

    def _push(self, flight: _Flight) -> None:
        self._seq += 1
        flight.seq = self._seq
        heapq.heappush(self._heap, (flight.priority, flight.seq, flight.key))
        self._work.set()

    def _new_flight(self, key: ChunkKey, priority: int) -> _Flight:
        new_event = self._new_event
        if new_event is None:  # resolved inside the running loop, once
            new_event = self._new_event = event_factory()
        flight = _Flight(key, priority, 0, new_event())
        self._flights[key] = flight
        return flight

    def _enqueue(self, key: ChunkKey, priority: int) -> _Flight:
        flight = self._new_flight(key, priority)
        self._queued += 1
        self._push(flight)
        return flight

    def _defer(self, key: ChunkKey, priority: int, *, attempts: int) -> None:
        self._seq += 1
        self._deferred[key] = _Deferred(priority, self._seq, attempts, 0.0)
        heapq.heappush(self._deferred_heap, (priority, self._seq, key))
        self._work.set()

    def _set_deferred_priority(self, key: ChunkKey, entry: _Deferred, priority: int) -> None:
        entry.priority = priority
        if self._deferred.get(key) is entry:
            self._seq += 1
            entry.seq = self._seq
            heapq.heappush(self._deferred_heap, (priority, entry.seq, key))
            self._maybe_compact_deferred()

    def _take_deferred(self, key: ChunkKey) -> _Deferred | None:
        """Remove ``key`` from the deferred prefetches (or their retries) and return it."""
        entry = self._deferred.pop(key, None)
        if entry is not None:
            self._maybe_compact_deferred()
            return entry
        return self._retrying.pop(key, None)

    def _maybe_compact_deferred(self) -> None:
        heap = self._deferred_heap
        if len(heap) > 64 and len(heap) > 2 * len(self._deferred):
            self._deferred_heap = [(d.priority, d.seq, k) for k, d in self._deferred.items()]
            heapq.heapify(self._deferred_heap)

    def _schedule_retry(self, flight: _Flight) -> None:
        attempts = flight.attempts + 1
        delay = min(self._retry_after * 2 ** (attempts - 1), self._retry_max)
        due = time.monotonic() + delay
        priority = flight.priority if flight.prefetch_priority is None else flight.prefetch_priority
        self._retrying[flight.key] = _Deferred(priority, 0, attempts, due)
        self._next_retry = min(self._next_retry, due)
        self._retries += 1

    def _retry_due(self) -> None:
        """Move the failed prefetches whose backoff has passed to the deferred heap."""
        now = time.monotonic()
        if now < self._next_retry:
            return
        due = [k for k, d in self._retrying.items() if d.due <= now]
        for key in due:
            entry = self._retrying.pop(key)
            self._defer(key, entry.priority, attempts=entry.attempts)
        self._next_retry = min((d.due for d in self._retrying.values()), default=math.inf)

    def _raise_priority(self, flight: _Flight, priority: int) -> None:
        if flight.state is _State.QUEUED and priority < flight.priority:
            self._set_priority(flight, priority)

    def _set_priority(self, flight: _Flight, priority: int) -> None:
        if priority == flight.priority:
            return
        # heapq has no decrease-key: push a fresh entry and let the old one go stale.
        flight.priority = priority
        self._stale += 1
        self._push(flight)
        self._maybe_compact()

    def _drop(self, flight: _Flight) -> None:
        flight.state = _State.DONE
        del self._flights[flight.key]
        self._queued -= 1
        self._stale += 1
        self._cancelled += 1
        self._room.set()
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        # Keeps the heap O(live keys) when prefetches are cancelled or re-prioritised en masse.
        if self._stale > 64 and self._stale * 2 > len(self._heap):
            self._heap = [
                (f.priority, f.seq, f.key)
                for f in self._flights.values()
                if f.state is _State.QUEUED
            ]
            heapq.heapify(self._heap)
            self._stale = 0

    def _is_live(self, seq: int, key: ChunkKey) -> bool:
        flight = self._flights.get(key)
        return flight is not None and flight.state is _State.QUEUED and flight.seq == seq

    def _take_batch(self) -> list[_Flight]:
        if self._retrying:
            self._retry_due()
        else:
            self._next_retry = math.inf  # the retries it was set for were cancelled
        heap = self._heap
        deferred = self._deferred_heap
        batch: list[_Flight] = []
        band_limit: int | None = None
        from_queue = 0
        # Only loads taken from the queue make room in it: while a get waits for room, they go
        # first, or the get would wait behind every deferred prefetch ranked above them.
        queue_first = self._room_waiters > 0
        while len(batch) < self._max_batch:
            while heap and not self._is_live(heap[0][1], heap[0][2]):
                heapq.heappop(heap)
                self._stale -= 1
            while deferred and not self._is_deferred(deferred[0][1], deferred[0][2]):
                heapq.heappop(deferred)
            # One priority order over the queue and the deferred prefetches (seqs are unique).
            if heap and (queue_first or not deferred or heap[0] < deferred[0]):
                source = heap
            elif deferred:
                source = deferred
            else:
                break
            priority, _, key = source[0]
            if band_limit is None:
                if self._batch_band is not None:
                    band_limit = priority + self._batch_band
            elif priority > band_limit:
                break
            heapq.heappop(source)
            if source is heap:
                flight = self._flights[key]
                from_queue += 1
            else:
                entry = self._deferred.pop(key)
                flight = self._new_flight(key, priority)
                flight.prefetched = True
                flight.prefetch_priority = priority
                flight.attempts = entry.attempts
                flight.requested_at = entry.requested_at
            flight.state = _State.LOADING
            batch.append(flight)
        if from_queue:
            self._queued -= from_queue
            self._room.set()
        return batch

    def _is_deferred(self, seq: int, key: ChunkKey) -> bool:
        entry = self._deferred.get(key)
        return entry is not None and entry.seq == seq

    # -- workers ----------------------------------------------------------------------------

    async def _worker(self) -> None:
        self._running += 1
        try:
            while True:
                batch = self._take_batch()
                if not batch:
                    if self._work.is_set():
                        self._work = anyio.Event()
                    if self._retrying:
                        # A failed prefetch waiting for its retry needs no request to wake us.
                        with anyio.move_on_after(self._next_retry - time.monotonic()):
                            await self._work.wait()
                    else:  # (a cancel scope costs ~6 µs: not on every idle wait)
                        await self._work.wait()
                    # One more turn of the loop lets requests made in the same tick as the one
                    # that woke us join this batch instead of the next.
                    await anyio.lowlevel.checkpoint()
                    continue
                await self._load(batch)
        finally:
            self._running -= 1
            if self._running == 0:
                self._shutdown()

    async def _load(self, batch: list[_Flight]) -> None:
        keys = [f.key for f in batch]
        self._inflight += len(batch)
        self._batches += 1
        try:
            try:
                results = await self._load_batch(keys)
            except Exception as exc:
                for flight in batch:
                    self._fail(flight, exc)
                return
            except BaseException:
                # Cancelled with the task group: put the keys back so a surviving worker (or
                # the final _shutdown) resolves their waiters; then let cancellation proceed.
                for flight in batch:
                    flight.state = _State.QUEUED
                    self._queued += 1
                    self._push(flight)
                raise
            for flight in batch:
                self._complete(flight, results.get(flight.key))
        finally:
            self._inflight -= len(batch)

    def _complete(self, flight: _Flight, result: Chunk | Exception | None) -> None:
        if result is None:
            self._fail(flight, StreamerError(f"load_batch returned nothing for chunk {flight.key}"))
            return
        if isinstance(result, Exception):
            self._fail(flight, result)
            return
        if self._on_loaded is not None:
            try:
                self._on_loaded(flight.key, result)
            except Exception as exc:
                self._fail(flight, exc)
                return
        self._loads += 1
        self._latencies.append((time.perf_counter() - flight.requested_at) * 1000.0)
        flight.chunk = result
        self._resolve(flight)

    def _fail(self, flight: _Flight, error: BaseException) -> None:
        self._errors += 1
        flight.error = error
        flight.traceback = error.__traceback__
        self._resolve(flight)
        if flight.prefetched and self._flights.get(flight.key) is None:
            self._schedule_retry(flight)

    def _resolve(self, flight: _Flight) -> None:
        flight.state = _State.DONE
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        flight.done.set()

    def _shutdown(self) -> None:
        self._started = False
        self._closed = True
        for flight in list(self._flights.values()):
            if flight.state is _State.QUEUED:
                self._queued -= 1
                flight.error = WorldClosed(f"chunk loader stopped before chunk {flight.key} loaded")
                self._resolve(flight)
        self._heap.clear()
        self._stale = 0
        self._deferred.clear()
        self._deferred_heap.clear()
        self._retrying.clear()
        self._next_retry = math.inf
        # Wake gets blocked on a full queue so they see the loader is closed.
        self._room.set()
