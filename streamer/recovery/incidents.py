"""The incident log, ``incidents.log``: what an operator must know, append-only, checksummed.

One JSON object per line::

    {"action": ..., "checksum": ..., "details": {...}, "file": ..., "id": ..., "kind": ...,
     "region": [rx, ry] | null, "time": "2026-01-02T03:04:05.123456Z"}

``checksum`` is the xxh3-64 (16 hex digits) of the line's canonical JSON without the
``checksum`` field (sorted keys, no whitespace), so each line verifies on its own and damage
to one line never hides the lines after it.

Durability: on a local store one append is one worker-thread hop (open for append, write,
fsync; fsync the directory too when the file was just created) and ``record`` returns only
after it. A crash mid-append can leave an unterminated fragment at the end of the file; it
was never acknowledged. The next append first terminates that fragment with ``TORN_MARK``,
so a reader can still tell "crash artefact" (harmless) from "a stored line was damaged"
(an acknowledged incident is unreadable: a problem for ``streamer check``). Other stores
have no append, so they read, modify and compare-and-swap the whole object.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import weakref
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import anyio
import msgspec

from streamer.errors import NotFound, PreconditionFailed, StorageUnavailable
from streamer.format.checksum import hex64, xxh3
from streamer.format.manifest import WorldManifest
from streamer.storage.base import BlobStore
from streamer.storage.fs import FileSystem

if TYPE_CHECKING:
    from streamer.recovery.check import CheckReport

log = logging.getLogger(__name__)

__all__ = [
    "INCIDENTS_KEY",
    "KINDS",
    "TORN_MARK",
    "Incident",
    "IncidentLog",
    "IncidentScan",
    "check_incident_log",
    "parse_incidents",
]

INCIDENTS_KEY: Final = "incidents.log"

#: Every incident kind the project records. A kind outside this set is a programming error
#: (a typo would hide an incident from operators filtering by kind), so ``record`` refuses it.
KINDS: Final = frozenset(
    {
        "checksum_failure",
        "restored_from_snapshot",
        "data_loss",
        "region_inactive",
        "region_rebuilt",
        "world_regenerated",
        "migration_failed",
        "snapshot_failed",
        "scrub_alert",
    }
)

#: Appended to an unterminated (torn) last line before the next incident is written after it.
TORN_MARK: Final = b"  # torn: crash during append, never acknowledged"

# Appends from threads of one process must not interleave the "is the tail torn?" probe of
# one with the write of another. Incidents are rare; one lock for all logs costs nothing.
_APPEND_LOCK = threading.Lock()
_CAS_ATTEMPTS = 16
# Whole-object rewrites of one store are serialised in-process, so compare-and-swap only
# has to arbitrate between processes (where retries are rare).
_CAS_LOCKS: weakref.WeakKeyDictionary[BlobStore, anyio.Lock] = weakref.WeakKeyDictionary()


class Incident(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    time: str
    kind: str
    region: tuple[int, int] | None = None
    file: str | None = None
    details: dict[str, Any] = msgspec.field(default_factory=dict)
    action: str = ""


class IncidentScan(msgspec.Struct, frozen=True, kw_only=True):
    """What ``read`` found. Line numbers are 1-based.

    ``damaged_lines`` lists every line that could not be read, including crash fragments;
    ``torn_lines`` is the subset that are crash fragments (never acknowledged, harmless);
    ``torn_tail`` says the last line is such a fragment, not yet terminated by an append.
    """

    incidents: list[Incident]
    damaged_lines: list[int]
    torn_tail: bool
    torn_lines: list[int] = msgspec.field(default_factory=list)

    @property
    def lost_lines(self) -> list[int]:
        """Damaged lines that are not crash fragments: acknowledged incidents now unreadable."""
        torn = set(self.torn_lines)
        return [n for n in self.damaged_lines if n not in torn]


_ENCODER = msgspec.json.Encoder(order="sorted")


def _canonical(body: Mapping[str, Any]) -> bytes:
    return _ENCODER.encode({k: v for k, v in body.items() if k != "checksum"})


def _id_and_time() -> tuple[str, str]:
    now = datetime.now(UTC)
    ident = now.strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)
    return ident, now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _encode_line(incident: Incident) -> bytes:
    body = msgspec.to_builtins(incident)
    body["checksum"] = hex64(xxh3(_canonical(body)))
    return _ENCODER.encode(body) + b"\n"


def _parse_line(line: bytes) -> Incident | None:
    try:
        raw = msgspec.json.decode(line)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("checksum"), str):
        return None
    if raw["checksum"] != hex64(xxh3(_canonical(raw))):
        return None
    # The checksum covers the decoded record, not the bytes: a line with a duplicated key
    # (two torn lines spliced together; JSON's last key wins) would verify as the second
    # incident and silently swallow the first. Only the exact encoding we write is accepted.
    if _ENCODER.encode(raw) != line:
        return None
    raw.pop("checksum")
    try:
        return msgspec.convert(raw, Incident)
    except msgspec.ValidationError:
        return None


def parse_incidents(data: bytes) -> IncidentScan:
    """Split a whole log into verified incidents and the numbers of unreadable lines."""
    incidents: list[Incident] = []
    damaged: list[int] = []
    torn: list[int] = []
    lines = data.split(b"\n")
    terminated = lines[-1] == b""
    if terminated:
        lines.pop()
    torn_tail = False
    for n, line in enumerate(lines, start=1):
        is_tail = n == len(lines) and not terminated
        if line.endswith(TORN_MARK):
            damaged.append(n)
            torn.append(n)
            continue
        incident = _parse_line(line)
        if incident is not None:
            # An intact but unterminated last line is complete data: the newline is simply
            # the last byte that did not reach the disk. The next append terminates it.
            incidents.append(incident)
            continue
        damaged.append(n)
        if is_tail:
            torn.append(n)
            torn_tail = True
    return IncidentScan(
        incidents=incidents, damaged_lines=damaged, torn_tail=torn_tail, torn_lines=torn
    )


def _append_fs(fs: FileSystem, path: str, line: bytes) -> None:
    """One worker-thread hop: terminate a torn tail if any, append, fsync, fsync the dir."""
    with _APPEND_LOCK:
        prefix = b""
        try:
            size = fs.size(path)
            new = False
        except FileNotFoundError:  # only that: any other error must not read as "absent"
            size = 0
            new = True
        if size > 0 and fs.pread(path, size - 1, 1) != b"\n":
            tail = fs.pread(path, max(0, size - 65536), 65536)
            last = tail.rpartition(b"\n")[2]
            # A complete line that only lacks its newline stays a valid incident.
            prefix = b"\n" if _parse_line(last) is not None else TORN_MARK + b"\n"
        handle = fs.open_append(path)
        try:
            fs.write(handle, prefix + line)
            fs.fsync(handle)
        except OSError as exc:
            # Cut the failed line off: after a failed sync its bytes stay readable in the
            # page cache but never reach the disk, and the next incident appended after
            # them would follow a hole after a power loss, unreadable. A file this append
            # created goes with it.
            try:
                if new:
                    fs.unlink(path)
                else:
                    fs.truncate(path, size)
            except OSError as cut:
                log.warning(
                    "%s: an append failed (%s) and cutting it off failed too (%s); an "
                    "incident appended next may be unreadable after a power loss",
                    path,
                    exc,
                    cut,
                )
            raise
        finally:
            fs.close(handle)
        # Every time, not only when this append created the file: whether the name is
        # durable cannot be told from its presence (a first append that failed, or a failed
        # directory sync, leaves a file whose name is not), and incidents are rare.
        fs.fsync_dir(os.path.dirname(path))


class IncidentLog:
    """Append and read ``incidents.log`` of one world store."""

    def __init__(self, store: BlobStore, key: str = INCIDENTS_KEY) -> None:
        self._store = store
        self._key = key

    async def record(
        self,
        kind: str,
        *,
        region: tuple[int, int] | None = None,
        file: str | None = None,
        details: Mapping[str, Any] | None = None,
        action: str = "",
    ) -> Incident:
        """Durably append one incident; return it once it is on stable storage.

        :raises ValueError: ``kind`` is not in ``KINDS``, or ``details`` is not JSON-encodable.
        :raises StorageUnavailable: the append failed; the incident is not acknowledged.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown incident kind {kind!r}; expected one of {sorted(KINDS)}")
        try:
            # Round-trip so the stored line re-encodes to the same canonical bytes on read
            # (tuples become lists, non-str keys are refused here rather than on read).
            plain = msgspec.json.decode(msgspec.json.encode(dict(details or {})))
        except (TypeError, msgspec.EncodeError) as exc:
            raise ValueError(f"incident details are not JSON-encodable: {exc}") from exc
        ident, when = _id_and_time()
        incident = Incident(
            id=ident,
            time=when,
            kind=kind,
            region=None if region is None else (int(region[0]), int(region[1])),
            file=file,
            details=plain,
            action=action,
        )
        line = _encode_line(incident)
        local = _local_fs(self._store)
        if local is not None:
            fs, run_sync = local
            try:
                await run_sync(_append_fs, fs, self._key, line)
            except OSError as exc:
                raise StorageUnavailable(
                    f"cannot append incident: {exc.strerror or exc}", key=self._key
                ) from exc
        else:
            await self._append_cas(line)
        return incident

    async def _append_cas(self, line: bytes) -> None:
        lock = _CAS_LOCKS.get(self._store)
        if lock is None:
            lock = _CAS_LOCKS[self._store] = anyio.Lock()
        async with lock:
            await self._append_cas_locked(line)

    async def _append_cas_locked(self, line: bytes) -> None:
        for _ in range(_CAS_ATTEMPTS):
            try:
                blob = await self._store.get(self._key)
                data, version = blob.data, blob.version
            except NotFound:
                data, version = b"", None
            if data and not data.endswith(b"\n"):
                last = data.rpartition(b"\n")[2]
                data += b"\n" if _parse_line(last) is not None else TORN_MARK + b"\n"
            try:
                await self._store.put_if_match(self._key, data + line, version)
                return
            except PreconditionFailed:
                continue  # another writer appended meanwhile: re-read and retry
        raise StorageUnavailable(
            f"cannot append incident: {_CAS_ATTEMPTS} concurrent-update retries lost",
            key=self._key,
        )

    async def read(self) -> IncidentScan:
        """Every verifiable incident in order; unreadable lines are reported, never fatal."""
        try:
            blob = await self._store.get(self._key)
        except NotFound:
            return IncidentScan(incidents=[], damaged_lines=[], torn_tail=False)
        return parse_incidents(blob.data)


def _local_fs(store: BlobStore) -> tuple[FileSystem, Any] | None:
    from streamer.storage.local import LocalStore

    if isinstance(store, LocalStore):
        return store.fs, store.run_sync
    return None


async def check_incident_log(
    store: BlobStore, manifest: WorldManifest, report: CheckReport
) -> None:
    """``ExtraCheck`` for ``check_world``: a damaged incident log is a problem.

    A crash fragment (torn tail) is only a warning: it was never acknowledged.
    """
    from streamer.recovery.check import Problem

    del manifest
    scan = await IncidentLog(store).read()
    if scan.incidents or scan.damaged_lines:
        report.files_checked += 1
    lost = scan.lost_lines
    if lost:
        report.problems.append(
            Problem(
                file=INCIDENTS_KEY,
                fault=f"{len(lost)} damaged line(s) ({_fmt_lines(lost)}); "
                f"{len(scan.incidents)} incident(s) still readable",
                kind="checksum",
            )
        )
    if scan.torn_lines:
        report.warnings.append(
            f"{INCIDENTS_KEY}: crash fragment(s) at line(s) {_fmt_lines(scan.torn_lines)} "
            "(an append interrupted by a crash; never acknowledged)"
        )


def _fmt_lines(lines: list[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:10])
    return shown + (f", ... ({len(lines)} in all)" if len(lines) > 10 else "")
