"""The journal's sync process: writes and syncs commits on descriptors it is handed.

Run by :mod:`streamer.runtime.sync_process` as ``python -I -S sync_child.py SOCKET_FD
PARENT_PID``; the standard library only, so it starts in milliseconds and never imports the
world's code. Why a process: see ``sync_process.py``.

Protocol over the stream socket ``SOCKET_FD`` (little-endian):

- request: ``op`` (u8), ``ident`` (u32), ``length`` (u64), then ``length`` bytes of data.
  ``op`` bit 0: sync (``fdatasync``) after the write; bit 1: the request carries a descriptor
  (``SCM_RIGHTS``, with its first bytes) that replaces the current one.
- reply: ``ident`` (u32), ``stage`` (u8: 0 done, 1 the write failed, 2 the sync failed),
  ``errno`` (i32).

It exits when the socket reaches end of file (the journal closed it, or its process died)
and, through ``PR_SET_PDEATHSIG``, when the thread that started it ends: a write after the
parent's death could land behind the back of the next process to open the world.
"""

import ctypes
import errno
import os
import signal
import socket
import struct
import sys

_REQUEST = struct.Struct("<BIQ")
_REPLY = struct.Struct("<IBi")
_SYNC = 1
_NEW_FD = 2
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0
    except (OSError, AttributeError):
        failed = True
    if failed or os.getppid() != parent:
        # Without the signal a request already in the socket could still be written after
        # the parent died; or the parent died before it took effect. The journal sees end
        # of file and commits in its thread.
        sys.exit(3)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        part = sock.recv(min(n - len(out), 1 << 20))
        if not part:
            sys.exit(0)
        out += part
    return bytes(out)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    _die_with_parent(int(sys.argv[2]))
    fd = -1
    while True:
        head, fds, _, _ = socket.recv_fds(sock, _REQUEST.size, 1)
        if not head:
            sys.exit(0)
        if len(head) < _REQUEST.size:
            head += _recv_exact(sock, _REQUEST.size - len(head))
        op, ident, length = _REQUEST.unpack(head)
        if op & _NEW_FD:
            if not fds:
                sys.exit(2)  # a protocol error: the journal sees end of file and falls back
            if fd >= 0:
                os.close(fd)
            fd = fds[0]
        data = _recv_exact(sock, length) if length else b""
        stage, err = 0, 0
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                view = view[n:]
        except OSError as exc:
            stage, err = 1, exc.errno or 5
        if not stage and op & _SYNC:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                stage, err = 2, exc.errno or 5
        sock.sendall(_REPLY.pack(ident, stage, err))


if __name__ == "__main__":
    try:
        main()
    except (BrokenPipeError, ConnectionResetError):
        sys.exit(0)  # the journal gave this process up: nothing to say on its stderr
