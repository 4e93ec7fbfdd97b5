"""Hypothesis stateful model of the World: random submits, flushes, evictions, crashes, reopens.

The world lives on a :class:`SimulatedFileSystem` with region size 1, so the 8 x 8 tile area the
model edits (tiles -4..3 on both axes) spans four chunks and four regions. A plain dict is the
model: tile → the value of the last acknowledged ``TileSet``. After every step, every touched
tile read through ``world.chunk`` must equal the model.

Rules: submit (random multi-region ``TileSet`` batches, ticks increasing, sometimes repeating
the previous tick while it is still open); a stale submit below a sealed tick (refused whole,
nothing applied); flush; eviction pressure (a tiny byte budget plus reads of far chunks) and
interest pins/drops; a power loss at an acknowledged point (``durable_image()``, optionally
with torn un-fsynced tails) and reopen; a power loss *during* a flush after a random number
of file-system operations; a clean close and reopen (which must leave no journal behind).

The world is entered and left in one long-lived host task on a blocking portal's event loop
(a World must be closed by the task that entered it); each rule drives the loop with
``portal.call``.
"""

from __future__ import annotations

import random
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.from_thread
import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from streamer import TickAlreadyProcessed, TileSet, World, open_world
from streamer.config import Config, RuntimeSettings, StorageSettings
from streamer.coords import chunk_of
from streamer.format.region import decode_region, parse_region_key
from streamer.storage.faultfs import SimulatedCrash, SimulatedFileSystem
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world

T = TypeVar("T")

SEED = 99
#: Back-pressure flushes single regions in the background, so regions fold at different
#: times and journal segments are passed by some regions only.
QUEUE_MAX = 6
#: One chunk of tiles-and-records costs ~8.7 KiB in the cache: room for about three.
CACHE_BYTES = 28 * 1024
CONF = Config(
    runtime=RuntimeSettings(
        # No timer flush during a step: every fold happens where a rule asks for it.
        flush_interval_ms=600_000,
        cache_bytes=CACHE_BYTES,
        view_radius=1,
        hysteresis=0,
        durability="sync",
        journal_segment_bytes=4096,
        queue_max_deltas=QUEUE_MAX,
    ),
    storage=StorageSettings(fsync=True),
)
COORD = st.integers(-4, 3)
EDIT = st.tuples(COORD, COORD, st.integers(0, 0xFFFF))


def _is_crash(exc: BaseException) -> bool:
    if isinstance(exc, SimulatedCrash | Crashed):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_crash(e) for e in exc.exceptions)
    return isinstance(exc, anyio.get_cancelled_exc_class()) or (
        exc.__context__ is not None and _is_crash(exc.__context__)
    )


class Crashed(Exception):
    """A ``SimulatedCrash`` (a ``BaseException``) carried back through the portal.

    A portal re-raises non-``Exception`` errors inside its own event loop and stops; this
    keeps the loop alive across simulated power losses.
    """


async def _guarded(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    try:
        return await fn(*args)
    except BaseException as exc:
        if _is_crash(exc) and not isinstance(exc, anyio.get_cancelled_exc_class()):
            raise Crashed(repr(exc)) from exc
        raise


async def _host(
    path: Path,
    fs: SimulatedFileSystem,
    stop: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[World] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Enter the world, hand it out, and leave it (in this same task) once ``stop`` is set."""
    try:
        async with open_world(path, CONF, fs=fs) as world:
            task_status.started(world)
            await stop.wait()
    except BaseException as exc:
        if _is_crash(exc) and not isinstance(exc, anyio.get_cancelled_exc_class()):
            raise Crashed(repr(exc)) from exc
        raise


class WorldModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self._tmp = tempfile.TemporaryDirectory()
        self.path = Path(self._tmp.name) / "world"
        self.fs = SimulatedFileSystem()
        self.model: dict[tuple[int, int], int] = {}
        self.tick = 0
        #: The last submitted tick may be used again until a flush or close seals it.
        self.tick_open = False
        #: region → highest tick a flush has sealed there (a submit at or below is refused).
        self.sealed: dict[tuple[int, int], int] = {}
        self.unsealed: dict[tuple[int, int], int] = {}
        #: Deltas submitted per region since everything was last sealed, and regions whose
        #: queue may have filled up (a back-pressure flush seals what it folds).
        self.queued: Counter[tuple[int, int]] = Counter()
        self.pressed: set[tuple[int, int]] = set()
        self.world: World | None = None
        self._stop: anyio.Event | None = None
        self._hosted: Future[None] | None = None
        self.far = 0

    # -- plumbing -------------------------------------------------------------------------

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        result: T = self.portal.call(_guarded, fn, *args)
        return result

    def open(self) -> None:
        self._stop = self.portal.call(anyio.Event)
        self._hosted, self.world = self.portal.start_task(_host, self.path, self.fs, self._stop)

    def close(self, *, crashed: bool = False) -> None:
        assert self._stop is not None and self._hosted is not None
        self.portal.call(self._stop.set)
        try:
            self._hosted.result(timeout=60)
        except BaseException as exc:
            if not (crashed and _is_crash(exc)):
                raise
        self.world, self._stop, self._hosted = None, None, None

    @property
    def w(self) -> World:
        assert self.world is not None
        return self.world

    def seal_all(self) -> None:
        for region, tick in self.unsealed.items():
            self.sealed[region] = max(self.sealed.get(region, -1), tick)
        self.unsealed.clear()
        self.queued.clear()
        self.pressed.clear()
        self.tick_open = False

    # -- rules ----------------------------------------------------------------------------

    @initialize()
    def create(self) -> None:
        async def make() -> None:
            store = await LocalStore.open(self.path, fs=self.fs)
            await create_world(store, seed=SEED, region_size=1)

        self.call(make)
        self.open()

    @rule(edits=st.lists(EDIT, min_size=1, max_size=10), same_tick=st.booleans())
    def submit(self, edits: list[tuple[int, int, int]], same_tick: bool) -> None:
        regions = Counter(chunk_of(x, y) for x, y, _ in edits)  # region size 1: == chunk
        for region, n in regions.items():
            if self.queued[region] + n > QUEUE_MAX:
                self.pressed.add(region)  # a back-pressure flush may seal its ticks now
        if not (same_tick and self.tick_open):
            self.tick += 1
        batch = [TileSet(tick=self.tick, x=x, y=y, tile=v) for x, y, v in edits]
        try:
            self.call(self.w.submit, batch)
        except TickAlreadyProcessed:
            # Only legal for a repeated tick in a region a back-pressure flush sealed.
            if not (same_tick and self.tick_open and self.pressed & set(regions)):
                raise
            self.tick += 1
            batch = [TileSet(tick=self.tick, x=x, y=y, tile=v) for x, y, v in edits]
            self.call(self.w.submit, batch)
        for x, y, v in edits:
            self.model[(x, y)] = v
        for region, n in regions.items():
            self.unsealed[region] = self.tick
            self.queued[region] += n
        self.tick_open = True

    @precondition(lambda self: bool(self.sealed))
    @rule(data=st.data(), value=st.integers(0, 0xFFFF))
    def submit_stale(self, data: st.DataObject, value: int) -> None:
        region = data.draw(st.sampled_from(sorted(self.sealed)))
        tick = data.draw(st.integers(0, self.sealed[region]))
        x, y = region[0] * 64, region[1] * 64  # region size 1: its chunk's first tile
        ok_x, ok_y = data.draw(EDIT.map(lambda e: (e[0], e[1])))
        batch = [TileSet(tick=self.tick + 1, x=ok_x, y=ok_y, tile=value)]
        batch.append(TileSet(tick=tick, x=x, y=y, tile=value))
        with pytest.raises(TickAlreadyProcessed):
            self.call(self.w.submit, batch)
        # Refused whole: the model does not change, and the next tick is still free.

    @rule()
    def flush(self) -> None:
        self.call(self.w.flush)
        self.seal_all()

    @rule(n=st.integers(1, 5))
    def evict(self, n: int) -> None:
        """Read far-away chunks: with room for ~3 chunks, clean ones of ours get evicted."""

        async def touch() -> None:
            for _ in range(n):
                self.far += 1
                await self.w.chunk(40 + self.far % 7, -40 - self.far % 5)

        self.call(touch)

    @rule(x=COORD, y=COORD)
    def interest(self, x: int, y: int) -> None:
        self.w.update_interest("p", x * 16, y * 16)

    @rule()
    def drop_interest(self) -> None:
        self.w.drop_interest("p")

    @rule(torn=st.booleans(), seed=st.integers(0, 2**16))
    def crash_and_reopen(self, torn: bool, seed: int) -> None:
        """Power loss at an acknowledged point: everything acknowledged must be retained."""
        image = self.fs.durable_image(torn=torn, rng=random.Random(seed))
        self.close()  # the old process's file system is thrown away with it
        self.fs = image
        self.open()
        # Replayed deltas are not sealed: the newest tick stays open across the reopen.

    @rule(k=st.integers(0, 40), torn=st.booleans(), seed=st.integers(0, 2**16))
    def crash_during_flush(self, k: int, torn: bool, seed: int) -> None:
        """Power loss after ``k`` more file-system operations, inside a flush."""
        self.fs.crash_after(k)
        crashed = False
        try:
            self.call(self.w.flush)
        except BaseException as exc:
            if not _is_crash(exc):
                raise
            crashed = True
        if not self.fs.crashed:
            self.fs.crash_after(0)  # the flush finished: lose power right after it
        image = self.fs.durable_image(torn=torn, rng=random.Random(seed))
        self.close(crashed=True)
        self.fs = image
        self.open()
        if not crashed:
            self.seal_all()  # the flush completed, so its seal is durable too
        else:
            # What the flush sealed may or may not have reached the disk: move to a fresh
            # tick; ``sealed`` stays a valid lower bound (files only move forward).
            self.tick_open = False
            self.unsealed.clear()

    @rule()
    def close_and_reopen(self) -> None:
        self.close()
        self.seal_all()
        names = self.fs.listdir("journal") if self.fs.isdir("journal") else []
        assert names == [], f"a clean close left journal segments: {names}"
        for name in self.fs.listdir("regions"):
            key = parse_region_key(f"regions/{name}")
            assert key is not None, f"leftover temp file after a clean close: {name}"
            decode_region(self.fs.read(f"regions/{name}"), rx=key[0], ry=key[1], path=name)
        self.open()

    # -- the invariant --------------------------------------------------------------------

    @invariant()
    def tiles_match_the_model(self) -> None:
        if self.world is None:
            return

        async def read() -> dict[tuple[int, int], int]:
            chunks = {}
            for key in sorted({chunk_of(x, y) for x, y in self.model}):
                chunks[key] = (await self.w.chunk(*key)).tiles
            return {(x, y): int(chunks[chunk_of(x, y)][y % 64, x % 64]) for x, y in self.model}

        seen = self.call(read)
        assert seen == self.model

    def teardown(self) -> None:
        try:
            if self.world is not None:
                self.close()
        finally:
            self._portal_cm.__exit__(None, None, None)
            self._tmp.cleanup()


#: (default, --torture). Default: ~4,000 rule steps, well under a minute on 2 cores.
EXAMPLES = {False: 100, True: 600}
STEPS = {False: 40, True: 80}


@pytest.mark.timeout(3600)
def test_world_matches_a_dict_model(torture: bool) -> None:
    run_state_machine_as_test(
        WorldModel,
        settings=settings(
            max_examples=EXAMPLES[torture],
            stateful_step_count=STEPS[torture],
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
