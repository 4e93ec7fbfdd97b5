"""``streamer check --repair``: verify everything, then run the recovery ladder on what failed.

What can be repaired, and how:

- a damaged **region file**: the ladder (``ladder.recover_region``): restored from the newest
  valid snapshot copy, or quarantined and the region marked inactive, with incidents. A
  restore is then judged as the running world judges it (``journal_loss.judge_restore``):
  deltas above the snapshot's tick that left with deleted journal segments get a
  ``data_loss`` incident (the next open replays the rest);
- a damaged **world.json**: the newest snapshot copy that verifies is put back (the damaged
  file goes to quarantine), and the check runs again, since a broken manifest hides
  everything behind it;
- a damaged **state/inactive.json**: rebuilt from the incident log, which records every
  inactivation and every rebuild.

Everything else is reported, not touched: a region written by a newer streamer (never
overwritten), damaged journal segments (acknowledged deltas are lost: the operator decides),
damaged snapshots (recovery already skips them) and damaged incident-log lines (the log is
append-only evidence). The run succeeds only if the world checks clean afterwards.

Precondition: the caller holds the ``WorldLock``.
"""

from __future__ import annotations

import logging
from typing import Final, Literal

import msgspec

from streamer.errors import (
    ChecksumMismatch,
    IntegrityError,
    MalformedFile,
    StreamerError,
    TruncatedFile,
)
from streamer.format.manifest import MANIFEST_KEY
from streamer.format.region import parse_region_key, region_key
from streamer.recovery.check import CheckReport, ExtraCheck, Problem, check_world
from streamer.recovery.inactive import INACTIVE_KEY, inactive_from_incidents, write_inactive
from streamer.recovery.incidents import IncidentLog
from streamer.recovery.journal_loss import judge_and_record, read_region_ticks
from streamer.recovery.ladder import RecoveryOutcome, recover_region
from streamer.recovery.quarantine import quarantine_copy
from streamer.recovery.snapshots import find_valid_copy
from streamer.storage.base import BlobStore
from streamer.worlddir import read_manifest

__all__ = ["RepairAction", "RepairReport", "repair_world"]

log = logging.getLogger(__name__)

_INTEGRITY_KINDS: Final = {
    "checksum": ChecksumMismatch,
    "truncated": TruncatedFile,
    "malformed": MalformedFile,
}

Outcome = Literal["restored", "inactive", "already_recovered", "rebuilt", "not_repaired"]


class RepairAction(msgspec.Struct, frozen=True, kw_only=True):
    file: str
    kind: str
    fault: str
    outcome: Outcome
    detail: str
    incidents: list[str] = msgspec.field(default_factory=list)
    #: A loss was found but its ``data_loss`` incident could not be written (disk full):
    #: the repair is not ok, so the operator's check fails loudly (the loss is in the log).
    unrecorded_loss: bool = False


class RepairReport(msgspec.Struct, kw_only=True):
    world: str
    before: CheckReport
    after: CheckReport
    actions: list[RepairAction] = msgspec.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every problem was repaired or isolated (with incidents) and the world checks clean."""
        return self.after.healthy and all(
            a.outcome != "not_repaired" and not a.unrecorded_loss for a in self.actions
        )


def _error_of(p: Problem, region: tuple[int, int] | None) -> IntegrityError:
    cls = _INTEGRITY_KINDS.get(p.kind, IntegrityError)
    # ``fault`` already names the path and both checksums: build the message from it alone
    # and attach the fields afterwards, so they are not repeated in the text.
    err = cls(p.fault, region=region)
    err.path, err.expected, err.actual = p.file, p.expected, p.actual
    return err


def _is_region_key(key: str) -> tuple[int, int] | None:
    coords = parse_region_key(key)
    return coords if coords is not None and region_key(*coords) == key else None


async def repair_world(
    store: BlobStore,
    *,
    where: str = "",
    extra: list[ExtraCheck] | None = None,
    incidents: IncidentLog | None = None,
) -> RepairReport:
    """Check the world, repair what the ladder can, and check again.

    :raises WorldNotFound: no world at all (a usage error).
    :raises StorageError: the store failed mid-repair; what was done is recorded.
    """
    incidents = incidents or IncidentLog(store)
    before = await check_world(store, where=where, extra=extra)
    actions: list[RepairAction] = []
    report = before
    # A broken manifest stops check_world before the regions: repair it, then look again.
    for _ in range(2):
        manifest_problem = next((p for p in report.problems if p.file == MANIFEST_KEY), None)
        if manifest_problem is None:
            break
        action = await _restore_plain(store, manifest_problem, incidents)
        actions.append(action)
        if action.outcome == "not_repaired":
            return RepairReport(world=where, before=before, after=report, actions=actions)
        report = await check_world(store, where=where, extra=extra)

    manifest = await read_manifest(store, where=where)
    for p in report.problems:
        if p.file == MANIFEST_KEY:
            continue
        coords = _is_region_key(p.file)
        if coords is not None and p.kind in _INTEGRITY_KINDS:
            try:
                out = await recover_region(
                    store,
                    coords[0],
                    coords[1],
                    _error_of(p, coords),
                    manifest=manifest,
                    incidents=incidents,
                )
            except StreamerError as exc:
                actions.append(_not(p, f"the ladder failed: {type(exc).__name__}: {exc}"))
                continue
            detail, ids = out.message, list(out.incidents)
            unrecorded = False
            if out.action == "restored":
                detail, ids, unrecorded = await _journal_loss(
                    store, coords, out, manifest.region_size, incidents, detail, ids
                )
            actions.append(
                RepairAction(
                    file=p.file,
                    kind=p.kind,
                    fault=p.fault,
                    outcome=out.action,
                    detail=detail,
                    incidents=ids,
                    unrecorded_loss=unrecorded,
                )
            )
        elif p.file == INACTIVE_KEY:
            actions.append(await _rebuild_inactive(store, p, incidents))
        else:
            actions.append(_not(p, _why_not(p)))
    after = await check_world(store, where=where, extra=extra)
    return RepairReport(world=where, before=before, after=after, actions=actions)


async def _journal_loss(
    store: BlobStore,
    region: tuple[int, int],
    out: RecoveryOutcome,
    region_size: int,
    incidents: IncidentLog,
    detail: str,
    ids: list[str],
) -> tuple[str, list[str], bool]:
    """The running world's judgement of a restore (``journal_loss.judge_restore``), for a
    closed world: the next open replays what the journal holds above the snapshot's tick;
    whatever left with a deleted segment is recorded as a ``data_loss`` incident. The flag
    says a loss was found and its incident could not be recorded."""
    snap = out.snapshot_last_processed_tick
    assert snap is not None
    try:
        found = await read_region_ticks(store, region, region_size)
    except StreamerError as exc:
        text = f"unknown: the journal could not be read ({exc})"
        log.error("%s: restored; lost: %s", out.file, text)
        return f"{detail}; journal: {text}", ids, False
    verdict, inc, unrecorded = await judge_and_record(
        store,
        incidents,
        region=region,
        outcome=out,
        snapshot_lpt=snap,
        reapplied=[t for t in found.ticks if t > snap],
        segments_read=found.segments,
    )
    if verdict.status == "none":
        return (
            f"{detail}; journal: holds every later delta (re-applied at the next open)",
            ids,
            False,
        )
    if unrecorded is not None:
        log.error(
            "%s: DATA LOST: %s; the data_loss incident could NOT be recorded (%s)",
            out.file,
            verdict.text,
            unrecorded,
        )
        return (
            f"{detail}; DATA LOST (incident not recorded: {unrecorded}): {verdict.text}",
            ids,
            True,
        )
    if inc is not None:  # a lost verdict, recorded
        log.error("%s: data lost (incident %s): %s", out.file, inc.id, verdict.text)
        return f"{detail}; data lost (incident {inc.id}): {verdict.text}", [*ids, inc.id], False
    log.warning("%s: restored; lost: %s", out.file, verdict.text)
    return f"{detail}; journal: {verdict.text}", ids, False


def _not(p: Problem, why: str) -> RepairAction:
    return RepairAction(file=p.file, kind=p.kind, fault=p.fault, outcome="not_repaired", detail=why)


def _why_not(p: Problem) -> str:
    if _is_region_key(p.file) is not None and p.kind == "unsupported":
        return "written by a newer streamer: upgrade streamer; it is never overwritten"
    if p.file.startswith("journal/"):
        return (
            "acknowledged journal records are damaged and cannot be rebuilt; restore a "
            "snapshot (`streamer restore`) or accept the loss"
        )
    if p.file.startswith("snapshots/"):
        return "damaged snapshot: recovery skips it; it rotates away as new snapshots are taken"
    if p.file == "incidents.log":
        return "the incident log is append-only evidence: damaged lines are kept as they are"
    return "no automatic repair for this file"


async def _restore_plain(store: BlobStore, p: Problem, incidents: IncidentLog) -> RepairAction:
    found = await find_valid_copy(store, p.file)
    failure = await incidents.record(
        "checksum_failure",
        file=p.file,
        details={"expected": p.expected, "actual": p.actual, "error": p.fault},
        action="looking for a valid copy in the snapshots",
    )
    if found is None:
        log.error("%s: %s; no snapshot holds a valid copy", p.file, p.fault)
        return RepairAction(
            file=p.file,
            kind=p.kind,
            fault=p.fault,
            outcome="not_repaired",
            detail="no snapshot holds a valid copy; recreate it by hand (seed and generator "
            "parameters are in every snapshot's copy and in the incident log)",
            incidents=[failure.id],
        )
    sid, data = found
    qkey = await quarantine_copy(store, p.file)
    await store.put_atomic(p.file, data)
    inc = await incidents.record(
        "restored_from_snapshot",
        file=p.file,
        details={
            "snapshot": sid,
            "quarantine": qkey,
            "expected": p.expected,
            "actual": p.actual,
            "checksum_failure_incident": failure.id,
        },
        action=f"restored {p.file} from snapshot {sid}; damaged file moved to {qkey}",
    )
    log.warning("%s: restored from snapshot %s; damaged file in %s", p.file, sid, qkey)
    return RepairAction(
        file=p.file,
        kind=p.kind,
        fault=p.fault,
        outcome="restored",
        detail=f"restored from snapshot {sid}; damaged file in {qkey}",
        incidents=[failure.id, inc.id],
    )


async def _rebuild_inactive(store: BlobStore, p: Problem, incidents: IncidentLog) -> RepairAction:
    scan = await incidents.read()
    regions = inactive_from_incidents(scan.incidents)
    qkey = await quarantine_copy(store, INACTIVE_KEY)
    await write_inactive(store, regions)
    listing = ", ".join(f"({rx}, {ry})" for rx, ry in sorted(regions)) or "none"
    inc = await incidents.record(
        "checksum_failure",
        file=INACTIVE_KEY,
        details={
            "expected": p.expected,
            "actual": p.actual,
            "error": p.fault,
            "quarantine": qkey,
            "rebuilt_from_incidents": [list(r) for r in sorted(regions)],
            "incident_log_damaged_lines": scan.lost_lines,
        },
        action=f"rebuilt {INACTIVE_KEY} from the incident log (inactive: {listing}); "
        f"damaged file moved to {qkey}",
    )
    log.warning("%s rebuilt from the incident log: inactive %s", INACTIVE_KEY, listing)
    return RepairAction(
        file=p.file,
        kind=p.kind,
        fault=p.fault,
        outcome="rebuilt",
        detail=f"rebuilt from the incident log (inactive: {listing}); damaged file in {qkey}",
        incidents=[inc.id],
    )
