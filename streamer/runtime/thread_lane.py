"""A worker thread of one's own, for the journal's commits: handed work without anyio's hops.

``anyio.to_thread.run_sync`` yields to the event loop twice before the thread even gets the
call (a checkpoint, then the capacity limiter's), and each yield puts the caller behind
every other ready task. On a busy loop that is a large share of a commit's cost: 16 shards
at 200,000 deltas/s waited 2.5-2.7 ms (p50) from ``submit`` to acknowledgement with it and
2.0-2.1 ms with a lane (``scripts/latency-probe --closed-first``, a slow stretch of the VM;
1.9-2.1 against 1.0-1.5 ms on a faster one, see ``docs/performance.md``).

A :class:`ThreadLane` runs calls in the order they were made, one at a time, on one thread
it starts on first use: the same ordering as a capacity limiter of 1. Cancellation is
``run_sync``'s (``abandon_on_cancel=False``): a call handed over always runs to the end,
and its caller gets its result or its exception even if cancelled meanwhile; an anyio
cancellation then lands at the caller's next checkpoint. Unlike ``run_sync``, a caller in a
scope that is already cancelled still hands its call over (there is no checkpoint before
it). Outside asyncio (anyio's other backends) it is ``run_sync`` with a limiter of 1.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar, TypeVarTuple

import anyio

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_Work = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


def _resolve(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # defensive: callers await it through a shield, nothing cancels it
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


async def outcome(fut: asyncio.Future[T]) -> T:
    """``fut``'s result, even if the caller is cancelled meanwhile: for work that runs on
    regardless (a thread's call, another process's request), whose outcome must reach its
    caller (a failed fsync that nobody hears of would leave acknowledged data unsynced).
    anyio cancels again at the caller's next checkpoint."""
    # ``asyncio.shield``, not a shielded anyio CancelScope: entering and leaving one cost
    # the loop's turn here, 0.6 ms of every acknowledgement (p50) at 200,000 deltas/s.
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with anyio.CancelScope(shield=True):
            await asyncio.wait([fut])
        return fut.result()


class ThreadLane:
    """Blocking calls, in order, on one thread of its own (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._asyncio: bool | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._closed = False

    async def run(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """``fn(*args)`` on the lane's thread, after every call handed over before it."""
        if self._closed:
            raise RuntimeError(f"thread lane {self._name!r} is closed")
        if self._asyncio is None:
            try:
                asyncio.get_running_loop()
                self._asyncio = True
            except RuntimeError:  # another anyio backend
                self._asyncio = False
                self._limiter = anyio.CapacityLimiter(1)
        if not self._asyncio:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, args, fut, loop))
        return await outcome(fut)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, fut, loop = item
            error: BaseException | None = None
            result: Any = None
            try:
                result = fn(*args)
            except StopIteration as exc:  # a Future refuses it; run_sync converts it too
                error = RuntimeError(f"{fn!r} raised StopIteration")
                error.__cause__ = exc
            except BaseException as exc:  # handed to the awaiting caller, as run_sync does
                error = exc
            try:
                loop.call_soon_threadsafe(_resolve, fut, result, error)
            except RuntimeError:  # the loop is closed: its caller is gone with it
                pass
            del item, fn, args, fut, loop, result, error  # nothing of a call outlives it here

    async def aclose(self) -> None:
        """Stop the thread once the calls handed over so far have run (idempotent)."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            await anyio.to_thread.run_sync(thread.join)
