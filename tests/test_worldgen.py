"""worldgen: bit-exact golden output, seamlessness, integer-only pipeline, defaults, params."""

from __future__ import annotations

import threading
from typing import Any

import msgspec
import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.coords import region_of_tile
from streamer.errors import ConfigError
from streamer.worldgen import (
    DEFAULT_PARAMS,
    FEATURE_RULES,
    GENERATOR_NAME,
    GENERATOR_VERSION,
    TILE_TABLE,
    GeneratorParams,
    TerrainGenerator,
    params_from_dict,
    params_to_dict,
    tiles_fingerprint,
    walkable,
)
from streamer.worldgen import terrain as terrain_mod
from streamer.worldgen import tiles as t
from streamer.worldgen.biomes import classify

M64 = (1 << 64) - 1
SEEDS = (0, 1, 20261126, (1 << 64) - 12345)
COORDS = ((0, 0), (1, 0), (-1, -1), (-3, 7), (-40, 33), (250, -999), (1 << 24, -(1 << 24)))

# Changing any value below changes stored worlds' base terrain: it requires bumping
# GENERATOR_VERSION (and a new set of vectors), never just editing the numbers.
GOLDEN_CHUNKS: dict[tuple[int, int, int], int] = {
    (0, 0, 0): 0x79C9780D5E6DB2B0,
    (0, 1, 0): 0x7E828682748DC6C4,
    (0, -1, -1): 0xB0EA746B6495EC79,
    (0, -3, 7): 0x028D29A9BEECD476,
    (0, -40, 33): 0x3FD32CA079CCCA7C,
    (0, 250, -999): 0x1B98D6E7A3A90117,
    (0, 16777216, -16777216): 0xF7FD8AB87A199D07,
    (1, 0, 0): 0x985DFAB2105B29DA,
    (1, 1, 0): 0x318AC93D38261C62,
    (1, -1, -1): 0x9B34E57B2769AA0C,
    (1, -3, 7): 0x022534527C75108E,
    (1, -40, 33): 0x13F6B24AD24E7876,
    (1, 250, -999): 0xA9A882BEB3C4B2C5,
    (1, 16777216, -16777216): 0x796AF5108D23F080,
    (20261126, 0, 0): 0xA0B86EE170D8CAF7,
    (20261126, 1, 0): 0xA0B86EE170D8CAF7,
    (20261126, -1, -1): 0xA0B86EE170D8CAF7,
    (20261126, -3, 7): 0xAEC2DC236619BA3C,
    (20261126, -40, 33): 0xBC41845F24FC44A7,
    (20261126, 250, -999): 0xBC9D309B91D7B72F,
    (20261126, 16777216, -16777216): 0xC8616F2C012EEA7A,
    (18446744073709539271, 0, 0): 0xD16F09B343373DB6,
    (18446744073709539271, 1, 0): 0x7E7AF99FB440AC95,
    (18446744073709539271, -1, -1): 0x53C55974EB66DB44,
    (18446744073709539271, -3, 7): 0xBF6B8DCA7F05C21D,
    (18446744073709539271, -40, 33): 0x6FD532F5A774AC4E,
    (18446744073709539271, 250, -999): 0x07BF55AB1E71DB9B,
    (18446744073709539271, 16777216, -16777216): 0x8D96C2B2934B14B5,
}
# Many chunks are a single tile type; the raw height/moisture levels and a 512x512 window
# pin every bit of the noise too.
GOLDEN_FIELDS: dict[tuple[int, int, int], int] = {
    (1, -1, -1): 0x6D6C2806C71E1E88,
    (1, -3, 7): 0x0A80915262F08F8C,
    (1, -40, 33): 0x91442CC600A55DFB,
    (20261126, -1, -1): 0x6ED2B69B5AF480F2,
    (20261126, -3, 7): 0x18BFEEF6F56024A4,
    (20261126, -40, 33): 0x711604CE19B98AC6,
}
GOLDEN_WINDOWS: dict[int, int] = {
    0: 0x8E8298F1C34B9637,
    1: 0xEBD0B0B2BB213DC7,
    20261126: 0x94992FE37E08655D,
    18446744073709539271: 0x2A3DC429A10F282B,
}
GOLDEN_REGIONS: dict[tuple[int, int, int, int], int] = {
    (1, 0, 0, 8): 0xC6D4DDDA029424F9,
    (20261126, -1, 2, 8): 0x7FD8FE02507CD5F7,
    (7, 3, -5, 4): 0x316D3B01F9094786,
}
GOLDEN_WORLD_SPAWN: dict[int, tuple[int, int]] = {
    1: (0, 0),
    20261126: (-154, 0),
}


@pytest.fixture(scope="module")
def gen() -> TerrainGenerator:
    return TerrainGenerator(20261126)


def region_digest(g: TerrainGenerator, rx: int, ry: int, size: int) -> int:
    """Schema-independent digest: only what the generator decides, not how records encode."""
    d = g.region_defaults(rx, ry, size)
    data = [
        [[f.id, f.kind, f.x, f.y, f.amount] for f in d.features],
        [[c.id, c.x, c.y, c.given_name, c.family_name, c.hp] for c in d.npcs],
        list(d.spawn),
    ]
    return xxhash.xxh3_64_intdigest(msgspec.json.encode(data))


# -- golden vectors ------------------------------------------------------------------------


def test_identity() -> None:
    g = TerrainGenerator(1)
    assert (g.name, g.version) == (GENERATOR_NAME, GENERATOR_VERSION) == ("streamer-terrain", 1)


def test_golden_chunk_fingerprints() -> None:
    actual = {
        (seed, cx, cy): TerrainGenerator(seed).fingerprint(cx, cy)
        for seed in SEEDS
        for cx, cy in COORDS
    }
    assert actual == GOLDEN_CHUNKS, "generated terrain changed: bump GENERATOR_VERSION"


def fields_digest(g: TerrainGenerator, cx: int, cy: int) -> int:
    trace = g.debug_pipeline(cx, cy)
    data = trace["field0"].astype("<i4").tobytes() + trace["field1"].astype("<i4").tobytes()
    return xxhash.xxh3_64_intdigest(data)


def test_golden_fields() -> None:
    actual = {
        (seed, cx, cy): fields_digest(TerrainGenerator(seed), cx, cy)
        for seed in SEEDS[1:3]
        for cx, cy in COORDS[2:5]
    }
    assert actual == GOLDEN_FIELDS, "generated terrain changed: bump GENERATOR_VERSION"


def test_golden_windows() -> None:
    actual = {
        seed: tiles_fingerprint(TerrainGenerator(seed).tiles_window(-256, -256, 512, 512))
        for seed in SEEDS
    }
    assert actual == GOLDEN_WINDOWS, "generated terrain changed: bump GENERATOR_VERSION"


def test_golden_region_defaults() -> None:
    actual = {
        (seed, rx, ry, size): region_digest(TerrainGenerator(seed), rx, ry, size)
        for seed, rx, ry, size in ((1, 0, 0, 8), (20261126, -1, 2, 8), (7, 3, -5, 4))
    }
    assert actual == GOLDEN_REGIONS, "default features/NPCs changed: bump GENERATOR_VERSION"


def test_golden_world_spawn() -> None:
    actual = {seed: TerrainGenerator(seed).world_spawn() for seed in (1, 20261126)}
    assert actual == GOLDEN_WORLD_SPAWN


# -- an independent scalar reference ---------------------------------------------------------


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _salt(seed: int, field: int, octave: int) -> int:
    def splitmix(x: int) -> int:
        return _mix((x + 0x9E3779B97F4A7C15) & M64)

    return splitmix((seed & M64) ^ splitmix((field << 16) | octave))


def _field_level(seed: int, field: int, scale: int, octaves: int, x: int, y: int) -> int:
    """docs/worldgen.md step by step with Python ints (whose >> is floor, like numpy's)."""
    total = 0
    for o in range(octaves):
        k = scale - o
        s = _salt(seed, field, o)

        def v(i: int, j: int, s: int = s, o: int = o) -> int:
            return _mix(((i * 0x9E3779B97F4A7C15) ^ (j * 0xC2B2AE3D27D4EB4F + s)) & M64) >> (48 + o)

        def smooth(f: int, k: int = k) -> int:
            tt = f << (15 - k)
            return (tt * tt * (3 * 32768 - 2 * tt)) >> 30

        ix, iy = x >> k, y >> k
        sx, sy = smooth(x & ((1 << k) - 1)), smooth(y & ((1 << k) - 1))
        top = v(ix, iy) + (((v(ix + 1, iy) - v(ix, iy)) * sx) >> 15)
        bot = v(ix, iy + 1) + (((v(ix + 1, iy + 1) - v(ix, iy + 1)) * sx) >> 15)
        total += top + (((bot - top) * sy) >> 15)
    recip = (1 << 30) // sum(1 << (16 - o) for o in range(octaves))
    return (total * recip) >> 20


def reference_tile(seed: int, p: GeneratorParams, x: int, y: int) -> int:
    h = _field_level(seed, 1, p.height_scale_log2, p.height_octaves, x, y)
    m = _field_level(seed, 2, p.moisture_scale_log2, p.moisture_octaves, x, y)
    if h < p.sea_level - p.deep_water_depth:
        return t.DEEP_WATER
    if h < p.sea_level:
        return t.WATER
    if h >= p.snow_level:
        return t.SNOW
    if h >= p.mountain_level:
        return t.MOUNTAIN
    if h >= p.hill_level:
        return t.HILLS
    if h < p.sea_level + p.beach_height:
        return t.SAND
    if m >= p.swamp_moisture and h < p.sea_level + p.swamp_height:
        return t.SWAMP
    if m < p.desert_moisture:
        return t.DESERT
    if m >= p.forest_moisture:
        return t.FOREST
    return t.GRASS


def test_matches_scalar_reference(gen: TerrainGenerator) -> None:
    rng = np.random.default_rng(5)
    for cx, cy in ((0, 0), (-1, -1), (37, -12), (1 << 24, 1 - (1 << 24))):
        tiles = gen.chunk_tiles(cx, cy)
        for lx, ly in rng.integers(0, 64, size=(12, 2)).tolist():
            x, y = cx * 64 + lx, cy * 64 + ly
            assert tiles[ly, lx] == reference_tile(gen.seed, gen.params, x, y), (x, y)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    x=st.integers(min_value=-(1 << 34), max_value=1 << 34),
    y=st.integers(min_value=-(1 << 34), max_value=1 << 34),
)
def test_random_tiles_match_reference(seed: int, x: int, y: int) -> None:
    g = TerrainGenerator(seed)
    assert g.tile_at(x, y) == reference_tile(seed, g.params, x, y)


# -- determinism, seamlessness ----------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=M64),
    cx=st.integers(min_value=-(1 << 24), max_value=1 << 24),
    cy=st.integers(min_value=-(1 << 24), max_value=1 << 24),
)
def test_stable_and_in_table(seed: int, cx: int, cy: int) -> None:
    a = TerrainGenerator(seed).chunk_tiles(cx, cy)
    g = TerrainGenerator(seed)
    b = g.chunk_tiles(cx, cy)
    c = g.chunk_tiles(cx, cy)
    assert np.array_equal(a, b) and np.array_equal(b, c)
    assert set(np.unique(a).tolist()) <= set(TILE_TABLE)


def test_fresh_instances_agree() -> None:
    a, b = TerrainGenerator(99), TerrainGenerator(99)
    for cx, cy in COORDS:
        assert np.array_equal(a.chunk_tiles(cx, cy), b.chunk_tiles(cx, cy))
        assert a.fingerprint(cx, cy) == b.fingerprint(cx, cy)
    assert region_digest(a, -2, 1, 8) == region_digest(b, -2, 1, 8)


def test_batched_equals_single(gen: TerrainGenerator) -> None:
    coords = [(cx, cy) for cy in range(-2, 2) for cx in range(-3, 2)] + [(1 << 24, 5)]
    for (cx, cy), tiles in zip(coords, gen.chunks_tiles(coords), strict=True):
        assert np.array_equal(tiles, gen.chunk_tiles(cx, cy)), (cx, cy)
    assert gen.chunks_tiles([]) == []
    batch = gen.chunks_tiles(coords[:3])
    assert all(a.base is None or a.base.nbytes == a.nbytes for a in batch)  # no shared batch


def test_chunks_equal_slices_of_unaligned_window(gen: TerrainGenerator) -> None:
    # A window starting mid-chunk, spanning negative and positive chunks, computed in one pass
    # (and one big enough to be computed in blocks): every chunk is its slice.
    x0, y0 = -150, -77
    for w, h in ((300, 200), (1100, 130)):
        window = gen.tiles_window(x0, y0, w, h)
        assert window.shape == (h, w)
        for cy in range((y0 // 64) + 1, (y0 + h) // 64):
            for cx in range((x0 // 64) + 1, (x0 + w) // 64):
                ox, oy = cx * 64 - x0, cy * 64 - y0
                sub = window[oy : oy + 64, ox : ox + 64]
                assert np.array_equal(sub, gen.chunk_tiles(cx, cy)), (w, h, cx, cy)


def test_aligned_window_equals_chunks(gen: TerrainGenerator) -> None:
    window = gen.tiles_window(-128, 64, 192, 128)
    assert np.array_equal(window[64:, 64:128], gen.chunk_tiles(-1, 2))
    assert np.array_equal(window[:, 1:], gen.tiles_window(-127, 64, 191, 128))


def test_neighbours_join_smoothly(gen: TerrainGenerator) -> None:
    # The heights of adjacent tiles across a chunk seam differ no more than inside a chunk.
    def heights(cx: int, cy: int) -> np.ndarray[Any, np.dtype[np.int32]]:
        field0: np.ndarray[Any, np.dtype[np.int32]] = gen.debug_pipeline(cx, cy)["field0"][0]
        return field0

    a, b = heights(0, 0), heights(1, 0)
    inner = int(np.abs(np.diff(a.astype(np.int64), axis=1)).max())
    seam = int(np.abs(b[:, 0].astype(np.int64) - a[:, 63]).max())
    assert seam <= max(inner, 8)


def test_tile_at(gen: TerrainGenerator) -> None:
    tiles = gen.chunk_tiles(-1, 3)
    assert gen.tile_at(-64 + 5, 3 * 64 + 60) == tiles[60, 5]


def test_threads_agree(gen: TerrainGenerator) -> None:
    coords = [(cx, cy) for cy in range(-4, 4) for cx in range(-4, 4)]
    expected = [gen.fingerprint(cx, cy) for cx, cy in coords]
    results: dict[int, list[int]] = {}

    def work(i: int) -> None:
        order = coords[i:] + coords[:i]
        got = [tiles_fingerprint(a) for a in gen.chunks_tiles(order)]
        got += [gen.fingerprint(cx, cy) for cx, cy in order]
        results[i] = got

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i, got in results.items():
        order = coords[i:] + coords[:i]
        want = [expected[coords.index(c)] for c in order]
        assert got == want + want


# -- arrays, fingerprints ----------------------------------------------------------------------


def test_dtype_shape_readonly(gen: TerrainGenerator) -> None:
    arrays = [
        gen.chunk_tiles(3, -4),
        *gen.chunks_tiles([(0, 0), (5, 5)]),
        gen.tiles_window(-10, -10, 30, 20),
        gen.tiles_window(-64, 0, 128, 64),
    ]
    for a in arrays:
        assert a.dtype == np.uint16
        assert not a.flags.writeable
        with pytest.raises(ValueError):
            a[0, 0] = 1
    assert arrays[0].shape == (64, 64)


def test_fingerprint(gen: TerrainGenerator) -> None:
    tiles = gen.chunk_tiles(2, -9)
    expected = xxhash.xxh3_64_intdigest(tiles.astype("<u2").tobytes())
    assert gen.fingerprint(2, -9) == tiles_fingerprint(tiles) == expected
    assert tiles_fingerprint(tiles.astype(">u2")) == expected  # byte order is normalised
    with pytest.raises(TypeError):
        tiles_fingerprint(tiles.astype(np.int32))


def test_seeds_and_params_differ() -> None:
    a = TerrainGenerator(1).chunk_tiles(0, 0)
    b = TerrainGenerator(2).chunk_tiles(0, 0)
    assert not np.array_equal(a, b)
    wet = msgspec.structs.replace(DEFAULT_PARAMS, sea_level=600)
    assert TerrainGenerator(1, wet).fingerprint(0, 0) != TerrainGenerator(1).fingerprint(0, 0)
    # Seeds are taken modulo 2**64 and out-of-range seeds are refused rather than aliased.
    assert TerrainGenerator(-1).fingerprint(0, 0) == TerrainGenerator(M64).fingerprint(0, 0)


def test_only_table_ids() -> None:
    g = TerrainGenerator(3)
    coords = [(cx * 5, cy * 5) for cx in range(-10, 10) for cy in range(-10, 10)]
    seen: set[int] = set()
    for tiles in g.chunks_tiles(coords):
        seen |= set(np.unique(tiles).tolist())
    assert seen <= set(TILE_TABLE)
    assert t.VOID not in seen
    # Large areas contain most of the table with the default params.
    assert {t.WATER, t.GRASS, t.FOREST, t.HILLS, t.SAND} <= seen


def test_lut_matches_rules(gen: TerrainGenerator) -> None:
    trace = gen.debug_pipeline(-7, 11)
    h, m = trace["field0"][0], trace["field1"][0]
    assert h.min() >= 0 and h.max() < 1024 and m.min() >= 0 and m.max() < 1024
    assert np.array_equal(classify(h, m, gen.params), trace["tiles"][0])


def test_pipeline_is_integer_only(gen: TerrainGenerator) -> None:
    for cx, cy in ((0, 0), (-5, 3), (1 << 24, -(1 << 24))):
        trace = gen.debug_pipeline(cx, cy)
        assert {"lattice_hash", "x_weight", "octaves", "field0", "field1", "tiles"} <= set(trace)
        for name, arr in trace.items():
            assert arr.dtype.kind in "iu", f"{name} is {arr.dtype}"
        assert np.array_equal(trace["tiles"][0], gen.chunk_tiles(cx, cy))


def test_coordinate_limits(gen: TerrainGenerator) -> None:
    limit = terrain_mod.CHUNK_COORD_LIMIT
    gen.chunk_tiles(limit, -limit)
    with pytest.raises(ValueError, match="cx"):
        gen.chunk_tiles(limit + 1, 0)
    with pytest.raises(ValueError, match="cy"):
        gen.chunks_tiles([(0, -limit - 1)])
    with pytest.raises(ValueError):
        gen.tiles_window(0, 0, 0, 5)
    with pytest.raises(TypeError):
        gen.chunk_tiles(1.5, 0)  # type: ignore[arg-type]


# -- tiles table ----------------------------------------------------------------------------


def test_walkable() -> None:
    assert walkable(t.GRASS) and walkable(t.SAND) and walkable(t.FOREST) and walkable(t.HILLS)
    assert not walkable(t.WATER) and not walkable(t.DEEP_WATER)
    assert not walkable(t.MOUNTAIN) and not walkable(t.SNOW)
    assert not walkable(t.VOID) and not walkable(-1) and not walkable(1 << 16) and not walkable(999)
    ids = np.array(sorted(TILE_TABLE), dtype=np.uint16)
    assert t.walkable_mask(ids).tolist() == [TILE_TABLE[i][1] for i in sorted(TILE_TABLE)]


# -- params ---------------------------------------------------------------------------------


def test_params_roundtrip() -> None:
    d = params_to_dict(DEFAULT_PARAMS)
    assert set(d) == set(GeneratorParams.__struct_fields__)  # defaults are stored too
    assert params_from_dict(d) == DEFAULT_PARAMS
    assert params_from_dict({}) == DEFAULT_PARAMS
    assert params_from_dict(msgspec.json.decode(msgspec.json.encode(d))) == DEFAULT_PARAMS
    p = params_from_dict({"sea_level": 300, "npcs_per_region": 0})
    assert p.sea_level == 300 and p.npcs_per_region == 0


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"sea_levle": 3}, "sea_levle", "unknown"),
        ({"sea_level": "low"}, "sea_level", "int"),
        ({"sea_level": 2.5}, "sea_level", "int"),
        ({"sea_level": True}, "sea_level", "int"),
        ({"tree_density_pm": 1001}, "tree_density_pm", "<= 1000"),
        ({"npcs_per_region": -1}, "npcs_per_region", ">= 0"),
        ({"height_scale_log2": 16}, "height_scale_log2", "<= 15"),
        ({"hill_level": 400, "sea_level": 450}, "hill_level", "sea_level"),
        ({"snow_level": 600}, "snow_level", "mountain_level"),
        ({"swamp_moisture": 10}, "swamp_moisture", "forest_moisture"),
        ({"height_scale_log2": 3, "height_octaves": 5}, "height_octaves", "octaves"),
    ],
)
def test_params_errors_name_the_key(data: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        params_from_dict(data, source="world.json")
    assert info.value.key == key
    assert key in str(info.value) and fragment in str(info.value)
    assert str(info.value).startswith("world.json: ")


def test_params_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        params_from_dict([1, 2])  # type: ignore[arg-type]


def test_generator_validates_direct_params_and_seed() -> None:
    with pytest.raises(ConfigError) as info:
        TerrainGenerator(1, GeneratorParams(sea_level=5000))
    assert info.value.key == "sea_level"
    for bad in (1 << 64, -(1 << 63) - 1):
        with pytest.raises(ConfigError, match="seed"):
            TerrainGenerator(bad)
    with pytest.raises(ConfigError, match="seed"):
        TerrainGenerator(True)


# -- defaults -------------------------------------------------------------------------------


def test_region_defaults_placement(gen: TerrainGenerator) -> None:
    for rx, ry in ((0, 0), (-1, 2), (3, -3)):
        d = gen.region_defaults(rx, ry, 8)
        assert (d.rx, d.ry, d.region_size) == (rx, ry, 8)
        window = gen.tiles_window(rx * 512, ry * 512, 512, 512)

        def tile(x: int, y: int, rx: int = rx, ry: int = ry, w: Any = window) -> int:
            assert region_of_tile(x, y, 8) == (rx, ry)
            return int(w[y - ry * 512, x - rx * 512])

        kinds = {rule[0]: terrain for terrain, rule in FEATURE_RULES.items()}
        for f in d.features:
            assert tile(f.x, f.y) == kinds[f.kind]
            assert walkable(tile(f.x, f.y))
            lo, hi = FEATURE_RULES[kinds[f.kind]][2:]
            assert lo <= f.amount <= hi
        for n in d.npcs:
            assert walkable(tile(n.x, n.y))
            assert n.player_id is None and n.given_name and n.family_name
        assert walkable(tile(*d.spawn))
        assert len(d.npcs) == gen.params.npcs_per_region
        assert len(d.features) > 0
        ids = [f.id for f in d.features] + [n.id for n in d.npcs]
        assert len(ids) == len(set(ids))
        assert [f.id for f in d.features] == [f"f:{rx}:{ry}:{i}" for i in range(len(d.features))]
        assert [n.id for n in d.npcs] == [f"npc:{rx}:{ry}:{i}" for i in range(len(d.npcs))]
        assert len({(n.x, n.y) for n in d.npcs}) == len(d.npcs)


def test_spawn_is_nearest_walkable_to_centre(gen: TerrainGenerator) -> None:
    d = gen.region_defaults(-1, 2, 8)
    window = gen.tiles_window(-512, 1024, 512, 512)
    ys, xs = np.nonzero(t.walkable_mask(window))
    wx, wy = xs + -512, ys + 1024
    d2 = (wx - (-512 + 256)) ** 2 + (wy - (1024 + 256)) ** 2
    i = np.lexsort((wx, wy, d2))[0]
    assert d.spawn == (int(wx[i]), int(wy[i]))


def test_chunk_defaults_partition_region(gen: TerrainGenerator) -> None:
    d = gen.region_defaults(-1, 0, 4)
    feats: list[str] = []
    npcs: list[str] = []
    for cy in range(0, 4):
        for cx in range(-4, 0):
            c = gen.chunk_defaults(cx, cy, 4)
            assert (c.cx, c.cy) == (cx, cy)
            assert all((f.x // 64, f.y // 64) == (cx, cy) for f in c.features)
            assert all((n.x // 64, n.y // 64) == (cx, cy) for n in c.npcs)
            feats += [msgspec.json.encode(f).decode() for f in c.features]
            npcs += [msgspec.json.encode(n).decode() for n in c.npcs]
    assert sorted(feats) == sorted(msgspec.json.encode(f).decode() for f in d.features)
    assert sorted(npcs) == sorted(msgspec.json.encode(n).decode() for n in d.npcs)


def test_defaults_are_fresh_objects(gen: TerrainGenerator) -> None:
    a = gen.region_defaults(0, 0, 8)
    a.features[0].amount = -5
    a.npcs[0].x = 10**9
    a.features.clear()
    b = gen.region_defaults(0, 0, 8)
    assert b.features and b.features[0].amount >= 0 and b.npcs[0].x != 10**9
    c = gen.chunk_defaults(b.npcs[0].x // 64, b.npcs[0].y // 64, 8)
    c.npcs[0].hp = 0
    assert gen.chunk_defaults(c.cx, c.cy, 8).npcs[0].hp == 100


def test_feature_positions_independent_of_region_size(gen: TerrainGenerator) -> None:
    small = gen.region_defaults(1, 1, 4)  # chunks 4..7, the lower-right quarter of (0, 0, 8)
    big = gen.region_defaults(0, 0, 8)
    quarter = {(f.x, f.y, f.kind, f.amount) for f in big.features if f.x >= 256 and f.y >= 256}
    assert {(f.x, f.y, f.kind, f.amount) for f in small.features} == quarter


def test_npc_count_is_a_prefix() -> None:
    few = TerrainGenerator(4, msgspec.structs.replace(DEFAULT_PARAMS, npcs_per_region=5))
    many = TerrainGenerator(4, msgspec.structs.replace(DEFAULT_PARAMS, npcs_per_region=40))
    a = few.region_defaults(0, 0, 8).npcs
    b = many.region_defaults(0, 0, 8).npcs
    assert len(a) == 5 and len(b) == 40
    assert [(n.id, n.x, n.y, n.given_name) for n in a] == [
        (n.id, n.x, n.y, n.given_name) for n in b[:5]
    ]


def test_region_without_land_uses_world_spawn(monkeypatch: pytest.MonkeyPatch) -> None:
    ocean = msgspec.structs.replace(
        DEFAULT_PARAMS, sea_level=1024, hill_level=1024, mountain_level=1024, snow_level=1024
    )
    monkeypatch.setattr(terrain_mod, "_SPAWN_SEARCH_RINGS", 2)
    g = TerrainGenerator(1, ocean)
    d = g.region_defaults(5, 5, 2)
    assert d.features == [] and d.npcs == []
    assert d.spawn == g.world_spawn() == (0, 0)  # documented fallback: no land at all


def test_world_spawn_is_nearest_walkable(gen: TerrainGenerator) -> None:
    sx, sy = gen.world_spawn()
    assert walkable(gen.tile_at(sx, sy))
    r = max(abs(sx), abs(sy)) + 1
    window = gen.tiles_window(-r, -r, 2 * r + 1, 2 * r + 1)
    ys, xs = np.nonzero(t.walkable_mask(window))
    wx, wy = xs - r, ys - r
    d2 = wx * wx + wy * wy
    i = np.lexsort((wx, wy, d2))[0]
    assert (sx, sy) == (int(wx[i]), int(wy[i]))


def test_region_size_bounds(gen: TerrainGenerator) -> None:
    with pytest.raises(ValueError, match="region_size"):
        gen.region_defaults(0, 0, 0)
    for bad in (0, -8, 65):
        with pytest.raises(ValueError, match="region_size"):
            gen.chunk_defaults(0, 0, bad)
