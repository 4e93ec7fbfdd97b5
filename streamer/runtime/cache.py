"""Byte-bounded LRU of chunks with pinning and dirty tracking.

Two stores, one budget. Evictable chunks live in a ``cachetools.LRUCache`` used purely as an
ordered, size-accounting mapping (its own ``maxsize`` is infinite; this class decides what to
evict, because the room left for evictable chunks shrinks as pinned and dirty chunks grow).
Pinned (refcount > 0) or dirty chunks are *held* in a plain dict, outside the LRU, so eviction
never has to skip over them: every eviction step pops the true LRU victim, keeping each
operation amortised O(1).

Invariant after every mutating call: ``evictable_bytes + held_bytes <= max_bytes`` unless the
LRU is empty (only held chunks remain, which may exceed the budget by design: a chunk in a
player's view or with undurable edits must stay).

Pins and dirty marks are remembered for keys not (yet) cached: a prefetch pins before the
load finishes, and the ``put`` that follows must land pinned rather than be evicted at once.

Not thread-safe; every call is synchronous and runs on the event loop.
"""

from __future__ import annotations

import math

import cachetools
import msgspec

from streamer.runtime.chunk import Chunk, ChunkKey

__all__ = ["CacheStats", "ChunkCache"]


class CacheStats(msgspec.Struct, frozen=True, kw_only=True):
    #: Bytes of every cached chunk, held ones included.
    bytes: int
    #: Cached chunks (evictable + held).
    entries: int
    hits: int
    misses: int
    evictions: int
    #: Keys with a pin refcount > 0, whether or not their chunk is cached yet.
    pinned: int
    #: Keys marked dirty, whether or not their chunk is cached.
    dirty: int
    max_bytes: int
    #: Bytes of chunks that are pinned or dirty (never evicted).
    held_bytes: int
    puts: int
    invalidations: int


def _chunk_size(chunk: Chunk) -> float:
    return chunk.nbytes


class ChunkCache:
    """Byte-bounded LRU of :class:`Chunk` keyed by ``(cx, cy)``; see the module docstring."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self._max_bytes = max_bytes
        self._lru: cachetools.LRUCache[ChunkKey, Chunk] = cachetools.LRUCache(
            maxsize=math.inf, getsizeof=_chunk_size
        )
        self._held: dict[ChunkKey, Chunk] = {}
        self._held_bytes = 0
        self._pins: dict[ChunkKey, int] = {}
        self._dirty: set[ChunkKey] = set()
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._puts = 0
        self._invalidations = 0

    # -- reads ------------------------------------------------------------------------------

    def get(self, key: ChunkKey) -> Chunk | None:
        """The cached chunk (marking it most recently used), or ``None``. Counts a hit or miss."""
        chunk = self._held.get(key)
        if chunk is None:
            # LRUCache.get goes through __getitem__, which is what refreshes recency.
            chunk = self._lru.get(key)
        if chunk is None:
            self._misses += 1
        else:
            self._hits += 1
        return chunk

    def peek(self, key: ChunkKey) -> Chunk | None:
        """Like :meth:`get` without touching recency or the hit/miss counters (for flushers)."""
        chunk = self._held.get(key)
        if chunk is not None:
            return chunk
        if key in self._lru:
            # Cache.__getitem__ on the base class reads without moving the key to the MRU end.
            return cachetools.Cache.__getitem__(self._lru, key)
        return None

    def __contains__(self, key: object) -> bool:
        return key in self._held or key in self._lru

    def __len__(self) -> int:
        return len(self._held) + len(self._lru)

    def is_pinned(self, key: ChunkKey) -> bool:
        return key in self._pins

    def is_dirty(self, key: ChunkKey) -> bool:
        return key in self._dirty

    def dirty_keys(self) -> frozenset[ChunkKey]:
        return frozenset(self._dirty)

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def bytes(self) -> int:
        return int(self._lru.currsize) + self._held_bytes

    # -- writes -----------------------------------------------------------------------------

    def put(self, key: ChunkKey, chunk: Chunk) -> None:
        """Insert or replace ``key``, then evict least recently used chunks to fit the budget.

        A chunk larger than the whole budget that is neither pinned nor dirty is evicted at
        once (and counted); callers still hold the instance they passed in.
        """
        self._puts += 1
        if self._is_held(key):
            old = self._held.get(key)
            if old is not None:
                self._held_bytes -= old.nbytes
            self._held[key] = chunk
            self._held_bytes += chunk.nbytes
        else:
            self._lru[key] = chunk
        self._evict()

    def pin(self, key: ChunkKey) -> None:
        """Add one pin to ``key``. Works before the chunk is cached; the later ``put`` is pinned."""
        was_held = self._is_held(key)
        self._pins[key] = self._pins.get(key, 0) + 1
        if not was_held:
            self._hold(key)

    def unpin(self, key: ChunkKey) -> None:
        """Drop one pin. The chunk becomes evictable (as most recently used) at the last one.

        :raises ValueError: ``key`` is not pinned — a refcount bug in the caller, which would
            otherwise silently unpin a chunk someone else still needs.
        """
        count = self._pins.get(key, 0)
        if count <= 0:
            raise ValueError(f"unpin of chunk {key} which is not pinned")
        if count > 1:
            self._pins[key] = count - 1
            return
        del self._pins[key]
        if not self._is_held(key):
            self._release(key)

    def mark_dirty(self, key: ChunkKey) -> None:
        """Keep ``key`` until :meth:`mark_clean`: its edits are not durable yet. Idempotent."""
        if key in self._dirty:
            return
        was_held = self._is_held(key)
        self._dirty.add(key)
        if not was_held:
            self._hold(key)

    def mark_clean(self, key: ChunkKey) -> None:
        """The chunk's edits are durable; it may be evicted again unless pinned. Idempotent."""
        if key not in self._dirty:
            return
        self._dirty.discard(key)
        if not self._is_held(key):
            self._release(key)

    def invalidate(self, key: ChunkKey) -> bool:
        """Drop the cached chunk for ``key``; returns whether one was cached.

        Pins survive (the chunk is still wanted, and its next ``put`` must be pinned); the dirty
        mark does not, because the data it protected is what the caller is discarding.
        """
        self._dirty.discard(key)
        removed = False
        old = self._held.pop(key, None)
        if old is not None:
            self._held_bytes -= old.nbytes
            removed = True
        elif key in self._lru:
            del self._lru[key]
            removed = True
        if removed:
            self._invalidations += 1
        return removed

    def stats(self) -> CacheStats:
        return CacheStats(
            bytes=self.bytes,
            entries=len(self),
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            pinned=len(self._pins),
            dirty=len(self._dirty),
            max_bytes=self._max_bytes,
            held_bytes=self._held_bytes,
            puts=self._puts,
            invalidations=self._invalidations,
        )

    # -- internals --------------------------------------------------------------------------

    def _is_held(self, key: ChunkKey) -> bool:
        return key in self._pins or key in self._dirty

    def _hold(self, key: ChunkKey) -> None:
        # Moving out of the LRU leaves total bytes unchanged, so no eviction is needed here.
        if key in self._lru:
            chunk = self._lru.pop(key)
            self._held[key] = chunk
            self._held_bytes += chunk.nbytes

    def _release(self, key: ChunkKey) -> None:
        chunk = self._held.pop(key, None)
        if chunk is None:
            return
        self._held_bytes -= chunk.nbytes
        self._lru[key] = chunk
        # The released chunk is most recent, so older evictable chunks go first; it goes only
        # if it alone cannot fit beside the held set.
        self._evict()

    def _evict(self) -> None:
        lru = self._lru
        while lru and lru.currsize + self._held_bytes > self._max_bytes:
            lru.popitem()
            self._evictions += 1
