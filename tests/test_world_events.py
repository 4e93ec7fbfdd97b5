"""``world.events()``: bounded per-subscriber streams that drop oldest, history, end at close."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec

import streamer
from streamer import PlayerRelocated, ScrubAlert, SnapshotTaken, TileSet, open_world
from streamer.config import Config, ScrubSettings, StorageSettings
from streamer.runtime.events import AnyEvent, EventHub
from streamer.storage.local import LocalStore
from streamer.worlddir import create_world


def alert(i: int) -> ScrubAlert:
    return ScrubAlert(kind="checksum", message=f"m{i}")


async def drain(stream: streamer.EventStream) -> list[AnyEvent]:
    out: list[AnyEvent] = []
    while True:
        try:
            out.append(stream._receive.receive_nowait())
        except anyio.WouldBlock:
            return out


async def test_slow_subscriber_drops_oldest_and_never_blocks_the_emitter() -> None:
    hub = EventHub()
    async with hub.subscribe(buffer=2) as slow, hub.subscribe(buffer=100) as fast:
        for i in range(5):
            hub.emit(alert(i))  # synchronous: returns at once however full the buffers are
        assert [e.message for e in await drain(slow)] == ["m3", "m4"]  # type: ignore[union-attr]
        assert slow.dropped == 3 and fast.dropped == 0 and hub.dropped == 3
        assert len(await drain(fast)) == 5
    hub.close()


async def test_history_and_end_of_stream() -> None:
    hub = EventHub(history=3)
    for i in range(5):
        hub.emit(alert(i))
    async with hub.subscribe() as late, hub.subscribe(history=False) as fresh:
        hub.emit(alert(5))
        hub.close()
        assert [e.message async for e in late] == ["m2", "m3", "m4", "m5"]  # type: ignore[union-attr]
        assert [e.message async for e in fresh] == ["m5"]  # type: ignore[union-attr]
    async with hub.subscribe() as after_close:  # a closed hub hands out ended streams
        assert len([e async for e in after_close]) == 3


async def test_world_events_end_when_the_world_closes(tmp_path: Path) -> None:
    store = await LocalStore.open(tmp_path, fsync=False)
    await create_world(store, seed=1)
    await store.aclose()
    conf = Config(storage=StorageSettings(fsync=False), scrub=ScrubSettings(interval_s=0))
    got: list[AnyEvent] = []
    async with anyio.create_task_group() as tg:
        async with open_world(tmp_path, conf) as world:
            events = world.events()

            async def consume() -> None:
                async with events:
                    async for ev in events:
                        got.append(ev)

            tg.start_soon(consume)
            await world.submit([TileSet(tick=1, x=0, y=0, tile=1)])
            info = await world.snapshot()
        # consume() returns by itself: the stream ended with the world.
    assert [type(e) for e in got] == [SnapshotTaken]
    assert isinstance(got[0], SnapshotTaken) and got[0].snapshot == info.id
    assert world.stats().recovery.events_emitted == 1


def test_events_are_exported_tagged_structs() -> None:
    ev = PlayerRelocated(
        player_id="p",
        entity_id="e",
        from_region=(0, 0),
        from_pos=(1, 2),
        to=(600, 3),
        to_region=(1, 0),
        reason="region_inactive",
    )
    assert isinstance(ev, streamer.Event)
    raw = msgspec.json.decode(msgspec.json.encode(ev))
    assert raw["type"] == "player_relocated" and raw["to"] == [600, 3]
    back = msgspec.json.decode(msgspec.json.encode(ev), type=streamer.AnyEvent)
    assert back == ev
    for name in (
        "RegionRestored",
        "RegionInactiveEvent",
        "PlayerRelocated",
        "ScrubAlert",
        "SnapshotTaken",
    ):
        assert name in streamer.__all__
