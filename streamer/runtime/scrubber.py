"""The background scrubber: re-verify every region file while the world is idle.

Every ``scrub.interval_s`` seconds (0 disables it) one pass reads each region file and
verifies it completely (``decode_region``: header, trailer, every chunk checksum). A pass
never competes with players:

- **idle only**: before each region it waits until the chunk loader has nothing queued or
  in flight and has seen no new request for ``idle_s`` (loads are what players wait for);
- **rate-limited**: at most ``regions_per_s`` regions per second (a token spacing of
  ``1 / regions_per_s``; the first region of a pass goes at once).

A file that fails is repaired the way a load would repair it (``RecoveryHooks``: the ladder,
or a rewrite from memory when the runtime holds the region) and raises an alert. A pass
also alerts when fewer than ``snapshots.min_valid`` snapshots verify. Every alert is:

1. a log line (``ERROR`` on ``streamer.runtime.scrubber``),
2. a ``scrub_alert`` incident,
3. a counter (``WorldStats.recovery.scrub_alerts``) and a ``ScrubAlert`` event,
4. ``scrub.alert_command`` if set: split like a shell command line (no shell), run with the
   alert as JSON on stdin, killed after ``ALERT_TIMEOUT_S``; a failing command is logged and
   counted, never fatal. It runs shielded from cancellation (within that timeout), so an
   alert raised just before the world closes still reaches the operator.

Clock and sleep are injectable so tests can check the pacing without wall time.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread

from streamer.config import ScrubSettings
from streamer.errors import IntegrityError, NotFound, StreamerError
from streamer.format.region import decode_region, parse_region_key, region_key
from streamer.recovery.snapshots import is_valid_snapshot, list_snapshots
from streamer.runtime.events import ScrubAlert

if TYPE_CHECKING:
    from streamer.runtime.world import World

__all__ = ["ALERT_TIMEOUT_S", "ScrubPass", "Scrubber"]

log = logging.getLogger(__name__)

#: An alert command still running after this long is killed (and the failure logged).
ALERT_TIMEOUT_S: Final = 10.0
#: No chunk-load request for this long counts as idle.
IDLE_S: Final = 0.2
_IDLE_POLL_S: Final = 0.05

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class ScrubPass:
    """What one pass did."""

    def __init__(self) -> None:
        self.verified: list[tuple[int, int]] = []
        self.failed: list[tuple[int, int]] = []
        self.alerts: list[ScrubAlert] = []
        self.valid_snapshots: int | None = None


class Scrubber:
    def __init__(
        self,
        world: World,
        settings: ScrubSettings,
        *,
        min_valid_snapshots: int,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
        idle_s: float = IDLE_S,
    ) -> None:
        self._world = world
        self.settings = settings
        self.min_valid = min_valid_snapshots
        self._clock = clock
        self._sleep = sleep
        self._idle_s = idle_s
        self._next_at = -float("inf")
        self._seen: tuple[int, int, int] | None = None
        self._seen_at = -float("inf")

    async def run(self) -> None:
        """Scrub every ``interval_s`` until cancelled (the world's task group owns this)."""
        interval = self.settings.interval_s
        while True:
            await self._sleep(interval)
            try:
                await self.scrub_pass()
            except StreamerError as exc:
                # Storage trouble mid-pass: say so, keep the scrubber alive for the next one.
                await self.alert("scrub_error", f"scrub pass failed: {exc}", details={})

    async def scrub_pass(self) -> ScrubPass:
        world = self._world
        store = world._store
        assert store is not None
        done = ScrubPass()
        keys = [k for k in await store.list("regions/") if _canonical(k) is not None]
        for key in keys:
            region = _canonical(key)
            assert region is not None
            if region in world._inactive:
                continue  # its file is gone; the inactive list and incidents say why
            await self._wait_idle()
            await self._pace()
            try:
                data = (await store.get(key)).data
            except NotFound:
                continue  # replaced or removed since the listing: nothing to verify
            try:
                await anyio.to_thread.run_sync(
                    _verify, data, region, key, limiter=world._cpu_limiter
                )
            except IntegrityError as err:
                done.failed.append(region)
                done.alerts.append(await self._region_failed(region, key, err, data))
            else:
                done.verified.append(region)
            world._recovery.counters.regions_scrubbed += 1
        if self.min_valid > 0:
            done.valid_snapshots = await self._valid_snapshots()
            if done.valid_snapshots < self.min_valid:
                done.alerts.append(
                    await self.alert(
                        "snapshots_below_min",
                        f"only {done.valid_snapshots} valid snapshot(s), fewer than the "
                        f"minimum of {self.min_valid}",
                        details={"valid": done.valid_snapshots, "min_valid": self.min_valid},
                    )
                )
        world._recovery.counters.scrub_passes += 1
        return done

    async def _wait_idle(self) -> None:
        loader = self._world._loader
        while True:
            s = loader.stats()
            sig = (s.requests, s.prefetches, s.batches)
            now = self._clock()
            if sig != self._seen:
                self._seen, self._seen_at = sig, now
            elif not loader.backlog and not s.inflight and now - self._seen_at >= self._idle_s:
                return
            await self._sleep(_IDLE_POLL_S)

    async def _pace(self) -> None:
        now = self._clock()
        if self._next_at > now:
            await self._sleep(self._next_at - now)
            now = self._clock()
        self._next_at = max(self._next_at, now) + 1.0 / self.settings.regions_per_s

    async def _valid_snapshots(self) -> int:
        world = self._world
        store = world._store
        assert store is not None
        valid = 0
        # Held so rotation by the snapshotter cannot pull a snapshot out from under us.
        async with world._snapshotter.lock:
            for info in await list_snapshots(store):
                try:
                    ok = await is_valid_snapshot(store, info)
                except StreamerError:
                    ok = False
                if ok:
                    valid += 1
                    if valid >= self.min_valid:
                        break
        return valid

    async def _region_failed(
        self, region: tuple[int, int], key: str, err: IntegrityError, data: bytes
    ) -> ScrubAlert:
        try:
            repair = await self._world._recovery.repair_after_scrub(region, err, data)
        except StreamerError as exc:
            repair = {"action": "failed", "error": str(exc)}
        return await self.alert(
            "checksum",
            f"{key} failed verification ({err}); repair: {repair.get('action')}",
            region=region,
            file=key,
            details={
                "error": str(err),
                "expected": err.expected,
                "actual": err.actual,
                "repair": repair,
            },
        )

    async def alert(
        self,
        kind: Any,
        message: str,
        *,
        details: dict[str, Any],
        region: tuple[int, int] | None = None,
        file: str | None = None,
    ) -> ScrubAlert:
        """Log, record, count, emit and run the alert command; never raises StreamerError."""
        recovery = self._world._recovery
        log.error("scrub alert (%s): %s", kind, message)
        incident: str | None = None
        try:
            inc = await recovery.incidents.record(
                "scrub_alert",
                region=region,
                file=file,
                details={"alert": kind, "message": message, **details},
                action="see the repair details; `streamer check` verifies everything",
            )
            incident = inc.id
        except StreamerError as exc:
            log.error("cannot record the scrub alert incident: %s", exc)
        recovery.counters.scrub_alerts += 1
        ev = ScrubAlert(kind=kind, message=message, region=region, file=file, incident=incident)
        recovery.hub.emit(ev)
        if self.settings.alert_command:
            payload = {
                "type": "scrub_alert",
                "world": str(self._world.path),
                "kind": kind,
                "message": message,
                "region": list(region) if region is not None else None,
                "file": file,
                "incident": incident,
                "time": ev.time,
                "details": details,
            }
            await self._run_command(json.dumps(payload, default=str).encode())
        return ev

    async def _run_command(self, payload: bytes) -> None:
        cmd = self.settings.alert_command
        recovery = self._world._recovery
        try:
            argv = shlex.split(cmd)
            # Shielded: an alert raised just before the world closes must still go out; the
            # timeout bounds how long it can hold up closing.
            with anyio.CancelScope(shield=True), anyio.fail_after(ALERT_TIMEOUT_S):
                proc = await anyio.run_process(argv, input=payload, check=False)
        except (OSError, ValueError, TimeoutError) as exc:
            recovery.counters.alert_command_failures += 1
            log.error("alert command %r failed: %s", cmd, exc)
            return
        if proc.returncode != 0:
            recovery.counters.alert_command_failures += 1
            log.error(
                "alert command %r exited with %d: %s",
                cmd,
                proc.returncode,
                proc.stderr.decode(errors="replace")[-500:],
            )


def _canonical(key: str) -> tuple[int, int] | None:
    coords = parse_region_key(key)
    return coords if coords is not None and region_key(*coords) == key else None


def _verify(data: bytes, region: tuple[int, int], key: str) -> None:
    decode_region(data, rx=region[0], ry=region[1], path=key)
