"""ThreadLane: the journal's worker thread, handed calls without anyio's hops."""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio
import pytest

from streamer.runtime.thread_lane import ThreadLane


async def test_calls_run_in_order_on_one_thread_of_its_own() -> None:
    lane = ThreadLane("lane-order")
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
    assert {name for _, name in seen} == {"lane-order"}
    assert threading.current_thread().name != "lane-order"


async def test_an_exception_reaches_the_caller_and_the_lane_goes_on() -> None:
    lane = ThreadLane("lane-error")

    def fail() -> None:
        raise OSError(5, "injected")

    with pytest.raises(OSError, match="injected"):
        await lane.run(fail)
    assert await lane.run(lambda: 7) == 7
    await lane.aclose()


async def test_a_cancelled_caller_gets_the_outcome_then_the_cancellation() -> None:
    lane = ThreadLane("lane-cancel")
    started, release = threading.Event(), threading.Event()
    finished: list[bool] = []

    def slow() -> str:
        started.set()
        release.wait(10)
        finished.append(True)
        return "done"

    def failing() -> None:
        started.set()
        release.wait(10)
        raise OSError(5, "fsync failed")

    outcome: list[object] = []

    async def caller(fn: Callable[[], object]) -> None:
        with scope:
            try:
                # As anyio's run_sync: the call's result (or error) reaches its caller even
                # though the scope was cancelled meanwhile, and only once the call has ended.
                outcome.append(("returned", await lane.run(fn), bool(finished)))
            except OSError as err:
                outcome.append(("raised", str(err)))
            await anyio.sleep(10)  # the cancellation lands at the next checkpoint
            outcome.append("not cancelled")
        outcome.append("left")

    for fn, expected in (
        (slow, [("returned", "done", True), "left"]),
        (failing, [("raised", "[Errno 5] fsync failed"), "left"]),
    ):
        started.clear()
        release.clear()
        outcome.clear()
        scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller, fn)
            await anyio.to_thread.run_sync(started.wait, 10)
            scope.cancel()
            await anyio.sleep(0.05)
            assert outcome == []  # still waiting for the call
            release.set()
        assert outcome == expected
    assert await lane.run(lambda: 1) == 1  # the lane is still usable
    await lane.aclose()


async def test_stop_iteration_reaches_the_caller_as_runtime_error() -> None:
    lane = ThreadLane("lane-stopiteration")

    def stop() -> None:
        raise StopIteration

    with anyio.fail_after(10), pytest.raises(RuntimeError, match="StopIteration"):
        await lane.run(stop)
    await lane.aclose()


async def test_close_stops_the_thread_after_queued_calls_and_refuses_new_ones() -> None:
    lane = ThreadLane("lane-close")
    await lane.run(lambda: None)
    threads = [t for t in threading.enumerate() if t.name == "lane-close"]
    assert len(threads) == 1
    await lane.aclose()
    assert not threads[0].is_alive()
    await lane.aclose()  # idempotent
    with pytest.raises(RuntimeError, match=r"'lane-close' is closed"):
        await lane.run(lambda: None)


async def test_closing_an_unused_lane_starts_no_thread() -> None:
    lane = ThreadLane("lane-unused")
    await lane.aclose()
    assert not [t for t in threading.enumerate() if t.name == "lane-unused"]
