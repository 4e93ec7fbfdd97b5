"""Corruption fuzz against detection and the recovery ladder.

Every mutation of a stored file must be detected. Region files are checked through the
detector itself (``decode_region``, what every load runs) for most mutations, and a sample
goes through the whole ladder: where a valid snapshot copy exists the region must come back
with the snapshot's content; otherwise it must be inactive with a ``data_loss`` incident, and
every other region must still decode unchanged. The manifest, journal segments, snapshot
files and the incident log are mutated and must be caught by ``check_world`` with the
extra checks their modules provide.

Default: 10,000 region mutations + 100 per other file kind + a ladder sample of 300.
``--torture`` multiplies everything by 10.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

import msgspec
import pytest

from streamer.errors import IntegrityError, UnsupportedFormat
from streamer.format.journal import encode_frame
from streamer.format.manifest import MANIFEST_KEY, decode_manifest
from streamer.format.region import decode_region, region_key
from streamer.recovery.check import check_world
from streamer.recovery.inactive import load_inactive
from streamer.recovery.incidents import (
    INCIDENTS_KEY,
    IncidentLog,
    check_incident_log,
    parse_incidents,
)
from streamer.recovery.ladder import recover_region
from streamer.recovery.snapshots import create_snapshot, snapshot_check, snapshot_file_key
from streamer.runtime.journal import JournalBatch, encode_batch
from streamer.schema.deltas import TileSet
from streamer.storage.memory import MemoryStore
from tests.test_ladder import make_world, region_bytes

REGIONS = [(0, 0), (1, 0), (0, 1), (-1, 0), (2, -3), (-1, -1)]
SEGMENTS = ["journal/00000000000000000001.wal", "journal/00000000000000000002.wal"]

Mutation = Callable[[random.Random, bytes], bytes]


def _flip(rng: random.Random, d: bytes) -> bytes:
    b = bytearray(d)
    for _ in range(rng.choice((1, 1, 2, 3))):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _overwrite(rng: random.Random, d: bytes) -> bytes:
    b = bytearray(d)
    i = rng.randrange(len(b))
    n = rng.randint(1, 16)
    b[i : i + n] = bytes(rng.getrandbits(8) for _ in range(len(b[i : i + n])))
    return bytes(b)


def _zero(rng: random.Random, d: bytes) -> bytes:
    i = rng.randrange(len(d))
    n = rng.randint(1, 512)
    return d[:i] + b"\0" * len(d[i : i + n]) + d[i + n :]


def _truncate(rng: random.Random, d: bytes) -> bytes:
    return d[: rng.randrange(len(d))]


def _extend(rng: random.Random, d: bytes) -> bytes:
    return d + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))


def _insert(rng: random.Random, d: bytes) -> bytes:
    i = rng.randrange(len(d) + 1)
    return d[:i] + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8))) + d[i:]


def _delete(rng: random.Random, d: bytes) -> bytes:
    i = rng.randrange(len(d))
    return d[:i] + d[i + rng.randint(1, 64) :]


def _duplicate(rng: random.Random, d: bytes) -> bytes:
    i = rng.randrange(len(d))
    j = min(len(d), i + rng.randint(1, 128))
    return d[:j] + d[i:j] + d[j:]


BYTE_MUTATIONS: list[Mutation] = [
    _flip, _flip, _flip, _overwrite, _zero, _truncate, _extend, _insert, _delete, _duplicate,
]  # fmt: skip
# Journal tails: a cut exactly at a frame boundary is indistinguishable from fewer appends
# (that is what a crash leaves), so journal mutations change bytes, never only the length.
JOURNAL_MUTATIONS: list[Mutation] = [_flip, _flip, _overwrite, _zero, _insert, _duplicate]


class World(msgspec.Struct):
    objects: dict[str, bytes]
    #: Region -> content of the live file (newer than the snapshot's).
    live: dict[tuple[int, int], bytes]
    #: Region -> the snapshot's copy (what a restore must bring back).
    snap: dict[tuple[int, int], bytes]
    snapshot_id: str


async def build_world() -> World:
    store = MemoryStore()
    m = await make_world(store, region_size=2)
    snap: dict[tuple[int, int], bytes] = {}
    for rx, ry in REGIONS:
        snap[(rx, ry)] = region_bytes(m, rx, ry, tag="old", lpt=10)
        await store.put_atomic(region_key(rx, ry), snap[(rx, ry)])
    for seg, ticks in zip(SEGMENTS, ([11, 12], [13, 14, 15]), strict=True):
        frames = b"".join(
            encode_frame(
                encode_batch(JournalBatch(seq=t, deltas=[TileSet(tick=t, x=1, y=1, tile=2)]))
            )
            for t in ticks
        )
        await store.put_atomic(seg, frames)
    info = await create_snapshot(store, keep=5)
    live: dict[tuple[int, int], bytes] = {}
    for rx, ry in REGIONS:
        live[(rx, ry)] = region_bytes(m, rx, ry, tag="new", lpt=20, generation=2)
        await store.put_atomic(region_key(rx, ry), live[(rx, ry)])
    log = IncidentLog(store)
    for n in range(4):
        await log.record("scrub_alert", details={"n": n}, action="test")
    objects = {k: (await store.get(k)).data for k in await store.list()}
    return World(objects=objects, live=live, snap=snap, snapshot_id=info.id)


async def store_of(world: World) -> MemoryStore:
    store = MemoryStore()
    for k, v in world.objects.items():
        await store.put_atomic(k, v)
    return store


def mutate(rng: random.Random, data: bytes, mutations: list[Mutation]) -> bytes:
    while True:
        out = rng.choice(mutations)(rng, data)
        if out != data:
            return out


def detect(data: bytes, rx: int, ry: int) -> Exception | None:
    try:
        decode_region(data, rx=rx, ry=ry, path=region_key(rx, ry))
    except (IntegrityError, UnsupportedFormat) as exc:
        return exc
    return None


@pytest.fixture
def scale(torture: bool) -> int:
    return 10 if torture else 1


async def test_region_mutations_all_detected(scale: int) -> None:
    world = await build_world()
    rng = random.Random(20261126)
    n = 10_000 * scale
    files = list(world.live.items())
    undetected: list[str] = []
    for i in range(n):
        (rx, ry), data = files[i % len(files)]
        kind = rng.random()
        if kind < 0.05:
            # An intact file of another region under this name (misplaced / renamed).
            other = next(k for k in world.live if k != (rx, ry))
            bad = world.live[other]
        elif kind < 0.10:
            # An intact chunk frame of another region spliced over this one's frame.
            bad = _splice_foreign_frame(rng, data, world.live, (rx, ry))
        else:
            bad = mutate(rng, data, BYTE_MUTATIONS)
        if detect(bad, rx, ry) is None:
            undetected.append(f"mutation {i} of region {(rx, ry)}")
    assert not undetected, undetected[:10]


def _splice_foreign_frame(
    rng: random.Random, data: bytes, files: dict[tuple[int, int], bytes], me: tuple[int, int]
) -> bytes:
    mine = decode_region(data, rx=me[0], ry=me[1], path="m").header.chunks
    other_key = rng.choice([k for k in files if k != me])
    theirs = decode_region(files[other_key], rx=other_key[0], ry=other_key[1], path="o")
    e = rng.choice(mine)
    f = rng.choice(theirs.header.chunks)
    frame = files[other_key][f.offset : f.offset + f.length]
    return data[: e.offset] + frame + data[e.offset + e.length :]


async def test_ladder_sample_restores_or_isolates(scale: int) -> None:
    world = await build_world()
    rng = random.Random(7)
    restored = isolated = 0
    for i in range(300 * scale):
        store = await store_of(world)
        region = REGIONS[i % len(REGIONS)]
        rx, ry = region
        bad = mutate(rng, world.live[region], BYTE_MUTATIONS)
        err = detect(bad, rx, ry)
        assert err is not None, f"mutation {i} undetected"
        if not isinstance(err, IntegrityError):
            continue  # a newer-format claim is refused, never "repaired" by the ladder
        await store.put_atomic(region_key(rx, ry), bad)
        no_copy = i % 3 == 0
        if no_copy:
            key = snapshot_file_key(world.snapshot_id, region_key(rx, ry))
            await store.put_atomic(key, mutate(rng, world.snap[region], BYTE_MUTATIONS))
        log = IncidentLog(store)
        manifest = decode_manifest(world.objects[MANIFEST_KEY])

        out = await recover_region(store, rx, ry, err, manifest=manifest, incidents=log)

        kinds = [inc.kind for inc in (await log.read()).incidents]
        if no_copy:
            assert out.action == "inactive", (i, out)
            assert region in await load_inactive(store)
            assert region_key(rx, ry) not in await store.list("regions/")
            assert "data_loss" in kinds and "region_inactive" in kinds
            isolated += 1
        else:
            assert out.action == "restored", (i, out)
            got = decode_region((await store.get(region_key(rx, ry))).data, rx=rx, ry=ry, path="r")
            want = decode_region(world.snap[region], rx=rx, ry=ry, path="s")
            assert got.chunks == want.chunks
            assert got.header.last_processed_tick == want.header.last_processed_tick
            assert "restored_from_snapshot" in kinds
            restored += 1
        assert out.quarantine is not None
        assert (await store.get(out.quarantine)).data == bad
        for other in REGIONS:
            if other != region:
                data = (await store.get(region_key(*other))).data
                assert data == world.live[other]
                decode_region(data, rx=other[0], ry=other[1], path="o")
    assert restored > 100 * scale and isolated > 50 * scale


async def _check_detects(store: MemoryStore) -> tuple[list[str], list[str]]:
    try:
        report = await check_world(store, extra=[snapshot_check(1), check_incident_log])
    except UnsupportedFormat as exc:
        return [str(exc)], []
    return [p.file for p in report.problems], report.warnings


OWNERS = {
    "manifest": "format/manifest.py decode_manifest",
    "journal": "format/journal.py",
    "snapshot": "format/sealed.py unseal",
    "incidents": "recovery/incidents.py _parse_line",
}


@pytest.mark.parametrize("target", sorted(OWNERS))
async def test_other_files_mutations_detected_by_check(target: str, scale: int) -> None:
    world = await build_world()
    clean = await store_of(world)
    problems, warnings = await _check_detects(clean)
    assert problems == [] and warnings == [], (problems, warnings)
    rng = random.Random(zlib.crc32(target.encode()))
    snap_keys = [k for k in world.objects if k.startswith(f"snapshots/{world.snapshot_id}/")]
    benign = 0
    leaks: list[int] = []
    merged: list[int] = []
    for i in range(100 * scale):
        if target == "manifest":
            key = MANIFEST_KEY
        elif target == "journal":
            key = SEGMENTS[i % 2]
        elif target == "snapshot":
            key = snap_keys[i % len(snap_keys)]
        else:
            key = INCIDENTS_KEY
        original = world.objects[key]
        muts = JOURNAL_MUTATIONS if target == "journal" else BYTE_MUTATIONS
        bad = mutate(rng, original, muts)
        store = await store_of(world)
        await store.put_atomic(key, bad)
        try:
            problems, warnings = await _check_detects(store)
        except UnicodeDecodeError:
            leaks.append(i)
            continue
        if problems or warnings:
            continue
        # Undetected is acceptable only if a reader gets exactly the same content: JSON
        # whitespace, a duplicated key (the last one wins), or a misspelt key of a field
        # whose value is its default (the checksums cover the decoded record).
        if _same_content(key, original, bad):
            benign += 1
            continue
        # Known gap (reported to the owner): a cut from the middle of one incident line into
        # the middle of the next leaves one line with duplicate keys; JSON's "last key wins"
        # makes it the second incident, verified, and the first vanishes unreported.
        assert key == INCIDENTS_KEY and _merged_lines(original, bad), (i, key, bad)
        merged.append(i)
    assert benign <= 10 * scale
    known = []
    if leaks:
        # Detected (the check does not pass), but as a crash instead of a reported problem:
        # msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8.
        known.append(
            f"{len(leaks)} mutation(s) made {OWNERS[target]} raise UnicodeDecodeError "
            "instead of reporting the file as damaged"
        )
    if merged:
        known.append(
            f"{len(merged)} mutation(s) merged two incident lines into one that verifies "
            "(duplicate JSON keys accepted): an incident vanished undetected"
        )
    if known:
        # Bugs in modules owned elsewhere, reported; this turns into a pass by itself once
        # they are fixed. Everything else the loop asserted still held.
        pytest.xfail(f"of {100 * scale} mutations: " + "; ".join(known))


def _merged_lines(original: bytes, bad: bytes) -> bool:
    before = parse_incidents(original).incidents
    after = parse_incidents(bad).incidents
    return len(after) < len(before) and all(inc in before for inc in after)


def _same_content(key: str, a: bytes, b: bytes) -> bool:
    from streamer.recovery.snapshots import _decode_info

    decode: Callable[[bytes], object]
    if key == MANIFEST_KEY or key.endswith("/files/world.json"):
        decode = decode_manifest
    elif key.endswith("/snapshot.json"):
        decode = lambda data: _decode_info(data, key)  # noqa: E731
    elif key == INCIDENTS_KEY:
        decode = lambda data: parse_incidents(data).incidents  # noqa: E731
    else:
        return False
    try:
        return decode(a) == decode(b)
    except Exception:
        return False
