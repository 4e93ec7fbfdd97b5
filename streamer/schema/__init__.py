"""Record types, the migration registry and the chunk codec.

Importing this package registers the shipped migration steps (``upgrades``) on ``REGISTRY``
and validates every chain, so any module that touches ``streamer.schema.*`` sees a complete,
checked registry.
"""

from __future__ import annotations

from streamer.schema import upgrades as _upgrades  # noqa: F401 - registers the shipped steps
from streamer.schema.codec import (
    ChunkCodec,
    DecodedChunk,
    Encoding,
    apply_tiles,
    pack_tiles,
    unpack_tiles,
)
from streamer.schema.migrations import (
    REGISTRY,
    MalformedRecord,
    MigrationRegistry,
    migration,
)
from streamer.schema.records import (
    CURRENT_VERSIONS,
    Character,
    ChunkRecord,
    Feature,
    ItemStack,
    Record,
    Society,
    Structure,
)

__all__ = [
    "CURRENT_VERSIONS",
    "REGISTRY",
    "Character",
    "ChunkCodec",
    "ChunkRecord",
    "DecodedChunk",
    "Encoding",
    "Feature",
    "ItemStack",
    "MalformedRecord",
    "MigrationRegistry",
    "Record",
    "Society",
    "Structure",
    "apply_tiles",
    "migration",
    "pack_tiles",
    "unpack_tiles",
]
