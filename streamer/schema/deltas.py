"""Deltas: one change each, stamped with the game ``tick`` it happened at.

Shard servers build these and pass a batch to ``World.submit``; the journal persists them
(inside a ``JournalBatch`` record) until their region file has absorbed them. Coordinates
are world tile coordinates; chunk = ``x // 64``, region = chunk ``// region_size`` (floor
division, so negative coordinates work).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec

from streamer.schema.migrations import REGISTRY
from streamer.schema.records import (
    CURRENT_VERSIONS,
    Character,
    Feature,
    Record,
    Society,
    Structure,
)


class Delta(msgspec.Struct, tag_field="op", frozen=True):
    tick: int


# ``gc=False`` on the deltas whose fields are all ints and strings: such an instance can never
# be part of a reference cycle, and a shard server creates hundreds of thousands of them per
# second that stay queued until their region is flushed. Each instance of a collected type
# counts towards the collector's next young pass, and every object that lives through a few
# of those passes pushes it towards a full one (~10 ms here, see docs/performance.md);
# untracked types count for nothing. Deltas carrying records (lists, dicts) stay tracked.


class TileSet(Delta, tag="tile_set", frozen=True, gc=False):
    x: int
    y: int
    tile: int


class EntityUpsert(Delta, tag="entity_upsert", frozen=True):
    character: Character


class EntityRemove(Delta, tag="entity_remove", frozen=True, gc=False):
    entity_id: str
    x: int
    y: int


class EntityMove(Delta, tag="entity_move", frozen=True, gc=False):
    """Move a character; the source and target may be in different regions."""

    entity_id: str
    from_x: int
    from_y: int
    to_x: int
    to_y: int


class FeatureAdd(Delta, tag="feature_add", frozen=True):
    feature: Feature


class FeatureRemove(Delta, tag="feature_remove", frozen=True, gc=False):
    feature_id: str
    x: int
    y: int


class StructureUpsert(Delta, tag="structure_upsert", frozen=True):
    structure: Structure


class StructureRemove(Delta, tag="structure_remove", frozen=True, gc=False):
    structure_id: str
    x: int
    y: int


class SocietyUpdate(Delta, tag="society_update", frozen=True):
    society: Society


AnyDelta = (
    TileSet
    | EntityUpsert
    | EntityRemove
    | EntityMove
    | FeatureAdd
    | FeatureRemove
    | StructureUpsert
    | StructureRemove
    | SocietyUpdate
)


#: Deltas carrying a persisted record: the field holding it and the record's type.
RECORD_FIELDS: Final[dict[type[Delta], tuple[str, type[Record]]]] = {
    EntityUpsert: ("character", Character),
    FeatureAdd: ("feature", Feature),
    StructureUpsert: ("structure", Structure),
    SocietyUpdate: ("society", Society),
}


def _tag(cls: type[msgspec.Struct]) -> str:
    return str(cls.__struct_config__.tag)


_RECORD_DELTAS: Final = frozenset(RECORD_FIELDS)
# Delta type → (field, current version of its record); delta op → (field, record tag).
_CURRENT_BY_TYPE: Final = {
    delta: (field, CURRENT_VERSIONS[_tag(rec)]) for delta, (field, rec) in RECORD_FIELDS.items()
}
_RECORD_BY_OP: Final = {_tag(d): (field, _tag(rec)) for d, (field, rec) in RECORD_FIELDS.items()}


def records_current(deltas: Sequence[Delta]) -> bool:
    """Whether every record ``deltas`` carry is at its type's current ``schemaVersion``.

    A batch without such deltas costs one C-level scan of the types; otherwise a compare per
    delta. Typed decoding alone cannot tell: it drops fields it does not know (a newer
    record's) and fills defaults for the ones an old record lacks.
    """
    if _RECORD_DELTAS.isdisjoint(map(type, deltas)):
        return True
    current = _CURRENT_BY_TYPE
    for d in deltas:
        spec = current.get(type(d))
        if spec is not None and getattr(d, spec[0]).schemaVersion != spec[1]:
            return False
    return True


def upgrade_raw_records(raw_deltas: list[Any], *, where: str) -> None:
    """Bring the record of every plain-data delta (as msgspec decodes it untyped) to its
    current version in place, through the migration registry. Anything not shaped like a
    delta carrying its own record type is left for typed conversion to report.

    :raises UnknownSchemaVersion: a record is newer than this code (never downgraded); the
        error names ``where``, the delta index, the record's type, id and version.
    :raises MigrationFailed: a migration step failed (names the same).
    :raises MalformedRecord: a record has no valid ``schemaVersion``.
    """
    for i, d in enumerate(raw_deltas):
        if not isinstance(d, dict):
            continue
        op = d.get("op")
        spec = _RECORD_BY_OP.get(op) if isinstance(op, str) else None
        if spec is None:
            continue
        field, tag = spec
        rec = d.get(field)
        if isinstance(rec, dict) and rec.get("type") == tag:
            d[field], _ = REGISTRY.upgrade(rec, where=f"{where} delta #{i}", consume=True)
