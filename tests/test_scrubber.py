"""The background scrubber: detection while open, repair, every alert channel, pacing."""

from __future__ import annotations

import itertools
import json
import logging
import sys
from pathlib import Path

import anyio
import msgspec
import pytest

from streamer import RegionInactive, RegionRestored, ScrubAlert, TileSet, open_world
from streamer.config import (
    Config,
    RuntimeSettings,
    ScrubSettings,
    SnapshotSettings,
    StorageSettings,
)
from streamer.format.region import decode_region, region_key
from streamer.recovery.incidents import IncidentLog
from streamer.recovery.quarantine import list_quarantine
from streamer.runtime import scrubber as scrubber_mod
from streamer.runtime.events import AnyEvent, EventStream
from streamer.runtime.scrubber import Scrubber
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world

SEED = 31


def cfg(scrub: ScrubSettings, *, min_valid: int = 0) -> Config:
    return Config(
        runtime=RuntimeSettings(flush_interval_ms=60_000),
        storage=StorageSettings(fsync=False),
        scrub=scrub,
        snapshots=SnapshotSettings(min_valid=min_valid),
    )


async def new_world(path: Path) -> Path:
    store = await LocalStore.open(path, fsync=False)
    await create_world(store, seed=SEED)
    await store.aclose()
    return path


def corrupt(path: Path, region: tuple[int, int]) -> None:
    f = path / region_key(*region)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


async def next_event(events: EventStream, kind: type[AnyEvent]) -> AnyEvent:
    with anyio.fail_after(20):  # a bound against hanging, not a timing assertion
        async for ev in events:
            if isinstance(ev, kind):
                return ev
    raise AssertionError(f"stream ended without a {kind.__name__}")


def alert_command(out: Path) -> str:
    script = f"import sys; open({str(out)!r}, 'ab').write(sys.stdin.buffer.read() + b'\\n')"
    return f"{sys.executable} -c {json.dumps(script)}"


async def incidents(path: Path) -> list[str]:
    store = await LocalStore.open(path, fsync=False)
    try:
        return [i.kind for i in (await IncidentLog(store).read()).incidents]
    finally:
        await store.aclose()


async def test_scrub_catches_a_file_damaged_under_a_cached_region(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = await new_world(tmp_path / "w")
    out = tmp_path / "alerts.jsonl"
    conf = cfg(ScrubSettings(interval_s=0.01, regions_per_s=1000, alert_command=alert_command(out)))
    caplog.set_level(logging.ERROR, logger="streamer.runtime.scrubber")
    async with open_world(path, conf) as world:
        async with world.events() as events:
            await world.submit([TileSet(tick=1, x=1, y=1, tile=11)])
            await world.flush()
            assert (0, 0) in world._regions  # held in memory: the scrub repairs from it
            corrupt(path, (0, 0))
            # The repair (RegionRestored) is announced before the alert that reports it.
            restored = await next_event(events, RegionRestored)
            alert = await next_event(events, ScrubAlert)
        assert isinstance(alert, ScrubAlert) and alert.kind == "checksum"
        assert alert.region == (0, 0) and alert.incident is not None
        assert isinstance(restored, RegionRestored) and restored.source == "memory"
        assert world.stats().recovery.scrub_alerts >= 1
        # Served content is untouched, and the file verifies again with the edit in it.
        assert int((await world.chunk(0, 0)).tiles[1, 1]) == 11
        data = (path / region_key(0, 0)).read_bytes()
        assert decode_region(data, rx=0, ry=0, path="r").header.last_processed_tick == 1

    assert any("scrub alert" in r.getMessage() for r in caplog.records)
    kinds = await incidents(path)
    assert "scrub_alert" in kinds and "checksum_failure" in kinds
    store = await LocalStore.open(path, fsync=False)
    assert [q for q in await list_quarantine(store) if q.endswith("r.0.0.region")]
    await store.aclose()
    lines = [json.loads(line) for line in out.read_text().splitlines() if line]
    assert lines[0]["kind"] == "checksum" and lines[0]["region"] == [0, 0]
    assert lines[0]["details"]["repair"]["action"] == "rewritten_from_memory"
    async with open_world(path, cfg(ScrubSettings(interval_s=0))) as world:
        assert int((await world.chunk(0, 0)).tiles[1, 1]) == 11


async def test_scrub_of_a_region_not_in_memory_runs_the_ladder(tmp_path: Path) -> None:
    path = await new_world(tmp_path)
    async with open_world(path, cfg(ScrubSettings(interval_s=0))) as world:
        await world.submit([TileSet(tick=1, x=600, y=1, tile=11)])
    corrupt(path, (1, 0))  # no snapshot: the region goes inactive
    async with open_world(path, cfg(ScrubSettings(interval_s=0))) as world:
        done = await world._scrubber.scrub_pass()
        assert done.failed == [(1, 0)]
        assert world.inactive_regions == {(1, 0)}
        with pytest.raises(RegionInactive):
            await world.chunk(9, 0)
        assert world.stats().recovery.scrub_alerts == 1
    assert {"scrub_alert", "data_loss", "region_inactive"} <= set(await incidents(path))


async def test_too_few_valid_snapshots_alert_and_a_failing_command_is_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = await new_world(tmp_path)
    conf = cfg(
        ScrubSettings(interval_s=0, alert_command=f"{sys.executable} -c 'raise SystemExit(3)'"),
        min_valid=1,
    )
    async with open_world(path, conf) as world:
        done = await world._scrubber.scrub_pass()
        assert done.valid_snapshots == 0
        assert [a.kind for a in done.alerts] == ["snapshots_below_min"]
        assert world.stats().recovery.alert_command_failures == 1
        await world.snapshot()
        done = await world._scrubber.scrub_pass()
        assert done.valid_snapshots == 1 and not done.alerts
    assert any("exited with 3" in r.getMessage() for r in caplog.records)


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds
        await anyio.sleep(0)


async def test_scrub_is_rate_limited_and_waits_for_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = await new_world(tmp_path)
    async with open_world(path, cfg(ScrubSettings(interval_s=0))) as world:
        await world.submit([TileSet(tick=1, x=512 * i, y=1, tile=3) for i in range(6)])
        await world.flush()
        fake = FakeTime()
        rate = 2.0
        scrub = Scrubber(
            world,
            ScrubSettings(interval_s=0, regions_per_s=rate),
            min_valid_snapshots=0,
            clock=fake.clock,
            sleep=fake.sleep,
        )
        stamps: list[float] = []
        real_verify = scrubber_mod._verify

        def verify(data: bytes, region: tuple[int, int], key: str) -> None:
            stamps.append(fake.now)
            real_verify(data, region, key)

        monkeypatch.setattr(scrubber_mod, "_verify", verify)
        # The loader reports work in flight for the first few looks: nothing is verified
        # until it has been idle for the idle period.
        real_stats = world._loader.stats
        busy_looks = 3
        looks = 0

        def stats() -> object:
            nonlocal looks
            looks += 1
            s = real_stats()
            return msgspec.structs.replace(s, inflight=1) if looks <= busy_looks else s

        monkeypatch.setattr(world._loader, "stats", stats)
        done = await scrub.scrub_pass()

    assert len(done.verified) == 6 and len(stamps) == 6
    assert looks > busy_looks
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(g >= 1 / rate - 1e-9 for g in gaps)  # never faster than regions_per_s
    for t in stamps:  # no one-second window holds more than `rate` verifications
        assert sum(1 for u in stamps if t <= u < t + 1.0) <= rate
