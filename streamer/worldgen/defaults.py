"""Default features, NPCs and spawn point of a region, derived from its generated terrain.

Everything is chosen by per-tile integer hashes of world coordinates, so whether a tile gets a
tree does not depend on the region size or on which region computed it; only the ids
(``f:{rx}:{ry}:{n}``, ``npc:{rx}:{ry}:{n}``) are numbered per region.

- Features: tile ``(x, y)`` of a kind-bearing terrain gets a feature when the top 32 bits of its
  hash fall below ``density_pm * 2**32 // 1000``; numbered in row-major order over the region.
- NPCs: the ``npcs_per_region`` walkable tiles with the smallest NPC hash (ties by position),
  numbered by hash rank, so raising the count only appends NPCs.
- Spawn: the walkable tile nearest the region's centre tile (ties: smaller y, then x); a region
  without any walkable tile uses the world spawn.

The cache keeps compact arrays and builds fresh records per call: records are mutable, and a
caller editing one must never alter what the next caller gets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt

from streamer.coords import CHUNK_SIZE
from streamer.schema.records import Character, Feature
from streamer.worldgen import noise
from streamer.worldgen import tiles as t
from streamer.worldgen.params import GeneratorParams

#: Terrain -> (feature kind, density parameter, smallest amount, largest amount).
FEATURE_RULES: Final[dict[int, tuple[str, str, int, int]]] = {
    t.FOREST: ("tree", "tree_density_pm", 20, 99),
    t.HILLS: ("ore", "ore_density_pm", 50, 499),
    t.SWAMP: ("reeds", "plant_density_pm", 1, 9),
    t.DESERT: ("cactus", "plant_density_pm", 1, 9),
}
FEATURE_KINDS: Final[tuple[str, ...]] = ("", *(rule[0] for rule in FEATURE_RULES.values()))

#: Set explicitly: generated NPCs must not change when the record's default does.
NPC_HP: Final = 100

GIVEN_NAMES: Final = (
    "Ada", "Bram", "Cora", "Dov", "Edda", "Finn", "Greta", "Hale",
    "Ines", "Jory", "Kaia", "Lorn", "Mira", "Nils", "Orla", "Pim",
)  # fmt: skip
FAMILY_NAMES: Final = (
    "Ashford", "Brook", "Cairn", "Dale", "Elm", "Fenwick", "Glen", "Holt",
    "Ives", "Juniper", "Kestrel", "Lark", "Moss", "Northam", "Oakes", "Pike",
)  # fmt: skip

I64 = npt.NDArray[np.int64]
TileWindow = Callable[[int, int, int, int], npt.NDArray[np.uint16]]


class RegionDefaults(msgspec.Struct, frozen=True, kw_only=True):
    """What an untouched region holds. All positions are world tile coordinates."""

    rx: int
    ry: int
    region_size: int
    features: list[Feature]
    npcs: list[Character]
    spawn: tuple[int, int]


class ChunkDefaults(msgspec.Struct, frozen=True, kw_only=True):
    """The region defaults falling inside one chunk (same ids as in :class:`RegionDefaults`)."""

    cx: int
    cy: int
    features: list[Feature]
    npcs: list[Character]


def _feature_tables(p: GeneratorParams) -> tuple[npt.NDArray[np.uint64], I64, I64, I64]:
    size = max(t.TILE_TABLE) + 1
    threshold = np.zeros(size, dtype=np.uint64)
    kind = np.zeros(size, dtype=np.int64)
    lo = np.zeros(size, dtype=np.int64)
    span = np.ones(size, dtype=np.int64)
    for i, (tile, (_, param, a, b)) in enumerate(FEATURE_RULES.items(), start=1):
        threshold[tile] = getattr(p, param) * (1 << 32) // 1000
        kind[tile] = i
        lo[tile] = a
        span[tile] = b - a + 1
    return threshold, kind, lo, span


@dataclass(frozen=True, slots=True)
class RegionDefaultsArrays:
    """Compact, immutable form of :class:`RegionDefaults` (what the generator caches)."""

    rx: int
    ry: int
    region_size: int
    feat_x: I64
    feat_y: I64
    feat_kind: I64
    feat_amount: I64
    npc_x: I64
    npc_y: I64
    npc_given: I64
    npc_family: I64
    spawn: tuple[int, int]

    def _features(self, idx: npt.NDArray[np.intp]) -> list[Feature]:
        pre = f"f:{self.rx}:{self.ry}:"
        return [
            Feature(id=f"{pre}{n}", kind=FEATURE_KINDS[k], x=x, y=y, amount=a)
            for n, x, y, k, a in zip(
                idx.tolist(),
                self.feat_x[idx].tolist(),
                self.feat_y[idx].tolist(),
                self.feat_kind[idx].tolist(),
                self.feat_amount[idx].tolist(),
                strict=True,
            )
        ]

    def _npcs(self, idx: npt.NDArray[np.intp]) -> list[Character]:
        pre = f"npc:{self.rx}:{self.ry}:"
        return [
            Character(
                id=f"{pre}{n}",
                x=x,
                y=y,
                player_id=None,
                hp=NPC_HP,
                given_name=GIVEN_NAMES[g],
                family_name=FAMILY_NAMES[f],
            )
            for n, x, y, g, f in zip(
                idx.tolist(),
                self.npc_x[idx].tolist(),
                self.npc_y[idx].tolist(),
                self.npc_given[idx].tolist(),
                self.npc_family[idx].tolist(),
                strict=True,
            )
        ]

    def region_defaults(self) -> RegionDefaults:
        return RegionDefaults(
            rx=self.rx,
            ry=self.ry,
            region_size=self.region_size,
            features=self._features(np.arange(self.feat_x.size, dtype=np.intp)),
            npcs=self._npcs(np.arange(self.npc_x.size, dtype=np.intp)),
            spawn=self.spawn,
        )

    def chunk_defaults(self, cx: int, cy: int) -> ChunkDefaults:
        def inside(x: I64, y: I64) -> npt.NDArray[np.intp]:
            return np.flatnonzero(((x // CHUNK_SIZE) == cx) & ((y // CHUNK_SIZE) == cy))

        return ChunkDefaults(
            cx=cx,
            cy=cy,
            features=self._features(inside(self.feat_x, self.feat_y)),
            npcs=self._npcs(inside(self.npc_x, self.npc_y)),
        )


def compute_region_arrays(
    seed: int,
    p: GeneratorParams,
    rx: int,
    ry: int,
    region_size: int,
    tiles_window: TileWindow,
    world_spawn: Callable[[], tuple[int, int]],
) -> RegionDefaultsArrays:
    """Scan the region one chunk row at a time (bounded memory even for 64x64-chunk regions)."""
    side = region_size * CHUNK_SIZE
    x0, y0 = rx * side, ry * side
    centre_x, centre_y = x0 + side // 2, y0 + side // 2
    threshold, kind_of, lo_of, span_of = _feature_tables(p)
    feat_salt = noise.salt(seed, noise.FIELD_FEATURES)
    npc_salt = noise.salt(seed, noise.FIELD_NPCS)
    want = p.npcs_per_region
    xs = np.arange(x0, x0 + side, dtype=np.int64)

    feats: list[tuple[I64, I64, I64, I64]] = []
    npc_cands: list[tuple[npt.NDArray[np.uint64], I64, I64]] = []
    best: tuple[int, int, int] | None = None  # (d2, y, x) of the spawn candidate

    for row in range(region_size):
        sy0 = y0 + row * CHUNK_SIZE
        strip = tiles_window(x0, sy0, side, CHUNK_SIZE)  # (64, side)
        ys = np.arange(sy0, sy0 + CHUNK_SIZE, dtype=np.int64)

        # Hash only the tiles that can bear a feature (well under half of them).
        r, c = np.nonzero(threshold[strip])
        if r.size:
            fz = noise.hash2(xs[c], ys[r], feat_salt)
            tl = strip[r, c]
            pick = np.flatnonzero((fz >> np.uint64(32)) < threshold[tl])
            r, c, tl, fz = r[pick], c[pick], tl[pick], fz[pick]
            amount = lo_of[tl] + ((fz & np.uint64(0xFFFF)).astype(np.int64) % span_of[tl])
            feats.append((xs[c], ys[r], kind_of[tl], amount))

        walk = t.walkable_mask(strip)
        r, c = np.nonzero(walk)
        if r.size == 0:
            continue
        wx, wy = xs[c], ys[r]
        if want:
            nz = noise.hash2(wx, wy, npc_salt)
            if nz.size > want:
                # Keep every tile tied with the cutoff: the final pick breaks ties by position.
                cutoff = np.partition(nz, want - 1)[want - 1]
                keep = np.flatnonzero(nz <= cutoff)
                nz, wx_n, wy_n = nz[keep], wx[keep], wy[keep]
            else:
                wx_n, wy_n = wx, wy
            npc_cands.append((nz, wx_n, wy_n))
        d2 = (wx - centre_x) ** 2 + (wy - centre_y) ** 2
        i = int(np.argmin(d2))  # first minimum in row-major order: smallest y, then x
        cand = (int(d2[i]), int(wy[i]), int(wx[i]))
        if best is None or cand < best:
            best = cand

    empty = np.zeros(0, dtype=np.int64)
    if feats:
        fx, fy, fk, fa = (np.concatenate(parts) for parts in zip(*feats, strict=True))
    else:
        fx = fy = fk = fa = empty

    if npc_cands:
        nz = np.concatenate([c[0] for c in npc_cands])
        nx = np.concatenate([c[1] for c in npc_cands])
        ny = np.concatenate([c[2] for c in npc_cands])
        order = np.lexsort((nx, ny, nz))[:want]
        nz, nx, ny = nz[order], nx[order], ny[order]
        given = (nz & np.uint64(0xFFFF)).astype(np.int64) % len(GIVEN_NAMES)
        family = ((nz >> np.uint64(16)) & np.uint64(0xFFFF)).astype(np.int64) % len(FAMILY_NAMES)
    else:
        nx = ny = given = family = empty

    spawn = (best[2], best[1]) if best is not None else world_spawn()
    arrays = (fx, fy, fk, fa, nx, ny, given, family)
    for a in arrays:
        a.flags.writeable = False
    return RegionDefaultsArrays(rx, ry, region_size, *arrays, spawn)
