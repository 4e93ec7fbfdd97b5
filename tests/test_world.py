"""The World API: reads, writes, ticks, bounds, lifecycle, back-pressure, memory, concurrency."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import anyio
import numpy as np
import pytest

import streamer
from streamer import (
    Character,
    DeltaError,
    EntityMove,
    EntityRemove,
    EntityUpsert,
    Feature,
    FeatureAdd,
    FeatureRemove,
    Society,
    SocietyUpdate,
    StorageUnavailable,
    Structure,
    StructureUpsert,
    TickAlreadyProcessed,
    TileSet,
    WorldClosed,
    WorldLocked,
    WorldNotFound,
    open_world,
)
from streamer.config import Config, RuntimeSettings, StorageSettings
from streamer.format.region import decode_region, parse_region_key, region_key
from streamer.storage.faultfs import SimulatedFileSystem
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world
from streamer.worldgen import TerrainGenerator

SEED = 11


def cfg(**runtime: object) -> Config:
    rt: dict[str, object] = {"flush_interval_ms": 60_000}
    rt.update(runtime)
    return Config(runtime=RuntimeSettings(**rt), storage=StorageSettings(fsync=False))  # type: ignore[arg-type]


async def new_world(path: Path, fs: SimulatedFileSystem | None = None, **kw: object) -> Path:
    store = await LocalStore.open(path, fs=fs, fsync=fs is not None)
    await create_world(store, seed=SEED, **kw)  # type: ignore[arg-type]
    return path


def hero(x: int, y: int, *, hp: int = 100, player: str | None = "alice") -> Character:
    return Character(id="hero-1", x=x, y=y, player_id=player, given_name="Ada", hp=hp)


async def test_chunk_is_terrain_plus_edits(tmp_path: Path) -> None:
    await new_world(tmp_path)
    gen = TerrainGenerator(SEED)
    async with open_world(tmp_path, cfg()) as world:
        c = await world.chunk(-1, 2)
        assert c.tiles.dtype == np.uint16 and c.tiles.shape == (64, 64)
        assert not c.tiles.flags.writeable
        assert np.array_equal(c.tiles, gen.chunk_tiles(-1, 2))
        defaults = gen.chunk_defaults(-1, 2, 8)
        assert [f.id for f in c.features] == [f.id for f in defaults.features]

        await world.submit(
            [TileSet(tick=1, x=-64, y=128, tile=4321), TileSet(tick=1, x=-1, y=191, tile=7)]
        )
        c2 = await world.chunk(-1, 2)
        expect = np.array(gen.chunk_tiles(-1, 2))
        expect[0, 0] = 4321
        expect[63, 63] = 7
        assert np.array_equal(c2.tiles, expect)


async def test_submit_flush_reopen_keeps_everything(tmp_path: Path) -> None:
    await new_world(tmp_path)
    deltas = [
        TileSet(tick=5, x=3, y=4, tile=999),
        EntityUpsert(tick=5, character=hero(10, 10)),
        FeatureAdd(tick=5, feature=Feature(id="f-1", kind="well", x=20, y=20, amount=3)),
        StructureUpsert(tick=6, structure=Structure(id="s-1", kind="hut", x=30, y=30, w=2, h=2)),
        SocietyUpdate(
            tick=6, society=Society(id="soc", name="Guild", x=40, y=40, members=["hero-1"])
        ),
    ]
    async with open_world(tmp_path, cfg()) as world:
        default_feature = (await world.chunk(1, 1)).features
        await world.submit(deltas)
        if default_feature:
            f = default_feature[0]
            await world.submit([FeatureRemove(tick=7, feature_id=f.id, x=f.x, y=f.y)])
        before = await world.chunk(0, 0)
        await world.flush()
        assert world.stats().flushes >= 1
        after_flush = await world.chunk(0, 0)
        assert np.array_equal(before.tiles, after_flush.tiles)
    for _ in range(2):
        async with open_world(tmp_path, cfg()) as world:
            c = await world.chunk(0, 0)
            assert int(c.tiles[4, 3]) == 999
            assert [e.id for e in c.entities if e.id == "hero-1"] == ["hero-1"]
            assert any(f.id == "f-1" for f in c.features)
            assert [s.id for s in c.structures] == ["s-1"]
            assert [s.name for s in c.societies] == ["Guild"]
            assert np.array_equal(c.tiles, before.tiles)
            if default_feature:
                f = default_feature[0]
                assert f.id not in {x.id for x in (await world.chunk(1, 1)).features}


async def test_unflushed_deltas_replay_from_the_journal(tmp_path: Path) -> None:
    await new_world(tmp_path)
    fs_world = tmp_path
    async with open_world(fs_world, cfg()) as world:
        await world.submit([TileSet(tick=1, x=0, y=0, tile=11)])
        world._journal.begin_close()  # type: ignore[union-attr]  # simulate: no final flush
        world._closed = True
        world._closing = True
        tg = world._tg
        world._tg = None
        assert tg is not None
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)
        await world._release()
    async with open_world(fs_world, cfg()) as world:
        assert world.stats().replayed_deltas == 1
        assert int((await world.chunk(0, 0)).tiles[0, 0]) == 11


async def test_multi_region_batch_is_all_or_nothing(tmp_path: Path) -> None:
    fs = SimulatedFileSystem()
    await new_world(tmp_path, fs)
    conf = Config(runtime=RuntimeSettings(flush_interval_ms=60_000))
    batch = [TileSet(tick=1, x=1, y=1, tile=501), TileSet(tick=1, x=-600, y=900, tile=502)]
    async with open_world(tmp_path, conf, fs=fs) as world:
        a0 = int((await world.chunk(0, 0)).tiles[1, 1])
        b0 = int((await world.chunk(-10, 14)).tiles[900 % 64, -600 % 64])
        # ".wal": a segment's write, not the spare's zero-filling running beside it.
        fs.inject("write", errno.EIO, path_contains=".wal")
        with pytest.raises(StorageUnavailable):
            await world.submit(batch)
        assert int((await world.chunk(0, 0)).tiles[1, 1]) == a0
        assert int((await world.chunk(-10, 14)).tiles[900 % 64, -600 % 64]) == b0
        image = fs.durable_image()
        # The journal recovered: the same ticks are still open and a retry goes through.
        await world.submit(batch)
        assert int((await world.chunk(0, 0)).tiles[1, 1]) == 501
    async with open_world(tmp_path, conf, fs=image) as world:
        assert int((await world.chunk(0, 0)).tiles[1, 1]) == a0
        assert int((await world.chunk(-10, 14)).tiles[900 % 64, -600 % 64]) == b0
    async with open_world(tmp_path, conf, fs=fs.durable_image()) as world:
        assert int((await world.chunk(0, 0)).tiles[1, 1]) == 501
        assert int((await world.chunk(-10, 14)).tiles[900 % 64, -600 % 64]) == 502


async def test_ticks_are_checked_per_region_and_reject_the_whole_batch(tmp_path: Path) -> None:
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg()) as world:
        await world.submit([TileSet(tick=5, x=0, y=0, tile=1)])
        await world.flush()
        other = int((await world.chunk(9, 0)).tiles[0, 600 % 64])
        with pytest.raises(TickAlreadyProcessed, match=r"\(0, 0\).*tick 5.*lastProcessedTick 5"):
            await world.submit(
                [TileSet(tick=9, x=600, y=0, tile=4242), TileSet(tick=5, x=1, y=0, tile=2)]
            )
        # Nothing of the rejected batch was applied, in either region.
        assert int((await world.chunk(9, 0)).tiles[0, 600 % 64]) == other
        await world.submit([TileSet(tick=7, x=0, y=0, tile=3)])
        with pytest.raises(DeltaError, match="backwards"):
            await world.submit([TileSet(tick=6, x=0, y=0, tile=4)])
        # Another region has its own clock.
        await world.submit([TileSet(tick=1, x=600, y=0, tile=5)])
    async with open_world(tmp_path, cfg()) as world:
        with pytest.raises(TickAlreadyProcessed):
            await world.submit([TileSet(tick=7, x=0, y=0, tile=3)])
        await world.submit([TileSet(tick=8, x=0, y=0, tile=3)])


async def test_malformed_and_out_of_bounds_deltas(tmp_path: Path) -> None:
    await new_world(tmp_path, bound_tiles=1000)
    async with open_world(tmp_path, cfg()) as world:
        with pytest.raises(DeltaError, match="expected one of"):
            await world.submit([{"op": "tile_set", "tick": 1}])  # type: ignore[list-item]
        with pytest.raises(DeltaError, match="malformed"):
            await world.submit([TileSet(tick="soon", x=1, y=1, tile=1)])  # type: ignore[arg-type]
        with pytest.raises(DeltaError, match="65535"):
            await world.submit([TileSet(tick=1, x=1, y=1, tile=70_000)])
        with pytest.raises(DeltaError, match=r"\(1000, 0\)"):
            await world.submit([TileSet(tick=1, x=1000, y=0, tile=1)])
        with pytest.raises(DeltaError, match=r"\(-5, -1000\)"):
            await world.submit(
                [EntityMove(tick=1, entity_id="x", from_x=0, from_y=0, to_x=-5, to_y=-1000)]
            )
        with pytest.raises(ValueError, match=r"chunk \(16, 0\)"):
            await world.chunk(16, 0)
        await world.chunk(15, -16)
        with pytest.raises(DeltaError, match="not in chunk"):
            await world.submit(
                [EntityMove(tick=1, entity_id="ghost", from_x=0, from_y=0, to_x=1, to_y=1)]
            )


class _MyTile(TileSet, frozen=True):
    """A user's subclass of a delta type (refused: it would journal as its base type)."""


async def test_a_subclassed_delta_is_refused_and_nothing_of_its_batch_applies(
    tmp_path: Path,
) -> None:
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg()) as world:
        await world.submit([TileSet(tick=10, x=1, y=1, tile=3)])
        with pytest.raises(DeltaError, match=r"delta #1: .*got _MyTile \(subclasses"):
            await world.submit(
                [TileSet(tick=11, x=2, y=1, tile=5), _MyTile(tick=11, x=1, y=1, tile=7)]
            )
        chunk = await world.chunk(0, 0)
        base = await world.terrain(0, 0)
        assert int(chunk.tiles[1, 1]) == 3
        assert int(chunk.tiles[1, 2]) == int(base[1, 2])  # the batch's other edit: not applied
        await world.flush()
    async with open_world(tmp_path, cfg()) as world:
        assert int((await world.chunk(0, 0)).tiles[1, 1]) == 3


async def test_lifecycle_errors(tmp_path: Path) -> None:
    with pytest.raises(WorldNotFound):
        async with open_world(tmp_path / "nope"):
            pass
    with pytest.raises(WorldNotFound):
        async with open_world(tmp_path):
            pass
    assert not (tmp_path / "journal").exists()  # opening created nothing
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg()) as world:
        with pytest.raises(WorldLocked):
            async with open_world(tmp_path, cfg()):
                pass
    with pytest.raises(WorldClosed):
        await world.submit([TileSet(tick=1, x=0, y=0, tile=1)])
    with pytest.raises(WorldClosed):
        await world.chunk(0, 0)
    with pytest.raises(WorldClosed):
        world.update_interest("p", 0, 0)
    # The lock is released on close.
    async with open_world(tmp_path, cfg()):
        pass


class GatedFS(SimulatedFileSystem):
    """Region installs (``replace``) block until the gate opens; optionally slowly."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0

    def replace(self, src: str, dst: str) -> None:
        if dst.startswith("regions/"):
            self.gate.wait(10)
            if self.delay:
                time.sleep(self.delay)
        super().replace(src, dst)


async def test_full_queue_applies_back_pressure_until_a_flush(tmp_path: Path) -> None:
    fs = GatedFS()
    await new_world(tmp_path, fs)
    conf = Config(runtime=RuntimeSettings(flush_interval_ms=60_000, queue_max_deltas=5))
    async with open_world(tmp_path, conf, fs=fs) as world:
        await world.submit([TileSet(tick=1, x=i, y=0, tile=i + 1) for i in range(5)])
        fs.gate.clear()
        done = anyio.Event()

        async def blocked() -> None:
            await world.submit([TileSet(tick=2, x=10, y=0, tile=77)])
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(blocked)
            await anyio.sleep(0.1)
            assert not done.is_set()  # waiting for room, not growing the queue
            assert world.stats().queue_depth == 5
            fs.gate.set()
            with anyio.fail_after(10):
                await done.wait()
        assert world.stats().flushes >= 1
        for t in range(3, 40):
            await world.submit([TileSet(tick=t, x=t, y=1, tile=t)])
            assert world.stats().queue_max_depth <= 5
        assert int((await world.chunk(0, 0)).tiles[0, 10]) == 77


async def test_cross_region_entity_move_and_find_player(tmp_path: Path) -> None:
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg()) as world:
        await world.submit([EntityUpsert(tick=1, character=hero(10, 10))])
        assert (await world.find_player("alice")) == hero(10, 10)
        # Region (0, 0) → region (1, -1), in one atomic batch with a later move back inside (1,-1).
        await world.submit(
            [
                EntityMove(tick=2, entity_id="hero-1", from_x=10, from_y=10, to_x=600, to_y=-5),
                EntityMove(tick=2, entity_id="hero-1", from_x=600, from_y=-5, to_x=601, to_y=-6),
            ]
        )
        assert all(e.id != "hero-1" for e in (await world.chunk(0, 0)).entities)
        [moved] = [e for e in (await world.chunk(9, -1)).entities if e.id == "hero-1"]
        assert (moved.x, moved.y, moved.given_name) == (601, -6, "Ada")
        found = await world.find_player("alice")
        assert found is not None and (found.x, found.y) == (601, -6)
        assert await world.find_player("bob") is None
        await world.flush()
    async with open_world(tmp_path, cfg()) as world:
        found = await world.find_player("alice")
        assert found is not None and (found.x, found.y) == (601, -6)
        assert all(e.id != "hero-1" for e in (await world.chunk(0, 0)).entities)
        await world.submit([EntityRemove(tick=3, entity_id="hero-1", x=601, y=-6)])
        assert await world.find_player("alice") is None


async def test_cache_stays_within_budget_on_a_long_walk(tmp_path: Path) -> None:
    await new_world(tmp_path)
    budget = 1 << 20
    async with open_world(tmp_path, cfg(cache_bytes=budget, view_radius=1, hysteresis=1)) as world:
        walked = 0
        step = 0
        while walked < 10 * budget:  # touch 10x what the cache can hold
            world.update_interest("walker", step * 64 + 32, 32)
            walked += (await world.chunk(step, 0)).nbytes
            st = world.stats()
            # Over budget only if what is left is pinned (the walker's view) or dirty.
            assert st.cache_bytes <= budget or st.cache_bytes == st.cache.held_bytes
            assert st.cache.pinned <= 12  # 3 rows x (3 in view + 1 kept by hysteresis)
            step += 1
        st = world.stats()
        assert st.cache_evictions > step // 2
        world.drop_interest("walker")
        assert world.stats().cache.pinned == 0
        assert world.stats().cache_bytes <= budget


async def test_many_regions_flush_while_chunks_load_and_players_move(tmp_path: Path) -> None:
    await new_world(tmp_path, region_size=1)
    conf = cfg(flush_interval_ms=5, flush_concurrency=32, view_radius=2, cache_bytes=8 << 20)
    n_regions = 1000
    async with open_world(tmp_path, conf) as world:

        async def writer(w: int) -> None:
            for i in range(w, n_regions, 8):
                cx, cy = i % 40, i // 40
                await world.submit([TileSet(tick=1, x=cx * 64 + 1, y=cy * 64 + 2, tile=1000 + i)])

        async def player(p: int) -> None:
            for step in range(40):
                world.update_interest(f"p{p}", step * 40, p * 200)
                await world.chunk(step * 40 // 64, p * 200 // 64)
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            for w in range(8):
                tg.start_soon(writer, w)
            for p in range(4):
                tg.start_soon(player, p)
        await world.flush()
        st = world.stats()
        assert st.flushes >= n_regions
        assert st.queue_depth == 0
        # Everything passed: at most the segment being written to is left (under 1 MiB).
        assert st.journal_segments <= 1
    regions = list((tmp_path / "regions").iterdir())
    assert len(regions) == n_regions
    async with open_world(tmp_path, conf) as world:
        for i in range(0, n_regions, 37):
            cx, cy = i % 40, i // 40
            assert int((await world.chunk(cx, cy)).tiles[2, 1]) == 1000 + i


async def test_cancelled_flush_against_a_slow_store_loses_and_tears_nothing(
    tmp_path: Path,
) -> None:
    fs = GatedFS()
    await new_world(tmp_path, fs)
    conf = Config(runtime=RuntimeSettings(flush_interval_ms=60_000))
    async with open_world(tmp_path, conf, fs=fs) as world:
        await world.submit([TileSet(tick=1, x=i, y=0, tile=300 + i) for i in range(4)])
        await world.flush()
        await world.submit([TileSet(tick=2, x=i, y=0, tile=400 + i) for i in range(4)])
        await world.submit([TileSet(tick=2, x=600, y=0, tile=9)])
        fs.delay = 0.2
        with anyio.move_on_after(0.05) as scope:
            await world.flush()
        assert scope.cancelled_caught
        image = fs.durable_image()
        row = (await world.chunk(0, 0)).tiles[0]
        assert [int(v) for v in row[:4]] == [400, 401, 402, 403]
        fs.delay = 0.0
        await world.flush()
        assert world.stats().queue_depth == 0
    for fsx in (image, fs.durable_image()):
        for name in fsx.listdir("regions"):
            key = parse_region_key(name)
            if key is None:
                continue  # a temp file: never read as a region
            rx, ry = key
            decode_region(fsx.read(f"regions/{name}"), rx=rx, ry=ry, path=name)
        async with open_world(tmp_path, conf, fs=fsx) as world:
            row = (await world.chunk(0, 0)).tiles[0]
            assert [int(v) for v in row[:4]] == [400, 401, 402, 403]
            assert int((await world.chunk(9, 0)).tiles[0, 600 % 64]) == 9


async def test_interest_pins_and_prefetches_in_priority_order(tmp_path: Path) -> None:
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg(view_radius=2, hysteresis=1)) as world:
        world.update_interest("p", 32, 32)
        with anyio.fail_after(10):
            while world.stats().loader.loads < 25:
                await anyio.sleep(0.01)
        st = world.stats()
        assert st.cache.pinned == 25
        hits = st.cache_hits
        await world.chunk(2, 2)
        assert world.stats().cache_hits == hits + 1
        # Four chunks east: columns -2..0 are beyond radius + hysteresis (3) and released;
        # columns 1..2 are kept, 3..6 newly pinned.
        world.update_interest("p", 64 * 4 + 32, 32)
        assert world.stats().cache.pinned == 5 * 2 + 5 * 4
        world.drop_interest("p")
        assert world.stats().cache.pinned == 0


async def test_stats_and_exports(tmp_path: Path) -> None:
    await new_world(tmp_path)
    async with open_world(tmp_path, cfg()) as world:
        await world.submit([TileSet(tick=1, x=0, y=0, tile=1)])
        await world.chunk(0, 0)
        st = world.stats()
        assert st.queue_depth == 1 and st.dirty_regions == 1
        assert st.journal_lag_bytes > 0 and st.cache_misses >= 1
        assert st.load_p50_ms >= 0
    assert streamer.open_world is open_world
    for name in streamer.__all__:
        assert hasattr(streamer, name)


def test_region_file_key_layout() -> None:
    assert region_key(0, -3) == "regions/r.0.-3.region"


# -- write-path fast paths (batch routing, tile fast checks, queue segments) ---------------


async def test_tile_batch_fast_checks_match_the_general_ones(tmp_path: Path) -> None:
    await new_world(tmp_path, bound_tiles=1000)
    async with open_world(tmp_path, cfg()) as world:
        ok = TileSet(tick=1, x=1, y=1, tile=1)
        for bad in (
            TileSet(tick=True, x=1, y=1, tile=1),
            TileSet(tick=1, x=1.0, y=1, tile=1),  # type: ignore[arg-type]
            TileSet(tick=1, x=1, y="1", tile=1),  # type: ignore[arg-type]
            TileSet(tick=1, x=1, y=1, tile=1 << 64),
        ):
            with pytest.raises(DeltaError, match="malformed"):
                await world.submit([ok, bad])
        with pytest.raises(DeltaError, match=r"delta #1 .*tick must be >= 0"):
            await world.submit([ok, TileSet(tick=-1, x=1, y=1, tile=1)])
        with pytest.raises(DeltaError, match=r"delta #2 .*65535"):
            await world.submit([ok, ok, TileSet(tick=1, x=1, y=1, tile=1 << 16)])
        with pytest.raises(DeltaError, match=r"delta #1 .*\(-1000, 5\)"):
            await world.submit([ok, TileSet(tick=1, x=-1000, y=5, tile=1)])
        assert world.stats().queue_depth == 0  # nothing of a refused batch was queued
        await world.submit([ok, TileSet(tick=1, x=-999, y=999, tile=65535)])
        assert int((await world.chunk(-16, 15)).tiles[999 % 64, -999 % 64]) == 65535


async def test_batch_routed_once_keeps_order_per_region_and_survives_replay(
    tmp_path: Path,
) -> None:
    await new_world(tmp_path)
    # Interleaved regions, negative coordinates, one tile edited twice (the later edit wins),
    # and a cached chunk that must get the edits applied in place.
    batch = [
        TileSet(tick=3, x=-1, y=-1, tile=10),
        TileSet(tick=3, x=600, y=5, tile=11),
        TileSet(tick=3, x=-1, y=-1, tile=12),
        TileSet(tick=4, x=-513, y=0, tile=13),
        TileSet(tick=4, x=601, y=5, tile=14),
        FeatureAdd(tick=4, feature=Feature(id="f-ore", kind="ore", x=602, y=6)),
    ]
    async with open_world(tmp_path, cfg()) as world:
        before = await world.chunk(-1, -1)  # cached
        await world.submit(batch)
        cached = await world.chunk(-1, -1)
        assert cached is not before and int(cached.tiles[63, 63]) == 12
        q = world._queues.regions
        assert [e.delta for e in q[(-1, -1)].entries] == [batch[0], batch[2]]
        assert [e.delta for e in q[(1, 0)].entries] == [batch[1], batch[4], batch[5]]
        assert [e.delta for e in q[(-2, 0)].entries] == [batch[3]]
        assert q[(1, 0)].per_chunk[(9, 0)] == 3
        with pytest.raises(DeltaError, match="backwards"):
            await world.submit(
                [TileSet(tick=5, x=0, y=-1, tile=1), TileSet(tick=3, x=600, y=5, tile=1)]
            )
        # Simulate a crash: nothing folded, the journal is the truth.
        world._journal.begin_close()  # type: ignore[union-attr]
        world._closed = True
        world._closing = True
        tg, world._tg = world._tg, None
        assert tg is not None
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)
        await world._release()
    async with open_world(tmp_path, cfg()) as world:
        assert world.stats().replayed_deltas == len(batch)
        assert int((await world.chunk(-1, -1)).tiles[63, 63]) == 12
        c = await world.chunk(9, 0)
        assert [int(c.tiles[5, 600 % 64]), int(c.tiles[5, 601 % 64])] == [11, 14]
        assert "f-ore" in {f.id for f in c.features}
        assert int((await world.chunk(-9, 0)).tiles[0, -513 % 64]) == 13


def test_queue_segments_take_and_fold_across_batches() -> None:
    from streamer.runtime.queues import Queued, RegionQueue

    q = RegionQueue((0, 0), lpt=0)
    ts = [TileSet(tick=t, x=i, y=0, tile=1) for i, t in enumerate([1, 1, 2, 2, 3])]
    q.extend([1, 1, 2], [(0, 0), (0, 0), (0, 0)], ts[:3])
    q.push(Queued(2, (1, 0), ts[3]))
    q.extend([3], [(0, 0)], ts[4:])
    assert len(q.entries) == 5 and q.entries[0].delta is ts[0] and q.entries[-1].tick == 3
    assert q.entries[3].chunk == (1, 0)
    assert q.for_chunk((1, 0)) == [ts[3]]
    with pytest.raises(TickAlreadyProcessed):
        q.check_ticks([0])
    with pytest.raises(DeltaError, match="backwards"):
        q.check_ticks([3, 2])
    q.check_ticks([3, 3, 4])
    taken = q.take(1)  # cuts the first segment in the middle
    assert [e.delta for e in taken] == ts[:2] and q.floor == 1
    assert q.folded(taken, 1) == []
    assert [e.delta for e in q.entries] == ts[2:] and q.per_chunk[(0, 0)] == 2
    taken = q.take(2)
    assert [e.delta for e in taken] == ts[2:4]
    assert q.folded(taken, 2) == [(1, 0)]
    assert [e.delta for e in q.entries] == ts[4:] and q.dirty_since is not None
    assert q.folded(q.take(3), 3) == [(0, 0)]
    assert not q.entries and q.clean and q.lpt == 3


def test_journal_payload_reuse_is_byte_identical() -> None:
    import msgspec

    from streamer.runtime.journal import JournalBatch, encode_batch, encode_batch_raw

    deltas: list[TileSet | FeatureAdd] = [
        TileSet(tick=(1 << 64) - 1, x=-(1 << 40), y=3, tile=65535),
        FeatureAdd(tick=2, feature=Feature(id="f", kind="tree", x=1, y=2)),
    ]
    for seq in (1, 1 << 40):
        raw = encode_batch_raw(seq, msgspec.msgpack.encode(deltas))
        assert raw == encode_batch(JournalBatch(seq=seq, deltas=list(deltas)))


def test_chunk_edit_packed_merge_matches_a_dict_merge() -> None:
    import random

    from streamer.runtime.regionstate import ChunkEdit
    from streamer.schema.codec import pack_tiles
    from streamer.schema.records import ChunkRecord

    rng = random.Random(7)
    for n, m in [(1, 0), (5, 3), (300, 300), (4096, 50), (10, 4096)]:
        idx = sorted(rng.sample(range(4096), n))
        val = [rng.randrange(65536) for _ in idx]
        ti, tv = pack_tiles(idx, val)
        rec = ChunkRecord(
            cx=-1,
            cy=2,
            generator="g",
            generator_version=1,
            base_fingerprint=0,
            tile_idx=ti,
            tile_val=tv,
        )
        edits = [
            TileSet(
                tick=1,
                x=-64 + rng.randrange(64),
                y=128 + rng.randrange(64),
                tile=rng.randrange(65536),
            )
            for _ in range(m)
        ]
        expect = dict(zip(idx, val, strict=True))
        for e in edits:
            expect[(e.y % 64) * 64 + e.x % 64] = e.tile
        keys = sorted(expect)
        edit = ChunkEdit.from_record(rec, where="t")
        edit.apply_all(edits)
        assert edit.packed_tiles() == pack_tiles(keys, [expect[k] for k in keys])
        edit = ChunkEdit.from_record(rec, where="t")
        edit.apply_all(edits)
        assert edit.tiles == expect


def test_fold_runs_in_short_steps_and_counts_items_per_chunk() -> None:
    """A fold is a generator of short steps (the world runs a few on its loop and the rest
    in a thread), gives the same result however it is driven, and reports per-chunk counts
    so the loop's ``folded`` need not walk the items again."""
    from streamer.runtime.queues import RegionQueue
    from streamer.runtime.regionstate import _STEP_ITEMS, fold_region, fold_steps
    from streamer.schema.codec import ChunkCodec, unpack_tiles

    gen = TerrainGenerator(7)
    codec = ChunkCodec("msgpack")
    chunks = [(0, 0), (1, 0), (0, 1)]
    q = RegionQueue((0, 0), lpt=0)
    n = 5000  # more than one grouping step
    ticks = [1 + i // 100 for i in range(n)]
    keys = [chunks[i % 3] for i in range(n)]
    # Tile edits overwriting each other (i % 64 repeats), with a feature now and then in
    # between: the result must be what applying everything in order gives.
    deltas: list[TileSet | FeatureAdd] = [
        FeatureAdd(tick=t, feature=Feature(id=f"f{i}", kind="well", x=c[0] * 64 + 3, y=c[1] * 64))
        if i % 997 == 0
        else TileSet(tick=t, x=c[0] * 64 + i % 64, y=c[1] * 64, tile=i % 7)
        for i, (t, c) in enumerate(zip(ticks, keys, strict=True))
    ]
    q.extend(ticks, keys, deltas)
    items = q.take(ticks[-1])
    kw = dict(
        key=(0, 0),
        generation=0,
        lpt=0,
        items=items,
        upgraded=(),
        codec=codec,
        gen=gen,
        writer="t",
        encoding="msgpack",
        region_size=8,
    )
    plain = fold_region({}, **kw)
    steps = fold_steps({}, **kw)  # type: ignore[arg-type]
    n_steps = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            stepped = done.value
            break
        n_steps += 1
    assert plain.chunks == stepped.chunks and plain.lpt == stepped.lpt
    # Grouping n items takes n // _STEP_ITEMS steps, and each chunk two more.
    assert n_steps >= n // _STEP_ITEMS + 2 * len(chunks)
    assert plain.lpt == ticks[-1]
    # Against a model that applies each delta in order.
    want_tiles: dict[tuple[int, int], dict[int, int]] = {c: {} for c in chunks}
    want_features: dict[tuple[int, int], list[str]] = {c: [] for c in chunks}
    for c, d in zip(keys, deltas, strict=True):
        if isinstance(d, TileSet):
            want_tiles[c][(d.y % 64) * 64 + d.x % 64] = d.tile
        else:
            want_features[c].append(d.feature.id)
    added = {d.feature.id for d in deltas if isinstance(d, FeatureAdd)}
    assert added and all(want_features.values())
    for c in chunks:
        rec = codec.decode(plain.chunks[c], where="t").record
        idx, val = unpack_tiles(rec.tile_idx, rec.tile_val, where="t")
        assert dict(zip(idx.tolist(), val.tolist(), strict=True)) == want_tiles[c]
        # The chunk's generated features come first; ours follow, in order.
        ours = [f.id for f in rec.features if f.id in added]
        assert ours == want_features[c]
    assert dict(plain.counts) == {c: keys.count(c) for c in chunks}
    assert sorted(q.folded(items, plain.lpt, counts=plain.counts)) == sorted(chunks)
    assert not q.entries and not q.per_chunk and q.lpt == ticks[-1]
