"""Deltas: one change each, stamped with the game ``tick`` it happened at.

Shard servers build these and pass a batch to ``World.submit``; the journal persists them
(inside a ``JournalBatch`` record) until their region file has absorbed them. Coordinates
are world tile coordinates; chunk = ``x // 64``, region = chunk ``// region_size`` (floor
division, so negative coordinates work).
"""

from __future__ import annotations

import msgspec

from streamer.schema.records import Character, Feature, Society, Structure


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
