"""The terrain fork server: starts terrain worker processes for this process's worlds.

One per process that wants terrain workers, started on first use with
``python -c "...terrain_server import main; main()" FD``. It imports numpy and the generator once;
each worker is then a fork of it (milliseconds, not the ~0.3 s of a fresh interpreter), so
opening many worlds stays cheap. ``multiprocessing``'s fork server is not used because it
re-imports the caller's ``__main__`` in every worker: a shard server's script without an
``if __name__ == "__main__"`` guard would run again there.

Protocol, over a ``SOCK_SEQPACKET`` pair (one message per send, so no framing): the parent
sends the generator's seed and parameters as JSON with the worker's socket attached
(``SCM_RIGHTS``); the server forks a worker on it and answers with the worker's pid as 8
bytes (``-1``: it could not). The server exits when the parent's end closes, which happens
when the parent exits or dies; each worker exits when its own socket's other end closes.
Workers are reaped by the kernel (``SIGCHLD`` ignored), so none lingers as a zombie.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Final

import msgspec
import numpy as np

from streamer.subproc import FRAME_LEN, read_exact_blocking, write_all_blocking
from streamer.worldgen.params import GeneratorParams
from streamer.worldgen.terrain import TerrainGenerator

__all__ = ["server_pid", "shutdown", "spawn_worker"]

_PID: Final = struct.Struct("<q")
# Not ``-m``: this module is already imported by the package, and runpy warns about that.
_SERVER_MAIN: Final = "from streamer.runtime.terrain_server import main; main()"
#: Longest wait for the server to answer a spawn (it forks; this only trips if it hangs).
_SPAWN_TIMEOUT_S: Final = 30.0


class _Spawn(msgspec.Struct, frozen=True):
    seed: int
    params: GeneratorParams


# -- the server process -------------------------------------------------------------------


def _worker_main(fd: int, seed: int, params: GeneratorParams) -> None:
    """A worker: chunk coordinates (int64 pairs) in, their tiles (raw uint16) out, until EOF.

    A batch it cannot compute (coordinates out of range) gets an empty reply, and the parent
    generates it in a thread, where the error is raised where it belongs.
    """
    gen = TerrainGenerator(seed, params)
    while True:
        try:
            (n,) = FRAME_LEN.unpack(read_exact_blocking(fd, FRAME_LEN.size))
            coords = np.frombuffer(read_exact_blocking(fd, n), dtype=np.int64).reshape(-1, 2)
        except EOFError:
            return
        try:
            tiles = gen.chunks_tiles([(int(cx), int(cy)) for cx, cy in coords])
            out = np.stack(tiles).tobytes()
        except Exception:
            out = b""
        write_all_blocking(fd, FRAME_LEN.pack(len(out)) + out)


def _serve(ctl: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps exited workers
    decoder = msgspec.json.Decoder(_Spawn)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctl, 1 << 16, 1)
        except OSError:
            return
        if not msg:  # the parent closed its end or died
            for fd in fds:
                os.close(fd)
            return
        pid = -1
        if len(fds) == 1:
            try:
                spawn = decoder.decode(msg)
                pid = os.fork()
            except Exception as exc:
                print(f"streamer terrain server: cannot start a worker: {exc!r}", file=sys.stderr)
            else:
                if pid == 0:
                    code = 1
                    try:
                        ctl.close()
                        _worker_main(fds[0], spawn.seed, spawn.params)
                        code = 0
                    except BrokenPipeError:
                        code = 0  # the parent closed its end mid-reply: nobody is waiting
                    except BaseException:
                        traceback.print_exc()  # the parent logs the death; this says why
                    finally:
                        os._exit(code)
        for fd in fds:
            os.close(fd)
        try:
            ctl.send(_PID.pack(pid))
        except OSError:
            return  # the parent is gone


def main() -> None:
    # Ctrl-C in the parent's terminal is for the parent: it stops us by closing its end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=int(sys.argv[1]))
    _serve(ctl)


# -- the parent side ------------------------------------------------------------------------

_lock = threading.Lock()
_server: tuple[subprocess.Popen[bytes], socket.socket] | None = None


def _start_server() -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = dict(os.environ)
    # The server must import this very streamer, installed or not; and numpy's BLAS threads
    # are of no use to terrain and should not be around when the server forks.
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    env["OPENBLAS_NUM_THREADS"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    try:
        proc = subprocess.Popen(
            # -P: the working directory is not put first on sys.path, so a stray
            # `streamer/` or `numpy.py` there cannot stand in for the real ones.
            [sys.executable, "-P", "-c", _SERVER_MAIN, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # not in the terminal's process group: see main()
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.settimeout(_SPAWN_TIMEOUT_S)
    return proc, ours


def spawn_worker(seed: int, params: GeneratorParams) -> tuple[int, socket.socket]:
    """Start a terrain worker; returns its pid and a non-blocking socket to it. Blocking
    (call it in a thread): the first call in a process starts the server (~0.3 s).

    :raises OSError: the server could not be started or could not start a worker.
    """
    global _server
    payload = msgspec.json.encode(_Spawn(seed, params))
    with _lock:
        for attempt in range(2):
            if _server is not None and _server[0].poll() is not None:
                _stop(*_server)  # it died since the last spawn
                _server = None
            if _server is None:
                _server = _start_server()
                atexit.register(shutdown)
            proc, ctl = _server
            # A fresh pair each attempt: a server that forked a worker on the last one and
            # died before answering may have left that worker reading it.
            ours, theirs = socket.socketpair()
            try:
                socket.send_fds(ctl, [payload], [theirs.fileno()])
                reply = ctl.recv(_PID.size)
            except OSError:
                reply = b""
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            if len(reply) == _PID.size:
                break
            ours.close()
            # The server died (killed, out of memory): a new one, once.
            _stop(proc, ctl)
            _server = None
            if attempt:
                raise OSError("the terrain server died while starting a worker")
    (pid,) = _PID.unpack(reply)
    if pid < 0:
        ours.close()
        raise OSError("the terrain server could not start a worker (see its stderr)")
    ours.setblocking(False)
    return pid, ours


def _stop(proc: subprocess.Popen[bytes], ctl: socket.socket) -> None:
    ctl.close()  # EOF: the server exits
    try:
        proc.wait(5.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_pid() -> int | None:
    """The running server's pid, if one is running."""
    server = _server
    return server[0].pid if server is not None and server[0].poll() is None else None


def shutdown() -> None:
    """Stop the server (its workers stop as their worlds close). Runs at exit."""
    global _server
    atexit.unregister(shutdown)
    with _lock:
        if _server is not None:
            _stop(*_server)
            _server = None
