"""The terrain generator: seed + params -> tiles for any chunk, bit-exact everywhere.

A chunk's tiles are a pure function of ``(seed, params, GENERATOR_VERSION)`` and the world
coordinates of its tiles, never of which chunk, window or batch computed them, so chunks tile
seamlessly and any window of the world can be regenerated on its own.

Versioning rule: anything that changes a single generated tile, feature or NPC for an existing
``(seed, params)`` requires bumping ``GENERATOR_VERSION``. The golden fingerprints in
``tests/test_worldgen.py`` fail first and say so.
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final, SupportsIndex

import numpy as np
import numpy.typing as npt
import xxhash

from streamer.coords import CHUNK_SIZE, region_of_chunk
from streamer.errors import ConfigError
from streamer.worldgen import noise
from streamer.worldgen.biomes import tile_lut
from streamer.worldgen.defaults import (
    ChunkDefaults,
    RegionDefaults,
    RegionDefaultsArrays,
    compute_region_arrays,
)
from streamer.worldgen.params import DEFAULT_PARAMS, GeneratorParams, validate_params
from streamer.worldgen.tiles import walkable_mask

GENERATOR_NAME: Final = "streamer-terrain"
#: Bump on any change to generated tiles, features or NPCs (see the module docstring).
GENERATOR_VERSION: Final = 1

#: Chunk coordinates are accepted up to this magnitude (tile coords stay far from int64 limits).
CHUNK_COORD_LIMIT: Final = 1 << 40
#: Largest region side, in chunks, that ``region_defaults`` accepts (config allows up to 64).
MAX_REGION_SIZE: Final = 64
#: Chunks per numpy call in ``chunks_tiles``: ~63 us/chunk at 8 against ~100 us one by one
#: (call overhead amortised); larger batches gain little and grow the per-thread scratch.
_BATCH: Final = 8
#: Largest window computed in one numpy pass by ``tiles_window``; bigger ones go in blocks.
_WINDOW_BLOCK_TILES: Final = 1 << 14
#: ``world_spawn`` searches square rings of chunks around the origin up to this radius.
_SPAWN_SEARCH_RINGS: Final = 64

Tiles = npt.NDArray[np.uint16]


def tiles_fingerprint(tiles: npt.NDArray[np.uint16]) -> int:
    """xxh3_64 of the tiles as little-endian ``uint16`` bytes, row-major (``[ly, lx]``)."""
    if tiles.dtype.kind != "u" or tiles.dtype.itemsize != 2:
        raise TypeError(f"tiles must be uint16, got {tiles.dtype}")
    data = np.ascontiguousarray(tiles, dtype="<u2")
    return xxhash.xxh3_64_intdigest(data.tobytes())


def _coord(value: SupportsIndex, name: str, limit: int = CHUNK_COORD_LIMIT) -> int:
    v = operator.index(value)
    if not -limit <= v <= limit:
        raise ValueError(f"{name}={v} is outside the supported range +-{limit}")
    return v


def _region_size(value: SupportsIndex) -> int:
    rs = operator.index(value)
    if not 1 <= rs <= MAX_REGION_SIZE:
        raise ValueError(f"region_size={rs} must be in 1..{MAX_REGION_SIZE}")
    return rs


class TerrainGenerator:
    """Deterministic terrain, default features and NPCs for one world.

    Immutable after construction and safe to share between threads (the region-defaults cache
    is locked; a race only computes the same value twice).

    :raises ConfigError: the seed is outside [-2**63, 2**64) or ``params`` is invalid.
    """

    def __init__(self, seed: int, params: GeneratorParams = DEFAULT_PARAMS) -> None:
        if isinstance(seed, bool) or not hasattr(seed, "__index__"):
            raise ConfigError(f"seed must be an int, got {type(seed).__name__}", key="seed")
        seed = operator.index(seed)
        if not -(1 << 63) <= seed < (1 << 64):
            # Salts use the seed modulo 2**64; a wider range would silently alias worlds.
            raise ConfigError(f"seed must be in [-2**63, 2**64), got {seed}", key="seed")
        self._seed = seed
        self._params = validate_params(params)
        self._stack = noise.OctaveStack.build(
            seed,
            [
                (noise.FIELD_HEIGHT, params.height_scale_log2, params.height_octaves),
                (noise.FIELD_MOISTURE, params.moisture_scale_log2, params.moisture_octaves),
            ],
        )
        self._lut = tile_lut(self._params)
        self._lock = threading.Lock()
        self._regions: OrderedDict[tuple[int, int, int], RegionDefaultsArrays] = OrderedDict()
        self._region_cache_size = 16
        self._world_spawn: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"TerrainGenerator(seed={self._seed}, version={GENERATOR_VERSION})"

    @property
    def name(self) -> str:
        return GENERATOR_NAME

    @property
    def version(self) -> int:
        return GENERATOR_VERSION

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def params(self) -> GeneratorParams:
        return self._params

    # -- terrain -------------------------------------------------------------------------

    def _windows(
        self,
        x0: npt.NDArray[np.int64],
        y0: npt.NDArray[np.int64],
        w: int,
        h: int,
        trace: dict[str, npt.NDArray[np.generic]] | None = None,
    ) -> Tiles:
        height, moisture = noise.fields(self._stack, x0, y0, w, h, trace)
        height <<= noise.LEVEL_BITS
        height |= moisture
        index = height
        out = np.take(self._lut, index)
        if trace is not None:
            trace["lut_index"] = index
            trace["tiles"] = out
        out.flags.writeable = False
        return out

    def chunk_tiles(self, cx: int, cy: int) -> Tiles:
        """Read-only ``uint16`` (64, 64) array indexed ``[ly, lx]``: tile ``(cx*64+lx, cy*64+ly)``.

        :raises ValueError: ``|cx|`` or ``|cy|`` above ``CHUNK_COORD_LIMIT``.
        """
        x0 = np.array([_coord(cx, "cx") * CHUNK_SIZE], dtype=np.int64)
        y0 = np.array([_coord(cy, "cy") * CHUNK_SIZE], dtype=np.int64)
        tiles: Tiles = self._windows(x0, y0, CHUNK_SIZE, CHUNK_SIZE)[0]
        return tiles

    def chunks_tiles(self, coords: Sequence[tuple[int, int]]) -> list[Tiles]:
        """``[chunk_tiles(cx, cy) for cx, cy in coords]``, computed a few chunks per numpy call."""
        out: list[Tiles] = []
        for start in range(0, len(coords), _BATCH):
            part = coords[start : start + _BATCH]
            x0 = np.array([_coord(c[0], "cx") * CHUNK_SIZE for c in part], dtype=np.int64)
            y0 = np.array([_coord(c[1], "cy") * CHUNK_SIZE for c in part], dtype=np.int64)
            batch = self._windows(x0, y0, CHUNK_SIZE, CHUNK_SIZE)
            # Separate arrays, not views of the batch: a cache sizing chunks by ``nbytes`` must
            # not keep a whole batch alive through one cached chunk.
            for tiles in batch:
                own = tiles.copy()
                own.flags.writeable = False
                out.append(own)
        return out

    def tiles_window(self, x0: int, y0: int, w: int, h: int) -> Tiles:
        """Read-only ``uint16`` (h, w) array of tiles ``(x0 + i, y0 + j)`` at ``[j, i]``.

        Any alignment, at most ``2**24`` tiles; equal to the matching slice of the chunks (used
        by region defaults, maps and the seamlessness tests).
        """
        limit = CHUNK_COORD_LIMIT * CHUNK_SIZE
        if w < 1 or h < 1 or w * h > (1 << 24):
            raise ValueError(f"window {w}x{h} must be non-empty and at most 2**24 tiles")
        _coord(x0, "x0", limit)
        _coord(y0, "y0", limit)
        _coord(x0 + w, "x0 + w", limit)
        _coord(y0 + h, "y0 + h", limit)
        if x0 % CHUNK_SIZE == y0 % CHUNK_SIZE == w % CHUNK_SIZE == h % CHUNK_SIZE == 0:
            # Chunk-aligned (region scans, maps): the batched chunk path is the fastest, and
            # identical by construction since every tile depends only on its world coordinates.
            cx0, cy0 = x0 // CHUNK_SIZE, y0 // CHUNK_SIZE
            ncx, ncy = w // CHUNK_SIZE, h // CHUNK_SIZE
            coords = [(cx0 + i, cy0 + j) for j in range(ncy) for i in range(ncx)]
            chunks = np.stack(self.chunks_tiles(coords)).reshape(ncy, ncx, CHUNK_SIZE, CHUNK_SIZE)
            grid = np.ascontiguousarray(chunks.transpose(0, 2, 1, 3)).reshape(h, w)
            grid.flags.writeable = False
            return grid
        if w * h <= _WINDOW_BLOCK_TILES:
            xa = np.array([x0], dtype=np.int64)
            ya = np.array([y0], dtype=np.int64)
            single: Tiles = self._windows(xa, ya, w, h)[0]
            return single
        # Blocks keep the stacked octave arrays (~40 bytes per tile) cache-sized and bounded.
        bw = min(w, 1024)
        bh = max(1, _WINDOW_BLOCK_TILES // bw)
        out = np.empty((h, w), dtype=np.uint16)
        for j in range(0, h, bh):
            for i in range(0, w, bw):
                hh, ww = min(bh, h - j), min(bw, w - i)
                xa = np.array([x0 + i], dtype=np.int64)
                ya = np.array([y0 + j], dtype=np.int64)
                out[j : j + hh, i : i + ww] = self._windows(xa, ya, ww, hh)[0]
        out.flags.writeable = False
        return out

    def tile_at(self, x: int, y: int) -> int:
        """The generated tile id at world tile ``(x, y)``."""
        return int(self.tiles_window(x, y, 1, 1)[0, 0])

    def fingerprint(self, cx: int, cy: int) -> int:
        """``tiles_fingerprint(chunk_tiles(cx, cy))``: stored as a chunk record's base hash."""
        return tiles_fingerprint(self.chunk_tiles(cx, cy))

    def debug_pipeline(self, cx: int, cy: int) -> dict[str, npt.NDArray[np.generic]]:
        """Every intermediate array of one chunk's generation, by stage name (for tests)."""
        trace: dict[str, npt.NDArray[np.generic]] = {}
        x0 = np.array([_coord(cx, "cx") * CHUNK_SIZE], dtype=np.int64)
        y0 = np.array([_coord(cy, "cy") * CHUNK_SIZE], dtype=np.int64)
        self._windows(x0, y0, CHUNK_SIZE, CHUNK_SIZE, trace)
        return trace

    # -- defaults ------------------------------------------------------------------------

    def _region_arrays(self, rx: int, ry: int, region_size: int) -> RegionDefaultsArrays:
        rs = _region_size(region_size)
        key = (
            _coord(rx, "rx", CHUNK_COORD_LIMIT // rs),
            _coord(ry, "ry", CHUNK_COORD_LIMIT // rs),
            rs,
        )
        with self._lock:
            hit = self._regions.get(key)
            if hit is not None:
                self._regions.move_to_end(key)
                return hit
        # Computed outside the lock: it takes milliseconds and is deterministic, so a racing
        # duplicate is harmless.
        arrays = compute_region_arrays(
            self._seed, self._params, key[0], key[1], rs, self.tiles_window, self.world_spawn
        )
        with self._lock:
            self._regions[key] = arrays
            self._regions.move_to_end(key)
            while len(self._regions) > self._region_cache_size:
                self._regions.popitem(last=False)
        return arrays

    def region_defaults(self, rx: int, ry: int, region_size: int) -> RegionDefaults:
        """Default features, NPCs and spawn point of region ``(rx, ry)``, in world tile coords.

        Fresh record objects on every call (callers may mutate them); deterministic from
        ``(seed, params, rx, ry, region_size)``.
        """
        return self._region_arrays(rx, ry, region_size).region_defaults()

    def chunk_defaults(self, cx: int, cy: int, region_size: int) -> ChunkDefaults:
        """The region defaults that fall in chunk ``(cx, cy)``, with the same ids."""
        cx, cy = _coord(cx, "cx"), _coord(cy, "cy")
        rx, ry = region_of_chunk(cx, cy, _region_size(region_size))
        return self._region_arrays(rx, ry, region_size).chunk_defaults(cx, cy)

    def world_spawn(self) -> tuple[int, int]:
        """The walkable tile nearest the origin (ties: smaller y, then smaller x).

        Falls back to ``(0, 0)`` only when no land exists within 64 chunks of the origin, which
        takes parameters that leave (almost) no land at all.
        """
        if self._world_spawn is None:
            self._world_spawn = self._find_world_spawn()
        return self._world_spawn

    def _find_world_spawn(self) -> tuple[int, int]:
        best: tuple[int, int, int] | None = None  # (d2, y, x)
        for r in range(_SPAWN_SEARCH_RINGS):
            # Ring r: chunks in [-r-1, r]^2 not already in [-r, r-1]^2.
            ring = [
                (cx, cy)
                for cy in range(-r - 1, r + 1)
                for cx in range(-r - 1, r + 1)
                if max(cx, -cx - 1, cy, -cy - 1) == r
            ]
            for (cx, cy), chunk in zip(ring, self.chunks_tiles(ring), strict=True):
                ys, xs = np.nonzero(walkable_mask(chunk))
                if ys.size == 0:
                    continue
                wx = xs.astype(np.int64) + cx * CHUNK_SIZE
                wy = ys.astype(np.int64) + cy * CHUNK_SIZE
                d2 = wx * wx + wy * wy
                i = int(np.lexsort((wx, wy, d2))[0])
                cand = (int(d2[i]), int(wy[i]), int(wx[i]))
                if best is None or cand < best:
                    best = cand
            # Every tile outside the searched square is at least (r+1)*64 away on some axis.
            if best is not None and best[0] < ((r + 1) * CHUNK_SIZE) ** 2:
                return best[2], best[1]
        return (best[2], best[1]) if best is not None else (0, 0)
