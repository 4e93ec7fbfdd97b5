"""The runtime's side of recovery: what ``World`` does when a region file fails verification.

The recovery ladder itself (``recovery/ladder.py``) decides and records: restore the newest
valid snapshot copy, or quarantine the file and mark the region inactive. This module makes
the running world consistent with that decision.

**Restored.** The snapshot copy is older than the damaged file: its lastProcessedTick ``S``
is below what the region had folded. Every acknowledged delta of the region with
``tick > S`` that is still in the journal is re-applied: at open, replay does it by itself
(it keeps the records above the installed region's lpt); while running, the live journal
segments are read back and the region's records in ``(S, old lpt]`` are queued in front of
whatever is queued, before the region becomes visible to other tasks (so no new delta can
slip in between and break the tick order). The queue's lpt is lowered to ``S`` first, so
journal collection keeps those segments until the region is folded past them again.
Deltas whose segments were already deleted are gone: ``journal_loss.judge_restore`` tells,
from ``state/journal_drops.json`` (written before any segment is deleted) and the damaged
file's header, whether any of the region's deltas above ``S`` left that way; a ``data_loss``
incident says which ticks, and ``RegionRestored.lost`` says it too ("unknown: ..." when the
world keeps no usable record). The loss is logged and announced even when the incident
cannot be appended, and the region stays installed: the load succeeds.
Cached chunks of the region are dropped, so nothing is served that storage no longer holds.

**Inactive.** The region joins ``World._inactive``; ``chunk``/``submit`` refuse it with
``RegionInactive``; its journal records are dropped at replay (the ladder's ``data_loss``
incident counts those above the damaged file's tick; the event's reason counts them all).
Player characters indexed in it are moved out by ``relocation.PlayerRelocator``.

**Scrub found a damaged file of a region held in memory.** The runtime holds that region's
verified content (what it last read or wrote), so the damaged bytes are quarantined and the
file is rewritten from memory as a new generation: nothing is lost, nothing is regenerated.
Regions not in memory go through the ladder exactly as a chunk load would.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
import anyio.to_thread
import msgspec

from streamer.coords import region_chunks
from streamer.errors import (
    IntegrityError,
    NotFound,
    RegionInactive,
    StreamerError,
)
from streamer.format.journal import parse_segment_name, scan_frames, segment_keys
from streamer.format.region import decode_region, region_key
from streamer.recovery.inactive import load_inactive
from streamer.recovery.incidents import IncidentLog
from streamer.recovery.journal_loss import judge_and_record
from streamer.recovery.ladder import RecoveryOutcome, recover_region
from streamer.recovery.quarantine import quarantine_bytes
from streamer.recovery.snapshots import finish_interrupted_restore
from streamer.runtime.events import (
    EventHub,
    RegionInactiveEvent,
    RegionRestored,
)
from streamer.runtime.journal import JournalBatch, decode_batch
from streamer.runtime.queues import ChunkDelta, Queued, RegionKey
from streamer.runtime.regionstate import RegionState, fold_region, region_state_from_bytes
from streamer.runtime.relocation import PlayerRelocator
from streamer.storage.local import LocalStore

if TYPE_CHECKING:
    from streamer.runtime.world import World

__all__ = ["RecoveryCounters", "RecoveryHooks", "RecoveryStats"]

log = logging.getLogger(__name__)

_JOURNAL_BATCH: Final = 16


class RecoveryStats(msgspec.Struct, frozen=True, kw_only=True):
    """Recovery metrics in ``WorldStats.recovery``."""

    regions_restored: int = 0
    regions_rewritten_from_memory: int = 0
    regions_inactive: int = 0
    regions_inactivated: int = 0
    players_relocated: int = 0
    journal_reapplied: int = 0
    scrub_passes: int = 0
    regions_scrubbed: int = 0
    scrub_alerts: int = 0
    alert_command_failures: int = 0
    snapshots_taken: int = 0
    snapshot_errors: int = 0
    events_emitted: int = 0
    events_dropped: int = 0


@dataclass
class RecoveryCounters:
    regions_restored: int = 0
    regions_rewritten_from_memory: int = 0
    regions_inactivated: int = 0
    journal_reapplied: int = 0
    scrub_passes: int = 0
    regions_scrubbed: int = 0
    scrub_alerts: int = 0
    alert_command_failures: int = 0
    snapshots_taken: int = 0
    snapshot_errors: int = 0


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _journal_items(
    segments: Sequence[tuple[str, bytes]],
    route: Any,
    region: RegionKey,
    after: int,
    upto: float,
) -> list[Queued]:
    """The region's journaled deltas with ``after < tick <= upto``, in journal order.

    Worker-thread half of :meth:`RecoveryHooks._read_journal` (CPU only).
    """
    out: list[Queued] = []
    for name, data in segments:
        for payload in scan_frames(data).payloads:
            try:
                batch: JournalBatch = decode_batch(payload, where=name)
            except StreamerError as exc:
                # Replay at open refused such a frame already; it can hold nothing acknowledged.
                log.warning("%s: skipping an undecodable journal frame: %s", name, exc)
                continue
            for delta in batch.deltas:
                for r, chunk, d in route(delta):
                    if r == region and after < d.tick <= upto:
                        out.append(Queued(d.tick, chunk, d))
    return out


def _write_blocking(
    state_chunks: Mapping[tuple[int, int], bytes], **kw: Any
) -> tuple[bytes, int, dict[tuple[int, int], bytes]]:
    res = fold_region(state_chunks, items=[], upgraded=(), **kw)
    return res.data, res.generation, res.chunks


class RecoveryHooks:
    """Recovery state and work of one ``World`` (see the module docstring)."""

    def __init__(self, world: World) -> None:
        self._world = world
        self.hub = EventHub()
        self.counters = RecoveryCounters()
        self._incidents: IncidentLog | None = None
        self.relocator = PlayerRelocator(world, self.hub, lambda: self.incidents)
        self.outcomes: dict[RegionKey, RecoveryOutcome] = {}

    # -- open -----------------------------------------------------------------------------

    async def open(self, store: LocalStore) -> bool:
        """Finish an interrupted restore, then load the inactive regions.

        Runs before anything reads a region. True if a restore was finished (the caller then
        re-reads the manifest, which the restore may have replaced).

        :raises SnapshotError: an interrupted restore cannot be finished.
        :raises IntegrityError: ``state/inactive.json`` is damaged (fail closed: serving an
            inactive region as pristine would bury the operator's evidence under new edits;
            ``streamer check --repair`` rebuilds it).
        """
        self._incidents = IncidentLog(store)
        finished = await finish_interrupted_restore(store)
        if finished is not None:
            log.warning(
                "%s: finished the interrupted restore of snapshot %s (incident %s)",
                self._world.path,
                finished.snapshot,
                finished.incident,
            )
        inactive = await load_inactive(store)
        self._world._inactive.update(inactive)
        self.relocator.request(inactive)
        for (rx, ry), entry in sorted(inactive.items()):
            log.warning(
                "region (%d, %d) is inactive since %s (incident %s): %s",
                rx,
                ry,
                entry.since,
                entry.incident,
                entry.reason,
            )
        return finished is not None

    @property
    def incidents(self) -> IncidentLog:
        assert self._incidents is not None, "RecoveryHooks.open() not called"
        return self._incidents

    def note_dropped(self, region: RegionKey, d: ChunkDelta) -> None:
        """Replay dropped ``d`` because ``region`` is inactive: remember player characters."""
        self.relocator.note_dropped(region, d)

    # -- load failures --------------------------------------------------------------------

    async def recover_loaded(
        self, failed: dict[RegionKey, Exception], keys: Iterable[RegionKey]
    ) -> None:
        """Run the ladder for every region of ``keys`` that failed verification.

        Called by ``World._ensure_regions`` while it still holds those regions' loading
        slots, so concurrent loaders wait for the outcome instead of racing it. Restored
        regions are installed and leave ``failed``; inactive ones get ``RegionInactive``.
        """
        world = self._world
        store = world._store
        manifest = world._manifest
        assert store is not None and manifest is not None
        for key in keys:
            err = failed.get(key)
            if not isinstance(err, IntegrityError):
                continue
            try:
                await self._recover_one(key, err, failed)
            except StreamerError as exc:
                # One region's failure (a full disk, say) must not keep the others of the
                # batch from their ladder; this one stays failed with the error that stopped it.
                log.error("region %s: recovery failed: %s", key, exc)
                failed[key] = exc

    async def _recover_one(
        self, key: RegionKey, err: IntegrityError, failed: dict[RegionKey, Exception]
    ) -> None:
        world = self._world
        store = world._store
        manifest = world._manifest
        assert store is not None and manifest is not None
        outcome = await recover_region(
            store, key[0], key[1], err, manifest=manifest, incidents=self.incidents
        )
        self.outcomes[key] = outcome
        if outcome.action == "inactive":
            failed[key] = await self._inactivated(key, outcome)
            return
        try:
            blob = await store.get(region_key(*key))
            data: bytes | None = blob.data
        except NotFound:
            data = None
        try:
            state = await anyio.to_thread.run_sync(
                region_state_from_bytes, data, key, limiter=world._cpu_limiter
            )
        except StreamerError as still_bad:
            failed[key] = still_bad
            return
        await self._install_restored(state, outcome)
        # Installed: the load succeeded, whatever reporting the loss did below.
        del failed[key]

    async def _read_journal(
        self, region: RegionKey, after: int, upto: float
    ) -> tuple[list[Queued], list[int]]:
        """The region's journaled deltas in ``(after, upto]``, and the segments read."""
        store = self._world._store
        assert store is not None
        names = segment_keys(await store.list("journal/"))
        segments: list[tuple[str, bytes]] = []
        seqs: list[int] = []
        for i in range(0, len(names), _JOURNAL_BATCH):
            batch = names[i : i + _JOURNAL_BATCH]
            for name, blob in zip(batch, await store.get_many(batch), strict=True):
                seq = parse_segment_name(name.rpartition("/")[2])
                # None: collected meanwhile; journal_drops recorded what it held first.
                if blob is not None and seq is not None:
                    segments.append((name, blob.data))
                    seqs.append(seq)
        items = await anyio.to_thread.run_sync(
            _journal_items, segments, self._world._route, region, after, upto
        )
        return items, seqs

    async def _install_restored(self, state: RegionState, outcome: RecoveryOutcome) -> None:
        # Shielded: once the queue's lpt is lowered, stopping before the region is installed
        # would leave the next load unable to tell which journal records to re-apply.
        with anyio.CancelScope(shield=True):
            await self._install_restored_shielded(state, outcome)

    async def _install_restored_shielded(
        self, state: RegionState, outcome: RecoveryOutcome
    ) -> None:
        world = self._world
        key = state.key
        q = world._queues.get(key)
        upto: float = math.inf if q is None else q.lpt
        q = world._queues.add(key, state.lpt)
        # Lowered before reading the journal: collection must now keep every segment holding
        # this region's records above the restored tick.
        q.lpt = state.lpt
        items, seqs = await self._read_journal(key, state.lpt, upto)
        opening = world._tg is None
        # No await from here on: the region becomes visible with its queue complete.
        world._install_region(state)
        if not opening:
            # At open, replay queues these itself (it keeps every record above the lpt).
            rest = list(q.entries)
            q.entries.clear()
            q.per_chunk.clear()
            q.dirty_since = None
            for item in [*items, *rest]:
                q.push(item)
            if items:
                q.hwm = max(q.hwm, items[-1].tick)
                world._flush_wake.set()
        self._drop_cached(key)
        self.counters.regions_restored += 1
        self.counters.journal_reapplied += len(items)
        await self._report_restore(key, outcome, state.lpt, items, seqs)

    async def _report_restore(
        self,
        key: RegionKey,
        outcome: RecoveryOutcome,
        restored: int,
        items: list[Queued],
        seqs: list[int],
    ) -> None:
        """Log, record and announce what the journal could not give back.

        Called once the region is installed, and never raises a ``StreamerError``: a loss
        whose ``data_loss`` incident cannot be appended is still logged and sent as an event,
        and the log says the incident is missing.
        """
        store = self._world._store
        assert store is not None
        verdict, inc, unrecorded = await judge_and_record(
            store,
            self.incidents,
            region=key,
            outcome=outcome,
            snapshot_lpt=restored,
            reapplied=[i.tick for i in items],
            segments_read=seqs,
        )
        incidents = list(outcome.incidents)
        if inc is not None:
            incidents.append(inc.id)
        line = (
            f"region {key} restored from snapshot {outcome.snapshot} (lpt {restored}); "
            f"{len(items)} journaled delta(s) re-applied"
        )
        if unrecorded is not None:
            log.error(
                "%s; DATA LOST: %s; the data_loss incident could NOT be recorded (%s): this "
                "log line and the region_restored event are the only report",
                line,
                verdict.text,
                unrecorded,
            )
        elif verdict.text:
            log.warning("%s; lost: %s", line, verdict.text)
        else:
            log.warning("%s; nothing lost: the journal holds every later delta", line)
        self.hub.emit(
            RegionRestored(
                region=key,
                source="snapshot",
                snapshot=outcome.snapshot,
                quarantine=outcome.quarantine,
                reapplied=len(items),
                lost=verdict.text,
                incidents=incidents,
            )
        )

    async def _inactivated(self, key: RegionKey, outcome: RecoveryOutcome) -> RegionInactive:
        world = self._world
        world._inactive.add(key)
        q = world._queues.regions.get(key)
        if q is not None and q.clean:
            del world._queues.regions[key]
        self._drop_cached(key)
        if outcome.quarantine is not None:
            self.relocator.quarantined[key] = outcome.quarantine
        reason = outcome.message
        try:
            # Read now: once the region has no queue, journal collection may delete these.
            items, _ = await self._read_journal(key, -1, math.inf)
        except StreamerError as exc:
            log.warning("region %s: cannot read the journal for its players: %s", key, exc)
            reason += f"; its journaled deltas could not be counted ({exc})"
        else:
            for item in items:
                self.note_dropped(key, item.delta)
            # Never folded into the damaged file: lost with the region on top of it (counted
            # in the ladder's data_loss incident too; deltas acknowledged since are not).
            above = outcome.damaged_last_processed_tick
            ticks = [i.tick for i in items if above is None or i.tick > above]
            if ticks:
                where = "" if above is None else f" above tick {above}"
                reason += (
                    f"; {len(ticks)} journaled delta(s){where} (ticks {min(ticks)} to "
                    f"{max(ticks)}) are dropped"
                )
                log.error("region %s inactive: %s", key, reason)
        self.counters.regions_inactivated += 1
        self.hub.emit(
            RegionInactiveEvent(
                region=key,
                reason=reason,
                quarantine=outcome.quarantine,
                incidents=list(outcome.incidents),
            )
        )
        self.relocator.request([key])
        return RegionInactive(key[0], key[1], outcome.message)

    def _drop_cached(self, key: RegionKey) -> None:
        world = self._world
        for ck in region_chunks(key[0], key[1], world._region_size):
            world._cache.invalidate(ck)

    # -- scrub findings -------------------------------------------------------------------

    async def repair_after_scrub(
        self, key: RegionKey, err: IntegrityError, data: bytes
    ) -> dict[str, Any]:
        """A scrub read ``data`` for region ``key`` and it failed with ``err``: repair.

        Returns what was done, for the alert.
        """
        world = self._world
        if key in world._regions:
            return await self._rewrite_from_memory(key, err, data)
        failed = await world._ensure_regions([key])
        outcome = self.outcomes.get(key)
        if key in failed:
            return {
                "action": "inactive" if key in world._inactive else "failed",
                "error": str(failed[key]),
                "incidents": [] if outcome is None else list(outcome.incidents),
                "quarantine": None if outcome is None else outcome.quarantine,
            }
        return {
            "action": "restored" if outcome is not None else "verifies_on_reread",
            "snapshot": None if outcome is None else outcome.snapshot,
            "incidents": [] if outcome is None else list(outcome.incidents),
            "quarantine": None if outcome is None else outcome.quarantine,
        }

    async def _rewrite_from_memory(
        self, key: RegionKey, err: IntegrityError, data: bytes
    ) -> dict[str, Any]:
        world = self._world
        store = world._store
        gen, codec, manifest = world._gen, world._codec, world._manifest
        assert store is not None and gen is not None and codec is not None and manifest
        path = region_key(*key)
        lock = world._flush_lock(key)
        async with lock, world._flush_limiter:
            state = world._regions.get(key)
            if state is None:
                return {"action": "none", "note": "region left memory meanwhile; next load checks"}
            try:
                current = (await store.get(path)).data
            except NotFound:
                current = None
            if current is not None and current != data:
                try:
                    await anyio.to_thread.run_sync(_decode_quiet, current, key, path)
                except IntegrityError:
                    data = current
                else:
                    # A flush replaced the damaged file meanwhile; keep the evidence anyway.
                    qkey = await quarantine_bytes(store, path, data)
                    return {"action": "replaced_by_flush", "quarantine": qkey}
            qkey = await quarantine_bytes(store, path, data)
            new, generation, chunks = await anyio.to_thread.run_sync(
                partial(
                    _write_blocking,
                    state.chunks,
                    key=key,
                    generation=state.generation,
                    lpt=state.lpt,
                    codec=codec,
                    gen=gen,
                    writer=world._writer_id,
                    encoding=manifest.encoding,
                    region_size=world._region_size,
                ),
                limiter=world._cpu_limiter,
            )
            await store.put_atomic(path, new)
            state.generation = generation
            state.chunks = chunks
        when = _now_iso()
        inc = await self.incidents.record(
            "checksum_failure",
            region=key,
            file=path,
            details={
                "detected_at": when,
                "detected_by": "scrub",
                "expected": err.expected,
                "actual": err.actual,
                "error": str(err),
                "quarantine": qkey,
                "rewritten_generation": generation,
                "last_processed_tick": state.lpt,
            },
            action=(
                f"the runtime held region {key}'s verified content in memory and rewrote "
                f"{path} from it (generation {generation}); nothing lost; damaged bytes kept "
                f"in {qkey}"
            ),
        )
        self.counters.regions_rewritten_from_memory += 1
        log.error(
            "checksum failure on %s at %s (expected %s, actual %s); rewritten from memory, "
            "damaged bytes in %s",
            path,
            when,
            err.expected,
            err.actual,
            qkey,
        )
        self.hub.emit(
            RegionRestored(region=key, source="memory", quarantine=qkey, incidents=[inc.id])
        )
        return {"action": "rewritten_from_memory", "quarantine": qkey, "incidents": [inc.id]}

    def start(self, tg: anyio.abc.TaskGroup) -> None:
        self.relocator.start(tg)

    # -- stats ----------------------------------------------------------------------------

    def stats(self) -> RecoveryStats:
        c = self.counters
        return RecoveryStats(
            regions_restored=c.regions_restored,
            regions_rewritten_from_memory=c.regions_rewritten_from_memory,
            regions_inactive=len(self._world._inactive),
            regions_inactivated=c.regions_inactivated,
            players_relocated=self.relocator.relocated,
            journal_reapplied=c.journal_reapplied,
            scrub_passes=c.scrub_passes,
            regions_scrubbed=c.regions_scrubbed,
            scrub_alerts=c.scrub_alerts,
            alert_command_failures=c.alert_command_failures,
            snapshots_taken=c.snapshots_taken,
            snapshot_errors=c.snapshot_errors,
            events_emitted=self.hub.emitted,
            events_dropped=self.hub.dropped,
        )


def _decode_quiet(data: bytes, key: RegionKey, path: str) -> None:
    decode_region(data, rx=key[0], ry=key[1], path=path)
