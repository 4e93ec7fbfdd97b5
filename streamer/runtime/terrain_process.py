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
is started on a later load (at most one start every ``RESTART_DELAY_S``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from typing import Final, Literal

import anyio
import anyio.to_thread
import numpy as np

from streamer.coords import CHUNK_SIZE
from streamer.runtime.terrain_server import spawn_worker
from streamer.subproc import FRAME_LEN, read_exact, write_all
from streamer.worldgen.params import GeneratorParams

__all__ = ["RESTART_DELAY_S", "TerrainProcess", "terrain_processes_for"]

log = logging.getLogger(__name__)

#: Least time between two starts of the worker after a failure.
RESTART_DELAY_S: Final = 5.0
_CHUNK_BYTES: Final = CHUNK_SIZE * CHUNK_SIZE * 2


def terrain_processes_for(setting: int | Literal["auto"]) -> int:
    """Workers to use for ``runtime.terrain_processes``: ``"auto"`` means one when this
    machine has a second core for it, else none (a worker on a single core only adds
    copies)."""
    if setting != "auto":
        return setting
    return 1 if (os.cpu_count() or 1) >= 2 else 0


class TerrainProcess:
    """One terrain worker process for one open world; see the module docstring.

    Used from one event loop. Requests are served one at a time, in the order they come.
    """

    def __init__(self, seed: int, params: GeneratorParams) -> None:
        self._seed = seed
        self._params = params
        self._sock: socket.socket | None = None
        self._pid = -1
        self._lock = anyio.Lock()
        self._starting = False
        self._closed = False
        self._last_start = -RESTART_DELAY_S
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
    def busy(self) -> bool:
        """Serving a request (others wait their turn)."""
        return self._lock.locked()

    def should_start(self) -> bool:
        """Whether a start is due: no worker, none starting, and the restart delay passed."""
        return (
            not self._closed
            and not self._starting
            and self._sock is None
            and time.monotonic() - self._last_start >= RESTART_DELAY_S
        )

    async def start(self) -> None:
        """Start the worker (in a thread: the first start in a process launches the terrain
        server). Never raises: on failure, loads go on in threads and the failure is logged."""
        if not self.should_start():
            return
        self._starting = True
        self._last_start = time.monotonic()
        try:
            pid, sock = await anyio.to_thread.run_sync(spawn_worker, self._seed, self._params)
        except Exception as exc:
            self.failures += 1
            log.warning("terrain worker process did not start (%r); generating in threads", exc)
            return
        finally:
            self._starting = False
        if self._closed:  # closed while starting: nothing will ever use it
            sock.close()
            return
        self._sock, self._pid = sock, pid

    async def tiles(self, keys: Sequence[tuple[int, int]]) -> bytes | None:
        """The tiles of ``keys`` as one ``uint16`` buffer of shape ``(len(keys), 64, 64)``,
        or ``None`` if the worker cannot give them (the caller generates them itself)."""
        if not keys or not self.running:
            return None
        request = np.asarray(keys, dtype=np.int64).tobytes()
        async with self._lock:
            sock = self._sock
            if sock is None:  # died while we waited
                return None
            fd = sock.fileno()
            try:
                await write_all(fd, FRAME_LEN.pack(len(request)) + request)
                (n,) = FRAME_LEN.unpack(await read_exact(fd, FRAME_LEN.size))
                out = await read_exact(fd, n)
            except (EOFError, OSError) as exc:
                self._lost(f"died ({exc!r})")
                return None
            except BaseException:
                # Cancelled mid-message: the stream is out of step; a new worker takes over.
                self._lost(None)
                raise
        if len(out) != len(keys) * _CHUNK_BYTES:
            return None  # it could not compute this batch; the thread reports why
        self.batches += 1
        return out

    def _lost(self, why: str | None) -> None:
        sock, pid = self._sock, self._pid
        self._sock, self._pid = None, -1
        if sock is not None:
            sock.close()
        if why is None:
            _kill(pid)  # it may be mid-reply; EOF would stop it only after that
            return
        self.failures += 1
        log.warning(
            "terrain worker process %d %s; generating in threads until a new one starts",
            pid,
            why,
        )

    async def aclose(self) -> None:
        """Stop the worker: closing its socket is its EOF. Shielded from cancellation."""
        self._closed = True
        with anyio.CancelScope(shield=True):
            async with self._lock:
                sock, self._sock, self._pid = self._sock, None, -1
                if sock is not None:
                    sock.close()


def _kill(pid: int) -> None:
    if pid > 0:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
