"""Height + moisture (both 0..1023) to tile id, as rules and as a lookup table.

The rules are plain integer comparisons; the generator applies them through a 1024x1024 table
built once per parameter set, because one gather per tile is cheaper than nine masked selects.
"""

from __future__ import annotations

import functools
from typing import Final

import numpy as np
import numpy.typing as npt

from streamer.worldgen import tiles as t
from streamer.worldgen.noise import LEVEL_BITS
from streamer.worldgen.params import GeneratorParams

LEVELS: Final = 1 << LEVEL_BITS


def classify(
    height: npt.NDArray[np.integer], moisture: npt.NDArray[np.integer], p: GeneratorParams
) -> npt.NDArray[np.uint16]:
    """Tile ids for broadcastable integer arrays of heights and moistures (0..1023).

    First matching rule wins: deep water, water, snow, mountain, hills, beach sand, swamp,
    desert, forest, else grass.
    """
    h = np.asarray(height, dtype=np.int64)
    m = np.asarray(moisture, dtype=np.int64)
    h, m = np.broadcast_arrays(h, m)
    rules = [
        (h < p.sea_level - p.deep_water_depth, t.DEEP_WATER),
        (h < p.sea_level, t.WATER),
        (h >= p.snow_level, t.SNOW),
        (h >= p.mountain_level, t.MOUNTAIN),
        (h >= p.hill_level, t.HILLS),
        (h < p.sea_level + p.beach_height, t.SAND),
        ((m >= p.swamp_moisture) & (h < p.sea_level + p.swamp_height), t.SWAMP),
        (m < p.desert_moisture, t.DESERT),
        (m >= p.forest_moisture, t.FOREST),
    ]
    out = np.full(h.shape, t.GRASS, dtype=np.uint16)
    # Apply in reverse so the first rule in the list wins.
    for cond, tile in reversed(rules):
        out[cond] = tile
    return out


@functools.lru_cache(maxsize=16)
def tile_lut(p: GeneratorParams) -> npt.NDArray[np.uint16]:
    """Read-only flat table: ``lut[(height << 10) | moisture]`` is the tile id."""
    levels = np.arange(LEVELS, dtype=np.int64)
    lut = classify(levels[:, None], levels[None, :], p).reshape(-1)
    lut.flags.writeable = False
    return lut
