"""Synthetic worlds written at old schema versions, for migration tests and benchmarks.

Records are plain dicts in the shapes old code wrote (see ``schema/upgrades.py``), never
built from the current record classes, which only know the current shapes. The golden,
committed old worlds are ``tests/fixtures/`` (``scripts/make_fixtures.py``); these are
bigger, throwaway and parameterised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

from streamer.format.manifest import encode_manifest, new_manifest
from streamer.format.region import encode_region, region_key
from streamer.schema.records import CURRENT_VERSIONS

__all__ = ["character_raw", "chunk_raw", "society_raw", "write_world"]

Raw = dict[str, Any]
CharacterVersion = Literal[1, 2, 3]


def character_raw(rid: str, x: int, y: int, version: CharacterVersion, i: int = 0) -> Raw:
    """A character as code of ``version`` wrote it."""
    rec: Raw = {
        "type": "character",
        "schemaVersion": version,
        "id": rid,
        "x": x,
        "y": y,
        "hp": 50 + i % 50,
    }
    inventory = {"wood": i % 7, "stone": 2, "bread": 0}
    if version == 1:
        rec["name"] = f"Npc{i} Of House{i % 13}"
        rec["inventory"] = inventory
    else:
        rec["given_name"], rec["family_name"] = f"Npc{i}", f"Of House{i % 13}"
        if version == 2:
            rec["inventory"] = inventory
        else:
            rec["inventory"] = [
                {"item": k, "count": v} for k, v in sorted(inventory.items()) if v > 0
            ]
    return rec


def society_raw(rid: str, x: int, y: int, version: Literal[1, 2], allies: list[str]) -> Raw:
    rec: Raw = {
        "type": "society",
        "schemaVersion": version,
        "id": rid,
        "name": rid,
        "x": x,
        "y": y,
        "members": [],
    }
    if version == 1:
        rec["allies"] = allies
    else:
        rec["relations"] = dict.fromkeys(allies, 100)
    return rec


def chunk_raw(
    cx: int,
    cy: int,
    *,
    characters: list[Raw],
    societies: list[Raw] | None = None,
    edits: int = 64,
    features: int = 2,
) -> Raw:
    rng = np.random.default_rng((cx * 1_000_003 + cy) & 0xFFFF_FFFF)
    idx = np.unique(rng.integers(0, 4096, size=edits)).astype("<u2")
    val = rng.integers(0, 40, size=idx.size).astype("<u2")
    x0, y0 = cx * 64, cy * 64
    return {
        "type": "chunk",
        "schemaVersion": 1,
        "cx": cx,
        "cy": cy,
        "generator": "streamer-terrain",
        "generator_version": 1,
        "base_fingerprint": int(rng.integers(0, 2**62)),
        "tile_idx": idx.tobytes(),
        "tile_val": val.tobytes(),
        "characters": characters,
        "structures": [],
        "features": [
            {
                "type": "feature",
                "schemaVersion": 1,
                "id": f"f-{cx}-{cy}-{k}",
                "kind": "tree",
                "x": x0 + k,
                "y": y0,
                "amount": 3,
            }
            for k in range(features)
        ],
        "societies": societies or [],
    }


def write_world(
    root: Path,
    *,
    regions: int,
    chunks_per_region: int = 8,
    characters_per_chunk: int = 2,
    version: CharacterVersion = 1,
    encoding: Literal["msgpack", "json"] = "msgpack",
    region_size: int = 8,
    seed: int = 7,
) -> int:
    """Write a world of ``regions`` regions in a row; returns the number of chunks. Blocking.

    Every chunk holds ``characters_per_chunk`` characters at ``version``; the first chunk of
    each region also holds a society (v1 when ``version`` is 1, else v2).
    """
    from streamer.worldgen import DEFAULT_PARAMS, GENERATOR_NAME, GENERATOR_VERSION, params_to_dict

    if not 1 <= chunks_per_region <= region_size * region_size:
        raise ValueError("chunks_per_region must fit in a region")
    versions = dict(CURRENT_VERSIONS)
    versions["character"] = version
    versions["society"] = 1 if version == 1 else 2
    manifest = new_manifest(
        seed=seed,
        generator=GENERATOR_NAME,
        generator_version=GENERATOR_VERSION,
        generator_params=params_to_dict(DEFAULT_PARAMS),
        region_size=region_size,
        encoding=encoding,
        record_versions=versions,
    )
    (root / "regions").mkdir(parents=True, exist_ok=True)
    (root / "world.json").write_bytes(encode_manifest(manifest))
    enc: msgspec.msgpack.Encoder | msgspec.json.Encoder = (
        msgspec.msgpack.Encoder() if encoding == "msgpack" else msgspec.json.Encoder()
    )
    total = 0
    for r in range(regions):
        rx, ry = r % 16, r // 16
        payloads: dict[tuple[int, int], bytes] = {}
        for c in range(chunks_per_region):
            cx, cy = rx * region_size + c % region_size, ry * region_size + c // region_size
            chars = [
                character_raw(f"c-{cx}-{cy}-{k}", cx * 64 + k, cy * 64, version, k + c)
                for k in range(characters_per_chunk)
            ]
            socs = (
                [
                    society_raw(
                        f"s-{rx}-{ry}",
                        cx * 64,
                        cy * 64,
                        1 if version == 1 else 2,
                        [f"s-{rx + 1}-{ry}"],
                    )
                ]
                if c == 0
                else []
            )
            payloads[(cx, cy)] = enc.encode(chunk_raw(cx, cy, characters=chars, societies=socs))
        data = encode_region(
            rx=rx,
            ry=ry,
            last_processed_tick=100 + r,
            generation=1,
            writer="synth",
            encoding=encoding,
            chunks=payloads,
            region_size=region_size,
        )
        (root / region_key(rx, ry)).write_bytes(data)
        total += len(payloads)
    return total
