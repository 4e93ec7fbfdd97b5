"""The write-ahead journal: group-committed, segmented, truncated at a torn tail on open.

Layout: ``journal/{seq:020d}.wal`` segments of frames (``format/journal.py``), one frame per
``submit`` batch (a msgpack :class:`JournalBatch`), so a batch touching many regions is
all-or-nothing: a frame is either intact or discarded whole.

Group commit: ``append`` only queues a frame; one writer task (:meth:`Journal.run`, in the
world's task group) takes every queued frame, writes them and fsyncs once in a single
worker-thread hop, then reports the whole group durable. However many callers submit at
once, they share that one fsync.

Durability modes:

- ``sync``: a batch is acknowledged after the fsync that covers it.
- ``interval``: a batch is acknowledged once written (it survives a process kill, not a
  power loss); the writer fsyncs at most every ``fsync_interval_ms`` while data is unsynced.

A new segment is created and its directory entry fsynced before any frame in it is
acknowledged; once a segment closes, :meth:`Journal.keep_segment_open` opens the next one
ahead of the commit that needs it. Segments rotate at ``segment_bytes``. Each segment
remembers the highest tick it holds per region; once every such region's
``lastProcessedTick`` has reached it, the segment is deleted (:meth:`Journal.collect`), in
any order; what left with it is recorded first in ``state/journal_drops.json``
(``runtime/journal_drops.py``).

Preallocation (``preallocate=True``; off by default, see docs/deviations.md): a background task
(:meth:`Journal.keep_spare`) keeps one spare file, ``journal/spare.zero``, zero-filled to
``segment_bytes`` + ``MAX_COMMIT_BYTES`` + a page and synced, and a new segment is that spare
renamed. Frames then overwrite
zeros in place and are synced with ``fdatasync``: no block allocation and no size change, so
the sync is a data flush without a commit of the file system's own journal, which here
would wait behind region files' renames and allocations (docs/performance.md). A passed
segment is recycled into the next spare instead of unlinked when no spare is ready, which
saves the blocks' freeing (ext4 with online discard stalled 15-34 ms on it); in steady
state the keeper has usually made one already, so that is rare. The unwritten zero tail of a
segment is padding to the scanner (``format/journal.py``). A closed segment is cut to its
used size, so only the newest can end in zeros (and after a crash, open cuts them); a clean
close deletes the spare too, so a closed world's journal holds no zeros. Written in place, a
commit's pages may persist out of order on power loss: commits are capped at
``MAX_COMMIT_BYTES`` (interval mode syncs before passing it) so ``judge_segment`` can tell
the torn last commit from damage.

Failure: if a write or fsync fails, every batch of that group fails with
``StorageUnavailable`` and is *not* reported durable; the segment is truncated back to the
last acknowledged byte (``truncate`` fsyncs) and abandoned, so later frames go to a fresh
segment and no later acknowledged frame can sit behind a partial one. If even that fails,
the journal refuses all further appends (the world must be reopened).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar

import anyio
import msgspec

from streamer.errors import ChecksumMismatch, MalformedFile, StorageUnavailable, WorldClosed
from streamer.format.journal import (
    MAX_COMMIT_BYTES,
    MIN_ZERO_TAIL,
    SEGMENT_COPY_SUFFIX,
    SPARE_FILE_NAME,
    encode_frame,
    judge_segment,
    parse_segment_name,
    scan_frames,
    segment_file_name,
)
from streamer.runtime.fastsync import event_factory
from streamer.runtime.journal_drops import DropLog
from streamer.runtime.sync_process import DONE, LOST, NOT_SENT, SYNC_FAILED, SyncProcess
from streamer.schema.deltas import AnyDelta, records_current, upgrade_raw_records
from streamer.schema.migrations import MalformedRecord
from streamer.storage.base import BlobStore
from streamer.storage.fs import FileSystem, OsFileSystem
from streamer.storage.local import LocalStore

__all__ = [
    "JOURNAL_DIR",
    "MAX_COMMIT_BYTES",
    "JournalBatch",
    "JournalStats",
    "Journal",
    "RegionTicks",
    "RunSync",
    "SPARE_NAME",
    "encode_batch",
    "encode_batch_raw",
    "segment_name",
]

log = logging.getLogger(__name__)

JOURNAL_DIR = "journal"
#: The zero-filled file the next segment is made from (not a segment: not ``*.wal``).
SPARE_NAME = f"{JOURNAL_DIR}/{SPARE_FILE_NAME}"
# The spare is zero-filled a chunk per thread hop, each chunk synced, with a pause between:
# the device never holds more than one chunk of zeros ahead of a commit's fdatasync (8 MiB
# would be tens of ms here), and a 64 MiB spare takes about a second, while a segment lasts
# 7-8 s at 200,000 deltas/s (44 bytes each).
_ZERO_CHUNK = 256 * 1024
_ZEROS = bytes(_ZERO_CHUNK)
_ZERO_PAUSE_S = 0.002
# The pauses before a lost sync process is replaced (keep_sync_process): the first, and the
# longest the doubling reaches.
_RESTART_FIRST_S = 5.0
_RESTART_MAX_S = 300.0

RegionKey: TypeAlias = tuple[int, int]
#: Highest tick per region, for one batch or one segment.
RegionTicks: TypeAlias = Mapping[RegionKey, int]

T = TypeVar("T")
#: Runs a blocking callable in a worker thread (the world gives the journal a thread of its
#: own: ``ThreadLane.run``); calls made one after another must run in that order.
RunSync: TypeAlias = Callable[..., Awaitable[Any]]


class JournalBatch(msgspec.Struct, tag="journal_batch", tag_field="type", kw_only=True):
    """One ``submit`` batch as journaled: the unit of atomicity and of replay order."""

    schemaVersion: int = 1
    seq: int
    deltas: list[AnyDelta]


class _RawJournalBatch(msgspec.Struct, tag="journal_batch", tag_field="type", kw_only=True):
    """:class:`JournalBatch` with its ``deltas`` already encoded (same fields, same order)."""

    schemaVersion: int = 1
    seq: int
    deltas: msgspec.Raw


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(JournalBatch)
_RAW_DECODER = msgspec.msgpack.Decoder()


def encode_batch(batch: JournalBatch) -> bytes:
    return _ENCODER.encode(batch)


def encode_batch_raw(seq: int, deltas: bytes) -> bytes:
    """``encode_batch(JournalBatch(seq=seq, deltas=ds))``, byte for byte, given ``deltas`` =
    the msgpack encoding of ``ds``: a batch encoded once (to validate it) is not encoded again.
    """
    return _ENCODER.encode(_RawJournalBatch(seq=seq, deltas=msgspec.Raw(deltas)))


def decode_batch(payload: bytes, *, where: str) -> JournalBatch:
    """Decode a journal frame; the records its deltas carry come out at current versions.

    Fast path: the typed decode, when every record in it is current. Otherwise (an older
    release wrote it, or the typed decode failed on an old record's shape) the frame is
    decoded as plain data and its records go through the migration registry, as a chunk's
    do: typed alone, a newer record would lose the fields this code does not know and an
    old one would replay unmigrated.

    :raises MalformedFile: the frame verified but does not hold a JournalBatch v1.
    :raises UnknownSchemaVersion: a record is newer than this code: refused, never replayed
        with fields dropped (names ``where``, the batch seq, delta index, record id, type
        and version).
    :raises MigrationFailed: upgrading an old record failed (names the same).
    """
    try:
        batch = _DECODER.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return _decode_batch_slow(payload, where=where)
    if batch.schemaVersion == 1 and records_current(batch.deltas):
        return batch
    return _decode_batch_slow(payload, where=where)


def _decode_batch_slow(payload: bytes, *, where: str) -> JournalBatch:
    try:
        raw = _RAW_DECODER.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedFile(
            f"journal frame is not a valid journal batch: {exc}", path=where
        ) from None
    version = raw.get("schemaVersion") if isinstance(raw, dict) else None
    if type(version) is int and version != 1:
        raise MalformedFile(f"journal batch schemaVersion {version} is not supported", path=where)
    deltas = raw.get("deltas") if isinstance(raw, dict) else None
    if isinstance(deltas, list):
        seq = raw.get("seq")
        at = f"{where} batch seq {seq if type(seq) is int else '?'}"
        try:
            upgrade_raw_records(deltas, where=at)
        except MalformedRecord as exc:
            raise MalformedFile(str(exc), path=where) from None
    try:
        return msgspec.convert(raw, JournalBatch)
    except (msgspec.ValidationError, RecursionError) as exc:
        raise MalformedFile(
            f"journal frame is not a valid journal batch: {exc}", path=where
        ) from None


def _sync_in_place(fs: FileSystem, path: str) -> None:
    handle = fs.open_write(path)
    try:
        fs.fdatasync(handle)
    finally:
        fs.close(handle)


def segment_name(seq: int) -> str:
    return f"{JOURNAL_DIR}/{segment_file_name(seq)}"


class JournalStats(msgspec.Struct, frozen=True, kw_only=True):
    #: Batches queued for the writer and not yet written.
    pending: int
    #: Group commits (writer hops) and fsyncs issued.
    commits: int
    fsyncs: int
    #: Batches acknowledged since open.
    batches: int
    #: Segments on disk holding frames (not an empty one opened ahead) and their total bytes:
    #: the lag regions have not yet folded away, plus up to ``Journal.COLLECT_ACTIVE_BYTES``
    #: of folded frames in the segment being written to (collect leaves it until then).
    segments: int
    live_bytes: int
    segments_deleted: int
    #: Bytes of torn tail discarded at open.
    torn_bytes: int
    #: Bytes written but not yet fsynced (``interval`` mode).
    unsynced_bytes: int
    #: Segments made from a zero-filled spare, and spares made from a passed segment.
    segments_preallocated: int = 0
    spares_recycled: int = 0
    #: A zero-filled spare is ready for the next segment.
    spare_ready: bool = False
    #: Commits written and synced by the sync process (``runtime/sync_process.py``), and
    #: whether it is running (off, not started or lost: commits go through the thread).
    commits_in_process: int = 0
    sync_process: bool = False
    #: Its process id while it runs (0 otherwise): a helper process of the world's.
    sync_process_pid: int = 0
    #: Segments opened by ``keep_segment_open`` before a commit needed them.
    segments_opened_ahead: int = 0
    #: Sync processes started to replace a lost one (``keep_sync_process``).
    sync_process_restarts: int = 0


class _SyncFailed(OSError):
    """The sync of a commit failed (its write went through): in interval mode, acknowledged
    bytes may be gone from the page cache, unlike after a failed write."""


@dataclass
class _Segment:
    seq: int
    size: int = 0
    ticks: dict[RegionKey, int] = field(default_factory=dict)
    # Made from the zero-filled spare: the file may be longer than ``size``.
    preallocated: bool = False

    def absorb(self, ticks: RegionTicks) -> None:
        for region, tick in ticks.items():
            if tick > self.ticks.get(region, -1):
                self.ticks[region] = tick


@dataclass
class _Pending:
    batch: JournalBatch
    frame: bytes
    ticks: RegionTicks
    done: anyio.Event
    error: BaseException | None = None

    async def wait(self) -> JournalBatch:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.batch


@dataclass
class Replay:
    """What :meth:`Journal.open` found: batches in journal order and what was discarded."""

    batches: list[JournalBatch]
    torn_bytes: int
    segments: int


class Journal:
    """Group-committed write-ahead log; see the module docstring.

    :param fs: the file system the segments live in (``LocalStore.fs``).
    :param run_sync: runs a blocking callable in a worker thread (the world's: a thread of
        the journal's own, so commits never wait behind region writes).
    :param on_durable: called synchronously, in journal order, with each committed group
        before any of its callers wakes: the world applies batches to its queues here, so
        queue order always equals journal order.
    """

    #: The segment being written to is dropped by ``collect`` once passed and this big.
    COLLECT_ACTIVE_BYTES = 1024 * 1024

    def __init__(
        self,
        fs: FileSystem,
        run_sync: RunSync,
        *,
        durability: Literal["sync", "interval"] = "sync",
        fsync_interval_ms: int = 10,
        segment_bytes: int = 64 * 1024 * 1024,
        fsync: bool = True,
        preallocate: bool = False,
        on_durable: Callable[[Sequence[JournalBatch]], None] | None = None,
        on_failed: Callable[[Sequence[JournalBatch]], None] | None = None,
        collect_run_sync: RunSync | None = None,
        spare_pause_s: float = _ZERO_PAUSE_S,
        drops_store: BlobStore | None = None,
        sync_process: bool = False,
        sync_restart_s: float | None = None,
    ) -> None:
        self._fs = fs
        # Commits to an open segment in a process of their own (runtime/sync_process.py):
        # only where handles are descriptors, and only with fsync on (see there why).
        self._want_process = sync_process and fsync and isinstance(fs, OsFileSystem)
        self._proc: SyncProcess | None = None
        self._proc_commits = 0
        # A lost sync process is replaced (keep_sync_process) after this long, doubling
        # with each replacement up to _RESTART_MAX_S: commits meanwhile go through the thread.
        self._restart_s = _RESTART_FIRST_S if sync_restart_s is None else sync_restart_s
        self._proc_lost = anyio.Event()
        self._proc_restarts = 0
        # Which ticks left with deleted segments (runtime/journal_drops.py), written through
        # a store on the same file system unless the caller gives one.
        self._drops = DropLog(drops_store or LocalStore(".", fs=fs, fsync=fsync))
        self._run_sync = run_sync
        # Deleting passed segments can take tens of ms (ext4 freeing a 64 MiB file); with a
        # writer that has one thread of its own, it must not queue the writer's hops behind.
        self._collect_run_sync = collect_run_sync or run_sync
        self._durability = durability
        self._interval = fsync_interval_ms / 1000.0
        self._segment_bytes = segment_bytes
        # A segment rotates once it holds segment_bytes, so its last commit starts before
        # that and (several batches) writes at most MAX_COMMIT_BYTES: the spare is that much
        # longer, plus a page, so zeros always follow a commit written in place
        # (judge_segment needs them to tell that commit from damage).
        self._spare_bytes = segment_bytes + MAX_COMMIT_BYTES + MIN_ZERO_TAIL
        self._spare_pause = spare_pause_s
        self._fsync = fsync
        # Without fsync there is no sync for preallocation to make cheaper.
        self._preallocate = preallocate and fsync
        self.on_durable = on_durable
        #: Called synchronously with batches that will never be acknowledged.
        self.on_failed = on_failed

        self._segments: list[_Segment] = []
        self._active: _Segment | None = None
        self._handle: int | None = None
        self._next_seg = 1
        self._next_batch = 1
        self._pending: list[_Pending] = []
        self._new_event = event_factory()  # one Event per batch: not anyio's lookup each
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        # Serialises the writer's hops with collect()'s choice of segments and its rotation
        # of the active one: both touch the active handle. Fast acquire: an uncontended
        # acquire (nearly every commit's) does not give up the loop's turn first, which put
        # each commit behind every ready task (see thread_lane.py).
        self._io_lock = anyio.Lock(fast_acquire=True)
        # One collection at a time, and none during ``paused()``. Held (without the I/O
        # lock) while dead segments are unlinked: freeing a 64 MiB file took ext4 up to
        # 29 ms here, and every acknowledgement waited for it while that ran under the I/O
        # lock.
        self._collect_lock = anyio.Lock()
        self._broken: BaseException | None = None
        self._closing = False
        self._closed = False
        self._unsynced = 0
        self._last_sync = time.monotonic()
        # Set on the loop once the spare is zero-filled and synced; cleared by the writer's
        # thread (under the I/O lock) when a segment takes it. Never both at once: the
        # keeper prepares only while it is clear, the writer takes it only while it is set.
        self._spare_ready = False
        self._spare_wanted = anyio.Event()
        self._spare_wanted.set()
        # Held while the spare file is written: by the keeper zero-filling it, by collect()
        # renaming a passed segment onto it, by aclose() deleting it.
        self._spare_lock = anyio.Lock()
        self._spares_recycled = 0
        self._spares_used = 0
        # Set when the active segment was closed (rotated or abandoned): the keeper opens
        # the next one ahead of the commit that needs it (keep_segment_open).
        self._segment_wanted = anyio.Event()
        self._segments_ahead = 0

        self._commits = 0
        self._fsyncs = 0
        self._batches = 0
        self._deleted = 0
        self._torn = 0

    # -- open / replay ----------------------------------------------------------------------

    async def open(self, ticks_of: Callable[[JournalBatch], RegionTicks]) -> Replay:
        """Scan every segment, cut a torn tail, make what it replays durable (with fsync on:
        see ``_secure_newest_blocking``) and return the batches to replay.

        ``ticks_of`` tells which regions (and highest ticks) a batch touches, so segment
        deletion works for replayed segments as for new ones. New frames always go to a
        fresh segment; existing ones are only read, synced, truncated, replaced by a copy
        of their valid bytes (the newest) or deleted.

        :raises MalformedFile: a frame verified but holds no journal batch.
        :raises StorageUnavailable: the segments could not be read, cut, copied or synced.
        """
        try:
            scanned = await self._run_sync(self._scan_blocking)
        except OSError as exc:
            raise StorageUnavailable(
                f"cannot open the journal (reading, cutting, copying or syncing its "
                f"segments): {exc}",
                key=JOURNAL_DIR,
            ) from exc
        batches: list[JournalBatch] = []
        for seq, payloads, size, torn in scanned:
            seg = _Segment(seq, size=size)
            name = segment_name(seq)
            for payload in payloads:
                batch = decode_batch(payload, where=name)
                seg.absorb(ticks_of(batch))
                batches.append(batch)
                self._next_batch = max(self._next_batch, batch.seq + 1)
            if torn:
                self._torn += torn
                log.warning("journal %s: discarded a torn tail of %d bytes", name, torn)
            self._segments.append(seg)
            self._next_seg = seq + 1
        # Before any new segment can reuse a number a crash left pending in the record.
        await self._drops.open(s.seq for s in self._segments)
        self._next_seg = max(self._next_seg, self._drops.pending_high + 1)
        if self._want_process:
            self._proc = await SyncProcess.start()
        return Replay(batches=batches, torn_bytes=self._torn, segments=len(scanned))

    def _scan_blocking(self) -> list[tuple[int, list[bytes], int, int]]:
        fs = self._fs
        out: list[tuple[int, list[bytes], int, int]] = []
        listed = fs.listdir(JOURNAL_DIR)
        for name in listed:
            if name.endswith(SEGMENT_COPY_SUFFIX):
                # An open that crashed while securing its newest segment: the rename never
                # happened, so the segment itself is intact.
                fs.unlink(f"{JOURNAL_DIR}/{name}")
        names = sorted(n for n in listed if parse_segment_name(n) is not None)
        for i, name in enumerate(names):
            seq = parse_segment_name(name)
            assert seq is not None
            path = f"{JOURNAL_DIR}/{name}"
            data = fs.read(path)
            scan = scan_frames(data)
            verdict = judge_segment(
                scan, len(data), newest=i == len(names) - 1, preallocated=self._preallocate
            )
            torn = verdict.torn_bytes
            if verdict.damaged:
                # Acknowledged batches were lost (format/journal.py: judge_segment). Cutting
                # there would drop them silently.
                raise ChecksumMismatch(
                    f"journal damaged at byte {scan.valid_length} of {len(data)} "
                    f"({scan.frames_after_tear} intact records after the damage): acknowledged "
                    "deltas are lost; the world refuses to open. See docs/runbook.md "
                    "(journal damage): restore a snapshot, or keep a copy of the segment in "
                    f"quarantine/ and truncate it to {scan.valid_length} bytes to accept the "
                    "loss of what follows (the batches before the damage are kept)",
                    path=path,
                )
            if verdict.last_commit_frames:
                log.warning(
                    "journal %s: %d intact records after the torn tail, then zeros: the last "
                    "commit, persisted out of order and never acknowledged; discarded",
                    path,
                    verdict.last_commit_frames,
                )
            if scan.padding and not torn:
                log.info("journal %s: cut %d bytes of zeros after its frames", path, scan.padding)
            # What we replay may be only in the page cache: interval mode acknowledges
            # before its sync, a killed process never ran it, and a world opened with fsync
            # off never synced at all. Batches acknowledged after this open are synced, so a
            # power loss would keep them and lose these: a gap in the middle of the ticks.
            if i == len(names) - 1 and self._fsync:
                self._secure_newest_blocking(path, memoryview(data)[: scan.valid_length])
            elif torn or scan.padding:
                # Cut it durably now: a later segment must never follow garbage on replay,
                # and a segment never holds padding once it is no longer written to.
                fs.truncate(path, scan.valid_length)
            elif self._fsync:
                _sync_in_place(fs, path)
            out.append((seq, list(scan.payloads), scan.valid_length, torn))
        if names and self._fsync:
            fs.fsync_dir(JOURNAL_DIR)  # their names too (fsync may have been off before)
        return out

    def _secure_newest_blocking(self, path: str, data: memoryview) -> None:
        """Make the newest segment's valid bytes ``data`` durable: copied to a new file,
        synced, renamed over it (the directory is synced by the caller).

        Not a sync in place: after a failed sync (interval mode: the journal stopped, the
        world reopened in the same boot) the kernel keeps those pages readable but clean,
        and a sync writes nothing; nor a rewrite in place, since a power loss during it
        could persist those pages out of order, a hole before intact frames that the next
        open must refuse. Only the newest segment can hold such pages: a full one is synced
        before the next starts, or the journal stops on it.

        :raises OSError: also without room for the copy (ENOSPC, EDQUOT; the message says
            how much is needed); nothing is changed then.
        """
        fs = self._fs
        copy = path + SEGMENT_COPY_SUFFIX
        try:
            handle = fs.create(copy)
            try:
                fs.write(handle, data)
                fs.fdatasync(handle)
            except BaseException:
                # The write's or the sync's error is the one to report, not the close's.
                with contextlib.suppress(OSError):
                    fs.close(handle)
                raise
            fs.close(handle)
            fs.replace(copy, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                fs.unlink(copy)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # Not a sync in place instead: if a sync of this segment failed before,
                # that would make its size durable over pages that never reached the disk,
                # an older segment of zeros once the next one starts, which every later
                # open refuses. Nothing was changed; freeing space is all it takes.
                raise OSError(
                    exc.errno,
                    f"no room to copy the newest journal segment ({len(data)} bytes) and make "
                    "its batches durable; free that much space and open again (nothing was "
                    "changed)",
                    path,
                ) from exc
            raise

    # -- append -----------------------------------------------------------------------------

    def next_seq(self) -> int:
        seq = self._next_batch
        self._next_batch += 1
        return seq

    def append(
        self, batch: JournalBatch, ticks: RegionTicks, *, payload: bytes | None = None
    ) -> _Pending:
        """Queue ``batch`` for the next group commit; ``await result.wait()`` until durable.

        Synchronous, so the journal order is exactly the order of ``append`` calls.

        :param payload: ``encode_batch(batch)`` if the caller has it already
            (see :func:`encode_batch_raw`).
        :raises StorageUnavailable: the journal is broken by an earlier unrecoverable error.
        :raises WorldClosed: the journal is closing.
        """
        self._check_usable()
        if payload is None:
            payload = encode_batch(batch)
        pending = _Pending(batch, encode_frame(payload), ticks, self._new_event())
        self._pending.append(pending)
        self._idle = self._new_event() if self._idle.is_set() else self._idle
        self._wake.set()
        return pending

    def withdraw(self, seq: int, error: BaseException) -> bool:
        """Fail batch ``seq`` with ``error`` if it is still queued (not taken by a commit):
        a batch that depends on one that failed must never be written. False if it is not
        queued (already written, failing, or never appended)."""
        for i, p in enumerate(self._pending):
            # Already failed: the rest of the queue fails together when a segment is
            # abandoned, and its hook must not run twice for one batch.
            if p.batch.seq == seq and not p.done.is_set():
                del self._pending[i]
                self._fail([p], error)
                return True
        return False

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise StorageUnavailable(
                f"journal is unusable after an I/O error ({self._broken}); reopen the world",
                key=JOURNAL_DIR,
            )
        if self._closing or self._closed:
            raise WorldClosed("journal is closed")

    async def barrier(self) -> None:
        """Wait until everything appended so far has been committed (or failed)."""
        while self._pending or not self._idle.is_set():
            await self._idle.wait()

    # -- writer -----------------------------------------------------------------------------

    async def run(self) -> None:
        """The writer loop: group-commit until :meth:`close` (run it in a task group)."""
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        break
                    self._idle.set()
                    timeout = None
                    if self._unsynced:
                        timeout = max(0.0, self._last_sync + self._interval - time.monotonic())
                    with anyio.move_on_after(timeout):
                        await self._wake.wait()
                    self._wake = self._new_event()
                    if not self._pending:
                        if self._unsynced and not self._closing:
                            await self._sync_now()
                        continue
                await self._commit_group()
        finally:
            self._fail_all(WorldClosed("journal writer stopped before the batch was written"))
            self._idle.set()

    async def _commit_group(self) -> None:
        group = self._take_group()
        try:
            await self._commit(group)
        finally:
            # Only reached with undone waiters when cancelled mid-commit: nobody may hang.
            self._fail([p for p in group if not p.done.is_set()], WorldClosed("journal stopped"))

    def _take_group(self) -> list[_Pending]:
        """Everything pending; with preallocation, at most MAX_COMMIT_BYTES of it (but at
        least one batch): the rest is the next commit."""
        pending = self._pending
        if self._preallocate and len(pending) > 1:
            size = 0
            for i, p in enumerate(pending):
                size += len(p.frame)
                if size > MAX_COMMIT_BYTES and i:
                    self._pending = pending[i:]
                    return pending[:i]
        self._pending = []
        return pending

    async def _commit(self, group: list[_Pending]) -> None:
        data = b"".join(p.frame for p in group)
        want_sync = self._fsync and (
            self._durability == "sync"
            or self._closing
            or time.monotonic() - self._last_sync >= self._interval
        )
        async with self._io_lock:
            unsynced = self._unsynced
            if self._preallocate and unsynced and unsynced + len(data) > MAX_COMMIT_BYTES:
                # Interval mode: what is unsynced is synced before this commit is written
                # when both together would pass MAX_COMMIT_BYTES, so a power loss never finds
                # more than one commit's bytes in flight (a sync after the write would cover
                # both: twice the distance judge_segment allows).
                await self._sync_locked()
            if self._broken is not None:
                self._fail(group, self._broken_error())
                return
            before = self._active
            try:
                seg = await self._write(data, want_sync)
            except OSError as exc:
                error = StorageUnavailable(
                    f"journal write failed, batch not acknowledged: {exc}", key=JOURNAL_DIR
                )
                self._fail(group, error)
                if self._unsynced and isinstance(exc, _SyncFailed):
                    # Interval mode acknowledged bytes this hop's sync was to persist; a failed
                    # sync dropped them and must not be retried on the same data (as
                    # _sync_locked): stop.
                    self._broken = exc
                    log.error(
                        "journal: a sync failed with %d acknowledged bytes unsynced; they may "
                        "be lost on power failure; journal stopped: %s",
                        self._unsynced,
                        exc,
                    )
                await self._abandon_segment(exc)
                if self._broken is None:
                    # A failed write (ENOSPC, say) leaves the acknowledged bytes before it
                    # intact in the page cache, and the cut back to them synced them: the
                    # active segment is the only one that can hold unsynced bytes (_rotate
                    # syncs before closing one).
                    self._unsynced = 0
                return
            self._commits += 1
            if want_sync:
                self._fsyncs += 1
                self._unsynced = 0
                self._last_sync = time.monotonic()
            elif self._fsync:
                self._unsynced += len(data)
            for p in group:
                seg.absorb(p.ticks)
            if seg is not before and self._preallocate and not self._spare_ready:
                self._spare_wanted.set()  # a segment was opened: the next one wants a spare
            if seg.size >= self._segment_bytes:
                await self._rotate()
        self._batches += len(group)
        if self.on_durable is not None:
            self.on_durable([p.batch for p in group])
        for p in group:
            p.done.set()

    async def _write(self, data: bytes, sync: bool) -> _Segment:
        """``_write_blocking``, by the sync process when it runs and a segment is open."""
        proc, seg, handle = self._proc, self._active, self._handle
        if proc is not None and not proc.alive:
            self._proc_lost.set()  # the keeper replaces it, after a pause
        if proc is None or not proc.alive or seg is None or handle is None:
            written: _Segment = await self._run_sync(self._write_blocking, data, sync)
            return written
        stage, err = await proc.write(handle, seg, data, sync)
        if stage == DONE:
            seg.size += len(data)
            self._proc_commits += 1
            return seg
        self._proc_lost.set()
        if stage == NOT_SENT:  # it had gone before this commit: nothing of it was written
            again: _Segment = await self._run_sync(self._write_blocking, data, sync)
            return again
        path = segment_name(seg.seq)
        if stage == SYNC_FAILED:
            raise _SyncFailed(err, os.strerror(err), path)
        if stage == LOST:
            # Whether any of it reached the file is unknown: a failed write, whose handling
            # cuts the segment back to its last acknowledged byte and starts another. The
            # child must be gone first, or a write of its could land after that cut.
            await proc.aclose()
            if sync and self._unsynced:
                # Interval mode with acknowledged bytes unsynced: the child may have synced
                # and seen an error that no later sync reports (the file is shared): stop,
                # as after a failed sync.
                raise _SyncFailed(err, "the journal's sync process was lost during a sync", path)
            raise OSError(err, "the journal's sync process was lost during the commit", path)
        raise OSError(err, os.strerror(err), path)

    def _write_blocking(self, data: bytes, sync: bool) -> _Segment:
        if self._handle is None:
            self._open_segment_blocking()
        seg, handle = self._active, self._handle
        assert seg is not None and handle is not None
        self._fs.write(handle, data)
        if sync:
            # fdatasync persists the size too when the write grew the file; over
            # preallocated zeros it is a data flush alone (see the module docstring).
            try:
                self._fs.fdatasync(handle)
            except OSError as exc:
                failed = _SyncFailed(*exc.args)
                failed.filename = exc.filename
                raise failed from exc
        seg.size += len(data)
        return seg

    def _open_segment_blocking(self) -> None:
        """Start the next segment (the spare renamed, or a new file) and make its name
        durable: it becomes the active one."""
        fs = self._fs
        fresh = _Segment(self._next_seg)
        # Taken before trying: a failed try may leave a file under this name (an empty
        # or all-zero segment, harmless), and the next try must not collide with it.
        self._next_seg += 1
        name = segment_name(fresh.seq)
        fs.makedirs(JOURNAL_DIR)
        took = self._spare_ready
        new_handle = self._take_spare_blocking(name) if took else None
        if new_handle is not None:
            fresh.preallocated = True
            self._spares_used += 1
        else:
            if took:  # taking it failed: a segment as without preallocation, new name
                fresh = _Segment(self._next_seg)
                self._next_seg += 1
                name = segment_name(fresh.seq)
            new_handle = fs.create(name)
        if self._fsync:
            # The segment's name must be durable before any frame in it is acknowledged.
            try:
                fs.fsync_dir(JOURNAL_DIR)
            except OSError:
                fs.close(new_handle)  # nothing was written to it; the next try makes another
                if fresh.preallocated:
                    self._give_back_spare_blocking(name)
                else:
                    # Untracked, it would never be collected (best effort: an empty
                    # older segment is harmless on replay).
                    with contextlib.suppress(OSError):
                        fs.unlink(name)
                raise
        self._handle = new_handle
        self._active = fresh
        self._segments.append(fresh)

    def _take_spare_blocking(self, name: str) -> int | None:
        """The spare renamed to segment ``name`` and opened in place; None if that failed
        (renamed back when it can be: an older segment of zeros alone reads as damage)."""
        self._spare_ready = False  # used up, whatever happens next
        try:
            self._fs.replace(SPARE_NAME, name)
        except OSError as exc:
            log.warning("journal: cannot use the spare (%s); creating a segment unfilled", exc)
            return None
        try:
            return self._fs.open_write(name)
        except OSError as exc:
            self._give_back_spare_blocking(name)
            log.warning("journal: cannot open the spare (%s); creating a segment unfilled", exc)
            return None

    def _give_back_spare_blocking(self, name: str) -> None:
        """Segment ``name``, a spare that could not start, back under the spare's name (not
        ready, the keeper redoes it), or else gone: an older segment of zeros alone reads
        as damage once a later segment's name is durable."""
        try:
            self._fs.replace(name, SPARE_NAME)
            return
        except OSError as exc:
            back = exc
        try:
            self._fs.unlink(name)
        except OSError as exc:
            log.error(
                "journal %s: an unused segment of zeros could be neither renamed back (%s) "
                "nor removed (%s); the next open will refuse it as damage: it holds no "
                "deltas, delete it with the world closed",
                name,
                back,
                exc,
            )

    async def _rotate(self) -> None:
        """Close the active segment, cut to its used size if it was preallocated: only the
        newest segment may end in zeros (see _scan_blocking)."""
        seg, handle = self._active, self._handle
        self._handle, self._active = None, None
        if handle is None:
            return
        sync = self._fsync and self._unsynced > 0
        cut = seg is not None and seg.preallocated and seg.size < self._spare_bytes

        def close_blocking() -> None:
            if sync:
                self._fs.fdatasync(handle)
            self._fs.close(handle)
            if cut:
                assert seg is not None
                self._fs.truncate(segment_name(seg.seq), seg.size)  # fsyncs

        try:
            await self._run_sync(close_blocking)
        except OSError as exc:
            self._broken = exc
            log.error("journal: closing a full segment failed: %s", exc)
            return
        if sync:
            self._fsyncs += 1
            self._unsynced = 0
            self._last_sync = time.monotonic()
        if not self._closing:
            self._segment_wanted.set()

    async def _sync_now(self) -> None:
        async with self._io_lock:
            await self._sync_locked()

    async def _sync_locked(self) -> None:
        """Sync what interval mode acknowledged unsynced (the I/O lock held)."""
        handle = self._handle
        if handle is None or self._broken is not None:
            self._unsynced = 0
            return
        try:
            await self._run_sync(self._fs.fdatasync, handle)
        except OSError as exc:
            # Interval mode already acknowledged these bytes; an fsync failure means they may
            # be lost on power failure, and fsync must not be retried on the same data.
            self._broken = exc
            log.error("journal: periodic fsync failed, journal stopped: %s", exc)
            return
        self._fsyncs += 1
        self._unsynced = 0
        self._last_sync = time.monotonic()

    async def _abandon_segment(self, cause: OSError) -> None:
        """Cut the failed segment back to its acknowledged length and stop writing to it."""
        seg, handle = self._active, self._handle
        self._active, self._handle = None, None
        if seg is None:
            return
        acknowledged = seg.size
        path = segment_name(seg.seq)

        def cut_blocking() -> None:
            if handle is not None:
                with contextlib.suppress(OSError):
                    # The handle is being discarded; its close error tells nothing new.
                    self._fs.close(handle)
            self._fs.truncate(path, acknowledged)

        try:
            await self._run_sync(cut_blocking)
        except OSError as exc:
            self._broken = exc
            log.error(
                "journal %s: write failed (%s) and truncating it failed (%s); journal stopped",
                path,
                cause,
                exc,
            )
            self._fail(self._pending, self._broken_error())
            self._pending = []
            return
        if not self._closing:
            self._segment_wanted.set()

    def _broken_error(self) -> StorageUnavailable:
        return StorageUnavailable(
            f"journal is unusable after an I/O error ({self._broken}); reopen the world",
            key=JOURNAL_DIR,
        )

    def _fail(self, group: Sequence[_Pending], error: BaseException) -> None:
        for p in group:
            p.error = error
            p.done.set()
        if group and self.on_failed is not None:
            self.on_failed([p.batch for p in group])

    def _fail_all(self, error: BaseException) -> None:
        group, self._pending = self._pending, []
        self._fail(group, error)

    # -- segment deletion -------------------------------------------------------------------

    async def collect(self, lpt_of: Callable[[RegionKey], int], *, everything: bool = False) -> int:
        """Delete every segment whose regions have all folded past it; return how many.

        The active segment counts too once it holds :attr:`COLLECT_ACTIVE_BYTES`, or
        whatever it holds with ``everything`` (the close's): if it is fully passed it is
        closed first, so a world closed after a full flush keeps no journal at all. A
        smaller one stays: closing it would cost a record of what leaves, an unlink, two
        directory syncs and the next segment's creation, every flush, to free a few KiB
        (the region-flush benchmark lost ~10 points of its ratio to it, each round of 64
        regions deleting its one small segment); replay skips its folded frames.

        Before unlinking, the segments' highest tick per region is recorded durably in
        ``state/journal_drops.json`` (``journal_drops.DropLog``), so recovery can tell when
        a region restored from an older snapshot copy lost deltas with them.

        :raises StorageUnavailable: unlinking failed, or what is deleted could be neither
            recorded nor the stale record removed (the segments stay, which is safe).
        """
        async with self._collect_lock:
            async with self._io_lock:
                if self._broken is not None:
                    return 0

                def passed(seg: _Segment) -> bool:
                    return all(lpt_of(r) >= t for r, t in seg.ticks.items())

                active = self._active
                if (
                    active is not None
                    and passed(active)
                    and not self._pending
                    and active.size
                    and (everything or active.size >= self.COLLECT_ACTIVE_BYTES)
                ):
                    # Cut to its used size: a crash before the unlink below leaves it behind
                    # a newer segment, where a zero tail reads as damage.
                    await self._rotate()
                dead = [s for s in self._segments if s is not self._active and passed(s)]
                live = [s.seq for s in self._segments]
            if not dead:
                return 0
            # Recorded durably before any unlink: a region restored from an older snapshot
            # copy must learn that these ticks are gone (runtime/journal_drops.py).
            await self._drops.before_delete([(s.seq, s.ticks) for s in dead], live)
            # Closed segments nobody writes to: the writer goes on appending meanwhile.
            names = [segment_name(s.seq) for s in dead]
            recycle = (
                self._preallocate
                and not self._closing  # a closed journal leaves no spare behind
                and not self._spare_ready
                and self._take_spare_lock()
            )

            def unlink_blocking() -> bool:
                recycled = False
                for name in names:
                    with contextlib.suppress(FileNotFoundError):
                        if recycle and not recycled:
                            # Its blocks become the next spare's: nothing to free, nothing
                            # to allocate. The keeper zero-fills it before it is used.
                            self._fs.replace(name, SPARE_NAME)
                            recycled = True
                        else:
                            self._fs.unlink(name)
                if self._fsync:
                    self._fs.fsync_dir(JOURNAL_DIR)
                return recycled

            try:
                if await self._collect_run_sync(unlink_blocking):
                    self._spares_recycled += 1
            except OSError as exc:
                raise StorageUnavailable(
                    f"cannot delete passed journal segments: {exc}", key=JOURNAL_DIR
                ) from exc
            finally:
                if recycle:
                    self._spare_lock.release()
                    self._spare_wanted.set()
            gone = {id(s) for s in dead}
            # Shielded: the files are gone, the list must say so even if we are cancelled.
            with anyio.CancelScope(shield=True):
                async with self._io_lock:  # the writer's thread appends to the list
                    self._segments = [s for s in self._segments if id(s) not in gone]
            self._deleted += len(dead)
            return len(dead)

    def _take_spare_lock(self) -> bool:
        try:
            self._spare_lock.acquire_nowait()
        except anyio.WouldBlock:
            return False  # the keeper is writing a spare already
        return True

    # -- preallocation ----------------------------------------------------------------------

    async def keep_spare(self) -> None:
        """Keep a zero-filled spare segment ready; run it in the task group beside
        :meth:`run`. Returns at once without preallocation, and at close.

        A spare that cannot be made costs speed only: the writer creates segments as it
        does without one, and the next segment it opens asks for a spare again.
        """
        if not self._preallocate:
            return
        while not self._closing and self._broken is None:
            await self._spare_wanted.wait()
            self._spare_wanted = anyio.Event()
            if self._spare_ready or self._closing:
                continue
            async with self._spare_lock:
                try:
                    made = await self._make_spare()
                except OSError as exc:
                    log.warning(
                        "journal: cannot prepare %s (%s); new segments are created unfilled",
                        SPARE_NAME,
                        exc,
                    )
                    continue
                self._spare_ready = made and not self._closing

    async def keep_segment_open(self) -> None:
        """Open the next segment as soon as the active one is closed (rotated when full or
        passed, or abandoned after a failed write); run it in the task group beside
        :meth:`run`. Returns at close.

        Why: the commit that finds no segment open creates one and syncs the directory for
        its name, several system calls in the journal's thread, each waiting for the GIL on
        a busy loop: 10-20 ms in which every acknowledgement waited, after each full flush
        (which closes a passed segment) and at each rotation. Opened here, the next commit
        finds it open and goes straight to the sync process. An empty newest segment is
        harmless on replay, and an empty active one is never rotated by ``collect``. A
        segment that cannot be opened here is left to the next commit, which reports the
        error itself.
        """
        while not self._closing and self._broken is None:
            await self._segment_wanted.wait()
            self._segment_wanted = anyio.Event()
            async with self._io_lock:
                if self._handle is not None or self._closing or self._broken is not None:
                    continue
                try:
                    await self._run_sync(self._open_segment_blocking)
                except OSError as exc:
                    log.warning(
                        "journal: cannot open the next segment ahead (%s); the next commit "
                        "will try",
                        exc,
                    )
                    continue
                self._segments_ahead += 1
                if self._preallocate and not self._spare_ready:
                    self._spare_wanted.set()  # the segment took the spare: make the next

    def _stopping(self) -> bool:
        # A method, not an expression at each use: awaits in between change these.
        return self._closing or self._broken is not None

    async def keep_sync_process(self) -> None:
        """Replace a lost sync process; run it in the task group beside :meth:`run`.
        Returns at close, or at once if the journal does not use one.

        The first replacement waits ``sync_restart_s`` (5 s), each later one twice as long
        as the one before, up to 5 minutes: a child that keeps dying costs a start now and
        then, not one per commit. Started under the I/O lock, so no commit is in flight
        with the old one.
        """
        if not self._want_process:
            return
        pause = self._restart_s
        while not self._stopping():
            await self._proc_lost.wait()
            self._proc_lost = anyio.Event()
            await anyio.sleep(pause)  # the world's close cancels it
            pause = min(pause * 2, _RESTART_MAX_S)
            async with self._io_lock:
                if self._stopping():
                    return
                old = self._proc
                if old is not None and old.alive:
                    continue
                if old is not None:
                    await old.aclose()
                self._proc = await SyncProcess.start()
                if self._proc is not None:
                    self._proc_restarts += 1
                    log.info("journal: sync process replaced (pid %d)", self._proc.pid)

    async def _make_spare(self) -> bool:
        """Zero-fill ``SPARE_NAME`` to its full size (segment_bytes + MAX_COMMIT_BYTES + a
        page) in place (a recycled segment, or a spare left by a crash) or as a new file,
        synced; False if a close stopped it."""
        run = self._collect_run_sync
        handle = await run(self._open_spare_blocking)
        try:
            done, size = 0, self._spare_bytes
            while done < size:
                if self._closing:
                    return False
                n = min(_ZERO_CHUNK, size - done)
                await run(self._zero_blocking, handle, n)
                done += n
                if done < size:
                    await anyio.sleep(self._spare_pause)
        finally:
            # Every chunk is synced already: a failed close loses nothing.
            with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                await run(self._fs.close, handle)
        return True

    def _open_spare_blocking(self) -> int:
        fs = self._fs
        fs.makedirs(JOURNAL_DIR)
        if self._fsync:
            # A passed segment renamed onto the spare by collect() must be gone from its old
            # name for good before its frames are overwritten: else a power loss could leave
            # that name holding zeros before old frames (damage, to the scan).
            fs.fsync_dir(JOURNAL_DIR)
        try:
            handle = fs.open_write(SPARE_NAME)
        except FileNotFoundError:
            return fs.create(SPARE_NAME)
        try:
            if fs.size(SPARE_NAME) > self._spare_bytes:  # a big last frame overshot
                fs.truncate(SPARE_NAME, self._spare_bytes)
        except BaseException:
            fs.close(handle)
            raise
        return handle

    def _zero_blocking(self, handle: int, n: int) -> None:
        self._fs.write(handle, _ZEROS if n == _ZERO_CHUNK else bytes(n))
        self._fs.fdatasync(handle)

    def _drop_spare_blocking(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._fs.unlink(SPARE_NAME)
            if self._fsync:
                self._fs.fsync_dir(JOURNAL_DIR)

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Hold off appends (acknowledgements wait) and segment collection, for a
        consistent copy of the journal (a snapshot)."""
        async with self._collect_lock, self._io_lock:
            yield

    # -- close ------------------------------------------------------------------------------

    def begin_close(self) -> None:
        """Refuse new appends; the writer drains what is queued, fsyncs and stops."""
        self._closing = True
        self._wake.set()
        self._spare_wanted.set()
        self._segment_wanted.set()

    async def aclose(self) -> None:
        """Close the active segment (after the writer stopped). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._spare_wanted.set()  # the keepers stop (aclose may come without begin_close)
        self._segment_wanted.set()
        async with self._io_lock:
            if self._broken is None:
                await self._drop_if_empty()
                await self._rotate()
            elif self._handle is not None:
                handle, self._handle = self._handle, None
                with contextlib.suppress(OSError):
                    await self._run_sync(self._fs.close, handle)
        await self.stop_sync_process()
        if self._preallocate:
            # A closed world's journal is as without preallocation: no spare, no padding.
            async with self._spare_lock:
                self._spare_ready = False
                try:
                    await self._collect_run_sync(self._drop_spare_blocking)
                except OSError as exc:
                    log.warning("journal: cannot delete %s at close: %s", SPARE_NAME, exc)

    async def _drop_if_empty(self) -> None:
        """At close: delete the active segment if nothing was written to it (one opened
        ahead), so a closed world's journal holds only segments with frames. Best effort: an
        empty segment left behind is harmless on replay."""
        seg, handle = self._active, self._handle
        if seg is None or handle is None or seg.size:
            return
        self._active, self._handle = None, None
        self._segments = [s for s in self._segments if s is not seg]

        def drop_blocking() -> None:
            with contextlib.suppress(OSError):
                self._fs.close(handle)
            self._fs.unlink(segment_name(seg.seq))
            if self._fsync:
                self._fs.fsync_dir(JOURNAL_DIR)

        try:
            await self._run_sync(drop_blocking)
        except OSError as exc:
            log.warning(
                "journal: cannot delete the empty %s at close: %s", segment_name(seg.seq), exc
            )

    async def stop_sync_process(self) -> None:
        """Stop the sync process and wait for it to exit (idempotent): before the world's
        lock is let go, so no write of it can land after the next open."""
        if self._proc is not None:
            await self._proc.aclose()

    def stats(self) -> JournalStats:
        return JournalStats(
            pending=len(self._pending),
            commits=self._commits,
            fsyncs=self._fsyncs,
            batches=self._batches,
            # An empty segment opened ahead (keep_segment_open) holds nothing yet.
            segments=sum(1 for s in self._segments if s.size or s is not self._active),
            live_bytes=sum(s.size for s in self._segments),
            segments_deleted=self._deleted,
            torn_bytes=self._torn,
            unsynced_bytes=self._unsynced,
            segments_preallocated=self._spares_used,
            spares_recycled=self._spares_recycled,
            spare_ready=self._spare_ready,
            commits_in_process=self._proc_commits,
            segments_opened_ahead=self._segments_ahead,
            sync_process=self._proc is not None and self._proc.alive,
            sync_process_pid=self._proc.pid if self._proc is not None and self._proc.alive else 0,
            sync_process_restarts=self._proc_restarts,
        )

    @property
    def broken(self) -> bool:
        return self._broken is not None

    def segment_seqs(self) -> list[int]:
        return [s.seq for s in self._segments]
