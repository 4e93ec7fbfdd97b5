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
- **Checkpointed.** ``state/migrate.json`` (atomic put) holds the pre-migration snapshot
  id, the target versions and the finished regions as of its last compaction; each
  checkpoint write in between adds one small object to the done log ``state/migrate.d/``
  with the regions finished since the previous write, so a write costs what was finished
  since, not the world's size (``_Checkpointer``). ``resume=True`` skips the listed
  regions; regions finished after the last checkpoint write are found current and skipped
  by idempotence. A completed run deletes the checkpoint and its log.
- **Rolled back on failure.** The first failing record halts the pool (in-flight regions
  finish their atomic write, no new region starts), the failure is logged with the record's
  id, type and schemaVersion, the pre-migration snapshot is restored and a
  ``migration_failed`` incident is recorded. Afterwards every world file is byte-identical to
  before the run; only bookkeeping differs (``snapshots/``, ``incidents.log``, ``state/``).

Memory is bounded by ``jobs`` regions: a worker holds one region (old and new bytes) at a
time. A region's CPU work (verify, decode, upgrade, encode) is one hop per region, so the
event loop never blocks on it: to worker processes (``workers``; ``"auto"`` picks them for
worlds of ``PROCESS_MIN_REGIONS`` regions or more) so that it runs on up to ``jobs`` cores
and leaves this process's GIL to the I/O, else to worker threads. Either way all I/O stays
in this process; a process gets region bytes and returns the new file's bytes.

Per chunk the work is kept small: a C-level peek at the record heads counts the records and
finds chunks that are already current, whose bytes are reused without decoding them; old
chunks are decoded once, handed to the registry without a defensive copy (``consume``: the
plain data is ours and dropped afterwards), validated once as ``ChunkRecord`` and encoded.

A dry run reads everything and writes nothing: no snapshot, no checkpoint, no incident. It
never halts: a region it cannot read (fails verification, a storage error, a dead worker, a
bug) is one failure naming the file and the reason, and the other regions are still read, so
its report covers the whole world; any failure makes it ``status="failed"``.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.process
import os
import pickle
import re
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import BrokenExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from operator import attrgetter
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
    StorageUnavailable,
    StreamerError,
    UnsupportedFormat,
)
from streamer.format.checksum import hex64, xxh3
from streamer.format.manifest import MANIFEST_KEY, WorldManifest, encode_manifest
from streamer.format.region import decode_region, encode_region, parse_region_key
from streamer.schema.codec import ChunkCodec, Encoding
from streamer.schema.migrations import CHUNK_NESTED_FIELDS, REGISTRY, MigrationRegistry, RawRecord
from streamer.schema.records import ChunkRecord
from streamer.storage.base import Blob, BlobStore
from streamer.subproc import (
    FRAME_LEN,
    read_exact,
    read_exact_blocking,
    write_all,
    write_all_blocking,
)
from streamer.worlddir import read_manifest

__all__ = [
    "BOOKKEEPING_DIRS",
    "BOOKKEEPING_FILES",
    "CHECKPOINT_KEY",
    "CHECKPOINT_VERSION",
    "DONE_LOG_PREFIX",
    "Checkpoint",
    "CheckpointError",
    "LiveHooks",
    "MigrationInProgress",
    "MigrationProgress",
    "MigrationReport",
    "NoCheckpoint",
    "PROCESS_MIN_REGIONS",
    "RecordFailure",
    "RecoverySnapshots",
    "RollbackFailed",
    "SnapshotOps",
    "Workers",
    "is_bookkeeping",
    "migrate_world",
    "read_checkpoint",
]

log = logging.getLogger("streamer.migrate")

CHECKPOINT_KEY: Final = "state/migrate.json"
#: The done log: one small object per checkpoint write (``_Checkpointer``).
DONE_LOG_PREFIX: Final = "state/migrate.d/"
CHECKPOINT_VERSION: Final = 2
#: Paths a migration (or its rollback) may add or change besides the world's own files: the
#: snapshots (pre-migration, and the pre-restore one a rollback takes), the incident log, the
#: checkpoint and the restore marker, the world lock file and the store's lock stripes. The
#: byte-identical promise after a failed migration holds for every other file.
BOOKKEEPING_FILES: Final = frozenset(
    {"incidents.log", "state/migrate.json", "state/restore.json", ".lock"}
)
BOOKKEEPING_DIRS: Final = ("snapshots/", ".locks/", DONE_LOG_PREFIX)


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
    #: Regions with a failure: for a dry run every region that could not be read or has a
    #: record that would fail; for a real run the region that halted it.
    regions_failed: int = 0
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
    """``state/migrate.json``: what an interrupted run finished and where it can roll back to.

    As written, ``done`` is the finished regions as of the last compaction; regions
    finished since are in the done log (``state/migrate.d/``, see ``_Checkpointer``).
    ``read_checkpoint`` returns ``done`` with the log merged in.
    """

    type: Literal["migrate-checkpoint"] = "migrate-checkpoint"
    #: 1: ``done`` lists every finished region, no done log (before the log existed; still
    #: read, so a run interrupted under an older release resumes). 2: ``done`` + the log.
    schemaVersion: int = CHECKPOINT_VERSION
    status: Literal["running", "rolling_back"] = "running"
    world_id: str
    snapshot_id: str
    target_versions: dict[str, int]
    started_at: float
    done: list[str] = msgspec.field(default_factory=list)
    #: Which done-log entries belong to this header: those of this snapshot id and
    #: generation. Every header write (start, compaction, rollback) takes a new one, so
    #: entries from before it, or from another run, are never read as done.
    log_generation: int = 0
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
#: Fields added in checkpoint version 2; a version 1 checksum covers the others only.
_CP_V2_FIELDS: Final = ("log_generation",)


class _DoneEntry(msgspec.Struct, kw_only=True):
    """``state/migrate.d/{slot}``: regions finished since the previous checkpoint write."""

    type: Literal["migrate-done"] = "migrate-done"
    snapshot_id: str
    generation: int
    done: list[str]
    checksum: str = ""


def _cp_checksum(cp: Checkpoint) -> str:
    body = msgspec.to_builtins(cp)
    body.pop("checksum", None)
    if cp.schemaVersion < 2:
        for name in _CP_V2_FIELDS:
            body.pop(name, None)
    return hex64(xxh3(_CP_ENCODER.encode(body)))


def _encode_checkpoint(cp: Checkpoint) -> bytes:
    sealed = msgspec.structs.replace(cp, checksum=_cp_checksum(cp))
    return msgspec.json.format(_CP_ENCODER.encode(sealed), indent=2) + b"\n"


def _entry_checksum(entry: _DoneEntry) -> str:
    body = msgspec.to_builtins(entry)
    body.pop("checksum", None)
    return hex64(xxh3(_CP_ENCODER.encode(body)))


def _encode_entry(entry: _DoneEntry) -> bytes:
    return _CP_ENCODER.encode(msgspec.structs.replace(entry, checksum=_entry_checksum(entry)))


def _entry_key(slot: int) -> str:
    return f"{DONE_LOG_PREFIX}{slot:06d}"


def _decode_checkpoint(data: bytes) -> Checkpoint:
    try:
        cp = msgspec.json.decode(data, type=Checkpoint)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedFile(f"migration checkpoint unreadable: {exc}", path=CHECKPOINT_KEY) from exc
    if cp.schemaVersion > CHECKPOINT_VERSION:
        raise UnsupportedFormat(
            f"migration checkpoint version {cp.schemaVersion} was written by a newer release "
            f"(this one reads up to {CHECKPOINT_VERSION}); finish or roll back the migration "
            "with that release",
            path=CHECKPOINT_KEY,
        )
    actual = _cp_checksum(cp)
    if cp.checksum != actual:
        raise MalformedFile(
            "migration checkpoint checksum mismatch",
            path=CHECKPOINT_KEY,
            expected=cp.checksum,
            actual=actual,
        )
    return cp


def _log_entries(cp: Checkpoint, blobs: list[Blob | None], keys: list[str]) -> set[str]:
    """The regions the done log adds to ``cp`` (blocking-free, pure CPU).

    Only intact entries of this header's snapshot id and generation count. A damaged one
    (put_atomic makes it all-or-nothing, so only outside damage does that) is skipped: that
    can only make regions count as not done, which costs re-reading them, never skipping one.
    """
    out: set[str] = set()
    if cp.schemaVersion < 2:
        return out  # a version 1 header had no log: anything there is not its own
    for key, blob in zip(keys, blobs, strict=True):
        if blob is None:
            continue
        try:
            entry = msgspec.json.decode(blob.data, type=_DoneEntry)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("ignoring damaged migration done-log entry %s: %s", key, exc)
            continue
        if entry.checksum != _entry_checksum(entry):
            log.warning("ignoring migration done-log entry %s: checksum mismatch", key)
            continue
        if entry.snapshot_id == cp.snapshot_id and entry.generation == cp.log_generation:
            out.update(entry.done)
    return out


async def read_checkpoint(store: BlobStore) -> Checkpoint | None:
    """The interrupted run's checkpoint, or ``None``; ``done`` includes the done log.

    Reads both checkpoint versions: a version 1 checkpoint (every finished region in
    ``done``, written before the done log existed) resumes as before.

    :raises MalformedFile: the checkpoint exists but is damaged.
    :raises UnsupportedFormat: the checkpoint was written by a newer release.
    """
    try:
        blob = await store.get(CHECKPOINT_KEY)
    except NotFound:
        return None
    cp = _decode_checkpoint(blob.data)
    keys = await store.list(DONE_LOG_PREFIX)
    if keys and cp.schemaVersion >= 2:
        blobs = await store.get_many(keys)
        extra = _log_entries(cp, blobs, keys)
        if extra:
            cp.done = sorted(extra.union(cp.done))
    return cp


async def _delete_checkpoint(store: BlobStore) -> None:
    """Delete the header, then the done log.

    The header first: while it exists its log is whole, and a log without its header is
    read by nothing (the next run's header has another snapshot id; its end deletes them).
    """
    await store.delete(CHECKPOINT_KEY)
    for key in await store.list(DONE_LOG_PREFIX):
        await store.delete(key)


class _Checkpointer:
    """Records finished regions durably, at most every ``interval`` seconds (plus on demand).

    Each write stores only the regions finished since the previous one, as one small
    checksummed object ``state/migrate.d/{slot}`` (``put_atomic``: all or nothing, durable
    when it returns; one worker-thread hop for a local store), so its cost follows the
    regions since the last write, not the size of the world. The header
    ``state/migrate.json`` holds everything finished as of the last *compaction*: at the
    start of a run and whenever the log has ``max(64, done // 1024)`` entries, the header is
    rewritten with all of it (sorted and encoded in a worker thread) under a new
    ``log_generation``, which retires the old entries at once; their slots are reused. That
    bounds the log to a few hundred entries and the compaction work to a constant per write
    on average.

    Crash safety: a region is added only after its file is durably written, and the header
    and each entry are replaced atomically, so whatever a crash leaves lists only finished
    regions, and at most the regions since the last completed write are missing (they are
    re-read and found current). Losing a few entries to a kill only costs re-reading those
    regions, so writes are coalesced rather than paid once per region.
    """

    #: Log entries before a compaction, at least; more for a big world (``done // 1024``).
    MIN_SLOTS: Final = 64

    def __init__(self, store: BlobStore, cp: Checkpoint, interval: float) -> None:
        self._store = store
        self.cp = cp
        #: Done as of the last compaction; replaced (never changed) by the next one, so a
        #: compaction's thread can read it while the loop goes on.
        self._base: list[str] = list(cp.done)
        #: Done since the last compaction; ``_fresh``: since the last write.
        self._since: list[str] = []
        self._fresh: list[str] = []
        self._slot = 0
        self._interval = interval
        self._last = -math.inf
        self._lock = anyio.Lock()

    @property
    def done(self) -> frozenset[str]:
        return frozenset(self._base).union(self._since)

    async def mark_done(self, key: str) -> None:
        self._since.append(key)
        self._fresh.append(key)
        if time.monotonic() - self._last >= self._interval and not self._lock.locked():
            await self.write()

    async def write(self) -> None:
        """Make every region marked done so far durable.

        :raises StorageError: the write failed (nothing marked since the last write is lost
            from memory: the next write retries it).
        """
        async with self._lock:
            self._last = time.monotonic()
            if self._slot >= max(self.MIN_SLOTS, len(self._base) // 1024):
                await self.compact()
                return
            fresh, self._fresh = self._fresh, []
            if not fresh:
                return
            entry = _DoneEntry(
                snapshot_id=self.cp.snapshot_id, generation=self.cp.log_generation, done=fresh
            )
            try:
                await self._store.put_atomic(_entry_key(self._slot), _encode_entry(entry))
            except BaseException:
                self._fresh[:0] = fresh
                raise
            self._slot += 1

    async def compact(self) -> None:
        """Rewrite the header with every finished region under a new log generation.

        Merging, sorting and encoding run in a worker thread; on the loop this only swaps
        lists. The caller holds ``_lock`` (or nothing else writes yet: the start of a run).
        """
        self._last = time.monotonic()
        since, self._since = self._since, []
        fresh, self._fresh = self._fresh, []
        header = msgspec.structs.replace(
            self.cp,
            schemaVersion=CHECKPOINT_VERSION,
            log_generation=self.cp.log_generation + 1,
            done=[],
        )
        try:
            merged, data = await anyio.to_thread.run_sync(_seal_merged, header, self._base, since)
            await self._store.put_atomic(CHECKPOINT_KEY, data)
        except BaseException:
            self._since[:0] = since
            self._fresh[:0] = fresh
            raise
        self._base = merged
        self.cp = header
        self._slot = 0


def _seal_merged(header: Checkpoint, base: list[str], since: list[str]) -> tuple[list[str], bytes]:
    """Merge ``since`` into ``base`` (neither is changed) and encode ``header`` listing it.

    Runs in a worker thread: O(regions). ``header.done`` stays empty in memory. ``base`` is
    sorted and ``since`` nearly so (regions start in key order), so the sort is a merge of
    runs. A region is marked done once per run, so there is nothing to deduplicate (a
    duplicate would be harmless: ``done`` is read as a set).
    """
    merged = sorted(base + since)
    return merged, _encode_checkpoint(msgspec.structs.replace(header, done=merged))


# -- per-region work (runs in a worker thread) ----------------------------------------------


class _RegionFailed(Exception):
    def __init__(self, failure: RecordFailure, cause: BaseException | None = None) -> None:
        super().__init__(failure.describe())
        self.failure = failure
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised in a worker process and re-raised here: rebuild from the failure, not from
        # the formatted message. The cause pickles as its type, message and attributes.
        return (type(self), (self.failure, self.cause))


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


def _count(raw: RawRecord, counts: Counter[tuple[str, int]]) -> None:
    """Tally the chunk and its nested records by ``(type, schemaVersion)`` (full path)."""
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
        counts[(rtype, version)] += 1


def _tally(res: _RegionResult, targets: Mapping[str, int]) -> None:
    """Derive the record totals from a region's counts: once per region, not per record."""
    for (rtype, version), n in res.counts.items():
        res.records += n
        if version < targets.get(rtype, version):
            res.records_upgraded += n


class _Head(msgspec.Struct):
    """``type`` and ``schemaVersion`` of a record; msgspec skips its other fields unbuilt."""

    type: str
    schemaVersion: int


#: A chunk's own head, its ``record_versions`` and the heads of its nested records: enough to
#: count a chunk's records and to see that it needs no migration, decoded in C without
#: building the chunk. Fields follow ``CHUNK_NESTED_FIELDS``, so a new nested list is peeked
#: too. A payload it cannot decode (malformed, or a ``null`` list) takes the full path, which
#: gives the authoritative answer.
_ChunkHeads: Final[type[msgspec.Struct]] = msgspec.defstruct(
    "_ChunkHeads",
    [
        ("type", str),
        ("schemaVersion", int),
        ("record_versions", dict[str, int], msgspec.field(default_factory=dict)),
        *(
            (fname, list[_Head], msgspec.field(default_factory=list))
            for fname in CHUNK_NESTED_FIELDS
        ),
    ],
)
_HEAD: Final = attrgetter("type", "schemaVersion")


def _current_heads(
    targets: Mapping[str, int],
) -> tuple[tuple[str, int | None], tuple[tuple[str, tuple[str, int | None]], ...]]:
    """The chunk's head when current, and per nested field the head each record must have."""
    return ("chunk", targets.get("chunk")), tuple(
        (fname, (ftype, targets.get(ftype))) for fname, ftype in CHUNK_NESTED_FIELDS.items()
    )


def _peek_heads(
    heads: Any,
    current: tuple[tuple[str, int | None], tuple[tuple[str, tuple[str, int | None]], ...]],
    counts: Counter[tuple[str, int]],
) -> bool:
    """Count a peeked chunk's records; True when the chunk is current as stored.

    "Current" is exactly what makes ``upgrade_chunk`` return it unchanged: the chunk and every
    nested record at its type's current version, with a ``record_versions`` naming precisely
    the types present (each at its current version).
    """
    chunk_head, fields = current
    keys = [_HEAD(heads)]
    is_current = keys[0] == chunk_head
    expected_rv: dict[str, int | None] = {}
    for fname, want in fields:
        items = getattr(heads, fname)
        if items:
            fkeys = list(map(_HEAD, items))
            keys += fkeys
            if is_current and fkeys.count(want) != len(fkeys):
                is_current = False
            expected_rv[want[0]] = want[1]
    counts.update(keys)
    return is_current and bool(heads.record_versions == expected_rv)


_CODECS: Final[dict[str, ChunkCodec]] = {}
_PEEKERS: Final[dict[str, msgspec.msgpack.Decoder[Any] | msgspec.json.Decoder[Any]]] = {
    "msgpack": msgspec.msgpack.Decoder(_ChunkHeads),
    "json": msgspec.json.Decoder(_ChunkHeads),
}


def _codec(encoding: Encoding) -> ChunkCodec:
    codec = _CODECS.get(encoding)
    if codec is None:
        codec = _CODECS.setdefault(encoding, ChunkCodec(encoding))
    return codec


# How ``msgspec.convert`` must read plain data decoded from each encoding: msgpack carries
# bytes natively, JSON as base64 strings (the codec's own rule, see ``ChunkCodec``).
_BUILTIN_TYPES: Final[dict[str, tuple[type, ...] | None]] = {"msgpack": (bytes,), "json": None}


def _encode_upgraded(codec: ChunkCodec, up: RawRecord, where: str, stored: bytes) -> bytes:
    """Validate an upgraded chunk as the current ``ChunkRecord`` and encode it.

    Equivalent to ``codec.encode_raw`` minus its second ``upgrade_chunk`` pass (``up`` is
    already current), which is a quarter of the CPU per migrated chunk. ``stored`` (the
    chunk's bytes as read) is only decoded again to name the failing record.
    """
    try:
        rec = msgspec.convert(up, ChunkRecord, builtin_types=_BUILTIN_TYPES[codec.encoding])
        return codec.encode(rec)
    except (msgspec.ValidationError, RecursionError, ValueError) as exc:
        # The steps ran but produced something the current record type rejects: that is a
        # step failing, not the stored bytes being damaged.
        rid, rtype, version, note = _failing_record(codec, up, str(exc), stored, where)
        raise SchemaError(
            f"migrated chunk does not validate as the current schema: {exc}{note}",
            record_type=rtype,
            record_id=rid,
            schema_version=version,
            where=where,
        ) from exc


#: The JSON path msgspec ends a validation message with, e.g. ``$.characters[1].x``.
_ERROR_PATH: Final = re.compile(r"at `\$\.([A-Za-z_]\w*)\[(\d+)\]")


def _failing_record(
    codec: ChunkCodec, up: RawRecord, message: str, stored: bytes, where: str
) -> tuple[str | None, str, int | None, str]:
    """Resolve a validation error's JSON path to the record it is in.

    Returns the record's id, type and schemaVersion *as stored* (the version an operator
    finds in the data; the steps had brought it to the current one), and a note for the
    message. A path into a nested record (``$.characters[1].x``) names that record; any
    other path names the chunk itself.
    """
    field_name: str | None = None
    index = 0
    rec: Mapping[str, Any] = up
    rtype = "chunk"
    m = _ERROR_PATH.search(message)
    if m is not None and m.group(1) in CHUNK_NESTED_FIELDS:
        items, index = up.get(m.group(1)), int(m.group(2))
        if isinstance(items, list) and index < len(items) and isinstance(items[index], dict):
            field_name, rec = m.group(1), items[index]
            rtype = CHUNK_NESTED_FIELDS[field_name]
    rid = rec.get("id") if isinstance(rec.get("id"), str) else None
    upgraded = rec.get("schemaVersion") if type(rec.get("schemaVersion")) is int else None

    # The same record in the bytes as read: by id, else by position.
    try:
        old: Any = codec.decode_raw(stored, where=where)
    except (SchemaError, IntegrityError):
        old = None
    if field_name is not None and isinstance(old, dict):
        olds = old.get(field_name)
        olds = olds if isinstance(olds, list) else []
        by_id = [o for o in olds if rid is not None and isinstance(o, dict) and o.get("id") == rid]
        old = by_id[0] if by_id else (olds[index] if index < len(olds) else None)
    stored_version = old.get("schemaVersion") if isinstance(old, dict) else None
    if type(stored_version) is not int or stored_version == upgraded:
        return rid, rtype, upgraded, ""
    return rid, rtype, stored_version, f" (after upgrading it to v{upgraded})"


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
    (or, with ``collect_failures``, when anything failed: a dry run only reports). With
    ``collect_failures`` a file that does not verify is one failure naming the file, and
    nothing of it is counted.

    :raises _RegionFailed: (without ``collect_failures``) the file does not verify or a chunk
        fails to migrate.
    """
    region = (rx, ry)
    res = _RegionResult()
    try:
        rf = decode_region(data, rx=rx, ry=ry, path=key)
    except (IntegrityError, UnsupportedFormat) as exc:
        fail = _failure(key, region, None, exc)
        if not collect_failures:
            raise _RegionFailed(fail, exc) from exc
        res.failures.append(fail)  # nothing in it can be read: the whole file is the failure
        return res
    header = rf.header
    codec = _codec(header.encoding)
    peek = _PEEKERS[header.encoding].decode
    targets = registry.current_versions
    current = _current_heads(targets)
    counts = res.counts
    out: dict[tuple[int, int], bytes] = {}
    for ck in sorted(rf.chunks):
        payload = rf.chunks[ck]
        res.chunks += 1
        try:
            heads = peek(payload)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
            heads = None  # counted and judged on the full path below
        if heads is not None and _peek_heads(heads, current, counts):
            out[ck] = payload  # current: kept verbatim, never decoded
            continue
        where = f"{key} chunk {ck}"
        raw: RawRecord | None = None
        chunk_type: object = None
        try:
            raw = codec.decode_raw(payload, where=where)
            chunk_type = raw.get("type")
            if heads is None:
                _count(raw, counts)
            # Decoded here and dropped after encoding: the steps may run on it uncopied.
            up, changed = registry.upgrade_chunk(raw, where=where, consume=True)
            if changed:
                payload = _encode_upgraded(codec, up, where, payload)
                res.chunks_upgraded += 1
        except (SchemaError, IntegrityError) as exc:
            fail = _failure(key, region, ck, exc, {"type": chunk_type})
            if not collect_failures:
                raise _RegionFailed(fail, exc) from exc
            res.failures.append(fail)
            continue
        out[ck] = payload
    _tally(res, targets)
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


# -- worker processes ----------------------------------------------------------------------

#: Where a region's CPU work (verify, decode, upgrade, encode) runs. ``"auto"``: worker
#: processes for a world of at least ``PROCESS_MIN_REGIONS`` regions whose registry can be
#: sent to a process, else threads.
Workers = Literal["auto", "processes", "threads"]

#: ``workers="auto"`` uses processes from this many regions on. Below it, starting them
#: costs more than the second core can gain: forking the workers takes ~10-20 ms, and the
#: first start in a process also starts the fork server (a fresh interpreter importing
#: streamer, 0.3-0.7 s on the 2-core bench machine), against at most ~1 ms per full region.
PROCESS_MIN_REGIONS: Final = 64

#: The registry a worker process migrates with; set by ``_worker_main``.
_WORKER_REGISTRY: list[MigrationRegistry] = [REGISTRY]


def _migrate_in_worker(
    data: bytes, key: str, rx: int, ry: int, collect_failures: bool
) -> _RegionResult:
    return migrate_region_bytes(
        data,
        key=key,
        rx=rx,
        ry=ry,
        registry=_WORKER_REGISTRY[0],
        collect_failures=collect_failures,
    )


# One message each way per region, framed as an 8-byte length and a pickle. Our own framing
# (streamer.subproc, not ``Connection.send``) so the parent can do its side without
# blocking the event loop.
def _worker_main(conn: Connection, registry: MigrationRegistry | None) -> None:
    """A worker process: region in, result (or the failure, pickled) out, until EOF.

    EOF comes when the parent closes its end or dies (it holds the only other end), so a
    worker never outlives a parent killed with SIGKILL by more than its current region.
    """
    if registry is not None:  # None: the shipped REGISTRY, already built by the import
        _WORKER_REGISTRY[0] = registry
    fd = conn.fileno()
    while True:
        try:
            (n,) = FRAME_LEN.unpack(read_exact_blocking(fd, FRAME_LEN.size))
            args = pickle.loads(read_exact_blocking(fd, n))
        except EOFError:
            return
        try:
            reply: tuple[Any, ...] = (True, _migrate_in_worker(*args), None)
        except _RegionFailed as exc:
            reply = (False, exc, traceback.format_exc())
        except Exception as exc:  # a bug: re-raised in the parent, like a thread's would be
            reply = (False, RuntimeError(f"worker process: {exc!r}"), traceback.format_exc())
        try:
            out = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # an unpicklable cause: keep the failure, drop the object
            failed = reply[1]
            if isinstance(failed, _RegionFailed):
                failed = _RegionFailed(failed.failure)
            else:
                failed = RuntimeError(f"worker process: {failed!r}")
            out = pickle.dumps((False, failed, reply[2]), protocol=pickle.HIGHEST_PROTOCOL)
        write_all_blocking(fd, FRAME_LEN.pack(len(out)) + out)


class _RemoteTraceback(Exception):
    """The traceback of a failure in a worker process, as text, chained as its cause."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


def _worker_processes(
    workers: Workers, registry: MigrationRegistry, jobs: int, regions: int
) -> int:
    """How many worker processes to use (0: threads).

    :raises ValueError: ``workers="processes"`` but processes cannot be used here.
    """
    if workers == "threads" or (workers == "auto" and regions < PROCESS_MIN_REGIONS):
        return 0
    why = None
    if "forkserver" not in multiprocessing.get_all_start_methods():
        why = "this platform has no forkserver start method"
    elif registry is not REGISTRY:
        try:
            # Steps pickle by module and name; a worker imports their modules, not __main__.
            if b"__main__" in pickle.dumps(registry):
                why = "the migration registry has steps defined in __main__"
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            why = f"the migration registry cannot be sent to a worker process ({exc})"
    if why is not None:
        if workers == "processes":
            raise ValueError(f"workers='processes' is not possible: {why}")
        log.debug("migrating in threads: %s", why)
        return 0
    return max(1, min(jobs, os.cpu_count() or 1))


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection


class _ProcessWorkers:
    """Region CPU work in worker processes: region bytes in, new region bytes and counts out.

    All I/O stays in this process, on the event loop side; a worker only computes, so a
    worker that dies (or one left behind by a killed parent, until its region is done) can
    never write to the world. Each worker has its own socket pair; this side sends and
    receives on the event loop without blocking it, so a region costs two wake-ups (worker,
    loop), as a thread does. Workers are forked from a fork server, never from this process:
    a fork here would inherit its open descriptors (the world lock's among them) and any
    lock another thread holds at that instant. ``_RegionFailed`` pickles, so a failing
    record halts and rolls back exactly as with threads; a worker that dies is a failure of
    its region and is replaced by a new one (a dry run goes on after it).
    """

    def __init__(self, processes: int, registry: MigrationRegistry) -> None:
        self.processes = processes
        self._registry = None if registry is REGISTRY else registry
        self._all: list[_Worker] = []
        # The idle workers themselves are the slots: a region takes one out and puts it back
        # when done, so a worker that dies (and is not put back) can never be handed out.
        self._idle_in, self._idle = anyio.create_memory_object_stream[_Worker](processes)
        #: Workers started and not known dead; 0 closes ``_idle_in`` (no worker left).
        self._alive = 0
        self._started = anyio.Event()
        #: Set when the workers could not be started: the run falls back to threads.
        self.broken: BaseException | None = None

    async def start(self) -> None:
        """Start the workers (in a thread: the first start of a process launches the fork
        server, which imports streamer). Never raises; on failure the run uses threads."""
        try:
            workers = await anyio.to_thread.run_sync(self._start_sync)
        except Exception as exc:  # nothing was submitted yet: threads take over
            self.broken = exc
            log.warning("worker processes unavailable (%r); migrating in threads", exc)
        else:
            for worker in workers:
                self._idle_in.send_nowait(worker)
            self._alive = len(workers)
        finally:
            self._started.set()

    def _start_sync(self) -> list[_Worker]:
        ctx = multiprocessing.get_context("forkserver")
        # Only takes effect when this process starts its fork server; the fork server then
        # imports streamer once and every worker forked from it starts ready.
        ctx.set_forkserver_preload([__name__])
        return [self._spawn_sync() for _ in range(self.processes)]

    def _spawn_sync(self) -> _Worker:
        ctx = multiprocessing.get_context("forkserver")
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=_worker_main,
            args=(child_conn, self._registry),
            name="streamer-migrate-worker",
            daemon=True,
        )
        worker = _Worker(proc, parent_conn)
        self._all.append(worker)
        proc.start()
        child_conn.close()  # the worker's end lives in the worker only: EOF on our death
        os.set_blocking(parent_conn.fileno(), False)
        return worker

    async def _replace(self, dead: _Worker) -> None:
        """Account for a dead worker and start one in its place (a dry run goes on after
        a death). If none can be started the pool shrinks; with no worker left, regions
        waiting for one fail instead of waiting forever."""
        self._alive -= 1
        dead.conn.close()
        try:
            worker = await anyio.to_thread.run_sync(self._spawn_sync)
        except Exception as exc:
            log.warning("cannot start a worker process to replace a dead one: %r", exc)
        else:
            self._alive += 1
            self._idle_in.send_nowait(worker)
        if self._alive == 0:
            self._idle_in.close()

    async def ready(self) -> bool:
        await self._started.wait()
        return self.broken is None

    async def migrate(
        self, data: bytes, key: str, rx: int, ry: int, collect_failures: bool
    ) -> _RegionResult:
        request = pickle.dumps((data, key, rx, ry, collect_failures), pickle.HIGHEST_PROTOCOL)
        try:
            worker = await self._idle.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            gone = BrokenExecutor("every worker process has died; none could be restarted")
            raise _RegionFailed(_failure(key, (rx, ry), None, gone), gone) from None
        fd = worker.conn.fileno()
        try:
            await write_all(fd, FRAME_LEN.pack(len(request)) + request)
            (n,) = FRAME_LEN.unpack(await read_exact(fd, FRAME_LEN.size))
            ok, value, remote_tb = pickle.loads(await read_exact(fd, n))
        except (EOFError, OSError) as exc:
            # The worker died (killed, out of memory); it is not put back.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(worker.process.join, 5.0)
                await self._replace(worker)
            died = BrokenExecutor(
                f"worker process {worker.process.pid} died (exit code "
                f"{worker.process.exitcode}) while migrating this region"
            )
            raise _RegionFailed(_failure(key, (rx, ry), None, died), died) from exc
        except BaseException:
            worker.process.kill()  # cancelled mid-message: the worker is out of step
            self._alive -= 1
            if self._alive == 0:
                self._idle_in.close()
            raise
        self._idle_in.send_nowait(worker)
        if ok:
            assert isinstance(value, _RegionResult)
            return value
        assert isinstance(value, BaseException)
        remote = _RemoteTraceback(remote_tb)
        if isinstance(value, _RegionFailed) and value.cause is not None:
            value.cause.__cause__ = remote  # the chain did not cross the process boundary
        raise value from remote

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            self._idle_in.close()
            self._idle.close()
            for worker in self._all:
                worker.conn.close()  # EOF: the worker exits after its current region
            await anyio.to_thread.run_sync(self._join_sync)

    def _join_sync(self) -> None:
        for worker in self._all:
            worker.process.join(5.0)
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join()


# -- the engine ----------------------------------------------------------------------------


async def run_region_pool(
    keys: list[tuple[str, int, int]],
    jobs: int,
    region: Callable[[str, int, int], Awaitable[None]],
    fail: Callable[[RecordFailure, BaseException | None], None],
    halted: Callable[[], bool],
) -> None:
    """Migrate ``keys`` with ``jobs`` workers until done or halted (shared with the live run).

    No cancellation on failure: a region in flight finishes its atomic write before any
    rollback starts, so no abandoned write can land after the restore. Any exception of a
    region, not only a record failure, halts the run: nothing escapes past the rollback.
    """
    it = iter(keys)

    async def worker() -> None:
        while not halted():
            item = next(it, None)
            if item is None:
                return
            try:
                await region(*item)
            except _RegionFailed as exc:
                fail(exc.failure, exc.cause)
            except Exception as exc:
                log.exception("unexpected error migrating %s", item[0])
                fail(_failure(item[0], (item[1], item[2]), None, exc), exc)

    async with anyio.create_task_group() as tg:
        for _ in range(max(1, min(jobs, len(keys)))):
            tg.start_soon(worker)


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
    processes: _ProcessWorkers | None = None
    counts: Counter[tuple[str, int]] = field(default_factory=Counter)
    halted: RecordFailure | None = None
    halted_cause: BaseException | None = None

    def fail(self, failure: RecordFailure, cause: BaseException | None) -> None:
        """A region could not be handled (unreadable, storage error, dead worker, a bug).

        A real run halts on it (and rolls back). A dry run writes nothing, so there is
        nothing to protect by stopping: the region is recorded as a failure, naming its file
        and the reason, and the other regions are still read.
        """
        if self.dry_run:
            log.warning("dry run: cannot read %s: %s", failure.file, failure.describe())
            self.report.regions_failed += 1
            self._record([failure])
            if self.progress is not None:
                self.progress.advance(regions=1, chunks=0)
            return
        if self.halted is None:
            self.halted = failure
            self.halted_cause = cause

    def _record(self, failures: list[RecordFailure]) -> None:
        r = self.report
        r.failures_total += len(failures)
        room = self.max_failures - len(r.failures)
        if room > 0:
            r.failures.extend(failures[:room])

    def add(self, res: _RegionResult) -> None:
        r = self.report
        r.chunks_total += res.chunks
        r.chunks_upgraded += res.chunks_upgraded
        r.records_total += res.records
        r.records_upgraded += res.records_upgraded
        self.counts.update(res.counts)
        if res.failures:
            r.regions_failed += 1
            self._record(res.failures)

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
                res = await self._migrate(blob.data, key, rx, ry)
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
                cp_key = getattr(exc, "key", None) or CHECKPOINT_KEY
                raise _RegionFailed(_failure(cp_key, None, None, exc), exc) from exc
        if self.progress is not None:
            self.progress.advance(regions=1, chunks=res.chunks)

    async def _migrate(self, data: bytes, key: str, rx: int, ry: int) -> _RegionResult:
        pool = self.processes
        async with self.cpu:
            if pool is not None and await pool.ready():
                return await pool.migrate(data, key, rx, ry, self.dry_run)
            return await anyio.to_thread.run_sync(self._migrate_sync, data, key, rx, ry)

    def _migrate_sync(self, data: bytes, key: str, rx: int, ry: int) -> _RegionResult:
        return migrate_region_bytes(
            data, key=key, rx=rx, ry=ry, registry=self.registry, collect_failures=self.dry_run
        )

    async def run_pool(self, keys: list[tuple[str, int, int]], jobs: int) -> None:
        await run_region_pool(keys, jobs, self.region, self.fail, lambda: self.halted is not None)


async def _region_keys(store: BlobStore) -> list[tuple[str, int, int]]:
    keys = []
    for key in await store.list("regions/"):
        coords = parse_region_key(key)
        if coords is None or key != f"regions/{key.rpartition('/')[2]}":
            continue  # a stray file, reported by `streamer check`, not ours to touch
        keys.append((key, coords[0], coords[1]))
    return keys


async def _prepare(
    store: BlobStore,
    *,
    resume: bool,
    where: str,
    manifest: WorldManifest,
    targets: dict[str, int],
    keys: list[tuple[str, int, int]],
    report: MigrationReport,
    snaps: SnapshotOps,
    checkpoint_interval: float,
) -> _Checkpointer | None:
    """Check the checkpoint, take the pre-migration snapshot, write the first checkpoint.

    ``None``: an interrupted rollback was found and finished; there is nothing to migrate.
    """
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
            return None
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
    await checkpointer.compact()  # a fresh header: retires whatever log an earlier run left
    return checkpointer


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
    workers: Workers = "threads",
) -> MigrationReport:
    """Migrate every record of the world in ``store`` to ``registry``'s current versions.

    The caller holds the world (the CLI takes ``WorldLock``; a live runtime passes ``hooks``).
    Returns a report; ``report.status == "failed"`` means the world was rolled back (or, for
    a dry run, that failures were found). ``registry`` and ``snapshots`` are injectable for
    tests and for the runtime.

    ``workers`` says where the per-region CPU work runs: ``"processes"`` (forkserver
    workers, ``min(jobs, cpu_count)`` of them; the registry is sent to them, so its steps
    must be importable functions or picklable objects), ``"threads"``, or ``"auto"``:
    processes for at least ``PROCESS_MIN_REGIONS`` regions when the registry can be sent,
    else threads. Results and failure handling are the same either way. The default is
    threads: worker processes follow multiprocessing's rules (the caller's ``__main__`` is
    re-imported in each worker), so a script must run under an ``if __name__ ==
    "__main__"`` guard to opt in; the CLI does, with ``"auto"``.

    :raises WorldNotFound: ``store`` holds no world.
    :raises NoCheckpoint: ``resume`` but no interrupted run is recorded.
    :raises MigrationInProgress: not ``resume`` but an interrupted run is recorded.
    :raises MalformedFile: the checkpoint is damaged.
    :raises RollbackFailed: the migration failed and the restore failed too.
    :raises ValueError: ``jobs < 1``, or ``workers="processes"`` where processes cannot be
        used (no forkserver, or a registry that cannot be sent to a process).
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

    nproc = _worker_processes(workers, registry, jobs, len(keys))
    pool = _ProcessWorkers(nproc, registry) if nproc else None
    try:
        checkpointer: _Checkpointer | None = None
        prepare_error: Exception | None = None
        async with anyio.create_task_group() as tg:
            if pool is not None:
                tg.start_soon(pool.start)  # overlaps the snapshot; never raises
            if not dry_run:
                try:
                    checkpointer = await _prepare(
                        store,
                        resume=resume,
                        where=where,
                        manifest=manifest,
                        targets=targets,
                        keys=keys,
                        report=report,
                        snaps=snaps,
                        checkpoint_interval=checkpoint_interval,
                    )
                except Exception as exc:
                    prepare_error = exc  # raised below as itself, not in an ExceptionGroup
        if prepare_error is not None:
            raise prepare_error
        if not dry_run and checkpointer is None:
            report.elapsed_s = time.perf_counter() - t0
            return report

        done = checkpointer.done if checkpointer is not None else frozenset()
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
            processes=pool,
        )
        await run.run_pool(pending, jobs)
    finally:
        if pool is not None:
            await pool.aclose()
    report.counts = _nest_counts(run.counts)

    if dry_run:
        # ``_Run.fail`` records a dry run's region failures and never halts it.
        assert run.halted is None
        report.status = "failed" if report.failures_total else "dry_run"
    elif run.halted is not None:
        assert checkpointer is not None
        report.failures = [run.halted]
        report.failures_total = 1
        report.regions_failed = 1
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
            try:
                await _delete_checkpoint(store)
            except StorageError as exc:
                # Not a failure of the migration (every region and world.json are done), but
                # the world refuses to open while the checkpoint is there: say how to finish.
                raise StorageUnavailable(
                    f"the migration completed (every region and {MANIFEST_KEY} are written), "
                    f"but its checkpoint could not be removed ({exc}); run it again with "
                    "--resume to finish",
                    key=CHECKPOINT_KEY,
                ) from exc
            report.status = "completed"
    report.elapsed_s = time.perf_counter() - t0
    return report


async def _finish(store: BlobStore, *, manifest_targets: dict[str, int], where: str) -> None:
    """Record in the manifest that every record is now written at the target versions.

    Per type the higher of the two wins: a version recorded by a newer release (records of
    a type this code does not migrate, or a newer chain) is never lowered.
    """
    manifest = await read_manifest(store, where=where)
    merged = dict(manifest.record_versions)
    for rtype, version in manifest_targets.items():
        merged[rtype] = max(version, merged.get(rtype, version))
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
    # A rolling-back checkpoint lists nothing done (a resume only finishes the restore) and
    # retires the done log, so it is small to write whatever the world's size.
    cp = msgspec.structs.replace(
        cp,
        status="rolling_back",
        schemaVersion=CHECKPOINT_VERSION,
        log_generation=cp.log_generation + 1,
        done=[],
    )
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
        await _delete_checkpoint(store)
    except StorageError as exc:
        log.error("cannot remove %s after rollback: %s", CHECKPOINT_KEY, exc)
