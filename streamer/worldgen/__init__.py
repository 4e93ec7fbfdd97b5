"""Deterministic, integer-only terrain plus default features and NPCs from a seed.

See ``docs/worldgen.md`` for the algorithm, the tile table and the versioning rule.
"""

from __future__ import annotations

from streamer.worldgen.defaults import FEATURE_RULES, ChunkDefaults, RegionDefaults
from streamer.worldgen.params import (
    DEFAULT_PARAMS,
    GeneratorParams,
    params_from_dict,
    params_to_dict,
)
from streamer.worldgen.terrain import (
    GENERATOR_NAME,
    GENERATOR_VERSION,
    TerrainGenerator,
    tiles_fingerprint,
)
from streamer.worldgen.tiles import TILE_NAMES, TILE_TABLE, walkable, walkable_mask

__all__ = [
    "DEFAULT_PARAMS",
    "FEATURE_RULES",
    "GENERATOR_NAME",
    "GENERATOR_VERSION",
    "TILE_NAMES",
    "TILE_TABLE",
    "ChunkDefaults",
    "GeneratorParams",
    "RegionDefaults",
    "TerrainGenerator",
    "params_from_dict",
    "params_to_dict",
    "tiles_fingerprint",
    "walkable",
    "walkable_mask",
]
