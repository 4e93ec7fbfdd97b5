"""Recovery inside the running world: the ladder at load, inactive regions, relocated players,
and snapshots taken by the runtime (scheduled and on demand)."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
import numpy as np
import pytest

from streamer import (
    Character,
    EntityUpsert,
    PlayerRelocated,
    RegionInactive,
    RegionInactiveEvent,
    RegionRestored,
    SnapshotTaken,
    TileSet,
    open_world,
)
from streamer.cli.main import main as cli_main
from streamer.config import (
    Config,
    RuntimeSettings,
    ScrubSettings,
    SnapshotSettings,
    StorageSettings,
)
from streamer.format.journal import MAX_COMMIT_BYTES
from streamer.format.region import decode_index, decode_region, region_key
from streamer.recovery.inactive import load_inactive
from streamer.recovery.incidents import IncidentLog
from streamer.recovery.quarantine import list_quarantine
from streamer.recovery.snapshots import (
    is_valid_snapshot,
    list_snapshots,
    snapshot_file_key,
)
from streamer.runtime.events import AnyEvent, EventStream
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world
from streamer.worldgen import TerrainGenerator

SEED = 23
A = (0, 0)  # region of tiles (0..511, 0..511)
B = (1, 0)  # region of tiles (512..1023, 0..511)


def cfg(*, snapshots: SnapshotSettings | None = None) -> Config:
    return Config(
        runtime=RuntimeSettings(flush_interval_ms=60_000),
        storage=StorageSettings(fsync=False),
        scrub=ScrubSettings(interval_s=0),
        snapshots=snapshots or SnapshotSettings(),
    )


async def new_world(path: Path) -> Path:
    store = await LocalStore.open(path, fsync=False)
    await create_world(store, seed=SEED)
    await store.aclose()
    return path


def corrupt(path: Path, region: tuple[int, int]) -> bytes:
    """Flip a byte in the middle of a region file (a chunk payload or the index)."""
    f = path / region_key(*region)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return bytes(data)


def corrupt_chunk(path: Path, region: tuple[int, int], chunk: tuple[int, int]) -> None:
    """Damage one chunk frame's payload only: the other chunks stay salvageable."""
    f = path / region_key(*region)
    data = bytearray(f.read_bytes())
    idx = decode_index(bytes(data), rx=region[0], ry=region[1], path=str(f))
    assert not isinstance(idx, int)
    entry = idx.entries[chunk]
    data[entry.offset + entry.length - 1] ^= 0xFF
    f.write_bytes(bytes(data))


def crash_copy(src: Path, dst: Path) -> Path:
    """The world directory as a crash would leave it at this instant.

    With fsync off every completed write is already in the files, so a copy taken while the
    world is open between awaits is exactly what a process kill would leave behind.
    """
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


async def next_event(events: EventStream, kind: type[AnyEvent]) -> AnyEvent:
    with anyio.fail_after(20):  # a bound against hanging, not a timing assertion
        async for ev in events:
            if isinstance(ev, kind):
                return ev
    raise AssertionError(f"stream ended without a {kind.__name__}")


def tile(chunk_tiles: np.ndarray, x: int, y: int) -> int:
    return int(chunk_tiles[y % 64, x % 64])


async def kinds(path: Path) -> list[str]:
    store = await LocalStore.open(path, fsync=False)
    try:
        return [i.kind for i in (await IncidentLog(store).read()).incidents]
    finally:
        await store.aclose()


# -- restored from a snapshot --------------------------------------------------------------


async def test_corrupt_region_is_restored_and_journal_deltas_above_the_snapshot_reapplied(
    tmp_path: Path,
) -> None:
    live = await new_world(tmp_path / "live")
    async with open_world(live, cfg()) as world:
        await world.submit([TileSet(tick=1, x=1, y=1, tile=11)])
        snap = await world.snapshot()
        assert snap.last_processed_tick[region_key(*A)] == 1
        # Tick 2 is folded into A's file (lpt 2) but its journal segment is not yet collected
        # (B's delta in the same segment pins it): a crash here leaves both.
        await world.submit(
            [TileSet(tick=2, x=2, y=1, tile=22), TileSet(tick=2, x=600, y=1, tile=5)]
        )
        await world._flush_region(world._queues.regions[A], True)
        crashed = crash_copy(live, tmp_path / "crashed")
    assert (
        decode_region(
            (crashed / region_key(*A)).read_bytes(), rx=0, ry=0, path="a"
        ).header.last_processed_tick
        == 2
    )
    corrupt(crashed, A)

    async with open_world(crashed, cfg()) as world:
        async with world.events() as events:
            ev = await next_event(events, RegionRestored)
        assert isinstance(ev, RegionRestored)
        assert ev.region == A and ev.source == "snapshot" and ev.snapshot == snap.id
        c = await world.chunk(0, 0)
        assert tile(c.tiles, 1, 1) == 11  # from the snapshot
        assert tile(c.tiles, 2, 1) == 22  # from the journal, above the snapshot's tick
        assert tile((await world.chunk(9, 0)).tiles, 600, 1) == 5
        assert world.stats().recovery.regions_restored == 1

    store = await LocalStore.open(crashed, fsync=False)
    quarantined = await list_quarantine(store)
    assert len(quarantined) == 1 and quarantined[0].endswith("r.0.0.region")
    await store.aclose()
    assert {"checksum_failure", "restored_from_snapshot"} <= set(await kinds(crashed))
    assert "data_loss" not in await kinds(crashed)  # the journal covered the gap

    async with open_world(crashed, cfg()) as world:  # the repair is durable
        c = await world.chunk(0, 0)
        assert (tile(c.tiles, 1, 1), tile(c.tiles, 2, 1)) == (11, 22)


async def test_region_failing_while_open_is_restored_with_journal_reapplied(
    tmp_path: Path,
) -> None:
    path = await new_world(tmp_path)
    async with open_world(path, cfg()) as world:
        await world.submit([TileSet(tick=1, x=1, y=1, tile=11)])
        await world.snapshot()
        await world.submit(
            [TileSet(tick=2, x=2, y=1, tile=22), TileSet(tick=2, x=600, y=1, tile=5)]
        )
        await world._flush_region(world._queues.regions[A], True)
        # A clean region leaves memory (as _evict_regions does beyond its budget), its file
        # is damaged on disk, and the next load must repair it without losing tick 2.
        del world._regions[A]
        del world._queues.regions[A]
        for cx in range(8):
            for cy in range(8):
                world._cache.invalidate((cx, cy))
        corrupt(path, A)
        async with world.events(history=False) as events:
            c = await world.chunk(0, 0)
            ev = await next_event(events, RegionRestored)
        assert isinstance(ev, RegionRestored) and ev.reapplied == 1 and not ev.lost
        assert (tile(c.tiles, 1, 1), tile(c.tiles, 2, 1)) == (11, 22)
        # New deltas keep their order after the re-applied ones.
        await world.submit([TileSet(tick=3, x=2, y=1, tile=33)])
        assert tile((await world.chunk(0, 0)).tiles, 2, 1) == 33
    async with open_world(path, cfg()) as world:
        c = await world.chunk(0, 0)
        assert (tile(c.tiles, 1, 1), tile(c.tiles, 2, 1)) == (11, 33)


async def test_loss_beyond_the_journal_is_reported(tmp_path: Path) -> None:
    path = await new_world(tmp_path)
    async with open_world(path, cfg()) as world:
        await world.submit([TileSet(tick=1, x=1, y=1, tile=11)])
        await world.snapshot()
        await world.submit([TileSet(tick=2, x=2, y=1, tile=22)])
    # Clean close: tick 2 is folded and its journal segment deleted.
    corrupt(path, A)
    async with open_world(path, cfg()) as world:
        async with world.events(history=False) as events:
            c = await world.chunk(0, 0)
            ev = await next_event(events, RegionRestored)
        assert isinstance(ev, RegionRestored) and "1 < t <= 2" in ev.lost
        assert tile(c.tiles, 1, 1) == 11
        assert tile(c.tiles, 2, 1) == TerrainGenerator(SEED).chunk_tiles(0, 0)[1, 2]
    assert "data_loss" in await kinds(path)


# -- no valid copy: inactive ---------------------------------------------------------------


def alice(x: int, y: int) -> Character:
    return Character(id="hero-a", x=x, y=y, player_id="alice", given_name="Alice", hp=77)


def expected_landing(origin: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    gen = TerrainGenerator(SEED)
    ox, oy = origin
    ring = sorted(
        ((ox + dx, oy + dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)),
        key=lambda k: ((k[0] - ox) ** 2 + (k[1] - oy) ** 2, k[1], k[0]),
    )
    for cand in ring:
        spawn = gen.region_defaults(*cand, 8).spawn
        if (spawn[0] // 512, spawn[1] // 512) != origin:
            return (spawn[0] // 512, spawn[1] // 512), spawn
    raise AssertionError("no landing in ring 1")


async def test_unrecoverable_region_goes_inactive_and_players_are_relocated(
    tmp_path: Path,
) -> None:
    path = await new_world(tmp_path)
    async with open_world(path, cfg()) as world:
        await world.submit(
            [
                EntityUpsert(tick=1, character=alice(10, 10)),
                TileSet(tick=1, x=600, y=1, tile=5),
                TileSet(tick=1, x=300, y=300, tile=9),
            ]
        )
    # No snapshot exists. Alice's chunk stays intact, so salvage gives her record back.
    corrupt_chunk(path, A, (4, 4))

    land_region, land = expected_landing(A)
    async with open_world(path, cfg()) as world:
        async with world.events() as events:
            with pytest.raises(RegionInactive):
                await world.chunk(0, 0)
            ev = await next_event(events, RegionInactiveEvent)
            moved = await next_event(events, PlayerRelocated)
        assert isinstance(ev, RegionInactiveEvent) and ev.region == A
        assert isinstance(moved, PlayerRelocated)
        assert moved.player_id == "alice" and moved.entity_id == "hero-a"
        assert moved.from_region == A and moved.from_pos == (10, 10)
        assert (moved.to_region, moved.to) == (land_region, land)

        # A batch touching the inactive region is refused whole.
        with pytest.raises(RegionInactive):
            await world.submit(
                [TileSet(tick=5, x=600, y=1, tile=6), TileSet(tick=5, x=3, y=3, tile=6)]
            )
        with pytest.raises(RegionInactive):
            await world.chunk(7, 7)
        assert tile((await world.chunk(9, 0)).tiles, 600, 1) == 5
        # Other regions keep serving and accepting deltas.
        await world.submit([TileSet(tick=6, x=600, y=1, tile=7)])
        assert tile((await world.chunk(9, 0)).tiles, 600, 1) == 7
        # Terrain of the inactive region is still available to operators.
        terrain = await world.terrain(0, 0)
        assert np.array_equal(terrain, TerrainGenerator(SEED).chunk_tiles(0, 0))

        found = await world.find_player("alice")
        assert found is not None and (found.x, found.y) == land and found.hp == 77
        assert world.inactive_regions == {A}
        assert world.stats().recovery.players_relocated == 1

    assert {"checksum_failure", "data_loss", "region_inactive"} <= set(await kinds(path))

    # Inactive survives a reopen; the relocation was durable.
    async with open_world(path, cfg()) as world:
        with pytest.raises(RegionInactive):
            await world.chunk(0, 0)
        found = await world.find_player("alice")
        assert found is not None and (found.x, found.y) == land
        assert tile((await world.chunk(9, 0)).tiles, 600, 1) == 7

    store = await LocalStore.open(path, fsync=False)
    assert A in await load_inactive(store)
    await store.aclose()

    # `streamer region rebuild` brings the region back with generator defaults.
    rc = await anyio.to_thread.run_sync(cli_main, ["region", "rebuild", str(path), "0", "0"])
    assert rc == 0
    async with open_world(path, cfg()) as world:
        c = await world.chunk(0, 0)
        gen = TerrainGenerator(SEED)
        assert [n.id for n in c.entities] == [n.id for n in gen.chunk_defaults(0, 0, 8).npcs]
        assert not world.inactive_regions
        found = await world.find_player("alice")
        assert found is not None and (found.x, found.y) == land


async def test_players_of_a_region_inactive_at_open_are_relocated_from_the_journal(
    tmp_path: Path,
) -> None:
    live = await new_world(tmp_path / "live")
    async with open_world(live, cfg()) as world:
        await world.submit([EntityUpsert(tick=1, character=alice(10, 10))])
        await world.flush()
        await world.submit([EntityUpsert(tick=2, character=alice(20, 20))])
        await world._flush_region(world._queues.regions[A], True)
        await world.submit([TileSet(tick=3, x=600, y=1, tile=5)])
        crashed = crash_copy(live, tmp_path / "crashed")
    corrupt(crashed, A)
    # The journal touches A, so replay loads it at open: the ladder runs there, the region
    # goes inactive, and its journaled records are dropped but alice's newest is kept.
    async with open_world(crashed, cfg()) as world:
        assert world.inactive_regions == {A}
        async with world.events() as events:
            moved = await next_event(events, PlayerRelocated)
        assert isinstance(moved, PlayerRelocated) and moved.from_pos == (20, 20)
        assert tile((await world.chunk(9, 0)).tiles, 600, 1) == 5


# -- snapshots taken by the runtime --------------------------------------------------------


async def test_scheduled_snapshots_are_consistent_and_rotated(tmp_path: Path) -> None:
    path = await new_world(tmp_path / "w")
    conf = cfg(snapshots=SnapshotSettings(interval_s=0.02, keep=2, min_valid=0))
    acked_at: dict[str, int] = {}
    acked = 0
    async with open_world(path, conf) as world:
        async with world.events() as events:

            async def writer() -> None:
                nonlocal acked
                i = 0
                while True:
                    i += 1
                    # One batch across two regions: a consistent cut shows both or neither.
                    await world.submit(
                        [TileSet(tick=i, x=1, y=1, tile=i), TileSet(tick=i, x=600, y=1, tile=i)]
                    )
                    acked = i
                    await anyio.sleep(0.001)

            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                with anyio.fail_after(30):
                    while len(acked_at) < 4:
                        ev = await next_event(events, SnapshotTaken)
                        assert isinstance(ev, SnapshotTaken) and ev.reason == "scheduled"
                        acked_at[ev.snapshot] = acked
                tg.cancel_scope.cancel()
        assert world.stats().recovery.snapshots_taken >= 4

    store = await LocalStore.open(path, fsync=False)
    snaps = await list_snapshots(store)
    assert len(snaps) == 2  # rotation keeps `keep`
    for info in snaps:
        assert await is_valid_snapshot(store, info)
    await store.aclose()

    for info in snaps:
        if info.id not in acked_at:
            continue  # taken after the last event was read (e.g. during close)
        copy = tmp_path / f"copy-{info.id}"
        shutil.copytree(path / snapshot_file_key(info.id, ""), copy)
        async with open_world(copy, cfg()) as snap_world:
            a = tile((await snap_world.chunk(0, 0)).tiles, 1, 1)
            b = tile((await snap_world.chunk(9, 0)).tiles, 600, 1)
        assert a == b  # the cut never splits a batch
        assert 1 <= a <= acked_at[info.id]  # nothing that was not acknowledged yet


async def test_manual_snapshot_emits_event(tmp_path: Path) -> None:
    path = await new_world(tmp_path)
    async with open_world(path, cfg()) as world:
        await world.submit([TileSet(tick=1, x=1, y=1, tile=3)])
        async with world.events(history=False) as events:
            info = await world.snapshot(reason="before-event")
            ev = await next_event(events, SnapshotTaken)
        assert isinstance(ev, SnapshotTaken)
        assert (ev.snapshot, ev.reason) == (info.id, "before-event")
        assert info.last_processed_tick[region_key(*A)] == 1


async def test_a_running_worlds_snapshot_copies_regions_ahead_of_its_pause(
    tmp_path: Path,
) -> None:
    path = await new_world(tmp_path)
    async with open_world(path, cfg()) as world:
        await world.submit([TileSet(tick=1, x=1, y=1, tile=3)])
        first = await world.snapshot()
        await world.submit([TileSet(tick=2, x=1, y=1, tile=4)])
        second = await world.snapshot()
    region = region_key(*A)
    live = (path / region).stat().st_ino
    copies = [(path / snapshot_file_key(s.id, region)).stat().st_ino for s in (first, second)]
    assert live not in copies and copies[0] != copies[1]
    assert not (path / "snapshots" / ".staging").exists()
    store = await LocalStore.open(path, fsync=False)
    assert [await is_valid_snapshot(store, s) for s in (first, second)] == [True, True]
    await store.aclose()


async def test_preallocated_segments_leave_no_padding_or_spare_after_close(
    tmp_path: Path,
) -> None:
    path = await new_world(tmp_path / "w")
    conf = Config(
        runtime=RuntimeSettings(
            flush_interval_ms=60_000, journal_segment_bytes=1 << 20, journal_preallocate=True
        ),
        storage=StorageSettings(fsync=True),
        scrub=ScrubSettings(interval_s=0),
    )
    spare = path / "journal" / "spare.zero"
    async with open_world(path, conf) as world:
        with anyio.fail_after(30):  # zero-filled in the background after open
            while not world.stats().journal.spare_ready:
                await anyio.sleep(0.01)
        await world.submit([TileSet(tick=1, x=1, y=1, tile=3)])
        stats = world.stats().journal
        assert stats.segments_preallocated == 1
        [segment] = (path / "journal").glob("*.wal")
        spare_bytes = (1 << 20) + MAX_COMMIT_BYTES + 4096  # room for the last commit
        assert segment.stat().st_size == spare_bytes  # the spare, renamed, written in place
        with anyio.fail_after(30):  # the keeper makes the next one
            while not world.stats().journal.spare_ready:
                await anyio.sleep(0.01)
        assert spare.stat().st_size == spare_bytes
    # The final flush passed every segment; the close deleted the spare too.
    assert list((path / "journal").iterdir()) == []
    async with open_world(path, cfg()) as world:
        assert tile((await world.chunk(0, 0)).tiles, 1, 1) == 3


async def test_open_finishes_an_interrupted_restore_first(tmp_path: Path) -> None:
    from streamer.format.sealed import seal
    from streamer.recovery.snapshots import RESTORE_MARKER_KEY, RestoreMarker

    path = await new_world(tmp_path)
    async with open_world(path, cfg()) as world:
        await world.submit([TileSet(tick=1, x=1, y=1, tile=11)])
        snap = await world.snapshot()
        await world.submit([TileSet(tick=2, x=1, y=1, tile=22)])
    # A restore of `snap` whose marker is durable but whose file replacement never ran.
    store = await LocalStore.open(path, fsync=False)
    marker = RestoreMarker(snapshot=snap.id, pre_restore=None, started_at="2026-01-01T00:00:00Z")
    await store.put_atomic(RESTORE_MARKER_KEY, seal(marker))
    await store.aclose()
    async with open_world(path, cfg()) as world:
        assert tile((await world.chunk(0, 0)).tiles, 1, 1) == 11
    assert not (path / RESTORE_MARKER_KEY).exists()


async def test_player_whose_record_is_gone_everywhere_is_recreated_at_the_landing(
    tmp_path: Path,
) -> None:
    path = await new_world(tmp_path)
    async with open_world(path, cfg()) as world:
        await world.submit([EntityUpsert(tick=1, character=alice(10, 10))])
    corrupt_chunk(path, A, (0, 0))  # alice's own chunk; no snapshot, no journal left
    async with open_world(path, cfg()) as world:
        async with world.events() as events:
            with pytest.raises(RegionInactive):
                await world.chunk(0, 0)
            moved = await next_event(events, PlayerRelocated)
        assert isinstance(moved, PlayerRelocated)
        assert moved.from_pos is None and "record_lost" in moved.reason
        found = await world.find_player("alice")
        assert found is not None and (found.x, found.y) == moved.to
