"""The journal's commits written and synced by a small process of their own.

Why: a commit in a thread of this process needs the GIL after each system call (after the
write, after the ``fdatasync``), and while the event loop runs Python, as it does half the
time at 200,000 deltas/s, each retake waits for the loop to let go: 16 shards at that rate
saw ``submit`` to acknowledgement at p99 4.5-5.9 ms with the thread against 2.9-3.3 ms with
a process (``scripts/latency-probe --closed-first [--no-sync-process]``, four alternating
pairs), the disk's own ``fdatasync`` being 0.24 ms at p50 and 0.54 ms at p99 (strace)
(docs/performance.md). A process has its own interpreter: the commit's system calls run
back to back, and the loop hears of the result through a socket it polls anyway.

What moves: only "write these bytes to this descriptor, then ``fdatasync`` it" for commits
to a segment already open. Creating, rotating, cutting and abandoning segments stay in the
journal's thread (rare, and they are where the durability rules live); the segment's
descriptor is handed over with ``SCM_RIGHTS`` (one open file, one offset), so the child
writes exactly where the thread would have. One request at a time, under the journal's
I/O lock, as the thread's hops were.

Failures: the child reports a failed write or sync by stage and errno, and the journal
handles them as its own (``journal.py``). If the child is gone, or the socket breaks, with a
request sent (or partly), it is reported lost (``LOST``): the journal reaps the child, then
fails that group as a failed write (which abandons the segment, cutting it back to its last
acknowledged byte), or as a failed sync when it carried one with acknowledged bytes unsynced
(interval mode: the journal stops). A request that could not be sent at all (``NOT_SENT``)
goes through the thread instead. Either way the journal commits in its thread until it
replaces the child (``Journal.keep_sync_process``). The child ends with its socket, or with
the thread that started it (``PR_SET_PDEATHSIG``): it must never write behind the back of
the next process to open the world. It is used only with fsync on (``Journal``): without
fsync there is no sync to take off the GIL, and the world's open does not copy the newest
segment aside then, which is what makes a late write from a dying child land in an
orphaned file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import anyio

from streamer.runtime.thread_lane import outcome

log = logging.getLogger(__name__)

_REQUEST = struct.Struct("<BIQ")
_REPLY = struct.Struct("<IBi")
_SYNC = 1
_NEW_FD = 2
_CHILD = Path(__file__).with_name("sync_child.py")
_EXIT_WAIT_S = 2.0

#: Stages a request ends in (the reply's ``stage``, or ``LOST``: sent, or partly, and no
#: answer; ``NOT_SENT``: nothing of it reached the child, which is gone).
DONE, WRITE_FAILED, SYNC_FAILED, LOST, NOT_SENT = 0, 1, 2, 3, 4


class SyncProcess:
    """A started sync process (see the module docstring); create with :meth:`start`."""

    def __init__(self, proc: asyncio.subprocess.Process, sock: socket.socket) -> None:
        self._proc = proc
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._reply: asyncio.Future[tuple[int, int]] | None = None
        self._ident = 0
        self._owner: object = None  # what the child's descriptor belongs to
        self._buf = b""
        self._lost: str | None = None
        self._sending: asyncio.Task[None] | None = None
        self.requests = 0
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    async def start(cls) -> SyncProcess | None:
        """A new sync process, or None where it cannot run (not asyncio, not Linux, no
        process could be started: the journal then commits in its thread)."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # another anyio backend
            return None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Started from the loop's thread, not a worker thread: PR_SET_PDEATHSIG follows
            # the thread that started the child, and anyio's worker threads come and go.
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-S",
                str(_CHILD),
                str(child.fileno()),
                str(os.getpid()),
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except (OSError, RuntimeError) as exc:  # RuntimeError: the loop's child watcher
            parent.close()
            log.warning("journal: cannot start its sync process (%s); committing in a thread", exc)
            return None
        finally:
            child.close()
        parent.setblocking(False)
        return cls(proc, parent)

    @property
    def alive(self) -> bool:
        return self._lost is None

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def write(self, fd: int, owner: object, data: bytes, sync: bool) -> tuple[int, int]:
        """Write ``data`` to ``fd`` (then ``fdatasync`` it if ``sync``); ``(stage, errno)``.

        ``owner`` names what ``fd`` belongs to (the journal's segment): the descriptor is
        handed over again whenever it changes, never judged by its number, which the
        kernel reuses. Runs to the end even if the caller is cancelled, as the journal's
        thread hops do: the caller must learn what happened to its bytes.
        """
        if self._lost is not None:
            return NOT_SENT, errno.EPIPE
        assert self._reply is None, "one request at a time"
        self._ident = ident = (self._ident + 1) & 0xFFFFFFFF
        reply: asyncio.Future[tuple[int, int]] = self._loop.create_future()
        self._reply = reply
        new_fd = owner is not self._owner
        head = _REQUEST.pack((_SYNC if sync else 0) | (_NEW_FD if new_fd else 0), ident, len(data))
        sock = self._sock
        delivered = False
        try:
            if new_fd:
                # 13 bytes into an empty buffer (the previous request was answered, so the
                # child read all of it): the descriptor goes with them in one call.
                sent = socket.send_fds(sock, [head], [fd])
                delivered = True
                self._owner = owner
                rest = memoryview(head)[sent:].tobytes() + data if sent < len(head) else data
            else:
                rest = head + data
            try:
                sent = sock.send(rest)
            except BlockingIOError:
                sent = 0
        except OSError as exc:
            self._lose(f"cannot send to it: {exc}")
            # Nothing delivered: the child had gone (the previous request was answered, so
            # it was not writing either); the caller may write these bytes itself.
            return (LOST if delivered else NOT_SENT), exc.errno or errno.EPIPE
        self.requests += 1
        if sent < len(rest):
            # A large commit: the rest as the child reads; in a task of its own, so a
            # cancelled caller does not leave half a request in the socket.
            # (Referenced until done: the loop keeps only weak references to tasks.)
            self._sending = self._loop.create_task(self._send_rest(memoryview(rest)[sent:]))
        return await outcome(reply)

    async def _send_rest(self, rest: memoryview) -> None:
        try:
            await self._loop.sock_sendall(self._sock, rest)
        except OSError as exc:
            self._lose(f"cannot send to it: {exc}")

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose(f"its socket failed: {exc}")
            return
        if not data:
            code = self._proc.returncode  # None until reaped, which may come later
            self._lose("it exited" if code is None else f"it exited with code {code}")
            return
        self._buf += data
        while len(self._buf) >= _REPLY.size:
            ident, stage, err = _REPLY.unpack_from(self._buf)
            self._buf = self._buf[_REPLY.size :]
            reply = self._reply
            if (
                reply is None
                or ident != self._ident
                or stage not in (DONE, WRITE_FAILED, SYNC_FAILED)
            ):
                self._lose(f"an unexpected reply ({ident}, {stage}, {err})")
                return
            self._reply = None
            if not reply.done():
                reply.set_result((stage, err))

    def _lose(self, why: str, *, quiet: bool = False) -> None:
        """The child is gone or out of step (or being closed, ``quiet``): answer the request
        in flight as lost, stop."""
        if self._lost is not None:
            return
        self._lost = why
        if not quiet:
            log.warning("journal: its sync process is lost (%s); committing in a thread", why)
        fd = self._sock.fileno()
        self._loop.remove_reader(fd)
        if self._sending is not None and not self._sending.done():
            # Before the close: the descriptor's number may be reused at once (by the next
            # segment), and the loop must not be left watching it for this send.
            self._loop.remove_writer(fd)
            self._sending.cancel()
        reply, self._reply = self._reply, None
        if reply is not None and not reply.done():
            reply.set_result((LOST, errno.EPIPE))
        self._sock.close()  # the child, if alive, sees end of file and exits

    async def aclose(self) -> None:
        """Stop the child (it exits on end of file) and reap it. Idempotent."""
        self._lose("closed", quiet=True)
        proc = self._proc
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(_EXIT_WAIT_S):
                await proc.wait()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
