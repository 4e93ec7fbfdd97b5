"""The recovery ladder: restore from the newest valid snapshot copy, or isolate and report."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import msgspec
import pytest

from streamer.errors import IntegrityError
from streamer.format.manifest import WorldManifest
from streamer.format.region import decode_region, encode_region, region_key
from streamer.recovery.inactive import (
    INACTIVE_KEY,
    InactiveRegion,
    check_inactive,
    decode_inactive,
    encode_inactive,
    inactive_from_incidents,
    load_inactive,
    mark_inactive,
    reactivate,
)
from streamer.recovery.incidents import Incident, IncidentLog
from streamer.recovery.ladder import recover_region
from streamer.recovery.snapshots import create_snapshot, snapshot_file_key
from streamer.schema.codec import ChunkCodec
from streamer.schema.records import Character, ChunkRecord, Feature, Society, Structure
from streamer.storage.base import BlobStore
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world

# --- helpers shared with the other recovery test modules -------------------------------------


async def make_world(
    store: BlobStore, *, seed: int = 7, region_size: int = 2, encoding: str = "msgpack"
) -> WorldManifest:
    return await create_world(
        store,
        seed=seed,
        region_size=region_size,
        encoding=encoding,  # type: ignore[arg-type]
    )


def chunk_record(cx: int, cy: int, tag: str) -> ChunkRecord:
    return ChunkRecord(
        cx=cx,
        cy=cy,
        generator="test",
        generator_version=1,
        base_fingerprint=cx * 1000 + cy,
        tile_idx=b"\x01\x00\x02\x00",
        tile_val=b"\x07\x00\x08\x00",
        characters=[Character(id=f"c-{tag}-{cx}-{cy}", x=cx * 64, y=cy * 64, player_id=f"p-{tag}")],
        structures=[Structure(id=f"s-{tag}-{cx}-{cy}", kind="hut", x=cx * 64 + 1, y=cy * 64)],
        features=[Feature(id=f"f-{tag}-{cx}-{cy}", kind="tree", x=cx * 64 + 2, y=cy * 64)],
        societies=[Society(id=f"soc-{tag}-{cx}-{cy}", name="S", x=cx * 64, y=cy * 64 + 3)],
    )


def region_bytes(
    manifest: WorldManifest, rx: int, ry: int, *, tag: str, lpt: int, generation: int = 1
) -> bytes:
    rs = manifest.region_size
    codec = ChunkCodec(manifest.encoding)
    chunks = {
        (cx, cy): codec.encode(chunk_record(cx, cy, tag))
        for cx in range(rx * rs, rx * rs + rs)
        for cy in range(ry * rs, ry * rs + rs)
    }
    return encode_region(
        rx=rx,
        ry=ry,
        last_processed_tick=lpt,
        generation=generation,
        writer="test",
        encoding=manifest.encoding,
        chunks=chunks,
        region_size=rs,
    )


def flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x40
    return bytes(b)


def integrity_error(data: bytes, rx: int, ry: int) -> IntegrityError:
    try:
        decode_region(data, rx=rx, ry=ry, path=region_key(rx, ry))
    except IntegrityError as exc:
        return exc
    raise AssertionError("data verifies")


def region_ids(data: bytes, rx: int, ry: int, encoding: str = "msgpack") -> set[str]:
    rf = decode_region(data, rx=rx, ry=ry, path="x")
    codec = ChunkCodec(encoding)  # type: ignore[arg-type]
    ids: set[str] = set()
    for key, payload in rf.chunks.items():
        rec = codec.decode(payload, where=str(key)).record
        ids.update(c.id for c in rec.characters)
        ids.update(s.id for s in rec.structures)
    return ids


REGIONS = [(0, 0), (1, 0), (0, 1), (-1, -1)]


async def populated(store: BlobStore, seed: int = 7) -> WorldManifest:
    m = await make_world(store, seed=seed)
    for rx, ry in REGIONS:
        await store.put_atomic(region_key(rx, ry), region_bytes(m, rx, ry, tag="v1", lpt=10))
    return m


@pytest.fixture
async def store(tmp_path: Path) -> LocalStore:
    return await LocalStore.open(tmp_path / "w", fsync=False)


def by_kind(incidents: list[Incident], kind: str) -> list[Incident]:
    return [i for i in incidents if i.kind == kind]


# --- restore from a snapshot -----------------------------------------------------------------


async def test_corrupt_region_restored_from_newest_valid_snapshot(
    store: LocalStore, caplog: pytest.LogCaptureFixture
) -> None:
    m = await populated(store)
    old = await create_snapshot(store, keep=5, reason="t1")
    # Second snapshot with newer content, whose copy of (0, 0) is then damaged: the ladder
    # must skip it and take the older intact copy.
    v2 = region_bytes(m, 0, 0, tag="v2", lpt=20, generation=2)
    await store.put_atomic(region_key(0, 0), v2)
    newer = await create_snapshot(store, keep=5, reason="t2")
    snap_copy = snapshot_file_key(newer.id, region_key(0, 0))
    await store.put_atomic(snap_copy, flip(v2, 200))
    v3 = region_bytes(m, 0, 0, tag="v3", lpt=30, generation=3)
    bad = flip(v3, len(v3) // 2)
    await store.put_atomic(region_key(0, 0), bad)
    others = {k: (await store.get(region_key(*k))).data for k in REGIONS[1:]}

    log = IncidentLog(store)
    err = integrity_error(bad, 0, 0)
    with caplog.at_level(logging.ERROR, logger="streamer.recovery.ladder"):
        outcome = await recover_region(store, 0, 0, err, manifest=m, incidents=log)

    assert outcome.action == "restored"
    assert outcome.snapshot == old.id
    restored = (await store.get(region_key(0, 0))).data
    rf = decode_region(restored, rx=0, ry=0, path="r")
    assert rf.header.last_processed_tick == 10
    assert rf.header.generation > 3  # generations only grow
    assert region_ids(restored, 0, 0) == region_ids(region_bytes(m, 0, 0, tag="v1", lpt=10), 0, 0)
    assert outcome.quarantine is not None and outcome.quarantine.startswith("quarantine/")
    assert (await store.get(outcome.quarantine)).data == bad
    for k, data in others.items():
        assert (await store.get(region_key(*k))).data == data

    scan = await log.read()
    failure = by_kind(scan.incidents, "checksum_failure")
    restore = by_kind(scan.incidents, "restored_from_snapshot")
    assert len(failure) == 1 and len(restore) == 1
    d = restore[0].details
    assert restore[0].region == (0, 0)
    assert d["snapshot"] == old.id
    assert d["quarantine"] == outcome.quarantine
    assert d["expected"] == err.expected and d["actual"] == err.actual
    assert d["snapshot_last_processed_tick"] == 10
    assert d["damaged_last_processed_tick"] == 30
    assert "10 < t <= 30" in d["lost"]
    # Salvage of the damaged file: every chunk but the damaged one is recoverable.
    assert d["salvageable"]["intact_chunks"] == 3
    assert failure[0].details["detected_at"]
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        region_key(0, 0) in msg and str(err.expected) in msg and str(err.actual) in msg
        for msg in messages
    )
    assert await load_inactive(store) == {}


async def test_concurrent_ladders_for_one_region_restore_once(store: LocalStore) -> None:
    m = await populated(store)
    await create_snapshot(store, keep=5)
    bad = flip((await store.get(region_key(1, 0))).data, 100)
    await store.put_atomic(region_key(1, 0), bad)
    err = integrity_error(bad, 1, 0)
    log = IncidentLog(store)
    outcomes = []

    async def run() -> None:
        outcomes.append(await recover_region(store, 1, 0, err, manifest=m, incidents=log))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        tg.start_soon(run)
    assert sorted(o.action for o in outcomes) == ["already_recovered", "restored"]
    scan = await log.read()
    assert len(by_kind(scan.incidents, "restored_from_snapshot")) == 1
    assert len(await store.list("quarantine/")) == 1


async def test_file_that_verifies_on_reread_is_still_an_incident(store: LocalStore) -> None:
    m = await populated(store)
    good = (await store.get(region_key(0, 1))).data
    err = integrity_error(flip(good, 300), 0, 1)
    log = IncidentLog(store)
    outcome = await recover_region(store, 0, 1, err, manifest=m, incidents=log)
    assert outcome.action == "already_recovered"
    assert outcome.incidents
    [inc] = (await log.read()).incidents
    assert inc.kind == "checksum_failure" and inc.details["reread_verifies"] is True
    assert (await store.get(region_key(0, 1))).data == good


# --- no valid copy: isolate -----------------------------------------------------------------


async def test_all_snapshots_corrupt_region_inactive_and_loss_reported(
    store: LocalStore, caplog: pytest.LogCaptureFixture
) -> None:
    m = await populated(store)
    s1 = await create_snapshot(store, keep=5, reason="a")
    s2 = await create_snapshot(store, keep=5, reason="b")
    for sid in (s1.id, s2.id):
        key = snapshot_file_key(sid, region_key(0, 0))
        await store.put_atomic(key, flip((await store.get(key)).data, 150))
    data = (await store.get(region_key(0, 0))).data
    # Damage one chunk frame only: the other three chunks' records are salvageable.
    rf = decode_region(data, rx=0, ry=0, path="r")
    entry = rf.header.chunks[0]
    bad = flip(data, entry.offset + entry.length - 3)
    await store.put_atomic(region_key(0, 0), bad)
    others = {k: (await store.get(region_key(*k))).data for k in REGIONS[1:]}
    log = IncidentLog(store)

    with caplog.at_level(logging.ERROR, logger="streamer.recovery.ladder"):
        outcome = await recover_region(
            store, 0, 0, integrity_error(bad, 0, 0), manifest=m, incidents=log
        )

    assert outcome.action == "inactive"
    assert region_key(0, 0) not in await store.list("regions/")
    assert outcome.quarantine is not None
    assert (await store.get(outcome.quarantine)).data == bad
    inactive = await load_inactive(store)
    assert set(inactive) == {(0, 0)}

    scan = await log.read()
    [loss] = by_kind(scan.incidents, "data_loss")
    [gone] = by_kind(scan.incidents, "region_inactive")
    assert inactive[(0, 0)].incident == loss.id
    assert gone.details["incident"] == loss.id
    d = loss.details
    assert sorted(d["snapshot_ids"]) == sorted([s1.id, s2.id])
    assert d["quarantine"] == outcome.quarantine
    assert loss.file == region_key(0, 0) and loss.region == (0, 0)
    salv = d["salvageable"]
    assert salv["intact_chunks"] == 3
    assert salv["counts"]["character"] == 3
    lost_chunk = (entry.cx, entry.cy)
    expected_chars = {f"c-v1-{cx}-{cy}" for cx in (0, 1) for cy in (0, 1) if (cx, cy) != lost_chunk}
    assert set(salv["ids"]["character"]) == expected_chars
    assert "all dynamic state" in d["lost"]
    assert "streamer region rebuild" in loss.action
    # Other regions untouched and still decode.
    for k, before in others.items():
        now = (await store.get(region_key(*k))).data
        assert now == before
        decode_region(now, rx=k[0], ry=k[1], path="r")
    assert any("no valid copy" in r.getMessage() for r in caplog.records)

    # A second ladder call (another chunk of the region failing) changes nothing.
    again = await recover_region(store, 0, 0, integrity_error(bad, 0, 0), manifest=m, incidents=log)
    assert again.action == "inactive"
    assert len((await log.read()).incidents) == len(scan.incidents)


async def test_no_snapshots_at_all(store: LocalStore) -> None:
    m = await populated(store)
    bad = b"garbage" * 10
    await store.put_atomic(region_key(-1, -1), bad)
    log = IncidentLog(store)
    out = await recover_region(
        store, -1, -1, integrity_error(bad, -1, -1), manifest=m, incidents=log
    )
    assert out.action == "inactive"
    [loss] = by_kind((await log.read()).incidents, "data_loss")
    assert loss.details["snapshot_ids"] == []
    assert loss.details["damaged_file"]["header"] is None
    assert loss.details["salvageable"]["counts"] == {}


# --- inactive list -------------------------------------------------------------------------


async def test_inactive_list_roundtrip_and_fail_closed(store: LocalStore) -> None:
    await make_world(store)
    assert await mark_inactive(store, 3, -4, incident="i1", reason="r") is False
    assert await mark_inactive(store, 0, 0, incident="i2", reason="r2") is False
    got = await load_inactive(store)
    assert set(got) == {(3, -4), (0, 0)} and got[(3, -4)].incident == "i1"
    raw = msgspec.json.decode((await store.get(INACTIVE_KEY)).data)
    assert set(raw) == {"3.-4", "0.0"} and raw["3.-4"]["incident"] == "i1"
    assert await reactivate(store, 3, -4) is True
    assert await reactivate(store, 3, -4) is False
    assert set(await load_inactive(store)) == {(0, 0)}

    # Damage is refused, never read as "nothing inactive".
    data = (await store.get(INACTIVE_KEY)).data
    await store.put_atomic(INACTIVE_KEY, data.replace(b"r2", b"r3"))
    with pytest.raises(IntegrityError):
        await load_inactive(store)
    from streamer.recovery.check import CheckReport

    report = CheckReport(world="w")
    await check_inactive(store, await make_manifest_stub(), report)
    assert report.problems and report.problems[0].file == INACTIVE_KEY


async def make_manifest_stub() -> WorldManifest:
    from streamer.storage.memory import MemoryStore

    return await make_world(MemoryStore())


async def test_concurrent_marks_lose_nothing(store: LocalStore) -> None:
    await make_world(store)

    async def mark(i: int) -> None:
        await mark_inactive(store, i, 0, incident=f"i{i}", reason="r")

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(mark, i)
    assert set(await load_inactive(store)) == {(i, 0) for i in range(8)}


def test_entry_moved_to_another_region_does_not_verify() -> None:
    blob = encode_inactive({(1, 2): InactiveRegion(incident="x", since="t", reason="r")})
    with pytest.raises(IntegrityError):
        decode_inactive(blob.replace(b'"1.2"', b'"2.1"'))


def test_inactive_from_incidents_replays_history() -> None:
    def inc(kind: str, region: tuple[int, int] | None, n: int) -> Incident:
        return Incident(id=f"i{n}", time=f"t{n}", kind=kind, region=region, details={})

    history = [
        inc("region_inactive", (0, 0), 1),
        inc("region_inactive", (1, 1), 2),
        inc("region_rebuilt", (0, 0), 3),
        inc("region_inactive", (2, 2), 4),
    ]
    assert set(inactive_from_incidents(history)) == {(1, 1), (2, 2)}
    assert inactive_from_incidents([*history, inc("world_regenerated", None, 5)]) == {}
