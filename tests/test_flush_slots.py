"""FlushSlots: the world-wide bound on regions being flushed, taken n at a time, FIFO."""

from __future__ import annotations

import anyio

from streamer.runtime.flush_slots import FlushSlots


async def test_waiters_are_served_in_arrival_order_so_a_big_batch_is_not_starved() -> None:
    slots = FlushSlots(4)
    assert await slots.take(3) == 3
    got: list[int] = []

    async def take(n: int) -> None:
        got.append(await slots.take(n))

    async with anyio.create_task_group() as tg:
        tg.start_soon(take, 2)
        await anyio.sleep(0.01)
        tg.start_soon(take, 1)  # one slot is free, but the batch of 2 came first
        await anyio.sleep(0.01)
        assert got == [] and slots.free == 1
        slots.give(3)
    assert got == [2, 1] and slots.free == 1


async def test_a_cancelled_waiter_at_the_head_lets_the_others_through() -> None:
    slots = FlushSlots(4)
    await slots.take(4)
    got: list[int] = []

    async def take(n: int) -> None:
        got.append(await slots.take(n))

    async with anyio.create_task_group() as tg:
        async with anyio.create_task_group() as head:
            head.start_soon(take, 3)
            await anyio.sleep(0.01)
            tg.start_soon(take, 1)
            await anyio.sleep(0.01)
            slots.give(1)
            await anyio.sleep(0.01)
            assert got == []  # behind the batch of 3
            head.cancel_scope.cancel()
    assert got == [1] and slots.free == 0
    slots.give(4)
    assert slots.free == 4


async def test_a_batch_bigger_than_the_bound_takes_all_of_it() -> None:
    slots = FlushSlots(2)
    assert await slots.take(5) == 2
    assert slots.free == 0
    slots.give(2)
    assert slots.free == 2
