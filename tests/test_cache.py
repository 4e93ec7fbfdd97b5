from __future__ import annotations

import random

import numpy as np
import pytest

from streamer.runtime.cache import ChunkCache
from streamer.runtime.chunk import Chunk, ChunkKey
from streamer.schema.records import Feature

_TILES = np.zeros((64, 64), dtype=np.uint16)
_TILES.flags.writeable = False


def make_chunk(key: ChunkKey, n_features: int = 0) -> Chunk:
    features = tuple(Feature(id=f"f{i}", kind="tree", x=i, y=i) for i in range(n_features))
    return Chunk(key[0], key[1], _TILES, features=features)


SIZE = make_chunk((0, 0)).nbytes


def keys_of(cache: ChunkCache, candidates: list[ChunkKey]) -> set[ChunkKey]:
    return {k for k in candidates if k in cache}


def test_chunk_is_read_only_and_sized() -> None:
    tiles = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    chunk = Chunk(1, 2, tiles)
    tiles[0, 0] = 999  # the caller's array is not shared
    assert chunk.tiles[0, 0] == 0
    assert not chunk.tiles.flags.writeable
    assert chunk.nbytes >= 8192
    bigger = chunk.with_records(features=[Feature(id="a", kind="tree", x=1, y=1)])
    assert bigger.nbytes > chunk.nbytes
    assert bigger.tiles is chunk.tiles
    with pytest.raises(ValueError):
        Chunk(0, 0, np.zeros((32, 64), dtype=np.uint16))


def test_lru_order() -> None:
    cache = ChunkCache(3 * SIZE)
    a, b, c, d = (0, 0), (1, 0), (2, 0), (3, 0)
    for k in (a, b, c):
        cache.put(k, make_chunk(k))
    assert cache.get(a) is not None  # a becomes most recent; b is now the oldest
    cache.put(d, make_chunk(d))
    assert keys_of(cache, [a, b, c, d]) == {a, c, d}
    cache.put(b, make_chunk(b))
    assert keys_of(cache, [a, b, c, d]) == {a, d, b}
    assert cache.stats().evictions == 2


def test_peek_does_not_touch_recency_or_stats() -> None:
    cache = ChunkCache(2 * SIZE)
    a, b, c = (0, 0), (1, 0), (2, 0)
    cache.put(a, make_chunk(a))
    cache.put(b, make_chunk(b))
    assert cache.peek(a) is not None
    cache.put(c, make_chunk(c))
    assert a not in cache
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (0, 0)


def test_replace_updates_bytes() -> None:
    cache = ChunkCache(100 * SIZE)
    cache.put((0, 0), make_chunk((0, 0)))
    big = make_chunk((0, 0), n_features=10)
    cache.put((0, 0), big)
    assert cache.bytes == big.nbytes
    assert cache.get((0, 0)) is big
    cache.pin((0, 0))
    cache.put((0, 0), make_chunk((0, 0)))
    assert cache.bytes == SIZE == cache.stats().held_bytes


def test_pinned_and_dirty_never_evicted() -> None:
    cache = ChunkCache(4 * SIZE)
    pinned, dirty = (100, 0), (200, 0)
    cache.put(pinned, make_chunk(pinned))
    cache.pin(pinned)
    cache.put(dirty, make_chunk(dirty))
    cache.mark_dirty(dirty)
    for i in range(50):
        cache.put((i, 1), make_chunk((i, 1)))
        # Two held chunks leave room for exactly two evictable ones.
        assert cache.bytes <= cache.max_bytes
    assert pinned in cache and dirty in cache
    assert len(cache) == 4

    # Held chunks over the budget: everything evictable goes, held ones stay.
    for i in range(6):
        cache.pin((i, 2))
        cache.put((i, 2), make_chunk((i, 2)))
    assert cache.stats().held_bytes == 8 * SIZE
    assert len(cache) == 8
    assert cache.bytes > cache.max_bytes  # allowed: only held chunks remain

    # Unpinning makes them evictable again, most recent last.
    for i in range(6):
        cache.unpin((i, 2))
    assert cache.bytes <= cache.max_bytes
    assert keys_of(cache, [(i, 2) for i in range(6)]) == {(4, 2), (5, 2)}
    cache.mark_clean(dirty)
    cache.unpin(pinned)
    assert cache.stats().held_bytes == 0


def test_pin_refcount() -> None:
    cache = ChunkCache(SIZE)
    k = (5, 5)
    cache.put(k, make_chunk(k))
    cache.pin(k)
    cache.pin(k)
    cache.unpin(k)
    cache.put((6, 6), make_chunk((6, 6)))
    assert k in cache  # one pin left
    cache.unpin(k)
    assert cache.stats().pinned == 0
    with pytest.raises(ValueError):
        cache.unpin(k)


def test_dirty_and_pinned_together() -> None:
    cache = ChunkCache(SIZE)
    k = (5, 5)
    cache.put(k, make_chunk(k))
    cache.pin(k)
    cache.mark_dirty(k)
    cache.mark_dirty(k)  # idempotent
    cache.unpin(k)
    cache.put((6, 6), make_chunk((6, 6)))
    assert k in cache  # still dirty
    cache.pin(k)
    cache.mark_clean(k)
    cache.put((7, 7), make_chunk((7, 7)))
    assert k in cache  # still pinned
    cache.unpin(k)
    cache.put((8, 8), make_chunk((8, 8)))
    assert k not in cache


def test_pin_before_put() -> None:
    cache = ChunkCache(2 * SIZE)
    k = (9, 9)
    cache.pin(k)  # a prefetch pins before its load finishes
    assert k not in cache
    assert cache.stats().pinned == 1
    cache.put(k, make_chunk(k))
    for i in range(10):
        cache.put((i, 0), make_chunk((i, 0)))
    assert k in cache
    assert cache.stats().held_bytes == SIZE

    d = (10, 10)
    cache.mark_dirty(d)
    cache.put(d, make_chunk(d))
    for i in range(10):
        cache.put((i, 1), make_chunk((i, 1)))
    assert d in cache


def test_invalidate() -> None:
    cache = ChunkCache(10 * SIZE)
    a, b, c = (0, 0), (1, 0), (2, 0)
    for k in (a, b, c):
        cache.put(k, make_chunk(k))
    cache.pin(b)
    cache.mark_dirty(c)
    assert cache.invalidate(a)
    assert cache.invalidate(b)
    assert cache.invalidate(c)
    assert not cache.invalidate(a)
    assert len(cache) == 0 and cache.bytes == 0
    # The pin survives invalidation so a reload lands pinned; the dirty mark does not.
    assert cache.is_pinned(b) and not cache.is_dirty(c)
    cache.put(b, make_chunk(b))
    assert cache.stats().held_bytes == SIZE
    assert cache.get(a) is None
    assert cache.stats().invalidations == 3


def test_stats_counts() -> None:
    cache = ChunkCache(2 * SIZE)
    for i in range(3):
        cache.put((i, 0), make_chunk((i, 0)))
    assert cache.get((0, 0)) is None  # evicted
    assert cache.get((1, 0)) is not None
    assert cache.get((2, 0)) is not None
    assert cache.get((7, 7)) is None
    cache.pin((1, 0))
    cache.mark_dirty((2, 0))
    cache.pin((50, 50))
    s = cache.stats()
    assert (s.hits, s.misses, s.evictions, s.puts) == (2, 2, 1, 3)
    assert (s.entries, s.bytes, s.held_bytes) == (2, 2 * SIZE, 2 * SIZE)
    assert (s.pinned, s.dirty, s.max_bytes) == (2, 1, 2 * SIZE)


def test_oversized_chunk_is_evicted_unless_held() -> None:
    cache = ChunkCache(SIZE // 2)
    cache.put((0, 0), make_chunk((0, 0)))
    assert (0, 0) not in cache and cache.stats().evictions == 1
    cache.pin((1, 1))
    cache.put((1, 1), make_chunk((1, 1)))
    assert (1, 1) in cache


@pytest.mark.parametrize("seed", range(8))
def test_random_workload_respects_budget(seed: int) -> None:
    rng = random.Random(seed)
    capacity = 20
    cache = ChunkCache(capacity * SIZE)
    universe = [(x, y) for x in range(-10, 10) for y in range(-5, 5)]  # 10x capacity
    variants = {k: make_chunk(k, n_features=rng.randrange(4)) for k in universe}
    pins: dict[ChunkKey, int] = {}
    dirty: set[ChunkKey] = set()
    present_held: set[ChunkKey] = set()  # model: held keys that must be cached

    for _ in range(3000):
        k = rng.choice(universe)
        op = rng.random()
        if op < 0.45:
            cache.put(k, variants[k])
            if k in pins or k in dirty:
                present_held.add(k)
        elif op < 0.75:
            got = cache.get(k)
            assert got is None or got is variants[k]
        elif op < 0.83:
            if sum(pins.values()) < capacity // 2:
                cache.pin(k)
                pins[k] = pins.get(k, 0) + 1
                if k in cache:
                    present_held.add(k)
        elif op < 0.90:
            if pins:
                k = rng.choice(sorted(pins))
                cache.unpin(k)
                pins[k] -= 1
                if not pins[k]:
                    del pins[k]
                    if k not in dirty:
                        present_held.discard(k)
        elif op < 0.95:
            if len(dirty) < capacity // 4:
                cache.mark_dirty(k)
                dirty.add(k)
                if k in cache:
                    present_held.add(k)
        elif op < 0.99:
            if dirty:
                k = rng.choice(sorted(dirty))
                cache.mark_clean(k)
                dirty.discard(k)
                if k not in pins:
                    present_held.discard(k)
        else:
            cache.invalidate(k)
            dirty.discard(k)
            present_held.discard(k)

        s = cache.stats()
        evictable_bytes = s.bytes - s.held_bytes
        evictable_entries = s.entries - len(present_held)
        assert s.bytes <= s.max_bytes or evictable_entries == 0
        assert evictable_bytes >= 0
        assert all(h in cache for h in present_held), "a pinned or dirty chunk was evicted"
        assert s.held_bytes == sum(variants[h].nbytes for h in present_held)
        assert s.bytes == sum(variants[h].nbytes for h in universe if h in cache)
        assert s.pinned == len(pins) and s.dirty == len(dirty)


def _without_defaults(rec: object) -> bytes:
    """``rec`` msgpack-encoded as an older writer might have: nested records' fields that
    hold their default left out (msgspec fills them in again on decode)."""
    import msgspec

    from streamer.schema.records import NESTED_TYPES

    raw = msgspec.to_builtins(rec)
    for field in ("characters", "features", "structures", "societies"):
        for item in raw[field]:
            rtype = NESTED_TYPES[item["type"]]
            for f in msgspec.structs.fields(rtype):
                if f.default is not msgspec.NODEFAULT:
                    default = msgspec.to_builtins(f.default)
                elif f.default_factory is not msgspec.NODEFAULT:
                    default = msgspec.to_builtins(f.default_factory())
                else:
                    continue
                if item.get(f.encode_name) == default:
                    del item[f.encode_name]
    for key in ("tile_idx", "tile_val"):
        raw[key] = getattr(rec, key)  # bytes, as stored (to_builtins made them base64)
    return msgspec.msgpack.encode(raw)


@pytest.mark.parametrize("elided", [False, True])
def test_chunk_sized_from_its_stored_payload_is_never_smaller(elided: bool) -> None:
    """Loads size a chunk from its stored msgpack payload (less the tiles, plus the fields a
    stored record may leave out) instead of encoding its records again: that may only err
    high, never undercount the budget, also for payloads that leave defaults out."""
    from streamer.runtime.regionstate import build_chunk
    from streamer.schema.codec import ChunkCodec, pack_tiles
    from streamer.schema.records import Character, ChunkRecord, ItemStack, Society, Structure

    codec = ChunkCodec("msgpack")
    base = np.zeros((64, 64), dtype=np.uint16)
    base.flags.writeable = False
    for n in (0, 1, 5, 40, 200):
        idx, val = pack_tiles(np.arange(0, 2 * n + 2, 2), np.full(n + 1, 7))
        rec = ChunkRecord(
            cx=1,
            cy=2,
            generator="g",
            generator_version=1,
            base_fingerprint=0,
            tile_idx=idx,
            tile_val=val,
            features=[Feature(id=f"f{i}", kind="tree", x=64 + i % 64, y=128) for i in range(n)],
            characters=[
                Character(id=f"c{i}", given_name="n", x=70, y=130, inventory=[ItemStack("ore", 3)])
                for i in range(n // 5)
            ],
            structures=[Structure(id=f"s{i}", kind="hut", x=70, y=131) for i in range(n // 10)],
            societies=[Society(id=f"o{i}", name="s", x=70, y=132) for i in range(n // 20)],
        )
        payload = _without_defaults(rec) if elided else codec.encode(rec)
        stored = codec.decode(payload, where="t").record
        for field in ("characters", "features", "structures", "societies"):
            assert getattr(stored, field) == getattr(rec, field)
        plain = build_chunk(1, 2, base, stored, None, (), where="t")
        sized = build_chunk(1, 2, base, stored, None, (), where="t", payload_size=len(payload))
        assert sized.features == plain.features and sized.entities == plain.entities
        assert np.array_equal(sized.tiles, plain.tiles)
        count = len(rec.features) + len(rec.characters) + len(rec.structures) + len(rec.societies)
        assert plain.nbytes <= sized.nbytes <= plain.nbytes + 6 * (80 * count + 400), (n, elided)
