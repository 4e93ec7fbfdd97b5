"""World lifecycle: unclosed worlds warn, closed worlds refuse, cancelled submits stay exact.

Cancellation semantics of ``submit`` (found and pinned here):

- Cancelled **before** its batch reaches the journal queue (waiting for back-pressure room,
  for a region to load): nothing of the batch is applied or journaled; the caller may retry.
- Cancelled **after** the batch was appended to the journal queue (waiting for the group
  commit's write/fsync): the batch is *not* withdrawn. It becomes durable with its group, is
  applied exactly once (queues, cached chunks, and after a crash replayed exactly once), and
  only the caller's wait is abandoned. A caller that must know should read the world back;
  resubmitting the same deltas is harmless for idempotent deltas (same tick, same value).
"""

from __future__ import annotations

import errno
import gc
import threading
import time
import weakref
from pathlib import Path

import anyio
import anyio.abc
import pytest

from streamer import (
    Character,
    EntityUpsert,
    StorageUnavailable,
    TileSet,
    World,
    WorldClosed,
    open_world,
)
from streamer.config import Config, RuntimeSettings
from streamer.storage.faultfs import SimulatedFileSystem
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world

SEED = 5
CONF = Config(runtime=RuntimeSettings(flush_interval_ms=600_000))
#: Hang guard only.
GUARD_S = 10


class GatedFS(SimulatedFileSystem):
    """The journal's sync of its segments blocks (in its worker thread) while the gate is
    closed; ``replace`` into ``regions/`` blocks while ``region_gate`` is closed."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.region_gate = threading.Event()
        self.region_gate.set()
        self.blocked = threading.Event()

    def fdatasync(self, handle: int) -> None:
        if self._handle(handle).path.endswith(".wal") and not self.gate.is_set():
            self.blocked.set()
            self.gate.wait(10)
        super().fdatasync(handle)

    def replace(self, src: str, dst: str) -> None:
        if dst.startswith("regions/"):
            self.region_gate.wait(10)
        super().replace(src, dst)


async def new_world(path: Path, fs: SimulatedFileSystem) -> None:
    store = await LocalStore.open(path, fs=fs)
    await create_world(store, seed=SEED)


async def tile(world: World, x: int, y: int) -> int:
    return int((await world.chunk(x // 64, y // 64)).tiles[y % 64, x % 64])


def test_unclosed_world_warns_when_garbage_collected(tmp_path: Path) -> None:
    fs = SimulatedFileSystem()
    anyio.run(new_world, tmp_path, fs)

    leaked: list[weakref.ref[World]] = []

    async def leak() -> None:
        world = open_world(tmp_path, CONF, fs=fs)
        await world.__aenter__()
        await world.submit([TileSet(tick=1, x=0, y=0, tile=9)])
        leaked.append(weakref.ref(world))
        # Returns without closing: the event loop ends, the world's tasks are cancelled.

    with pytest.warns(ResourceWarning, match="never closed"):
        anyio.run(leak)
        # A worker thread may still be finishing a call a cancelled task left, holding the
        # world until it returns (once in a full suite run the world outlived one collect
        # and warned during the next test): collect until it is gone.
        deadline = time.monotonic() + GUARD_S
        while True:
            gc.collect()
            if leaked[0]() is None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
    # Nothing acknowledged was lost by the leak: the journal replays it.
    fs.restart()

    async def reopen() -> None:
        async with open_world(tmp_path, CONF, fs=fs) as world:
            assert world.stats().replayed_deltas == 1
            assert await tile(world, 0, 0) == 9

    anyio.run(reopen)


async def test_a_closed_world_warns_nothing(tmp_path: Path) -> None:
    fs = SimulatedFileSystem()
    await new_world(tmp_path, fs)
    never_entered = open_world(tmp_path, CONF, fs=fs)
    async with open_world(tmp_path, CONF, fs=fs) as world:
        await world.submit([TileSet(tick=1, x=0, y=0, tile=9)])
    del world, never_entered
    gc.collect()  # filterwarnings=error: a ResourceWarning here fails the test


async def test_everything_after_close_raises_world_closed(tmp_path: Path) -> None:
    fs = SimulatedFileSystem()
    await new_world(tmp_path, fs)
    async with open_world(tmp_path, CONF, fs=fs) as world:
        await world.submit([TileSet(tick=1, x=0, y=0, tile=9)])
    assert world.closed
    with pytest.raises(WorldClosed):
        await world.submit([TileSet(tick=2, x=0, y=0, tile=10)])
    with pytest.raises(WorldClosed):
        await world.submit([])
    with pytest.raises(WorldClosed):
        await world.chunk(0, 0)
    with pytest.raises(WorldClosed):
        await world.flush()
    with pytest.raises(WorldClosed):
        world.update_interest("p", 0, 0)
    with pytest.raises(WorldClosed):
        world.drop_interest("p")
    with pytest.raises(WorldClosed):
        await world.find_player("p")
    await world.aclose()  # idempotent
    # Not entered yet: refused the same way.
    fresh = open_world(tmp_path, CONF, fs=fs)
    with pytest.raises(WorldClosed, match="not open"):
        await fresh.submit([TileSet(tick=2, x=0, y=0, tile=10)])
    async with fresh as again:
        assert await tile(again, 0, 0) == 9
        with pytest.raises(RuntimeError, match="only once"):
            await again.__aenter__()


async def test_submit_waiting_for_room_when_the_world_closes_gets_world_closed(
    tmp_path: Path,
) -> None:
    fs = GatedFS()
    await new_world(tmp_path, fs)
    conf = Config(runtime=RuntimeSettings(flush_interval_ms=600_000, queue_max_deltas=3))
    stop = anyio.Event()
    outcome: list[BaseException | None] = []

    async def host(*, task_status: anyio.abc.TaskStatus[World]) -> None:
        # The world is entered and closed by this one task, as it must be.
        async with open_world(tmp_path, conf, fs=fs) as world:
            task_status.started(world)
            await stop.wait()

    async def blocked(world: World) -> None:
        try:
            await world.submit([TileSet(tick=2, x=9, y=0, tile=999)])
        except WorldClosed as err:
            outcome.append(err)
        else:
            outcome.append(None)

    async with anyio.create_task_group() as tg:
        world = await tg.start(host)
        await world.submit([TileSet(tick=1, x=i, y=0, tile=100 + i) for i in range(3)])
        fs.region_gate.clear()  # the back-pressure flush cannot finish yet
        tg.start_soon(blocked, world)
        await anyio.sleep(0.05)
        assert not outcome  # waiting for room
        assert world.stats().queue_depth == 3
        stop.set()  # close begins while the submit waits ...
        await anyio.sleep(0.01)
        fs.region_gate.set()  # ... and the closing flush makes room
    # The close had begun: the waiter is refused, and nothing of its batch was applied.
    assert len(outcome) == 1 and isinstance(outcome[0], WorldClosed)
    async with open_world(tmp_path, conf, fs=fs) as again:
        assert [await tile(again, i, 0) for i in range(3)] == [100, 101, 102]
        assert await tile(again, 9, 0) != 999
        assert again.stats().replayed_deltas == 0


async def test_cancelled_before_journaling_applies_nothing(tmp_path: Path) -> None:
    fs = GatedFS()
    await new_world(tmp_path, fs)
    conf = Config(runtime=RuntimeSettings(flush_interval_ms=600_000, queue_max_deltas=3))
    async with open_world(tmp_path, conf, fs=fs) as world:
        await world.submit([TileSet(tick=1, x=i, y=0, tile=100 + i) for i in range(3)])
        before = await tile(world, 9, 0)
        fs.region_gate.clear()  # hold the back-pressure flush
        with anyio.move_on_after(0.1) as scope:
            await world.submit([TileSet(tick=2, x=9, y=0, tile=999)])
        assert scope.cancelled_caught
        depth = world.stats().queue_depth
        assert depth == 3  # the cancelled batch never entered a queue
        assert world.stats().journal.pending == 0
        fs.region_gate.set()
        await world.flush()
        assert await tile(world, 9, 0) == before
        # The same tick is still free for a retry.
        await world.submit([TileSet(tick=2, x=9, y=0, tile=998)])
        assert await tile(world, 9, 0) == 998
    image = fs.durable_image()
    async with open_world(tmp_path, conf, fs=image) as again:
        assert await tile(again, 9, 0) == 998


async def test_cancelled_after_journaling_is_applied_exactly_once(tmp_path: Path) -> None:
    fs = GatedFS()
    await new_world(tmp_path, fs)
    batch = [
        TileSet(tick=3, x=5, y=5, tile=555),
        TileSet(tick=3, x=-700, y=40, tile=556),  # a second region: all or nothing
        EntityUpsert(tick=3, character=Character(id="c-1", x=6, y=6, hp=42)),
    ]
    async with open_world(tmp_path, CONF, fs=fs) as world:
        await world.submit([TileSet(tick=1, x=0, y=0, tile=1)])
        fs.gate.clear()
        fs.blocked.clear()
        with anyio.CancelScope() as scope:

            async def cancel_once_in_fsync() -> None:
                await anyio.to_thread.run_sync(fs.blocked.wait, 10)
                assert world.stats().journal.pending == 0  # taken by the writer: in flight
                scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_once_in_fsync)
                await world.submit(batch)
                raise AssertionError("submit returned while its fsync was blocked")
        assert scope.cancelled_caught
        image_before = fs.durable_image()  # the frame is written but not yet durable
        fs.gate.set()
        await world.flush()  # barrier: the in-flight group commits
        assert await tile(world, 5, 5) == 555
        assert await tile(world, -700, 40) == 556
        assert [c.id for c in (await world.chunk(0, 0)).entities].count("c-1") == 1
        st = world.stats()
        assert st.queue_depth == 0 and st.journal.pending == 0
        # The cancelled batch's ticks were accepted: a later tick continues normally.
        await world.submit([TileSet(tick=4, x=5, y=5, tile=557)])
        assert await tile(world, 5, 5) == 557
        image_after = fs.durable_image()
    # A power loss during the blocked fsync loses the (unacknowledged) batch entirely.
    async with open_world(tmp_path, CONF, fs=image_before) as w:
        assert await tile(w, 5, 5) != 555
        assert await tile(w, -700, 40) != 556
        assert all(c.id != "c-1" for c in (await w.chunk(0, 0)).entities)
    # Once durable it is there exactly once, and stays so after a crash and replay.
    async with open_world(tmp_path, CONF, fs=image_after) as w:
        assert await tile(w, 5, 5) == 557
        assert await tile(w, -700, 40) == 556
        assert [c.id for c in (await w.chunk(0, 0)).entities].count("c-1") == 1
    async with open_world(tmp_path, CONF, fs=fs) as w:
        assert await tile(w, -700, 40) == 556
        assert [c.id for c in (await w.chunk(0, 0)).entities].count("c-1") == 1


async def test_cancelled_while_queued_behind_another_commit_is_applied(tmp_path: Path) -> None:
    """Two submits: the first holds the writer in fsync, the second waits in the journal
    queue and is cancelled there. Both become durable, in order."""
    fs = GatedFS()
    await new_world(tmp_path, fs)
    async with open_world(tmp_path, CONF, fs=fs) as world:
        await world.submit([TileSet(tick=1, x=0, y=0, tile=1)])
        fs.gate.clear()
        fs.blocked.clear()
        first_done = anyio.Event()

        async def first() -> None:
            await world.submit([TileSet(tick=2, x=1, y=0, tile=21)])
            first_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await anyio.to_thread.run_sync(fs.blocked.wait, 10)
            with anyio.move_on_after(0.05) as scope:
                await world.submit([TileSet(tick=3, x=1, y=0, tile=31)])
            assert scope.cancelled_caught
            assert world.stats().journal.pending == 1  # queued for the next group commit
            fs.gate.set()
        assert first_done.is_set()
        await world.flush()
        assert await tile(world, 1, 0) == 31  # applied after the first, never before
    async with open_world(tmp_path, CONF, fs=fs.durable_image()) as w:
        assert await tile(w, 1, 0) == 31


async def test_a_failed_flush_raises_the_documented_error_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """``flush()`` documents ``StorageUnavailable``/``IntegrityError``: a caller must be able to
    ``except StorageUnavailable`` (not an ``ExceptionGroup`` of the flush's task group)."""
    fs = SimulatedFileSystem()
    await new_world(tmp_path, fs)
    async with open_world(tmp_path, CONF, fs=fs) as world:
        await world.submit(
            [TileSet(tick=1, x=3, y=3, tile=33), TileSet(tick=1, x=600, y=0, tile=6)]
        )
        fs.inject("replace", errno.EIO, path_contains="regions/", once=True)
        with pytest.raises(StorageUnavailable):
            await world.flush()
        assert await tile(world, 3, 3) == 33
        await world.flush()  # the fault was one-shot: the retry folds everything
        assert world.stats().queue_depth == 0
    async with open_world(tmp_path, CONF, fs=fs.durable_image()) as again:
        assert await tile(again, 3, 3) == 33
        assert await tile(again, 600, 0) == 6
