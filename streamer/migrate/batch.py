"""Batch migration: bring every record of a world to the current schema, region by region.

``migrate_world`` is the engine behind ``streamer migrate``. For each region file (sorted
keys), in a pool of ``jobs`` workers, it reads and verifies the file, decodes every chunk to
plain data, runs ``MigrationRegistry.upgrade_chunk`` and re-encodes only the chunks that
changed (unchanged chunk bytes are reused verbatim). A region with anything changed is
written as a complete new file (``generation + 1``, same ``last_processed_tick``) with a
compare-and-swap on the version it read; a region file is never modified in place.

Why it is safe to interrupt and to rerun:

- **Idempotent.** A region whose records are all current is read, found unchanged and not
  written. Rerunning over finished regions costs reads, never writes, which is also what
  keeps a lazily migrating live runtime and this job from doing the same work twice.
- **Checkpointed.** ``state/migrate.json`` (atomic put) lists the finished regions, the
  pre-migration snapshot id and the target versions. ``resume=True`` skips the listed
  regions; regions finished after the last checkpoint write are found current and skipped
  by idempotence. A completed run deletes the checkpoint.
- **Rolled back on failure.** The first failing record halts the pool (in-flight regions
  finish their atomic write, no new region starts), the failure is logged with the record's
  id, type and schemaVersion, the pre-migration snapshot is restored and a
  ``migration_failed`` incident is recorded. Afterwards every world file is byte-identical to
  before the run; only bookkeeping differs (``snapshots/``, ``incidents.log``, ``state/``).

Memory is bounded by ``jobs`` regions: a worker holds one region (old and new bytes) at a
time. Decoding and encoding run in worker threads, one hop per region, so the event loop
never blocks on a region's CPU work.

A dry run reads everything and writes nothing: no snapshot, no checkpoint, no incident.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

import anyio
import msgspec

from streamer.errors import (
    IntegrityError,
    MalformedFile,
    NotFound,
    PreconditionFailed,
    SchemaError,
    StorageError,
    StreamerError,
    UnsupportedFormat,
)
from streamer.format.checksum import hex64, xxh3
from streamer.format.manifest import MANIFEST_KEY, encode_manifest
from streamer.format.region import decode_region, encode_region, parse_region_key
from streamer.schema.codec import ChunkCodec, Encoding
from streamer.schema.migrations import CHUNK_NESTED_FIELDS, REGISTRY, MigrationRegistry, RawRecord
from streamer.schema.records import ChunkRecord
from streamer.storage.base import BlobStore
from streamer.worlddir import read_manifest

__all__ = [
    "BOOKKEEPING_DIRS",
    "BOOKKEEPING_FILES",
    "CHECKPOINT_KEY",
    "Checkpoint",
    "CheckpointError",
    "LiveHooks",
    "MigrationInProgress",
    "MigrationProgress",
    "MigrationReport",
    "NoCheckpoint",
    "RecordFailure",
    "RecoverySnapshots",
    "RollbackFailed",
    "SnapshotOps",
    "is_bookkeeping",
    "migrate_world",
    "read_checkpoint",
]

log = logging.getLogger("streamer.migrate")

CHECKPOINT_KEY: Final = "state/migrate.json"
#: Paths a migration (or its rollback) may add or change besides the world's own files: the
#: snapshots (pre-migration, and the pre-restore one a rollback takes), the incident log, the
#: checkpoint and the restore marker, the world lock file and the store's lock stripes. The
#: byte-identical promise after a failed migration holds for every other file.
BOOKKEEPING_FILES: Final = frozenset(
    {"incidents.log", "state/migrate.json", "state/restore.json", ".lock"}
)
BOOKKEEPING_DIRS: Final = ("snapshots/", ".locks/")


def is_bookkeeping(path: str) -> bool:
    """True for a world-relative POSIX path that a migration may add or change."""
    return path in BOOKKEEPING_FILES or path.startswith(BOOKKEEPING_DIRS)


WRITER: Final = "migrate"
#: Attempts per region when its file changes between our read and our compare-and-swap
#: (a live runtime flushed it): re-read and redo the region.
_CAS_ATTEMPTS: Final = 3


# -- errors -------------------------------------------------------------------------------


class CheckpointError(StreamerError):
    """The checkpoint state does not allow the requested run."""


class NoCheckpoint(CheckpointError):
    """``resume=True`` but no interrupted migration is recorded."""


class MigrationInProgress(CheckpointError):
    """An interrupted migration is recorded; a fresh run would take its snapshot mid-way."""


class RollbackFailed(StreamerError):
    """A migration failed and restoring the pre-migration snapshot failed too.

    The checkpoint is left with ``status="rolling_back"``: rerunning with ``resume=True``
    retries the restore.
    """


# -- results ------------------------------------------------------------------------------


class RecordFailure(msgspec.Struct, kw_only=True, frozen=True):
    """One record (or chunk, or region) that could not be migrated."""

    file: str
    region: tuple[int, int] | None = None
    chunk: tuple[int, int] | None = None
    record_id: str | None = None
    record_type: str | None = None
    schema_version: int | None = None
    error_type: str
    error: str

    def describe(self) -> str:
        parts = [self.file]
        if self.chunk is not None:
            parts.append(f"chunk {self.chunk}")
        parts.append(f"id={self.record_id or '-'}")
        parts.append(f"type={self.record_type or '-'}")
        parts.append(
            f"schemaVersion={self.schema_version if self.schema_version is not None else '-'}"
        )
        return " ".join(parts) + f": {self.error_type}: {self.error}"


class MigrationReport(msgspec.Struct, kw_only=True):
    world: str
    dry_run: bool
    resumed: bool
    #: completed: every region is current. failed: rolled back (or dry run found failures).
    status: Literal["completed", "failed", "dry_run"] = "completed"
    target_versions: dict[str, int] = msgspec.field(default_factory=dict)
    snapshot_id: str | None = None
    regions_total: int = 0
    #: Rewritten by this run (for a dry run: would be rewritten).
    regions_rewritten: int = 0
    #: Read and found already current: nothing to write.
    regions_current: int = 0
    #: Listed as finished in the checkpoint of an interrupted run; not read again.
    regions_skipped: int = 0
    chunks_total: int = 0
    chunks_upgraded: int = 0
    records_total: int = 0
    records_upgraded: int = 0
    #: Records seen by this run before migration: ``{type: {schemaVersion: count}}``.
    counts: dict[str, dict[int, int]] = msgspec.field(default_factory=dict)
    #: The failure that halted the run, or the first failures a dry run found.
    failures: list[RecordFailure] = msgspec.field(default_factory=list)
    failures_total: int = 0
    rolled_back: bool = False
    incident_id: str | None = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "failed"


class Checkpoint(msgspec.Struct, kw_only=True):
    """``state/migrate.json``: what an interrupted run finished and where it can roll back to."""

    type: Literal["migrate-checkpoint"] = "migrate-checkpoint"
    schemaVersion: int = 1
    status: Literal["running", "rolling_back"] = "running"
    world_id: str
    snapshot_id: str
    target_versions: dict[str, int]
    started_at: float
    done: list[str] = msgspec.field(default_factory=list)
    #: xxh3 of the canonical encoding without this field: a damaged checkpoint is refused,
    #: never half-trusted (a wrong ``done`` list would skip unmigrated regions).
    checksum: str = ""


# -- hooks ---------------------------------------------------------------------------------


class MigrationProgress(Protocol):
    """Receives progress; the CLI draws a bar with it. Called on the event loop."""

    def start(self, *, total_regions: int, skipped_regions: int) -> None: ...

    def advance(self, *, regions: int, chunks: int) -> None: ...


class SnapshotOps(Protocol):
    """How the pre-migration snapshot is taken and restored (``recovery.snapshots`` by default)."""

    async def create(self, store: BlobStore) -> str: ...

    async def restore(self, store: BlobStore, snapshot_id: str) -> None: ...


RegionLock = Callable[[int, int], AbstractAsyncContextManager[object]]


@dataclass(frozen=True)
class LiveHooks:
    """The seam for running the batch inside a live runtime (same process, world open).

    ``region_lock(rx, ry)`` is held while one region is read, migrated and written, so the
    runtime's flusher cannot interleave a write of the same region; ``region_written`` lets it
    drop its cached index of the file. A region the runtime already migrated lazily is found
    current and not rewritten, and a region it rewrote under us fails our compare-and-swap and
    is redone from its new bytes: that is what prevents double work and lost writes.
    """

    region_lock: RegionLock | None = None
    region_written: Callable[[int, int, bytes, str], Awaitable[None]] | None = None


@asynccontextmanager
async def _no_lock(rx: int, ry: int) -> AsyncIterator[None]:
    del rx, ry
    yield


class RecoverySnapshots:
    """Default ``SnapshotOps``: ``recovery.snapshots``, keeping the newest ``keep`` snapshots.

    The restore takes its own ``pre-restore`` snapshot of the failed state first, so even a
    rollback can be inspected (or undone) by the operator.
    """

    def __init__(self, keep: int = 5) -> None:
        self.keep = keep

    async def create(self, store: BlobStore) -> str:
        from streamer.recovery.snapshots import create_snapshot

        info = await create_snapshot(store, keep=self.keep, reason="pre-migration")
        return info.id

    async def restore(self, store: BlobStore, snapshot_id: str) -> None:
        from streamer.recovery.snapshots import restore_snapshot

        await restore_snapshot(store, snapshot_id, keep=self.keep)


# -- checkpoint ----------------------------------------------------------------------------

_CP_ENCODER: Final = msgspec.json.Encoder(order="sorted")


def _cp_checksum(cp: Checkpoint) -> str:
    body = msgspec.to_builtins(cp)
    body.pop("checksum", None)
    return hex64(xxh3(_CP_ENCODER.encode(body)))


def _encode_checkpoint(cp: Checkpoint) -> bytes:
    sealed = msgspec.structs.replace(cp, checksum=_cp_checksum(cp))
    return msgspec.json.format(_CP_ENCODER.encode(sealed), indent=2) + b"\n"


async def read_checkpoint(store: BlobStore) -> Checkpoint | None:
    """The interrupted run's checkpoint, or ``None``.

    :raises MalformedFile: the checkpoint exists but is damaged.
    """
    try:
        blob = await store.get(CHECKPOINT_KEY)
    except NotFound:
        return None
    try:
        cp = msgspec.json.decode(blob.data, type=Checkpoint)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedFile(f"migration checkpoint unreadable: {exc}", path=CHECKPOINT_KEY) from exc
    actual = _cp_checksum(cp)
    if cp.checksum != actual:
        raise MalformedFile(
            "migration checkpoint checksum mismatch",
            path=CHECKPOINT_KEY,
            expected=cp.checksum,
            actual=actual,
        )
    return cp


class _Checkpointer:
    """Writes the checkpoint at most every ``interval`` seconds (plus on demand).

    Losing the last few entries to a kill only costs re-reading those regions: they are found
    current and skipped, so writes are coalesced rather than paid once per region.
    """

    def __init__(self, store: BlobStore, cp: Checkpoint, interval: float) -> None:
        self._store = store
        self.cp = cp
        self._done = set(cp.done)
        self._interval = interval
        self._last = -math.inf
        self._lock = anyio.Lock()

    async def mark_done(self, key: str) -> None:
        self._done.add(key)
        if time.monotonic() - self._last >= self._interval and not self._lock.locked():
            await self.write()

    async def write(self) -> None:
        async with self._lock:
            self.cp.done = sorted(self._done)
            self._last = time.monotonic()
            await self._store.put_atomic(CHECKPOINT_KEY, _encode_checkpoint(self.cp))


# -- per-region work (runs in a worker thread) ----------------------------------------------


class _RegionFailed(Exception):
    def __init__(self, failure: RecordFailure, cause: BaseException | None = None) -> None:
        super().__init__(failure.describe())
        self.failure = failure
        self.cause = cause


@dataclass
class _RegionResult:
    new_data: bytes | None = None
    chunks: int = 0
    chunks_upgraded: int = 0
    records: int = 0
    records_upgraded: int = 0
    counts: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: list[RecordFailure] = field(default_factory=list)


def _failure(
    key: str,
    region: tuple[int, int] | None,
    chunk: tuple[int, int] | None,
    exc: BaseException,
    raw: Mapping[str, Any] | None = None,
) -> RecordFailure:
    rid = getattr(exc, "record_id", None)
    rtype = getattr(exc, "record_type", None)
    version = getattr(exc, "schema_version", None)
    if rtype is None and raw is not None and isinstance(raw.get("type"), str):
        rtype = raw["type"]
    return RecordFailure(
        file=key,
        region=region,
        chunk=chunk,
        record_id=rid if isinstance(rid, str) else None,
        record_type=rtype if isinstance(rtype, str) else None,
        schema_version=version if type(version) is int else None,
        error_type=type(exc).__name__,
        error=str(exc),
    )


def _count(raw: RawRecord, targets: Mapping[str, int], res: _RegionResult) -> None:
    """Tally the chunk and its nested records by ``(type, schemaVersion)``."""
    items: list[Any] = [raw]
    for fname in CHUNK_NESTED_FIELDS:
        nested = raw.get(fname)
        if isinstance(nested, list):
            items.extend(nested)
    for item in items:
        if not isinstance(item, dict):
            continue
        rtype, version = item.get("type"), item.get("schemaVersion")
        if not isinstance(rtype, str) or type(version) is not int:
            continue  # upgrade_chunk names the malformed record
        res.counts[(rtype, version)] += 1
        res.records += 1
        if version < targets.get(rtype, version):
            res.records_upgraded += 1


_CODECS: Final[dict[str, ChunkCodec]] = {}


def _codec(encoding: Encoding) -> ChunkCodec:
    codec = _CODECS.get(encoding)
    if codec is None:
        codec = _CODECS.setdefault(encoding, ChunkCodec(encoding))
    return codec


# How ``msgspec.convert`` must read plain data decoded from each encoding: msgpack carries
# bytes natively, JSON as base64 strings (the codec's own rule, see ``ChunkCodec``).
_BUILTIN_TYPES: Final[dict[str, tuple[type, ...] | None]] = {"msgpack": (bytes,), "json": None}


def _encode_upgraded(codec: ChunkCodec, up: RawRecord, where: str) -> bytes:
    """Validate an upgraded chunk as the current ``ChunkRecord`` and encode it.

    Equivalent to ``codec.encode_raw`` minus its second ``upgrade_chunk`` pass (``up`` is
    already current), which is a quarter of the CPU per migrated chunk.
    """
    try:
        rec = msgspec.convert(up, ChunkRecord, builtin_types=_BUILTIN_TYPES[codec.encoding])
        return codec.encode(rec)
    except (msgspec.ValidationError, RecursionError, ValueError) as exc:
        # The steps ran but produced something the current record type rejects: that is a
        # step failing, not the stored bytes being damaged.
        raise SchemaError(
            f"migrated chunk does not validate as the current schema: {exc}",
            record_type="chunk",
            where=where,
        ) from exc


def migrate_region_bytes(
    data: bytes,
    *,
    key: str,
    rx: int,
    ry: int,
    registry: MigrationRegistry = REGISTRY,
    collect_failures: bool = False,
    now: float | None = None,
) -> _RegionResult:
    """Verify one region file and migrate its chunks; blocking, pure CPU.

    ``new_data`` is the complete new file, or ``None`` when every chunk is already current
    (or, with ``collect_failures``, when any chunk failed: a dry run only reports).

    :raises _RegionFailed: the file does not verify, or (without ``collect_failures``) a
        chunk fails to migrate.
    """
    region = (rx, ry)
    res = _RegionResult()
    try:
        rf = decode_region(data, rx=rx, ry=ry, path=key)
    except (IntegrityError, UnsupportedFormat) as exc:
        raise _RegionFailed(_failure(key, region, None, exc), exc) from exc
    header = rf.header
    codec = _codec(header.encoding)
    targets = registry.current_versions
    out: dict[tuple[int, int], bytes] = {}
    for ck in sorted(rf.chunks):
        payload = rf.chunks[ck]
        where = f"{key} chunk {ck}"
        res.chunks += 1
        raw: RawRecord | None = None
        try:
            raw = codec.decode_raw(payload, where=where)
            _count(raw, targets, res)
            up, changed = registry.upgrade_chunk(raw, where=where)
            if changed:
                payload = _encode_upgraded(codec, up, where)
                res.chunks_upgraded += 1
        except (SchemaError, IntegrityError) as exc:
            fail = _failure(key, region, ck, exc, raw)
            if not collect_failures:
                raise _RegionFailed(fail, exc) from exc
            res.failures.append(fail)
            continue
        out[ck] = payload
    if res.chunks_upgraded == 0 or res.failures:
        return res
    res.new_data = encode_region(
        rx=rx,
        ry=ry,
        last_processed_tick=header.last_processed_tick,
        generation=header.generation + 1,
        writer=WRITER,
        encoding=header.encoding,
        chunks=out,
        region_size=header.region_size,
        written_at=now,
    )
    return res


# -- the engine ----------------------------------------------------------------------------


@dataclass
class _Run:
    store: BlobStore
    registry: MigrationRegistry
    report: MigrationReport
    dry_run: bool
    hooks: LiveHooks
    progress: MigrationProgress | None
    checkpointer: _Checkpointer | None
    max_failures: int
    cpu: anyio.CapacityLimiter
    counts: Counter[tuple[str, int]] = field(default_factory=Counter)
    halted: RecordFailure | None = None
    halted_cause: BaseException | None = None

    def fail(self, failure: RecordFailure, cause: BaseException | None) -> None:
        if self.halted is None:
            self.halted = failure
            self.halted_cause = cause

    def add(self, res: _RegionResult) -> None:
        r = self.report
        r.chunks_total += res.chunks
        r.chunks_upgraded += res.chunks_upgraded
        r.records_total += res.records
        r.records_upgraded += res.records_upgraded
        self.counts.update(res.counts)
        r.failures_total += len(res.failures)
        room = self.max_failures - len(r.failures)
        if room > 0:
            r.failures.extend(res.failures[:room])

    async def region(self, key: str, rx: int, ry: int) -> None:
        lock = self.hooks.region_lock or _no_lock
        for attempt in range(_CAS_ATTEMPTS):
            async with lock(rx, ry):
                try:
                    blob = await self.store.get(key)
                except NotFound:
                    return  # deleted since listing (region rebuild): nothing left to migrate
                except StorageError as exc:
                    raise _RegionFailed(_failure(key, (rx, ry), None, exc), exc) from exc
                res = await anyio.to_thread.run_sync(
                    self._migrate_sync, blob.data, key, rx, ry, limiter=self.cpu
                )
                if res.new_data is None or self.dry_run:
                    break
                try:
                    version = await self.store.put_if_match(key, res.new_data, blob.version)
                except PreconditionFailed as exc:
                    if attempt + 1 < _CAS_ATTEMPTS:
                        log.info("%s changed while being migrated; redoing it", key)
                        continue
                    raise _RegionFailed(_failure(key, (rx, ry), None, exc), exc) from exc
                except StorageError as exc:
                    raise _RegionFailed(_failure(key, (rx, ry), None, exc), exc) from exc
                if self.hooks.region_written is not None:
                    await self.hooks.region_written(rx, ry, res.new_data, version)
                break
        self.add(res)
        if res.new_data is not None:
            self.report.regions_rewritten += 1
        elif not res.failures:
            self.report.regions_current += 1
        if self.checkpointer is not None:
            try:
                await self.checkpointer.mark_done(key)
            except StorageError as exc:
                raise _RegionFailed(_failure(CHECKPOINT_KEY, None, None, exc), exc) from exc
        if self.progress is not None:
            self.progress.advance(regions=1, chunks=res.chunks)

    def _migrate_sync(self, data: bytes, key: str, rx: int, ry: int) -> _RegionResult:
        return migrate_region_bytes(
            data, key=key, rx=rx, ry=ry, registry=self.registry, collect_failures=self.dry_run
        )

    async def run_pool(self, keys: list[tuple[str, int, int]], jobs: int) -> None:
        it = iter(keys)

        async def worker() -> None:
            # No cancellation on failure: an in-flight region finishes its atomic write before
            # the rollback starts, so no abandoned write can land after the restore.
            while self.halted is None:
                item = next(it, None)
                if item is None:
                    return
                try:
                    await self.region(*item)
                except _RegionFailed as exc:
                    self.fail(exc.failure, exc.cause)

        async with anyio.create_task_group() as tg:
            for _ in range(max(1, min(jobs, len(keys)))):
                tg.start_soon(worker)


async def _region_keys(store: BlobStore) -> list[tuple[str, int, int]]:
    keys = []
    for key in await store.list("regions/"):
        coords = parse_region_key(key)
        if coords is None or key != f"regions/{key.rpartition('/')[2]}":
            continue  # a stray file, reported by `streamer check`, not ours to touch
        keys.append((key, coords[0], coords[1]))
    return keys


async def migrate_world(
    store: BlobStore,
    *,
    jobs: int = 2,
    dry_run: bool = False,
    resume: bool = False,
    progress: MigrationProgress | None = None,
    where: str = "",
    registry: MigrationRegistry = REGISTRY,
    snapshots: SnapshotOps | None = None,
    snapshot_keep: int = 5,
    hooks: LiveHooks | None = None,
    max_failures: int = 10,
    checkpoint_interval: float = 0.25,
) -> MigrationReport:
    """Migrate every record of the world in ``store`` to ``registry``'s current versions.

    The caller holds the world (the CLI takes ``WorldLock``; a live runtime passes ``hooks``).
    Returns a report; ``report.status == "failed"`` means the world was rolled back (or, for
    a dry run, that failures were found). ``registry`` and ``snapshots`` are injectable for
    tests and for the runtime.

    :raises WorldNotFound: ``store`` holds no world.
    :raises NoCheckpoint: ``resume`` but no interrupted run is recorded.
    :raises MigrationInProgress: not ``resume`` but an interrupted run is recorded.
    :raises MalformedFile: the checkpoint is damaged.
    :raises RollbackFailed: the migration failed and the restore failed too.
    :raises StorageError: the snapshot or the first checkpoint could not be written (nothing
        was migrated yet).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    t0 = time.perf_counter()
    manifest = await read_manifest(store, where=where)
    targets = dict(registry.current_versions)
    report = MigrationReport(
        world=where, dry_run=dry_run, resumed=resume and not dry_run, target_versions=targets
    )
    snaps: SnapshotOps = snapshots or RecoverySnapshots(snapshot_keep)
    keys = await _region_keys(store)
    report.regions_total = len(keys)

    checkpointer: _Checkpointer | None = None
    if not dry_run:
        cp = await read_checkpoint(store)
        if resume and cp is None:
            raise NoCheckpoint(
                f"{where or 'world'}: nothing to resume (no {CHECKPOINT_KEY}); "
                "run without --resume to start a migration"
            )
        if not resume and cp is not None:
            raise MigrationInProgress(
                f"{where or 'world'}: an interrupted migration is recorded in {CHECKPOINT_KEY} "
                f"({len(cp.done)} of {len(keys)} regions done, pre-migration snapshot "
                f"{cp.snapshot_id}); rerun with --resume to finish it"
            )
        if cp is not None:
            if cp.world_id != manifest.world_id:
                raise MalformedFile(
                    f"migration checkpoint belongs to world {cp.world_id}, not {manifest.world_id}",
                    path=CHECKPOINT_KEY,
                )
            report.snapshot_id = cp.snapshot_id
            if cp.status == "rolling_back":
                await _rollback(store, snaps, cp, report, None, resumed_rollback=True)
                report.elapsed_s = time.perf_counter() - t0
                return report
            if cp.target_versions != targets:
                log.warning(
                    "checkpoint targets %s, this code %s; finished regions are rechecked",
                    cp.target_versions,
                    targets,
                )
                cp.target_versions = targets
                cp.done = []
        else:
            snapshot_id = await snaps.create(store)
            report.snapshot_id = snapshot_id
            log.info("pre-migration snapshot %s", snapshot_id)
            cp = Checkpoint(
                world_id=manifest.world_id,
                snapshot_id=snapshot_id,
                target_versions=targets,
                started_at=time.time(),
            )
        checkpointer = _Checkpointer(store, cp, checkpoint_interval)
        await checkpointer.write()

    done = set(checkpointer.cp.done) if checkpointer is not None else set()
    pending = [k for k in keys if k[0] not in done]
    report.regions_skipped = len(keys) - len(pending)
    if progress is not None:
        progress.start(total_regions=len(keys), skipped_regions=report.regions_skipped)

    run = _Run(
        store=store,
        registry=registry,
        report=report,
        dry_run=dry_run,
        hooks=hooks or LiveHooks(),
        progress=progress,
        checkpointer=checkpointer,
        max_failures=max_failures,
        cpu=anyio.CapacityLimiter(jobs),
    )
    await run.run_pool(pending, jobs)
    report.counts = _nest_counts(run.counts)

    if dry_run:
        report.status = "failed" if report.failures_total else "dry_run"
    elif run.halted is not None:
        assert checkpointer is not None
        report.failures = [run.halted]
        report.failures_total = 1
        _log_failure(run.halted, run.halted_cause)
        await _rollback(store, snaps, checkpointer.cp, report, run.halted, resumed_rollback=False)
    else:
        assert checkpointer is not None
        try:
            await _finish(store, manifest_targets=targets, where=where)
        except StreamerError as exc:
            # Every region is done, but "failed" must still mean "as before": roll back.
            fail = _failure(MANIFEST_KEY, None, None, exc)
            report.failures, report.failures_total = [fail], 1
            _log_failure(fail, exc)
            await _rollback(store, snaps, checkpointer.cp, report, fail, resumed_rollback=False)
        else:
            await store.delete(CHECKPOINT_KEY)
            report.status = "completed"
    report.elapsed_s = time.perf_counter() - t0
    return report


async def _finish(store: BlobStore, *, manifest_targets: dict[str, int], where: str) -> None:
    """Record in the manifest that every record is now written at the target versions."""
    manifest = await read_manifest(store, where=where)
    merged = {**manifest.record_versions, **manifest_targets}
    if merged != manifest.record_versions:
        updated = msgspec.structs.replace(manifest, record_versions=merged)
        await store.put_atomic(MANIFEST_KEY, encode_manifest(updated))


def _nest_counts(counts: Counter[tuple[str, int]]) -> dict[str, dict[int, int]]:
    out: dict[str, dict[int, int]] = {}
    for (rtype, version), n in sorted(counts.items()):
        out.setdefault(rtype, {})[version] = n
    return out


def _log_failure(failure: RecordFailure, cause: BaseException | None) -> None:
    log.error(
        "migration failed: id=%s type=%s schemaVersion=%s file=%s chunk=%s: %s: %s",
        failure.record_id,
        failure.record_type,
        failure.schema_version,
        failure.file,
        failure.chunk,
        failure.error_type,
        failure.error,
        exc_info=cause,
    )


async def _rollback(
    store: BlobStore,
    snaps: SnapshotOps,
    cp: Checkpoint,
    report: MigrationReport,
    failure: RecordFailure | None,
    *,
    resumed_rollback: bool,
) -> None:
    """Restore the pre-migration snapshot, record the incident, drop the checkpoint.

    The checkpoint is marked ``rolling_back`` first, so a crash during the restore makes the
    next ``--resume`` finish the restore instead of continuing the migration.
    """
    report.status = "failed"
    report.snapshot_id = cp.snapshot_id
    cp.status = "rolling_back"
    try:
        await store.put_atomic(CHECKPOINT_KEY, _encode_checkpoint(cp))
    except StorageError as exc:
        log.error("cannot mark the checkpoint rolling_back: %s (restoring anyway)", exc)
    restore_error: BaseException | None = None
    try:
        await snaps.restore(store, cp.snapshot_id)
    except StreamerError as exc:
        restore_error = exc
        log.error("restoring pre-migration snapshot %s failed: %s", cp.snapshot_id, exc)
    report.rolled_back = restore_error is None

    details: dict[str, Any] = {
        "snapshot_id": cp.snapshot_id,
        "target_versions": cp.target_versions,
        "rolled_back": report.rolled_back,
        "regions_rewritten_before_rollback": report.regions_rewritten,
    }
    if failure is not None:
        details.update(
            record_id=failure.record_id,
            record_type=failure.record_type,
            schema_version=failure.schema_version,
            chunk=list(failure.chunk) if failure.chunk is not None else None,
            error_type=failure.error_type,
            error=failure.error,
        )
    if resumed_rollback:
        details["note"] = "an earlier run was interrupted while rolling back; restore finished"
    if restore_error is None:
        action = (
            f"rolled back to pre-migration snapshot {cp.snapshot_id}; the world is as it was "
            "before the migration. Fix the migration step or the data, then rerun "
            "`streamer migrate` (see docs/migrations.md)"
        )
    else:
        details["restore_error"] = str(restore_error)
        action = (
            f"ROLLBACK FAILED: restore snapshot {cp.snapshot_id} by hand or rerun "
            "`streamer migrate --resume` to retry the restore"
        )
    try:
        from streamer.recovery.incidents import IncidentLog

        incident = await IncidentLog(store).record(
            "migration_failed",
            region=failure.region if failure is not None else None,
            file=failure.file if failure is not None else None,
            details=details,
            action=action,
        )
        report.incident_id = incident.id
    except StorageError as exc:
        log.error("cannot record the migration_failed incident: %s", exc)

    if restore_error is not None:
        raise RollbackFailed(
            f"migration failed and restoring pre-migration snapshot {cp.snapshot_id} failed: "
            f"{restore_error}; rerun with --resume to retry the restore"
        ) from restore_error
    try:
        await store.delete(CHECKPOINT_KEY)
    except StorageError as exc:
        log.error("cannot remove %s after rollback: %s", CHECKPOINT_KEY, exc)
