"""Regression tests for defects found in review of the batch migration job.

Each section names the defect it covers; every test here failed before its fix.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from streamer.cli import migrate_cmd
from streamer.errors import StorageUnavailable
from streamer.format.manifest import MANIFEST_KEY, encode_manifest
from streamer.format.region import encode_region
from streamer.migrate import RecoverySnapshots, batch, migrate_world
from streamer.migrate.synth import character_raw, chunk_raw, society_raw, write_world
from streamer.migrate.verify import record_census, tree_digests
from streamer.recovery.incidents import IncidentLog
from streamer.schema.migrations import MigrationRegistry, RawRecord, StepFn
from streamer.schema.records import CURRENT_VERSIONS
from streamer.schema.upgrades import character_v1_to_v2, character_v2_to_v3, society_v1_to_v2
from streamer.storage.base import Blob, BlobStore
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
