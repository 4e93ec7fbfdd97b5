"""Lazy migration through the runtime (design §7): upgrade on load, write back at the next flush.

Region files are written here with chunk payloads in the shapes old code stored (plain dicts
encoded with ``msgspec.msgpack.encode``, never through the current record classes, which only
know current shapes; see ``scripts/make_fixtures.py``). Through ``open_world``:

- ``world.chunk`` returns the records upgraded (character v1 ``name`` → v3, society v1
  ``allies`` → v2 ``relations``);
- the region's next flush writes the upgraded records at the current versions, keeps the
  region's lastProcessedTick, and reuses every other chunk's payload byte for byte — including
  old chunks nobody loaded, which stay old until they are (lazy means lazy);
- a record newer than this code (schemaVersion 99) is refused with ``UnknownSchemaVersion``,
  never downgraded or overwritten, while other regions keep serving.

The refusal is per *region* (design §7): a region holding a record from newer code refuses to
load as a whole, so no delta can be queued against it that no flush could ever fold.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from streamer import Character, TileSet, open_world
from streamer.config import Config, RuntimeSettings
from streamer.errors import MalformedFile, UnknownSchemaVersion
from streamer.format.region import decode_region, encode_region, region_key
from streamer.migrate.verify import record_census
from streamer.schema.codec import ChunkCodec
from streamer.schema.records import CURRENT_VERSIONS, ChunkRecord
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world
from streamer.worldgen import GENERATOR_NAME, GENERATOR_VERSION, TerrainGenerator

FIXTURES = Path(__file__).parent / "fixtures"
SEED = 31
LPT = 40
# No timer flushes: each test says when the region is written back.
CONF = Config(runtime=RuntimeSettings(flush_interval_ms=600_000))
Raw = dict[str, Any]


def chunk_raw(gen: TerrainGenerator, cx: int, cy: int, **lists: list[Raw]) -> Raw:
    """A chunk as the first writer stored it: no ``record_versions``, old nested shapes."""
    return {
        "type": "chunk",
        "schemaVersion": 1,
        "cx": cx,
        "cy": cy,
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "base_fingerprint": gen.fingerprint(cx, cy),
        "tile_idx": (5).to_bytes(2, "little"),
        "tile_val": (4321).to_bytes(2, "little"),
        "characters": lists.get("characters", []),
        "structures": [],
        "features": [],
        "societies": lists.get("societies", []),
    }


def character_v1(rid: str, x: int, y: int, name: str, version: int = 1) -> Raw:
    return {
        "type": "character",
        "schemaVersion": version,
        "id": rid,
        "x": x,
        "y": y,
        "name": name,
        "inventory": {"wood": 3, "rope": 0},
        "hp": 77,
    }


def society_v1(rid: str, x: int, y: int, allies: list[str]) -> Raw:
    return {
        "type": "society",
        "schemaVersion": 1,
        "id": rid,
        "name": "North Watch",
        "x": x,
        "y": y,
        "members": ["ada"],
        "allies": allies,
    }


def write_region(root: Path, rx: int, ry: int, chunks: dict[tuple[int, int], bytes]) -> bytes:
    data = encode_region(
        rx=rx,
        ry=ry,
        last_processed_tick=LPT,
        generation=1,
        writer="old-code",
        encoding="msgpack",
        chunks=chunks,
        region_size=8,
    )
    (root / region_key(rx, ry)).write_bytes(data)
    return data


def region_chunks(root: Path, rx: int, ry: int) -> tuple[int, int, dict[tuple[int, int], bytes]]:
    key = region_key(rx, ry)
    rf = decode_region((root / key).read_bytes(), rx=rx, ry=ry, path=key)
    return rf.header.last_processed_tick, rf.header.generation, dict(rf.chunks)


def raw_of(payload: bytes) -> Raw:
    out: Raw = msgspec.msgpack.decode(payload)
    return out


async def empty_world(root: Path) -> None:
    """A new world at ``root`` with an empty regions directory (files are written by hand)."""
    store = await LocalStore.open(root, fsync=False)
    await create_world(store, seed=SEED)
    await store.aclose()
    (root / "regions").mkdir(exist_ok=True)


async def old_world(root: Path) -> dict[str, dict[tuple[int, int], bytes]]:
    """Region (0, 0): two old chunks and a current one; region (-1, 0): a v99 record."""
    await empty_world(root)
    gen = TerrainGenerator(SEED)
    codec = ChunkCodec("msgpack")
    current = ChunkRecord(
        cx=1,
        cy=0,
        generator=GENERATOR_NAME,
        generator_version=GENERATOR_VERSION,
        base_fingerprint=gen.fingerprint(1, 0),
        characters=[Character(id="cur", x=70, y=5, given_name="Cur")],
    )
    r00 = {
        (0, 0): msgspec.msgpack.encode(
            chunk_raw(
                gen,
                0,
                0,
                characters=[character_v1("ada", 10, 12, "Ada King Lovelace")],
                societies=[society_v1("soc-north", 30, 30, ["soc-river", "soc-river"])],
            )
        ),
        (1, 0): codec.encode(current),
        # Old too, but never loaded by the test: it must stay exactly as it is.
        (2, 0): msgspec.msgpack.encode(
            chunk_raw(gen, 2, 0, characters=[character_v1("bob", 130, 4, "Bob")])
        ),
    }
    r_neg = {
        (-1, 0): msgspec.msgpack.encode(
            chunk_raw(gen, -1, 0, characters=[character_v1("future", -5, 3, "F", version=99)])
        ),
        (-2, 0): msgspec.msgpack.encode(
            chunk_raw(gen, -2, 0, characters=[character_v1("old-neighbour", -100, 3, "N")])
        ),
    }
    write_region(root, 0, 0, r00)
    write_region(root, -1, 0, r_neg)
    return {"r00": r00, "r_neg": r_neg}


async def test_old_records_upgrade_on_load_and_are_written_back_at_flush(tmp_path: Path) -> None:
    payloads = await old_world(tmp_path)
    r00 = payloads["r00"]
    async with open_world(tmp_path, CONF) as world:
        chunk = await world.chunk(0, 0)
        [ada] = [c for c in chunk.entities if c.id == "ada"]
        assert ada.schemaVersion == CURRENT_VERSIONS["character"]
        assert (ada.given_name, ada.family_name, ada.hp) == ("Ada", "King Lovelace", 77)
        assert [(s.item, s.count) for s in ada.inventory] == [("wood", 3)]
        [soc] = chunk.societies
        assert soc.schemaVersion == CURRENT_VERSIONS["society"]
        assert soc.relations == {"soc-river": 100}
        assert int(chunk.tiles[0, 5]) == 4321  # tile edits survive the upgrade
        # (The load also woke the flush scheduler, which writes the upgrade back on its
        # own; see the next test. flush() makes it happen now.)
        await world.flush()
        lpt, generation, stored = region_chunks(tmp_path, 0, 0)
        assert (lpt, generation) == (LPT, 2)  # rewritten, lastProcessedTick kept
        raw = raw_of(stored[(0, 0)])
        assert raw["schemaVersion"] == CURRENT_VERSIONS["chunk"]
        assert raw["record_versions"] == {
            "character": CURRENT_VERSIONS["character"],
            "society": CURRENT_VERSIONS["society"],
        }
        assert [c["schemaVersion"] for c in raw["characters"]] == [CURRENT_VERSIONS["character"]]
        assert "name" not in raw["characters"][0]
        assert raw["societies"][0]["schemaVersion"] == CURRENT_VERSIONS["society"]
        assert "allies" not in raw["societies"][0]
        assert ChunkCodec("msgpack").decode(stored[(0, 0)], where="t").upgraded is False
        # Every other chunk's payload byte for byte: the current one and the old one that
        # was never loaded (it stays at v1 until something loads it).
        assert stored[(1, 0)] == r00[(1, 0)]
        assert stored[(2, 0)] == r00[(2, 0)]
        assert raw_of(stored[(2, 0)])["characters"][0]["schemaVersion"] == 1
        # A second flush has nothing left to upgrade: the file is not written again.
        flushes = world.stats().flushes
        await world.flush()
        assert world.stats().flushes == flushes
        assert region_chunks(tmp_path, 0, 0)[1] == 2
    async with open_world(tmp_path, CONF) as world:
        [ada2] = [c for c in (await world.chunk(0, 0)).entities if c.id == "ada"]
        assert ada2 == ada
        assert [c.id for c in (await world.chunk(2, 0)).entities] == ["bob"]
        assert [c.id for c in (await world.chunk(1, 0)).entities] == ["cur"]
    census = record_census(tmp_path)
    assert not census.duplicates
    assert census.versions[("character", CURRENT_VERSIONS["character"])] >= 3


async def test_the_next_flush_writes_back_even_with_no_edits_pending(tmp_path: Path) -> None:
    """The flush scheduler picks an upgraded region up by itself (no ``flush()`` call)."""
    await old_world(tmp_path)
    conf = Config(runtime=RuntimeSettings(flush_interval_ms=10))
    async with open_world(tmp_path, conf) as world:
        await world.chunk(0, 0)
        with anyio.fail_after(10):
            while region_chunks(tmp_path, 0, 0)[1] == 1:
                await anyio.sleep(0.01)
    raw = raw_of(region_chunks(tmp_path, 0, 0)[2][(0, 0)])
    assert raw["characters"][0]["schemaVersion"] == CURRENT_VERSIONS["character"]


async def test_a_newer_record_is_refused_and_never_overwritten(tmp_path: Path) -> None:
    payloads = await old_world(tmp_path)
    neg_before = (tmp_path / region_key(-1, 0)).read_bytes()
    async with open_world(tmp_path, CONF) as world:
        with pytest.raises(UnknownSchemaVersion) as info:
            await world.chunk(-1, 0)
        assert info.value.schema_version == 99
        assert info.value.record_type == "character"
        assert "(-1, 0)" in str(info.value)
        # Asked again: still refused (errors are not cached as chunks).
        with pytest.raises(UnknownSchemaVersion):
            await world.chunk(-1, 0)
        # Other regions keep serving, reads and writes.
        assert [c.id for c in (await world.chunk(0, 0)).entities] == ["ada"]
        await world.submit([TileSet(tick=LPT + 1, x=600, y=-600, tile=9)])
        await world.flush()
        assert int((await world.chunk(9, -10)).tiles[-600 % 64, 600 % 64]) == 9
        # The refused region was not rewritten (loading the neighbour upgraded nothing yet).
        assert (tmp_path / region_key(-1, 0)).read_bytes() == neg_before
    assert (tmp_path / region_key(-1, 0)).read_bytes() == neg_before
    async with open_world(tmp_path, CONF) as world:
        # The neighbour chunk in the same region is refused too: the region is refused whole.
        with pytest.raises(UnknownSchemaVersion) as info:
            await world.chunk(-2, 0)
        assert info.value.record_id == "future"
    assert (tmp_path / region_key(-1, 0)).read_bytes() == neg_before
    assert payloads["r_neg"]  # the fixture really wrote the region


async def test_fixture_world_v1_upgrades_lazily_through_open_world(tmp_path: Path) -> None:
    world_dir = shutil.copytree(FIXTURES / "world-v1", tmp_path / "w")
    before = record_census(world_dir)
    assert before.stale  # v1 records on disk
    stored_keys: list[tuple[int, int]] = []
    for p in sorted((world_dir / "regions").iterdir()):
        rx, ry = (int(v) for v in p.name.split(".")[1:3])
        stored_keys += list(region_chunks(world_dir, rx, ry)[2])
    async with open_world(world_dir, CONF) as world:
        chars = {}
        for cx, cy in stored_keys:
            for c in (await world.chunk(cx, cy)).entities:
                chars[c.id] = c
        ada = chars["player-ada"]
        assert (ada.given_name, ada.family_name, ada.schemaVersion) == ("Ada", "King Lovelace", 3)
        assert (chars["npc-anon"].given_name, chars["npc-anon"].family_name) == ("", "")
        await world.flush()
    after = record_census(world_dir)
    # Every record once, none lost, and nothing stale left among the chunks that loaded.
    assert set(after.ids) == set(before.ids)
    assert not after.duplicates
    assert not after.stale, after.stale
    async with open_world(world_dir, CONF) as world:
        again = {c.id: c for cx, cy in stored_keys for c in (await world.chunk(cx, cy)).entities}
        assert again["player-ada"] == ada


async def test_a_delta_into_a_chunk_with_a_newer_record_is_refused(tmp_path: Path) -> None:
    await old_world(tmp_path)
    neg_before = (tmp_path / region_key(-1, 0)).read_bytes()
    async with open_world(tmp_path, CONF) as world:
        with pytest.raises(UnknownSchemaVersion):
            await world.submit([TileSet(tick=LPT + 1, x=-60, y=3, tile=5)])
        # A batch touching it and a healthy region applies nothing (all-or-nothing).
        with pytest.raises(UnknownSchemaVersion):
            await world.submit(
                [
                    TileSet(tick=LPT + 1, x=600, y=3, tile=77),
                    TileSet(tick=LPT + 1, x=-60, y=3, tile=5),
                ]
            )
        assert int((await world.chunk(9, 0)).tiles[3, 600 % 64]) != 77
        await world.flush()
    assert (tmp_path / region_key(-1, 0)).read_bytes() == neg_before
    assert not any((tmp_path / "journal").glob("*.wal")) or all(
        p.stat().st_size == 0 for p in (tmp_path / "journal").glob("*.wal")
    )


def test_decode_current_never_migrates(monkeypatch: pytest.MonkeyPatch) -> None:
    """``decode_current`` (what a load's worker thread builds from) gives a current record
    as ``decode`` does, and ``None`` for an old, a newer or a malformed one, without running
    the registry: a record is migrated once, on the loop."""
    gen = TerrainGenerator(SEED)
    codec = ChunkCodec("msgpack")
    current = ChunkRecord(
        cx=1,
        cy=0,
        generator=GENERATOR_NAME,
        generator_version=GENERATOR_VERSION,
        base_fingerprint=gen.fingerprint(1, 0),
        characters=[Character(id="cur", x=70, y=5, given_name="Cur")],
    )
    old = msgspec.msgpack.encode(chunk_raw(gen, 0, 0, characters=[character_v1("a", 1, 2, "A")]))
    newer = msgspec.msgpack.encode(
        chunk_raw(gen, 0, 0, characters=[character_v1("f", 1, 2, "F", version=99)])
    )

    def no_migration(*args: object, **kwargs: object) -> object:
        raise AssertionError("decode_current ran the migration registry")

    monkeypatch.setattr("streamer.schema.codec.REGISTRY.upgrade_chunk", no_migration)
    payload = codec.encode(current)
    assert codec.decode_current(payload, where="t") == codec.decode(payload, where="t").record
    assert codec.decode_current(old, where="t") is None
    assert codec.decode_current(newer, where="t") is None
    assert codec.decode_current(b"\xc1 not msgpack", where="t") is None
    # The typed struct has defaults for ``type`` and ``schemaVersion``; a payload without
    # them is malformed for ``decode``, so ``decode_current`` must not take it either.
    for field in ("schemaVersion", "type"):
        raw = msgspec.msgpack.decode(payload)
        del raw[field]
        assert codec.decode_current(msgspec.msgpack.encode(raw), where="t") is None
    # Current versions but packed tiles out of shape: reported, naming where.
    raw = msgspec.msgpack.decode(payload)
    raw["tile_idx"], raw["tile_val"] = b"\x01\x00", b""
    with pytest.raises(MalformedFile, match="here"):
        codec.decode_current(msgspec.msgpack.encode(raw), where="here")
    monkeypatch.undo()
    assert codec.decode(old, where="t").upgraded  # ...which decode does migrate


async def test_loads_built_in_the_worker_thread_match_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A current chunk with nothing queued is built in the load's worker thread; an old one
    and one with queued deltas on the loop. Each gives what the chunk is, and the old
    record is migrated once, on the loop."""
    import streamer.runtime.world as world_mod

    built: dict[tuple[int, int], bool] = {}
    generate = world_mod._generate

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = generate(*args, **kwargs)
        built.update({k: v[2] is not None for k, v in out.items()})
        return out

    monkeypatch.setattr(world_mod, "_generate", spy)
    await old_world(tmp_path)
    async with open_world(tmp_path, CONF) as world:
        cur = await world.chunk(1, 0)
        assert [c.id for c in cur.entities] == ["cur"]
        old = await world.chunk(0, 0)
        assert [c.id for c in old.entities] == ["ada"]
        assert world._regions[(0, 0)].upgraded == {(0, 0)}
    assert built == {(1, 0): True, (0, 0): False}
    built.clear()
    async with open_world(tmp_path, CONF) as world:
        await world.submit([TileSet(tick=LPT + 1, x=64 + 7, y=3, tile=999)])
        queued = await world.chunk(1, 0)
        assert int(queued.tiles[3, 7]) == 999
        assert [c.id for c in queued.entities] == ["cur"]
    assert built == {(1, 0): False}


async def test_a_chunk_without_schema_version_is_refused_on_load(tmp_path: Path) -> None:
    """A stored chunk payload missing ``schemaVersion`` is a clear error at load, whichever
    thread would have built it, and the region's other chunks still load."""
    await empty_world(tmp_path)
    gen = TerrainGenerator(SEED)
    codec = ChunkCodec("msgpack")
    good = ChunkRecord(
        cx=1,
        cy=0,
        generator=GENERATOR_NAME,
        generator_version=GENERATOR_VERSION,
        base_fingerprint=gen.fingerprint(1, 0),
    )
    bad = msgspec.msgpack.decode(codec.encode(msgspec.structs.replace(good, cx=0)))
    bad["base_fingerprint"] = gen.fingerprint(0, 0)
    del bad["schemaVersion"]
    write_region(tmp_path, 0, 0, {(0, 0): msgspec.msgpack.encode(bad), (1, 0): codec.encode(good)})
    async with open_world(tmp_path, CONF) as world:
        with pytest.raises(MalformedFile, match=r"chunk \(0, 0\)"):
            await world.chunk(0, 0)
        assert (await world.chunk(1, 0)).cx == 1


async def test_a_chunk_built_in_the_thread_is_not_used_once_a_delta_queued_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delta acknowledged while the load's worker thread builds the chunk: the loop must
    not serve the thread's chunk (built without it), but build one with the delta."""
    import streamer.runtime.world as world_mod

    await empty_world(tmp_path)
    gen = TerrainGenerator(SEED)
    codec = ChunkCodec("msgpack")
    rec = ChunkRecord(
        cx=1,
        cy=0,
        generator=GENERATOR_NAME,
        generator_version=GENERATOR_VERSION,
        base_fingerprint=gen.fingerprint(1, 0),
    )
    write_region(tmp_path, 0, 0, {(1, 0): codec.encode(rec)})
    async with open_world(tmp_path, CONF) as world:
        prebuilt: list[bool] = []
        generate = world_mod._generate

        def spy(*args: Any, **kwargs: Any) -> Any:
            out = generate(*args, **kwargs)
            prebuilt.extend(v[2] is not None for v in out.values())
            # The shard server's edit lands while this thread still holds its result.
            anyio.from_thread.run(world.submit, [TileSet(tick=LPT + 1, x=64 + 5, y=9, tile=777)])
            return out

        monkeypatch.setattr(world_mod, "_generate", spy)
        chunk = await world.chunk(1, 0)
        assert prebuilt == [True]  # the thread did build it, without the edit
        assert int(chunk.tiles[9, 5]) == 777
        monkeypatch.undo()
        await world.flush()
    async with open_world(tmp_path, CONF) as world:
        assert int((await world.chunk(1, 0)).tiles[9, 5]) == 777


async def test_a_wrong_fingerprint_is_refused_for_a_chunk_built_in_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Edits stored on terrain the generator no longer makes: refused with IntegrityError
    also when the chunk was built in the load's worker thread."""
    import streamer.runtime.world as world_mod
    from streamer.errors import IntegrityError

    await empty_world(tmp_path)
    gen = TerrainGenerator(SEED)
    codec = ChunkCodec("msgpack")
    rec = ChunkRecord(
        cx=1,
        cy=0,
        generator=GENERATOR_NAME,
        generator_version=GENERATOR_VERSION,
        base_fingerprint=gen.fingerprint(1, 0) ^ 1,
    )
    write_region(tmp_path, 0, 0, {(1, 0): codec.encode(rec)})
    prebuilt: list[bool] = []
    generate = world_mod._generate

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = generate(*args, **kwargs)
        prebuilt.extend(v[2] is not None for v in out.values())
        return out

    monkeypatch.setattr(world_mod, "_generate", spy)
    async with open_world(tmp_path, CONF) as world:
        with pytest.raises(IntegrityError, match=r"chunk \(1, 0\)"):
            await world.chunk(1, 0)
    assert prebuilt == [True]


async def test_a_flush_looks_only_at_chunks_that_were_old_when_their_region_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading a region screens every chunk's versions anyway; the chunks found current then
    are never peeked at again by a flush's in-memory upgrade (on the event loop). The old
    ones still are, so a load racing the fold does not migrate them twice."""
    from streamer.runtime.live_migrate import upgrade_in_memory
    from streamer.runtime.regionstate import region_state_from_bytes

    payloads = await old_world(tmp_path)
    state = region_state_from_bytes((tmp_path / region_key(0, 0)).read_bytes(), (0, 0))
    assert state.current == {(1, 0)}
    assert set(state.chunks) == set(payloads["r00"])

    looked: list[tuple[int, int]] = []

    def recording(state: Any, keys: Any, codec: ChunkCodec) -> set[tuple[int, int]]:
        keys = list(keys)
        looked.extend(keys)
        return upgrade_in_memory(state, keys, codec)

    monkeypatch.setattr("streamer.runtime.flushing.upgrade_in_memory", recording)
    async with open_world(tmp_path, CONF) as world:
        await world.submit(
            [
                TileSet(tick=LPT + 1, x=cx * 64 + 1, y=cy * 64 + 1, tile=9)
                for cx, cy in payloads["r00"]
            ]
        )
        await world.flush()
        assert sorted(looked) == [(0, 0), (2, 0)]
        for cx, cy in payloads["r00"]:
            assert int((await world.chunk(cx, cy)).tiles[1, 1]) == 9
    lpt, _, chunks = region_chunks(tmp_path, 0, 0)
    assert lpt == LPT + 1
    codec = ChunkCodec("msgpack")
    assert not any(codec.decode(p, where="r").upgraded for p in chunks.values())
