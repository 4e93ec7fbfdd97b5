"""The golden old-version worlds in ``tests/fixtures/`` load and migrate, forever.

They were written by ``scripts/make_fixtures.py`` in the record shapes of character v1/v2 and
society v1. Never regenerate them to make a test pass: a failure here means this code can no
longer read a world that an older release wrote. Tests copy them to ``tmp_path`` first.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamer.format.region import decode_region, parse_region_key
from streamer.migrate import migrate_world
from streamer.migrate.verify import record_census, tree_digests
from streamer.recovery.check import check_world
from streamer.schema.codec import ChunkCodec
from streamer.schema.records import CURRENT_VERSIONS, ChunkRecord
from streamer.storage.local import LocalStore
from streamer.worlddir import read_manifest

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
WORLDS = ["world-v1", "world-v2"]


def decoded_chunks(world: Path) -> dict[tuple[int, int], tuple[ChunkRecord, bool]]:
    out = {}
    for path in sorted((world / "regions").iterdir()):
        key = f"regions/{path.name}"
        coords = parse_region_key(key)
        assert coords is not None
        rf = decode_region(path.read_bytes(), rx=coords[0], ry=coords[1], path=key)
        codec = ChunkCodec(rf.header.encoding)
        for ck, payload in rf.chunks.items():
            dec = codec.decode(payload, where=f"{key} {ck}")
            out[ck] = (dec.record, dec.upgraded)
    return out


def test_fixtures_are_small_and_present() -> None:
    for name in WORLDS:
        files = [p for p in (FIXTURES / name).rglob("*") if p.is_file()]
        assert len(files) >= 3
        assert sum(p.stat().st_size for p in files) < 16 * 1024


@pytest.mark.parametrize("name", WORLDS)
async def test_fixture_verifies_and_reads_at_old_versions(tmp_path: Path, name: str) -> None:
    world = shutil.copytree(FIXTURES / name, tmp_path / name)
    async with await LocalStore.open(world) as store:
        manifest = await read_manifest(store, where=str(world))
        assert manifest.record_versions["character"] == int(name[-1])
        report = await check_world(store, where=str(world))
        assert report.healthy, report.problems
        assert report.regions_checked == len(list((world / "regions").iterdir()))
    census = record_census(world)
    assert census.versions[("character", int(name[-1]))] == census.versions.total() - sum(
        n for (t, _), n in census.versions.items() if t != "character"
    )


@pytest.mark.parametrize("name", WORLDS)
def test_fixture_loads_through_codec_upgraded(tmp_path: Path, name: str) -> None:
    world = shutil.copytree(FIXTURES / name, tmp_path / name)
    chunks = decoded_chunks(world)
    for rec, upgraded in chunks.values():
        # Typed at the current versions, whatever they were stored at.
        assert all(c.schemaVersion == CURRENT_VERSIONS["character"] for c in rec.characters)
        assert all(s.schemaVersion == CURRENT_VERSIONS["society"] for s in rec.societies)
        if rec.characters or rec.societies:
            assert upgraded
    assert any(upgraded for _, upgraded in chunks.values())


def test_world_v1_upgrades_by_the_shipped_steps(tmp_path: Path) -> None:
    chunks = decoded_chunks(shutil.copytree(FIXTURES / "world-v1", tmp_path / "w"))
    chars = {c.id: c for rec, _ in chunks.values() for c in rec.characters}
    ada = chars["player-ada"]
    assert (ada.given_name, ada.family_name, ada.hp) == ("Ada", "King Lovelace", 87)
    assert [(s.item, s.count) for s in ada.inventory] == [("axe", 1), ("wood", 3)]
    assert (chars["npc-bob"].given_name, chars["npc-bob"].family_name) == ("Bob", "")
    assert (chars["npc-anon"].given_name, chars["npc-anon"].family_name) == ("", "")
    assert chars["npc-cat"].family_name == " Double Space"
    assert [(s.item, s.count) for s in chars["npc-anon"].inventory] == [("stone", 5)]
    socs = {s.id: s for rec, _ in chunks.values() for s in rec.societies}
    assert socs["soc-north"].relations == {"soc-river": 100}
    assert socs["soc-river"].relations == {"soc-north": 100}  # duplicate allies collapse
    assert chunks[(1, 0)][0].structures[0].owner == "player-ada"
    # Tile edits survive as packed arrays.
    assert len(chunks[(0, 0)][0].tile_idx) == len(chunks[(0, 0)][0].tile_val) > 0


def test_world_v2_upgrades_by_the_shipped_steps(tmp_path: Path) -> None:
    chunks = decoded_chunks(shutil.copytree(FIXTURES / "world-v2", tmp_path / "w"))
    chars = {c.id: c for rec, _ in chunks.values() for c in rec.characters}
    eve = chars["player-eve"]
    assert (eve.given_name, eve.family_name) == ("Eve", "Stone")
    assert [(s.item, s.count) for s in eve.inventory] == [("pick", 1), ("wood", 10)]
    assert chunks[(4, 4)][1] is False  # no records at all: nothing to upgrade


@pytest.mark.parametrize("name", WORLDS)
async def test_fixture_migrates_in_batch(tmp_path: Path, name: str) -> None:
    world = shutil.copytree(FIXTURES / name, tmp_path / name)
    before = record_census(world)
    async with await LocalStore.open(world) as store:
        report = await migrate_world(store, jobs=2, where=str(world))
        assert report.status == "completed"
        assert (await read_manifest(store)).record_versions == CURRENT_VERSIONS
        assert (await check_world(store)).healthy
    after = record_census(world)
    assert after.ids == before.ids and not after.duplicates and not after.stale
    assert all(not upgraded for _, upgraded in decoded_chunks(world).values())


@pytest.mark.parametrize("name", WORLDS)
async def test_fixture_opens_in_the_runtime(tmp_path: Path, name: str) -> None:
    """The runtime reads an old world directly, upgrading lazily on load."""
    from streamer import open_world

    world = shutil.copytree(FIXTURES / name, tmp_path / name)
    chunks = decoded_chunks(world)
    async with open_world(world) as w:
        for (cx, cy), (rec, _) in chunks.items():
            chunk = await w.chunk(cx, cy)
            assert {c.id for c in chunk.entities} >= {c.id for c in rec.characters}
            assert all(c.schemaVersion == CURRENT_VERSIONS["character"] for c in chunk.entities)


def test_make_fixtures_script_reproduces_the_committed_records(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "make_fixtures.py"
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(script), "--out", str(out)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    for name in WORLDS:
        # Records, not bytes: the container may legitimately be re-encoded one day.
        assert record_census(out / name).ids == record_census(FIXTURES / name).ids
        regenerated = {ck: rec for ck, (rec, _) in decoded_chunks(out / name).items()}
        committed = {ck: rec for ck, (rec, _) in decoded_chunks(FIXTURES / name).items()}
        assert regenerated == committed
    before = tree_digests(out, include_bookkeeping=True)
    again = subprocess.run(
        [sys.executable, str(script), "--out", str(out)], capture_output=True, text=True
    )
    assert again.returncode == 1 and "--force" in again.stderr
    assert tree_digests(out, include_bookkeeping=True) == before
