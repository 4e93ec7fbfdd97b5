"""``World.submit`` refuses nested records that are not exactly what this code writes.

A record is written into its chunk as submitted. A newer ``schemaVersion`` made the whole
region refuse to load and an older one (in today's shape) failed its "migration" on the next
read; either way the region's earlier, valid edits became unreadable too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer import (
    Character,
    DeltaError,
    EntityUpsert,
    Feature,
    FeatureAdd,
    Society,
    SocietyUpdate,
    Structure,
    StructureUpsert,
    TileSet,
    open_world,
)
from streamer.config import Config, RuntimeSettings, StorageSettings
from streamer.schema.deltas import AnyDelta
from streamer.schema.records import CURRENT_VERSIONS
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world

CONF = Config(
    runtime=RuntimeSettings(flush_interval_ms=60_000, terrain_processes=0),
    storage=StorageSettings(fsync=False),
)


async def new_world(path: Path) -> None:
    store = await LocalStore.open(path, fsync=False)
    await create_world(store, seed=5)
    await store.aclose()


def upsert(version: int) -> AnyDelta:
    return EntityUpsert(tick=2, character=Character(id="e", x=5, y=5, schemaVersion=version))


def with_version(tag: str, version: int) -> AnyDelta:
    if tag == "character":
        return upsert(version)
    if tag == "structure":
        return StructureUpsert(
            tick=2, structure=Structure(id="s", kind="hut", x=6, y=6, schemaVersion=version)
        )
    if tag == "feature":
        return FeatureAdd(
            tick=2, feature=Feature(id="f", kind="tree", x=7, y=7, schemaVersion=version)
        )
    assert tag == "society"
    return SocietyUpdate(
        tick=2, society=Society(id="c", name="Guild", x=8, y=8, schemaVersion=version)
    )


CASES = [
    (tag, v)
    for tag in ("character", "structure", "feature", "society")
    for v in sorted(
        {1, CURRENT_VERSIONS[tag] - 1, CURRENT_VERSIONS[tag] + 1, 99} - {CURRENT_VERSIONS[tag]}
    )
]


@pytest.mark.parametrize(("tag", "version"), CASES)
async def test_a_record_not_at_the_current_version_is_refused_naming_it(
    tmp_path: Path, tag: str, version: int
) -> None:
    await new_world(tmp_path)
    async with open_world(tmp_path, CONF) as world:
        await world.submit([TileSet(tick=1, x=3, y=3, tile=42)])
        batches = world._journal.stats().batches  # type: ignore[union-attr]
        bad = with_version(tag, version)
        with pytest.raises(DeltaError) as info:
            # Behind a valid delta: the index named is the bad record's, and nothing of the
            # batch is journaled.
            await world.submit([TileSet(tick=2, x=4, y=4, tile=43), bad])
        msg = str(info.value)
        assert "delta #1" in msg
        assert f"{tag} record" in msg
        assert f"schemaVersion {version}" in msg
        assert f"only schemaVersion {CURRENT_VERSIONS[tag]}" in msg
        record = getattr(bad, tag)
        assert repr(record.id) in msg
        assert world._journal.stats().batches == batches  # type: ignore[union-attr]
        # The region stays writable at that tick: nothing of the refused batch was reserved.
        await world.submit(
            [TileSet(tick=2, x=4, y=4, tile=44), with_version(tag, CURRENT_VERSIONS[tag])]
        )
        await world.flush()
    # The region, its earlier edits and the valid record all read back.
    async with open_world(tmp_path, CONF) as world:
        c = await world.chunk(0, 0)
        assert int(c.tiles[3, 3]) == 42 and int(c.tiles[4, 4]) == 44
        assert not world.inactive_regions


@pytest.mark.parametrize("version", [1, 2, 99])
async def test_reviewer_scenario_region_stays_readable(tmp_path: Path, version: int) -> None:
    """/tmp/review_submit/schemaver.py: the refused record leaves the region loadable."""
    await new_world(tmp_path)
    async with open_world(tmp_path, CONF) as world:
        await world.submit([TileSet(tick=1, x=3, y=3, tile=42)])
        await world.flush()
        with pytest.raises(DeltaError, match=r"delta #0 \(EntityUpsert, tick 2\): character "):
            await world.submit([upsert(version)])
        await world.flush()
    async with open_world(tmp_path, CONF) as world:
        c = await world.chunk(0, 0)
        assert int(c.tiles[3, 3]) == 42
        assert [e.id for e in c.entities] == []


class _Hero(Character, tag="character", kw_only=True):
    title: str = ""


async def test_a_record_of_another_type_or_a_subclass_is_refused(tmp_path: Path) -> None:
    await new_world(tmp_path)
    async with open_world(tmp_path, CONF) as world:
        hero = _Hero(id="h", x=5, y=5, title="Countess")
        with pytest.raises(DeltaError, match=r"delta #0 .*exactly a Character record.*_Hero"):
            await world.submit([EntityUpsert(tick=1, character=hero)])
        wrong = Structure(id="s", kind="hut", x=5, y=5)
        with pytest.raises(DeltaError, match=r"character"):
            await world.submit([EntityUpsert(tick=1, character=wrong)])  # type: ignore[arg-type]
        await world.submit([EntityUpsert(tick=1, character=Character(id="h", x=5, y=5))])
