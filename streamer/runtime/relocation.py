"""Moving player characters out of inactive regions.

When a region becomes inactive (``recovery_hooks``: its file was quarantined with no valid
copy), the players indexed in it are moved by a worker in the world's task group
(:meth:`PlayerRelocator.run`): to the spawn point of the nearest active region (square rings
outward), else the world spawn, with an ``EntityUpsert`` submitted like any delta (journaled,
so durable and replayed), and a ``PlayerRelocated`` event. The record moved is the newest
copy found: the journal, then cached chunks, then what salvage reads from the quarantined
file; failing all of that a fresh character is created (``reason`` says ``record_lost``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

import anyio
import anyio.abc
import anyio.to_thread
import msgspec

from streamer.coords import region_chunks
from streamer.errors import DeltaError, RegionInactive, StreamerError, WorldClosed
from streamer.recovery.incidents import IncidentLog
from streamer.recovery.rebuild import region_in_bounds
from streamer.recovery.salvage import salvage_bytes
from streamer.runtime.events import EventHub, PlayerRelocated
from streamer.runtime.queues import ChunkDelta, RegionKey
from streamer.schema.deltas import EntityRemove, EntityUpsert
from streamer.schema.records import Character

if TYPE_CHECKING:
    from streamer.runtime.world import World

__all__ = ["LANDING_RINGS", "RELOCATE_RETRY_S", "PlayerRelocator"]

log = logging.getLogger(__name__)

#: Rings of regions searched for an active landing region before the world spawn is used.
LANDING_RINGS: Final = 8
#: Attempts to find a tick the landing region accepts (concurrent submits may move it).
_TICK_ATTEMPTS: Final = 8
#: A relocation that failed (storage trouble) is retried after this long.
RELOCATE_RETRY_S: Final = 5.0


def _salvage_players(data: bytes, source: str, region: RegionKey) -> dict[str, Character]:
    """Player characters whose chunk frames still verify in a quarantined region file."""
    records, _, _ = salvage_bytes(data, source=source)
    found: dict[str, Character] = {}
    for rec in records:
        if rec.region != region or rec.type != "character":
            continue
        pid = rec.record.get("player_id")
        if not isinstance(pid, str):
            continue
        try:
            found[pid] = msgspec.convert(rec.record, Character)
        except msgspec.ValidationError:
            continue  # an older schema version: salvage still lists it for the operator
    return found


class PlayerRelocator:
    """Relocation state and worker of one ``World`` (see the module docstring)."""

    def __init__(self, world: World, hub: EventHub, incidents: Callable[[], IncidentLog]) -> None:
        self._world = world
        self._hub = hub
        self._incidents = incidents
        # Regions whose players must be moved out, and the worker's wake-up.
        self._pending: set[RegionKey] = set()
        self._wake = anyio.Event()
        # Newest known player characters of inactive regions (from the journal): player id
        # -> character, or None once the journal removed that entity from the region.
        self._last_known: dict[RegionKey, dict[str, Character | None]] = {}
        #: Where each region's damaged file went (its players may be salvaged from it).
        self.quarantined: dict[RegionKey, str] = {}
        self.relocated = 0

    def request(self, regions: Iterable[RegionKey]) -> None:
        """Move the players out of ``regions`` (inactive now) as soon as the worker can."""
        self._pending.update(regions)
        self._wake.set()

    def note_dropped(self, region: RegionKey, d: ChunkDelta) -> None:
        """Replay dropped ``d`` because ``region`` is inactive: remember player characters."""
        known = self._last_known.setdefault(region, {})
        if isinstance(d, EntityUpsert) and d.character.player_id is not None:
            known[d.character.player_id] = d.character
        elif isinstance(d, EntityRemove):
            for pid, ch in list(known.items()):
                if ch is not None and ch.id == d.entity_id:
                    known[pid] = None

    def start(self, tg: anyio.abc.TaskGroup) -> None:
        tg.start_soon(self.run, name="recovery-relocator")

    async def run(self) -> None:
        """Relocate players out of inactive regions until the world closes."""
        while True:
            if not self._pending:
                await self._wake.wait()
            self._wake = anyio.Event()
            todo, self._pending = sorted(self._pending), set()
            retry: set[RegionKey] = set()
            for region in todo:
                try:
                    await self.relocate_players(region)
                except WorldClosed:
                    return
                except StreamerError as exc:
                    log.error(
                        "relocating players out of inactive region %s failed (retrying in "
                        "%.0f s): %s",
                        region,
                        RELOCATE_RETRY_S,
                        exc,
                    )
                    retry.add(region)
            if retry:
                self._pending |= retry
                await anyio.sleep(RELOCATE_RETRY_S)

    async def relocate_players(self, region: RegionKey) -> list[PlayerRelocated]:
        """Move every player indexed in ``region`` out of it (idempotent)."""
        world = self._world
        # PlayerIndex has no iteration API; the map is read, never changed, here.
        players = sorted(p for p, r in world._players._regions.items() if r == region)
        done: list[PlayerRelocated] = []
        if not players:
            return done
        salvaged = await self._salvaged_players(region)
        for pid in players:
            if world._players.get(pid) != region:
                continue  # moved meanwhile
            ev = await self._relocate_one(region, pid, salvaged)
            done.append(ev)
        return done

    async def _salvaged_players(self, region: RegionKey) -> dict[str, Character]:
        store = self._world._store
        assert store is not None
        qkey = self.quarantined.get(region)
        if qkey is None:
            qkey = await self._quarantine_from_incidents(region)
        if qkey is None:
            return {}
        try:
            data = (await store.get(qkey)).data
        except StreamerError as exc:
            log.warning("region %s: cannot read quarantined %s: %s", region, qkey, exc)
            return {}
        return await anyio.to_thread.run_sync(_salvage_players, data, qkey, region)

    async def _quarantine_from_incidents(self, region: RegionKey) -> str | None:
        found: str | None = None
        for inc in (await self._incidents().read()).incidents:
            if inc.region == region and inc.kind in ("data_loss", "region_inactive"):
                q = inc.details.get("quarantine")
                if isinstance(q, str):
                    found = q
        return found

    def _known_character(
        self, region: RegionKey, pid: str, salvaged: dict[str, Character]
    ) -> Character | None:
        world = self._world
        known = self._last_known.get(region, {})
        if pid in known:
            return known[pid]
        for ck in region_chunks(region[0], region[1], world._region_size):
            chunk = world._cache.peek(ck)
            if chunk is None:
                continue
            for c in chunk.entities:
                if c.player_id == pid:
                    return c
        return salvaged.get(pid)

    async def _relocate_one(
        self, region: RegionKey, pid: str, salvaged: dict[str, Character]
    ) -> PlayerRelocated:
        world = self._world
        found = self._known_character(region, pid, salvaged)
        reason = "region_inactive"
        if found is None:
            # Learned from upserts applied this session; otherwise a stable made-up id.
            eid = next((e for e, p in world._players._entities.items() if p == pid), None)
            found = Character(id=eid or f"player:{pid}", x=0, y=0, player_id=pid)
            reason += ",record_lost"
            from_pos = None
        else:
            from_pos = (found.x, found.y)
        for _ in range(_TICK_ATTEMPTS):
            target, (x, y) = await self._landing(region)
            q = world._queues.get(target)
            if q is None:
                continue  # evicted between choosing and here: choose again
            tick = max(q.hwm, q.floor + 1, 0)
            moved = msgspec.structs.replace(found, x=x, y=y)
            try:
                await world.submit([EntityUpsert(tick=tick, character=moved)])
            except RegionInactive:
                continue
            except DeltaError:
                continue  # another submit moved the region's ticks on: pick again
            break
        else:
            raise DeltaError(f"player {pid}: no landing region accepted the relocation")
        self._last_known.get(region, {}).pop(pid, None)
        self.relocated += 1
        ev = PlayerRelocated(
            player_id=pid,
            entity_id=moved.id,
            from_region=region,
            from_pos=from_pos,
            to=(x, y),
            to_region=target,
            reason=reason,
        )
        log.warning(
            "player %s (entity %s) relocated from inactive region %s to %s in region %s%s",
            pid,
            moved.id,
            region,
            (x, y),
            target,
            " (character record lost: created afresh)" if from_pos is None else "",
        )
        self._hub.emit(ev)
        return ev

    async def _landing(self, origin: RegionKey) -> tuple[RegionKey, tuple[int, int]]:
        """The nearest active region's spawn point (rings outward), else the world spawn."""
        world = self._world
        gen, manifest = world._gen, world._manifest
        assert gen is not None and manifest is not None
        rs = world._region_size
        ox, oy = origin
        for ring in range(1, LANDING_RINGS + 1):
            ring_keys = [
                (ox + dx, oy + dy)
                for dy in range(-ring, ring + 1)
                for dx in range(-ring, ring + 1)
                if max(abs(dx), abs(dy)) == ring
            ]
            ring_keys.sort(key=lambda k: ((k[0] - ox) ** 2 + (k[1] - oy) ** 2, k[1], k[0]))
            for cand in ring_keys:
                if cand in world._inactive or not region_in_bounds(manifest, *cand):
                    continue
                defaults = await anyio.to_thread.run_sync(
                    gen.region_defaults, cand[0], cand[1], rs, limiter=world._cpu_limiter
                )
                spawn = defaults.spawn
                land = world._region_of_point(*spawn)[0]
                if land in world._inactive or not self._in_world(*spawn):
                    continue
                if not await world._ensure_regions([land]):
                    return land, spawn
        spawn = await anyio.to_thread.run_sync(gen.world_spawn, limiter=world._cpu_limiter)
        land = world._region_of_point(*spawn)[0]
        if land in world._inactive or await world._ensure_regions([land]):
            raise RegionInactive(*land, "no active region near enough, and not the world spawn's")
        return land, spawn

    def _in_world(self, x: int, y: int) -> bool:
        try:
            self._world._check_point(x, y, "spawn")
        except DeltaError:
            return False
        return True
