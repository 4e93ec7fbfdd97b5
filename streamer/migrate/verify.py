"""Before/after evidence for a migration: file digests and a census of records by id.

``tree_digests`` is how "the world is byte-identical to before" is checked: the xxh3 of every
file below the world root except migration bookkeeping (``is_bookkeeping``: snapshots, the
incident log, the checkpoint and restore marker, lock files). ``record_census`` is how
"every record exactly once, at the current version" is checked.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from streamer.format.checksum import hex64, xxh3
from streamer.format.region import decode_region, parse_region_key, region_key
from streamer.migrate.batch import is_bookkeeping
from streamer.schema.codec import ChunkCodec, Encoding
from streamer.schema.migrations import CHUNK_NESTED_FIELDS
from streamer.schema.records import CURRENT_VERSIONS

__all__ = ["Census", "record_census", "tree_digests"]


def tree_digests(root: Path, *, include_bookkeeping: bool = False) -> dict[str, str]:
    """``{relative posix path: xxh3 hex}`` of every file below ``root``. Blocking."""
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if not include_bookkeeping and is_bookkeeping(rel):
                continue
            out[rel] = hex64(xxh3(full.read_bytes()))
    return dict(sorted(out.items()))


@dataclass
class Census:
    #: ``(type, id)`` → how many times it was found; chunks are ``("chunk", "cx,cy")``.
    ids: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: ``(type, schemaVersion)`` → count.
    versions: Counter[tuple[str, int]] = field(default_factory=Counter)
    regions: int = 0
    chunks: int = 0

    @property
    def duplicates(self) -> list[tuple[str, str]]:
        return sorted(k for k, n in self.ids.items() if n != 1)

    @property
    def stale(self) -> dict[tuple[str, int], int]:
        """Records below the current version of their type."""
        return {k: n for k, n in self.versions.items() if k[1] < CURRENT_VERSIONS.get(k[0], k[1])}


def record_census(root: Path) -> Census:
    """Decode (raw, unmigrated) every record of every region file below ``root``. Blocking.

    :raises IntegrityError: a region file does not verify.
    :raises MalformedFile: a chunk payload is not a record.
    """
    census = Census()
    codecs: dict[Encoding, ChunkCodec] = {}
    regions = root / "regions"
    names = sorted(os.listdir(regions)) if regions.is_dir() else []
    for name in names:
        key = f"regions/{name}"
        coords = parse_region_key(key)
        if coords is None or region_key(*coords) != key:
            continue
        rf = decode_region((root / key).read_bytes(), rx=coords[0], ry=coords[1], path=key)
        census.regions += 1
        enc = rf.header.encoding
        codec = codecs.get(enc) or codecs.setdefault(enc, ChunkCodec(enc))
        for (cx, cy), payload in rf.chunks.items():
            raw = codec.decode_raw(payload, where=f"{key} chunk {(cx, cy)}")
            census.chunks += 1
            census.ids[("chunk", f"{cx},{cy}")] += 1
            census.versions[("chunk", int(raw["schemaVersion"]))] += 1
            for fname, rtype in CHUNK_NESTED_FIELDS.items():
                for item in raw.get(fname) or []:
                    census.ids[(rtype, str(item.get("id")))] += 1
                    census.versions[(rtype, int(item["schemaVersion"]))] += 1
    return census
