"""Terrain in a worker process: same tiles, falls back to threads, never outlives its world."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import numpy as np
import pytest

from streamer import TileSet, open_world
from streamer.config import Config, RuntimeSettings, StorageSettings, load_config
from streamer.errors import ConfigError
from streamer.runtime import terrain_process, terrain_server
from streamer.runtime.terrain_process import TerrainProcess
from streamer.runtime.world import TERRAIN_PROCESS_AFTER, World
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world
from streamer.worldgen import TerrainGenerator
from streamer.worldgen.params import DEFAULT_PARAMS

SEED = 23


def cfg(processes: int) -> Config:
    return Config(
        runtime=RuntimeSettings(flush_interval_ms=60_000, terrain_processes=processes),
        storage=StorageSettings(fsync=False),
    )


async def new_world(path: Path) -> Path:
    async with await LocalStore.open(path, fsync=False) as store:
        await create_world(store, seed=SEED)
    return path


def alive(pid: int) -> bool:
    """Running (a zombie is not: an orphan's may wait for a reaper this VM's init lacks)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_until(what: str, cond: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.02)


async def concurrent_loads(world: World, keys: list[tuple[int, int]]) -> None:
    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(world.chunk, *key)


async def worker_up(world: World) -> None:
    """Concurrent loads (several batches at once) until the worker has started and serves."""
    keys = [(1000 + i, 1000) for i in range(16 * 4 * TERRAIN_PROCESS_AFTER)]
    await concurrent_loads(world, keys)
    await wait_until("the terrain worker", lambda: world.stats().terrain_processes == 1)


@asynccontextmanager
async def worker() -> AsyncIterator[TerrainProcess]:
    proc = TerrainProcess(SEED, DEFAULT_PARAMS)
    async with anyio.create_task_group() as tg:
        tg.start_soon(proc.run)
        await wait_until("the worker to start", lambda: proc.running)
        try:
            yield proc
        finally:
            tg.cancel_scope.cancel()
    await proc.aclose()


def check_tiles(raw: bytes | None, keys: list[tuple[int, int]]) -> None:
    assert raw is not None
    gen = TerrainGenerator(SEED)
    got = np.frombuffer(raw, dtype=np.uint16).reshape(len(keys), 64, 64)
    for key, tiles in zip(keys, got, strict=True):
        assert np.array_equal(tiles, gen.chunk_tiles(*key)), key


@asynccontextmanager
async def world_with_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[World, int]]:
    """An open world whose terrain worker is up (its pid given), restarts without delay."""
    monkeypatch.setattr(terrain_process, "RESTART_DELAY_S", 0.0)
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg(1)) as world:
        await worker_up(world)
        (proc,) = world._terrain
        yield world, proc.pid


async def replacement_serves(world: World, old: int, key: tuple[int, int]) -> None:
    """The next load starts a new worker (restart delay patched to 0), and it serves."""
    await world.chunk(*key)
    await wait_until("a new worker", lambda: world.stats().terrain_processes == 1)
    (proc,) = world._terrain
    assert proc.pid not in (old, -1)
    before = world.stats().terrain_process_batches
    c = await world.chunk(key[0], key[1] + 1)
    assert np.array_equal(c.tiles, TerrainGenerator(SEED).chunk_tiles(key[0], key[1] + 1))
    assert world.stats().terrain_process_batches == before + 1


async def test_worker_gives_the_generators_tiles_and_exits_on_close() -> None:
    keys = [(0, 0), (-1, 2), (-300, -7), (5, 9), *[(i, -i) for i in range(20)]]
    async with worker() as proc:
        assert alive(proc.pid)
        check_tiles(await proc.tiles(keys), keys)
        assert proc.batches == 1 and proc.failures == 0
        pid = proc.pid
    assert proc.pid == -1 and not proc.running
    assert await proc.tiles(keys) is None
    assert proc.failures == 0  # a close is not a failure
    await wait_until("the worker to exit", lambda: not alive(pid))


async def test_pipelined_requests_each_get_their_own_tiles() -> None:
    batches = [[(b * 100 + i, -b) for i in range(1 + b % 5)] for b in range(12)]
    results: dict[int, bytes | None] = {}
    async with worker() as proc:

        async def fetch(b: int) -> None:
            results[b] = await proc.tiles(batches[b])

        async with anyio.create_task_group() as tg:
            for b in range(len(batches)):
                tg.start_soon(fetch, b)
        for b, keys in enumerate(batches):
            check_tiles(results[b], keys)
        assert proc.batches == len(batches) and proc.outstanding == 0


async def test_a_cancelled_request_does_not_put_the_replies_out_of_step() -> None:
    async with worker() as proc:
        async with anyio.create_task_group() as tg:
            # Big enough (~0.1 s in the worker) to be seen outstanding.
            tg.start_soon(proc.tiles, [(7, i) for i in range(1024)])
            await wait_until("the request to go out", lambda: proc.outstanding == 1)
            tg.cancel_scope.cancel()  # gives up on its reply once it is sent
        check_tiles(await proc.tiles([(1, 2)]), [(1, 2)])  # not the abandoned reply
        assert proc.outstanding == 0 and proc.failures == 0


async def test_a_batch_the_worker_cannot_compute_is_left_to_the_caller() -> None:
    async with worker() as proc:
        assert await proc.tiles([(0, 0), (1 << 45, 0)]) is None  # out of the generator's range
        check_tiles(await proc.tiles([(0, 0)]), [(0, 0)])  # still in step
        assert proc.failures == 0


async def test_world_loads_through_the_worker_with_edits_applied(tmp_path: Path) -> None:
    await new_world(tmp_path)
    gen = TerrainGenerator(SEED)
    keys = [(cx, cy) for cx in range(-4, 4) for cy in range(-4, 4)]
    async with open_world(tmp_path, cfg(1)) as world:
        await world.submit(
            [TileSet(tick=1, x=cx * 64 + 1, y=cy * 64 + 2, tile=77) for cx, cy in keys]
        )
        await world.flush()
    async with open_world(tmp_path, cfg(1)) as world:
        await worker_up(world)
        chunks = {}

        async def load(key: tuple[int, int]) -> None:
            chunks[key] = await world.chunk(*key)

        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(load, key)
        for key in keys:
            expect = np.array(gen.chunk_tiles(*key))
            expect[2, 1] = 77
            assert np.array_equal(chunks[key].tiles, expect), key
            assert not chunks[key].tiles.flags.writeable
        stats = world.stats()
        assert stats.terrain_process_batches >= 1
        assert stats.terrain_process_failures == 0


async def test_zero_processes_means_threads_only(tmp_path: Path) -> None:
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg(0)) as world:
        for i in range(TERRAIN_PROCESS_AFTER + 2):
            c = await world.chunk(3, i)
            assert np.array_equal(c.tiles, TerrainGenerator(SEED).chunk_tiles(3, i))
        await anyio.sleep(0.2)
        stats = world.stats()
        assert stats.terrain_processes == 0 and stats.terrain_process_batches == 0


async def test_only_overlapping_loads_start_a_process(tmp_path: Path) -> None:
    """Loads one at a time gain nothing from a worker and never start one."""
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg(1)) as world:
        for i in range(4 * TERRAIN_PROCESS_AFTER):
            await world.chunk(i, 0)
        await anyio.sleep(0.2)
        assert world.stats().terrain_processes == 0
        assert not any(p.running for p in world._terrain)
        await concurrent_loads(world, [(i, 1) for i in range(16 * 4 * TERRAIN_PROCESS_AFTER)])
        await wait_until("the terrain worker", lambda: world.stats().terrain_processes == 1)


async def test_a_killed_worker_is_logged_loads_go_on_and_a_new_one_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = TerrainGenerator(SEED)
    async with world_with_worker(tmp_path, monkeypatch) as (world, old):
        os.kill(old, signal.SIGKILL)
        await wait_until("the worker to die", lambda: not alive(old))
        with caplog.at_level(logging.WARNING, logger="streamer.runtime.terrain_process"):
            c = await world.chunk(7, -7)  # finds the worker dead: generated in a thread
        assert np.array_equal(c.tiles, gen.chunk_tiles(7, -7))
        assert world.stats().terrain_process_failures == 1
        assert any(str(old) in r.getMessage() for r in caplog.records)
        await replacement_serves(world, old, (8, -7))


async def test_a_hung_worker_is_killed_and_replaced_and_no_load_waits_on_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP: alive but silent. Its batch falls back to a thread after the reply timeout;
    closing its socket under the reader (waiting on that fd) leaves the world's tasks
    unharmed, and the replacement (often on the same fd number) serves."""
    # Short, but far above a healthy reply even on a loaded CI machine (milliseconds).
    monkeypatch.setattr(terrain_process, "REPLY_TIMEOUT_S", 2.0)
    gen = TerrainGenerator(SEED)
    async with world_with_worker(tmp_path, monkeypatch) as (world, stopped):
        os.kill(stopped, signal.SIGSTOP)
        try:
            with caplog.at_level(logging.WARNING, logger="streamer.runtime.terrain_process"):
                c = await world.chunk(-9, 9)
            assert np.array_equal(c.tiles, gen.chunk_tiles(-9, 9))
            assert any("did not answer" in r.getMessage() for r in caplog.records)
            assert world.stats().terrain_process_failures == 1
            await wait_until("the hung worker to be killed", lambda: not alive(stopped))
        finally:
            if alive(stopped):
                os.kill(stopped, signal.SIGKILL)
        await replacement_serves(world, stopped, (-9, 10))


async def test_a_dead_server_is_started_again() -> None:
    async with worker():
        pass
    server = terrain_server._server
    assert server is not None
    server[0].kill()
    server[0].wait()
    async with worker() as again:
        check_tiles(await again.tiles([(1, 1)]), [(1, 1)])
        assert terrain_server._server is not None and terrain_server._server[0] is not server[0]


def test_negative_terrain_processes_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "streamer.toml"
    for bad, needle in (("-1", ">= 0"), ('"many"', "Invalid")):
        path.write_text(f"[runtime]\nterrain_processes = {bad}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
        assert info.value.key == "runtime.terrain_processes", info.value
        assert needle in str(info.value)
    path.write_text("[runtime]\nterrain_processes = 2\n")
    assert load_config(path, env={}).runtime.terrain_processes == 2
    assert (
        load_config(None, env={"STREAMER_RUNTIME_TERRAIN_PROCESSES": "0"}).runtime.terrain_processes
        == 0
    )


_CHILD = textwrap.dedent(
    """
    import sys, anyio
    from streamer import open_world
    from streamer.config import Config, RuntimeSettings, StorageSettings
    from streamer.runtime import terrain_server

    async def main():
        rt = RuntimeSettings(terrain_processes=1)
        cfg = Config(runtime=rt, storage=StorageSettings(fsync=False))
        async with open_world(sys.argv[1], cfg) as world:
            i = 0
            while world.stats().terrain_processes == 0:
                async with anyio.create_task_group() as tg:
                    for _ in range(64):
                        tg.start_soon(world.chunk, i, 0)
                        i += 1
                await anyio.sleep(0.02)
            print(world._terrain[0].pid, terrain_server._server[0].pid, flush=True)
            await anyio.sleep(60)

    anyio.run(main)
    """
)


def test_worker_and_server_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    anyio.run(new_world, tmp_path)
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            worker, server = (int(v) for v in child.stdout.readline().split())
            assert alive(worker) and alive(server)
        finally:
            child.kill()
    deadline = time.monotonic() + 20
    while (alive(worker) or alive(server)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker), "terrain worker outlived its killed parent"
    assert not alive(server), "terrain server outlived its killed parent"


async def test_a_worker_that_cannot_start_is_retried_ever_more_rarely(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A platform that cannot run it gets a few warnings, not one every few seconds; loads
    never depend on it (tiles() answers None: generate in a thread)."""

    def refuse(seed: int, params: object) -> tuple[int, object]:
        raise OSError("no SOCK_SEQPACKET here")

    monkeypatch.setattr(terrain_process, "spawn_worker", refuse)
    proc = TerrainProcess(SEED, DEFAULT_PARAMS)
    assert proc.should_start() and proc.restart_delay == 0
    delays = []
    with caplog.at_level(logging.WARNING, logger="streamer.runtime.terrain_process"):
        for _ in range(8):
            await proc.run()
            assert not proc.running and not proc.should_start()  # not right away
            assert await proc.tiles([(0, 0)]) is None
            delays.append(proc.restart_delay)
            proc._last_start -= proc.restart_delay  # as if that long had passed
            assert proc.should_start()
    assert delays == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]
    assert proc.failures == 8
    assert sum("no SOCK_SEQPACKET" in r.getMessage() for r in caplog.records) == 8
