"""Regression tests for defects found in review of the batch migration job.

Each section names the defect it covers; every test here failed before its fix.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from streamer.cli import migrate_cmd
from streamer.errors import StorageUnavailable, UnsupportedFormat
from streamer.format.checksum import hex64, xxh3
from streamer.format.manifest import MANIFEST_KEY, encode_manifest
from streamer.format.region import encode_region, parse_region_key
from streamer.migrate import (
    CHECKPOINT_KEY,
    Checkpoint,
    RecoverySnapshots,
    batch,
    migrate_world,
    read_checkpoint,
)
from streamer.migrate import batch as batch_module
from streamer.migrate.batch import DONE_LOG_PREFIX
from streamer.migrate.synth import character_raw, chunk_raw, society_raw, write_world
from streamer.migrate.verify import record_census, tree_digests
from streamer.recovery.incidents import IncidentLog
from streamer.schema.migrations import MigrationRegistry, RawRecord, StepFn
from streamer.schema.records import CURRENT_VERSIONS
from streamer.schema.upgrades import character_v1_to_v2, character_v2_to_v3, society_v1_to_v2
from streamer.storage.base import Blob, BlobStore
from streamer.storage.faultfs import SimulatedCrash, SimulatedFileSystem
from streamer.storage.local import LocalStore
from streamer.worlddir import read_manifest

REGION_KEYS = [f"regions/r.{i}.0.region" for i in range(4)]


def corrupt(world: Path, key: str) -> None:
    """Flip a byte near the end of ``key``: the file no longer verifies."""
    path = world / key
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


async def small_world(tmp_path: Path, regions: int = 4) -> Path:
    world = tmp_path / "w"
    await anyio.to_thread.run_sync(
        lambda: write_world(world, regions=regions, chunks_per_region=2, version=1)
    )
    return world


class FailingGet(LocalStore):
    """``get`` of one key fails with EIO, every time."""

    broken_key = ""

    async def get(self, key: str) -> Blob:
        if key == self.broken_key:
            raise StorageUnavailable(f"injected EIO ({errno.EIO})", key=key)
        return await super().get(key)


# -- 1. a dry run stopped silently at the first unreadable region ---------------------------


@pytest.mark.parametrize("jobs", [1, 3])
@pytest.mark.parametrize("bad", [0, 2], ids=["first", "middle"])
async def test_dry_run_reports_an_unreadable_region_and_reads_the_others(
    tmp_path: Path, jobs: int, bad: int
) -> None:
    world = await small_world(tmp_path)
    corrupt(world, REGION_KEYS[bad])
    before = tree_digests(world, include_bookkeeping=True)
    async with await LocalStore.open(world) as store:
        report = await migrate_world(store, jobs=jobs, dry_run=True)
    assert report.status == "failed" and not report.ok
    (fail,) = report.failures
    assert fail.file == REGION_KEYS[bad] and fail.error_type == "ChecksumMismatch"
    assert "checksum mismatch" in fail.error
    assert report.failures_total == 1 and report.regions_failed == 1
    # Every other region was read: all of them would be rewritten.
    assert report.regions_rewritten == 3 and report.chunks_total == 6
    assert tree_digests(world, include_bookkeeping=True) == before


async def test_dry_run_storage_error_is_a_failure_and_the_run_goes_on(tmp_path: Path) -> None:
    world = await small_world(tmp_path)
    store = await FailingGet.open(world)
    assert isinstance(store, FailingGet)
    store.broken_key = REGION_KEYS[0]
    async with store:
        report = await migrate_world(store, jobs=1, dry_run=True)
    assert report.status == "failed" and not report.ok
    (fail,) = report.failures
    assert fail.file == REGION_KEYS[0] and fail.error_type == "StorageUnavailable"
    assert report.regions_failed == 1 and report.regions_rewritten == 3


async def test_dry_run_unexpected_error_is_a_failure_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = await small_world(tmp_path)
    real = batch.migrate_region_bytes

    def flaky(data: bytes, **kw: Any) -> Any:
        if kw["key"] == REGION_KEYS[1]:
            raise RuntimeError("encoder exploded")
        return real(data, **kw)

    monkeypatch.setattr(batch, "migrate_region_bytes", flaky)
    async with await LocalStore.open(world) as store:
        report = await migrate_world(store, jobs=1, dry_run=True)
    assert report.status == "failed" and not report.ok
    (fail,) = report.failures
    assert (fail.file, fail.error_type) == (REGION_KEYS[1], "RuntimeError")
    assert report.regions_rewritten == 3


async def test_dry_run_keeps_counting_failures_past_the_listed_ones(tmp_path: Path) -> None:
    world = await small_world(tmp_path)
    for key in REGION_KEYS:
        corrupt(world, key)
    async with await LocalStore.open(world) as store:
        report = await migrate_world(store, jobs=2, dry_run=True, max_failures=2)
    assert len(report.failures) == 2 and report.failures_total == 4
    assert report.regions_failed == 4 and report.regions_rewritten == 0


def test_cli_dry_run_of_an_unreadable_region_exits_1_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = tmp_path / "w"
    write_world(world, regions=3, chunks_per_region=1, version=1)
    corrupt(world, REGION_KEYS[0])
    assert migrate_cmd.main([str(world), "--dry-run", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "failed" and out["ok"] is False
    assert out["failures"][0]["file"] == REGION_KEYS[0]
    assert migrate_cmd.main([str(world), "--dry-run"]) == 1
    text = capsys.readouterr().out
    assert "1 failed)" in text and REGION_KEYS[0] in text


class CorruptAfterSnapshot(RecoverySnapshots):
    """The snapshot verifies the good file; the region goes bad after it (bit rot, a bad
    disk): the real run meets it only when it reads the region."""

    def __init__(self, world: Path, key: str) -> None:
        super().__init__()
        self.world, self.key = world, key

    async def create(self, store: BlobStore) -> str:
        snapshot_id = await super().create(store)
        corrupt(self.world, self.key)
        return snapshot_id


async def test_real_run_halts_on_an_unreadable_region_names_it_and_rolls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = await small_world(tmp_path)
    before = tree_digests(world)
    census = record_census(world)
    caplog.set_level(logging.ERROR, logger="streamer.migrate")
    async with await LocalStore.open(world) as store:
        report = await migrate_world(
            store, jobs=1, snapshots=CorruptAfterSnapshot(world, REGION_KEYS[2])
        )
    assert report.status == "failed" and not report.ok and report.rolled_back
    (fail,) = report.failures
    assert fail.file == REGION_KEYS[2] and fail.error_type == "ChecksumMismatch"
    assert report.regions_failed == 1
    assert any(REGION_KEYS[2] in r.getMessage() for r in caplog.records)
    # Rolled back to the pre-migration snapshot, which holds the good file.
    assert tree_digests(world) == before
    assert record_census(world).ids == census.ids


# -- 4. a dead worker process left a slot with no worker behind it --------------------------

SHIPPED: dict[tuple[str, int], StepFn] = {
    ("character", 1): character_v1_to_v2,
    ("character", 2): character_v2_to_v3,
    ("society", 1): society_v1_to_v2,
}


class DieOn:
    """A shipped step that kills the worker process running it for one record id (module
    level, so a registry of them pickles and can be sent to worker processes)."""

    def __init__(self, fn: StepFn, record_id: str) -> None:
        self.fn, self.record_id = fn, record_id

    def __call__(self, rec: RawRecord) -> RawRecord:
        if rec.get("id") == self.record_id:
            os._exit(3)
        return self.fn(rec)


def dying_registry(record_id: str) -> MigrationRegistry:
    reg = MigrationRegistry()
    for (t, v), fn in SHIPPED.items():
        reg.register(t, v, DieOn(fn, record_id))
    return reg


async def _migrate_concurrently(
    pool: batch._ProcessWorkers, world: Path, keys: list[str]
) -> dict[str, batch._RegionResult | batch._RegionFailed]:
    """Submit ``keys[0]`` to ``pool``, and once it holds the only idle worker the others:
    they wait for a worker. What each one came back with."""
    out: dict[str, batch._RegionResult | batch._RegionFailed] = {}
    data = {key: (world / key).read_bytes() for key in keys}

    async def one(i: int, key: str) -> None:
        try:
            out[key] = await pool.migrate(data[key], key, i, 0, True)
        except batch._RegionFailed as exc:
            out[key] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, 0, keys[0])
        while pool._idle.statistics().current_buffer_used:
            await anyio.sleep(0)
        for i, key in enumerate(keys[1:], 1):
            tg.start_soon(one, i, key)
    return out


async def test_a_region_waiting_for_a_worker_that_dies_gets_a_new_one(tmp_path: Path) -> None:
    world = await small_world(tmp_path, regions=2)
    # One process, two regions at once: the second waits while the first kills the worker.
    pool = batch._ProcessWorkers(1, dying_registry("c-0-0-0"))
    try:
        await pool.start()
        assert await pool.ready()
        out = await _migrate_concurrently(pool, world, REGION_KEYS[:2])
    finally:
        await pool.aclose()
    died = out[REGION_KEYS[0]]
    assert isinstance(died, batch._RegionFailed)
    assert died.failure.error_type == "BrokenExecutor" and "died" in died.failure.error
    ok = out[REGION_KEYS[1]]
    assert isinstance(ok, batch._RegionResult) and ok.chunks_upgraded == 2


async def test_when_no_worker_can_replace_a_dead_one_waiting_regions_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = await small_world(tmp_path, regions=3)
    pool = batch._ProcessWorkers(1, dying_registry("c-0-0-0"))
    try:
        await pool.start()
        assert await pool.ready()

        def cannot_spawn() -> batch._Worker:
            raise OSError(errno.EAGAIN, "injected: fork failed")

        monkeypatch.setattr(pool, "_spawn_sync", cannot_spawn)
        out = await _migrate_concurrently(pool, world, REGION_KEYS[:3])
    finally:
        await pool.aclose()
    errors = {k: v.failure.error for k, v in out.items() if isinstance(v, batch._RegionFailed)}
    assert set(errors) == set(REGION_KEYS[:3])
    assert "died" in errors[REGION_KEYS[0]]
    assert "every worker process has died" in errors[REGION_KEYS[1]]


async def test_dry_run_in_processes_goes_on_after_a_worker_dies(tmp_path: Path) -> None:
    world = await small_world(tmp_path, regions=4)
    async with await LocalStore.open(world) as store:
        report = await migrate_world(
            store, jobs=3, dry_run=True, registry=dying_registry("c-8-0-0"), workers="processes"
        )
    assert report.status == "failed" and not report.ok
    (fail,) = report.failures
    assert (fail.file, fail.error_type) == (REGION_KEYS[1], "BrokenExecutor")
    assert report.regions_failed == 1 and report.regions_rewritten == 3


# -- 5. the manifest's record versions could be lowered ------------------------------------


async def test_finish_never_lowers_a_record_version_a_newer_release_recorded(
    tmp_path: Path,
) -> None:
    world = await small_world(tmp_path, regions=2)
    async with await LocalStore.open(world) as store:
        manifest = await read_manifest(store)
        newer = {**manifest.record_versions, "society": CURRENT_VERSIONS["society"] + 2}
        newer["character"] = 1  # what this run migrates: raised to the target
        await store.put_atomic(
            MANIFEST_KEY,
            encode_manifest(msgspec.structs.replace(manifest, record_versions=newer)),
        )
        report = await migrate_world(store, jobs=1)
        assert report.status == "completed"
        after = (await read_manifest(store)).record_versions
    assert after["society"] == CURRENT_VERSIONS["society"] + 2
    assert after["character"] == CURRENT_VERSIONS["character"]


# -- 3. a record failing only the final validation was reported as id=- type=chunk ----------

_MSGPACK = msgspec.msgpack.Encoder()


def _region_of(chunks: dict[tuple[int, int], dict[str, Any]]) -> bytes:
    return encode_region(
        rx=0,
        ry=0,
        last_processed_tick=1,
        generation=1,
        writer="test",
        encoding="msgpack",
        chunks={ck: _MSGPACK.encode(raw) for ck, raw in chunks.items()},
        region_size=8,
    )


def _validation_failures(chunks: dict[tuple[int, int], dict[str, Any]]) -> list[Any]:
    res = batch.migrate_region_bytes(
        _region_of(chunks), key="regions/r.0.0.region", rx=0, ry=0, collect_failures=True
    )
    return res.failures


def test_a_record_failing_validation_after_its_steps_is_named() -> None:
    bad = character_raw("npc-bad", 2, 1, 1)
    bad["x"] = "2"  # every step passes it through; the current Character rejects it
    (fail,) = _validation_failures(
        {(0, 0): chunk_raw(0, 0, characters=[character_raw("npc-ok", 1, 1, 1), bad])}
    )
    assert (fail.record_id, fail.record_type, fail.schema_version) == ("npc-bad", "character", 1)
    assert fail.chunk == (0, 0) and fail.error_type == "SchemaError"
    assert "$.characters[1].x" in fail.error and "after upgrading it to v3" in fail.error
    assert "id=npc-bad type=character schemaVersion=1" in fail.describe()


def test_a_society_failing_validation_is_named() -> None:
    soc = society_raw("soc-bad", 0, 0, 1, ["soc-x"])
    soc["name"] = 7
    chunk = chunk_raw(
        0,
        0,
        characters=[character_raw("c-1", 1, 1, 1)],
        societies=[society_raw("soc-ok", 0, 0, 2, []), soc],
    )
    (fail,) = _validation_failures({(0, 0): chunk})
    assert (fail.record_id, fail.record_type, fail.schema_version) == ("soc-bad", "society", 1)


def test_a_chunk_field_failing_validation_names_the_chunk() -> None:
    chunk = chunk_raw(0, 0, characters=[character_raw("c-1", 1, 1, 1)])
    chunk["generator_version"] = "one"
    (fail,) = _validation_failures({(0, 0): chunk})
    assert (fail.record_type, fail.schema_version) == ("chunk", 1)
    assert fail.record_id is None and "$.generator_version" in fail.error


async def test_real_run_failure_and_incident_name_the_record(tmp_path: Path) -> None:
    world = await small_world(tmp_path, regions=2)
    bad = character_raw("npc-bad", 2, 1, 1)
    bad["x"] = "2"
    (world / REGION_KEYS[0]).write_bytes(_region_of({(0, 0): chunk_raw(0, 0, characters=[bad])}))
    async with await LocalStore.open(world) as store:
        report = await migrate_world(store, jobs=1)
        assert report.status == "failed" and report.rolled_back
        (fail,) = report.failures
        assert (fail.record_id, fail.record_type, fail.schema_version) == (
            "npc-bad",
            "character",
            1,
        )
        (inc,) = [
            i for i in (await IncidentLog(store).read()).incidents if i.kind == "migration_failed"
        ]
    assert (inc.details["record_id"], inc.details["record_type"]) == ("npc-bad", "character")


# -- 2. every checkpoint write rewrote the whole list of finished regions -------------------


class CheckpointWrites(LocalStore):
    """Records every checkpoint write (header and done-log entries) that returned, i.e. is
    durable: ``(key, regions listed)``; and whether the header's deletion began."""

    writes: list[tuple[str, list[str]]]
    header_deleted = False

    async def put_atomic(self, key: str, data: bytes) -> str:
        version = await super().put_atomic(key, data)
        if key == CHECKPOINT_KEY or key.startswith(DONE_LOG_PREFIX):
            self.writes.append((key, msgspec.json.decode(data)["done"]))
        return version

    async def delete(self, key: str) -> None:
        if key == CHECKPOINT_KEY:
            self.header_deleted = True
        await super().delete(key)


async def open_recording(root: str | Path, **kw: Any) -> CheckpointWrites:
    store = await CheckpointWrites.open(root, **kw)
    assert isinstance(store, CheckpointWrites)
    store.writes = []
    return store


async def test_a_checkpoint_write_holds_only_the_regions_finished_since_the_last(
    tmp_path: Path,
) -> None:
    world = tmp_path / "w"
    n = 150
    await anyio.to_thread.run_sync(
        lambda: write_world(world, regions=n, chunks_per_region=1, characters_per_chunk=1)
    )
    store = await open_recording(world)
    async with store:
        report = await migrate_world(store, jobs=1, checkpoint_interval=0)
        assert report.ok and report.regions_rewritten == n
        writes = store.writes
    # What all checkpoint writes together list grows with the world, not with its square.
    assert sum(len(done) for _, done in writes) < 4 * n
    headers = [done for key, done in writes if key == CHECKPOINT_KEY]
    entries = [done for key, done in writes if key != CHECKPOINT_KEY]
    # One region per write (jobs=1, no coalescing): each entry lists exactly that region.
    assert all(len(done) == 1 for done in entries)
    assert sorted(d for done in entries for d in done) == sorted(
        {d for done in entries for d in done}
    )
    # The whole list is written only at the start and at a compaction every 64 entries.
    slots = batch._Checkpointer.MIN_SLOTS
    assert len(headers) == 1 + (n - 1) // (slots + 1)
    assert sum(len(done) for done in headers) < n * len(headers)
    # Slots are reused after a compaction: the log never holds more than MIN_SLOTS entries.
    assert len({key for key, _ in writes if key != CHECKPOINT_KEY}) == slots


def _v1_checkpoint(cp: Checkpoint, done: list[str]) -> bytes:
    """A checkpoint as the release before the done log wrote it (schemaVersion 1: no
    ``log_generation``, every finished region in ``done``)."""
    body = msgspec.to_builtins(cp)
    for name in ("checksum", "log_generation"):
        body.pop(name)
    body.update(schemaVersion=1, done=sorted(done))
    enc = msgspec.json.Encoder(order="sorted")
    body["checksum"] = hex64(xxh3(enc.encode(body)))
    return msgspec.json.format(enc.encode(body), indent=2) + b"\n"


class Interrupted(BaseException):
    """Stands in for a kill inside the process: escapes every ``except Exception``."""


class StopAfter:
    """Progress sink that "kills" the run after ``n`` regions."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def start(self, *, total_regions: int, skipped_regions: int) -> None:
        self.skipped = skipped_regions

    def advance(self, *, regions: int, chunks: int) -> None:
        self.seen += regions
        if self.seen >= self.n:
            raise Interrupted


async def interrupt(coro: Awaitable[object]) -> None:
    try:
        await coro
    except BaseException as exc:
        if not isinstance(exc, Interrupted) and not (
            isinstance(exc, BaseExceptionGroup) and exc.subgroup(Interrupted) is not None
        ):
            raise
    else:
        raise AssertionError("the run was not interrupted")


async def test_a_checkpoint_written_before_the_done_log_still_resumes(tmp_path: Path) -> None:
    world = await small_world(tmp_path, regions=6)
    before = record_census(world)
    async with await LocalStore.open(world) as store:
        await interrupt(migrate_world(store, jobs=1, progress=StopAfter(2), checkpoint_interval=0))
        cp = await read_checkpoint(store)
        assert cp is not None and len(cp.done) == 2
        # As if an older release had been interrupted: its checkpoint, no done log.
        for key in await store.list(DONE_LOG_PREFIX):
            await store.delete(key)
        await store.put_atomic(CHECKPOINT_KEY, _v1_checkpoint(cp, cp.done))
        old = await read_checkpoint(store)
        assert old is not None and old.schemaVersion == 1 and old.done == cp.done

        sink = StopAfter(10**6)
        report = await migrate_world(store, resume=True, progress=sink)
        assert report.ok and report.regions_skipped == 2 and sink.skipped == 2
        assert report.regions_rewritten == 4
        assert await read_checkpoint(store) is None and not await store.list(DONE_LOG_PREFIX)
    after = record_census(world)
    assert after.ids == before.ids and not after.stale


async def test_a_checkpoint_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    world = await small_world(tmp_path, regions=2)
    async with await LocalStore.open(world) as store:
        cp = Checkpoint(
            world_id="w", snapshot_id="s", target_versions={}, started_at=0.0, schemaVersion=3
        )
        await store.put_atomic(CHECKPOINT_KEY, batch._encode_checkpoint(cp))
        with pytest.raises(UnsupportedFormat, match="newer release"):
            await read_checkpoint(store)


async def test_a_damaged_done_log_entry_only_costs_rereading_its_regions(tmp_path: Path) -> None:
    world = await small_world(tmp_path, regions=4)
    async with await LocalStore.open(world) as store:
        await interrupt(migrate_world(store, jobs=1, progress=StopAfter(3), checkpoint_interval=0))
        cp = await read_checkpoint(store)
        assert cp is not None and len(cp.done) == 3
        first = batch._entry_key(0)
        blob = await store.get(first)
        await store.put_atomic(first, blob.data.replace(b"regions/", b"regionz/"))
        cp = await read_checkpoint(store)
        assert cp is not None and cp.done == REGION_KEYS[1:3]
        report = await migrate_world(store, resume=True)
        assert report.ok and report.regions_current == 1 and report.regions_rewritten == 1


# The fault layer: a crash at every mutating file operation of a whole run.


def _is_current(data: bytes, key: str) -> bool:
    coords = parse_region_key(key)
    assert coords is not None
    res = batch.migrate_region_bytes(data, key=key, rx=coords[0], ry=coords[1])
    return res.new_data is None and res.chunks_upgraded == 0


def _crashed(exc: BaseException) -> bool:
    if isinstance(exc, SimulatedCrash):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(SimulatedCrash) is not None
    return False


@pytest.mark.parametrize(
    ("torn", "compacting"),
    [(False, False), (True, False), (False, True)],
    ids=["clean", "torn", "compacting"],
)
async def test_a_crash_at_any_step_loses_only_regions_since_the_last_durable_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torn: bool, compacting: bool
) -> None:
    """``compacting``: a log of two slots, so the run rewrites the header under a new
    generation and reuses slots while entries of the old one are still on disk."""
    regions = 4
    if compacting:
        monkeypatch.setattr(batch_module._Checkpointer, "MIN_SLOTS", 2)
        regions = 7
    src = tmp_path / "src"
    await anyio.to_thread.run_sync(
        lambda: write_world(src, regions=regions, chunks_per_region=1, characters_per_chunk=1)
    )
    files = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    keys = sorted(k for k in files if k.startswith("regions/"))
    k = 0
    checked_mid_run = 0
    compactions = 0  # header writes in the longest crashed run
    while True:
        fs = SimulatedFileSystem()
        async with await LocalStore.open("/w", fs=fs) as seed:
            for key, data in files.items():
                await seed.put_atomic(key, data)
        store = await open_recording("/w", fs=fs)
        fs.crash_after(k)
        try:
            report = await migrate_world(store, jobs=1, checkpoint_interval=0)
        except BaseException as exc:
            if not _crashed(exc):
                raise
        else:
            assert report.ok
            break  # k is past the last operation: the run completed
        durable = {region for _, done in store.writes for region in done}

        image = fs.durable_image(torn=torn, rng=random.Random(k))
        async with await LocalStore.open("/w", fs=image) as after:
            cp = await read_checkpoint(after)
            if cp is None:
                # No header yet, or the run was deleting it (every region done by then).
                assert not durable or store.header_deleted
            else:
                checked_mid_run += 1
                done = set(cp.done)
                assert durable <= done, f"crash after op {k}: lost {durable - done}"
                for key in done:
                    assert _is_current((await after.get(key)).data, key), (
                        f"crash after op {k}: {key} marked done but not migrated"
                    )
            # And the world always finishes: resume (or rerun) to every region current.
            report = await migrate_world(after, jobs=1, resume=cp is not None)
            assert report.ok, report.failures
            for key in keys:
                assert _is_current((await after.get(key)).data, key)
            assert await read_checkpoint(after) is None
        if compacting:
            compactions = max(
                compactions, sum(1 for key, _ in store.writes if key == CHECKPOINT_KEY)
            )
        k += 1
    assert checked_mid_run > 10, "no crash landed while the checkpoint was in use"
    if compacting:
        assert compactions >= 3, f"the log was compacted only {compactions - 1} times mid-run"


class FailingCheckpointDelete(LocalStore):
    """Deleting the checkpoint header fails with EIO once."""

    armed = True

    async def delete(self, key: str) -> None:
        if key == CHECKPOINT_KEY and self.armed:
            self.armed = False
            raise StorageUnavailable(f"injected EIO ({errno.EIO})", key=key)
        await super().delete(key)


async def test_a_completed_migration_whose_checkpoint_stays_says_to_resume(
    tmp_path: Path,
) -> None:
    world = await small_world(tmp_path)
    async with await FailingCheckpointDelete.open(world) as store:
        with pytest.raises(StorageUnavailable, match=r"completed.*--resume"):
            await migrate_world(store, jobs=1)
        assert await store.list(CHECKPOINT_KEY) == [CHECKPOINT_KEY]
        report = await migrate_world(store, jobs=1, resume=True)
        assert report.status == "completed" and report.ok
        assert await store.list("state/migrate") == []
