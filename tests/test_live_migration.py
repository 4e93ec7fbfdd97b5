"""Live migration (``World.migrate``): lazy and batch at once, no record migrated twice or lost.

The world is written in the shapes old code stored (character v1, society v1, as plain dicts;
see ``scripts/make_fixtures.py``) with real terrain fingerprints, so the runtime serves it.
Every migration step is wrapped by a counting registry installed as the codec's registry,
which is the one both the runtime's lazy path and ``World.migrate`` use: the count per
``(record id, step)`` is how "migrated exactly once" is checked, whichever path did it.

While ``world.migrate()`` runs, players load chunks (lazy upgrade on load), deltas are
submitted (folded by routine flushes, which migrate the chunks they touch), and the flush
scheduler writes lazily upgraded regions back. Afterwards every region file is decoded.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from streamer import Character, TileSet, open_world
from streamer.config import Config, RuntimeSettings
from streamer.errors import MigrationFailed
from streamer.format.region import decode_region, encode_region, parse_region_key, region_key
from streamer.migrate.synth import character_raw, society_raw
from streamer.migrate.verify import record_census
from streamer.recovery.incidents import IncidentLog
from streamer.runtime.flushing import _FlushPath
from streamer.runtime.live_migrate import LiveMigrationFailed
from streamer.runtime.world import World
from streamer.schema.codec import ChunkCodec
from streamer.schema.deltas import EntityUpsert
from streamer.schema.migrations import MigrationRegistry, RawRecord, StepFn
from streamer.schema.records import CURRENT_VERSIONS
from streamer.schema.upgrades import character_v1_to_v2, character_v2_to_v3, society_v1_to_v2
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world, read_manifest
from streamer.worldgen import GENERATOR_NAME, GENERATOR_VERSION, TerrainGenerator

SEED = 31
LPT = 40
RS = 8
CHUNKS_PER_REGION = 3
#: A: players load it before and during the run; B: a delta is queued before the run;
#: C: loaded and written to during the run; D, F: written to; E: loaded; G, H: untouched.
REGIONS = {
    "A": (0, 0),
    "B": (1, 0),
    "C": (2, 0),
    "D": (0, 1),
    "E": (1, 1),
    "F": (-1, 0),
    "G": (2, 1),
    "H": (3, 0),
}
SHIPPED: dict[tuple[str, int], StepFn] = {
    ("character", 1): character_v1_to_v2,
    ("character", 2): character_v2_to_v3,
    ("society", 1): society_v1_to_v2,
}
Raw = dict[str, Any]


class CountingRegistry(MigrationRegistry):
    """The shipped steps, each call counted per ``(record id, type, from_version)``.

    ``fail``: the record id whose first step raises (a bad record / a buggy step).
    """

    def __init__(self, fail: str | None = None) -> None:
        super().__init__()
        self.calls: Counter[tuple[str, str, int]] = Counter()
        for (rtype, v), fn in SHIPPED.items():

            def step(rec: RawRecord, fn: StepFn = fn, rtype: str = rtype, v: int = v) -> RawRecord:
                rid = str(rec.get("id"))
                self.calls[(rid, rtype, v)] += 1
                if rid == fail and v == 1:
                    raise ValueError(f"injected fault for {rid}")
                return fn(rec)

            self.register(rtype, v, step)
        self.validate()


def chunk_keys(rx: int, ry: int) -> list[tuple[int, int]]:
    return [(rx * RS + i, ry * RS) for i in range(CHUNKS_PER_REGION)]


def old_chunk(gen: TerrainGenerator, cx: int, cy: int, rx: int, ry: int, i: int) -> Raw:
    chars = [
        character_raw(f"c-{cx}-{cy}-{k}", cx * 64 + 1 + 3 * k, cy * 64 + 2, 1, k + i)
        for k in range(2)
    ]
    socs = [society_raw(f"s-{rx}-{ry}", cx * 64 + 9, cy * 64 + 9, 1, ["s-x"])] if i == 0 else []
    return {
        "type": "chunk",
        "schemaVersion": 1,
        "cx": cx,
        "cy": cy,
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "base_fingerprint": gen.fingerprint(cx, cy),
        "tile_idx": (7).to_bytes(2, "little"),
        "tile_val": (1234).to_bytes(2, "little"),
        "characters": chars,
        "structures": [],
        "features": [],
        "societies": socs,
    }


async def old_world(root: Path) -> dict[tuple[str, str, int], int]:
    """Write the old world; return the steps its migration must run, each once."""
    store = await LocalStore.open(root, fsync=False)
    await create_world(store, seed=SEED, region_size=RS)
    await store.aclose()
    (root / "regions").mkdir(exist_ok=True)
    gen = TerrainGenerator(SEED)
    steps: dict[tuple[str, str, int], int] = {}
    for rx, ry in REGIONS.values():
        payloads: dict[tuple[int, int], bytes] = {}
        for i, (cx, cy) in enumerate(chunk_keys(rx, ry)):
            raw = old_chunk(gen, cx, cy, rx, ry, i)
            payloads[(cx, cy)] = msgspec.msgpack.encode(raw)
            for c in raw["characters"]:
                steps[(c["id"], "character", 1)] = 1
                steps[(c["id"], "character", 2)] = 1
            for s in raw["societies"]:
                steps[(s["id"], "society", 1)] = 1
        data = encode_region(
            rx=rx,
            ry=ry,
            last_processed_tick=LPT,
            generation=1,
            writer="old-code",
            encoding="msgpack",
            chunks=payloads,
            region_size=RS,
        )
        (root / region_key(rx, ry)).write_bytes(data)
    return steps


def region_bytes(root: Path) -> dict[str, bytes]:
    """Every region file (not the temporary files of a write in progress)."""
    out = {}
    for p in sorted((root / "regions").iterdir()):
        key = f"regions/{p.name}"
        coords = parse_region_key(key)
        if coords is not None and region_key(*coords) == key:
            out[key] = p.read_bytes()
    return out


def region_is_current(key: str, data: bytes) -> bool:
    """Every chunk of the file decodes as current (no migration would run)."""
    coords = parse_region_key(key)
    assert coords is not None
    rf = decode_region(data, rx=coords[0], ry=coords[1], path=key)
    codec = ChunkCodec("msgpack")
    return not any(codec.decode(p, where=key).upgraded for p in rf.chunks.values())


def tile_of(x: int, y: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return (x // 64, y // 64), (y % 64, x % 64)


async def test_lazy_and_batch_at_once_migrate_every_record_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected_steps = await old_world(tmp_path)
    before = record_census(tmp_path)
    old_ids = {k for k in before.ids if k[0] != "chunk"}
    assert len(old_ids) == len(REGIONS) * (2 * CHUNKS_PER_REGION + 1)
    reg = CountingRegistry()
    monkeypatch.setattr("streamer.schema.codec.REGISTRY", reg)
    # Short interval: routine flushes fold deltas and write lazy upgrades back meanwhile.
    conf = Config(runtime=RuntimeSettings(flush_interval_ms=20))

    tiles: dict[tuple[int, int], int] = {}
    new_ids: list[str] = []
    tick = LPT

    def region_chunk(name: str, i: int) -> tuple[int, int]:
        return chunk_keys(*REGIONS[name])[i]

    async def submit_tile(world: World, ck: tuple[int, int], tile: int) -> None:
        nonlocal tick
        tick += 1
        x, y = ck[0] * 64 + 20 + tile % 30, ck[1] * 64 + 30
        batch: list[Any] = [TileSet(tick=tick, x=x, y=y, tile=tile)]
        rid = None
        if tile % 3 == 0:
            rid = f"new-{tile}"
            batch.append(EntityUpsert(tick=tick, character=Character(id=rid, x=x, y=y + 1)))
        await world.submit(batch)
        tiles[(x, y)] = tile  # acknowledged
        if rid is not None:
            new_ids.append(rid)

    async with open_world(tmp_path, conf) as world:
        # Before the run: A has a lazily upgraded chunk, B a queued delta (both resident).
        await world.chunk(*region_chunk("A", 0))
        await submit_tile(world, region_chunk("B", 0), 1)

        report: Any = None

        async def migrate() -> None:
            nonlocal report
            report = await world.migrate(jobs=2)

        async def players() -> None:
            for _ in range(3):
                for name in ("A", "C", "E"):
                    for i in range(CHUNKS_PER_REGION):
                        await world.chunk(*region_chunk(name, i))
                        await anyio.sleep(0.002)

        async def writer() -> None:
            targets = [
                region_chunk("B", 0),
                region_chunk("C", 1),
                region_chunk("C", 2),
                region_chunk("D", 0),
                region_chunk("F", 2),
            ]
            for n in range(2, 42):
                await submit_tile(world, targets[n % len(targets)], n)
                await anyio.sleep(0.001)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                tg.start_soon(players)
                tg.start_soon(migrate)

        assert report is not None and report.status == "completed"
        assert report.snapshot_id is not None
        assert report.regions_total == len(REGIONS)
        # Both paths ran: B's unloaded chunks were upgraded in memory, G and H on file.
        assert report.regions_in_memory >= 1
        assert report.regions_on_file >= 2
        # Every file is current when migrate() returns, before any further flush.
        for key, data in region_bytes(tmp_path).items():
            assert region_is_current(key, data), key
        # Acknowledged deltas are served.
        for (x, y), tile in tiles.items():
            ck, (ly, lx) = tile_of(x, y)
            assert int((await world.chunk(*ck)).tiles[ly, lx]) == tile
        # A second run finds everything current: nothing read is migrated, nothing written.
        again = await world.migrate()
        assert (again.regions_rewritten, again.records_upgraded) == (0, 0)

    # Each old record's steps ran exactly once in total, across the lazy path, the routine
    # flushes and the live batch; and no step ran for anything else.
    assert dict(reg.calls) == expected_steps
    assert sum(n for (_, _, v), n in reg.calls.items() if v == 1) == len(old_ids)

    after = record_census(tmp_path)
    assert not after.duplicates, after.duplicates
    assert not after.stale, after.stale
    ids = {k for k in after.ids if k[0] != "chunk"}
    assert old_ids <= ids  # none lost
    assert {("character", rid) for rid in new_ids} <= ids
    for key, data in region_bytes(tmp_path).items():
        assert region_is_current(key, data), key
    store = await LocalStore.open(tmp_path, fsync=False)
    try:
        manifest = await read_manifest(store)
    finally:
        await store.aclose()
    assert manifest.record_versions["character"] == CURRENT_VERSIONS["character"]
    assert manifest.record_versions["society"] == CURRENT_VERSIONS["society"]

    # Reopened: every acknowledged delta is there, and reading migrates nothing.
    reg.calls.clear()
    async with open_world(tmp_path, conf) as world:
        for (x, y), tile in tiles.items():
            ck, (ly, lx) = tile_of(x, y)
            assert int((await world.chunk(*ck)).tiles[ly, lx]) == tile
        for name, (rx, ry) in REGIONS.items():
            for ck in chunk_keys(rx, ry):
                ents = {c.id: c for c in (await world.chunk(*ck)).entities}
                for k in range(2):
                    c = ents[f"c-{ck[0]}-{ck[1]}-{k}"]
                    assert c.schemaVersion == CURRENT_VERSIONS["character"], name
                    assert c.given_name.startswith("Npc")
    assert not reg.calls


@pytest.mark.parametrize("where", ["on_file", "in_memory"])
async def test_a_failing_record_halts_the_live_run_without_rollback(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    await old_world(tmp_path)
    # The last region in the run's order fails, so earlier ones are migrated first (jobs=1).
    last = max(REGIONS.values(), key=lambda r: region_key(*r))
    bad_chunk = chunk_keys(*last)[1]
    bad_id = f"c-{bad_chunk[0]}-{bad_chunk[1]}-0"
    reg = CountingRegistry(fail=bad_id)
    monkeypatch.setattr("streamer.schema.codec.REGISTRY", reg)
    conf = Config(runtime=RuntimeSettings(flush_interval_ms=600_000))
    before = region_bytes(tmp_path)
    bad_key = region_key(*last)

    async with open_world(tmp_path, conf) as world:
        if where == "in_memory":
            await world.chunk(*chunk_keys(*last)[0])  # resident; the bad chunk is not loaded
        with caplog.at_level(logging.ERROR), pytest.raises(LiveMigrationFailed) as info:
            await world.migrate(jobs=1)
        err = info.value
        assert isinstance(err, MigrationFailed)
        assert (err.record_id, err.record_type, err.schema_version) == (bad_id, "character", 1)
        report = err.report
        assert report.status == "failed" and not report.rolled_back
        assert report.regions_rewritten >= 1
        assert report.incident_id is not None
        assert any(
            bad_id in r.getMessage() and "schemaVersion=1" in r.getMessage() for r in caplog.records
        )
        # Nothing inactive; the world still serves reads and takes writes everywhere, and
        # the other records of the failing region are still served (lazily upgraded).
        assert world.inactive_regions == frozenset()
        good = chunk_keys(*last)[0]
        assert {c.id for c in (await world.chunk(*good)).entities} == {
            f"c-{good[0]}-{good[1]}-{k}" for k in range(2)
        }
        with pytest.raises(MigrationFailed):
            await world.chunk(*bad_chunk)  # the lazy path refuses the same record
        await world.submit([TileSet(tick=LPT + 1, x=5, y=5, tile=99)])
        await world.flush()
        assert int((await world.chunk(0, 0)).tiles[5, 5]) == 99

    # Regions already migrated are valid current-version data; the failing region's file
    # is as it was (in memory it may hold upgraded chunks, written by later flushes); the
    # rest are old but intact. Every record is there exactly once.
    after = region_bytes(tmp_path)
    migrated = [k for k in after if k != bad_key and region_is_current(k, after[k])]
    assert migrated
    for key, data in after.items():
        if key == bad_key:
            rf_before = decode_region(before[key], rx=last[0], ry=last[1], path=key)
            rf_after = decode_region(data, rx=last[0], ry=last[1], path=key)
            assert rf_after.chunks[bad_chunk] == rf_before.chunks[bad_chunk]
        elif key not in migrated:
            assert data == before[key]
    census = record_census(tmp_path)
    assert not census.duplicates
    assert len([k for k in census.ids if k[0] != "chunk"]) == len(REGIONS) * 7
    # No record outside the failing region was migrated twice. (The batch step's work on the
    # failing region is discarded whole, as in the closed-world batch, so the lazy reads
    # above migrate that region's good chunk again, and retry the bad record each time.)
    bad_ids = {f"c-{cx}-{cy}-{k}" for cx, cy in chunk_keys(*last) for k in range(2)}
    bad_ids.add(f"s-{last[0]}-{last[1]}")
    assert max(n for k, n in reg.calls.items() if k[0] not in bad_ids) == 1

    store = await LocalStore.open(tmp_path, fsync=False)
    try:
        scan = await IncidentLog(store).read()
    finally:
        await store.aclose()
    [inc] = [i for i in scan.incidents if i.kind == "migration_failed"]
    assert inc.id == report.incident_id
    assert inc.details["record_id"] == bad_id
    assert inc.details["record_type"] == "character"
    assert inc.details["schema_version"] == 1
    assert inc.details["rolled_back"] is False and inc.details["live"] is True
    assert inc.file == bad_key


async def test_a_load_during_a_fold_does_not_migrate_a_chunk_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime alone: while a flush folds a delta into an old chunk (held busy here),
    players load that chunk and another old one of the region. Each record is migrated once:
    the fold's chunks are upgraded before the hop, and the other chunk's upgraded payload
    survives the fold's installation and is written by the next flush."""
    await old_world(tmp_path)
    reg = CountingRegistry()
    monkeypatch.setattr("streamer.schema.codec.REGISTRY", reg)
    folding = anyio.Event()

    fold = _FlushPath._fold

    async def slow_fold(self: World, jobs: list[Any]) -> None:
        # The fold has read (and migrated, if still old) every chunk it touches; the loop
        # serves loads while the fold is still busy (as a long fold in a thread would be).
        await fold(self, jobs)
        folding.set()
        await anyio.sleep(0.3)

    monkeypatch.setattr(_FlushPath, "_fold", slow_fold)
    conf = Config(runtime=RuntimeSettings(flush_interval_ms=600_000))
    a0, a1, a2 = chunk_keys(*REGIONS["A"])
    async with open_world(tmp_path, conf) as world:
        await world.submit([TileSet(tick=LPT + 1, x=a0[0] * 64 + 3, y=a0[1] * 64 + 4, tile=5)])
        async with anyio.create_task_group() as tg:
            tg.start_soon(world.flush)
            await folding.wait()
            await world.chunk(*a0)  # folded right now
            await world.chunk(*a1)  # not part of this fold
        assert int((await world.chunk(*a0)).tiles[4, 3]) == 5
        await world.flush()
        await world.chunk(*a2)
    assert max(reg.calls.values()) == 1
    ids = {rid for rid, _, _ in reg.calls}
    assert ids == {f"c-{cx}-{cy}-{k}" for cx, cy in (a0, a1, a2) for k in range(2)} | {"s-0-0"}
    key = region_key(*REGIONS["A"])
    assert region_is_current(key, region_bytes(tmp_path)[key])


async def test_an_unexpected_error_in_a_region_halts_the_live_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a record failure (a bug in a region's step): the live run halts and reports it as
    a failure, as the batch run does; it does not escape as a bare error, and the world
    keeps serving and taking writes."""
    from streamer.runtime import live_migrate

    await old_world(tmp_path)
    real = live_migrate._LiveRun.region
    calls = 0

    async def flaky(self: Any, key: str, rx: int, ry: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("region step exploded")
        await real(self, key, rx, ry)

    monkeypatch.setattr(live_migrate._LiveRun, "region", flaky)
    conf = Config(runtime=RuntimeSettings(flush_interval_ms=600_000))
    async with open_world(tmp_path, conf) as world:
        with pytest.raises(LiveMigrationFailed) as info:
            await world.migrate(jobs=1)
        report = info.value.report
        assert report.status == "failed" and not report.rolled_back
        assert report.failures and report.failures[0].error_type == "RuntimeError"
        assert calls == 2  # halted: no region after the failing one was started (jobs=1)
        await world.submit([TileSet(tick=LPT + 1, x=5, y=5, tile=99)])
        await world.flush()
        assert int((await world.chunk(0, 0)).tiles[5, 5]) == 99
    census = record_census(tmp_path)
    assert not census.duplicates
    assert len([k for k in census.ids if k[0] != "chunk"]) == len(REGIONS) * 7
