"""The recovery ladder: what happens when a region file fails verification.

Used by the runtime when a chunk load hits an ``IntegrityError`` and by ``check --repair``.
The steps are the spec's "Checksum Validation Failure" procedure:

1. **Log** (``logging.error``) the path, expected and actual checksum and a timestamp, and
   record a ``checksum_failure`` incident before touching anything, so even a crash later in
   the ladder leaves a trace.
2. **Newest valid copy**: ``snapshots.find_valid_copy`` walks the snapshots newest first and
   returns the first copy of this region that verifies on its own.
3. **Restore**: the damaged file is copied into ``quarantine/`` (durable) and only then is
   the good copy put in its place (atomic replace). A ``restored_from_snapshot`` incident
   names both checksums, the snapshot, the quarantine key, and what is lost: the snapshot's
   lastProcessedTick against the damaged file's (when its header still verifies) plus what
   ``streamer salvage`` can still pull out of the quarantined file. Whether the journal
   gives back every delta above the snapshot's tick is judged by the caller once it has read
   the journal (``journal_loss.judge_restore``: the runtime's re-read, or ``check
   --repair``), which records a ``data_loss`` incident when it does not.
4. **No valid copy**: the file is moved to quarantine, the region is marked inactive
   (``state/inactive.json``), and two incidents say so: ``data_loss`` (region, file, which
   record kinds and ids salvage can recover from the damaged file, how many journaled
   deltas above the file's tick replay will drop and their tick range, which snapshots
   exist for a manual rollback) and ``region_inactive``. Terrain keeps regenerating from the
   seed; the runtime refuses dynamic access with ``RegionInactive`` until ``streamer region
   rebuild``.

Nothing is silent: every outcome has a log line and at least one incident.

Order matters for crashes: evidence is durable before the original goes, and a region is
marked inactive before its file is removed, so a crash at any point leaves either the
damaged file in place (the next load runs the ladder again) or the region inactive.

One ladder runs per region at a time (per store, in this process): a second caller for the
same region waits and, when the first already repaired it, gets the first one's outcome.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final, Literal

import anyio
import anyio.to_thread
import msgspec

from streamer.errors import IntegrityError, NotFound, StreamerError
from streamer.format.manifest import WorldManifest
from streamer.format.region import decode_index, decode_region, encode_region, region_key
from streamer.recovery.inactive import load_inactive, mark_inactive
from streamer.recovery.incidents import Incident, IncidentLog
from streamer.recovery.journal_loss import journal_deltas_above
from streamer.recovery.quarantine import quarantine_copy
from streamer.recovery.salvage import salvage_bytes, summarize_records
from streamer.recovery.snapshots import SnapshotInfo, find_valid_copy, list_snapshots
from streamer.storage.base import BlobStore

__all__ = ["RecoveryOutcome", "damaged_file_info", "recover_region"]

log = logging.getLogger(__name__)

#: Ids listed per record type in an incident; the counts are always complete.
MAX_IDS_PER_TYPE: Final = 100
#: ``writer`` of a region file the ladder put back from a snapshot.
RECOVERY_WRITER: Final = "streamer-recovery"

Action = Literal["restored", "inactive", "already_recovered"]


class RecoveryOutcome(msgspec.Struct, frozen=True, kw_only=True):
    region: tuple[int, int]
    file: str
    #: ``restored``: a snapshot copy is in place; ``inactive``: no valid copy, region out of
    #: service; ``already_recovered``: another ladder run handled it (see its incidents).
    action: Action
    snapshot: str | None = None
    quarantine: str | None = None
    #: Ids of the incidents this run recorded (empty for ``already_recovered``).
    incidents: list[str] = msgspec.field(default_factory=list)
    message: str = ""
    #: ``restored``: the lastProcessedTick of the copy put in place; ``restored`` and
    #: ``inactive``: the damaged file's (None when its header does not verify).
    snapshot_last_processed_tick: int | None = None
    damaged_last_processed_tick: int | None = None


# Per store: one lock per region, and the last outcome (handed to a waiter that finds the
# region already repaired). Weak, so a closed store's entries go with it.
_LOCKS: weakref.WeakKeyDictionary[BlobStore, dict[tuple[int, int], anyio.Lock]]
_LOCKS = weakref.WeakKeyDictionary()
_LAST: weakref.WeakKeyDictionary[BlobStore, dict[tuple[int, int], RecoveryOutcome]]
_LAST = weakref.WeakKeyDictionary()


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def damaged_file_info(data: bytes, rx: int, ry: int, key: str) -> dict[str, Any]:
    """What can still be read from a damaged region file (CPU only; run in a worker thread).

    ``header``: its lastProcessedTick, generation and chunk count if the header verifies;
    ``salvageable``: record counts and ids per type from every intact chunk frame.
    """
    info: dict[str, Any] = {"size": len(data)}
    try:
        idx = decode_index(data, rx=rx, ry=ry, path=key)
    except (StreamerError, ValueError) as exc:
        info["header"] = None
        info["header_error"] = str(exc)
    else:
        if isinstance(idx, int):
            info["header"] = None
            info["header_error"] = f"file ends inside its header (needs {idx} bytes)"
        else:
            h = idx.header
            info["header"] = {
                "last_processed_tick": h.last_processed_tick,
                "generation": h.generation,
                "written_at": h.written_at,
                "writer": h.writer,
                "chunks": len(h.chunks),
            }
    records, failures, chunks = salvage_bytes(data, source=key)
    # Only this region's frames: a stray frame of another region is not this region's loss.
    mine = [r for r in records if r.region == (rx, ry)]
    ids = summarize_records(mine)
    info["salvageable"] = {
        "intact_chunks": len({r.chunk for r in mine}),
        "frames_verified": chunks,
        "undecodable_chunks": len([f for f in failures if f.chunk is not None]),
        "counts": {t: len(v) for t, v in ids.items()},
        "ids": {t: v[:MAX_IDS_PER_TYPE] for t, v in ids.items()},
    }
    return info


def _reissue(good: bytes, rx: int, ry: int, key: str, damaged_gen: int) -> tuple[bytes, int]:
    """The snapshot copy's content as a new generation, and its lastProcessedTick.

    Generations only grow: a reader holding the damaged file's index (or the runtime
    comparing generations) must see the restored file as newer, never as a stale one. The
    chunk payloads are the verified snapshot bytes, unchanged.
    """
    rf = decode_region(good, rx=rx, ry=ry, path=key)
    h = rf.header
    data = encode_region(
        rx=rx,
        ry=ry,
        last_processed_tick=h.last_processed_tick,
        generation=max(h.generation, damaged_gen) + 1,
        writer=RECOVERY_WRITER,
        encoding=h.encoding,
        chunks=rf.chunks,
        region_size=h.region_size,
        written_at=h.written_at,
    )
    decode_region(data, rx=rx, ry=ry, path=key)  # never install what we cannot read back
    return data, h.last_processed_tick


def _lock(store: BlobStore, region: tuple[int, int]) -> anyio.Lock:
    locks = _LOCKS.setdefault(store, {})
    lock = locks.get(region)
    if lock is None:
        lock = locks[region] = anyio.Lock()
    return lock


async def _verifies(store: BlobStore, key: str, rx: int, ry: int) -> bytes | None:
    """The current bytes if the file still fails; None if it is missing or now verifies."""
    try:
        blob = await store.get(key)
    except NotFound:
        return None
    try:
        await anyio.to_thread.run_sync(_decode_quiet, blob.data, rx, ry, key)
    except IntegrityError:
        return blob.data
    return None


def _decode_quiet(data: bytes, rx: int, ry: int, key: str) -> None:
    decode_region(data, rx=rx, ry=ry, path=key)


async def recover_region(
    store: BlobStore,
    rx: int,
    ry: int,
    error: IntegrityError,
    *,
    manifest: WorldManifest,
    incidents: IncidentLog,
) -> RecoveryOutcome:
    """Run the ladder for region ``(rx, ry)`` whose file failed with ``error``.

    Precondition: nothing else writes this region meanwhile (the runtime does not flush a
    region that failed to load; ``check --repair`` holds the world lock).

    :raises StorageError: the store failed mid-way; what was done so far is durable and
        recorded (at least the ``checksum_failure`` incident), and running the ladder again
        continues from there.
    """
    region = (rx, ry)
    key = region_key(rx, ry)
    async with _lock(store, region):
        data = await _verifies(store, key, rx, ry)
        if data is None:
            return await _nothing_to_do(store, region, key, error, incidents)
        return await _climb(store, region, key, data, error, manifest, incidents)


async def _nothing_to_do(
    store: BlobStore,
    region: tuple[int, int],
    key: str,
    error: IntegrityError,
    incidents: IncidentLog,
) -> RecoveryOutcome:
    last = _LAST.get(store, {}).get(region)
    inactive = (await load_inactive(store)).get(region)
    if inactive is not None:
        msg = f"region {region} is already inactive (incident {inactive.incident})"
        log.warning("%s: %s", key, msg)
        return RecoveryOutcome(region=region, file=key, action="inactive", message=msg)
    if last is not None:
        log.warning("%s: already recovered (%s)", key, last.message)
        return msgspec.structs.replace(last, action="already_recovered", incidents=[])
    # The file verifies now and nobody here repaired it: a transient read fault (or another
    # process repaired it). Still an incident: the reader did get bad bytes once.
    when = _now_iso()
    log.error(
        "integrity failure on %s at %s (expected %s, actual %s): %s; the file verifies on re-read",
        key,
        when,
        error.expected,
        error.actual,
        error,
    )
    inc = await incidents.record(
        "checksum_failure",
        region=region,
        file=key,
        details={
            "detected_at": when,
            "expected": error.expected,
            "actual": error.actual,
            "error": str(error),
            "reread_verifies": True,
        },
        action="none needed: the stored file verifies on re-read (transient read fault, or "
        "repaired by another process); watch for repeats",
    )
    return RecoveryOutcome(
        region=region,
        file=key,
        action="already_recovered",
        incidents=[inc.id],
        message="file verifies on re-read; nothing to do",
    )


async def _climb(
    store: BlobStore,
    region: tuple[int, int],
    key: str,
    data: bytes,
    error: IntegrityError,
    manifest: WorldManifest,
    incidents: IncidentLog,
) -> RecoveryOutcome:
    rx, ry = region
    when = _now_iso()
    log.error(
        "checksum failure on %s detected at %s: expected %s, actual %s; %s",
        key,
        when,
        error.expected,
        error.actual,
        error,
    )
    damaged = await anyio.to_thread.run_sync(damaged_file_info, data, rx, ry, key)
    base: dict[str, Any] = {
        "detected_at": when,
        "expected": error.expected,
        "actual": error.actual,
        "error": str(error),
        "world_id": manifest.world_id,
    }
    first = await incidents.record(
        "checksum_failure",
        region=region,
        file=key,
        details={**base, "damaged_file": damaged},
        action="looking for a valid copy in the snapshots",
    )
    header = damaged.get("header")
    # A copy above the damaged file's tick is not of its history (recovery/lineage.py).
    tick = header.get("last_processed_tick") if isinstance(header, dict) else None
    found = await find_valid_copy(store, key, tick_at_most=tick if isinstance(tick, int) else None)
    if found is not None:
        outcome = await _restore(store, region, key, found, damaged, base, incidents, first)
    else:
        outcome = await _isolate(
            store, region, key, damaged, base, incidents, first, manifest.region_size
        )
    _LAST.setdefault(store, {})[region] = outcome
    return outcome


async def _restore(
    store: BlobStore,
    region: tuple[int, int],
    key: str,
    found: tuple[str, bytes],
    damaged: dict[str, Any],
    base: dict[str, Any],
    incidents: IncidentLog,
    first: Incident,
) -> RecoveryOutcome:
    rx, ry = region
    sid, good = found
    header = damaged.get("header")
    damaged_tick = header["last_processed_tick"] if isinstance(header, dict) else None
    damaged_gen = header["generation"] if isinstance(header, dict) else 0
    data, snap_tick = await anyio.to_thread.run_sync(_reissue, good, rx, ry, key, damaged_gen)
    created = next((s.created_at for s in await list_snapshots(store) if s.id == sid), None)

    qkey = await quarantine_copy(store, key)
    await store.put_atomic(key, data)

    if damaged_tick is None:
        lost = (
            f"unknown: the damaged file's header does not verify; every change folded into "
            f"region {region} after tick {snap_tick} (snapshot {sid}) is lost unless it is "
            "still in the journal or salvage recovers it"
        )
    elif damaged_tick > (snap_tick or -1):
        lost = (
            f"changes with ticks {snap_tick} < t <= {damaged_tick} that were folded into the "
            f"region file after snapshot {sid} (unless still in the journal; salvage the "
            "quarantined file for the rest)"
        )
    else:
        lost = "nothing: the snapshot copy is as new as the damaged file"
    inc = await incidents.record(
        "restored_from_snapshot",
        region=region,
        file=key,
        details={
            **base,
            "checksum_failure_incident": first.id,
            "snapshot": sid,
            "snapshot_created_at": created,
            "quarantine": qkey,
            "snapshot_last_processed_tick": snap_tick,
            "damaged_last_processed_tick": damaged_tick,
            "lost": lost,
            "salvageable": damaged["salvageable"],
        },
        action=(
            f"restored {key} from snapshot {sid}; damaged file moved to {qkey} "
            f"(`streamer salvage <world>/{qkey} --out DIR` extracts its intact records)"
        ),
    )
    msg = f"restored from snapshot {sid}; damaged file in {qkey}; lost: {lost}"
    log.warning("%s: %s", key, msg)
    return RecoveryOutcome(
        region=region,
        file=key,
        action="restored",
        snapshot=sid,
        quarantine=qkey,
        incidents=[first.id, inc.id],
        message=msg,
        snapshot_last_processed_tick=snap_tick,
        damaged_last_processed_tick=damaged_tick,
    )


async def _isolate(
    store: BlobStore,
    region: tuple[int, int],
    key: str,
    damaged: dict[str, Any],
    base: dict[str, Any],
    incidents: IncidentLog,
    first: Incident,
    region_size: int,
) -> RecoveryOutcome:
    rx, ry = region
    snapshots = await list_snapshots(store)
    rollback = _rollback_options(snapshots, key)
    qkey = await quarantine_copy(store, key)
    salv = damaged["salvageable"]
    header = damaged.get("header")
    tick = header["last_processed_tick"] if isinstance(header, dict) else None
    # Journaled deltas above the file's tick were never folded into it; replay drops them
    # once the region is inactive, so they are part of the loss.
    journal = await journal_deltas_above(store, region, region_size, tick)
    lost = (
        f"all dynamic state of region {region} (player tile edits, characters, structures, "
        "features, societies)"
        + (
            f" up to tick {tick}"
            if tick is not None
            else " (the file's header does not verify: its tick is unknown)"
        )
        + f", and {_journal_text(journal, tick)}"
        + f"; salvage can recover {sum(salv['counts'].values())} record(s) from "
        f"{salv['intact_chunks']} intact chunk(s)"
    )
    loss = await incidents.record(
        "data_loss",
        region=region,
        file=key,
        details={
            **base,
            "checksum_failure_incident": first.id,
            "quarantine": qkey,
            "lost": lost,
            "damaged_file": {k: v for k, v in damaged.items() if k != "salvageable"},
            "salvageable": salv,
            "snapshots": rollback,
            "snapshot_ids": [s["id"] for s in rollback],
            "journal_deltas_dropped": journal,
            "terrain": "regenerated from the seed (deterministic); nothing lost",
        },
        action=(
            f"no snapshot holds a valid copy of {key}. Options: `streamer salvage <world>/{qkey} "
            f"--out DIR` to extract intact records; `streamer restore <world> <snapshot>` "
            f"to roll the whole world back to one of {[s['id'] for s in rollback]}; "
            f"`streamer region rebuild <world> {rx} {ry}` to reset the region to generator "
            "defaults"
        ),
    )
    reason = f"{key} failed verification and no snapshot holds a valid copy"
    await mark_inactive(store, rx, ry, incident=loss.id, reason=reason)
    await store.delete(key)
    inactive = await incidents.record(
        "region_inactive",
        region=region,
        file=key,
        details={"incident": loss.id, "reason": reason, "quarantine": qkey},
        action=(
            f"region {region} refuses dynamic access (terrain still served); players in it "
            f"are moved to the nearest valid region or spawn; `streamer region rebuild "
            f"<world> {rx} {ry}` brings it back with generator defaults"
        ),
    )
    msg = f"no valid copy in {len(snapshots)} snapshot(s); region inactive; file in {qkey}"
    log.error("%s: %s; lost: %s", key, msg, lost)
    return RecoveryOutcome(
        region=region,
        file=key,
        action="inactive",
        quarantine=qkey,
        incidents=[first.id, loss.id, inactive.id],
        message=msg,
        damaged_last_processed_tick=tick,
    )


def _journal_text(journal: dict[str, Any], above: int | None) -> str:
    """``journal_deltas_above``'s finding, in words."""
    where = "" if above is None else f" above tick {above}"
    count = journal.get("count")
    if count is None:
        return (
            f"the region's journaled deltas{where} (the journal could not be read: "
            + str(journal.get("error"))
            + ")"
        )
    if not count:
        return f"no journaled deltas{where}"
    return (
        f"{count} journaled delta(s){where} (ticks {journal['first_tick']} to "
        f"{journal['last_tick']}), dropped at replay"
    )


def _rollback_options(snapshots: Sequence[SnapshotInfo], key: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s in snapshots:
        entry = next((f for f in s.files if f.key == key), None)
        out.append(
            {
                "id": s.id,
                "created_at": s.created_at,
                "reason": s.reason,
                # find_valid_copy found none: every copy present failed verification.
                "region_copy": "absent"
                if entry is None
                else ("damaged" if entry.verified else "raw copy of an already damaged file"),
                "last_processed_tick": s.last_processed_tick.get(key),
            }
        )
    return out
