"""Verify every file of a world without opening it for writing (``streamer check``).

Each fault becomes a ``Problem`` naming the file and what is wrong; a run never stops at
the first fault. Conditions that the next open repairs by itself (a torn journal tail left
by a crash) are warnings, not problems.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from streamer.errors import IntegrityError, NotFound, StorageError, StreamerError
from streamer.format.journal import (
    SEGMENT_COPY_SUFFIX,
    SPARE_FILE_NAME,
    judge_segment,
    scan_frames,
    segment_keys,
)
from streamer.format.manifest import MANIFEST_KEY, WorldManifest
from streamer.format.region import decode_region, parse_region_key
from streamer.storage.base import BlobStore
from streamer.worlddir import read_manifest


class Problem(msgspec.Struct, frozen=True):
    file: str
    fault: str
    kind: str  # "checksum", "truncated", "malformed", "unsupported", "io", "missing", ...
    expected: str | None = None
    actual: str | None = None


class CheckReport(msgspec.Struct):
    world: str
    files_checked: int = 0
    regions_checked: int = 0
    problems: list[Problem] = msgspec.field(default_factory=list)
    warnings: list[str] = msgspec.field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems


def problem_from(key: str, exc: StreamerError) -> Problem:
    kind = {
        "ChecksumMismatch": "checksum",
        "TruncatedFile": "truncated",
        "MalformedFile": "malformed",
        "UnsupportedFormat": "unsupported",
        "NotFound": "missing",
    }.get(type(exc).__name__, "io" if isinstance(exc, StorageError) else "error")
    expected = getattr(exc, "expected", None)
    actual = getattr(exc, "actual", None)
    return Problem(file=key, fault=str(exc), kind=kind, expected=expected, actual=actual)


#: Extra verifiers registered by other layers (snapshots, incidents): each appends to the report.
ExtraCheck = Callable[[BlobStore, WorldManifest, CheckReport], Awaitable[None]]


async def check_world(
    store: BlobStore,
    *,
    where: str = "",
    extra: list[ExtraCheck] | None = None,
    journal_preallocated: bool = False,
) -> CheckReport:
    """Verify manifest, every region file and the journal.

    ``journal_preallocated``: the world's journal writes segments in place
    (``runtime.journal_preallocate``), which changes what a torn newest segment may look like
    (``format/journal.py``: ``judge_segment``).

    :raises WorldNotFound: the store holds no world (a usage error, not a problem found).
    """
    report = CheckReport(world=where)
    try:
        manifest = await read_manifest(store, where=where)
    except IntegrityError as exc:
        report.problems.append(problem_from(MANIFEST_KEY, exc))
        return report
    report.files_checked += 1

    for key in await store.list("regions/"):
        coords = parse_region_key(key)
        if coords is None:
            report.warnings.append(f"{key}: unexpected file in regions/ (ignored)")
            continue
        report.files_checked += 1
        report.regions_checked += 1
        try:
            blob = await store.get(key)
            decode_region(blob.data, rx=coords[0], ry=coords[1], path=key)
        except NotFound:
            continue  # replaced between list and get: the new file is checked next run
        except StreamerError as exc:
            report.problems.append(problem_from(key, exc))

    # Exactly the files open replays; anything else there it ignores, and so do we, aloud.
    listed = await store.list("journal/")
    segments = segment_keys(listed)
    for key in sorted(set(listed) - set(segments)):
        name = key.removeprefix("journal/")
        if name.endswith(SEGMENT_COPY_SUFFIX):
            report.warnings.append(
                f"{key}: a copy left by an open that crashed; the next open removes it"
            )
        elif name != SPARE_FILE_NAME:
            report.warnings.append(
                f"{key}: not a journal segment (not 20 digits + .wal); the world ignores it"
            )
    for i, key in enumerate(segments):
        report.files_checked += 1
        try:
            blob = await store.get(key)
        except StreamerError as exc:
            report.problems.append(problem_from(key, exc))
            continue
        scan = scan_frames(blob.data)
        verdict = judge_segment(
            scan,
            len(blob.data),
            newest=i == len(segments) - 1,
            preallocated=journal_preallocated,
        )
        if verdict.damaged:
            report.problems.append(
                Problem(
                    file=key,
                    fault=f"journal damaged at byte {scan.valid_length} of {len(blob.data)} "
                    f"({scan.frames_after_tear} intact records after it): acknowledged deltas "
                    "lost; the world will not open until an operator decides (docs/runbook.md)",
                    kind="checksum",
                )
            )
        elif verdict.torn_bytes:
            also = (
                f"; with {verdict.last_commit_frames} intact records of the same unacknowledged "
                "commit after a hole (written in place, persisted out of order)"
                if verdict.last_commit_frames
                else ""
            )
            report.warnings.append(
                f"{key}: torn tail of {verdict.torn_bytes} bytes after {len(scan.payloads)} "
                "intact records (a crash mid-append; discarded at next open, never "
                f"acknowledged){also}"
            )

    for check in extra or []:
        await check(store, manifest, report)
    return report
