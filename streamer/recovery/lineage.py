"""Which snapshots the world's current state descends from (``snapshots/lineage.json``).

The recovery ladder and ``check --repair`` restore a damaged region from the newest
snapshot copy that verifies. Not every snapshot is an ancestor of the world as it is now:

- ``streamer restore S`` rolls the world back to S: the snapshots taken after S (the
  automatic ``pre-restore`` one first of all) hold a state the operator abandoned;
- ``streamer regenerate`` starts the world over from its seed: every earlier snapshot holds
  dynamic state the operator chose to drop;
- a failed migration rolls back by restoring its ``pre-migration`` snapshot.

Restoring a region from such a snapshot would bring the abandoned state back, and its
higher ``lastProcessedTick`` would hide the edits acknowledged since and refuse new ones.
So the world records its ancestors, newest first: a snapshot prepends itself once complete,
a restore of S sets ``[S] + S.ancestors``, a regenerate sets ``[]``. Only ancestors serve
copies (``snapshots.find_valid_copy``); the others stay listed for the operator.

A world without the file (made before it existed) keeps the old rule: every snapshot. A
damaged file is rebuilt from the snapshots and the incident log (``snapshots.current_lineage``:
the newest of the last snapshot, the last world restore and the last regenerate decides),
reported by ``streamer check`` and rewritten by the next snapshot. A crash between a
snapshot's completion and the lineage update leaves that snapshot out: one copy fewer to
choose from, never a wrong one.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from streamer.errors import NotFound, StreamerError
from streamer.format.sealed import seal, unseal
from streamer.storage.base import BlobStore

__all__ = ["LINEAGE_KEY", "LineageDamaged", "read_lineage", "write_lineage"]

#: Beside the snapshots, not in ``state/``: it describes the snapshot set, so it is never
#: itself snapshotted, restored or counted as a change by a migration's rollback.
LINEAGE_KEY: Final = "snapshots/lineage.json"
#: Ancestors remembered: far more than any ``keep`` in use, so bounded only against
#: unbounded growth.
_KEPT: Final = 1000


class Lineage(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["lineage"] = "lineage"
    schemaVersion: int = 1
    #: Snapshot ids the world's current state descends from, newest first.
    ancestors: list[str] = msgspec.field(default_factory=list)
    checksum: str = ""


class LineageDamaged(Exception):
    """``snapshots/lineage.json`` exists but does not verify (the reason is the message)."""


async def read_lineage(store: BlobStore) -> list[str] | None:
    """The world's ancestor snapshots, newest first; ``None`` when there is no record.

    :raises LineageDamaged: the record exists but does not verify. Callers rebuild the
        lineage from the snapshots and the incident log (``snapshots.current_lineage``)
        rather than treat every snapshot as an ancestor, which would serve abandoned state.
    """
    try:
        blob = await store.get(LINEAGE_KEY)
    except NotFound:
        return None
    try:
        return msgspec.convert(unseal(blob.data, LINEAGE_KEY, "lineage"), Lineage).ancestors
    except (StreamerError, msgspec.ValidationError) as exc:
        raise LineageDamaged(f"{LINEAGE_KEY} is damaged: {exc}") from exc


async def write_lineage(store: BlobStore, ancestors: list[str]) -> None:
    """Record ``ancestors`` (newest first) durably."""
    await store.put_atomic(LINEAGE_KEY, seal(Lineage(ancestors=ancestors[:_KEPT])))
