"""streamer: keeps a procedurally generated multiplayer world on storage and streams it.

::

    import streamer

    async with streamer.open_world("var/world") as world:
        chunk = await world.chunk(0, 0)
        await world.submit([streamer.TileSet(tick=1, x=3, y=4, tile=7)])
"""

from __future__ import annotations

from streamer.config import Config, load_config
from streamer.errors import (
    DeltaError,
    IntegrityError,
    RegionInactive,
    StorageUnavailable,
    StreamerError,
    TickAlreadyProcessed,
    WorldClosed,
    WorldLocked,
    WorldNotFound,
)
from streamer.runtime.chunk import Chunk
from streamer.runtime.events import (
    AnyEvent,
    Event,
    EventStream,
    PlayerRelocated,
    RegionInactiveEvent,
    RegionRestored,
    ScrubAlert,
    SnapshotTaken,
)
from streamer.runtime.world import World, WorldStats, open_world
from streamer.schema.deltas import (
    AnyDelta,
    Delta,
    EntityMove,
    EntityRemove,
    EntityUpsert,
    FeatureAdd,
    FeatureRemove,
    SocietyUpdate,
    StructureRemove,
    StructureUpsert,
    TileSet,
)
from streamer.schema.records import Character, Feature, ItemStack, Society, Structure

__all__ = [
    "AnyDelta",
    "AnyEvent",
    "Event",
    "EventStream",
    "PlayerRelocated",
    "RegionInactiveEvent",
    "RegionRestored",
    "ScrubAlert",
    "SnapshotTaken",
    "Character",
    "Chunk",
    "Config",
    "Delta",
    "DeltaError",
    "EntityMove",
    "EntityRemove",
    "EntityUpsert",
    "Feature",
    "FeatureAdd",
    "FeatureRemove",
    "IntegrityError",
    "ItemStack",
    "RegionInactive",
    "Society",
    "SocietyUpdate",
    "StorageUnavailable",
    "StreamerError",
    "Structure",
    "StructureRemove",
    "StructureUpsert",
    "TickAlreadyProcessed",
    "TileSet",
    "World",
    "WorldClosed",
    "WorldLocked",
    "WorldNotFound",
    "WorldStats",
    "load_config",
    "open_world",
]
