#!/usr/bin/env python3
"""Write the golden old-version worlds in ``tests/fixtures/``.

    .venv/bin/python scripts/make_fixtures.py            # refuses to overwrite
    .venv/bin/python scripts/make_fixtures.py --force    # regenerate on purpose
    .venv/bin/python scripts/make_fixtures.py --out DIR  # somewhere else (tests do this)

- ``world-v1/`` (msgpack): character v1 (``name``, inventory map) and society v1 (``allies``)
  records, chunks without ``record_versions`` (as the first writer stored them), tile edits,
  structures and features, in three regions including negative coordinates.
- ``world-v2/`` (JSON): character v2 (``given_name``/``family_name``, inventory still a map)
  and society v2 records, chunks with ``record_versions``.

The record shapes are written here as plain dicts, on purpose: the current record classes
only know the current shapes, and these files must keep describing what old code actually
wrote. Only the region container and the manifest come from the current code, because the
file format has one version so far. Everything is deterministic (fixed world id, times and
tile edits), so a rerun writes identical bytes while the format is unchanged.

The committed files are the contract, not this script: once a schema or format version moves
on, do not regenerate them; add a new fixture beside them. ``tests/test_fixture_worlds.py``
loads them forever.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streamer.format.manifest import encode_manifest, new_manifest  # noqa: E402
from streamer.format.region import encode_region, region_key  # noqa: E402
from streamer.worldgen import (  # noqa: E402
    DEFAULT_PARAMS,
    GENERATOR_NAME,
    GENERATOR_VERSION,
    TerrainGenerator,
    params_to_dict,
)

Encoding = Literal["msgpack", "json"]
Raw = dict[str, Any]

REGION_SIZE = 4
WRITTEN_AT = 1_700_000_000.0


def tiles(seed: int, n: int) -> tuple[bytes, bytes]:
    """``n`` deterministic tile overrides as packed little-endian uint16 (idx sorted, unique)."""
    rng = np.random.default_rng(seed & 0xFFFF_FFFF)
    idx = np.unique(rng.integers(0, 4096, size=n)).astype("<u2")
    val = rng.integers(1, 30, size=idx.size).astype("<u2")
    return idx.tobytes(), val.tobytes()


def chunk(
    gen: TerrainGenerator,
    cx: int,
    cy: int,
    *,
    edits: int,
    record_versions: Mapping[str, int] | None,
    **lists: list[Raw],
) -> Raw:
    idx, val = tiles(cx * 7919 + cy * 104729 + 17, edits)
    out: Raw = {
        "type": "chunk",
        "schemaVersion": 1,
        "cx": cx,
        "cy": cy,
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "base_fingerprint": gen.fingerprint(cx, cy),
        "tile_idx": idx,
        "tile_val": val,
        "characters": lists.get("characters", []),
        "structures": lists.get("structures", []),
        "features": lists.get("features", []),
        "societies": lists.get("societies", []),
    }
    if record_versions is not None:
        out["record_versions"] = dict(record_versions)
    return out


# -- record shapes as old code wrote them ------------------------------------------------


def character_v1(
    rid: str, x: int, y: int, name: str | None, inventory: dict[str, int], **extra: Any
) -> Raw:
    rec: Raw = {"type": "character", "schemaVersion": 1, "id": rid, "x": x, "y": y}
    if name is not None:
        rec["name"] = name
    rec["inventory"] = inventory
    rec.update(extra)
    return rec


def character_v2(
    rid: str, x: int, y: int, given: str, family: str, inventory: dict[str, int], **extra: Any
) -> Raw:
    rec: Raw = {
        "type": "character",
        "schemaVersion": 2,
        "id": rid,
        "x": x,
        "y": y,
        "given_name": given,
        "family_name": family,
        "inventory": inventory,
    }
    rec.update(extra)
    return rec


def society_v1(rid: str, name: str, x: int, y: int, members: list[str], allies: list[str]) -> Raw:
    return {
        "type": "society",
        "schemaVersion": 1,
        "id": rid,
        "name": name,
        "x": x,
        "y": y,
        "members": members,
        "allies": allies,
    }


def society_v2(
    rid: str, name: str, x: int, y: int, members: list[str], relations: dict[str, int]
) -> Raw:
    return {
        "type": "society",
        "schemaVersion": 2,
        "id": rid,
        "name": name,
        "x": x,
        "y": y,
        "members": members,
        "relations": relations,
    }


def structure_v1(rid: str, kind: str, x: int, y: int, owner: str | None) -> Raw:
    return {
        "type": "structure",
        "schemaVersion": 1,
        "id": rid,
        "kind": kind,
        "x": x,
        "y": y,
        "w": 2,
        "h": 2,
        "owner": owner,
        "hp": 80,
    }


def feature_v1(rid: str, kind: str, x: int, y: int, amount: int) -> Raw:
    return {
        "type": "feature",
        "schemaVersion": 1,
        "id": rid,
        "kind": kind,
        "x": x,
        "y": y,
        "amount": amount,
    }


# -- worlds --------------------------------------------------------------------------------


def world_v1(gen: TerrainGenerator) -> dict[tuple[int, int], tuple[int, list[Raw]]]:
    """region → (lastProcessedTick, chunks) at character v1 / society v1."""
    return {
        (0, 0): (
            120,
            [
                chunk(
                    gen,
                    0,
                    0,
                    edits=40,
                    record_versions=None,
                    characters=[
                        character_v1(
                            "player-ada",
                            10,
                            12,
                            "Ada King Lovelace",
                            {"wood": 3, "axe": 1, "rope": 0},
                            player_id="p-ada",
                            hp=87,
                            society_id="soc-north",
                        ),
                        character_v1("npc-bob", 40, 20, "Bob", {}),
                    ],
                    societies=[
                        society_v1(
                            "soc-north",
                            "North Watch",
                            30,
                            30,
                            ["player-ada", "npc-bob"],
                            ["soc-river"],
                        ),
                    ],
                    features=[feature_v1("tree-0-0-a", "tree", 5, 7, 3)],
                ),
                # Only current record types, but stored before record_versions existed.
                chunk(
                    gen,
                    1,
                    0,
                    edits=12,
                    record_versions=None,
                    structures=[structure_v1("wall-1", "wall", 70, 3, "player-ada")],
                    features=[feature_v1("ore-1-0", "ore", 100, 50, 12)],
                ),
                chunk(
                    gen,
                    2,
                    3,
                    edits=5,
                    record_versions=None,
                    characters=[
                        character_v1("npc-cat", 150, 200, "Cat  Double Space", {"fish": 2}),
                    ],
                ),
            ],
        ),
        (-1, 0): (
            340,
            [
                chunk(
                    gen,
                    -1,
                    0,
                    edits=25,
                    record_versions=None,
                    characters=[
                        # v1 defaulted a missing name to empty: two empty names in v2.
                        character_v1("npc-anon", -20, 9, None, {"stone": 5, "bread": 0}),
                    ],
                    societies=[
                        society_v1(
                            "soc-river",
                            "River Folk",
                            -30,
                            40,
                            ["npc-anon"],
                            ["soc-north", "soc-north"],
                        ),
                    ],
                ),
                chunk(gen, -4, 3, edits=60, record_versions=None),
            ],
        ),
        (0, -1): (
            7,
            [
                chunk(
                    gen,
                    2,
                    -3,
                    edits=9,
                    record_versions=None,
                    characters=[
                        character_v1(
                            "player-zed",
                            140,
                            -150,
                            "Zed",
                            {"map": 1},
                            player_id="p-zed",
                            society_id="soc-river",
                        ),
                    ],
                    structures=[structure_v1("hut-2", "hut", 141, -151, "player-zed")],
                ),
            ],
        ),
    }


def world_v2(gen: TerrainGenerator) -> dict[tuple[int, int], tuple[int, list[Raw]]]:
    """region → (lastProcessedTick, chunks) at character v2 / society v2."""
    return {
        (0, 0): (
            55,
            [
                chunk(
                    gen,
                    1,
                    1,
                    edits=30,
                    record_versions={"character": 2, "society": 2},
                    characters=[
                        character_v2(
                            "player-eve",
                            80,
                            90,
                            "Eve",
                            "Stone",
                            {"wood": 10, "pick": 1, "torch": 0},
                            player_id="p-eve",
                            society_id="soc-hill",
                        ),
                        character_v2("npc-gus", 100, 70, "Gus", "", {}),
                    ],
                    societies=[
                        society_v2(
                            "soc-hill", "Hill Clan", 96, 96, ["player-eve"], {"soc-sea": -20}
                        ),
                    ],
                ),
            ],
        ),
        (1, 1): (
            210,
            [
                chunk(
                    gen,
                    5,
                    6,
                    edits=15,
                    record_versions={"character": 2},
                    characters=[
                        character_v2("npc-ivy", 330, 400, "Ivy", "Marsh", {"herb": 4}),
                    ],
                    features=[feature_v1("spring-5-6", "spring", 340, 410, 100)],
                ),
                chunk(gen, 4, 4, edits=3, record_versions={}),
            ],
        ),
    }


WORLDS: dict[
    str,
    tuple[
        int,
        Encoding,
        dict[str, int],
        Callable[[TerrainGenerator], dict[tuple[int, int], tuple[int, list[Raw]]]],
    ],
] = {
    "world-v1": (
        1001,
        "msgpack",
        {"chunk": 1, "character": 1, "structure": 1, "feature": 1, "society": 1},
        world_v1,
    ),
    "world-v2": (
        1002,
        "json",
        {"chunk": 1, "character": 2, "structure": 1, "feature": 1, "society": 2},
        world_v2,
    ),
}


def encode_payload(raw: Raw, encoding: Encoding) -> bytes:
    if encoding == "msgpack":
        return msgspec.msgpack.encode(raw)
    return msgspec.json.encode(raw)


def write_world(out: Path, name: str) -> list[Path]:
    seed, encoding, versions, build = WORLDS[name]
    gen = TerrainGenerator(seed, DEFAULT_PARAMS)
    manifest = msgspec.structs.replace(
        new_manifest(
            seed=seed,
            generator=GENERATOR_NAME,
            generator_version=GENERATOR_VERSION,
            generator_params=params_to_dict(DEFAULT_PARAMS),
            region_size=REGION_SIZE,
            encoding=encoding,
            record_versions=versions,
        ),
        world_id=f"fixture-{name}",
        created_at=WRITTEN_AT,
    )
    root = out / name
    (root / "regions").mkdir(parents=True)
    written = [root / "world.json"]
    written[0].write_bytes(encode_manifest(manifest))
    for (rx, ry), (tick, chunks) in sorted(build(gen).items()):
        data = encode_region(
            rx=rx,
            ry=ry,
            last_processed_tick=tick,
            generation=3,
            writer="fixture",
            encoding=encoding,
            chunks={(c["cx"], c["cy"]): encode_payload(c, encoding) for c in chunks},
            region_size=REGION_SIZE,
            written_at=WRITTEN_AT,
        )
        path = root / region_key(rx, ry)
        path.write_bytes(data)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures")
    parser.add_argument("--force", action="store_true", help="replace existing fixture worlds")
    args = parser.parse_args(argv)
    out: Path = args.out
    for name in WORLDS:
        target = out / name
        if target.exists():
            if not args.force:
                print(
                    f"{target}: exists; fixtures are a frozen contract (pass --force to "
                    "regenerate on purpose)",
                    file=sys.stderr,
                )
                return 1
            shutil.rmtree(target)
    for name in WORLDS:
        for path in write_world(out, name):
            print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
