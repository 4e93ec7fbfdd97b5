"""Region rebuild (generator defaults, dynamic state gone) and whole-world regeneration."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from streamer.errors import StorageUnavailable
from streamer.format.journal import encode_frame
from streamer.format.manifest import WorldManifest
from streamer.format.region import decode_region, region_key
from streamer.recovery.check import check_world
from streamer.recovery.inactive import load_inactive
from streamer.recovery.incidents import IncidentLog
from streamer.recovery.ladder import recover_region
from streamer.recovery.rebuild import (
    journal_high_tick,
    rebuild_region,
    regenerate_world,
    region_in_bounds,
)
from streamer.recovery.snapshots import list_snapshots, snapshot_file_key
from streamer.runtime.journal import JournalBatch, encode_batch
from streamer.runtime.journal_drops import DROPS_KEY
from streamer.runtime.players import decode_players, encode_players
from streamer.schema.codec import ChunkCodec
from streamer.schema.deltas import TileSet
from streamer.storage.local import LocalStore
from streamer.worldgen import TerrainGenerator, params_from_dict
from tests.test_ladder import REGIONS, flip, integrity_error, populated

SEG = "journal/00000000000000000001.wal"


def journal_segment(ticks: list[int]) -> bytes:
    out = b""
    for seq, t in enumerate(ticks):
        batch = JournalBatch(seq=seq, deltas=[TileSet(tick=t, x=5, y=5, tile=3)])
        out += encode_frame(encode_batch(batch))
    return out


@pytest.fixture
async def store(tmp_path: Path) -> LocalStore:
    return await LocalStore.open(tmp_path / "w", fsync=False)


def generator(m: WorldManifest) -> TerrainGenerator:
    return TerrainGenerator(m.seed, params_from_dict(m.generator_params))


async def test_rebuild_inactive_region_defaults_only(store: LocalStore) -> None:
    m = await populated(store, seed=3)
    await store.put_atomic(SEG, journal_segment([11, 57, 12]))
    await store.put_atomic("players.idx", encode_players({"p-v1": (0, 0), "other": (1, 0)}))
    bad = flip((await store.get(region_key(0, 0))).data, 99)
    await store.put_atomic(region_key(0, 0), bad)
    log = IncidentLog(store)
    out = await recover_region(store, 0, 0, integrity_error(bad, 0, 0), manifest=m, incidents=log)
    assert out.action == "inactive"
    assert set(await load_inactive(store)) == {(0, 0)}

    res = await rebuild_region(store, m, 0, 0, incidents=log)

    assert await load_inactive(store) == {}
    assert res.was_inactive
    data = (await store.get(region_key(0, 0))).data
    rf = decode_region(data, rx=0, ry=0, path="r")
    # Journal replay must not resurrect the discarded deltas: lpt covers every journaled tick.
    assert rf.header.last_processed_tick >= 57
    assert res.last_processed_tick == rf.header.last_processed_tick
    gen = generator(m)
    codec = ChunkCodec(m.encoding)
    want_chunks = {
        (cx, cy)
        for cx in (0, 1)
        for cy in (0, 1)
        if gen.chunk_defaults(cx, cy, 2).npcs or gen.chunk_defaults(cx, cy, 2).features
    }
    assert set(rf.chunks) == want_chunks
    npcs = features = 0
    for (cx, cy), payload in rf.chunks.items():
        rec = codec.decode(payload, where="t").record
        d = gen.chunk_defaults(cx, cy, 2)
        assert rec.characters == d.npcs
        assert rec.features == d.features
        assert not rec.structures and not rec.societies and not rec.tile_idx
        assert all(c.player_id is None for c in rec.characters)
        assert rec.base_fingerprint == gen.fingerprint(cx, cy)
        npcs += len(rec.characters)
        features += len(rec.features)
    assert (res.npcs, res.features) == (npcs, features)
    assert npcs + features > 0  # the seed gives this region some defaults
    # Dynamic state gone, including the player index entry of the player who lived there.
    assert decode_players((await store.get("players.idx")).data) == {"other": (1, 0)}
    assert res.players_removed == ["p-v1"]
    # The damaged file went to quarantine in the ladder; nothing else was left behind.
    assert res.quarantine is None
    [inc] = [i for i in (await log.read()).incidents if i.kind == "region_rebuilt"]
    assert inc.region == (0, 0) and inc.details["was_inactive"] is True
    assert inc.details["players_removed"] == ["p-v1"]
    report = await check_world(store)
    assert report.healthy, report.problems


async def test_rebuild_healthy_region_quarantines_previous_file(store: LocalStore) -> None:
    m = await populated(store, seed=3)
    before = (await store.get(region_key(1, 0))).data
    log = IncidentLog(store)
    res = await rebuild_region(store, m, 1, 0, incidents=log)
    assert res.quarantine is not None
    assert (await store.get(res.quarantine)).data == before
    rf = decode_region((await store.get(region_key(1, 0))).data, rx=1, ry=0, path="r")
    assert rf.header.last_processed_tick >= 10  # never below the old file's
    assert rf.header.generation == 2
    assert not res.was_inactive
    # Others untouched.
    for k in REGIONS:
        if k != (1, 0):
            decode_region((await store.get(region_key(*k))).data, rx=k[0], ry=k[1], path="r")


async def test_rebuild_out_of_bounds_refused(store: LocalStore) -> None:
    m = await populated(store, seed=3)
    bounded = msgspec.structs.replace(m, bound_tiles=200)
    assert region_in_bounds(bounded, 0, 0) and region_in_bounds(bounded, -2, -2)
    assert not region_in_bounds(bounded, 2, 0) and not region_in_bounds(bounded, 0, -3)
    with pytest.raises(ValueError, match="outside this world"):
        await rebuild_region(store, bounded, 5, 0, incidents=IncidentLog(store))
    assert region_key(5, 0) not in await store.list("regions/")


async def test_journal_high_tick_ignores_torn_tail(store: LocalStore) -> None:
    await store.put_atomic(SEG, journal_segment([3, 9]) + b"JRNL\x00torn")
    assert await journal_high_tick(store) == 9
    await store.delete(SEG)
    assert await journal_high_tick(store) == -1


class _RegionDeleteFails(LocalStore):
    """Deleting a region file fails: regenerate stops after the lineage, before the regions."""

    async def delete(self, key: str) -> None:
        if key.startswith("regions/"):
            raise StorageUnavailable("injected: cannot delete", key=key)
        await super().delete(key)


async def test_a_regenerate_stopped_before_the_regions_go_has_dropped_the_old_drops_record(
    tmp_path: Path,
) -> None:
    """The record of what the old journal dropped goes before anything else does: stopped
    (or crashed) partway, the world never keeps old drops beside the ticks that start over,
    which would report losses that never happened; without a record a restore says unknown."""
    store = await _RegionDeleteFails.open(tmp_path / "w", fsync=False)
    m = await populated(store, seed=3)
    await store.put_atomic(DROPS_KEY, b"ticks the old journal dropped")
    with pytest.raises(StorageUnavailable, match="injected"):
        await regenerate_world(store, m, incidents=IncidentLog(store), keep=5)
    assert await store.list("regions/")  # stopped before them
    assert await store.list(DROPS_KEY) == []
    await store.aclose()


async def test_journal_high_tick_reads_only_what_open_replays(store: LocalStore) -> None:
    """A stray ``.wal`` (an operator's copy) is not a segment: its ticks are not the world's."""
    await store.put_atomic(SEG, journal_segment([3, 9]))
    await store.put_atomic("journal/old-copy.wal", journal_segment([500]))
    await store.put_atomic("journal/x/00000000000000000002.wal", journal_segment([700]))
    assert await journal_high_tick(store) == 9


async def test_regenerate_world(store: LocalStore) -> None:
    m = await populated(store, seed=3)
    await store.put_atomic(SEG, journal_segment([40, 41]))
    await store.put_atomic("players.idx", encode_players({"p": (0, 1)}))
    await store.put_atomic(DROPS_KEY, b"ticks the old journal dropped")
    bad = flip((await store.get(region_key(1, 0))).data, 120)
    await store.put_atomic(region_key(1, 0), bad)
    log = IncidentLog(store)

    res = await regenerate_world(store, m, incidents=log, keep=5)

    [snap] = await list_snapshots(store)
    assert snap.id == res.snapshot and snap.reason == "pre-regenerate"
    # The old world is in the snapshot (good files) and in quarantine (the damaged one).
    keys = {f.key for f in snap.files}
    assert {region_key(0, 0), region_key(0, 1), region_key(-1, -1), SEG, "players.idx"} <= keys
    assert region_key(1, 0) not in keys
    assert (await store.get(res.quarantined[region_key(1, 0)])).data == bad
    old = (await store.get(snapshot_file_key(snap.id, region_key(0, 0)))).data
    decode_region(old, rx=0, ry=0, path="r")
    # The world is clean.
    assert await store.list("regions/") == []
    assert await store.list("journal/") == []
    assert await store.list("players.idx") == []
    assert await store.list(DROPS_KEY) == []  # ticks start over: old drops mean nothing
    assert await load_inactive(store) == {}
    assert (res.regions_removed, res.journal_segments_removed, res.players_removed) == (4, 1, 1)
    report = await check_world(store)
    assert report.healthy and report.regions_checked == 0
    [inc] = [i for i in (await log.read()).incidents if i.kind == "world_regenerated"]
    assert inc.details["snapshot"] == snap.id
