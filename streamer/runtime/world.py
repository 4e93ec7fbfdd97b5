"""``World``: the runtime that serves chunks and absorbs deltas for one open world.

::

    async with open_world(path, config) as world:
        chunk = await world.chunk(cx, cy)
        await world.submit([TileSet(tick=7, x=10, y=-3, tile=4)])
        world.update_interest("p1", x, y)

Write path (design §5, ``runtime/submitting.py``): ``submit`` validates the whole batch
(types, bounds, ticks), turns an ``EntityMove`` into remove + upsert carrying the character as
it lands, and appends ONE journal frame for the batch (group commit). Once the journal reports
the batch durable, its ``on_durable`` hook — running in journal order — appends the deltas to
their region queues and applies them to cached chunks; then ``submit`` returns. Flush workers
(``runtime/flushing.py``) fold queues into new region files (``regionstate.fold_steps``) and
advance ``lastProcessedTick``; passed journal segments are deleted.

Read path (design §6): ``chunk`` → cache hit, or the single-flight prioritised ``ChunkLoader``
whose batches come to :meth:`World._load_batch`: region files are fetched with one
``get_many`` (and cached as :class:`RegionState`), terrain and chunk defaults are generated
in one worker-thread hop, then records are decoded and queued deltas applied.

Every background task (journal writer, loader workers, flush scheduler) runs in one anyio
task group owned by the world, entered in ``__aenter__`` and left in ``__aexit__`` after a
final flush that is shielded from cancellation.

Crash consistency rests on three invariants (see ``runtime/queues.py``): queue order equals
journal order; a region file with ``lastProcessedTick = T`` holds every delta of that region
with ``tick <= T`` and no other; and no delta with ``tick <= T`` can be accepted after a flush
sealed ``T``. Replay then keeps exactly the journal records with ``tick > T``.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeAlias

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import msgspec
import numpy as np
import numpy.typing as npt

from streamer.config import Config
from streamer.coords import CHUNK_SIZE, region_of_chunk
from streamer.errors import (
    ConfigError,
    IntegrityError,
    NotFound,
    RegionInactive,
    StorageError,
    StreamerError,
    WorldClosed,
    WorldNotFound,
)
from streamer.format.manifest import WorldManifest
from streamer.format.region import region_key
from streamer.migrate.batch import CHECKPOINT_KEY, MigrationInProgress, MigrationProgress
from streamer.recovery.snapshots import SnapshotInfo
from streamer.runtime.cache import CacheStats, ChunkCache
from streamer.runtime.chunk import Chunk, ChunkKey
from streamer.runtime.events import EventStream
from streamer.runtime.flush_slots import FlushSlots
from streamer.runtime.flushing import _FlushPath
from streamer.runtime.interest import InterestTracker
from streamer.runtime.journal import Journal, JournalBatch, JournalStats
from streamer.runtime.live_migrate import LiveMigrationReport, migrate_live
from streamer.runtime.loader import ChunkLoader, LoaderStats
from streamer.runtime.players import PLAYERS_KEY, PlayerIndex, decode_players
from streamer.runtime.queues import DeltaQueues, Queued, RegionKey
from streamer.runtime.recovery_hooks import RecoveryHooks, RecoveryStats
from streamer.runtime.regionstate import (
    RegionState,
    build_chunk,
    check_fingerprint,
    region_state_from_bytes,
)
from streamer.runtime.scrubber import Scrubber
from streamer.runtime.snapshotter import Snapshotter
from streamer.runtime.submitting import _DIRECT_PRIORITY, _I32, _Routed, _SubmitPath
from streamer.runtime.terrain_process import TerrainProcess, terrain_processes_for
from streamer.runtime.terrain_server import server_pid as terrain_server_pid
from streamer.runtime.thread_lane import ThreadLane
from streamer.schema.codec import ChunkCodec
from streamer.schema.records import Character, ChunkRecord
from streamer.storage.base import Blob
from streamer.storage.fs import FileSystem
from streamer.storage.local import LocalStore
from streamer.worlddir import WorldLock, read_manifest
from streamer.worldgen import (
    ChunkDefaults,
    TerrainGenerator,
    params_from_dict,
    tiles_fingerprint,
)

__all__ = ["World", "WorldStats", "open_world"]

log = logging.getLogger(__name__)


Tiles: TypeAlias = npt.NDArray[np.uint16]

#: Terrain worker processes start once this many load batches found other loads queued or
#: in flight. A worker only helps then (one batch alone runs its stages one after the
#: other wherever terrain is made), and a world that loads a few chunks one at a time (a
#: tool, a restart check) does not pay for a process start: a new interpreter, ~0.3 s of
#: CPU, once per process; a fork after that.
TERRAIN_PROCESS_AFTER = 4
#: Clean region states kept in memory (each is its region file's chunk payloads).
_CLEAN_REGIONS_KEPT = 512


class WorldStats(msgspec.Struct, frozen=True, kw_only=True):
    cache_bytes: int
    cache_hits: int
    cache_misses: int
    cache_evictions: int
    #: Deltas held in region queues (queued + on their way to the journal), all regions.
    queue_depth: int
    queue_max_depth: int
    dirty_regions: int
    #: Journal bytes on disk: not yet deletable because some region has not folded past
    #: them, plus up to 1 MiB already folded in the segment being written to.
    journal_lag_bytes: int
    journal_segments: int
    journal_fsyncs: int
    journal_commits: int
    flushes: int
    flush_errors: int
    replayed_deltas: int
    torn_bytes_discarded: int
    load_p50_ms: float
    load_p99_ms: float
    regions_cached: int
    cache: CacheStats
    loader: LoaderStats
    journal: JournalStats
    recovery: RecoveryStats = msgspec.field(default_factory=RecoveryStats)
    #: Terrain worker processes running now (see ``runtime.terrain_processes``).
    terrain_processes: int = 0
    #: Load batches whose terrain came from a worker process (the rest: from threads).
    terrain_process_batches: int = 0
    #: Terrain worker processes that died or failed to start (each one logged).
    terrain_process_failures: int = 0
    #: Pids of the running terrain workers and of the terrain server that forks them (last).
    terrain_process_pids: tuple[int, ...] = ()


def open_world(
    path: str | os.PathLike[str],
    config: Config | None = None,
    *,
    fs: FileSystem | None = None,
) -> World:
    """The world at ``path``, to be opened with ``async with``.

    Opening creates nothing: a directory without ``world.json`` raises ``WorldNotFound``.

    :param fs: a ``FileSystem`` to work through instead of the real directory (crash tests
        pass a ``SimulatedFileSystem``; the cross-process lock is then skipped, since such a
        file system lives in one process).
    :raises WorldNotFound, WorldLocked, UnsupportedFormat, IntegrityError: on entering.
    :raises StorageUnavailable: on entering, the world's files could not be read or made
        durable (e.g. no room to copy the newest journal segment; the message says how much
        is needed, and nothing was changed).
    """
    return World(Path(path), config if config is not None else Config(), fs=fs)


class World(_SubmitPath, _FlushPath):
    """One open world; see the module docstring. Create with :func:`open_world`."""

    def __init__(self, path: Path, config: Config, *, fs: FileSystem | None = None) -> None:
        self.path = path
        self.config = config
        rt = config.runtime
        self._rt = rt
        self._fs_override = fs
        self._opened = False
        self._closed = False
        self._closing = False
        self._lock: WorldLock | None = None
        self._store: LocalStore | None = None
        self._manifest: WorldManifest | None = None
        self._gen: TerrainGenerator | None = None
        self._codec: ChunkCodec | None = None
        self._journal: Journal | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._writer_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._region_size = 8
        self._bound = 0

        self._cache = ChunkCache(rt.cache_bytes)
        self._interest = InterestTracker(rt.view_radius, rt.hysteresis)
        self._loader = ChunkLoader(
            self._load_batch, workers=rt.load_workers, on_loaded=self._on_loaded
        )
        self._queues = DeltaQueues(rt.queue_max_deltas)
        self._regions: OrderedDict[RegionKey, RegionState] = OrderedDict()
        self._region_loading: dict[RegionKey, anyio.Event] = {}
        #: Regions an ``_ensure_regions`` call is making present: never evicted meanwhile.
        self._regions_wanted: Counter[RegionKey] = Counter()
        self._flush_locks: dict[RegionKey, anyio.Lock] = {}
        self._flush_wake = anyio.Event()
        self._flush_limiter = anyio.CapacityLimiter(rt.flush_concurrency)
        self._flush_slots = FlushSlots(rt.flush_concurrency)
        # Folding and terrain are CPU work: a few threads keep the loop responsive without
        # letting 1,000 concurrent flushes hold 1,000 half-built region files at once.
        self._cpu_limiter = anyio.CapacityLimiter(max(2, min(8, os.cpu_count() or 2)))
        # Region folds are Python work under the GIL (``_FlushPath._fold``: short ones on
        # the loop, the rest in a thread): more than one at a time only adds contention.
        self._fold_limiter = anyio.CapacityLimiter(1)
        self._players = PlayerIndex()
        #: Entities changed by batches accepted but not yet durable: id → (batch seq, record
        #: or None if removed). An EntityMove of such an entity waits for that batch to
        #: settle, then resolves against durable state (``submitting._wait_settled``).
        self._overlay: dict[str, tuple[int, Character | None]] = {}
        #: Routing of batches accepted but not yet durable or failed, by journal seq: computed
        #: once in ``submit``, used by ``_on_durable``. Value: (parts, no entity deltas).
        self._routing: dict[int, tuple[_Routed, bool]] = {}
        self._chunk_keys: dict[ChunkKey, ChunkKey] = {}
        #: Terrain worker processes (started once loads are sustained: TERRAIN_PROCESS_AFTER).
        self._terrain: list[TerrainProcess] = []
        self._journal_lane = ThreadLane("streamer-journal")
        self._terrain_wanted = 0
        #: Regions refused after unrecoverable corruption (the recovery ladder fills this).
        self._inactive: set[RegionKey] = set()
        # Recovery integration lives in its own modules (runtime/recovery_hooks.py etc.).
        self._recovery = RecoveryHooks(self)
        self._snapshotter = Snapshotter(self, config.snapshots)
        self._scrubber = Scrubber(
            self, config.scrub, min_valid_snapshots=config.snapshots.min_valid
        )

        self._flushes = 0
        self._flush_errors = 0
        self._replayed = 0
        self._torn = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> World:
        if self._opened:
            raise RuntimeError("a World can be entered only once")
        self._opened = True
        try:
            await self._open()
            tg = anyio.create_task_group()
            await tg.__aenter__()
        except BaseException:
            # Shielded: a cancelled open must still let go of the lock, the store and the
            # journal's thread.
            with anyio.CancelScope(shield=True):
                await self._release()
            self._closed = True
            raise
        self._tg = tg
        assert self._journal is not None
        tg.start_soon(self._journal.run, name="journal-writer")
        tg.start_soon(self._journal.keep_spare, name="journal-spare")
        tg.start_soon(self._journal.keep_segment_open, name="journal-segment")
        tg.start_soon(self._journal.keep_sync_process, name="journal-sync-process")
        self._loader.run(tg)
        tg.start_soon(self._flush_scheduler, name="flush-scheduler")
        self._recovery.start(tg)
        if self.config.scrub.interval_s > 0:
            tg.start_soon(self._scrubber.run, name="scrubber")
        if self.config.snapshots.interval_s > 0:
            tg.start_soon(self._snapshotter.run, name="snapshotter")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self.aclose(_exc=exc)
        return None

    async def aclose(self, *, _exc: BaseException | None = None) -> None:
        """Flush everything (shielded from cancellation), stop the workers, release the lock.

        Must run in the task that entered the world (it leaves the world's task group).
        """
        if self._closed or not self._opened:
            return
        self._closing = True
        tg, self._tg = self._tg, None
        flush_error: BaseException | None = None
        try:
            with anyio.CancelScope(shield=True):
                try:
                    await self._final_flush()
                except Exception as err:
                    flush_error = err
                    log.error("final flush of %s failed: %s", self.path, err, exc_info=True)
        finally:
            self._closed = True
            if tg is not None:
                tg.cancel_scope.cancel()
                try:
                    # The body's own exception propagates by itself; handing it to the task group
                    # would wrap it in an ExceptionGroup. Errors of our tasks still surface.
                    await tg.__aexit__(None, None, None)
                finally:
                    self._recovery.hub.close()
                    with anyio.CancelScope(shield=True):
                        await self._release()
        if flush_error is not None and _exc is None:
            raise flush_error

    async def _final_flush(self) -> None:
        journal = self._journal
        if journal is None or journal.broken:
            return
        try:
            await self._flush_all()
        except BaseException:
            # Even when a region failed to fold, whatever the journal holds (acknowledged in
            # "interval" mode but not yet fsynced) is drained, fsynced and closed: replay
            # brings it back at the next open.
            journal.begin_close()
            await journal.barrier()
            await journal.aclose()
            raise
        journal.begin_close()
        await journal.barrier()
        await self._after_flush(everything=True)  # a cleanly closed world keeps no journal
        await journal.aclose()

    async def _release(self) -> None:
        if self._journal is not None:
            self._journal.begin_close()
            # Closed already unless the journal broke or the open failed after it started.
            await self._journal.stop_sync_process()
        await self._journal_lane.aclose()
        for proc in self._terrain:
            await proc.aclose()
        if self._lock is not None:
            lock, self._lock = self._lock, None
            await anyio.to_thread.run_sync(lock.release)
        if self._store is not None:
            await self._store.aclose()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_opened", False) and not getattr(self, "_closed", True):
            _warn(f"World {self.path} was never closed", ResourceWarning, source=self, stacklevel=1)

    async def _open(self) -> None:
        rt = self._rt
        fsync = self.config.storage.fsync
        where = str(self.path)
        if self.config.storage.backend != "local":
            # The journal appends through a local FileSystem; serving a world from an object
            # store needs the per-commit journal objects of design §10, not built yet.
            raise ConfigError(
                f"open_world serves local worlds only; got {self.config.storage.backend!r} "
                "(the s3 backend is available as a BlobStore, not yet to the runtime)",
                key="storage.backend",
            )
        if self._fs_override is None:
            is_dir = await anyio.to_thread.run_sync(self.path.is_dir)
            if not is_dir:
                raise WorldNotFound("no such world directory", path=where)
        probe = LocalStore(self.path, fs=self._fs_override, fsync=fsync)
        manifest = await read_manifest(probe, where=where)
        if await _exists(probe, CHECKPOINT_KEY):
            # Serving edits now would be undone if the resumed batch fails and rolls back to
            # its pre-migration snapshot: finish (or roll back) the batch first.
            raise MigrationInProgress(
                f"{CHECKPOINT_KEY}: an interrupted `streamer migrate` is recorded; run "
                "`streamer migrate PATH --resume` to finish it before opening the world"
            )
        if self._fs_override is None:
            lock = WorldLock(self.path)
            await anyio.to_thread.run_sync(lock.acquire)
            self._lock = lock
        limiter = anyio.CapacityLimiter(self.config.storage.io_threads)
        store = await LocalStore.open(self.path, fs=self._fs_override, fsync=fsync, limiter=limiter)
        self._store = store
        # Before anything reads a region: a restore interrupted by a crash is finished first
        # (it may replace world.json too), and inactive regions are known before replay.
        if await self._recovery.open(store):
            manifest = await read_manifest(store, where=where)
        self._manifest = manifest
        self._region_size = manifest.region_size
        self._bound = manifest.bound_tiles
        self._gen = TerrainGenerator(manifest.seed, params_from_dict(manifest.generator_params))
        self._codec = ChunkCodec(manifest.encoding)
        self._terrain = [
            TerrainProcess(self._gen.seed, self._gen.params)
            for _ in range(terrain_processes_for(rt.terrain_processes))
        ]

        try:
            blob = await store.get(PLAYERS_KEY)
        except NotFound:
            pass
        else:
            try:
                self._players = PlayerIndex(decode_players(blob.data))
            except IntegrityError as err:
                # A hint only: character records are the authority, and replay and later
                # flushes rebuild the entries that matter.
                log.warning("%s: %s; starting with an empty player index", where, err)

        # The journal's own worker thread: behind region writes queued for the store's
        # threads, an acknowledgement would wait for whole region files to be fsynced.
        journal = Journal(
            store.fs,
            self._journal_lane.run,
            durability=rt.durability,
            fsync_interval_ms=rt.fsync_interval_ms,
            segment_bytes=rt.journal_segment_bytes,
            fsync=fsync,
            preallocate=rt.journal_preallocate,
            sync_process=rt.journal_sync_process,
            on_durable=self._on_durable,
            on_failed=self._on_failed,
            # Segment deletion on anyio's shared threads, not the writer's only one.
            collect_run_sync=anyio.to_thread.run_sync,
        )
        self._journal = journal
        replay = await journal.open(self._batch_ticks)
        self._torn = replay.torn_bytes
        await self._replay(replay.batches)

    async def _replay(self, batches: Sequence[JournalBatch]) -> None:
        regions: set[RegionKey] = set()
        for batch in batches:
            regions.update(self._batch_ticks(batch))
        failed = await self._ensure_regions(regions)
        for err in failed.values():
            if not isinstance(err, RegionInactive):
                raise err  # unreadable and not recovered: replaying around it would lose deltas
        dropped = 0
        for batch in batches:
            for delta in batch.deltas:
                for region, chunk, d in self._route(delta):
                    if region in failed:
                        # Part of the inactive region's lost state (its data_loss incident);
                        # player characters among them are remembered for relocation.
                        self._recovery.note_dropped(region, d)
                        dropped += 1
                        continue
                    q = self._queues.regions[region]
                    if d.tick <= q.lpt:
                        continue  # already in the region file
                    q.hwm = max(q.hwm, d.tick)
                    q.push(Queued(d.tick, chunk, d))
                    self._index_player(d, region)
                    self._replayed += 1
        if self._replayed:
            log.info("%s: replayed %d journaled deltas", self.path, self._replayed)
        if dropped:
            log.warning(
                "%s: dropped %d journaled deltas of inactive regions %s",
                self.path,
                dropped,
                sorted(failed),
            )

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise WorldClosed("world is closed", path=str(self.path))
        if not self._opened or self._tg is None:
            raise WorldClosed(
                "world is not open (use `async with open_world(...)`)", path=str(self.path)
            )

    # -- geometry -------------------------------------------------------------------------

    def _check_chunk(self, cx: int, cy: int) -> None:
        if not (isinstance(cx, int) and isinstance(cy, int)):
            raise TypeError(f"chunk coordinates must be ints, got ({cx!r}, {cy!r})")
        if self._bound > 0:
            b = self._bound
            inside_x = cx * CHUNK_SIZE + CHUNK_SIZE - 1 > -b and cx * CHUNK_SIZE < b
            inside_y = cy * CHUNK_SIZE + CHUNK_SIZE - 1 > -b and cy * CHUNK_SIZE < b
            if not (inside_x and inside_y):
                raise ValueError(f"chunk ({cx}, {cy}) is outside the world (|x|, |y| < {b} tiles)")
        elif not (-_I32 // 2 <= cx < _I32 // 2 and -_I32 // 2 <= cy < _I32 // 2):
            raise ValueError(f"chunk ({cx}, {cy}) is outside the addressable world")

    # -- reads ----------------------------------------------------------------------------

    async def chunk(self, cx: int, cy: int) -> Chunk:
        """The chunk at ``(cx, cy)``: terrain with every acknowledged delta applied.

        :raises ValueError: outside the world's bounds.
        :raises RegionInactive: the region was taken out of service after corruption.
        :raises IntegrityError, SchemaError: its stored data cannot be read.
        :raises WorldClosed: the world is closed.
        """
        self._check_open()
        self._check_chunk(cx, cy)
        key = (cx, cy)
        region = region_of_chunk(cx, cy, self._region_size)
        if region in self._inactive:
            raise RegionInactive(*region)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        return await self._loader.get(key, _DIRECT_PRIORITY)

    def _on_loaded(self, key: ChunkKey, chunk: Chunk) -> None:
        self._cache.put(key, chunk)
        q = self._queues.get(region_of_chunk(key[0], key[1], self._region_size))
        if q is not None and key in q.per_chunk:
            self._cache.mark_dirty(key)

    async def _load_batch(self, keys: list[ChunkKey]) -> dict[ChunkKey, Chunk | Exception]:
        out: dict[ChunkKey, Chunk | Exception] = {}
        todo: list[ChunkKey] = []
        for key in keys:
            cached = self._cache.peek(key)
            if cached is not None:
                out[key] = cached
            else:
                todo.append(key)
        if not todo:
            return out
        rs = self._region_size
        regions = {region_of_chunk(cx, cy, rs) for cx, cy in todo}
        failed = await self._ensure_regions(regions)
        live = [k for k in todo if region_of_chunk(k[0], k[1], rs) not in failed]
        for key in todo:
            region = region_of_chunk(key[0], key[1], rs)
            if region in failed:
                out[key] = failed[region]
        if not live:
            return out
        # Defaults are only needed for chunks without a stored record. Stored chunks with
        # nothing queued are built in the worker thread too: decoding and applying a record
        # is Python work that runs there while other threads' terrain (numpy, GIL released)
        # does, instead of after it on the loop. ``_build`` uses such a chunk only if its
        # payload is still the one handed over and still nothing is queued for it.
        payloads: dict[ChunkKey, tuple[bytes, str]] = {}
        for k in live:
            state = self._regions[region_of_chunk(k[0], k[1], rs)]
            payload = state.chunks.get(k)
            if payload is not None:
                q = self._queues.get(state.key)
                if q is None or k not in q.per_chunk:
                    payloads[k] = (payload, f"{state.path} chunk ({k[0]}, {k[1]})")
                else:
                    payloads[k] = (payload, "")  # stored, but built on the loop
        gen, codec = self._gen, self._codec
        assert gen is not None and codec is not None
        tiles = await self._process_tiles(live) if self._terrain else None
        generated = await anyio.to_thread.run_sync(
            partial(_generate, gen, codec, live, payloads, rs, tiles), limiter=self._cpu_limiter
        )
        # A clean region state may have been evicted during the hop: fetch it again.
        while missing := {region_of_chunk(k[0], k[1], rs) for k in live} - set(self._regions):
            for region, err in (await self._ensure_regions(missing)).items():
                failed[region] = err
                out.update({k: err for k in live if region_of_chunk(k[0], k[1], rs) == region})
            live = [k for k in live if region_of_chunk(k[0], k[1], rs) not in failed]
        # No await from here on: queued deltas and region state are read as of this instant,
        # and on_loaded caches the result before any later delta could be missed.
        for key in live:
            if key in self._cache:
                cached = self._cache.peek(key)
                assert cached is not None
                out[key] = cached
                continue
            try:
                out[key] = self._build(key, *generated[key])
            except StreamerError as err:
                out[key] = err
        return out

    async def _process_tiles(self, keys: list[ChunkKey]) -> bytes | None:
        """``keys``' terrain from a worker process, or ``None`` (generated in the thread)."""
        tg = self._tg
        if self._loader.inflight > len(keys) or self._loader.backlog:
            self._terrain_wanted += 1  # another batch waits or runs: stages could overlap
        if tg is not None and self._terrain_wanted >= TERRAIN_PROCESS_AFTER:
            for proc in self._terrain:
                if proc.should_start():
                    tg.start_soon(proc.run, name="terrain-process")
        running = [p for p in self._terrain if p.running]
        if not running:
            return None
        return await min(running, key=lambda p: p.outstanding).tiles(keys)

    def _build(
        self,
        key: ChunkKey,
        base: Tiles,
        defaults: ChunkDefaults | None,
        built: _Prebuilt | None = None,
    ) -> Chunk:
        cx, cy = key
        region = region_of_chunk(cx, cy, self._region_size)
        state = self._regions[region]
        codec = self._codec
        assert codec is not None
        payload = state.chunks.get(key)
        where = f"{state.path} chunk ({cx}, {cy})"
        if built is not None and built.payload is payload:
            q = self._queues.get(region)
            if q is None or key not in q.per_chunk:
                self._check_once(state, key, built.record, built.fingerprint_ok, where)
                return built.chunk
        record: ChunkRecord | None = None
        payload_size: int | None = None
        if payload is not None:
            decoded = codec.decode(payload, where=where)
            record = decoded.record
            if key not in state.checked:
                ok = record.base_fingerprint == tiles_fingerprint(base)
                self._check_once(state, key, record, ok, where)
            if decoded.upgraded:
                # Lazy migration: rewrite the upgraded record at the region's next flush. The
                # state keeps the upgraded payload, so neither that flush nor a reload of the
                # chunk runs the migration again (each record is migrated once).
                state.chunks[key] = codec.encode(record)
                state.upgraded.add(key)
                self._flush_wake.set()
            elif codec.encoding == "msgpack":
                payload_size = len(payload)  # sized as the worker thread's build would be
        q = self._queues.get(region)
        queued = q.for_chunk(key) if q is not None else []
        return build_chunk(
            cx, cy, base, record, defaults, queued, where=where, payload_size=payload_size
        )

    def _check_once(
        self, state: RegionState, key: ChunkKey, record: ChunkRecord, ok: bool, where: str
    ) -> None:
        """A stored chunk's first build in this region state: unless its base fingerprint
        matched the terrain (``ok``), ``check_fingerprint`` says why not (or raises)."""
        if key in state.checked:
            return
        if not ok:
            gen = self._gen
            assert gen is not None
            check_fingerprint(record, gen, state.key, where)
        state.checked.add(key)

    async def _ensure_regions(self, keys: Iterable[RegionKey]) -> dict[RegionKey, Exception]:
        """Load region states not in memory (one ``get_many``); return per-region failures."""
        wanted = set(keys)
        regions = self._regions
        if all(k in regions for k in wanted):
            # Every submit comes here, nearly always for regions in memory: nothing to load,
            # so nothing to protect from eviction (no await below).
            for k in wanted:
                regions.move_to_end(k)
            return {}
        # Installing regions evicts clean ones beyond _CLEAN_REGIONS_KEPT. Without this, a
        # call wanting more than that (a replay after a crash, one batch across many
        # regions, or many dirty regions) evicted its own, loaded them again, forever.
        self._regions_wanted.update(wanted)
        try:
            return await self._ensure_wanted(wanted)
        finally:
            self._regions_wanted.subtract(wanted)
            for k in wanted:
                if self._regions_wanted[k] <= 0:
                    del self._regions_wanted[k]

    async def _ensure_wanted(self, wanted: set[RegionKey]) -> dict[RegionKey, Exception]:
        failed: dict[RegionKey, Exception] = {}
        regions = self._regions
        for k in wanted:
            if k in regions:
                # A use refreshes recency, so _evict_regions drops the least recently used
                # state first, not the one installed first (the hottest region is often that).
                regions.move_to_end(k)
        while True:
            for k in wanted & self._inactive:
                # Its file is quarantined (or gone): loading it would read as pristine.
                if k not in self._regions:
                    failed.setdefault(k, RegionInactive(*k))
            missing = [k for k in wanted if k not in self._regions and k not in failed]
            waiting = [self._region_loading[k] for k in missing if k in self._region_loading]
            mine = [k for k in missing if k not in self._region_loading]
            if not mine and not waiting:
                break
            if mine:
                done = anyio.Event()
                for k in mine:
                    self._region_loading[k] = done
                try:
                    blobs = await self._read_region_files(mine)
                    for k, blob in zip(mine, blobs, strict=True):
                        if isinstance(blob, StorageError):
                            failed[k] = blob
                            continue
                        try:
                            state = region_state_from_bytes(None if blob is None else blob.data, k)
                        except StreamerError as bad:
                            failed[k] = bad
                            continue
                        self._install_region(state, evict=False)
                    # Once per batch: a pass per install scans every region in memory each
                    # time, quadratic when a call wants thousands (a replay after a crash).
                    self._evict_regions()
                    # Still holding the loading slots: concurrent loaders wait for the
                    # ladder's outcome instead of running it again.
                    await self._recovery.recover_loaded(failed, mine)
                except StreamerError as unreadable:
                    for k in mine:
                        if k not in self._regions:
                            failed.setdefault(k, unreadable)
                finally:
                    for k in mine:
                        self._region_loading.pop(k, None)
                    done.set()
            for ev in waiting:
                await ev.wait()
            # A region another task failed to load is retried by us (errors are not cached).
        for key, err in failed.items():
            self._region_failed(key, err)
        return failed

    async def _read_region_files(self, keys: list[RegionKey]) -> list[Blob | StorageError | None]:
        """Each region's file (``None``: it has none) or the error that reading it raised.

        One ``get_many``, so one thread hop for the lot. Should it fail, the files are read
        again one at a time: one unreadable file then fails only its own region, with an
        error naming that file, and the regions read with it still load.
        """
        store = self._store
        assert store is not None
        names = [region_key(*k) for k in keys]
        try:
            return list(await store.get_many(names))
        except StorageError as err:
            if len(names) == 1:
                return [err]
        out: list[Blob | StorageError | None] = []
        for name in names:
            try:
                out.extend(await store.get_many([name]))
            except StorageError as err:
                out.append(err)
        return out

    def _region_failed(self, key: RegionKey, err: Exception) -> None:
        """A region could not be loaded even after the recovery ladder (runtime/recovery_hooks)."""
        if isinstance(err, RegionInactive):
            return  # refused by design; logged and recorded when it became inactive
        log.error("region %s could not be loaded: %s", key, err)

    def _install_region(self, state: RegionState, *, evict: bool = True) -> None:
        current = self._regions.get(state.key)
        if current is not None and current.generation >= state.generation:
            return
        self._regions[state.key] = state
        self._regions.move_to_end(state.key)
        q = self._queues.add(state.key, state.lpt)
        q.lpt = max(q.lpt, state.lpt)
        q.floor = max(q.floor, q.lpt)
        q.hwm = max(q.hwm, q.lpt)
        if evict:
            self._evict_regions()

    def _evict_regions(self) -> None:
        excess = len(self._regions) - _CLEAN_REGIONS_KEPT
        if excess <= 0:
            return
        for key in list(self._regions):
            if excess <= 0:
                break
            state = self._regions[key]
            q = self._queues.get(key)
            if state.upgraded or (q is not None and not q.clean) or key in self._regions_wanted:
                continue
            del self._regions[key]
            self._queues.regions.pop(key, None)
            excess -= 1

    # -- interest -------------------------------------------------------------------------

    def update_interest(self, player_id: str, x: int, y: int) -> None:
        """Player ``player_id`` is at tile ``(x, y)``: pin and prefetch its view, release the rest.

        Chunks load nearest first, then along the direction of travel; chunks stay pinned
        until the player is ``hysteresis`` chunks beyond the view radius.

        :raises WorldClosed: the world is closed.
        """
        self._check_open()
        change = self._interest.update(player_id, x, y, self._loader.is_pending)
        self._release_keys(change.release)
        for key, priority in change.load:
            self._cache.pin(key)
            self._prefetch(key, priority)
        for key, priority in change.shared:
            if self._loader.is_pending(key):
                self._loader.prefetch(key, priority)
        for key, priority in change.rerank:
            if self._interest.holders(key) == 1:
                # Its rank from this player's new chunk is its rank, even if worse than before:
                # otherwise the chunk just left would still load ahead of the one entered.
                self._loader.reprioritize(key, priority)
            elif self._loader.is_pending(key):
                # The other holders' ranks are not known here: only ever raise.
                self._loader.prefetch(key, priority)

    def drop_interest(self, player_id: str) -> None:
        """Forget ``player_id``'s view; its chunks become evictable. Idempotent."""
        self._check_open()
        self._release_keys(self._interest.drop(player_id))

    def _release_keys(self, keys: Iterable[ChunkKey]) -> None:
        for key in keys:
            self._cache.unpin(key)
            self._loader.cancel(key)

    def _prefetch(self, key: ChunkKey, priority: int) -> None:
        if key in self._cache:
            return
        try:
            self._check_chunk(*key)
        except ValueError:
            return
        if region_of_chunk(key[0], key[1], self._region_size) in self._inactive:
            return
        self._loader.prefetch(key, priority)

    # -- players --------------------------------------------------------------------------

    async def find_player(self, player_id: str) -> Character | None:
        """The character of ``player_id`` (as of every acknowledged delta), or ``None``."""
        self._check_open()
        region = self._players.get(player_id)
        if region is None:
            return None
        failed = await self._ensure_regions([region])
        if failed:
            raise failed[region]
        state = self._regions[region]
        q = self._queues.get(region)
        keys = set(state.chunks) | (set(q.per_chunk) if q is not None else set())
        found: list[Character] = []

        async def look(key: ChunkKey) -> None:
            chunk = await self.chunk(*key)
            found.extend(c for c in chunk.entities if c.player_id == player_id)

        async with anyio.create_task_group() as tg:
            for key in sorted(keys):
                tg.start_soon(look, key)
        return found[0] if found else None

    # -- recovery -------------------------------------------------------------------------

    def events(self, *, buffer: int = 256, history: bool = True) -> EventStream:
        """Subscribe to runtime events (``streamer.RegionRestored``, ``PlayerRelocated``, ...).

        Use as ``async with world.events() as events: async for ev in events: ...``. Each
        subscriber has its own ``buffer``; a full one drops its oldest event (counted in
        ``EventStream.dropped``) rather than slow the runtime down. ``history`` starts the
        stream with the events retained so far, including those of the world's opening.
        See ``runtime/events.py``.
        """
        return self._recovery.hub.subscribe(buffer=buffer, history=history)

    async def snapshot(self, reason: str = "manual") -> SnapshotInfo:
        """Flush everything, then take a verified snapshot with writes paused; rotate.

        :raises SnapshotError: a file failed verification or kept changing.
        :raises WorldClosed: the world is closed.
        """
        self._check_open()
        return await self._snapshotter.snapshot(reason=reason)

    async def migrate(
        self, *, jobs: int = 2, progress: MigrationProgress | None = None
    ) -> LiveMigrationReport:
        """Migrate every stored record to the current schema now, while serving.

        Region by region (``jobs`` at a time) under the runtime's per-region exclusion: a
        region held in memory is upgraded there and written by the runtime's own flush, any
        other region's file is rewritten by the batch step; each record is migrated once.
        Takes a ``pre-migration`` snapshot first. See ``runtime/live_migrate.py`` and
        docs/migrations.md ("Live migration").

        :raises LiveMigrationFailed: a record failed; the run halted, nothing was rolled back
            (migrated regions stay migrated), a ``migration_failed`` incident was recorded.
        :raises WorldClosed: the world is closed.
        """
        self._check_open()
        return await migrate_live(self, jobs=jobs, progress=progress)

    async def terrain(self, cx: int, cy: int) -> Tiles:
        """The generated terrain of chunk ``(cx, cy)`` without edits; works in inactive regions."""
        self._check_open()
        self._check_chunk(cx, cy)
        gen = self._gen
        assert gen is not None
        return await anyio.to_thread.run_sync(gen.chunk_tiles, cx, cy, limiter=self._cpu_limiter)

    @property
    def inactive_regions(self) -> frozenset[RegionKey]:
        return frozenset(self._inactive)

    # -- metrics --------------------------------------------------------------------------

    def stats(self) -> WorldStats:
        journal = self._journal
        cache = self._cache.stats()
        loader = self._loader.stats()
        js = (
            journal.stats()
            if journal is not None
            else JournalStats(
                pending=0,
                commits=0,
                fsyncs=0,
                batches=0,
                segments=0,
                live_bytes=0,
                segments_deleted=0,
                torn_bytes=0,
                unsynced_bytes=0,
            )
        )
        lat = self._loader.latency_percentiles()
        return WorldStats(
            cache_bytes=cache.bytes,
            cache_hits=cache.hits,
            cache_misses=cache.misses,
            cache_evictions=cache.evictions,
            queue_depth=self._queues.depth(),
            queue_max_depth=self._queues.max_depth(),
            dirty_regions=len(self._queues.dirty()),
            journal_lag_bytes=js.live_bytes,
            journal_segments=js.segments,
            journal_fsyncs=js.fsyncs,
            journal_commits=js.commits,
            flushes=self._flushes,
            flush_errors=self._flush_errors,
            replayed_deltas=self._replayed,
            torn_bytes_discarded=self._torn,
            load_p50_ms=lat.p50_ms if not math.isnan(lat.p50_ms) else 0.0,
            load_p99_ms=lat.p99_ms if not math.isnan(lat.p99_ms) else 0.0,
            regions_cached=len(self._regions),
            cache=cache,
            loader=loader,
            journal=js,
            recovery=self._recovery.stats(),
            terrain_processes=sum(p.running for p in self._terrain),
            terrain_process_batches=sum(p.batches for p in self._terrain),
            terrain_process_failures=sum(p.failures for p in self._terrain),
            terrain_process_pids=_terrain_pids(self._terrain),
        )

    @property
    def manifest(self) -> WorldManifest:
        if self._manifest is None:
            raise WorldClosed("world is not open", path=str(self.path))
        return self._manifest

    @property
    def closed(self) -> bool:
        return self._closed


async def _exists(store: LocalStore, key: str) -> bool:
    try:
        await store.head(key)
    except NotFound:
        return False
    return True


def _terrain_pids(procs: Sequence[TerrainProcess]) -> tuple[int, ...]:
    pids = tuple(p.pid for p in procs if p.running)
    server = terrain_server_pid()
    return (*pids, server) if pids and server is not None else pids


def _terrain_of(
    gen: TerrainGenerator, keys: Sequence[ChunkKey], process_tiles: bytes | None
) -> list[Tiles]:
    if process_tiles is None:
        return gen.chunks_tiles(list(keys))
    batch = np.frombuffer(process_tiles, dtype=np.uint16).reshape(len(keys), CHUNK_SIZE, CHUNK_SIZE)
    out: list[Tiles] = []
    for tiles in batch:
        # Own arrays, as ``chunks_tiles`` gives: a cached chunk must not keep the batch alive.
        own = tiles.copy()
        own.flags.writeable = False
        out.append(own)
    return out


@dataclass(frozen=True, slots=True)
class _Prebuilt:
    """A chunk built from a stored record in a worker thread (see ``World._load_batch``)."""

    payload: bytes
    record: ChunkRecord
    chunk: Chunk
    #: The record's base fingerprint matches the generated terrain.
    fingerprint_ok: bool


def _generate(
    gen: TerrainGenerator,
    codec: ChunkCodec,
    keys: Sequence[ChunkKey],
    payloads: Mapping[ChunkKey, tuple[bytes, str]],
    region_size: int,
    process_tiles: bytes | None = None,
) -> Mapping[ChunkKey, tuple[Tiles, ChunkDefaults | None, _Prebuilt | None]]:
    """Worker-thread half of a load, in one hop: terrain for every key, defaults for
    pristine chunks, and the finished chunk for stored ones that may be built here
    (``payloads[key] = (payload, where)``, ``where`` empty if not). A record that needs a
    migration, or fails to decode, is left to the loop (which migrates it, once, or reports
    it): no migration step ever runs here. ``process_tiles``: the keys' terrain from a
    worker process, if it gave it (see ``terrain_process``)."""
    out: dict[ChunkKey, tuple[Tiles, ChunkDefaults | None, _Prebuilt | None]] = {}
    for (cx, cy), tiles in zip(keys, _terrain_of(gen, keys, process_tiles), strict=True):
        stored = payloads.get((cx, cy))
        if stored is None:
            out[(cx, cy)] = (tiles, gen.chunk_defaults(cx, cy, region_size), None)
            continue
        built: _Prebuilt | None = None
        payload, where = stored
        if where:
            try:
                record = codec.decode_current(payload, where=where)
                if record is not None:
                    chunk = build_chunk(
                        cx,
                        cy,
                        tiles,
                        record,
                        None,
                        (),
                        where=where,
                        payload_size=len(payload) if codec.encoding == "msgpack" else None,
                    )
                    ok = record.base_fingerprint == tiles_fingerprint(tiles)
                    built = _Prebuilt(payload, record, chunk, ok)
            except StreamerError:
                pass  # the loop decodes it again and reports the error where it belongs
        out[(cx, cy)] = (tiles, None, built)
    return out
