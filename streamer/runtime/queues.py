"""Per-region delta queues: tick bookkeeping, back-pressure and what a flush may fold.

Every region the runtime has touched has one :class:`RegionQueue`. Its three tick marks:

- ``lpt`` (lastProcessedTick): every delta with ``tick <= lpt`` is in the region file.
- ``floor``: ticks ``<= floor`` are *sealed*: a flush has taken (or is writing) them. A new
  delta must have ``tick > floor`` or it is rejected with ``TickAlreadyProcessed``. ``floor``
  only moves up, and ``floor >= lpt``.
- ``hwm``: the highest tick accepted (durable, or pending on its way to the journal). A new
  delta must have ``tick >= hwm``, so within a queue ticks are non-decreasing and "every
  delta with tick <= cutoff" is always a prefix. A failed batch was never accepted: its
  ticks stop counting (:meth:`RegionQueue.settle`).

Why a flush seals rather than just folding: replay after a crash keeps exactly the journal
records with ``tick > lpt``. That is exactly-once only if, once a region file says
``lpt = T``, no delta with ``tick <= T`` can still arrive or still be waiting for the journal.
So a flush folds a prefix up to a cutoff that is below every batch still in flight to the
journal, and raises ``floor`` to it before writing.

Routine (timer) flushes leave the newest tick in the queue while the region is still being
written to, because a shard server may still submit more deltas for that tick; once the
region has been idle for the flush interval, or when the caller forces it (``flush()``,
close, back-pressure), the newest tick is folded too and thereby sealed.

``entries`` holds only durable (journaled) deltas, appended in journal order by the journal's
``on_durable`` hook (a whole batch's part for this region at once, :meth:`RegionQueue.extend`).
``pending`` holds the ticks of batches accepted but not yet durable.
"""

from __future__ import annotations

import math
import operator
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import TypeAlias

import anyio
import msgspec

from streamer.errors import DeltaError, TickAlreadyProcessed
from streamer.schema.deltas import (
    EntityRemove,
    EntityUpsert,
    FeatureAdd,
    FeatureRemove,
    SocietyUpdate,
    StructureRemove,
    StructureUpsert,
    TileSet,
)

__all__ = ["ChunkDelta", "DeltaQueues", "Queued", "QueuedEntries", "RegionKey", "RegionQueue"]

RegionKey: TypeAlias = tuple[int, int]
ChunkKey: TypeAlias = tuple[int, int]

#: A delta that touches exactly one chunk (an ``EntityMove`` is split into remove + upsert).
ChunkDelta: TypeAlias = (
    TileSet
    | EntityUpsert
    | EntityRemove
    | FeatureAdd
    | FeatureRemove
    | StructureUpsert
    | StructureRemove
    | SocietyUpdate
)


class Queued(msgspec.Struct, frozen=True, gc=False):
    """One queued delta.

    A C-level struct: ``map(Queued, ticks, chunks, deltas)`` builds a batch's entries without
    Python-level calls, and ``gc=False`` keeps the (possibly hundreds of thousands of) queued
    entries out of the cyclic garbage collector, whose full passes over them cost more than
    building them. Safe: an entry only refers to immutable values and never to itself.
    """

    tick: int
    chunk: ChunkKey
    delta: ChunkDelta


_CHUNK_OF = operator.attrgetter("chunk")


class QueuedEntries:
    """A FIFO of :class:`Queued` kept as one tuple per pushed batch part (a *segment*).

    Behaves like the deque it replaces (``len``, truth, iteration in order, ``[0]``/``[-1]``,
    ``append``, ``clear``). Segments keep the garbage collector's full passes cheap: a tuple of
    untracked entries is itself untracked after one pass, so hundreds of thousands of queued
    deltas cost it a few thousand visits instead of one each.
    """

    __slots__ = ("_len", "_segs")

    def __init__(self, items: Iterable[Queued] = ()) -> None:
        self._segs: deque[tuple[Queued, ...]] = deque()
        self._len = 0
        self.extend_segment(tuple(items))

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Queued]:
        return chain.from_iterable(self._segs)

    def __getitem__(self, index: int) -> Queued:
        if index == 0 and self._len:
            return self._segs[0][0]
        if index == -1 and self._len:
            return self._segs[-1][-1]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError("queue index out of range")
        if index >= self._len // 2:
            # From the back: a flush's checks look near the end of what it took, and a busy
            # region's queue holds hundreds of segments.
            back = self._len - index  # 1 = the last entry
            for seg in reversed(self._segs):
                if back <= len(seg):
                    return seg[len(seg) - back]
                back -= len(seg)
        else:
            for seg in self._segs:
                if index < len(seg):
                    return seg[index]
                index -= len(seg)
        raise AssertionError("unreachable")  # pragma: no cover

    def __repr__(self) -> str:
        return f"QueuedEntries({list(self)!r})"

    def append(self, item: Queued) -> None:
        self._segs.append((item,))
        self._len += 1

    def extend_segment(self, seg: tuple[Queued, ...]) -> None:
        if seg:
            self._segs.append(seg)
            self._len += len(seg)

    def clear(self) -> None:
        self._segs.clear()
        self._len = 0

    def release(self) -> deque[tuple[Queued, ...]]:
        """Empty this FIFO and return its segments (for freeing them elsewhere)."""
        segs, self._segs, self._len = self._segs, deque(), 0
        return segs

    @property
    def segments(self) -> Iterable[tuple[Queued, ...]]:
        """The entries in order, a pushed batch part (tuple) at a time."""
        return self._segs

    def take_while_le(self, cutoff: int) -> QueuedEntries:
        """The prefix of entries with ``tick <= cutoff`` (ticks are non-decreasing).

        Shares this queue's segments instead of copying entries into one list: a flush may
        take hundreds of thousands, and a list of them would be walked by every garbage
        collection that runs while the fold is busy (milliseconds each).
        """
        out = QueuedEntries()
        segs = self._segs
        # Ticks are non-decreasing, so the segments to leave behind are at the end: count
        # them from there (usually none or a few) and copy the rest at C speed.
        whole, left = len(segs), 0
        while whole and segs[whole - 1][0].tick > cutoff:
            whole -= 1
            left += len(segs[whole])
        if whole and segs[whole - 1][-1].tick > cutoff:  # straddles the cutoff
            whole -= 1
            seg = segs[whole]
            left += len(seg)
            n = 0
            while seg[n].tick <= cutoff:
                n += 1
            out._segs = deque(islice(segs, whole))
            out._len = self._len - left
            out.extend_segment(seg[:n])
            return out
        out._segs = deque(islice(segs, whole))
        out._len = self._len - left
        return out

    def is_prefix(self, items: Sequence[Queued] | QueuedEntries) -> bool:
        """Whether ``items`` are the first ``len(items)`` entries, checked by count and by the
        identity of the first and last (a flush folds exactly what ``take`` gave it)."""
        n = len(items)
        if n > self._len:
            return False
        return n == 0 or (items[0] is self[0] and items[-1] is self[n - 1])

    def drop_prefix(self, n: int) -> None:
        """Remove the first ``n`` entries."""
        if n >= self._len:
            self.clear()
            return
        segs = self._segs
        self._len -= n
        while n:
            head = segs[0]
            if len(head) <= n:
                segs.popleft()
                n -= len(head)
            else:
                segs[0] = head[n:]
                n = 0


@dataclass(slots=True)
class _PendingBatch:
    min_tick: int
    max_tick: int
    count: int
    #: The journal batch it belongs to (-1: not given; settled oldest first).
    seq: int = -1


@dataclass(eq=False)
class RegionQueue:
    key: RegionKey
    lpt: int
    floor: int = -1
    hwm: int = -1
    entries: QueuedEntries = field(default_factory=QueuedEntries)
    pending: deque[_PendingBatch] = field(default_factory=deque)
    pending_count: int = 0
    per_chunk: Counter[ChunkKey] = field(default_factory=Counter)
    #: monotonic time of the oldest unfolded delta (None: nothing to fold).
    dirty_since: float | None = None
    last_submit: float = 0.0
    #: A submit is waiting for room or a caller forces a flush of the newest tick.
    urgent: bool = False
    #: A flush of this region is running (at most one at a time).
    flushing: bool = False
    room: anyio.Event = field(default_factory=anyio.Event)

    def __post_init__(self) -> None:
        self.floor = max(self.floor, self.lpt)
        self.hwm = max(self.hwm, self.lpt)

    @property
    def depth(self) -> int:
        """Deltas held for this region: queued plus accepted-but-not-yet-journaled."""
        return len(self.entries) + self.pending_count

    @property
    def clean(self) -> bool:
        return not self.entries and not self.pending and not self.flushing

    def check_ticks(self, ticks: Iterable[int]) -> None:
        """Validate one batch's ticks for this region, in batch order.

        :raises TickAlreadyProcessed: a tick is at or below the sealed floor.
        :raises DeltaError: ticks would go backwards in this region's queue.
        """
        if (
            type(ticks) is list
            and ticks
            and ticks[0] > self.floor
            and ticks[0] >= self.hwm
            and (len(ticks) == 1 or ticks == sorted(ticks))
        ):
            return  # non-decreasing from a tick above the floor and not below hwm: all pass
        last = self.hwm
        for tick in ticks:
            if tick <= self.floor:
                raise TickAlreadyProcessed(
                    f"region {self.key}: delta tick {tick} is at or below the region's "
                    f"lastProcessedTick {self.floor} (already processed); ticks must increase"
                )
            if tick < last:
                raise DeltaError(
                    f"region {self.key}: delta tick {tick} is below tick {last} already "
                    "submitted for this region; ticks must not go backwards within a region"
                )
            last = tick

    def reserve(self, ticks: list[int], seq: int = -1) -> None:
        """Account an accepted batch (journal ``seq``) that is on its way to the journal."""
        top = max(ticks)
        self.pending.append(_PendingBatch(min(ticks), top, len(ticks), seq))
        self.pending_count += len(ticks)
        self.hwm = max(self.hwm, top)
        self.last_submit = time.monotonic()

    def settle(self, *, failed: bool = False, seq: int | None = None) -> int:
        """Pending batch ``seq`` (the oldest if ``None``) left the journal queue (durable, or
        ``failed``).

        By identity, not position: batches leave in journal order except one withdrawn from
        the queue because a batch it depends on failed (``Journal.withdraw``). Releasing
        the oldest instead would give back a batch's reservation while it is still on its
        way, and a flush could then seal its tick: lost after a crash, acknowledged.
        """
        pending = self.pending
        if seq is None or pending[0].seq == seq:
            done = pending.popleft()
        else:
            i = next((i for i, p in enumerate(pending) if p.seq == seq), None)
            if i is None:
                return 0  # nothing of that batch was reserved here
            done = pending[i]
            del pending[i]
        self.pending_count -= done.count
        if failed and done.max_tick >= self.hwm:
            # Its ticks were never accepted: a later submit below them but not below what
            # is durable (queued, or folded up to lpt) or still pending must pass.
            self.hwm = max(
                self.lpt,
                self.entries[-1].tick if self.entries else -1,
                max((p.max_tick for p in self.pending), default=-1),
            )
        if not self.pending_count:
            self.room.set()
        return done.count

    def push(self, item: Queued) -> None:
        self.entries.append(item)
        self.per_chunk[item.chunk] += 1
        if self.dirty_since is None:
            self.dirty_since = time.monotonic()

    def extend(
        self, ticks: Sequence[int], chunks: Sequence[ChunkKey], deltas: Sequence[ChunkDelta]
    ) -> None:
        """``push`` each ``(tick, chunk, delta)`` in order (one batch's part for this region)."""
        if not deltas:
            return
        if not len(ticks) == len(chunks) == len(deltas):
            raise ValueError("extend: ticks, chunks and deltas differ in length")
        self.entries.extend_segment(tuple(map(Queued, ticks, chunks, deltas)))
        self.per_chunk.update(chunks)
        if self.dirty_since is None:
            self.dirty_since = time.monotonic()

    def cutoff(self, *, full: bool, idle_s: float, now: float) -> int | None:
        """Highest tick a flush may fold now, or ``None`` if nothing is foldable."""
        if not self.entries:
            return None
        newest = self.entries[-1].tick
        limit = newest
        if not full and not self.urgent and now - self.last_submit < idle_s:
            # Ticks up to the floor are sealed already, so folding them closes nothing new.
            limit = max(newest - 1, min(self.floor, newest))
        if self.pending:
            # A batch still in flight to the journal holds ticks >= its min_tick: sealing them
            # now would make replay skip that batch after a crash.
            limit = min(limit, self.pending[0].min_tick - 1)
        if limit < self.entries[0].tick:
            return None
        return limit

    def take(self, cutoff: int) -> QueuedEntries:
        """The prefix with ``tick <= cutoff``; seals the floor at ``cutoff``."""
        out = self.entries.take_while_le(cutoff)
        self.floor = max(self.floor, cutoff)
        return out

    def folded(
        self,
        items: Sequence[Queued] | QueuedEntries,
        lpt: int,
        *,
        counts: Mapping[ChunkKey, int] | None = None,
    ) -> list[ChunkKey]:
        """Drop the folded prefix; return chunks that have nothing queued any more.

        :param counts: how many of ``items`` each chunk has, if the caller counted them
            already (``FoldResult.counts``): saves a pass over the items on the event loop.
        """
        cleaned: list[ChunkKey] = []
        assert self.entries.is_prefix(items), "flush folded something other than the queue's prefix"
        self.entries.drop_prefix(len(items))
        per_chunk = self.per_chunk
        if counts is None:
            counts = Counter(map(_CHUNK_OF, items))
        for chunk, count in counts.items():
            left = per_chunk[chunk] - count
            if left <= 0:
                del per_chunk[chunk]
                cleaned.append(chunk)
            else:
                per_chunk[chunk] = left
        self.lpt = max(self.lpt, lpt)
        self.floor = max(self.floor, self.lpt)
        self.dirty_since = time.monotonic() if self.entries else None
        if not self.entries:
            self.urgent = False
        self.room.set()
        return cleaned

    def for_chunk(self, chunk: ChunkKey) -> list[ChunkDelta]:
        if chunk not in self.per_chunk:
            return []
        return [q.delta for q in self.entries if q.chunk == chunk]


class DeltaQueues:
    """All region queues, with the back-pressure bound shared by every region."""

    def __init__(self, max_deltas: int) -> None:
        self.max_deltas = max_deltas
        self.regions: dict[RegionKey, RegionQueue] = {}

    def get(self, key: RegionKey) -> RegionQueue | None:
        return self.regions.get(key)

    def add(self, key: RegionKey, lpt: int) -> RegionQueue:
        q = self.regions.get(key)
        if q is None:
            q = RegionQueue(key, lpt)
            self.regions[key] = q
        return q

    def full(self, key: RegionKey, incoming: int) -> bool:
        q = self.regions[key]
        # A batch bigger than the whole bound still goes through into an empty queue,
        # otherwise it could never be accepted at all.
        return q.depth > 0 and q.depth + incoming > self.max_deltas

    async def wait_for_room(self, key: RegionKey) -> None:
        q = self.regions[key]
        if q.room.is_set():
            q.room = anyio.Event()
        await q.room.wait()

    def forget_clean(self, keep: Iterable[RegionKey] = ()) -> None:
        """Drop clean queues (their marks are all recoverable from the region file)."""
        keep_set = set(keep)
        for key in [k for k, q in self.regions.items() if q.clean and k not in keep_set]:
            del self.regions[key]

    def depth(self) -> int:
        return sum(q.depth for q in self.regions.values())

    def max_depth(self) -> int:
        return max((q.depth for q in self.regions.values()), default=0)

    def dirty(self) -> list[RegionQueue]:
        return [q for q in self.regions.values() if q.entries]

    def due(self, now: float, interval_s: float) -> list[RegionQueue]:
        """Dirty regions to flush now: waited long enough, or asked for urgently."""
        out = []
        for q in self.regions.values():
            if not q.entries or q.flushing:
                continue
            since = q.dirty_since if q.dirty_since is not None else math.inf
            if q.urgent or now - since >= interval_s:
                out.append(q)
        return out
