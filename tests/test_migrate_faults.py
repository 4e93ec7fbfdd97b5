"""A failed migration leaves the world exactly as it was; a killed one resumes to completion.

"Exactly as it was" is checked with ``tree_digests``: the xxh3 of every file below the world
root, excluding only migration bookkeeping (``streamer.migrate.is_bookkeeping``: the
``snapshots/`` directory, ``incidents.log``, the ``state/migrate.json`` checkpoint and the
``state/restore.json`` marker, and the ``.lock`` / ``.locks/`` lock files). Region files, the
manifest, every other file: byte-identical.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from streamer.errors import StorageUnavailable
from streamer.format.manifest import MANIFEST_KEY
from streamer.migrate import (
    CHECKPOINT_KEY,
    RecoverySnapshots,
    migrate_world,
    read_checkpoint,
)
from streamer.migrate.batch import _entry_key
from streamer.migrate.synth import write_world
from streamer.migrate.verify import Census, record_census, tree_digests
from streamer.recovery.incidents import IncidentLog
from streamer.schema.migrations import REGISTRY, MigrationRegistry, RawRecord, StepFn
from streamer.schema.records import CURRENT_VERSIONS
from streamer.schema.upgrades import character_v1_to_v2, character_v2_to_v3, society_v1_to_v2
from streamer.storage.base import BlobStore
from streamer.storage.local import LocalStore

FIXTURES = Path(__file__).parent / "fixtures"

SHIPPED: dict[tuple[str, int], StepFn] = {
    ("character", 1): character_v1_to_v2,
    ("character", 2): character_v2_to_v3,
    ("society", 1): society_v1_to_v2,
}


def faulty_registry(record_id: str, rtype: str, from_version: int) -> MigrationRegistry:
    """The shipped steps, except that one step raises for one record."""
    reg = MigrationRegistry()
    for (t, v), fn in SHIPPED.items():

        def step(rec: RawRecord, fn: StepFn = fn, t: str = t, v: int = v) -> RawRecord:
            if rec.get("id") == record_id and (t, v) == (rtype, from_version):
                raise ValueError(f"injected fault in {t} v{v}->v{v + 1}")
            return fn(rec)

        reg.register(t, v, step)
    return reg


def migration_steps(root: Path) -> list[tuple[str, str, int]]:
    """Every ``(record id, type, from_version)`` step a migration of ``root`` will run."""
    from streamer.format.region import decode_region, parse_region_key
    from streamer.schema.codec import ChunkCodec

    steps = []
    for path in sorted((root / "regions").iterdir()):
        key = f"regions/{path.name}"
        coords = parse_region_key(key)
        assert coords is not None
        rf = decode_region(path.read_bytes(), rx=coords[0], ry=coords[1], path=key)
        codec = ChunkCodec(rf.header.encoding)
        for payload in rf.chunks.values():
            raw = codec.decode_raw(payload, where=key)
            for field in ("characters", "societies"):
                for rec in raw.get(field, []):
                    for v in range(rec["schemaVersion"], CURRENT_VERSIONS[rec["type"]]):
                        steps.append((rec["id"], rec["type"], v))
    return steps


def assert_fully_migrated(world: Path, before: Census) -> None:
    after = record_census(world)
    assert after.ids == before.ids, "records lost or added"
    assert not after.duplicates
    assert not after.stale, f"records left at old versions: {after.stale}"
    assert not (world / CHECKPOINT_KEY).exists()


# -- a fault at every record step ----------------------------------------------------------

STEP_CASES = [
    (name, step) for name in ("world-v1", "world-v2") for step in migration_steps(FIXTURES / name)
]


def test_every_step_is_covered() -> None:
    assert len(STEP_CASES) == 15  # 12 in world-v1, 3 in world-v2


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize(
    ("fixture", "step"), STEP_CASES, ids=[f"{n}-{s[0]}-v{s[2]}" for n, s in STEP_CASES]
)
async def test_fault_at_each_record_step_rolls_back_byte_identical(
    tmp_path: Path, fixture: str, step: tuple[str, str, int], jobs: int
) -> None:
    record_id, rtype, version = step
    world = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, world)
    before_files = tree_digests(world)
    before = record_census(world)
    async with await LocalStore.open(world) as store:
        report = await migrate_world(
            store, jobs=jobs, registry=faulty_registry(record_id, rtype, version)
        )
        assert report.status == "failed" and report.rolled_back and not report.ok
        (fail,) = report.failures
        assert (fail.record_id, fail.record_type, fail.schema_version) == (
            record_id,
            rtype,
            version,
        )
        assert fail.error_type == "MigrationFailed" and "injected fault" in fail.error
        assert tree_digests(world) == before_files
        assert await read_checkpoint(store) is None
        (inc,) = [
            i for i in (await IncidentLog(store).read()).incidents if i.kind == "migration_failed"
        ]
        assert inc.details["record_id"] == record_id
        assert inc.details["schema_version"] == version
        assert inc.details["snapshot_id"] == report.snapshot_id
        assert "rolled back" in inc.action

        # The fix: the shipped steps. A plain rerun (no --resume) now succeeds.
        fixed = await migrate_world(store, jobs=jobs, registry=REGISTRY)
        assert fixed.ok and fixed.regions_rewritten == fixed.regions_total
    assert_fully_migrated(world, before)


class FaultyStep:
    """A shipped step that raises for one record; module level, so it pickles by value and a
    registry of them can be sent to worker processes (a closure cannot)."""

    def __init__(self, fn: StepFn, rtype: str, version: int, fault: tuple[str, str, int]) -> None:
        self.fn, self.rtype, self.version, self.fault = fn, rtype, version, fault

    def __call__(self, rec: RawRecord) -> RawRecord:
        if (rec.get("id"), self.rtype, self.version) == self.fault:
            raise ValueError(f"injected fault in {self.rtype} v{self.version}->v{self.version + 1}")
        return self.fn(rec)


def picklable_faulty_registry(record_id: str, rtype: str, from_version: int) -> MigrationRegistry:
    reg = MigrationRegistry()
    for (t, v), fn in SHIPPED.items():
        reg.register(t, v, FaultyStep(fn, t, v, (record_id, rtype, from_version)))
    return reg


@pytest.mark.parametrize(
    ("fixture", "step"), STEP_CASES, ids=[f"{n}-{s[0]}-v{s[2]}" for n, s in STEP_CASES]
)
async def test_fault_in_a_worker_process_rolls_back_byte_identical(
    tmp_path: Path, fixture: str, step: tuple[str, str, int]
) -> None:
    """The same guarantees when the failing step runs in a worker process: the failure
    crosses the process boundary with the record's id, type and schemaVersion."""
    record_id, rtype, version = step
    world = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, world)
    before_files = tree_digests(world)
    async with await LocalStore.open(world) as store:
        report = await migrate_world(
            store,
            jobs=2,
            registry=picklable_faulty_registry(record_id, rtype, version),
            workers="processes",
        )
        assert report.status == "failed" and report.rolled_back
        (fail,) = report.failures
        assert (fail.record_id, fail.record_type, fail.schema_version) == (
            record_id,
            rtype,
            version,
        )
        assert fail.error_type == "MigrationFailed" and "injected fault" in fail.error
        assert tree_digests(world) == before_files
        assert await read_checkpoint(store) is None
        (inc,) = [
            i for i in (await IncidentLog(store).read()).incidents if i.kind == "migration_failed"
        ]
        assert (inc.details["record_id"], inc.details["schema_version"]) == (record_id, version)


class DieStep:
    """A step that kills the worker process running it (picklable, see ``FaultyStep``)."""

    def __init__(self, fn: StepFn) -> None:
        self.fn = fn

    def __call__(self, rec: RawRecord) -> RawRecord:
        if rec.get("id") == "c-8-0-1":
            os._exit(3)
        return self.fn(rec)


async def test_a_worker_process_that_dies_fails_its_region_and_rolls_back(
    tmp_path: Path,
) -> None:
    world = tmp_path / "w"
    await anyio.to_thread.run_sync(lambda: write_world(world, regions=3, chunks_per_region=2))
    before_files = tree_digests(world)
    reg = MigrationRegistry()
    for (t, v), fn in SHIPPED.items():
        reg.register(t, v, DieStep(fn))
    async with await LocalStore.open(world) as store:
        report = await migrate_world(store, jobs=2, registry=reg, workers="processes")
    assert report.status == "failed" and report.rolled_back
    (fail,) = report.failures
    assert fail.error_type == "BrokenExecutor" and fail.file == "regions/r.1.0.region"
    assert "died" in fail.error
    assert tree_digests(world) == before_files


# -- a fault at every region step ----------------------------------------------------------


class FaultStore(LocalStore):
    """Fails one operation once: ``(op, key, nth)`` with op in get / put / put_lost_ack /
    put_atomic. ``put_lost_ack`` lets the write land and then reports it failed (the
    acknowledgement was lost), the nastiest case for a rollback."""

    fault: tuple[str, str, int] | None = None
    seen: dict[tuple[str, str], int]
    fired = False

    def _hit(self, op: str, key: str) -> bool:
        if self.fault is None or self.fired or (op, key) != self.fault[:2]:
            return False
        n = self.seen.get((op, key), 0) + 1
        self.seen[(op, key)] = n
        if n == self.fault[2]:
            self.fired = True
            return True
        return False

    def _error(self, key: str) -> StorageUnavailable:
        return StorageUnavailable(f"injected EIO ({errno.EIO})", key=key)

    async def get(self, key: str) -> Any:
        if self._hit("get", key):
            raise self._error(key)
        return await super().get(key)

    async def put_if_match(self, key: str, data: bytes, if_match: str | None) -> str:
        if self._hit("put", key):
            raise self._error(key)
        version = await super().put_if_match(key, data, if_match)
        if self._hit("put_lost_ack", key):
            raise self._error(key)
        return version

    async def put_atomic(self, key: str, data: bytes) -> str:
        if self._hit("put_atomic", key):
            raise self._error(key)
        return await super().put_atomic(key, data)


async def open_faulty(world: Path, fault: tuple[str, str, int]) -> FaultStore:
    store = await FaultStore.open(world)
    assert isinstance(store, FaultStore)
    store.fault, store.seen = fault, {}
    return store


REGION_KEYS = ["regions/r.0.0.region", "regions/r.1.0.region", "regions/r.2.0.region"]
REGION_FAULTS = [
    *((op, key, 1) for key in REGION_KEYS for op in ("get", "put", "put_lost_ack")),
    # The checkpoint write after the k-th finished region: the k-th done-log entry (the
    # header is written once, at the start).
    *(("put_atomic", _entry_key(k), 1) for k in range(len(REGION_KEYS))),
    # Recording the new versions in the manifest, after every region is done.
    ("put_atomic", MANIFEST_KEY, 1),
]


# With several jobs, checkpoint writes coalesce, so only the first one after a region is
# certain to happen.
REGION_CASES = [
    (f, j)
    for f in REGION_FAULTS
    for j in (1, 3)
    if j == 1 or f[1] not in (_entry_key(1), _entry_key(2))
]


@pytest.mark.parametrize(
    ("fault", "jobs"), REGION_CASES, ids=[f"{o}-{k}-{n}-jobs{j}" for (o, k, n), j in REGION_CASES]
)
async def test_fault_at_each_region_step_rolls_back_byte_identical(
    tmp_path: Path, fault: tuple[str, str, int], jobs: int
) -> None:
    world = tmp_path / "w"
    await anyio.to_thread.run_sync(lambda: write_world(world, regions=3, chunks_per_region=2))
    before_files = tree_digests(world)
    before = record_census(world)
    store = await open_faulty(world, fault)
    async with store:
        report = await migrate_world(store, jobs=jobs, checkpoint_interval=0)
        assert store.fired, "the fault was never reached"
        assert report.status == "failed" and report.rolled_back
        (fail,) = report.failures
        assert fail.file == fault[1] and fail.error_type == "StorageUnavailable"
        assert "injected EIO" in fail.error
        assert tree_digests(world) == before_files
        kinds = [i.kind for i in (await IncidentLog(store).read()).incidents]
        assert kinds.count("migration_failed") == 1
        assert await read_checkpoint(store) is None
    async with await LocalStore.open(world) as fixed:
        assert (await migrate_world(fixed, jobs=jobs)).ok
    assert_fully_migrated(world, before)


@pytest.mark.parametrize(
    "fault",
    [("put_atomic", CHECKPOINT_KEY, 1), ("put", "snapshot", 0)],
    ids=["checkpoint", "snapshot"],
)
async def test_fault_before_any_region_leaves_world_untouched(
    tmp_path: Path, fault: tuple[str, str, int]
) -> None:
    world = tmp_path / "w"
    await anyio.to_thread.run_sync(lambda: write_world(world, regions=2, chunks_per_region=1))
    before_files = tree_digests(world)

    class BrokenSnapshots(RecoverySnapshots):
        async def create(self, store: BlobStore) -> str:
            raise StorageUnavailable("injected: disk full", key="snapshots/")

    snaps = BrokenSnapshots() if fault[1] == "snapshot" else None
    async with await open_faulty(world, fault) as store:
        with pytest.raises(StorageUnavailable, match="injected"):
            await migrate_world(store, snapshots=snaps)
    assert tree_digests(world) == before_files


async def test_crash_during_rollback_is_finished_by_resume(tmp_path: Path) -> None:
    world = shutil.copytree(FIXTURES / "world-v1", tmp_path / "w")
    before_files = tree_digests(world)

    class Crash(BaseException):
        pass

    class CrashingRestore(RecoverySnapshots):
        async def restore(self, store: BlobStore, snapshot_id: str) -> None:
            raise Crash

    async with await LocalStore.open(world) as store:
        crashed = False
        try:
            await migrate_world(
                store,
                jobs=1,
                registry=faulty_registry("player-ada", "character", 2),
                snapshots=CrashingRestore(),
            )
        except Crash:
            crashed = True
        assert crashed
        cp = await read_checkpoint(store)
        assert cp is not None and cp.status == "rolling_back"
        assert tree_digests(world) != before_files  # regions before the fault were rewritten

        report = await migrate_world(store, resume=True)
        assert report.status == "failed" and report.rolled_back
        assert tree_digests(world) == before_files
        assert await read_checkpoint(store) is None


async def test_rollback_failure_is_reported_and_retryable(tmp_path: Path) -> None:
    world = shutil.copytree(FIXTURES / "world-v1", tmp_path / "w")
    before_files = tree_digests(world)

    class FailingRestore(RecoverySnapshots):
        async def restore(self, store: BlobStore, snapshot_id: str) -> None:
            raise StorageUnavailable("injected: restore failed", key="regions/")

    from streamer.migrate import RollbackFailed

    async with await LocalStore.open(world) as store:
        with pytest.raises(RollbackFailed, match="--resume"):
            await migrate_world(
                store,
                registry=faulty_registry("npc-bob", "character", 1),
                snapshots=FailingRestore(),
            )
        incidents = (await IncidentLog(store).read()).incidents
        assert "ROLLBACK FAILED" in incidents[-1].action
        report = await migrate_world(store, resume=True)
        assert report.rolled_back
    assert tree_digests(world) == before_files


# -- killed at random points ---------------------------------------------------------------


def _cli(world: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamer.cli.migrate_cmd", str(world), "--jobs", "2", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _finish(proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()
    return proc.returncode


def test_sigkill_at_random_points_then_resume_migrates_every_record_once(
    tmp_path: Path, torture: bool
) -> None:
    kills_wanted = 200 if torture else 20
    base = tmp_path / "base"
    write_world(base, regions=24, chunks_per_region=8, characters_per_chunk=3)
    before = record_census(base)
    assert before.stale

    # Calibrate: how long a whole run takes here, so kills land across all of it.
    probe = shutil.copytree(base, tmp_path / "probe")
    t0 = time.monotonic()
    _finish(_cli(probe))
    full = time.monotonic() - t0
    assert_fully_migrated(probe, before)

    # And how long until it does real work (the same start-up, then "nothing to resume"):
    # kills before that only re-test an untouched world.
    t0 = time.monotonic()
    start = _cli(base, "--resume")
    start.communicate(timeout=60)
    assert start.returncode == 2
    startup = time.monotonic() - t0

    rng = random.Random(20261126)
    kills = episodes = resumed_runs = 0
    while kills < kills_wanted:
        episodes += 1
        world = tmp_path / f"ep{episodes}"
        shutil.copytree(base, world)
        for attempt in range(4):
            resume = (world / CHECKPOINT_KEY).exists()
            resumed_runs += resume
            proc = _cli(world, *(["--resume"] if resume else []))
            if attempt == 3 or kills >= kills_wanted:
                _finish(proc)
                break
            # Half the first runs' kills wait for the checkpoint first, so some always land
            # inside a recorded run whatever this machine's speed; the rest land anywhere in
            # a run. (A resumed run finds its checkpoint at once: waiting for it would kill
            # it during start-up, which only re-tests an untouched run.)
            if (
                not resume
                and rng.random() < 0.5
                and _wait_for(world / CHECKPOINT_KEY, proc, full * 2)
            ):
                delay = rng.uniform(0, max(full - startup, 0.01) * 0.5)
            else:
                delay = rng.uniform(startup * 0.9, full * 1.05)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.kill()  # SIGKILL
                proc.communicate()
                kills += 1
                continue
            _finish(proc)
            break
        assert_fully_migrated(world, before)
        shutil.rmtree(world)
    print(f"startup={startup:.2f}s full={full:.2f}s kills={kills} resumed={resumed_runs}")
    assert resumed_runs > 0, "no kill ever landed after the checkpoint was written"


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Poll until ``path`` exists (True) or ``proc`` exits or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


async def test_an_unexpected_error_in_a_region_still_halts_and_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a record failure (a bug, an encoder error): it must not escape past the rollback."""
    from streamer.migrate import batch

    world = tmp_path / "world-v1"
    shutil.copytree(FIXTURES / "world-v1", world)
    before_files = tree_digests(world)
    real = batch.migrate_region_bytes
    calls = 0

    def flaky(data: bytes, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("encoder exploded")
        return real(data, **kw)

    monkeypatch.setattr(batch, "migrate_region_bytes", flaky)
    async with await LocalStore.open(world) as store:
        report = await migrate_world(store, jobs=1)
        assert report.status == "failed" and report.rolled_back
        assert report.failures[0].error_type == "RuntimeError"
        assert tree_digests(world) == before_files
        assert await read_checkpoint(store) is None
