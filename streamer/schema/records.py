"""Persisted record types: msgspec Structs tagged by ``type``, each carrying ``schemaVersion``.

Schema evolution rules (msgspec's): a new field gets a default; a field never changes type;
anything else is a new ``schemaVersion`` with a migration step in ``schema/migrations.py``.
``CURRENT_VERSIONS`` is what this code writes; a stored record with a higher version is
refused (``UnknownSchemaVersion``), never downgraded.

What is persisted is only what cannot be regenerated: a chunk that was never edited has no
record at all, and its features and NPCs come from the generator. Once a chunk has a
``ChunkRecord``, the record's lists are authoritative (a removed default tree stays removed).
"""

from __future__ import annotations

import msgspec

#: schemaVersion this code writes, per record type.
CURRENT_VERSIONS: dict[str, int] = {
    "chunk": 1,
    "character": 3,
    "structure": 1,
    "feature": 1,
    "society": 2,
}


class Record(msgspec.Struct, tag_field="type", kw_only=True):
    """Base of every persisted record. ``type`` is the msgspec tag."""

    schemaVersion: int


class ItemStack(msgspec.Struct, frozen=True):
    item: str
    count: int


class Character(Record, tag="character", kw_only=True):
    """A player's character (``player_id`` set) or an NPC. Position in world tile units.

    v1: ``name``, ``inventory`` as ``{item: count}``; v2: ``name`` split into
    ``given_name``/``family_name``; v3: ``inventory`` as a list of item stacks.
    """

    schemaVersion: int = 3
    id: str
    x: int
    y: int
    player_id: str | None = None
    given_name: str = ""
    family_name: str = ""
    hp: int = 100
    inventory: list[ItemStack] = msgspec.field(default_factory=list)
    society_id: str | None = None


class Structure(Record, tag="structure", kw_only=True):
    """A built structure anchored at its top-left tile ``(x, y)``."""

    schemaVersion: int = 1
    id: str
    kind: str
    x: int
    y: int
    w: int = 1
    h: int = 1
    owner: str | None = None
    hp: int = 100


class Feature(Record, tag="feature", kw_only=True):
    """A dynamic map feature (tree, ore vein, spring) at tile ``(x, y)``."""

    schemaVersion: int = 1
    id: str
    kind: str
    x: int
    y: int
    amount: int = 0


class Society(Record, tag="society", kw_only=True):
    """A faction or settlement, stored in the chunk holding its seat ``(x, y)``.

    v1 had ``allies: list[str]``; v2 replaced it by ``relations: {society_id: standing}``.
    """

    schemaVersion: int = 2
    id: str
    name: str
    x: int
    y: int
    members: list[str] = msgspec.field(default_factory=list)
    relations: dict[str, int] = msgspec.field(default_factory=dict)


class ChunkRecord(Record, tag="chunk", kw_only=True):
    """Everything persisted for one 64x64 chunk.

    ``tile_idx``/``tile_val`` are packed little-endian ``uint16`` arrays of equal length: local
    tile index ``ly * 64 + lx`` (sorted, unique) and the tile id placed there. Packed bytes
    decode several times faster than lists of pairs.

    ``base_fingerprint`` is the xxh3_64 of the generated terrain these edits were made on,
    with ``generator``/``generator_version``: a generator change is detected at load instead
    of silently shifting player edits.

    ``record_versions`` holds the lowest ``schemaVersion`` per nested record type; the codec
    peeks at it to take the fast typed-decode path when nothing needs migrating.
    """

    schemaVersion: int = 1
    cx: int
    cy: int
    generator: str
    generator_version: int
    base_fingerprint: int
    tile_idx: bytes = b""
    tile_val: bytes = b""
    characters: list[Character] = msgspec.field(default_factory=list)
    structures: list[Structure] = msgspec.field(default_factory=list)
    features: list[Feature] = msgspec.field(default_factory=list)
    societies: list[Society] = msgspec.field(default_factory=list)
    record_versions: dict[str, int] = msgspec.field(default_factory=dict)


#: Records that live inside a chunk, by tag.
NESTED_TYPES: dict[str, type[Record]] = {
    "character": Character,
    "structure": Structure,
    "feature": Feature,
    "society": Society,
}
