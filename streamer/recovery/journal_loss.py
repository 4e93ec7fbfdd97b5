"""What the journal could not give back: the loss judgement of a restore, for every path.

A region restored from a snapshot copy with lastProcessedTick ``S`` gets back every delta
of that region above ``S`` that is still in the journal (replay at open, or the runtime's
re-read). What left with a deleted segment is gone. :func:`judge_restore` decides, from
``state/journal_drops.json`` (``runtime/journal_drops.py``) and the damaged file's header,
whether that happened:

- ``lost``: ticks ``S < t <= min(dropped_through, damaged lpt)`` left with a deleted
  segment (or the damaged header names a tick above everything the journal holds);
- ``none``: the record covers the snapshot (same epoch) and nothing of this region above
  ``S`` was deleted: the journal holds every delta the snapshot copy lacks;
- ``unknown``: no usable record (an older world, a damaged or unreadable record, or a
  snapshot from before the record's epoch) and no proof of a loss either.

The running world (``runtime/recovery_hooks.py``) and ``check --repair``
(``recovery/repair.py``) both call it, and both record a ``lost`` verdict with
:func:`record_loss`. :func:`journal_deltas_above` counts what an inactivated region loses
from the journal on top of its file (``ladder._isolate``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio.to_thread
import msgspec

from streamer.coords import chunk_of, region_of_chunk
from streamer.errors import IntegrityError, NotFound, StorageUnavailable, StreamerError
from streamer.format.journal import parse_segment_name, scan_frames, segment_keys
from streamer.format.region import region_key
from streamer.recovery.incidents import Incident, IncidentLog
from streamer.recovery.snapshots import snapshot_file_key
from streamer.runtime.journal_drops import DROPS_KEY, decode_drops, read_drops
from streamer.storage.base import BlobStore

if TYPE_CHECKING:  # the ladder imports this module
    from streamer.recovery.ladder import RecoveryOutcome

__all__ = [
    "JournalTicks",
    "LossVerdict",
    "journal_deltas_above",
    "judge_restore",
    "read_region_ticks",
    "record_loss",
]

RegionKey = tuple[int, int]

_JOURNAL_PREFIX: Final = "journal/"


class JournalTicks(msgspec.Struct, frozen=True, kw_only=True):
    """One region's deltas in the journal: their ticks in journal order, and the segments
    read (by sequence number)."""

    ticks: list[int]
    segments: list[int]


class LossVerdict(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["none", "lost", "unknown"]
    #: For the operator: what is lost, or why it is unknown ("" for ``none``).
    text: str
    #: For the ``data_loss`` incident.
    details: dict[str, Any]


def _region_ticks_blocking(
    segments: Sequence[tuple[int, bytes]], region: RegionKey, region_size: int
) -> list[int]:
    from streamer.runtime.journal import decode_batch
    from streamer.runtime.submitting import _delta_point

    out: list[int] = []
    for seq, data in segments:
        for payload in scan_frames(data).payloads:
            try:
                batch = decode_batch(payload, where=f"{_JOURNAL_PREFIX}{seq}")
            except StreamerError:
                continue  # replay refuses such a frame too: it holds nothing acknowledged
            for d in batch.deltas:
                try:
                    cx, cy = chunk_of(*_delta_point(d))  # type: ignore[arg-type]
                except StreamerError:
                    continue  # not a single-chunk delta: never journaled unresolved
                if region_of_chunk(cx, cy, region_size) == region:
                    out.append(d.tick)
    return out


async def read_region_ticks(store: BlobStore, region: RegionKey, region_size: int) -> JournalTicks:
    """Every tick of ``region`` still in the journal, read from ``store`` (a closed world,
    or one whose journal does not delete what the caller needs meanwhile).

    :raises StorageUnavailable: the segments could not be listed or read.
    """
    names = segment_keys(await store.list(_JOURNAL_PREFIX))
    ticks: list[int] = []
    read: list[int] = []
    # One segment in memory at a time: a journal can hold many of up to 64 MiB each.
    for name in names:
        seq = parse_segment_name(name[len(_JOURNAL_PREFIX) :])
        (blob,) = await store.get_many([name])
        if blob is None or seq is None:
            continue  # deleted since the listing: nothing of it to re-apply
        segment = [(seq, blob.data)]
        del blob
        ticks += await anyio.to_thread.run_sync(
            _region_ticks_blocking, segment, region, region_size
        )
        del segment  # before the next read
        read.append(seq)
    return JournalTicks(ticks=ticks, segments=read)


async def journal_deltas_above(
    store: BlobStore, region: RegionKey, region_size: int, above: int | None
) -> dict[str, Any]:
    """How many of ``region``'s journal deltas have a tick above ``above`` (all of them if
    None) and their tick range: what replay drops once the region is inactive.

    Never raises a ``StreamerError``: ``error`` says why the journal could not be read.
    """
    try:
        found = await read_region_ticks(store, region, region_size)
    except StreamerError as exc:
        return {"count": None, "error": str(exc)}
    ticks = [t for t in found.ticks if above is None or t > above]
    return {
        "count": len(ticks),
        "first_tick": min(ticks) if ticks else None,
        "last_tick": max(ticks) if ticks else None,
    }


async def _epoch_of_snapshot(store: BlobStore, snapshot: str) -> str | None:
    try:
        blob = await store.get(snapshot_file_key(snapshot, DROPS_KEY))
    except NotFound:
        return None
    try:
        # In a worker thread, as read_drops: the record can be ~2 MB.
        return (await anyio.to_thread.run_sync(decode_drops, blob.data)).epoch
    except IntegrityError:
        return None


async def judge_restore(
    store: BlobStore,
    *,
    region: RegionKey,
    snapshot: str | None,
    snapshot_lpt: int,
    damaged_lpt: int | None,
    reapplied: Sequence[int],
    segments_read: Iterable[int],
) -> LossVerdict:
    """Did restoring ``region`` from ``snapshot`` (lastProcessedTick ``snapshot_lpt``) lose
    deltas the journal no longer holds? See the module docstring.

    ``reapplied``: ticks of the region's journal deltas above ``snapshot_lpt`` given back;
    ``segments_read``: the journal segments they were read from. Call it only after reading
    the journal: the record is written before a segment goes, so a segment missing from that
    read is in the record read here.

    Never raises a ``StreamerError``: a record that cannot be read makes the loss unknown.
    """
    s = snapshot_lpt
    covered = max([s, *reapplied])
    details: dict[str, Any] = {
        "snapshot": snapshot,
        "snapshot_last_processed_tick": s,
        "damaged_last_processed_tick": damaged_lpt,
        "journal_reapplied": len(reapplied),
        "journal_high_tick": covered,
    }
    why: str | None = None
    dropped: int | None = None
    try:
        record = await read_drops(store)
    except (IntegrityError, StorageUnavailable) as exc:
        record, why = (
            None,
            f"the record of deleted journal segments ({DROPS_KEY}) is unusable: {exc}",
        )
    if record is None and why is None:
        why = f"no record of deleted journal segments ({DROPS_KEY}): a world from before it"
    if record is not None:
        epoch = None
        if snapshot is not None:
            try:
                epoch = await _epoch_of_snapshot(store, snapshot)
            except StreamerError as exc:
                why = f"cannot read snapshot {snapshot}'s copy of {DROPS_KEY}: {exc}"
        if epoch == record.epoch:
            dropped = record.dropped_through(region, segments_read)
            details["dropped_through"] = dropped
            details["tracking_epoch"] = record.epoch
        elif why is None:
            why = (
                f"snapshot {snapshot} predates the record of deleted journal segments "
                f"(kept since {record.since})"
            )
    if why is not None:
        details["unknown_because"] = why

    parts: list[str] = []
    lo: int | None = None
    hi: int | None = None
    if dropped is not None:
        top = dropped if damaged_lpt is None else min(dropped, damaged_lpt)
        if top > s:
            lo, hi = s, top
            parts.append(
                f"deltas of region {region} with ticks {s} < t <= {top}: folded into the "
                f"region file after snapshot {snapshot}, and journal segments holding them "
                f"were deleted ({len(reapplied)} delta(s) still in the journal re-applied)"
            )
    if damaged_lpt is not None and damaged_lpt > covered and (hi is None or damaged_lpt > hi):
        lo = covered if lo is None else lo
        hi = damaged_lpt
        parts.append(
            f"deltas of region {region} with ticks {covered} < t <= {damaged_lpt}: folded "
            f"into the damaged file after snapshot {snapshot}, and the journal segments "
            "holding them were already deleted"
        )
    if parts:
        text = "; ".join(parts)
        if why is not None:
            text += f"; possibly more ({why})"
        details["lost_ticks"] = [lo, hi]
        details["lost"] = text
        return LossVerdict(status="lost", text=text, details=details)
    if why is None:
        return LossVerdict(status="none", text="", details=details)
    text = (
        f"unknown: {why}; deltas of region {region} above tick {s} folded after snapshot "
        f"{snapshot} are lost if their journal segments were deleted ({len(reapplied)} "
        "delta(s) still in the journal re-applied; salvage the quarantined file for the rest)"
    )
    details["lost"] = text
    return LossVerdict(status="unknown", text=text, details=details)


async def judge_and_record(
    store: BlobStore,
    incidents: IncidentLog,
    *,
    region: RegionKey,
    outcome: RecoveryOutcome,
    snapshot_lpt: int,
    reapplied: list[int],
    segments_read: Sequence[int],
) -> tuple[LossVerdict, Incident | None, StreamerError | None]:
    """:func:`judge_restore` of a restore the ladder made, and for a ``lost`` verdict its
    ``data_loss`` incident: ``(verdict, incident, None)``, or ``(verdict, None, error)`` when
    the incident could not be appended (the caller must still report the loss)."""
    verdict = await judge_restore(
        store,
        region=region,
        snapshot=outcome.snapshot,
        snapshot_lpt=snapshot_lpt,
        damaged_lpt=outcome.damaged_last_processed_tick,
        reapplied=reapplied,
        segments_read=segments_read,
    )
    if verdict.status != "lost":
        return verdict, None, None
    try:
        inc = await record_loss(
            incidents,
            region=region,
            verdict=verdict,
            quarantine=outcome.quarantine,
            restore_incidents=outcome.incidents,
        )
    except StreamerError as exc:
        return verdict, None, exc
    return verdict, inc, None


async def record_loss(
    incidents: IncidentLog,
    *,
    region: RegionKey,
    verdict: LossVerdict,
    quarantine: str | None,
    restore_incidents: Sequence[str],
) -> Incident:
    """The ``data_loss`` incident of a ``lost`` verdict.

    :raises StorageUnavailable: the append failed (the caller still reports the loss).
    """
    return await incidents.record(
        "data_loss",
        region=region,
        file=region_key(*region),
        details={
            **verdict.details,
            "quarantine": quarantine,
            "restore_incidents": list(restore_incidents),
        },
        action=(
            f"`streamer salvage <world>/{quarantine} --out DIR` extracts the damaged file's "
            "intact records; tell the players of this region"
        ),
    )
