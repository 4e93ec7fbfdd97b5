"""The tile id table: what every ``uint16`` the generator emits means.

Ids are persisted (player tile edits store ids, chunk fingerprints hash them), so an id is never
renumbered or reused. Id 0 is reserved as "void" and never generated, so a zero-filled buffer that
leaks out by mistake is caught by any "tile is in the table" check instead of reading as terrain.
Ids above the table are free for game-placed tiles (roads, walls); the generator never emits them.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

VOID: Final = 0
DEEP_WATER: Final = 1
WATER: Final = 2
SAND: Final = 3
GRASS: Final = 4
FOREST: Final = 5
HILLS: Final = 6
MOUNTAIN: Final = 7
SNOW: Final = 8
DESERT: Final = 9
SWAMP: Final = 10

#: Every id the generator can emit, with its name and whether characters may stand on it.
TILE_TABLE: Final[dict[int, tuple[str, bool]]] = {
    DEEP_WATER: ("deep_water", False),
    WATER: ("water", False),
    SAND: ("sand", True),
    GRASS: ("grass", True),
    FOREST: ("forest", True),
    HILLS: ("hills", True),
    MOUNTAIN: ("mountain", False),
    SNOW: ("snow", False),
    DESERT: ("desert", True),
    SWAMP: ("swamp", True),
}

TILE_NAMES: Final[dict[int, str]] = {tid: name for tid, (name, _) in TILE_TABLE.items()}
GENERATED_TILE_IDS: Final[frozenset[int]] = frozenset(TILE_TABLE)

# Indexed by tile id so a whole chunk is classified with one gather.
_WALKABLE_LUT: Final[npt.NDArray[np.bool_]] = np.zeros(1 << 16, dtype=np.bool_)
for _tid, (_, _ok) in TILE_TABLE.items():
    _WALKABLE_LUT[_tid] = _ok
_WALKABLE_LUT.flags.writeable = False


def walkable(tile_id: int) -> bool:
    """True when a character may stand on ``tile_id``. Ids outside the table are not walkable."""
    return 0 <= tile_id < (1 << 16) and bool(_WALKABLE_LUT[tile_id])


def walkable_mask(tiles: npt.NDArray[np.uint16]) -> npt.NDArray[np.bool_]:
    """Vectorised :func:`walkable` over an array of tile ids."""
    return _WALKABLE_LUT[tiles]
