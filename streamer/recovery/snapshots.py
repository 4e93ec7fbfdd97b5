"""Snapshots: full, verified, rotated copies of a world, and restoring one.

Layout, below the world root::

    snapshots/{id}/files/<world key>     a copy of every world file
    snapshots/{id}/snapshot.json         written last: its presence means "complete"

``id`` is ``%Y%m%dT%H%M%S%fZ`` plus a short random suffix, so ids sort by creation time.

What a snapshot holds: ``world.json``, every ``regions/r.{rx}.{ry}.region``, ``players.idx``,
``state/*`` (except the restore marker) and every ``journal/*.wal``, so a closed world whose
journal still holds records not folded into regions is captured completely. The incident log
and ``quarantine/`` are deliberately left out: restoring must never roll back the record of
what happened, nor the evidence set aside for the operator.

Every file is copied byte for byte (but for the zero padding at the end of the newest
journal segment: a running world's preallocated one), never hard-linked to the world's file.
A link would share one inode, so damage to the world's file on the medium (bit rot, a tool
writing into it) would damage every snapshot of it at once, and the region it holds would
have no copy left to restore from. A region file whose bytes an earlier snapshot already
holds as a copy of its own (``SnapshotFile.own``) is hard-linked to *that* copy instead:
snapshots share copies among themselves, never with the world, so a world file and its
snapshot copy are always two files, and unchanged regions cost no copy time or space.

Creation, in order -- each step only after the previous one is durable:

1. trim leftovers: incomplete snapshot directories (a crash during creation) and complete
   snapshots beyond ``keep`` (a crash between step 4 and step 5);
2. read and verify every source file (manifest and region checksums); a corrupt source
   fails the snapshot before anything is written;
3. copy every file, then re-read every copy and compare its xxh3 with what step 2 verified
   (catches a world that changed underneath, or storage that does not hold what it wrote);
4. write ``snapshot.json`` (checksummed) atomically;
5. rotate: delete the oldest complete snapshots beyond ``keep``. Deletion removes
   ``snapshot.json`` first, so a crash mid-deletion leaves an incomplete directory (skipped
   and removed later), never a "complete" snapshot with missing files.

So a crash at any point leaves at most ``keep + 1`` complete snapshots and never fewer valid
ones than before; every complete snapshot holds exactly what it was verified to hold.

Restoring replaces the world's files by the snapshot's under a redo marker
(``state/restore.json``): once the marker is durable the restore is committed, and
``finish_interrupted_restore`` (called at open) redoes it idempotently after a crash. See
``restore_snapshot`` for the pre-restore snapshot taken first.

The world must be quiescent throughout (closed, or flushed with writes paused) and only one
process may snapshot or restore at a time: the caller holds the ``WorldLock``.
"""

from __future__ import annotations

import errno
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import anyio.to_thread
import msgspec

from streamer.errors import (
    MalformedFile,
    NotFound,
    SnapshotError,
    StorageUnavailable,
    StreamerError,
    UnknownSnapshot,
)
from streamer.format.checksum import hex64, xxh3
from streamer.format.journal import scan_frames, segment_keys
from streamer.format.manifest import MANIFEST_KEY, WorldManifest, decode_manifest
from streamer.format.region import decode_region, parse_region_key, region_key
from streamer.format.sealed import seal, unseal
from streamer.recovery.check import CheckReport, ExtraCheck, Problem, problem_from
from streamer.recovery.incidents import IncidentLog
from streamer.recovery.lineage import LINEAGE_KEY, LineageDamaged, read_lineage, write_lineage
from streamer.storage.base import Blob, BlobStore
from streamer.storage.local import LocalStore

__all__ = [
    "PLAYERS_KEY",
    "RESTORE_MARKER_KEY",
    "SNAPSHOTS_PREFIX",
    "RestoreMarker",
    "RestoreResult",
    "SnapshotFile",
    "SnapshotInfo",
    "SnapshotScan",
    "create_snapshot",
    "current_lineage",
    "find_valid_copy",
    "finish_interrupted_restore",
    "is_valid_snapshot",
    "list_snapshots",
    "restore_snapshot",
    "scan_snapshots",
    "snapshot_check",
    "snapshot_file_key",
    "stage_copies",
    "verify_snapshot",
    "world_keys",
]

log = logging.getLogger(__name__)

SNAPSHOTS_PREFIX: Final = "snapshots/"
SNAPSHOT_MANIFEST: Final = "snapshot.json"
RESTORE_MARKER_KEY: Final = "state/restore.json"
PLAYERS_KEY: Final = "players.idx"
SNAPSHOT_SCHEMA_VERSION: Final = 1
_ID_TIME_FORMAT: Final = "%Y%m%dT%H%M%S%fZ"
# Keys per get_many: one worker-thread hop per batch, bounded memory for large regions.
_BATCH: Final = 32
# Links, renames and unlinks per hop: metadata only, so far more than reads per hop.
_LINK_BATCH: Final = 512


class SnapshotFile(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    size: int
    xxh3: str
    #: False only in a raw pre-restore snapshot: the source failed verification (``fault``)
    #: and was copied as-is for the operator. Never restored, never served as a good copy.
    verified: bool = True
    fault: str | None = None
    #: The copy is a file of its own (written by the snapshot, or linked to another
    #: snapshot's own copy), never a hard link to the world's file. Snapshots made before
    #: this field linked region files to the world's; their copies are not reused.
    own: bool = False


class SnapshotInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The content of ``snapshot.json``."""

    type: Literal["snapshot"] = "snapshot"
    schemaVersion: int = SNAPSHOT_SCHEMA_VERSION
    id: str
    created_at: str
    reason: str
    world_id: str | None = None
    #: schemaVersion per record type, from the snapshotted ``world.json``.
    record_versions: dict[str, int] = msgspec.field(default_factory=dict)
    #: region key → lastProcessedTick from that region's verified header.
    last_processed_tick: dict[str, int] = msgspec.field(default_factory=dict)
    files: list[SnapshotFile] = msgspec.field(default_factory=list)
    #: Some files failed verification at the source (see ``SnapshotFile.verified``).
    raw: bool = False
    #: The snapshots the world's state descended from when this one was taken, newest
    #: first (``recovery/lineage.py``); ``None``: taken before lineage was recorded.
    ancestors: list[str] | None = None
    checksum: str = ""

    @property
    def file_count(self) -> int:
        return len(self.files)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def damaged_files(self) -> list[str]:
        return [f.key for f in self.files if not f.verified]


class SnapshotScan(msgspec.Struct, frozen=True, kw_only=True):
    """Every snapshot directory: complete ones (newest first), and what else was found."""

    snapshots: list[SnapshotInfo]
    #: Directories without ``snapshot.json``: a crash during creation or deletion.
    incomplete: list[str]
    #: Ids whose ``snapshot.json`` exists but does not verify, with the reason.
    damaged: dict[str, str]

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.snapshots]


class RestoreMarker(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["restore"] = "restore"
    schemaVersion: int = 1
    snapshot: str
    pre_restore: str | None
    started_at: str
    checksum: str = ""


class RestoreResult(msgspec.Struct, frozen=True, kw_only=True):
    snapshot: str
    #: The snapshot of the world as it was just before (``None`` only when resuming a restore
    #: whose marker predates this field).
    pre_restore: str | None
    #: The pre-restore snapshot holds files that failed verification (copied raw).
    pre_restore_raw: bool = False
    incident: str | None = None


# --- keys ------------------------------------------------------------------------------------


def snapshot_prefix(snapshot_id: str) -> str:
    return f"{SNAPSHOTS_PREFIX}{snapshot_id}/"


def snapshot_file_key(snapshot_id: str, key: str) -> str:
    """Where snapshot ``snapshot_id`` keeps its copy of world key ``key``."""
    return f"{SNAPSHOTS_PREFIX}{snapshot_id}/files/{key}"


def _manifest_key(snapshot_id: str) -> str:
    return f"{SNAPSHOTS_PREFIX}{snapshot_id}/{SNAPSHOT_MANIFEST}"


def _region_coords(key: str) -> tuple[int, int] | None:
    coords = parse_region_key(key)
    # Only files directly in regions/, in canonical spelling, are regions of the world.
    if coords is None or region_key(*coords) != key:
        return None
    return coords


async def world_keys(store: BlobStore) -> list[str]:
    """Every key that makes up the world's state (what a snapshot holds), sorted."""
    keys: list[str] = []
    for exact in (MANIFEST_KEY, PLAYERS_KEY):
        keys.extend(k for k in await store.list(exact) if k == exact)
    keys.extend(k for k in await store.list("regions/") if _region_coords(k) is not None)
    keys.extend(k for k in await store.list("state/") if k != RESTORE_MARKER_KEY)
    keys.extend(segment_keys(await store.list("journal/")))
    return sorted(keys)


# --- snapshot.json ---------------------------------------------------------------------------


def _decode_info(data: bytes, path: str) -> SnapshotInfo:
    raw = unseal(data, path, "snapshot")
    try:
        return msgspec.convert(raw, SnapshotInfo)
    except msgspec.ValidationError as exc:
        raise MalformedFile(f"snapshot record field invalid: {exc}", path=path) from None


def _decode_marker(data: bytes, path: str) -> RestoreMarker:
    raw = unseal(data, path, "restore")
    try:
        return msgspec.convert(raw, RestoreMarker)
    except msgspec.ValidationError as exc:
        raise MalformedFile(f"restore marker field invalid: {exc}", path=path) from None


# --- listing ---------------------------------------------------------------------------------


async def _get_batched(store: BlobStore, keys: Sequence[str]) -> list[Blob | None]:
    """For small sets (snapshot.json files, journal and state): all in memory at once."""
    out: list[Blob | None] = []
    for i in range(0, len(keys), _BATCH):
        out.extend(await store.get_many(keys[i : i + _BATCH]))
    return out


async def _iter_batched(
    store: BlobStore, keys: Sequence[str]
) -> AsyncIterator[tuple[int, Blob | None]]:
    """``(index, blob)`` for every key, one hop per batch, holding one batch at a time."""
    for i in range(0, len(keys), _BATCH):
        for j, blob in enumerate(await store.get_many(keys[i : i + _BATCH]), start=i):
            yield j, blob


async def scan_snapshots(store: BlobStore) -> SnapshotScan:
    """Every snapshot directory, classified. Reads only the ``snapshot.json`` files."""
    groups: dict[str, bool] = {}
    for key in await store.list(SNAPSHOTS_PREFIX):
        sid, slash, rest = key[len(SNAPSHOTS_PREFIX) :].partition("/")
        if not slash or sid.startswith("."):
            continue  # the snapshot set's own files (lineage, staged copies): not snapshots
        groups[sid] = groups.get(sid, False) or rest == SNAPSHOT_MANIFEST
    complete = sorted((sid for sid, has in groups.items() if has), reverse=True)
    incomplete = sorted(sid for sid, has in groups.items() if not has)
    infos: list[SnapshotInfo] = []
    damaged: dict[str, str] = {}
    blobs = await _get_batched(store, [_manifest_key(s) for s in complete])
    for sid, blob in zip(complete, blobs, strict=True):
        path = _manifest_key(sid)
        if blob is None:  # deleted between list and get: being rotated away
            incomplete.append(sid)
            continue
        try:
            info = _decode_info(blob.data, path)
        except (StreamerError, ValueError) as exc:
            damaged[sid] = str(exc)
            continue
        if info.id != sid:
            damaged[sid] = f"{path}: describes snapshot {info.id!r} (misplaced file)"
            continue
        infos.append(info)
    return SnapshotScan(snapshots=infos, incomplete=sorted(incomplete), damaged=damaged)


async def list_snapshots(store: BlobStore) -> list[SnapshotInfo]:
    """Complete snapshots with a readable ``snapshot.json``, newest first.

    Incomplete and damaged ones are left out; ``scan_snapshots`` reports them.
    """
    return (await scan_snapshots(store)).snapshots


async def _load_info(store: BlobStore, snapshot_id: str) -> SnapshotInfo:
    try:
        blob = await store.get(_manifest_key(snapshot_id))
    except NotFound:
        raise UnknownSnapshot(snapshot_id, (await scan_snapshots(store)).ids) from None
    try:
        info = _decode_info(blob.data, _manifest_key(snapshot_id))
    except (StreamerError, ValueError) as exc:
        raise SnapshotError(f"snapshot {snapshot_id}: snapshot.json is damaged: {exc}") from exc
    if info.id != snapshot_id:
        raise SnapshotError(f"snapshot {snapshot_id}: snapshot.json describes {info.id!r}")
    return info


# --- verification ----------------------------------------------------------------------------


def _verify_content(key: str, data: bytes, path: str) -> int | None:
    """Check a file's own structure; the region's lastProcessedTick for a region.

    :raises IntegrityError, UnsupportedFormat: the content does not verify.
    """
    if key == MANIFEST_KEY:
        decode_manifest(data, path=path)
        return None
    coords = _region_coords(key)
    if coords is not None:
        return decode_region(data, rx=coords[0], ry=coords[1], path=path).header.last_processed_tick
    return None


def _check_copy(entry: SnapshotFile, data: bytes, path: str) -> Problem | None:
    if len(data) != entry.size:
        return Problem(
            file=path,
            fault=f"size differs from snapshot.json ({len(data)} != {entry.size} bytes)",
            kind="truncated",
            expected=str(entry.size),
            actual=str(len(data)),
        )
    actual = hex64(xxh3(data))
    if actual != entry.xxh3:
        return Problem(
            file=path,
            fault="content differs from the checksum in snapshot.json",
            kind="checksum",
            expected=entry.xxh3,
            actual=actual,
        )
    if entry.verified:
        try:
            _verify_content(entry.key, data, path)
        except StreamerError as exc:
            return problem_from(path, exc)
    return None


async def verify_snapshot(store: BlobStore, snapshot_id: str) -> list[Problem]:
    """Re-read every file of a snapshot; every fault found (empty: the snapshot is intact).

    Files copied raw into a pre-restore snapshot are checked against their recorded xxh3
    only (their content was known bad when copied); ``is_valid_snapshot`` excludes them.

    :raises UnknownSnapshot: no snapshot directory has this id.
    """
    mkey = _manifest_key(snapshot_id)
    try:
        blob = await store.get(mkey)
    except NotFound:
        if await store.list(snapshot_prefix(snapshot_id)):
            return [
                Problem(
                    file=snapshot_prefix(snapshot_id),
                    fault="incomplete snapshot (no snapshot.json): a crash during creation",
                    kind="incomplete",
                )
            ]
        raise UnknownSnapshot(snapshot_id, (await scan_snapshots(store)).ids) from None
    try:
        info = _decode_info(blob.data, mkey)
    except StreamerError as exc:
        return [problem_from(mkey, exc)]
    if info.id != snapshot_id:
        return [Problem(file=mkey, fault=f"describes snapshot {info.id!r}", kind="malformed")]
    problems: list[Problem] = []
    paths = [snapshot_file_key(snapshot_id, f.key) for f in info.files]
    for i in range(0, len(paths), _BATCH):
        batch = paths[i : i + _BATCH]
        for entry, path, got in zip(
            info.files[i : i + _BATCH], batch, await store.get_many(batch), strict=True
        ):
            if got is None:
                problems.append(Problem(file=path, fault="file missing", kind="missing"))
                continue
            problem = _check_copy(entry, got.data, path)
            if problem is not None:
                problems.append(problem)
    return problems


async def is_valid_snapshot(store: BlobStore, info: SnapshotInfo) -> bool:
    """Restorable: every file verifies and none was copied raw."""
    return not info.raw and not await verify_snapshot(store, info.id)


async def find_valid_copy(
    store: BlobStore, key: str, *, tick_at_most: int | None = None
) -> tuple[str, bytes] | None:
    """The newest snapshot copy of world key ``key`` that verifies: ``(snapshot id, bytes)``.

    Only snapshots the world's current state descends from count (``recovery/lineage.py``).
    ``tick_at_most``: the damaged region file's lastProcessedTick, when its header still
    verifies. A region's tick only grows along the world's history, so a copy above it is
    not an ancestor of that file, whatever the lineage says (a guard that holds even when
    the lineage had to be rebuilt).

    A copy must match ``snapshot.json``'s size and xxh3, and a region (or the manifest) must
    also decode and verify on its own. Snapshots whose copy fails are skipped, so an older
    intact copy is found behind a damaged newer one. ``None``: no snapshot has a good copy.
    """
    lineage = await current_lineage(store)
    for info in await list_snapshots(store):
        if lineage is not None and info.id not in lineage:
            continue  # an abandoned state: rolled back past, or regenerated over
        entry = next((f for f in info.files if f.key == key), None)
        if entry is None or not entry.verified:
            continue
        tick = info.last_processed_tick.get(key)
        if tick_at_most is not None and tick is not None and tick > tick_at_most:
            continue
        path = snapshot_file_key(info.id, key)
        try:
            blob = await store.get(path)
        except StreamerError:
            continue  # missing or unreadable: try an older snapshot
        if _check_copy(entry, blob.data, path) is None:
            return info.id, blob.data
    return None


async def current_lineage(store: BlobStore) -> list[str] | None:
    """The snapshots the world descends from, newest first (``recovery/lineage.py``);
    ``None``: a world from before lineage was recorded, where every snapshot counts.

    A damaged record is rebuilt from the snapshots and the incident log, and logged: the
    newest of the last snapshot, the last world restore and the last regenerate decides.
    Without a readable incident log, no snapshot counts (a region is then isolated, never
    restored from a state the operator may have rolled back).
    """
    try:
        return await read_lineage(store)
    except LineageDamaged as exc:
        rebuilt = await _rebuild_lineage(store)
        log.error(
            "%s; using the lineage rebuilt from the snapshots and the incident log (%d "
            "snapshot(s)); the next snapshot rewrites it",
            exc,
            len(rebuilt),
        )
        return rebuilt


async def _rebuild_lineage(store: BlobStore) -> list[str]:
    infos = await list_snapshots(store)  # newest first
    try:
        incidents = (await IncidentLog(store).read()).incidents
    except StreamerError:
        return []
    # The last world-level change, in log order: (the snapshot it took first, the snapshot
    # it restored or None for a regenerate). Ordered by snapshot ids, not clock times: ids
    # never go backwards (``_new_id``), a clock stepped back does.
    last: tuple[str | None, str | None] | None = None
    for inc in incidents:
        if inc.kind == "world_regenerated":
            last = (_str_or_none(inc.details.get("snapshot")), None)
        elif inc.kind == "restored_from_snapshot" and "pre_restore_snapshot" in inc.details:
            last = (
                _str_or_none(inc.details.get("pre_restore_snapshot")),
                _str_or_none(inc.details.get("snapshot")),
            )
        # A region's restore by the ladder leaves the lineage as it was.
    newest = infos[0] if infos else None
    if newest is not None and (last is None or (last[0] is not None and newest.id > last[0])):
        return [newest.id, *(await _ancestors_of(store, newest))]
    if last is None or last[1] is None:
        return []
    restored = next((i for i in infos if i.id == last[1]), None)
    return [] if restored is None else [restored.id, *(await _ancestors_of(store, restored))]


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


# --- creation --------------------------------------------------------------------------------


def _new_id(existing: Iterable[str]) -> str:
    now = datetime.now(UTC).replace(tzinfo=None)
    # A clock stepped backwards must not make the new snapshot sort as the oldest: rotation
    # would delete it first.
    for sid in existing:
        try:
            t = datetime.strptime(sid.partition("-")[0], _ID_TIME_FORMAT)
        except ValueError:
            continue
        if t >= now:
            now = t + timedelta(microseconds=1)
    return now.strftime(_ID_TIME_FORMAT) + "-" + secrets.token_hex(3)


def _iso(snapshot_id: str) -> str:
    t = datetime.strptime(snapshot_id.partition("-")[0], _ID_TIME_FORMAT)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def create_snapshot(store: BlobStore, *, keep: int, reason: str = "manual") -> SnapshotInfo:
    """Snapshot the whole world, verify the snapshot, then rotate to the newest ``keep``.

    Precondition: the world is quiescent (closed, or flushed with writes paused) and the
    caller holds the ``WorldLock``.

    :raises SnapshotError: a source file failed verification (named in the message; nothing
        is left behind), the world changed during the snapshot, a restore is pending, or the
        copy did not verify.
    :raises StorageError: the store failed; any partial snapshot is incomplete and removed at
        the next snapshot.
    """
    return await _create(store, keep=keep, reason=reason, protect=frozenset(), allow_raw=False)


class _Source(msgspec.Struct, kw_only=True):
    entry: SnapshotFile
    tick: int | None = None


async def _create(
    store: BlobStore,
    *,
    keep: int,
    reason: str,
    protect: frozenset[str],
    allow_raw: bool,
) -> SnapshotInfo:
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if await _marker_exists(store):
        raise SnapshotError(
            f"an interrupted restore is pending ({RESTORE_MARKER_KEY}); open the world (or "
            "run `streamer restore` again) to finish it before taking a snapshot"
        )
    keys = await world_keys(store)
    if not allow_raw and MANIFEST_KEY not in keys:
        raise SnapshotError(f"no {MANIFEST_KEY}: not a world, nothing to snapshot")
    sources: list[_Source] = []
    newest = _newest_segment(keys)
    record_versions: dict[str, int] = {}
    world_id: str | None = None
    # Batch by batch, keeping only digests: a world's regions need not fit in memory.
    for i in range(0, len(keys), _BATCH):
        batch = keys[i : i + _BATCH]
        for key, blob in zip(batch, await store.get_many(batch), strict=True):
            if blob is None:
                if allow_raw:
                    continue
                raise SnapshotError(
                    f"{key}: vanished during the snapshot; the world is not quiescent"
                )
            sources.append(_survey(key, _content(key, blob.data, newest), allow_raw=allow_raw))
            if key == MANIFEST_KEY and sources[-1].entry.verified:
                manifest = decode_manifest(blob.data)
                record_versions, world_id = dict(manifest.record_versions), manifest.world_id

    # Only now that every source verified: a refused snapshot changes nothing at all. Before
    # the new snapshot exists and verifies, only damaged ones may go to make room.
    await _rotate(store, keep=keep, protect=protect, valid_too=False)
    existing = [*(await scan_snapshots(store)).ids]
    sid = _new_id(existing)
    lineage = await current_lineage(store)
    # A world from before lineage was recorded: every snapshot counted, so they still do.
    ancestors = lineage if lineage is not None else sorted(existing, reverse=True)
    try:
        await _copy_into(store, sid, sources, newest)
        info = SnapshotInfo(
            id=sid,
            created_at=_iso(sid),
            reason=reason,
            world_id=world_id,
            record_versions=record_versions,
            last_processed_tick={s.entry.key: s.tick for s in sources if s.tick is not None},
            files=[s.entry for s in sources],
            raw=any(not s.entry.verified for s in sources),
            ancestors=ancestors,
        )
        await store.put_atomic(_manifest_key(sid), seal(info))
        stored = _decode_info((await store.get(_manifest_key(sid))).data, _manifest_key(sid))
    except StreamerError:
        await _delete_quietly(store, sid)
        raise
    try:
        await write_lineage(store, [sid, *ancestors])
    except StreamerError as exc:
        # The snapshot is complete and verified; failing it now would only make the
        # caller retry and pile up snapshots. Left out of the lineage, it serves no copies.
        log.error(
            "snapshot %s is complete, but %s could not be updated (%s): automatic repair "
            "will not take copies from it",
            sid,
            LINEAGE_KEY,
            exc,
        )
    await _delete_quietly(store, _STAGING)  # the snapshot links what it used
    await _rotate(store, keep=keep, protect=protect | {sid})
    return stored


def _content(key: str, data: bytes, newest_segment: str | None) -> bytes:
    """What a snapshot keeps of a file: all of it, but for the zero padding of the newest
    journal segment (a running world's preallocated one: unwritten space, no information).
    Zeros at the end of an older segment are acknowledged frames gone: kept, so the copy
    shows the damage as the world does."""
    if key == newest_segment:
        scan = scan_frames(data)
        if scan.padding:
            return data[: scan.valid_length]
    return data


def _newest_segment(keys: Sequence[str]) -> str | None:
    segments = segment_keys(keys)
    return segments[-1] if segments else None


def _survey(key: str, data: bytes, *, allow_raw: bool) -> _Source:
    tick: int | None = None
    fault: str | None = None
    try:
        tick = _verify_content(key, data, key)
    except StreamerError as exc:
        if not allow_raw:
            raise SnapshotError(
                f"{key}: source file failed verification, refusing to snapshot it as good: {exc}"
            ) from exc
        fault = str(exc)
    entry = SnapshotFile(
        key=key, size=len(data), xxh3=hex64(xxh3(data)), verified=fault is None, fault=fault
    )
    return _Source(entry=entry, tick=tick)


async def _copy_into(
    store: BlobStore, sid: str, sources: list[_Source], newest: str | None
) -> None:
    """Copy every source into snapshot ``sid`` and prove each copy holds what was verified.

    Region files whose bytes an earlier snapshot holds as its own copy are linked to that
    copy; the rest are written. Every entry is then ``own`` (see the module docstring).
    """
    twins = _own_copies(await list_snapshots(store))
    staged = {k: k for k in await store.list(_STAGING_PREFIX)}
    linked: dict[str, str] = {}
    written: list[SnapshotFile] = []
    for s in sources:
        e = s.entry
        twin = None
        if _region_coords(e.key) is not None:
            twin = twins.get((e.key, e.size, e.xxh3)) or staged.get(_staged_key(e.key, e.xxh3))
        if twin is not None:
            linked[e.key] = twin
        else:
            written.append(e)
    await _link_many(store, [(twin, snapshot_file_key(sid, key)) for key, twin in linked.items()])
    await _write_copies(store, sid, written, newest)
    paths = [snapshot_file_key(sid, s.entry.key) for s in sources]
    bad_twins: list[SnapshotFile] = []
    async for i, blob in _iter_batched(store, paths):
        entry = sources[i].entry
        if _same(blob, entry):
            continue
        if entry.key in linked:
            # The earlier snapshot's copy is damaged: that snapshot fails its own
            # verification; this one gets a fresh copy instead of sharing the damage.
            bad_twins.append(entry)
            continue
        raise SnapshotError(
            f"snapshot {sid}: copy of {entry.key} does not match its source after "
            "copying (the world changed during the snapshot, or storage is failing)"
        )
    if bad_twins:
        await _delete_many(store, [snapshot_file_key(sid, e.key) for e in bad_twins])
        await _write_copies(store, sid, bad_twins, newest)
        keys = [snapshot_file_key(sid, e.key) for e in bad_twins]
        for entry, blob in zip(bad_twins, await _get_batched(store, keys), strict=True):
            if not _same(blob, entry):
                raise SnapshotError(
                    f"snapshot {sid}: copy of {entry.key} does not match its source after "
                    "copying (storage is failing)"
                )
    for s in sources:
        s.entry = msgspec.structs.replace(s.entry, own=True)


#: Copies made ahead of a running world's snapshot (``stage_copies``), linked into the
#: snapshot and removed once it is complete. A dot name: never taken for a snapshot.
_STAGING: Final = ".staging"
_STAGING_PREFIX: Final = f"{SNAPSHOTS_PREFIX}{_STAGING}/"


def _staged_key(key: str, xxh3_hex: str) -> str:
    return f"{_STAGING_PREFIX}{key}.{xxh3_hex}"


async def stage_copies(store: BlobStore) -> int:
    """Copy ahead the region files that no snapshot holds yet; return how many.

    For a running world, before it pauses for ``create_snapshot``: the pause then only
    links these copies (those whose region did not change since) instead of writing them
    while acknowledgements wait. Safe at any time (files are read whole, and a copy is used
    only if its checksum matches the region as the snapshot finds it); a crash leaves
    copies that the next staging or snapshot removes.
    """
    await _delete_quietly(store, _STAGING)
    twins = _own_copies(await list_snapshots(store))
    keys = [k for k in await store.list("regions/") if _region_coords(k) is not None]
    staged = 0
    for i in range(0, len(keys), _BATCH):
        batch = keys[i : i + _BATCH]
        # Removed meanwhile (recovery, rebuild): nothing to stage.
        found = [
            (key, blob.data)
            for key, blob in zip(batch, await store.get_many(batch), strict=True)
            if blob is not None
        ]
        # Hashed in a worker thread, a batch per hop: the world is serving meanwhile.
        digests = await anyio.to_thread.run_sync(_digests, [data for _, data in found])
        items = [
            (_staged_key(key, digest), data)
            for (key, data), digest in zip(found, digests, strict=True)
            if (key, len(data), digest) not in twins
        ]
        await _put_many(store, items)
        staged += len(items)
    return staged


def _digests(blobs: list[bytes]) -> list[str]:
    return [hex64(xxh3(data)) for data in blobs]


def _own_copies(infos: Sequence[SnapshotInfo]) -> dict[tuple[str, int, str], str]:
    """``(key, size, xxh3)`` → path of the newest snapshot copy of those bytes that is a
    file of its own (``infos`` newest first)."""
    twins: dict[tuple[str, int, str], str] = {}
    for info in infos:
        for f in info.files:
            if f.own and f.verified:
                twins.setdefault((f.key, f.size, f.xxh3), snapshot_file_key(info.id, f.key))
    return twins


def _same(blob: Blob | None, entry: SnapshotFile) -> bool:
    return (
        blob is not None and len(blob.data) == entry.size and hex64(xxh3(blob.data)) == entry.xxh3
    )


async def _write_copies(
    store: BlobStore, sid: str, entries: Sequence[SnapshotFile], newest: str | None
) -> None:
    """Write a copy of each world file of ``entries`` into snapshot ``sid``.

    Re-read rather than kept in memory since the survey (a world's regions need not fit in
    memory): a change since means the world was not quiescent.
    """
    for i in range(0, len(entries), _BATCH):
        batch = entries[i : i + _BATCH]
        items: list[tuple[str, bytes]] = []
        for entry, blob in zip(batch, await store.get_many([e.key for e in batch]), strict=True):
            data = None if blob is None else _content(entry.key, blob.data, newest)
            if data is None or hex64(xxh3(data)) != entry.xxh3:
                raise SnapshotError(
                    f"{entry.key}: changed during the snapshot; the world is not quiescent"
                )
            items.append((snapshot_file_key(sid, entry.key), data))
        await _put_many(store, items)


async def _put_many(store: BlobStore, items: list[tuple[str, bytes]]) -> None:
    """Atomic puts: on a local store one worker-thread hop and one directory fsync per batch."""
    local = _local(store)
    if local is None:
        for key, data in items:
            await store.put_atomic(key, data)
        return
    for result in await local.put_many_atomic(items):
        if isinstance(result, Exception):
            raise result


async def _delete_snapshot(store: BlobStore, sid: str) -> None:
    # snapshot.json first: from then on a crash leaves an incomplete directory (ignored and
    # removed later), never a complete-looking snapshot with files missing.
    local = _local(store)
    if local is not None:
        await _run_local(local, f"{SNAPSHOTS_PREFIX}{sid}", _delete_tree_blocking, local, sid)
        return
    await store.delete(_manifest_key(sid))
    for key in await store.list(snapshot_prefix(sid)):
        await store.delete(key)


# --- batched local file work (one worker-thread hop per batch) -------------------------------
#
# A LocalStore does each copy/delete as its own hop with its own directory fsync; a world has
# hundreds of regions, so on a local store the snapshot code links, replaces and unlinks a
# whole batch in one hop and syncs each touched directory once. Other stores go object by
# object through the BlobStore API. The world is quiescent and the caller holds the
# WorldLock, so the store's per-key locks are not needed here.


def _local(store: BlobStore) -> LocalStore | None:
    return store if isinstance(store, LocalStore) else None


def _temp_name(key: str) -> str:
    d, _, name = key.rpartition("/")
    tmp = f".{name}.tmp-{secrets.token_hex(6)}"  # the shape LocalStore.open sweeps away
    return f"{d}/{tmp}" if d else tmp


async def _run_local(local: LocalStore, what: str, fn: Callable[..., None], *args: Any) -> None:
    try:
        await local.run_sync(fn, *args)
    except FileNotFoundError as exc:
        raise SnapshotError(
            f"{exc.filename or what}: vanished during the operation; the world is not quiescent"
        ) from exc
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        raise StorageUnavailable(f"{name} ({exc.strerror})", key=exc.filename or what) from exc


def _link_many_blocking(local: LocalStore, pairs: list[tuple[str, str]]) -> None:
    fs = local.fs
    dirs: set[str] = set()
    for src, dst in pairs:
        d = dst.rpartition("/")[0]
        if d not in dirs:
            fs.makedirs(d)
            dirs.add(d)
        fs.link(src, dst)
    if local.fsync:
        for d in sorted(dirs):
            fs.fsync_dir(d)


def _unlink_many_blocking(local: LocalStore, keys: list[str]) -> None:
    fs = local.fs
    dirs: set[str] = set()
    for key in keys:
        try:
            fs.unlink(key)
        except FileNotFoundError:
            pass
        dirs.add(key.rpartition("/")[0])
    if local.fsync:
        for d in sorted(dirs):
            fs.fsync_dir(d)


def _delete_tree_blocking(local: LocalStore, sid: str) -> None:
    fs = local.fs
    root = f"{SNAPSHOTS_PREFIX}{sid}"
    manifest = _manifest_key(sid)
    if fs.exists(manifest):
        fs.unlink(manifest)
        if local.fsync:
            fs.fsync_dir(root)

    def empty(d: str) -> None:
        for name in fs.listdir(d):
            path = f"{d}/{name}"
            if fs.isdir(path):
                empty(path)
                fs.rmdir(path)
            else:
                fs.unlink(path)

    if fs.isdir(root):
        empty(root)
        fs.rmdir(root)
    # One sync of snapshots/ makes the whole subtree unreachable after a crash; until then
    # it may come back as an incomplete directory, which the next trim removes again.
    if local.fsync:
        fs.fsync_dir(SNAPSHOTS_PREFIX.rstrip("/"))


async def _link_many(store: BlobStore, pairs: list[tuple[str, str]]) -> None:
    await _pairs_in_batches(store, pairs, "snapshot", _link_many_blocking)


async def _pairs_in_batches(
    store: BlobStore,
    pairs: list[tuple[str, str]],
    step: str,
    blocking: Callable[[LocalStore, list[tuple[str, str]]], None],
) -> None:
    """Local stores: ``_LINK_BATCH`` pairs per worker-thread hop; others: server-side copies."""
    local = _local(store)
    if local is not None:
        for i in range(0, len(pairs), _LINK_BATCH):
            await _run_local(local, step, blocking, local, pairs[i : i + _LINK_BATCH])
        return
    for src, dst in pairs:
        await store.copy(src, dst)


async def _delete_many(store: BlobStore, keys: list[str]) -> None:
    local = _local(store)
    if local is not None:
        for i in range(0, len(keys), _LINK_BATCH):
            await _run_local(
                local, "restore", _unlink_many_blocking, local, keys[i : i + _LINK_BATCH]
            )
        return
    for key in keys:
        await store.delete(key)


async def _delete_quietly(store: BlobStore, sid: str) -> None:
    try:
        await _delete_snapshot(store, sid)
    except StreamerError:
        pass  # an incomplete directory is removed by the next snapshot's trim


async def _rotate(
    store: BlobStore, *, keep: int, protect: frozenset[str], valid_too: bool = True
) -> list[str]:
    """Remove incomplete snapshots, then complete ones beyond ``keep``: damaged ones first
    (oldest first), then, if ``valid_too``, the oldest valid ones, never the newest valid one.

    Damaged snapshots count toward ``keep`` (they occupy space) but are never what keeps
    a valid one alive: a rotation can never leave zero valid snapshots.
    """
    scan = await scan_snapshots(store)
    removed: list[str] = []
    for sid in scan.incomplete:
        if sid not in protect:
            await _delete_snapshot(store, sid)
            removed.append(sid)
    valid = sorted(scan.ids)
    excess = len(valid) + len(scan.damaged) - keep
    candidates = sorted(scan.damaged) + (valid[:-1] if valid_too else [])
    for sid in candidates:
        if excess <= 0:
            break
        if sid in protect:
            continue
        await _delete_snapshot(store, sid)
        removed.append(sid)
        excess -= 1
    return removed


# --- restore ---------------------------------------------------------------------------------


async def _marker_exists(store: BlobStore) -> bool:
    return RESTORE_MARKER_KEY in await store.list(RESTORE_MARKER_KEY)


async def restore_snapshot(store: BlobStore, snapshot_id: str, *, keep: int) -> RestoreResult:
    """Make the world exactly what snapshot ``snapshot_id`` holds.

    Precondition: the world is closed and the caller holds the ``WorldLock``.

    1. A restore left unfinished by a crash is finished first.
    2. The target is verified in full; a damaged or raw snapshot is refused.
    3. The current state is snapshotted (``reason="pre-restore"``), so the restore itself
       can be undone. If current files are corrupt they are still copied, byte for byte,
       into a *raw* pre-restore snapshot with each bad file flagged: the operator may need
       them for ``streamer salvage`` (player edits in the intact chunks of a damaged region
       are only there), and a restore must never destroy the last trace of them. A raw
       snapshot is never restored and never served as a good copy, but its intact files are.
    4. ``state/restore.json`` is written durably: from here the restore is committed.
    5. Files are replaced: each snapshot file copied into place (never linked), world
       files absent from the snapshot (regions, journal segments, state) deleted, and the
       result read back and compared with the snapshot's checksums.
    6. A ``restored_from_snapshot`` incident is recorded, then the marker deleted.

    :raises UnknownSnapshot: no such snapshot (the message lists the ones there are).
    :raises SnapshotError: the snapshot does not verify, or the result does not match it
        (the marker stays, so the next open retries).
    """
    await finish_interrupted_restore(store)
    info = await _load_info(store, snapshot_id)
    if info.raw:
        raise SnapshotError(
            f"snapshot {snapshot_id} is a raw copy of damaged files "
            f"({', '.join(info.damaged_files)}); refusing to restore it"
        )
    problems = await verify_snapshot(store, snapshot_id)
    if problems:
        listing = "; ".join(f"{p.file}: {p.fault}" for p in problems[:5])
        raise SnapshotError(
            f"snapshot {snapshot_id} failed verification ({len(problems)} problem(s): "
            f"{listing}); choose another snapshot"
        )
    pre = await _create(
        store, keep=keep, reason="pre-restore", protect=frozenset({snapshot_id}), allow_raw=True
    )
    marker = RestoreMarker(
        snapshot=snapshot_id,
        pre_restore=pre.id,
        started_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    )
    await store.put_atomic(RESTORE_MARKER_KEY, seal(marker))
    incident = await _apply_restore(store, info, marker, resumed=False)
    return RestoreResult(
        snapshot=snapshot_id, pre_restore=pre.id, pre_restore_raw=pre.raw, incident=incident
    )


async def finish_interrupted_restore(store: BlobStore) -> RestoreResult | None:
    """Redo a restore whose marker survived a crash; ``None`` when none is pending.

    Idempotent: safe to call at every open, and again after a crash inside it.

    :raises SnapshotError: the marker is damaged, or the snapshot it names is gone or does
        not verify; the world is then half restored and must not be opened. The message
        names the pre-restore snapshot the operator can restore instead.
    """
    try:
        blob = await store.get(RESTORE_MARKER_KEY)
    except NotFound:
        return None
    try:
        marker = _decode_marker(blob.data, RESTORE_MARKER_KEY)
    except StreamerError as exc:
        raise SnapshotError(
            f"{RESTORE_MARKER_KEY}: an interrupted restore is pending but its marker is "
            f"damaged ({exc}); restore a snapshot explicitly with `streamer restore`"
        ) from exc
    try:
        info = await _load_info(store, marker.snapshot)
    except SnapshotError as exc:
        raise SnapshotError(
            f"an interrupted restore of snapshot {marker.snapshot} cannot be finished: {exc}; "
            f"the world is half restored: restore another snapshot (pre-restore state: "
            f"{marker.pre_restore})"
        ) from exc
    incident = await _apply_restore(store, info, marker, resumed=True)
    return RestoreResult(
        snapshot=marker.snapshot, pre_restore=marker.pre_restore, incident=incident
    )


async def _ancestors_of(store: BlobStore, info: SnapshotInfo) -> list[str]:
    """The snapshots ``info``'s state descends from, newest first. One taken before lineage
    was recorded: every older snapshot, as every snapshot counted then."""
    if info.ancestors is not None:
        return info.ancestors
    return sorted((i for i in (await scan_snapshots(store)).ids if i < info.id), reverse=True)


async def _apply_restore(
    store: BlobStore, info: SnapshotInfo, marker: RestoreMarker, *, resumed: bool
) -> str:
    sid = info.id
    wanted = {f.key: f for f in info.files}
    current = await world_keys(store)
    # world.json last: until the rest is in place a crash leaves the marker to redo it
    # anyway, but an operator looking at a half-restored directory sees the old manifest.
    # Copied, not linked: the restored world's files must not share an inode with the
    # snapshot's copies (see the module docstring).
    ordered = sorted(wanted, key=lambda k: (k == MANIFEST_KEY, k))
    for group in (ordered[:-1], ordered[-1:]):
        for i in range(0, len(group), _BATCH):
            batch = group[i : i + _BATCH]
            paths = [snapshot_file_key(sid, k) for k in batch]
            items: list[tuple[str, bytes]] = []
            for key, blob in zip(batch, await store.get_many(paths), strict=True):
                if blob is None or hex64(xxh3(blob.data)) != wanted[key].xxh3:
                    raise SnapshotError(f"snapshot {sid}: copy of {key} is missing or damaged")
                items.append((key, blob.data))
            await _put_many(store, items)
    await _delete_many(store, [k for k in current if k not in wanted])
    keys = sorted(wanted)
    async for i, blob in _iter_batched(store, keys):
        key = keys[i]
        if blob is None or hex64(xxh3(blob.data)) != wanted[key].xxh3:
            raise SnapshotError(
                f"restore of snapshot {sid}: {key} does not match the snapshot after replacing "
                f"it; the restore stays pending ({RESTORE_MARKER_KEY}) and is retried at open"
            )
    # The world now descends from the snapshot, not from those taken after it.
    await write_lineage(store, [sid, *(await _ancestors_of(store, info))])
    # Recorded before the marker goes: a crash in between records the restore twice, which
    # is better than not at all.
    incident = await IncidentLog(store).record(
        "restored_from_snapshot",
        details={
            "snapshot": sid,
            "snapshot_created_at": info.created_at,
            "pre_restore_snapshot": marker.pre_restore,
            "files": len(info.files),
            "resumed_after_crash": resumed,
        },
        action=(
            f"world restored to snapshot {sid}; the state before is in snapshot "
            f"{marker.pre_restore}"
            + (" (a restore interrupted by a crash was finished at open)" if resumed else "")
        ),
    )
    await store.delete(RESTORE_MARKER_KEY)
    return incident.id


# --- health check ----------------------------------------------------------------------------


def snapshot_check(min_valid: int) -> ExtraCheck:
    """An ``ExtraCheck`` for ``check_world``: verify every snapshot, warn below ``min_valid``."""

    async def check(store: BlobStore, manifest: WorldManifest, report: CheckReport) -> None:
        del manifest
        scan = await scan_snapshots(store)
        for sid in scan.incomplete:
            report.warnings.append(
                f"{snapshot_prefix(sid)}: incomplete snapshot (interrupted by a crash); "
                "removed by the next snapshot"
            )
        for sid, fault in scan.damaged.items():
            report.problems.append(Problem(file=_manifest_key(sid), fault=fault, kind="checksum"))
        valid = 0
        for info in scan.snapshots:
            report.files_checked += 1 + len(info.files)
            problems = await verify_snapshot(store, info.id)
            report.problems.extend(problems)
            if info.raw:
                report.warnings.append(
                    f"{snapshot_prefix(info.id)}: raw {info.reason} snapshot holding "
                    f"{len(info.damaged_files)} damaged file(s) kept for salvage; not restorable"
                )
            elif not problems:
                valid += 1
        try:
            await read_lineage(store)
        except LineageDamaged as exc:
            report.warnings.append(
                f"{exc}: automatic repair uses the lineage rebuilt from the snapshots and the "
                "incident log until the next snapshot rewrites it"
            )
        if await _marker_exists(store):
            report.warnings.append(
                f"{RESTORE_MARKER_KEY}: an interrupted restore is pending; it is finished at "
                "the next open"
            )
        if valid < min_valid:
            report.warnings.append(
                f"only {valid} valid snapshot(s), fewer than the minimum of {min_valid}: "
                "take one with `streamer snapshot`"
            )

    return check
