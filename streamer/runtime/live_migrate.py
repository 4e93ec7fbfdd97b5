"""Live migration: bring every record of an *open* world to the current schema now.

``World.migrate()`` is the in-process counterpart of ``streamer migrate`` (which refuses a
world held by a running server). It runs region by region, ``jobs`` at a time, and each
region is handled under the runtime's own per-region exclusion, so neither the loader nor
the flusher can interleave with it:

- the region's **flush lock** (``World._flush_locks``): no fold of the region runs, so no
  region file is written behind our back and no fold can copy payloads we are replacing;
- for a region that is not in memory, also the region's **loading slot**
  (``World._region_loading``): a concurrent ``chunk()``/``submit()`` that needs the region
  waits for us and then loads the migrated file, instead of loading (and lazily migrating)
  the old one.

Then, one of two paths, never both:

- **resident** (the runtime holds the region's ``RegionState``, possibly with loaded chunks
  and queued deltas): the file is *not* migrated again. Each chunk whose in-memory payload
  is still old is upgraded through the codec's lazy path and its re-encoded current payload
  replaces the old one in the state (marked ``upgraded``); chunks the runtime already
  upgraded lazily hold current payloads and are skipped. The runtime's own write path
  (``World._flush_region``, a one-region ``_flush_regions``) then persists the region,
  folding its deltas as a routine flush would. One chunk at a time, with no await between
  reading a payload and replacing it, so a player's load of the same chunk sees either the
  old payload (and upgrades it itself, after which we find it current) or the new one:
  never both.
- **on file** (not resident): the batch's per-region step (``migrate_region_bytes``, the
  function behind ``streamer migrate``) rewrites the file with a compare-and-swap; cached
  chunks of the region are invalidated so the next read goes through the new file.

Either way each old record is upgraded exactly once, and the upgraded record is what gets
written. The world keeps serving and accepting deltas throughout.

Failures differ from the closed-world batch on purpose (docs/migrations.md, "Live
migration"): rolling a live world back to the pre-migration snapshot would undo deltas
acknowledged to players meanwhile. On the first failing record the run halts (regions in
flight finish), logs the record's id, type, schemaVersion and error, records a
``migration_failed`` incident and raises :class:`LiveMigrationFailed`. Regions already
migrated stay migrated (valid current-version data), nothing is marked inactive, and the
failing region is left as it was: old records keep being served through the lazy path
(which fails for that one record's chunk exactly as before).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec

from streamer.coords import region_chunks
from streamer.errors import (
    IntegrityError,
    MigrationFailed,
    NotFound,
    PreconditionFailed,
    SchemaError,
    StorageError,
    StreamerError,
)
from streamer.format.manifest import MANIFEST_KEY, encode_manifest
from streamer.migrate.batch import (
    _PEEKERS,
    MigrationProgress,
    MigrationReport,
    RecordFailure,
    _current_heads,
    _failure,
    _log_failure,
    _nest_counts,
    _peek_heads,
    _region_keys,
    _RegionFailed,
    _RegionResult,
    migrate_region_bytes,
    run_region_pool,
)
from streamer.runtime.regionstate import RegionState
from streamer.schema import codec as _codec_module
from streamer.schema.codec import ChunkCodec
from streamer.schema.migrations import MigrationRegistry
from streamer.worlddir import read_manifest

if TYPE_CHECKING:
    from streamer.runtime.world import World

__all__ = [
    "LiveMigrationFailed",
    "LiveMigrationReport",
    "migrate_live",
    "upgrade_in_memory",
]

log = logging.getLogger("streamer.migrate.live")

ChunkKey = tuple[int, int]
RegionKey = tuple[int, int]

#: Attempts per region when its file changes between our read and our compare-and-swap
#: (nothing in the runtime should write it while we hold the exclusion; a defence only).
_CAS_ATTEMPTS: Final = 3
_PEEK_ERRORS: Final = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


class LiveMigrationReport(MigrationReport, kw_only=True):
    """``MigrationReport`` plus how the regions were handled (see the module docstring)."""

    #: Regions the runtime held in memory: upgraded there and persisted by its own flush.
    regions_in_memory: int = 0
    #: Regions not in memory whose file the batch step rewrote.
    regions_on_file: int = 0
    #: Inactive regions (taken out of service after corruption): not touched.
    regions_inactive: int = 0


class LiveMigrationFailed(MigrationFailed):
    """A live migration halted on a failing record; ``report`` says what was done."""

    def __init__(
        self, message: str, *, report: LiveMigrationReport, failure: RecordFailure
    ) -> None:
        super().__init__(
            message,
            record_type=failure.record_type,
            record_id=failure.record_id,
            schema_version=failure.schema_version,
            where=failure.file
            if failure.chunk is None
            else f"{failure.file} chunk {failure.chunk}",
        )
        self.report = report
        self.failure = failure


def _registry() -> MigrationRegistry:
    # The codec's registry, read at call time: the lazy path and this run must use the same
    # steps (tests swap ``streamer.schema.codec.REGISTRY`` for an instrumented one).
    reg: MigrationRegistry = vars(_codec_module)["REGISTRY"]
    return reg


def _upgrade_one(
    state: RegionState,
    ck: ChunkKey,
    codec: ChunkCodec,
    current: Any,
    counts: Counter[tuple[str, int]],
) -> bool:
    """Upgrade chunk ``ck`` of ``state`` in memory if its payload is old. Synchronous.

    True when the payload was replaced (and ``ck`` marked upgraded). The chunk's records are
    tallied in ``counts`` (by their stored versions).

    :raises SchemaError, IntegrityError: the chunk cannot be decoded or migrated.
    """
    payload = state.chunks.get(ck)
    if payload is None:
        return False
    try:
        heads = _PEEKERS[codec.encoding].decode(payload)
    except _PEEK_ERRORS:
        heads = None  # the codec gives the authoritative answer below
    if heads is not None and _peek_heads(heads, current, counts):
        return False
    where = f"{state.path} chunk ({ck[0]}, {ck[1]})"
    decoded = codec.decode(payload, where=where)
    if not decoded.upgraded:
        return False
    state.chunks[ck] = codec.encode(decoded.record)
    state.upgraded.add(ck)
    return True


def upgrade_in_memory(
    state: RegionState, keys: Iterable[ChunkKey], codec: ChunkCodec
) -> set[ChunkKey]:
    """Upgrade the old payloads among ``keys`` in ``state``; return the chunks upgraded.

    Used by a flush's preparation (``_FlushPath._prepare``) before its fold hops to a
    worker thread: the fold then finds current payloads, so a load of the same chunk during
    the fold does not migrate the record a second time. Synchronous (run on the event loop,
    no await inside). A chunk that fails is left as it is: the fold decodes it again and
    reports the error as before.
    """
    current = _current_heads(_registry().current_versions)
    scratch: Counter[tuple[str, int]] = Counter()
    done: set[ChunkKey] = set()
    for ck in keys:
        try:
            if _upgrade_one(state, ck, codec, current, scratch):
                done.add(ck)
        except StreamerError:
            continue
    return done


@dataclass
class _LiveRun:
    world: World
    registry: MigrationRegistry
    report: LiveMigrationReport
    progress: MigrationProgress | None
    counts: Counter[tuple[str, int]] = field(default_factory=Counter)
    halted: RecordFailure | None = None
    halted_cause: BaseException | None = None

    def fail(self, failure: RecordFailure, cause: BaseException | None) -> None:
        if self.halted is None:
            self.halted = failure
            self.halted_cause = cause

    def _done(self, chunks: int) -> None:
        if self.progress is not None:
            self.progress.advance(regions=1, chunks=chunks)

    async def region(self, key: str, rx: int, ry: int) -> None:
        world = self.world
        rk = (rx, ry)
        while True:
            if rk in world._inactive:
                self.report.regions_inactive += 1
                self._done(0)
                return
            loading = world._region_loading.get(rk)
            if loading is not None:
                await loading.wait()  # a load in flight: the region becomes resident (or not)
                continue
            lock = world._flush_lock(rk)
            async with lock:
                state = world._regions.get(rk)
                if state is None:
                    if rk in world._region_loading:
                        continue  # a load started while we waited for the lock
                    done = anyio.Event()
                    world._region_loading[rk] = done  # loaders of this region wait for us
                    try:
                        async with world._flush_limiter:
                            await self._on_file(key, rx, ry)
                    finally:
                        if world._region_loading.get(rk) is done:
                            del world._region_loading[rk]
                        done.set()
                    return
                upgraded = await self._in_memory(state)
            if upgraded is None:
                continue  # the state left memory before we changed it: decide again
            await self._persist(state, upgraded)
            return

    async def _in_memory(self, state: RegionState) -> int | None:
        """Upgrade the resident state's old payloads, one chunk at a time; the number done.

        ``None``: the state was evicted (or replaced) meanwhile, so the caller decides again.
        """
        world = self.world
        codec = world._codec
        assert codec is not None
        current = _current_heads(self.registry.current_versions)
        counts: Counter[tuple[str, int]] = Counter()
        n = 0
        for ck in sorted(state.chunks):
            if world._regions.get(state.key) is not state:
                return None
            try:
                if _upgrade_one(state, ck, codec, current, counts):
                    n += 1
            except (SchemaError, IntegrityError) as exc:
                self._tally(counts, state.key, chunks=0)
                raise _RegionFailed(_failure(state.path, state.key, ck, exc), exc) from exc
            # Between chunks only: each chunk's read-upgrade-replace is atomic on the loop.
            await anyio.lowlevel.checkpoint()
        self._tally(counts, state.key, chunks=len(state.chunks), upgraded=n)
        return n

    def _tally(
        self, counts: Counter[tuple[str, int]], rk: RegionKey, *, chunks: int, upgraded: int = 0
    ) -> None:
        r = self.report
        targets = self.registry.current_versions
        r.chunks_total += chunks
        r.chunks_upgraded += upgraded
        for (rtype, version), n in counts.items():
            r.records_total += n
            if version < targets.get(rtype, version):
                r.records_upgraded += n
        self.counts.update(counts)

    async def _persist(self, state: RegionState, upgraded: int) -> None:
        """Write the resident region through the runtime's flush (lock taken there)."""
        world = self.world
        if upgraded:
            self.report.regions_in_memory += 1
        if state.upgraded:
            q = world._queues.add(state.key, state.lpt)
            try:
                # Not full: deltas are folded as a routine flush would (ticks stay open).
                wrote = await world._flush_region(q, False)
            except StreamerError as exc:
                raise _RegionFailed(_failure(state.path, state.key, None, exc), exc) from exc
            if wrote:
                self.report.regions_rewritten += 1
        elif not upgraded:
            self.report.regions_current += 1
        self._done(len(state.chunks))

    async def _on_file(self, key: str, rx: int, ry: int) -> None:
        """The batch's per-region step, under the lock, limiter token and loading slot."""
        world = self.world
        store = world._store
        assert store is not None
        for attempt in range(_CAS_ATTEMPTS):
            try:
                blob = await store.get(key)
            except NotFound:
                self._done(0)
                return  # gone since listing (rebuilt or quarantined): nothing to migrate
            except StorageError as exc:
                raise _RegionFailed(_failure(key, (rx, ry), None, exc), exc) from exc
            res: _RegionResult = await anyio.to_thread.run_sync(
                _migrate_file, blob.data, key, rx, ry, self.registry, limiter=world._cpu_limiter
            )
            if res.new_data is not None:
                try:
                    await store.put_if_match(key, res.new_data, blob.version)
                except PreconditionFailed as exc:
                    if attempt + 1 < _CAS_ATTEMPTS:
                        log.warning("%s changed while being migrated; redoing it", key)
                        continue
                    raise _RegionFailed(_failure(key, (rx, ry), None, exc), exc) from exc
                except StorageError as exc:
                    raise _RegionFailed(_failure(key, (rx, ry), None, exc), exc) from exc
                # Chunks of the region cached from an earlier state: read the new file next.
                for ck in region_chunks(rx, ry, world._region_size):
                    world._cache.invalidate(ck)
                self.report.regions_rewritten += 1
                self.report.regions_on_file += 1
            else:
                self.report.regions_current += 1
            self._tally(res.counts, (rx, ry), chunks=res.chunks, upgraded=res.chunks_upgraded)
            self._done(res.chunks)
            return

    async def run_pool(self, keys: list[tuple[str, int, int]], jobs: int) -> None:
        await run_region_pool(keys, jobs, self.region, self.fail, lambda: self.halted is not None)


def _migrate_file(
    data: bytes, key: str, rx: int, ry: int, registry: MigrationRegistry
) -> _RegionResult:
    return migrate_region_bytes(data, key=key, rx=rx, ry=ry, registry=registry)


_RUNNING: Final[str] = "_live_migration_lock"


async def migrate_live(
    world: World, *, jobs: int = 2, progress: MigrationProgress | None = None
) -> LiveMigrationReport:
    """Migrate every record of the open ``world`` now; see the module docstring.

    One run at a time per world (a second call waits for the first). Takes a pre-migration
    snapshot first (``World.snapshot(reason="pre-migration")``). On completion every region
    file is current, and ``world.json`` records the target versions (unless an inactive
    region could not be migrated).

    :raises LiveMigrationFailed: a record failed; the run halted (nothing rolled back), a
        ``migration_failed`` incident was recorded. ``.report`` says what was done.
    :raises SnapshotError, StorageError: the pre-migration snapshot failed (nothing migrated).
    :raises ValueError: ``jobs < 1``.
    :raises WorldClosed: the world is not open.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    lock: anyio.Lock | None = getattr(world, _RUNNING, None)
    if lock is None:
        lock = anyio.Lock()
        setattr(world, _RUNNING, lock)
    async with lock:
        return await _migrate_live(world, jobs=jobs, progress=progress)


async def _migrate_live(
    world: World, *, jobs: int, progress: MigrationProgress | None
) -> LiveMigrationReport:
    t0 = time.perf_counter()
    registry = _registry()
    targets = dict(registry.current_versions)
    report = LiveMigrationReport(
        world=str(world.path), dry_run=False, resumed=False, target_versions=targets
    )
    info = await world.snapshot(reason="pre-migration")
    report.snapshot_id = info.id
    log.info("live migration of %s: pre-migration snapshot %s", world.path, info.id)
    store = world._store
    assert store is not None
    keys = await _region_keys(store)
    report.regions_total = len(keys)
    if progress is not None:
        progress.start(total_regions=len(keys), skipped_regions=0)
    run = _LiveRun(world=world, registry=registry, report=report, progress=progress)
    await run.run_pool(keys, jobs)
    report.counts = _nest_counts(run.counts)
    report.elapsed_s = time.perf_counter() - t0

    if run.halted is not None:
        failure = run.halted
        report.status = "failed"
        report.failures, report.failures_total = [failure], 1
        _log_failure(failure, run.halted_cause)
        await _record_incident(world, report, failure)
        raise LiveMigrationFailed(
            f"live migration halted: {failure.describe()} (regions already migrated stay "
            "migrated; nothing was rolled back)",
            report=report,
            failure=failure,
        ) from run.halted_cause
    if report.regions_inactive == 0:
        await _record_versions(world, targets)
    report.status = "completed"
    log.info(
        "live migration of %s done: %d regions (%d in memory, %d on file, %d current), "
        "%d records upgraded",
        world.path,
        report.regions_total,
        report.regions_in_memory,
        report.regions_on_file,
        report.regions_current,
        report.records_upgraded,
    )
    return report


async def _record_versions(world: World, targets: dict[str, int]) -> None:
    """Record the target versions in ``world.json`` (and the world's copy of it)."""
    store = world._store
    assert store is not None
    async with world._flush_limiter:  # not while a snapshot copies the world
        manifest = await read_manifest(store, where=str(world.path))
        merged = {**manifest.record_versions, **targets}
        if merged != manifest.record_versions:
            manifest = msgspec.structs.replace(manifest, record_versions=merged)
            await store.put_atomic(MANIFEST_KEY, encode_manifest(manifest))
        world._manifest = manifest


async def _record_incident(
    world: World, report: LiveMigrationReport, failure: RecordFailure
) -> None:
    details: dict[str, Any] = {
        "live": True,
        "snapshot_id": report.snapshot_id,
        "target_versions": report.target_versions,
        "rolled_back": False,
        "regions_rewritten": report.regions_rewritten,
        "record_id": failure.record_id,
        "record_type": failure.record_type,
        "schema_version": failure.schema_version,
        "chunk": list(failure.chunk) if failure.chunk is not None else None,
        "error_type": failure.error_type,
        "error": failure.error,
    }
    action = (
        "live migration halted; regions already migrated stay migrated (current-version "
        f"data), the failing region {failure.file} is unchanged and still served through the "
        "lazy path. Fix the step or the data and run World.migrate() again; pre-migration "
        f"snapshot {report.snapshot_id} is kept (restoring it would undo later deltas)"
    )
    try:
        incident = await world._recovery.incidents.record(
            "migration_failed",
            region=failure.region,
            file=failure.file,
            details=details,
            action=action,
        )
        report.incident_id = incident.id
    except StorageError as exc:
        log.error("cannot record the migration_failed incident: %s", exc)
