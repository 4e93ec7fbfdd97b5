"""ThreadLane: the journal's worker thread, handed calls without anyio's hops."""

from __future__ import annotations

import threading

import anyio
import pytest

from streamer.runtime.thread_lane import ThreadLane


async def test_calls_run_in_order_on_one_thread_of_its_own() -> None:
    lane = ThreadLane("lane-test")
    seen: list[tuple[int, str]] = []

    def record(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * i

    async with anyio.create_task_group() as tg:
        results: dict[int, int] = {}

        async def call(i: int) -> None:
            results[i] = await lane.run(record, i)

        for i in range(50):
            tg.start_soon(call, i)
    await lane.aclose()
    assert results == {i: i * i for i in range(50)}
    # Handed over in the order the tasks started; all on the lane's own thread.
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"lane-test"}
    assert threading.current_thread().name != "lane-test"


async def test_an_exception_reaches_the_caller_and_the_lane_goes_on() -> None:
    lane = ThreadLane("lane-test")

    def fail() -> None:
        raise OSError(5, "injected")

    with pytest.raises(OSError, match="injected"):
        await lane.run(fail)
    assert await lane.run(lambda: 7) == 7
    await lane.aclose()


async def test_a_cancelled_caller_waits_for_its_call_to_end() -> None:
    lane = ThreadLane("lane-test")
    started, release = threading.Event(), threading.Event()
    finished: list[bool] = []

    def slow() -> str:
        started.set()
        release.wait(10)
        finished.append(True)
        return "done"

    outcome: list[str] = []
    scope = anyio.CancelScope()

    async def caller() -> None:
        with scope:
            try:
                await lane.run(slow)
            except anyio.get_cancelled_exc_class():
                # Cancelled, and only once the call had ended: nothing it touches still moves.
                outcome.append("cancelled after end" if finished else "cancelled early")
                raise
        outcome.append("left")

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        await anyio.to_thread.run_sync(started.wait, 10)
        scope.cancel()
        await anyio.sleep(0.05)
        assert outcome == []  # still waiting for the call
        release.set()
    assert outcome == ["cancelled after end", "left"]
    assert await lane.run(lambda: 1) == 1  # the lane is still usable
    await lane.aclose()


async def test_close_stops_the_thread_after_queued_calls_and_refuses_new_ones() -> None:
    lane = ThreadLane("lane-test")
    await lane.run(lambda: None)
    threads = [t for t in threading.enumerate() if t.name == "lane-test"]
    assert len(threads) == 1
    await lane.aclose()
    assert not threads[0].is_alive()
    await lane.aclose()  # idempotent
    with pytest.raises(RuntimeError, match="lane-test.*closed"):
        await lane.run(lambda: None)


async def test_closing_an_unused_lane_starts_no_thread() -> None:
    lane = ThreadLane("lane-unused")
    await lane.aclose()
    assert not [t for t in threading.enumerate() if t.name == "lane-unused"]
