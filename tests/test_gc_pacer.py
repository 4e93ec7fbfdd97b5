"""The world's young-generation pacer (runtime.gc_young_interval_ms)."""

from __future__ import annotations

import gc
from pathlib import Path

import anyio
import pytest

from streamer import TileSet, open_world
from streamer.config import Config, RuntimeSettings, StorageSettings, load_config
from streamer.runtime.gc_pacer import YoungGcPacer
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world
from tests.helpers.config_errors import assert_runtime_setting_refused


class _Fakes:
    """A scripted collector: how much is young before each pass, whether it is on."""

    def __init__(self, young: list[int], enabled: list[bool]) -> None:
        self.young = young
        self.enabled = enabled
        self.collected: list[int] = []
        self.passes = 0
        self.now = 0.0
        self.last = [float("-inf")]  # this test's own "last collection in the process"

    async def sleep(self, interval: float) -> None:
        assert interval == 0.01
        if self.passes == len(self.young):
            raise anyio.get_cancelled_exc_class()  # ends run() after the scripted passes
        self.passes += 1
        self.now += interval

    def clock(self) -> float:
        return self.now

    def young_count(self) -> int:
        return self.young[self.passes - 1]

    def is_enabled(self) -> bool:
        return self.enabled[self.passes - 1]

    def collect(self, generation: int) -> int:
        self.collected.append(generation)
        return 0

    def pacer(self) -> YoungGcPacer:
        """A pacer (every 0.01 s) that sees only this script."""
        return YoungGcPacer(
            0.01,
            sleep=self.sleep,
            collect=self.collect,
            enabled=self.is_enabled,
            young_count=self.young_count,
            clock=self.clock,
            last_collect=self.last,
        )


async def test_collects_the_young_generation_only_when_something_is_young_and_gc_is_on() -> None:
    f = _Fakes(young=[5, 0, 700, 3, 1], enabled=[True, True, True, False, True])
    pacer = f.pacer()
    with pytest.raises(anyio.get_cancelled_exc_class()):
        await pacer.run()
    # Pass 2 had nothing young; pass 4 ran with the collector switched off by the app.
    assert f.collected == [0, 0, 0]
    assert pacer.collections == 3


async def test_a_pass_is_skipped_when_another_pacer_just_collected() -> None:
    """The collector is per process: with several worlds open, their pacers share one pace."""
    f = _Fakes(young=[5, 5, 5], enabled=[True, True, True])
    pacer = f.pacer()
    # Another world's pacer collected 0.006 s into this one's first interval: at its first
    # pass (0.01) that was 0.004 s ago, under half an interval, so that pass is skipped.
    f.last[0] = 0.006
    with pytest.raises(anyio.get_cancelled_exc_class()):
        await pacer.run()
    assert pacer.collections == 2
    assert f.last[0] == pytest.approx(0.03)


def test_a_non_positive_interval_is_refused() -> None:
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="interval_s must be > 0"):
            YoungGcPacer(bad)


def test_bad_interval_in_config_is_a_config_error(tmp_path: Path) -> None:
    cases = (("-1", ">= 0"), ('"often"', "Expected `int`, got `str`"), ("60001", "<= 60000"))
    path = assert_runtime_setting_refused(tmp_path, "gc_young_interval_ms", cases)
    path.write_text("[runtime]\ngc_young_interval_ms = 0\n")
    assert load_config(path, env={}).runtime.gc_young_interval_ms == 0
    assert load_config(None, env={}).runtime.gc_young_interval_ms == 10


async def _world(path: Path) -> None:
    async with await LocalStore.open(path, fsync=False) as store:
        await create_world(store, seed=5)


def _cfg(interval_ms: int) -> Config:
    return Config(
        runtime=RuntimeSettings(gc_young_interval_ms=interval_ms),
        storage=StorageSettings(fsync=False),
    )


async def test_an_open_world_paces_collections_and_zero_turns_it_off(tmp_path: Path) -> None:
    await _world(tmp_path)
    seen: list[int] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(on_gc)
    try:
        async with open_world(tmp_path, _cfg(1)) as world:
            tick = 1
            # Writes keep allocating, so every pass finds something young. Bounded by
            # submits, not time: 2,000 of them span 2,000 pacer intervals at the least.
            while world.stats().gc_young_collections < 3 and tick < 2000:
                await world.submit([TileSet(tick=tick, x=tick % 64, y=0, tile=1)])
                tick += 1
                await anyio.sleep(0.002)
            assert world.stats().gc_young_collections >= 3
            assert 0 in seen
        async with open_world(tmp_path, _cfg(0)) as world:
            for i in range(20):
                await world.submit([TileSet(tick=tick + i, x=i, y=1, tile=2)])
                await anyio.sleep(0.002)
            assert world.stats().gc_young_collections == 0
    finally:
        gc.callbacks.remove(on_gc)
