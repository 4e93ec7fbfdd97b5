"""Terrain generation in a worker process, off this process's GIL.

A chunk load is terrain generation (numpy, ~60-100 µs a chunk in batches) plus Python work:
decoding the record, applying its edits, and the event loop's share. In one process they
all take turns on one GIL, so a load thread's terrain waits for the loop and the loop waits
for it. Here the terrain of a load batch is computed in a worker process while this process
decodes and builds other batches: with several batches in flight the two halves run on two
cores (with a single batch in flight the stages run one after the other either way).

Only the tiles cross the boundary: chunk coordinates go out as int64 pairs, tiles come back as
the raw ``uint16`` bytes of the batch, ~8 KiB a chunk, with no pickling either way. The worker
only computes, so it can never touch the world's files; it is forked by the terrain server
(:mod:`streamer.runtime.terrain_server`) and exits on EOF, which comes when the world closes
its end or this process dies, even by SIGKILL.

It is an optimisation, never a dependency: until the worker is up, when it fails to start,
and after it dies, :meth:`TerrainProcess.tiles` returns ``None`` and the caller generates in a
thread, as with ``terrain_processes = 0``. A death is logged and counted, and a replacement
is started on a later load: ``RESTART_DELAY_S`` after the first failure, twice as long
after each further one without a batch served in between (up to ``MAX_RESTART_DELAY_S``),
so a platform that cannot run it (no ``SOCK_SEQPACKET``, no ``fork``) logs a few warnings,
not one every few seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Sequence
from typing import Final, Literal

import anyio
import anyio.to_thread
import numpy as np

from streamer.coords import CHUNK_SIZE
from streamer.runtime.terrain_server import spawn_worker
from streamer.subproc import FRAME_LEN
from streamer.worldgen.params import GeneratorParams

__all__ = [
    "MAX_RESTART_DELAY_S",
    "REPLY_TIMEOUT_S",
    "RESTART_DELAY_S",
    "TerrainProcess",
    "terrain_processes_for",
]

log = logging.getLogger(__name__)

#: Least time between two starts of the worker after a failure.
RESTART_DELAY_S: Final = 5.0
MAX_RESTART_DELAY_S: Final = 300.0
#: Longest wait for a reply (a batch takes milliseconds); a worker that takes longer is
#: killed and its batches are generated in threads.
REPLY_TIMEOUT_S: Final = 5.0
_CHUNK_BYTES: Final = CHUNK_SIZE * CHUNK_SIZE * 2


def terrain_processes_for(setting: int | Literal["auto"]) -> int:
    """Workers to use for ``runtime.terrain_processes``: ``"auto"`` means one when this
    machine has a second core for it, else none (a worker on a single core only adds
    copies)."""
    if setting != "auto":
        return setting
    return 1 if (os.cpu_count() or 1) >= 2 else 0


class _Pending:
    """One request's reply, filled in by the reader; ``None`` if the worker could not answer."""

    __slots__ = ("data", "done")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.data: bytes | None = None


class TerrainProcess:
    """One terrain worker process for one open world; see the module docstring.

    :meth:`run` (a task in the world's task group) starts the worker and reads its replies;
    :meth:`tiles` sends requests. Requests are pipelined: the worker always has the next
    batch waiting while this side handles the last reply, and replies come back in the
    order the requests went out. Used from one event loop.
    """

    def __init__(self, seed: int, params: GeneratorParams) -> None:
        self._seed = seed
        self._params = params
        self._sock: socket.socket | None = None
        self._pid = -1
        self._send_lock = anyio.Lock()
        #: Requests sent and not yet answered, in the order they were sent.
        self._pending: deque[_Pending] = deque()
        self._starting = False
        self._closed = False
        self._last_start = -MAX_RESTART_DELAY_S
        #: Failures since a batch was last served (sets the wait before the next start).
        self._failed_in_a_row = 0
        #: Batches whose terrain came from the worker.
        self.batches = 0
        #: Times the worker died, failed to start or answered out of step.
        self.failures = 0

    @property
    def running(self) -> bool:
        return self._sock is not None

    @property
    def pid(self) -> int:
        """The worker's pid, -1 when none is running."""
        return self._pid

    @property
    def outstanding(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    @property
    def restart_delay(self) -> float:
        """Seconds from the last start before another may begin."""
        if self._failed_in_a_row == 0:
            return 0.0
        return min(RESTART_DELAY_S * (1 << min(self._failed_in_a_row - 1, 16)), MAX_RESTART_DELAY_S)

    def should_start(self) -> bool:
        """Whether a start is due: no worker, none starting, and the restart delay passed."""
        return (
            not self._closed
            and not self._starting
            and self._sock is None
            and time.monotonic() - self._last_start >= self.restart_delay
        )

    async def run(self) -> None:
        """Start the worker (spawned in a thread: the first start in a process launches the
        terrain server), then read its replies until it dies or this task is cancelled.
        Never raises but for cancellation: on failure, loads go on in threads, logged."""
        if not self.should_start():
            return
        self._starting = True
        self._last_start = time.monotonic()
        try:
            pid, sock = await anyio.to_thread.run_sync(spawn_worker, self._seed, self._params)
        except Exception as exc:
            self.failures += 1
            self._failed_in_a_row += 1
            log.warning("terrain worker process did not start (%r); generating in threads", exc)
            return
        finally:
            self._starting = False
        if self._closed:  # closed while starting: nothing will ever use it
            sock.close()
            return
        self._sock, self._pid = sock, pid
        why: str | None = None
        try:
            while True:
                (n,) = FRAME_LEN.unpack(await _recv_exact(sock, FRAME_LEN.size))
                data = await _recv_exact(sock, n)
                if not self._pending:
                    self._lost(sock, "answered a request it was not sent", kill=True)
                    return
                pending = self._pending.popleft()
                pending.data = data
                pending.done.set()
        except anyio.ClosedResourceError:
            pass  # another task let it go (and said why)
        except (EOFError, OSError) as exc:
            why = f"died ({exc!r})"
        except Exception as exc:  # never the world's task group's problem
            why = f"could not be read ({exc!r})"
        finally:
            self._lost(sock, why)

    def _lost(self, sock: socket.socket, why: str | None, *, kill: bool = False) -> None:
        """The worker is gone, going or out of step: fail what waits on it and let it go.

        ``kill``: out of step, so it may be computing a batch nobody will read. Otherwise
        the EOF of closing our end stops it (a dead one's pid may already be reused).
        """
        if self._sock is not sock:
            return
        pid = self._pid
        self._sock, self._pid = None, -1
        # Wakes a task waiting on it (with ClosedResourceError) before its fd number can be
        # reused; every use goes through the socket object, which fails once closed.
        anyio.notify_closing(sock)
        sock.close()
        if kill:
            _kill(pid)
        while self._pending:
            self._pending.popleft().done.set()  # data None: generated in threads
        if why is not None and not self._closed:
            self.failures += 1
            self._failed_in_a_row += 1
            log.warning(
                "terrain worker process %d %s; generating in threads until a new one starts",
                pid,
                why,
            )

    async def tiles(self, keys: Sequence[tuple[int, int]]) -> bytes | None:
        """The tiles of ``keys`` as one ``uint16`` buffer of shape ``(len(keys), 64, 64)``,
        or ``None`` if the worker cannot give them (the caller generates them itself)."""
        sock = self._sock
        if not keys or sock is None:
            return None
        request = np.asarray(keys, dtype=np.int64).tobytes()
        pending = _Pending()
        async with self._send_lock:
            if self._sock is not sock:  # died while we waited for our turn
                return None
            try:
                await _send_all(sock, FRAME_LEN.pack(len(request)) + request)
            except (OSError, anyio.ClosedResourceError):
                return None  # the reader sees the worker gone and says so
            except BaseException:
                # Cancelled with part of a frame written: the stream is out of step.
                self._lost(sock, "was cut off mid-request", kill=True)
                raise
            if self._sock is not sock:  # lost while we wrote: nobody will answer
                return None
            self._pending.append(pending)
        # A waiter cancelled here leaves its entry: the reader still consumes the reply.
        with anyio.move_on_after(REPLY_TIMEOUT_S) as waited:
            await pending.done.wait()
        if waited.cancelled_caught:
            # Stopped, frozen or looping: never let a load wait on it for good.
            self._lost(sock, f"did not answer within {REPLY_TIMEOUT_S:g} s", kill=True)
            return None
        out = pending.data
        if out is None or len(out) != len(keys) * _CHUNK_BYTES:
            return None  # empty: it could not compute this batch; the thread says why
        self.batches += 1
        self._failed_in_a_row = 0
        return out

    async def aclose(self) -> None:
        """Stop the worker, if :meth:`run` has not already (its cancellation does)."""
        self._closed = True
        sock = self._sock
        if sock is not None:
            self._lost(sock, None)


async def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from non-blocking ``sock``. :raises EOFError: the worker closed it."""
    buf = bytearray()
    while len(buf) < n:
        try:
            part = sock.recv(n - len(buf))
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        if not part:
            raise EOFError
        buf += part
    return bytes(buf)


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await anyio.wait_writable(sock)


def _kill(pid: int) -> None:
    if pid > 0:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
