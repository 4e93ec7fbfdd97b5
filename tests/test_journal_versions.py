"""Journal frames decode their records through the migration registry.

Typed decoding alone replayed a record from a newer release with its new fields dropped (and
``schemaVersion: 4`` written into the chunk), and an old record without its migration step
(review: /tmp/review_mig/journal_future.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from streamer import Character, ItemStack, TileSet, open_world
from streamer.errors import MalformedFile, MigrationFailed, UnknownSchemaVersion
from streamer.format.journal import encode_frame
from streamer.runtime.journal import JOURNAL_DIR, JournalBatch, decode_batch, encode_batch
from streamer.schema.deltas import EntityUpsert, SocietyUpdate
from streamer.schema.records import CURRENT_VERSIONS, Society
from streamer.storage.faultfs import SimulatedFileSystem
from tests.test_submit_moves import CONF, new_world

WHERE = "journal/00000000000000000001.wal"


def frame(*deltas: dict[str, Any], seq: int = 7) -> bytes:
    return msgspec.msgpack.encode(
        {"type": "journal_batch", "schemaVersion": 1, "seq": seq, "deltas": list(deltas)}
    )


def upsert(character: dict[str, Any], tick: int = 5) -> dict[str, Any]:
    return {"op": "entity_upsert", "tick": tick, "character": character}


TILE = {"op": "tile_set", "tick": 5, "x": 1, "y": 1, "tile": 3}
V4 = {
    "type": "character",
    "schemaVersion": CURRENT_VERSIONS["character"] + 1,
    "id": "p1",
    "x": 1,
    "y": 1,
    "given_name": "Ada",
    "title": "Countess",
    "inventory": [{"item": "axe", "count": 1}],
}
V1 = {
    "type": "character",
    "schemaVersion": 1,
    "id": "p1",
    "x": 1,
    "y": 1,
    "name": "Ada King Lovelace",
    "inventory": {"wood": 3, "axe": 1, "rope": 0},
}


def test_a_current_frame_decodes_as_typed() -> None:
    batch = JournalBatch(
        seq=3,
        deltas=[
            TileSet(tick=1, x=1, y=1, tile=2),
            EntityUpsert(tick=1, character=Character(id="a", x=1, y=1, given_name="A")),
            SocietyUpdate(tick=1, society=Society(id="s", name="S", x=1, y=1)),
        ],
    )
    assert decode_batch(encode_batch(batch), where=WHERE) == batch


def test_a_record_from_a_newer_release_is_refused_naming_where() -> None:
    with pytest.raises(UnknownSchemaVersion) as info:
        decode_batch(frame(TILE, upsert(V4)), where=WHERE)
    err = info.value
    assert (err.record_type, err.record_id, err.schema_version) == ("character", "p1", 4)
    assert f"{WHERE} batch seq 7 delta #1" in str(err)


@pytest.mark.parametrize("version", [1, 2])
def test_an_old_record_is_migrated_on_replay(version: int) -> None:
    old = dict(V1)
    if version == 2:
        old = {k: v for k, v in old.items() if k != "name"}
        old.update(schemaVersion=2, given_name="Ada", family_name="King Lovelace")
    [tile, d] = decode_batch(frame(TILE, upsert(old)), where=WHERE).deltas
    assert tile == TileSet(tick=5, x=1, y=1, tile=3)
    assert isinstance(d, EntityUpsert)
    assert d.character == Character(
        id="p1",
        x=1,
        y=1,
        given_name="Ada",
        family_name="King Lovelace",
        inventory=[ItemStack("axe", 1), ItemStack("wood", 3)],
    )


def test_a_v1_record_the_typed_decoder_would_take_is_migrated_too() -> None:
    """No inventory: typed, it decoded fine and lost the name."""
    old = {k: v for k, v in V1.items() if k != "inventory"}
    [d] = decode_batch(frame(upsert(old)), where=WHERE).deltas
    assert isinstance(d, EntityUpsert)
    assert (d.character.given_name, d.character.schemaVersion) == ("Ada", 3)


def test_an_old_society_is_migrated() -> None:
    society = {"type": "society", "schemaVersion": 1, "id": "s", "name": "S", "x": 1, "y": 1}
    society["allies"] = ["t"]
    [d] = decode_batch(
        frame({"op": "society_update", "tick": 1, "society": society}), where=WHERE
    ).deltas
    assert isinstance(d, SocietyUpdate) and d.society.relations == {"t": 100}


def test_a_failing_migration_names_the_frame() -> None:
    bad = dict(V1, inventory=["not", "a", "map"])
    with pytest.raises(MigrationFailed, match=f"{WHERE} batch seq 7 delta #0"):
        decode_batch(frame(upsert(bad)), where=WHERE)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff not msgpack",
        msgspec.msgpack.encode([1, 2]),
        frame(upsert(dict(V1, type="structure"))),
        frame(upsert({k: v for k, v in V1.items() if k != "schemaVersion"} | {"id": 5})),
        frame({"op": "entity_upsert", "tick": 1, "character": 5}),
        msgspec.msgpack.encode({"type": "journal_batch", "schemaVersion": 2, "seq": 1}),
    ],
)
def test_malformed_frames_stay_malformed(payload: bytes) -> None:
    with pytest.raises(MalformedFile):
        decode_batch(payload, where=WHERE)


async def _crashed_with_frame(tmp_path: Path, payload: bytes) -> tuple[SimulatedFileSystem, str]:
    """A world whose journal holds exactly one frame, ``payload``, as after a crash."""
    fs = await new_world(tmp_path)
    async with open_world(tmp_path, CONF, fs=fs) as world:
        await world.submit([TileSet(tick=1, x=1, y=1, tile=1)])
        image = fs.durable_image()  # power loss: only the journal holds the batch
    [name] = [n for n in image.listdir(JOURNAL_DIR) if n.endswith(".wal")]
    seg = f"{JOURNAL_DIR}/{name}"
    image.unlink(seg)
    h = image.create(seg)
    image.write(h, encode_frame(payload))
    image.fsync(h)
    image.close(h)
    image.fsync_dir(JOURNAL_DIR)
    return image, seg


async def test_opening_refuses_a_journal_record_from_a_newer_release(tmp_path: Path) -> None:
    image, seg = await _crashed_with_frame(tmp_path, frame(upsert(V4), seq=1))
    before = image.read(seg)
    with pytest.raises(UnknownSchemaVersion) as info:
        async with open_world(tmp_path, CONF, fs=image):
            pass
    assert f"{seg} batch seq 1 delta #0" in str(info.value)
    assert image.read(seg) == before  # refused, nothing dropped


async def test_opening_replays_an_old_journal_record_migrated(tmp_path: Path) -> None:
    image, _ = await _crashed_with_frame(tmp_path, frame(upsert(V1), seq=1))
    async with open_world(tmp_path, CONF, fs=image) as world:
        [c] = [e for e in (await world.chunk(0, 0)).entities if e.id == "p1"]
        assert (c.schemaVersion, c.given_name, c.family_name) == (3, "Ada", "King Lovelace")
        assert c.inventory == [ItemStack("axe", 1), ItemStack("wood", 3)]
        await world.flush()
    async with open_world(tmp_path, CONF, fs=image) as world:
        [c] = [e for e in (await world.chunk(0, 0)).entities if e.id == "p1"]
        assert c.inventory == [ItemStack("axe", 1), ItemStack("wood", 3)]
