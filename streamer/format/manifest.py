"""The world manifest, ``world.json``: what a world is and how to regenerate it.

Human-readable JSON (operators read it) with a ``checksum`` field: the xxh3_64 of the
canonical encoding (sorted keys, no whitespace) of every other field. Written atomically
through the store; verified on every open.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import msgspec
import xxhash

from streamer.errors import ChecksumMismatch, MalformedFile, UnsupportedFormat

MANIFEST_KEY = "world.json"
#: The on-disk layout version this code reads and writes (manifest, regions, journal).
FORMAT_VERSION = 1


class WorldManifest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    type: Literal["world"] = "world"
    schemaVersion: int = 1
    format_version: int = FORMAT_VERSION
    world_id: str
    seed: int
    generator: str
    generator_version: int
    generator_params: dict[str, Any]
    chunk_size: int = 64
    region_size: int = 8
    encoding: Literal["msgpack", "json"] = "msgpack"
    bound_tiles: int = 0
    #: schemaVersion per record type that this world's records are written at (current code's).
    record_versions: dict[str, int]
    created_at: float
    checksum: str = ""


def new_manifest(
    *,
    seed: int,
    generator: str,
    generator_version: int,
    generator_params: dict[str, Any],
    region_size: int,
    encoding: Literal["msgpack", "json"],
    record_versions: dict[str, int],
    bound_tiles: int = 0,
) -> WorldManifest:
    return WorldManifest(
        world_id=uuid.uuid4().hex,
        seed=seed,
        generator=generator,
        generator_version=generator_version,
        generator_params=dict(generator_params),
        region_size=region_size,
        encoding=encoding,
        bound_tiles=bound_tiles,
        record_versions=dict(record_versions),
        created_at=time.time(),
    )


def _canonical(m: WorldManifest) -> bytes:
    body = msgspec.to_builtins(m)
    body.pop("checksum", None)
    return msgspec.json.encode(body, order="sorted")


def manifest_checksum(m: WorldManifest) -> str:
    return f"{xxhash.xxh3_64_intdigest(_canonical(m)):016x}"


def encode_manifest(m: WorldManifest) -> bytes:
    sealed = msgspec.structs.replace(m, checksum=manifest_checksum(m))
    return msgspec.json.format(msgspec.json.encode(sealed, order="sorted"), indent=2) + b"\n"


def decode_manifest(data: bytes, path: str = MANIFEST_KEY) -> WorldManifest:
    """Parse and verify a manifest.

    :raises MalformedFile: not JSON, not a world manifest, or fields of the wrong type.
    :raises UnsupportedFormat: written by a newer format version than this code reads.
    :raises ChecksumMismatch: content does not match its checksum field.
    """
    try:
        raw = msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MalformedFile(f"world manifest is not valid JSON: {exc}", path=path) from None
    if not isinstance(raw, dict) or raw.get("type") != "world":
        raise MalformedFile("not a world manifest (type != 'world')", path=path)
    version = raw.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise UnsupportedFormat(
            f"world format version {version} is newer than this streamer reads "
            f"({FORMAT_VERSION}); upgrade streamer",
            path=path,
        )
    try:
        m = msgspec.convert(raw, WorldManifest)
    except msgspec.ValidationError as exc:
        raise MalformedFile(f"world manifest field invalid: {exc}", path=path) from None
    if m.format_version < 1:
        raise UnsupportedFormat(f"unknown world format version {m.format_version}", path=path)
    actual = manifest_checksum(m)
    if m.checksum != actual:
        raise ChecksumMismatch(
            "world manifest checksum mismatch", path=path, expected=m.checksum, actual=actual
        )
    return m
