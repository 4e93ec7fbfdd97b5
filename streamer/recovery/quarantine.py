"""``quarantine/``: files that failed verification, set aside for the operator.

A quarantined file keeps its bytes exactly (``streamer salvage`` reads them) under
``quarantine/<timestamp>-<name>``, e.g. ``quarantine/20260102T030405123456Z-r.0.-1.region``.
The timestamp prefix keeps the last segment from parsing as a region key, so nothing that
lists regions ever mistakes a quarantined copy for a live region.

The copy is made durable before the original is touched: moving a file is "copy, then
delete" (or "copy, then replace by a good copy"), never the reverse, so a crash in between
leaves the evidence twice rather than not at all.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

from streamer.storage.base import BlobStore

__all__ = [
    "QUARANTINE_PREFIX",
    "list_quarantine",
    "quarantine_bytes",
    "quarantine_copy",
    "quarantine_file",
    "quarantine_key",
]

QUARANTINE_PREFIX: Final = "quarantine/"
_STAMP: Final = "%Y%m%dT%H%M%S%fZ"


def quarantine_key(key: str, when: datetime | None = None) -> str:
    """Where ``key`` goes when quarantined at ``when`` (default: now, UTC)."""
    name = key.rpartition("/")[2]
    stamp = (when or datetime.now(UTC)).strftime(_STAMP)
    return f"{QUARANTINE_PREFIX}{stamp}-{name}"


async def _free_key(store: BlobStore, key: str) -> str:
    when = datetime.now(UTC)
    for _ in range(1000):
        candidate = quarantine_key(key, when)
        if candidate not in await store.list(candidate):
            return candidate
        # Two quarantines of one name in the same microsecond: never overwrite evidence.
        when += timedelta(microseconds=1)
    raise RuntimeError(f"no free quarantine name for {key}")  # pragma: no cover


async def quarantine_copy(store: BlobStore, key: str) -> str:
    """Durably copy ``key`` into quarantine (the original stays); return the quarantine key.

    Only for files never modified in place (region files, manifests, snapshots' copies):
    local stores hard-link, and a file appended to later would change the evidence.

    :raises NotFound: ``key`` does not exist.
    :raises StorageUnavailable: the copy failed; nothing was moved.
    """
    dst = await _free_key(store, key)
    await store.copy(key, dst)
    return dst


async def quarantine_bytes(store: BlobStore, key: str, data: bytes) -> str:
    """Durably store ``data`` (the bytes read from ``key``) in quarantine; return its key.

    For files appended in place (journal segments), where a hard link would share later
    appends.
    """
    dst = await _free_key(store, key)
    await store.put_atomic(dst, data)
    return dst


async def quarantine_file(store: BlobStore, key: str) -> str:
    """Move ``key`` into quarantine: durable copy first, then delete the original.

    :raises NotFound: ``key`` does not exist.
    :raises StorageUnavailable: a step failed; the original is still in place unless the
        copy was already durable.
    """
    dst = await quarantine_copy(store, key)
    await store.delete(key)
    return dst


async def list_quarantine(store: BlobStore) -> list[str]:
    """Every quarantined key, oldest first (names start with their timestamp)."""
    return await store.list(QUARANTINE_PREFIX)
