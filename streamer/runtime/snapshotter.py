"""Snapshots taken by the running world: on demand (``World.snapshot``) and on a schedule.

A snapshot must be a consistent cut: ``create_snapshot`` verifies each source, copies it
and re-reads the copy, and refuses if anything changed in between. So the world is first
flushed completely (every acknowledged delta folded, passed journal segments deleted, all
but a segment being written to under ``Journal.COLLECT_ACTIVE_BYTES``), then *paused* while
the snapshot is made:

- every token of the world's flush limiter is held, so no region file is rewritten (a
  running flush finishes first);
- the journal is paused (``Journal.paused``), so the writer appends nothing and segment
  collection (and the ``players.idx`` write that follows it) waits.

Submits keep being accepted meanwhile but are acknowledged only after the pause (their
journal write waits), so what the snapshot holds is exactly: region files + journal =
every delta acknowledged before the pause. The pause lasts as long as the copy, which is
why the flush comes first: it leaves little journal to copy. A snapshot's region copy is
never a link to the world's own file (``recovery/snapshots.py``): regions unchanged since
the last snapshot are links to its copies, and the others are copied ahead, between the
flush and the pause (``stage_copies``), so the pause links those too and writes only the
regions rewritten in between.

Something outside the pause can still change a file (the recovery ladder restoring a
region, a ``players.idx`` write already in progress): the snapshot then fails with
``SnapshotError`` and is retried a few times before the error surfaces.

A scheduled snapshot that fails is logged, recorded (``snapshot_failed`` incident) and
counted; the next interval tries again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

import anyio

from streamer.config import SnapshotSettings
from streamer.errors import SnapshotError, StreamerError, WorldClosed
from streamer.recovery.snapshots import SnapshotInfo, create_snapshot, stage_copies
from streamer.runtime.events import SnapshotTaken

if TYPE_CHECKING:
    from streamer.runtime.world import World

__all__ = ["Snapshotter"]

log = logging.getLogger(__name__)

_ATTEMPTS: Final = 3


class Snapshotter:
    def __init__(self, world: World, settings: SnapshotSettings) -> None:
        self._world = world
        self.settings = settings
        #: One snapshot (or snapshot verification by the scrubber) at a time.
        self.lock = anyio.Lock()

    async def run(self) -> None:
        """Take a snapshot every ``interval_s`` until cancelled (in the world's task group)."""
        while True:
            await anyio.sleep(self.settings.interval_s)
            try:
                await self.snapshot(reason="scheduled")
            except WorldClosed:
                return
            except StreamerError as exc:
                recovery = self._world._recovery
                log.error(
                    "scheduled snapshot failed (next try in %ss): %s", self.settings.interval_s, exc
                )
                try:
                    await recovery.incidents.record(
                        "snapshot_failed",
                        details={"reason": "scheduled", "error": str(exc)},
                        action="`streamer check` names the file at fault; the next scheduled "
                        "snapshot retries",
                    )
                except StreamerError as rec_exc:
                    log.error("cannot record the snapshot_failed incident: %s", rec_exc)

    async def snapshot(self, *, reason: str) -> SnapshotInfo:
        world = self._world
        recovery = world._recovery
        async with self.lock:
            try:
                for attempt in range(1, _ATTEMPTS + 1):
                    await world.flush()
                    store = world._store
                    assert store is not None
                    # Written now, linked during the pause: acknowledgements wait for links
                    # only (and copies of regions rewritten between the two).
                    await stage_copies(store)
                    try:
                        async with self._paused():
                            info = await create_snapshot(
                                store, keep=self.settings.keep, reason=reason
                            )
                        break
                    except SnapshotError as exc:
                        if attempt == _ATTEMPTS:
                            raise
                        log.warning("snapshot attempt %d failed, retrying: %s", attempt, exc)
            except StreamerError:
                recovery.counters.snapshot_errors += 1
                raise
        recovery.counters.snapshots_taken += 1
        log.info("snapshot %s taken (%s, %d files)", info.id, reason, info.file_count)
        recovery.hub.emit(
            SnapshotTaken(
                snapshot=info.id, reason=reason, files=info.file_count, bytes=info.total_bytes
            )
        )
        return info

    @contextlib.asynccontextmanager
    async def _paused(self) -> AsyncIterator[None]:
        world = self._world
        journal = world._journal
        assert journal is not None
        limiter = world._flush_limiter
        borrowers: list[object] = []
        try:
            for _ in range(int(limiter.total_tokens)):
                b = object()
                await limiter.acquire_on_behalf_of(b)
                borrowers.append(b)
            # Neither the writer nor segment collection may run during the copy.
            async with journal.paused():
                yield
        finally:
            for b in borrowers:
                limiter.release_on_behalf_of(b)
