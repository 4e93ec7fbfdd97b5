"""Batch migration engine and `streamer migrate`: results, idempotence, resume, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from streamer.cli import migrate_cmd
from streamer.errors import PreconditionFailed, WorldNotFound
from streamer.format.region import decode_region, encode_region, region_key
from streamer.migrate import (
    CHECKPOINT_KEY,
    LiveHooks,
    MigrationInProgress,
    NoCheckpoint,
    migrate_world,
    read_checkpoint,
)
from streamer.migrate.batch import Workers
from streamer.migrate.synth import character_raw, chunk_raw, write_world
from streamer.migrate.verify import record_census, tree_digests
from streamer.recovery.incidents import IncidentLog
from streamer.recovery.snapshots import list_snapshots
from streamer.schema.codec import ChunkCodec
from streamer.schema.records import CURRENT_VERSIONS
from streamer.storage.base import Blob
from streamer.storage.local import LocalStore
from streamer.worlddir import WorldLock, read_manifest

FIXTURES = Path(__file__).parent / "fixtures"


def copy_fixture(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def all_files(root: Path) -> dict[str, str]:
    return tree_digests(root, include_bookkeeping=True)


class Interrupted(BaseException):
    """Stands in for a kill inside the process: escapes every ``except Exception``."""


class StopAfter:
    """Progress sink that "kills" the run after ``n`` regions."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = 0

    def start(self, *, total_regions: int, skipped_regions: int) -> None:
        self.total, self.skipped = total_regions, skipped_regions

    def advance(self, *, regions: int, chunks: int) -> None:
        self.seen += regions
        if self.seen >= self.n:
            raise Interrupted


# -- the fixture world, migrated ----------------------------------------------------------


async def test_v1_world_migrates_every_record_once_to_current(tmp_path: Path) -> None:
    world = copy_fixture(tmp_path, "world-v1")
    before = record_census(world)
    old_files = {k: (world / k).read_bytes() for k in tree_digests(world)}
    async with await LocalStore.open(world) as store:
        report = await migrate_world(store, jobs=2, where=str(world))
        assert report.status == "completed" and report.ok
        assert report.regions_total == 3 and report.regions_rewritten == 3
        assert report.counts["character"] == {1: 5}
        assert report.counts["society"] == {1: 2}
        assert report.records_upgraded == 7 and report.chunks_upgraded == 5
        assert await read_checkpoint(store) is None
        manifest = await read_manifest(store)
        assert manifest.record_versions == CURRENT_VERSIONS
        snaps = await list_snapshots(store)
        assert [s.id for s in snaps] == [report.snapshot_id]
        assert snaps[0].reason == "pre-migration"

    after = record_census(world)
    assert after.ids == before.ids and not after.duplicates
    assert not after.stale
    assert after.versions[("character", 3)] == 5 and after.versions[("society", 2)] == 2

    for key in (k for k in old_files if k.startswith("regions/")):
        rx, ry = (int(p) for p in key.split("/")[1].split(".")[1:3])
        old = decode_region(old_files[key], rx=rx, ry=ry, path=key)
        new = decode_region((world / key).read_bytes(), rx=rx, ry=ry, path=key)
        assert new.header.generation == old.header.generation + 1
        assert new.header.last_processed_tick == old.header.last_processed_tick
        assert new.header.region_size == old.header.region_size
        assert new.header.writer == "migrate"
        assert new.chunks.keys() == old.chunks.keys()
        codec = ChunkCodec(new.header.encoding)
        for payload in new.chunks.values():
            assert codec.decode(payload, where=key).upgraded is False
    # A chunk with nothing to migrate keeps its exact bytes.
    key = region_key(-1, 0)
    old = decode_region(old_files[key], rx=-1, ry=0, path=key)
    new = decode_region((world / key).read_bytes(), rx=-1, ry=0, path=key)
    assert new.chunks[(-4, 3)] == old.chunks[(-4, 3)]
    assert new.chunks[(-1, 0)] != old.chunks[(-1, 0)]


async def test_migrated_values_follow_the_shipped_steps(tmp_path: Path) -> None:
    world = copy_fixture(tmp_path, "world-v1")
    async with await LocalStore.open(world) as store:
        assert (await migrate_world(store)).ok
        blob = await store.get(region_key(0, 0))
    rf = decode_region(blob.data, rx=0, ry=0, path="r")
    rec = ChunkCodec("msgpack").decode(rf.chunks[(0, 0)], where="r").record
    ada = next(c for c in rec.characters if c.id == "player-ada")
    assert (ada.given_name, ada.family_name) == ("Ada", "King Lovelace")
    assert [(s.item, s.count) for s in ada.inventory] == [("axe", 1), ("wood", 3)]
    assert ada.hp == 87 and ada.player_id == "p-ada" and ada.society_id == "soc-north"
    assert rec.societies[0].relations == {"soc-river": 100}


async def test_rerun_is_idempotent_and_writes_no_region(tmp_path: Path) -> None:
    world = copy_fixture(tmp_path, "world-v1")
    async with await LocalStore.open(world) as store:
        await migrate_world(store)
        once = tree_digests(world)
        again = await migrate_world(store, jobs=3)
    assert again.ok and again.regions_rewritten == 0 and again.regions_current == 3
    assert again.records_upgraded == 0
    assert tree_digests(world) == once


async def test_dry_run_reports_and_writes_nothing(tmp_path: Path) -> None:
    world = copy_fixture(tmp_path, "world-v2")
    before = all_files(world)
    async with await LocalStore.open(world) as store:
        report = await migrate_world(store, dry_run=True)
    assert report.status == "dry_run" and report.snapshot_id is None
    assert report.counts["character"] == {2: 3}
    assert report.counts["society"] == {2: 1}
    assert report.regions_rewritten == 2 and report.records_upgraded == 3
    # Nothing at all: no snapshot, no checkpoint, no incident log, no lock files.
    assert all_files(world) == before


def test_cli_dry_run_json_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = copy_fixture(tmp_path, "world-v1")
    before = all_files(world)
    assert migrate_cmd.main([str(world), "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "dry_run" and out["ok"] is True
    assert out["counts"]["character"] == {"1": 5}
    assert all_files(world) == before


def test_cli_migrates_and_prints_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = copy_fixture(tmp_path, "world-v2")
    assert migrate_cmd.main([str(world), "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "v2 -> v3" in out and "pre-migration snapshot" in out
    assert not record_census(world).stale


# -- resume --------------------------------------------------------------------------------


async def interrupt(coro: Awaitable[object]) -> None:
    stopped = False
    try:
        await coro
    except* Interrupted:
        stopped = True
    assert stopped, "the run was not interrupted"


@pytest.mark.parametrize("interval", [0.0, 3600.0])
async def test_interrupted_run_resumes_from_checkpoint(tmp_path: Path, interval: float) -> None:
    """interval 0: both finished regions are checkpointed and skipped on resume; 3600: none
    is, and the resumed run finds them current by reading them (no second write)."""
    world = tmp_path / "w"
    await anyio.to_thread.run_sync(lambda: write_world(world, regions=6, chunks_per_region=3))
    before = record_census(world)
    async with await LocalStore.open(world) as store:
        await interrupt(
            migrate_world(store, jobs=1, progress=StopAfter(2), checkpoint_interval=interval)
        )
        cp = await read_checkpoint(store)
        checkpointed = 2 if interval == 0 else 0
        assert cp is not None and cp.status == "running" and len(cp.done) == checkpointed
        assert record_census(world).stale
        two_done = tree_digests(world)

        with pytest.raises(MigrationInProgress, match="--resume"):
            await migrate_world(store)

        sink = StopAfter(10**6)
        report = await migrate_world(store, resume=True, progress=sink)
        assert report.ok and report.resumed and report.snapshot_id == cp.snapshot_id
        assert sink.skipped == checkpointed and report.regions_skipped == checkpointed
        assert report.regions_current == 2 - checkpointed and report.regions_rewritten == 4
        assert await read_checkpoint(store) is None
    done_regions = [k for k in two_done if k.startswith("regions/")][:2]
    assert all(tree_digests(world)[k] == two_done[k] for k in done_regions)
    after = record_census(world)
    assert after.ids == before.ids and not after.duplicates and not after.stale


async def test_resume_without_checkpoint_is_refused(tmp_path: Path) -> None:
    world = copy_fixture(tmp_path, "world-v1")
    before = all_files(world)
    async with await LocalStore.open(world) as store:
        with pytest.raises(NoCheckpoint, match="nothing to resume"):
            await migrate_world(store, resume=True)
    assert all_files(world) == before


def test_cli_resume_without_checkpoint_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = copy_fixture(tmp_path, "world-v1")
    before = tree_digests(world)
    assert migrate_cmd.main([str(world), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert tree_digests(world) == before


async def test_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    world = tmp_path / "w"
    await anyio.to_thread.run_sync(lambda: write_world(world, regions=3, chunks_per_region=1))
    async with await LocalStore.open(world) as store:
        await interrupt(migrate_world(store, jobs=1, progress=StopAfter(1)))
        blob = await store.get(CHECKPOINT_KEY)
        await store.put_atomic(CHECKPOINT_KEY, blob.data.replace(b'"running"', b'"runnin9"'))
        with pytest.raises(Exception, match="checkpoint"):
            await migrate_world(store, resume=True)


# -- bad inputs ----------------------------------------------------------------------------


async def test_not_a_world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with await LocalStore.open(tmp_path / "empty") as store:
        with pytest.raises(WorldNotFound):
            await migrate_world(store)
    (tmp_path / "plain").mkdir()
    assert migrate_cmd.main([str(tmp_path / "plain")]) == 2
    assert "not a streamer world" in capsys.readouterr().err
    assert list((tmp_path / "plain").iterdir()) == []


def test_world_locked_by_another_process_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = copy_fixture(tmp_path, "world-v1")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from streamer.worlddir import WorldLock;"
            "WorldLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)",
            str(world),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = all_files(world)
        assert migrate_cmd.main([str(world)]) == 2
        err = capsys.readouterr().err
        assert "open in another process" in err and "lazily" in err
        assert all_files(world) == before
        # A dry run only reads: allowed, with a note, and still writes nothing.
        assert migrate_cmd.main([str(world), "--dry-run"]) == 0
        assert "open in another process" in capsys.readouterr().err
        assert all_files(world) == before
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert migrate_cmd.main([str(world)]) == 0


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world = copy_fixture(tmp_path, "world-v1")
    assert migrate_cmd.main([str(world), "--jobs", "0"]) == 2
    assert migrate_cmd.main([str(world), "--dry-run", "--resume"]) == 2
    capsys.readouterr()


def _region_with(
    path: Path, rx: int, ry: int, chunks: dict[tuple[int, int], dict[str, Any]]
) -> None:
    enc = msgspec.msgpack.Encoder()
    path.write_bytes(
        encode_region(
            rx=rx,
            ry=ry,
            last_processed_tick=5,
            generation=1,
            writer="test",
            encoding="msgpack",
            chunks={k: enc.encode(v) for k, v in chunks.items()},
            region_size=8,
        )
    )


async def test_unknown_schema_version_refuses_region_writes_nothing_records_incident(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = tmp_path / "w"
    await anyio.to_thread.run_sync(lambda: write_world(world, regions=4, chunks_per_region=2))
    future = character_raw("from-the-future", 1, 1, 1)
    future["schemaVersion"] = 99
    _region_with(
        world / region_key(2, 0),
        2,
        0,
        {(16, 0): chunk_raw(16, 0, characters=[future, character_raw("ok", 2, 2, 1)])},
    )
    before = tree_digests(world)

    # Dry run: reported as a failure, exit 1, nothing written.
    everything = all_files(world)
    assert await anyio.to_thread.run_sync(migrate_cmd.main, [str(world), "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "id=from-the-future type=character schemaVersion=99" in out
    assert "UnknownSchemaVersion" in out
    assert all_files(world) == everything

    async with await LocalStore.open(world) as store:
        report = await migrate_world(store, jobs=1)
        assert report.status == "failed" and report.rolled_back
        (fail,) = report.failures
        assert fail.error_type == "UnknownSchemaVersion"
        assert (fail.record_id, fail.record_type, fail.schema_version) == (
            "from-the-future",
            "character",
            99,
        )
        assert fail.file == region_key(2, 0) and fail.chunk == (16, 0)
        # jobs=1 in key order: regions 0 and 1 were rewritten, then rolled back.
        incidents = (await IncidentLog(store).read()).incidents
        (inc,) = [i for i in incidents if i.kind == "migration_failed"]
        assert inc.details["record_id"] == "from-the-future"
        assert inc.details["schema_version"] == 99
        assert inc.details["regions_rewritten_before_rollback"] == 2
        assert inc.region == (2, 0) and inc.file == region_key(2, 0)
        assert await read_checkpoint(store) is None
    assert tree_digests(world) == before

    # Through the CLI: one clear line on stderr, exit 1, still byte-identical.
    assert await anyio.to_thread.run_sync(migrate_cmd.main, [str(world)]) == 1
    err = capsys.readouterr().err
    assert "id=from-the-future type=character schemaVersion=99" in err
    assert "rolled back" in err
    assert tree_digests(world) == before


# -- concurrency and the live-runtime seam ---------------------------------------------------


async def test_many_regions_many_jobs_each_record_once(tmp_path: Path) -> None:
    world = tmp_path / "w"
    await anyio.to_thread.run_sync(
        lambda: write_world(world, regions=20, chunks_per_region=4, encoding="json", version=2)
    )
    before = record_census(world)
    async with await LocalStore.open(world) as store:
        report = await migrate_world(store, jobs=5)
    assert report.ok and report.regions_rewritten == 20 and report.chunks_total == 80
    after = record_census(world)
    assert after.ids == before.ids and not after.duplicates and not after.stale


class RacingStore(LocalStore):
    """The first compare-and-swap of each region loses, as if a live flush got there first."""

    lost: set[str]

    async def put_if_match(self, key: str, data: bytes, if_match: str | None) -> str:
        if key.startswith("regions/") and key not in self.lost:
            self.lost.add(key)
            # The "runtime" rewrites the region (same content, newer generation) meanwhile.
            blob = await self.get(key)
            rx, ry = (int(p) for p in key.split("/")[1].split(".")[1:3])
            rf = decode_region(blob.data, rx=rx, ry=ry, path=key)
            await self.put_atomic(
                key,
                encode_region(
                    rx=rx,
                    ry=ry,
                    last_processed_tick=rf.header.last_processed_tick,
                    generation=rf.header.generation + 1,
                    writer="runtime",
                    encoding=rf.header.encoding,
                    chunks=rf.chunks,
                    region_size=rf.header.region_size,
                ),
            )
            raise PreconditionFailed("version moved", key=key)
        return await super().put_if_match(key, data, if_match)


async def test_live_hooks_lock_each_region_and_redo_a_raced_one(tmp_path: Path) -> None:
    world = copy_fixture(tmp_path, "world-v1")
    store = RacingStore(world)
    store.lost = set()
    locked: list[tuple[int, int]] = []
    written: list[tuple[int, int]] = []

    @asynccontextmanager
    async def region_lock(rx: int, ry: int) -> AsyncIterator[None]:
        locked.append((rx, ry))
        yield

    async def region_written(rx: int, ry: int, data: bytes, version: str) -> None:
        written.append((rx, ry))
        assert (await store.get(region_key(rx, ry))) == Blob(data=data, version=version)

    async with store:
        report = await migrate_world(
            store, hooks=LiveHooks(region_lock=region_lock, region_written=region_written)
        )
    assert report.ok and report.regions_rewritten == 3
    assert sorted(written) == sorted(set(locked)) and len(locked) == 6  # each raced once
    assert not record_census(world).stale


async def test_regions_migrated_lazily_are_not_rewritten(tmp_path: Path) -> None:
    """What a live runtime already upgraded on touch is found current: no double work."""
    world = copy_fixture(tmp_path, "world-v1")
    key = region_key(0, 0)
    rf = decode_region((world / key).read_bytes(), rx=0, ry=0, path=key)
    codec = ChunkCodec("msgpack")
    lazily = {ck: codec.encode(codec.decode(p, where=key).record) for ck, p in rf.chunks.items()}
    async with await LocalStore.open(world) as store:
        await store.put_atomic(
            key,
            encode_region(
                rx=0,
                ry=0,
                last_processed_tick=rf.header.last_processed_tick,
                generation=rf.header.generation + 1,
                writer="runtime",
                encoding="msgpack",
                chunks=lazily,
                region_size=rf.header.region_size,
            ),
        )
        touched = (world / key).read_bytes()
        report = await migrate_world(store)
    assert report.regions_current == 1 and report.regions_rewritten == 2
    assert (world / key).read_bytes() == touched


def test_lock_is_released_after_the_run(tmp_path: Path) -> None:
    world = copy_fixture(tmp_path, "world-v1")
    assert migrate_cmd.main([str(world), "--json"]) == 0
    lock = WorldLock(world)
    lock.acquire()
    lock.release()
    assert os.path.exists(world / ".lock")


# -- worker processes ----------------------------------------------------------------------


def _chunk_payloads(world: Path) -> dict[tuple[str, tuple[int, int]], bytes]:
    out = {}
    for path in sorted((world / "regions").iterdir()):
        key = f"regions/{path.name}"
        rx, ry = (int(p) for p in path.name.split(".")[1:3])
        rf = decode_region(path.read_bytes(), rx=rx, ry=ry, path=key)
        out.update({(key, ck): payload for ck, payload in rf.chunks.items()})
    return out


@pytest.mark.parametrize("fixture", ["world-v1", "world-v2"])
async def test_processes_and_threads_migrate_identically(tmp_path: Path, fixture: str) -> None:
    worlds = {}
    reports = {}
    workers: Workers
    for workers in ("processes", "threads"):
        world = worlds[workers] = tmp_path / workers / fixture
        shutil.copytree(FIXTURES / fixture, world)
        async with await LocalStore.open(world) as store:
            reports[workers] = await migrate_world(store, jobs=2, workers=workers)
    a, b = reports["processes"], reports["threads"]
    assert a.ok and b.ok
    assert msgspec.structs.replace(a, elapsed_s=0, snapshot_id=None, world="") == (
        msgspec.structs.replace(b, elapsed_s=0, snapshot_id=None, world="")
    )
    assert _chunk_payloads(worlds["processes"]) == _chunk_payloads(worlds["threads"])


async def test_processes_dry_run_counts_match_threads(tmp_path: Path) -> None:
    world = tmp_path / "w"
    await anyio.to_thread.run_sync(
        lambda: write_world(world, regions=6, chunks_per_region=3, characters_per_chunk=2)
    )
    before = all_files(world)
    async with await LocalStore.open(world) as store:
        by_proc = await migrate_world(store, dry_run=True, workers="processes")
        by_thread = await migrate_world(store, dry_run=True, workers="threads")
    assert by_proc.status == by_thread.status == "dry_run"
    assert (
        by_proc.counts
        == by_thread.counts
        == {
            "character": {1: 36},
            "chunk": {1: 18},
            "feature": {1: 36},
            "society": {1: 6},
        }
    )
    assert by_proc.records_upgraded == by_thread.records_upgraded == 42
    assert all_files(world) == before


async def test_processes_refused_for_a_registry_that_cannot_be_sent(tmp_path: Path) -> None:
    from streamer.schema.migrations import MigrationRegistry

    def wrap(fn: Any) -> Any:
        def step(rec: dict[str, Any]) -> dict[str, Any]:  # a closure: cannot be pickled
            return fn(rec)  # type: ignore[no-any-return]

        return step

    reg = MigrationRegistry()
    for (rtype, v), fn in _shipped_steps().items():
        reg.register(rtype, v, wrap(fn))
    world = copy_fixture(tmp_path, "world-v1")
    before = all_files(world)
    async with await LocalStore.open(world) as store:
        with pytest.raises(ValueError, match="cannot be sent to a worker process"):
            await migrate_world(store, registry=reg, workers="processes")
        assert all_files(world) == before
        # "auto" falls back to threads for it, whatever the world's size.
        report = await migrate_world(store, registry=reg)
    assert report.ok and report.regions_rewritten == 3


def _shipped_steps() -> dict[tuple[str, int], Any]:
    from streamer.schema.upgrades import (
        character_v1_to_v2,
        character_v2_to_v3,
        society_v1_to_v2,
    )

    return {
        ("character", 1): character_v1_to_v2,
        ("character", 2): character_v2_to_v3,
        ("society", 1): society_v1_to_v2,
    }


def test_auto_uses_processes_only_for_big_worlds() -> None:
    from streamer.migrate import batch
    from streamer.schema.migrations import REGISTRY

    small = batch.PROCESS_MIN_REGIONS - 1
    assert batch._worker_processes("auto", REGISTRY, 2, small) == 0
    assert batch._worker_processes("auto", REGISTRY, 2, batch.PROCESS_MIN_REGIONS) >= 1
    assert batch._worker_processes("threads", REGISTRY, 2, 10_000) == 0
    assert batch._worker_processes("processes", REGISTRY, 2, 1) >= 1
    assert batch._worker_processes("processes", REGISTRY, 64, 1) <= (os.cpu_count() or 1)


def test_library_default_is_threads_so_unguarded_scripts_stay_safe() -> None:
    """Worker processes follow multiprocessing's rules (a caller's ``__main__`` is re-imported),
    so only callers that opt in (the CLI passes ``workers="auto"``) get them."""
    import inspect

    from streamer.migrate import batch

    default = inspect.signature(batch.migrate_world).parameters["workers"].default
    assert default == "threads"


def _current_char(rid: str) -> dict[str, Any]:
    return character_raw(rid, 0, 0, 3)


@pytest.mark.parametrize(
    "raw",
    [
        chunk_raw(0, 0, characters=[_current_char("a")]),  # no record_versions stored
        {**chunk_raw(0, 0, characters=[_current_char("a")]), "record_versions": {"character": 3}},
        {**chunk_raw(0, 0, characters=[]), "record_versions": {}},
        {**chunk_raw(0, 0, characters=[]), "features": [], "record_versions": {}},
        {**chunk_raw(0, 0, characters=[_current_char("a")]), "record_versions": {"character": 1}},
        {
            **chunk_raw(0, 0, characters=[_current_char("a")]),
            "record_versions": {"character": 3, "feature": 1},
        },
        {
            **chunk_raw(0, 0, characters=[character_raw("b", 0, 0, 2)]),
            "record_versions": {"character": 3, "feature": 1},
        },
        {
            **chunk_raw(0, 0, characters=[], features=0),
            "characters": [],
            "record_versions": {},
        },
        {
            # A feature filed under characters: current versions, but not what upgrade keeps.
            **chunk_raw(0, 0, characters=[], features=1),
            "characters": [{"type": "feature", "schemaVersion": 1}],
            "record_versions": {"character": 1, "feature": 1},
        },
    ],
)
@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_peek_finds_current_exactly_when_upgrade_changes_nothing(
    raw: dict[str, Any], encoding: Any
) -> None:
    """Chunks the peek judges current are kept verbatim without the registry seeing them."""
    from collections import Counter

    from streamer.errors import SchemaError
    from streamer.migrate import batch
    from streamer.schema.migrations import REGISTRY

    codec = ChunkCodec(encoding)
    enc = msgspec.msgpack if encoding == "msgpack" else msgspec.json
    payload = enc.encode(raw)
    heads = batch._PEEKERS[encoding].decode(payload)
    counts: Counter[tuple[str, int]] = Counter()
    current = batch._peek_heads(heads, batch._current_heads(REGISTRY.current_versions), counts)
    try:
        _, changed = REGISTRY.upgrade_chunk(codec.decode_raw(payload, where="t"), where="t")
    except SchemaError:
        changed = True  # the full path reports it: never current
    assert current == (not changed)
    full: Counter[tuple[str, int]] = Counter()
    batch._count(codec.decode_raw(payload, where="t"), full)
    assert counts == full
