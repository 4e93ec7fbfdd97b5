"""``state/inactive.json``: regions taken out of service after unrecoverable corruption.

Format: one JSON object keyed ``"rx.ry"``; each value is a self-verifying record::

    {"0.-1": {"type": "inactive_region", "schemaVersion": 1, "incident": "<incident id>",
              "since": "2026-01-02T03:04:05.123456Z", "reason": "...", "checksum": "<16 hex>"}}

``checksum`` is the xxh3-64 of the entry's canonical JSON (sorted keys, no whitespace, the
``checksum`` field left out) with the region key prepended, so an entry moved to another
region does not verify either.

The file fails closed: if it cannot be read and verified, ``load_inactive`` raises rather
than returning "nothing is inactive", because serving an inactive region as pristine would
let new edits land on top of state the operator has not yet dealt with. ``check --repair``
rebuilds a damaged file from the incident log (``rebuild_inactive_from_incidents``), which
is the authority on which regions were inactivated and which were since rebuilt.

Updates are read-modify-compare-and-swap, so concurrent markers (two chunk loads failing in
two regions at once) never lose each other's entry.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final, Literal

import msgspec

from streamer.errors import (
    ChecksumMismatch,
    MalformedFile,
    NotFound,
    PreconditionFailed,
    StorageUnavailable,
)
from streamer.format.checksum import hex64, xxh3
from streamer.format.manifest import WorldManifest
from streamer.recovery.check import CheckReport, problem_from
from streamer.recovery.incidents import Incident
from streamer.storage.base import BlobStore

__all__ = [
    "INACTIVE_KEY",
    "InactiveRegion",
    "check_inactive",
    "decode_inactive",
    "encode_inactive",
    "inactive_from_incidents",
    "load_inactive",
    "mark_inactive",
    "reactivate",
    "region_label",
    "write_inactive",
]

INACTIVE_KEY: Final = "state/inactive.json"
_CAS_ATTEMPTS: Final = 32
_JSON = msgspec.json.Encoder(order="sorted")

RegionKey = tuple[int, int]


class InactiveRegion(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["inactive_region"] = "inactive_region"
    schemaVersion: int = 1
    #: The incident that took the region out of service (its data_loss record).
    incident: str
    since: str
    reason: str


def region_label(rx: int, ry: int) -> str:
    return f"{rx}.{ry}"


def _parse_label(label: str) -> RegionKey | None:
    a, sep, b = label.partition(".")
    try:
        key = (int(a), int(b))
    except ValueError:
        return None
    return key if sep and region_label(*key) == label else None


def _entry_sum(label: str, body: dict[str, Any]) -> str:
    plain = {k: v for k, v in body.items() if k != "checksum"}
    return hex64(xxh3(label.encode() + b"\0" + _JSON.encode(plain)))


def encode_inactive(regions: dict[RegionKey, InactiveRegion]) -> bytes:
    out: dict[str, dict[str, Any]] = {}
    for (rx, ry), entry in sorted(regions.items()):
        label = region_label(rx, ry)
        body = msgspec.to_builtins(entry)
        body["checksum"] = _entry_sum(label, body)
        out[label] = body
    return msgspec.json.format(_JSON.encode(out), indent=2) + b"\n"


def decode_inactive(data: bytes, *, path: str = INACTIVE_KEY) -> dict[RegionKey, InactiveRegion]:
    """:raises MalformedFile, ChecksumMismatch: the file or an entry does not verify."""
    try:
        raw = msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedFile(f"inactive-region list is not valid JSON: {exc}", path=path) from None
    if not isinstance(raw, dict):
        raise MalformedFile("inactive-region list is not a JSON object", path=path)
    out: dict[RegionKey, InactiveRegion] = {}
    for label, body in raw.items():
        key = _parse_label(label)
        if key is None or not isinstance(body, dict):
            raise MalformedFile(f'entry {label!r} is not a region "rx.ry" -> object', path=path)
        stored = body.get("checksum")
        actual = _entry_sum(label, body)
        if stored != actual:
            raise ChecksumMismatch(
                f"inactive-region entry {label} checksum mismatch",
                path=path,
                expected=str(stored),
                actual=actual,
                region=key,
            )
        try:
            entry = msgspec.convert(
                {k: v for k, v in body.items() if k != "checksum"}, InactiveRegion
            )
        except msgspec.ValidationError as exc:
            raise MalformedFile(f"entry {label}: {exc}", path=path, region=key) from None
        if entry.schemaVersion != 1:
            raise MalformedFile(
                f"entry {label}: schemaVersion {entry.schemaVersion} is not supported",
                path=path,
                region=key,
            )
        out[key] = entry
    return out


async def _read(store: BlobStore) -> tuple[dict[RegionKey, InactiveRegion], str | None]:
    try:
        blob = await store.get(INACTIVE_KEY)
    except NotFound:
        return {}, None
    return decode_inactive(blob.data), blob.version


async def load_inactive(store: BlobStore) -> dict[RegionKey, InactiveRegion]:
    """Every inactive region (empty when the file does not exist).

    :raises IntegrityError: the file is damaged (fail closed; see the module docstring).
    :raises StorageUnavailable: it could not be read.
    """
    return (await _read(store))[0]


async def write_inactive(store: BlobStore, regions: dict[RegionKey, InactiveRegion]) -> None:
    """Replace the whole list (repair only; everything else goes through the CAS helpers)."""
    if regions:
        await store.put_atomic(INACTIVE_KEY, encode_inactive(regions))
    else:
        await store.delete(INACTIVE_KEY)


async def _update(store: BlobStore, rx: int, ry: int, entry: InactiveRegion | None) -> bool:
    for _ in range(_CAS_ATTEMPTS):
        regions, version = await _read(store)
        before = regions.get((rx, ry))
        if entry is None:
            if before is None:
                return False
            del regions[(rx, ry)]
        else:
            regions[(rx, ry)] = entry
        try:
            if regions:
                await store.put_if_match(INACTIVE_KEY, encode_inactive(regions), version)
            elif version is not None:
                # Deleting is not conditional; write an empty object under the CAS instead,
                # so a concurrent marker's entry cannot be deleted with the file.
                await store.put_if_match(INACTIVE_KEY, b"{}\n", version)
            return before is not None
        except PreconditionFailed:
            continue  # someone else updated the list meanwhile: re-read and redo
    raise StorageUnavailable(
        f"cannot update the inactive-region list: {_CAS_ATTEMPTS} concurrent-update retries lost",
        key=INACTIVE_KEY,
    )


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def mark_inactive(store: BlobStore, rx: int, ry: int, *, incident: str, reason: str) -> bool:
    """Durably mark region ``(rx, ry)`` inactive; True if it was already inactive (updated).

    :raises IntegrityError: the existing list is damaged (repair it first).
    :raises StorageUnavailable: the write failed; the region is not marked.
    """
    entry = InactiveRegion(incident=incident, since=_now_iso(), reason=reason)
    return await _update(store, rx, ry, entry)


async def reactivate(store: BlobStore, rx: int, ry: int) -> bool:
    """Durably remove ``(rx, ry)`` from the list; True if it was inactive.

    :raises IntegrityError: the existing list is damaged.
    :raises StorageUnavailable: the write failed; the region stays inactive.
    """
    return await _update(store, rx, ry, None)


def inactive_from_incidents(incidents: list[Incident]) -> dict[RegionKey, InactiveRegion]:
    """Which regions the incident log says are inactive now.

    A ``region_inactive`` incident inactivates its region; a later ``region_rebuilt`` or
    ``world_regenerated`` brings it (or every region) back.
    """
    out: dict[RegionKey, InactiveRegion] = {}
    for inc in incidents:
        if inc.kind == "region_inactive" and inc.region is not None:
            cause = inc.details.get("incident")
            out[inc.region] = InactiveRegion(
                incident=cause if isinstance(cause, str) else inc.id,
                since=inc.time,
                reason=str(inc.details.get("reason", inc.action)),
            )
        elif inc.kind == "region_rebuilt" and inc.region is not None:
            out.pop(inc.region, None)
        elif inc.kind == "world_regenerated":
            out.clear()
    return out


async def check_inactive(store: BlobStore, manifest: WorldManifest, report: CheckReport) -> None:
    """``ExtraCheck`` for ``check_world``: the list must verify; each inactive region warns."""
    del manifest
    try:
        regions = await load_inactive(store)
    except (MalformedFile, ChecksumMismatch) as exc:
        report.files_checked += 1
        report.problems.append(problem_from(INACTIVE_KEY, exc))
        return
    if not regions:
        return
    report.files_checked += 1
    for (rx, ry), entry in sorted(regions.items()):
        report.warnings.append(
            f"region ({rx}, {ry}) is inactive since {entry.since} (incident {entry.incident}): "
            f"{entry.reason}; bring it back with `streamer region rebuild <world> {rx} {ry}`"
        )
